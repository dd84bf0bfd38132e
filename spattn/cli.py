"""The ``spattn`` command line: check, show, explain, codegen, run.

Every command takes a pattern file or ``-e EXPR`` and ``-p NAME=VALUE`` params;
it calls the library and holds no logic of its own. Exit codes: 0 success,
1 an error spattn reports (a pattern error is printed with line, column and caret;
a file that cannot be written, a size that does not fit in memory), 2 a usage
error. ``spattn --version`` prints the versions of spattn, its code generator,
torch and Triton.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import time
import warnings

import torch

from .codegen.config import next_pow2
from .dsl.errors import SpattnError, short_repr
from .ir.memory import check_room

SYMBOLS = {0: ".", 1: "+", 2: "#"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors exit 2, as argparse does, with our prefix
        self.print_usage(sys.stderr)
        self.exit(2, f"spattn: error: {message}\n")


def _param(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    value = value.strip()
    if not name.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME a param's name, got "
                                         f"{text!r}")
    try:
        if value.startswith("["):
            inner = value.strip("[]").strip()
            parsed = [_number(v) for v in inner.split(",")] if inner else []
        elif "," in value:
            parsed = [_number(v) for v in value.split(",")]
        else:
            parsed = _number(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"param {name!r}: expected a number or a list like 1,2,3, got {short_repr(value)}"
        ) from None
    return name.strip(), parsed


def _number(text: str):
    """An int, or a float when written with a point or an exponent (a score's param)."""
    text = text.strip()
    return float(text) if any(c in text for c in ".eE") else int(text)


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", help="a .spattn pattern file")
    p.add_argument("-e", "--expr", help="an inline pattern expression, e.g. 'causal & window(64)'")
    p.add_argument("-p", "--param", action="append", type=_param, default=[], metavar="NAME=VALUE",
                   help="bind a param (repeatable); lists as 1,2,3")
    p.add_argument("--pattern", help="which pattern of a file with several")
    p.add_argument("--score", help="a score modification of -e EXPR, e.g. 'softcap(30.0)'")


def _sizes(p, *, lq_required=True):
    p.add_argument("--lq", type=_positive, required=lq_required, help="query length")
    p.add_argument("--lk", type=_positive, help="key length (default: --lq)")
    p.add_argument("--heads", type=_positive, default=1, help="number of heads")
    p.add_argument("--q-offset", type=int, default=None, help="position of query row 0")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spattn", description="A compiler for attention sparsity patterns.")
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parser.commands = sub.choices       # (a command's usage, for the errors main reports)
    sub.required = True

    p = sub.add_parser("check", help="parse and type-check; print the canonical form")
    _common(p)

    p = sub.add_parser("show", help="the mask and tile classes as text, and optionally a PNG")
    _common(p)
    _sizes(p)
    p.add_argument("--block-m", type=_positive, default=None, help="query tile size")
    p.add_argument("--block-n", type=_positive, default=None, help="key tile size")
    p.add_argument("--png", help="write a picture of the mask and tile classes here")

    p = sub.add_parser("explain", help="the analysis report: density, tiles, efficiency, strategy")
    _common(p)
    _sizes(p)
    p.add_argument("--block-m", type=_positive, default=None,
                   help="query tile size (default: the target cost model's, 128 for cuda, "
                        "64 for cpu; the GPU forward's default is 64)")
    p.add_argument("--block-n", type=_positive, default=None,
                   help="key tile size (default 64)")
    p.add_argument("--target", choices=("cuda", "cpu"), default="cuda",
                   help="whose cost model predicts the speedup (default cuda)")

    p = sub.add_parser("codegen", help="print the generated Triton source")
    _common(p)
    p.add_argument("--kind", choices=("fwd", "bwd"), default="fwd")
    p.add_argument("--dim", type=_positive, default=128, help="head dimension (16..256)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="bfloat16")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")

    p = sub.add_parser("run", help="run on random inputs, check against the reference, time it")
    _common(p)
    _sizes(p)
    p.add_argument("--dim", type=_positive, default=64, help="head dimension")
    p.add_argument("--batch", type=_positive, default=1)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    p.add_argument("--repeat", type=_positive, default=3, help="timed repetitions")
    return parser


def version_text() -> str:
    """``spattn 0.1.0 (codegen 10, torch 2.x, triton 3.x)``: what a bug report needs."""
    from importlib import metadata

    from . import __version__
    from .codegen.kernels import CODEGEN_VERSION
    parts = [f"codegen {CODEGEN_VERSION}", f"torch {torch.__version__}"]
    try:
        parts.append(f"triton {metadata.version('triton')}")
    except metadata.PackageNotFoundError:
        parts.append("triton not installed")
    return f"spattn {__version__} ({', '.join(parts)})"


def _compile(args):
    import spattn
    if (args.file is None) == (args.expr is None):
        raise _Usage("give a pattern file or -e EXPR (exactly one)")
    params = dict(args.param)
    if args.file is not None and args.score is not None:
        raise _Usage("--score goes with -e EXPR; in a file, write `pattern p = MASK score EXPR`")
    if args.file is not None and args.pattern is None:
        names = spattn.pattern_names(args.file)
        if len(names) > 1:
            if args.command == "check":
                return [spattn.load(args.file, pattern=n, **params) for n in names]
            raise _Usage(f"{args.file} defines several patterns ({', '.join(names)}): "
                         "pick one with --pattern NAME")
    backend = getattr(args, "backend", "auto")
    if args.expr is not None:
        try:
            return spattn.compile(args.expr, pattern=args.pattern, backend=backend,
                                  score=args.score, **params)
        except SpattnError as e:
            raise _for_the_command_line(e, params) from None
    return spattn.load(args.file, pattern=args.pattern, backend=backend, **params)


class _Usage(Exception):
    pass


def _for_the_command_line(e: SpattnError, params: dict) -> SpattnError:
    """``e`` with the Python API's way of binding a name (``compile(..., W=...)``) written
    as the option that does it (``-p W=VALUE``), and the ``-p`` names nothing used."""
    m = re.search(r"a keyword param: compile\(\.\.\., (\w+)=\.\.\.\)", e.message)
    if m is None:
        return e
    message = e.message.replace(m.group(0), f"-p {m.group(1)}=VALUE")
    if params:
        message += f"; -p {', '.join(sorted(params))} named no free name of the expression"
    return type(e)(message, source=e.source, line=e.line, column=e.column, filename=e.filename)


def demo_inputs(pat, Lq, Lk, *, num_heads=1, batch=1, q_offset=None, seed=0, device=None):
    """Synthetic runtime inputs for a pattern, sized from the index ranges it uses.

    1-D inputs the pattern only compares with constants (``is_global[k]``, ``vertical[k]``:
    :func:`marker_inputs`) become 0/1 markers, one position in 16 set; other 1-D inputs
    sorted segment ids (packed documents); n-D inputs random 0/1 tables (random blocks).
    Returns ``(inputs, notes)``.
    """
    from .ir.intervals import index_hull
    if not pat.inputs and not pat.score_inputs:
        return {}, []
    gen = torch.Generator().manual_seed(seed)
    out, notes = {}, []
    if pat.score_inputs:
        from .ir import build
        from .ir.nodes import FLoad, Load, walk
        probe = build.and_(*(build.range_(Load(n.name, n.index), 0, 0) for n in walk(pat.score)
                             if isinstance(n, FLoad)))
        shapes: dict[str, list[int]] = {}
        for load, dims in index_hull(probe, Lq, Lk, num_heads=num_heads, batch=batch,
                                     q_offset=q_offset).items():
            cur = shapes.setdefault(load.name, [1] * len(dims))
            for i, (lo, hi) in enumerate(dims):
                cur[i] = max(cur[i], int(hi) + 1)
        for name, shape in shapes.items():
            t = torch.randn(*shape, generator=gen)
            notes.append(f"input {name}: synthetic random float table, shape "
                         f"{tuple(t.shape)} (seed {seed})")
            out[name] = t.to(device) if device is not None else t
        if not pat.inputs:
            return out, notes
    hull = index_hull(pat.ir, Lq, Lk, num_heads=num_heads, batch=batch, q_offset=q_offset)
    sizes: dict[str, list[int]] = {}
    for load, dims in hull.items():
        cur = sizes.setdefault(load.name, [1] * len(dims))
        for i, (lo, hi) in enumerate(dims):
            cur[i] = max(cur[i], int(hi) + 1)
    markers = marker_inputs(pat)
    for name, nd in pat.inputs.items():
        shape = sizes.get(name, [max(Lq, Lk)] * nd)
        if nd == 1 and name in markers:
            n = shape[0]
            t = torch.zeros(n, dtype=torch.int64)
            t[torch.randperm(n, generator=gen)[: max(1, n // 16)]] = 1
            notes.append(f"input {name}: synthetic 0/1 markers, shape {tuple(t.shape)}, "
                         f"{int(t.sum())} set (seed {seed})")
        elif nd == 1:
            n = shape[0]
            cuts = torch.sort(torch.randint(0, n, (max(1, n // 64),), generator=gen)).values
            t = torch.bucketize(torch.arange(n), cuts, right=True)
            notes.append(f"input {name}: synthetic sorted segment ids, shape {tuple(t.shape)}, "
                         f"{int(t.max()) + 1} segments (seed {seed})")
        else:
            t = (torch.rand(*shape, generator=gen) < 0.3).to(torch.int64)
            notes.append(f"input {name}: synthetic random 0/1 table, shape {tuple(t.shape)}, "
                         f"density 0.3 (seed {seed})")
        out[name] = t.to(device) if device is not None else t
    return out, notes


def marker_inputs(pat) -> set[str]:
    """The 1-D inputs of ``pat`` that it only compares with constants (every load of them
    is the operand of a range test: ``is_global[k]``, i.e. ``is_global[k] != 0``), as
    opposed to ids compared with each other (``doc[q] == doc[k]``)."""
    from .ir.nodes import Load, Range, walk
    loads, tested = {}, {}
    for n in walk(pat.ir):
        if isinstance(n, Load):
            loads[n.name] = loads.get(n.name, 0) + 1
        elif isinstance(n, Range) and isinstance(n.x, Load):
            tested[n.x.name] = tested.get(n.x.name, 0) + 1
    return {name for name, nd in pat.inputs.items()
            if nd == 1 and loads.get(name) and tested.get(name) == loads[name]}


def _cmd_check(args, pat, out):
    """One pattern: its canonical source, then its params and inputs. A file of several:
    ``name: source`` for each, its params and inputs indented below it."""
    if not isinstance(pat, list):
        print(pat.source, file=out)
        _params_and_inputs(pat, out, "")
        return
    for p in pat:
        print(f"{p.name}: {p.source}", file=out)
        _params_and_inputs(p, out, "  ")


def _params_and_inputs(pat, out, indent):
    if pat.grid is not None:
        extra = f" after {pat.grid_offset} tokens" if pat.grid_offset else ""
        extra += f" before {pat.grid_suffix} tokens" if pat.grid_suffix else ""
        n = math.prod(pat.grid) + pat.grid_offset + pat.grid_suffix
        print(indent + "grid: " + " x ".join(map(str, pat.grid)) + f"{extra} ({n:,} tokens: a "
              "call's length)", file=out)
    if pat.params:
        print(indent + "params: " + ", ".join(f"{k}={v}" for k, v in pat.params.items()),
              file=out)
    if pat.inputs:
        print(indent + "inputs: " + ", ".join(f"{k} ({n}-D)" for k, n in pat.inputs.items()),
              file=out)
    if pat.score is not None:
        print(f"{indent}score: {pat.score}", file=out)
    if pat.score_inputs:
        print(indent + "score inputs: " + ", ".join(f"{k} ({n}-D float)"
                                                    for k, n in pat.score_inputs.items()),
              file=out)


def _shape_and_inputs(args, pat, out, *, batch=1, device=None):
    """(Lq, Lk, synthetic runtime inputs) of a command, saying which inputs were made up."""
    Lq = args.lq
    Lk = args.lk or Lq
    from .pattern import _fits
    with _fits(f"the synthetic runtime inputs of Lq={Lq}, Lk={Lk}"):
        inputs, notes = demo_inputs(pat, Lq, Lk, num_heads=args.heads, batch=batch,
                                    q_offset=args.q_offset, device=device)
    for n in notes:
        print(n, file=out)
    return Lq, Lk, inputs


def _cmd_show(args, pat, out):
    Lq, Lk, inputs = _shape_and_inputs(args, pat, out)
    small = Lq <= 64 and Lk <= 96
    bm = args.block_m or (8 if small else next_pow2(Lq // 48))
    bn = args.block_n or (8 if small else next_pow2(Lk // 96))
    tiles = pat.tiles(Lq, Lk, bm, bn, num_heads=args.heads, q_offset=args.q_offset, **inputs)
    m = pat.mask(Lq, Lk, num_heads=args.heads, q_offset=args.q_offset, **inputs) if small else None
    for h in range(args.heads):
        if args.heads > 1:
            print(f"head {h}:", file=out)
        if m is not None:
            print(f"mask [{Lq} x {Lk}] ('#' allowed, '.' masked):", file=out)
            for row in m[0, h]:
                print("  " + "".join("#" if x else "." for x in row.tolist()), file=out)
        t = tiles[0, h]
        print(f"tiles [{t.shape[0]} x {t.shape[1]}] of {bm} x {bn} "
              "('#' FULL, '+' PARTIAL, '.' EMPTY):", file=out)
        for row in t:
            print("  " + "".join(SYMBOLS[int(x)] for x in row.tolist()), file=out)
    from .ir.cost import tile_counts
    c = tile_counts(tiles)
    print(f"tiles: {c['full']} full, {c['partial']} partial, {c['empty']} empty", file=out)
    if args.png is not None:
        from .plot import plot_pattern
        if not args.png.strip():
            raise SpattnError("--png needs a file name, got ''")
        try:
            plot_pattern(pat, Lq, Lk, bm, bn, args.png, head=0, q_offset=args.q_offset,
                         inputs=inputs)
        except OSError as e:
            raise SpattnError(f"cannot write {args.png}: {e.strerror or e}") from None
        print(f"wrote {args.png}", file=out)


def _cmd_explain(args, pat, out):
    Lq, Lk, inputs = _shape_and_inputs(args, pat, out)
    report = pat.explain(Lq, Lk, num_heads=args.heads, q_offset=args.q_offset,
                         block_m=args.block_m, block_n=args.block_n, target=args.target,
                         **inputs)
    print(str(report), file=out)


def _cmd_codegen(args, pat, out):
    text = pat.kernel_source(args.kind, head_dim=args.dim, dtype=getattr(torch, args.dtype))
    if args.output is not None:
        from pathlib import Path
        if not args.output.strip():
            raise SpattnError("--output needs a file name, got ''")
        try:
            Path(args.output).write_text(text)
        except OSError as e:
            raise SpattnError(f"cannot write {args.output}: {e.strerror or e}") from None
        print(f"wrote {args.output}", file=out)
    else:
        out.write(text)


def _cmd_run(args, pat, out):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SpattnError("--device cuda: no CUDA device is available here")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    B, H, D = args.batch, args.heads, args.dim
    Lq, Lk, inputs = _shape_and_inputs(args, pat, out, batch=B, device=device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    from .pattern import _fits
    what = f"random q, k, v of {B} x {H} x {max(Lq, Lk)} x {D}"
    # q, k, v drawn in float32 on the CPU, then converted: the peak of either side
    elems = B * H * (Lq + 2 * Lk) * D
    # (every size checked: a run allocates these whatever their size)
    check_room(4 * elems, "cpu", what, min_bytes=0)
    if device != "cpu":
        check_room(elems * dtype.itemsize, device, f"{what} in {str(dtype)[6:]}", min_bytes=0)
    with _fits(what):
        q, k, v = (torch.randn(B, H, L, D, generator=gen).to(device=device, dtype=dtype)
                   for L in (Lq, Lk, Lk))
    from .runtime.progress import progress
    with progress(f"running {pat.name} (the first call builds its plan)"):
        t0 = time.perf_counter()
        o = pat(q, k, v, q_offset=args.q_offset, **inputs)
        _sync(device)
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            pat(q, k, v, q_offset=args.q_offset, **inputs)
            _sync(device)
            times.append(time.perf_counter() - t0)
    times.sort()
    print(f"shape: B={B} H={H} Lq={Lq} Lk={Lk} D={D} {str(dtype).replace('torch.', '')} on {device}",
          file=out)
    print(f"first call: {first * 1e3:.1f} ms; median of {len(times)}: "
          f"{times[len(times) // 2] * 1e3:.2f} ms", file=out)
    if B * H * Lq * Lk <= 2 ** 26:
        from .runtime.reference import pattern_reference
        ref, _ = pattern_reference(pat, q.double(), k.double(), v.double(),
                                   q_offset=args.q_offset,
                                   **{n: (t.double() if t.is_floating_point() else t)
                                      for n, t in inputs.items()})
        err = float((o.double() - ref).norm() / ref.norm().clamp_min(1e-30))
        tol = 1e-3 if dtype == torch.float32 else 2e-2
        status = "ok" if err < tol and torch.isfinite(o).all() else "MISMATCH"
        print(f"check against float64 reference: rel. error {err:.2e} ({status})", file=out)
        if status != "ok":
            raise SpattnError(f"output differs from the reference (rel. error {err:.2e})")
    else:
        print("check against reference: skipped (too large for a dense reference)", file=out)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


COMMANDS = {"check": _cmd_check, "show": _cmd_show, "explain": _cmd_explain,
            "codegen": _cmd_codegen, "run": _cmd_run}


def main(argv=None, out=None) -> int:
    out = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            pat = _compile(args)
            COMMANDS[args.command](args, pat, out)
    except _Usage as e:
        parser.commands[args.command].print_usage(sys.stderr)
        print(f"spattn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except SpattnError as e:
        print(f"spattn: {e}", file=sys.stderr)
        return 1
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """spattn's warnings as the command's own lines (not Python's, with a source line of
    spattn's); other libraries' in Python's form."""
    from .dsl.errors import SpattnWarning
    if issubclass(category, SpattnWarning):
        text = str(message)
        print(f"spattn: warning: {text[len('spattn: '):] if text.startswith('spattn: ') else text}",
              file=file or sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line),
              file=file or sys.stderr, end="")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
