"""Compile generated kernels for a Hopper target without a GPU (Triton's ASTSource ->
TTIR -> TTGIR -> LLVM -> PTX), to catch what the interpreter forgives: names a jitted
function does not receive, operations on arguments Triton specialises to constexprs.

Run as a script (``python tests/helpers/compile_kernels.py``) in a process without
``TRITON_INTERPRET``: it prints one ``OK``/``ERR`` line per kernel and exits 1 on an error.
``--rows``: the kernels that address rows through row tables (:data:`ROWS_CASES`) instead;
``--box``: the forward kernels that read a token layout's boxes through 5-D TMA descriptors
(:data:`BOX_CASES`); ``--atomic``: the backward kernels with atomic dQ (:data:`ATOMIC_CASES`).
``--shard=I/N``: every N-th case from the I-th (0-based), so that test workers share a list.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ["SPATTN_CACHE_DIR"] = tempfile.mkdtemp(prefix="spattn-compile-")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile as triton_compile  # noqa: E402

import spattn  # noqa: E402
from spattn.runtime import cache  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CONSTS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_M1=64, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=64,
              BLOCK_D=64, HEAD_DIM=64, DOT_PREC="tf32", SPANS=False, RUNS=False,
              DETERMINISTIC=True)     # (the partial-buffer variant of table gradients)
BF16 = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
F32 = {"LSE", "DLSE", "LSE2", "DELTA"}
I32P = {"ORDER", "ROWS_P", "COLS_P", "ROWS_F", "COLS_F", "SPAN", "Q_ROWS", "K_ROWS"}


def _signature(fn, consts: dict, descs: dict | None = None, f32=()) -> dict:
    """Argument types; ``descs``: the tensors passed as TMA descriptors, by block shape;
    ``f32``: more fp32 pointers (the atomic dQ accumulator ``DQ``)."""
    sig = {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in (descs or {}):
            sig[name] = f"tensordesc<bf16[{','.join(map(str, descs[name]))}]>"
        elif name in f32:
            sig[name] = "*fp32"
        elif name in BF16:
            sig[name] = "*bf16"
        elif name in F32:
            sig[name] = "*fp32"
        elif name in I32P:
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            # float tables (bf16), their fp32 gradients and partial sums (after the flag)
            partial = i > 0 and fn.arg_names[i - 1].startswith("grad_")
            sig[name] = "*fp32" if name.startswith("D") or partial else "*bf16"
        elif name.startswith("sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _module(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compile_pattern(pat, kind: str, ones=(), box=None, runs=False, **opts) -> list[str]:
    """Compile the ``kind`` kernels of ``pat``; ``ones``: int arguments passed as the
    constexpr 1 Triton specialises them to (``H``, ``Lq``); ``box``: the box kernels'
    constexprs (``BoxRows.meta``); ``runs``: the table kernels' FULL tiles as runs (the
    launch constexpr ``RUNS``)."""
    mod = _module(cache.kernel_file(pat, kind, head_dim=64, dtype="bf16", **opts))
    out = []
    atomic = kind == "bwd" and opts.get("dq") == "atomic"
    for k in ([mod.KERNEL] if kind == "fwd" else [mod.ROWSTATS, mod.DKDV] if atomic
              else [mod.DQ, mod.DKDV]):
        launch = {**CONSTS, "RUNS": runs, **(box or {})}
        consts = {p.name: launch.get(p.name) for p in k.params if p.is_constexpr}
        consts.update({n: 1 for n in ones if n in k.arg_names})
        descs = None
        if box:         # the 5-D blocks of BoxRows.view: [1, sub-box, BLOCK_D]
            sub = {n: [box[f"{n}B{a}"] for a in range(3)] for n in "QK"}
            sub = {n: (b if box["FOLD"] else [1] + b[1:]) for n, b in sub.items()}
            descs = {t: [1, *sub["K" if t in "KV" else "Q"], CONSTS["BLOCK_D"]]
                     for t in "QKVO"}
        elif opts.get("tma") and kind == "bwd" and k is mod.DKDV:   # each kernel's blocks
            descs = {t: [1, 1, CONSTS["BLOCK_N1" if t in ("K", "V", "DK", "DV") else
                                      "BLOCK_M1"], CONSTS["BLOCK_D"]]
                     for t in ("Q", "K", "V", "DO", "DK", "DV") if t in k.arg_names}
        elif opts.get("tma") and kind == "bwd" and k is getattr(mod, "DQ", None):
            descs = {t: [1, 1, CONSTS["BLOCK_N2" if t in ("K", "V") else "BLOCK_M2"],
                         CONSTS["BLOCK_D"]]
                     for t in ("Q", "K", "V", "DO", "O", "DQ") if t in k.arg_names}
        src = ASTSource(fn=k, signature=_signature(k, consts, descs,
                                                   f32=("DQ",) if atomic else ()),
                        constexprs={(k.arg_names.index(n),): v for n, v in consts.items()})
        try:
            compiled = triton_compile(src, target=TARGET)
            if box and "cp.async.bulk.tensor.5d" not in compiled.asm["ptx"]:
                raise AssertionError("no 5-D TMA load (cp.async.bulk.tensor.5d) in the PTX")
            if atomic and k is mod.DKDV and "red.global" not in compiled.asm["ptx"] \
                    and "atom.global" not in compiled.asm["ptx"]:
                raise AssertionError("no atomic add (red.global / atom.global) in the PTX")
            out.append(f"OK  {k.__name__} {opts} {list(ones)}{' runs' if runs else ''}")
        except Exception as e:  # noqa: BLE001 - reported, the caller fails
            out.append(f"ERR {k.__name__} {opts} {list(ones)}: {type(e).__name__}: "
                       f"{str(e)[:2000]}")
    return out


CASES = [
    ("input rel\npattern rel_bias = causal & window(256) "
     "score softcap(30.0) + rel[h, clamp(q - k, 0, 255)]", {"strategy": "ranges"},
     ("grad_rel", "stride_rel_1", "size_rel_0")),
    ("input rel\npattern rel_bias = causal & window(256) "
     "score softcap(30.0) + rel[h, clamp(q - k, 0, 255)]", {"strategy": "table"}, ()),
    ("input rel\npattern rel_bias = causal & window(256) "
     "score softcap(30.0) + rel[h, clamp(q - k, 0, 255)]",
     {"strategy": "ranges", "loop": "fused"}, ()),
    ("input rel\npattern rel_bias = causal & window(256) "
     "score softcap(30.0) + rel[h, clamp(q - k, 0, 255)]",
     {"strategy": "ranges", "loop": "persistent"}, ()),
    # the score flags: loads before the dot, unchecked / clamped indices, tanh.approx.f32
    ("input rel\npattern rel_bias = causal & window(256) "
     "score softcap(30.0) + rel[h, clamp(q - k, 0, 255)]",
     {"strategy": "ranges", "score_load": "early", "score_index": "free", "fast_tanh": True},
     ()),
    ("input rel\npattern rel_bias = causal & window(256) "
     "score softcap(30.0) + rel[h, clamp(q - k, 0, 255)]",
     {"strategy": "ranges", "score_load": "gather", "score_index": "free", "block_m": 64,
      "block_n": 64}, ()),                     # (the gather's shapes are the config's tiles)
    ("input rpb\npattern rpb2d = abs(q // 64 - k // 64) <= 3 & abs(q % 64 - k % 64) <= 3 "
     "score softcap(20.0) + rpb[h, q // 64 - k // 64 + 255, q % 64 - k % 64 + 63]",
     {"strategy": "table", "loop": "fused", "score_load": "early", "score_index": "clamp",
      "fast_tanh": True}, ()),
    # tables a step ahead: one interval, a merged union (64-bit), CSR slots, persistent
    ("input rel\npattern rel_bias = causal & window(256) "
     "score softcap(30.0) + rel[h, clamp(q - k, 0, 255)]",
     {"strategy": "ranges", "loop": "fused", "score_load": "ahead", "score_index": "free"}, ()),
    ("input rel\npattern rel_sink = causal & (window(256) | k < 4) "
     "score s + rel[h, clamp(q - k, 0, 255)]",
     {"strategy": "ranges", "loop": "fused", "score_load": "ahead", "int64": True}, ()),
    ("input rpb\npattern rpb2d = abs(q // 64 - k // 64) <= 3 & abs(q % 64 - k % 64) <= 3 "
     "score s + rpb[h, q // 64 - k // 64 + 3, q % 64 - k % 64 + 63]",
     {"strategy": "table", "score_load": "ahead", "score_index": "mask"}, ()),
    ("input rel\npattern rel_bias = causal & window(256) "
     "score s + rel[h, clamp(q - k, 0, 255)]",
     {"strategy": "ranges", "loop": "persistent", "score_load": "ahead"}, ()),
    ("pattern alibi_slopes = causal score alibi(alibi_slope) + float(Lq) * 1e-9",
     {"strategy": "ranges"}, ("H", "Lq")),
    ("input temp\npattern temperature = causal score s * temp[h] + abs(s) * 0.5",
     {"strategy": "ranges"}, ()),
    ("input qb\ninput kb\npattern qk_biases = causal score s + qb[h, q % 5] * kb[k % 7]",
     {"strategy": "ranges"}, ()),
    # tables read at entries of neither q nor k: the partial buffers of deterministic grads
    ("input temp\ninput w\npattern slopes = causal & window(64) "
     "score s * temp[h] + w[b, h] * float(q - k) * 0.1 + w[0, 0]", {"strategy": "table"}, ()),
    # the lse output's gradient (DLSE in the dQ kernel's row statistics): pointer and TMA
    # loads, a score with a learned table
    ("pattern win = causal & window(256)", {"strategy": "ranges", "lse_grad": True}, ()),
    ("pattern win = causal & window(256)", {"strategy": "ranges", "lse_grad": True,
                                            "tma": True}, ()),
    ("input rel\npattern rel_bias = causal & window(256) "
     "score softcap(30.0) + rel[h, clamp(q - k, 0, 255)]", {"strategy": "table",
                                                            "lse_grad": True}, ()),
]


#: Row-table kernels (``rows="table"``: docs/layouts.md): a remapped-looking 2-D pattern in
#: both strategies, the loop variants, 64-bit integers, and a score with a table.
_NB2D = "pattern nb2d = abs(q // 64 - k // 64) <= 3 & abs(q % 64 - k % 64) <= 3"
ROWS_CASES = [
    (_NB2D, {"strategy": "table", "rows": "table"}, ()),
    (_NB2D, {"strategy": "table", "rows": "table", "loop": "fused", "int64": True}, ()),
    (_NB2D, {"strategy": "table", "rows": "table", "loop": "persistent"}, ()),
    (_NB2D, {"strategy": "table", "rows": "table", "runs": True}, ()),
    (_NB2D, {"strategy": "table", "rows": "table", "loop": "persistent", "runs": True}, ()),
    ("pattern win = causal & window(256)", {"strategy": "ranges", "rows": "table"}, ()),
    ("input rpb\npattern rpb2d = abs(q // 64 - k // 64) <= 3 & abs(q % 64 - k % 64) <= 3 "
     "score s + rpb[h, q // 64 - k // 64 + 3, q % 64 - k % 64 + 3]",
     {"strategy": "table", "rows": "table"}, ()),
]


#: Atomic-dQ backward kernels (``dq="atomic"``: docs/codegen.md, Backward): both
#: strategies, split and fused loops, TMA loads, 64-bit integers, row tables, a score with
#: a derivative (softcap), GQA-shaped heads (``GROUP`` is a runtime argument).
ATOMIC_CASES = [
    ("pattern win = causal & window(256)", {"strategy": "ranges", "dq": "atomic"}, ()),
    ("pattern win = causal & window(256)",
     {"strategy": "ranges", "dq": "atomic", "loop": "fused"}, ()),
    ("pattern win = causal & window(256)", {"strategy": "ranges", "dq": "atomic", "tma": True},
     ()),
    ("pattern docs = causal & same(doc)\ninput doc", {"strategy": "table", "dq": "atomic"}, ()),
    ("pattern docs = causal & same(doc)\ninput doc",
     {"strategy": "table", "dq": "atomic", "loop": "fused", "int64": True}, ()),
    (_NB2D, {"strategy": "table", "rows": "table", "dq": "atomic"}, ()),
    ("pattern capped = causal score softcap(30.0)", {"strategy": "ranges", "dq": "atomic"}, ()),
    # the lse output's gradient (DLSE in the row statistics): the row-statistics kernel,
    # with row tables too
    ("pattern win = causal & window(256)", {"strategy": "ranges", "dq": "atomic",
                                            "lse_grad": True}, ()),
    (_NB2D, {"strategy": "table", "rows": "table", "dq": "atomic", "lse_grad": True}, ()),
]


def _box(shape, box) -> dict:
    """The box constexprs of a layout of ``shape`` in boxes ``box`` with the 64 x 64 tiles
    of :data:`CONSTS`."""
    from spattn.ir.layout import Grid, Layout
    from spattn.runtime.triton_backend import BoxRows
    layout = Layout(Grid(shape), box)
    pad = (1,) * (3 - len(shape))
    return BoxRows(pad + shape, pad + box, len(shape) == 3).meta(64, 64) | {"_layout": layout}


#: Box kernels (``rows="box"``: docs/layouts.md): the remapped 2-D (8 x 16 boxes, a padded
#: grid) and 3-D (2 x 8 x 8 boxes, batch and heads folded) neighbourhoods in the table
#: strategy (a remapped pattern has no closed form), the split and fused loops, 64-bit
#: integers, one head (``H`` specialised to 1); a closed-form pattern on a 1-D grid in the
#: ranges strategy.
BOX_CASES = [
    (((64, 60), (8, 16), 7), {"strategy": "table"}, ()),
    (((64, 60), (8, 16), 7), {"strategy": "table", "loop": "fused", "int64": True}, ()),
    (((16, 32, 32), (2, 8, 8), (3, 9, 9)), {"strategy": "table", "loop": "fused"}, ()),
    (((16, 32, 32), (2, 8, 8), (3, 9, 9)), {"strategy": "table"}, ("H",)),
    # the FULL key tiles as runs (RUNS): a strided 2-D neighbourhood, split and fused
    (((64, 64), (8, 16), (24, 24), (8, 16)), {"strategy": "table", "runs": True}, ()),
    (((64, 64), (8, 16), (24, 24), (8, 16)), {"strategy": "table", "runs": True,
                                               "loop": "fused", "int64": True}, ()),
    # the ranges strategy's loops around box loads: a closed-form pattern on a 1-D grid
    (("pattern win = causal & window(256)", (4096,), (128,)), {"strategy": "ranges"}, ()),
    (("pattern win = causal & window(256)", (4096,), (128,)),
     {"strategy": "ranges", "loop": "fused"}, ()),
]


def _box_lines() -> list[str]:
    from spattn.ir import layout as LY
    lines = []
    for case, opts, ones in BOX_CASES:
        if isinstance(case[0], str):
            src, shape, box = case
            pat = spattn.compile(src)
            meta = _box(shape, box)
            meta.pop("_layout")
        else:
            shape, box, *nb = case
            meta = _box(shape, box)
            layout = meta.pop("_layout")
            pat = spattn.Pattern(LY.remap(spattn.neighborhood(shape, *nb).ir, layout),
                                 name="nb_box")
        lines += compile_pattern(pat, "fwd", ones, box=meta, rows="box", tma=True, **opts)
    return lines


def main() -> int:
    lines = []
    if "--box" in sys.argv[1:]:
        lines = _box_lines()
        print("\n".join(lines))
        return 1 if any(x.startswith("ERR") for x in lines) else 0
    cases = (ROWS_CASES if "--rows" in sys.argv[1:] else ATOMIC_CASES
             if "--atomic" in sys.argv[1:] else CASES)
    shard = [a for a in sys.argv[1:] if a.startswith("--shard")]
    if shard:
        i, n = map(int, shard[0].split("=", 1)[1].split("/"))
        cases = cases[i::n]
    for src, opts, ones in cases:
        pat = spattn.compile(src)
        for kind in ("fwd", "bwd"):
            if kind == "fwd" and (opts.get("dq") or opts.get("lse_grad")):
                continue                      # (a backward-only option)
            if kind == "bwd" and opts.get("loop") == "persistent":
                continue                      # (a forward-only loop)
            lines += compile_pattern(pat, kind, ones, **opts)
    print("\n".join(lines))
    return 1 if any(x.startswith("ERR") for x in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
