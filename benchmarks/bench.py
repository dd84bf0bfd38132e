"""GPU benchmark: spattn against FlexAttention and SDPA.

For each pattern x N x D (bf16 unless ``--dtype fp16``, B=1, H=16): spattn forward and
forward+backward (median of ``triton.testing.do_bench``, in rounds that alternate with
FlexAttention's: see :func:`time_rounds`), effective TF/s (only allowed pairs
count: fwd FLOPs = 4·D·pairs, fwd+bwd = 3.5x that), setup time (what a new shape
costs: analysis and tables), first-call compile time; in the same process
FlexAttention (``torch.compile(flex_attention)``, block mask built once outside
the timed region, its build timed separately) and SDPA for full and causal.
Every configuration is checked against FlexAttention (or SDPA) before timing.

    python benchmarks/bench.py --quick          # a small subset
    python benchmarks/bench.py --json out.json  # everything

Prints a markdown table at the end; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

import spattn
from spattn.runtime.reference import attention_reference_chunked, rows_per_chunk

H_DEFAULT = 16
ROUNDS = 3          # alternating timing rounds per measurement (time_rounds)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


_FLEX = None


def raise_recompile_limits():
    """Dynamo's per-function recompile limits raised to 1024: every mask_mod and score_mod
    recompiles FlexAttention (past the limit torch falls back to eager flex, ~100x
    slower)."""
    import torch._dynamo.config as dc
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dc, name):
            setattr(dc, name, 1024)


def _flex():
    """FlexAttention compiled once, the recompile limits raised (and the accumulated
    ones)."""
    global _FLEX
    if _FLEX is None:
        import torch._dynamo.config as dc
        raise_recompile_limits()
        for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
            if hasattr(dc, name):
                setattr(dc, name, 1 << 16)
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        _FLEX = create_block_mask, torch.compile(flex_attention, dynamic=False)
    return _FLEX


# name -> (spattn source, params, flex mask_mod factory(N, H, inputs), inputs factory(N, dev))
def _doc_ids(N, dev, ndocs=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(N - 1, generator=g)[: ndocs - 1] + 1).values
    return torch.bucketize(torch.arange(N), cuts, right=True).to(dev)


def _bigbird_blocks(N, dev, bs=64, seed=0, r=3):
    g = torch.Generator().manual_seed(seed)
    nb = N // bs
    t = torch.zeros(nb, nb, dtype=torch.int64)
    idx = torch.randint(0, nb, (nb, r), generator=g)
    t.scatter_(1, idx, 1)
    return t.to(dev)


#: Document counts of the named-only ``documents{n}`` patterns (``documents`` holds 12).
DOC_COUNTS = (1, 4, 20, 100, 1000)


def _documents(n: int) -> tuple:
    """The PATTERNS entry of causal documents, ``n`` of them at sorted random cuts."""
    return ("causal & same(doc)", {},
            lambda N, H, I: (lambda b, h, q, k: (q >= k) & (I["doc"][q] == I["doc"][k])),
            lambda N, dev: {"doc": _doc_ids(N, dev, ndocs=n)})


PATTERNS = {
    "full": ("full", {}, lambda N, H, I: (lambda b, h, q, k: q >= 0), None),
    "causal": ("causal", {}, lambda N, H, I: (lambda b, h, q, k: q >= k), None),
    "window(1024)": ("window(1024)", {},
                     lambda N, H, I: (lambda b, h, q, k: (q >= k) & (q - k < 1024)), None),
    "window(256)": ("window(256)", {},
                    lambda N, H, I: (lambda b, h, q, k: (q >= k) & (q - k < 256)), None),
    "streaming": ("causal & (window(1024) | sink(64))", {},
                  lambda N, H, I: (lambda b, h, q, k: (q >= k) & ((q - k < 1024) | (k < 64))), None),
    "documents": _documents(12),
    **{f"documents{n}": _documents(n) for n in DOC_COUNTS},
    "prefix_lm(2048)": ("prefix_lm(2048)", {},
                        lambda N, H, I: (lambda b, h, q, k: (q >= k) | (k < 2048)), None),
    "chunked(4096)&causal": ("chunked(4096) & causal", {},
                             lambda N, H, I: (lambda b, h, q, k: (q >= k) & (q // 4096 == k // 4096)),
                             None),
    "longformer": ("global_tokens(16) | local(256, 256)", {},
                   lambda N, H, I: (lambda b, h, q, k: (q < 16) | (k < 16) | ((q - k).abs() <= 256)),
                   None),
    "bigbird": ("global_tokens(64) | local(192, 192) | blocks[q // 64, k // 64]", {},
                lambda N, H, I: (lambda b, h, q, k: (q < 64) | (k < 64) | ((q - k).abs() <= 192)
                                 | (I["blocks"][q // 64, k // 64] != 0)),
                lambda N, dev: {"blocks": _bigbird_blocks(N, dev)}),
    "neighborhood2d(13x13)": ("abs(q // 128 - k // 128) <= 6 & abs(q % 128 - k % 128) <= 6", {},
                              lambda N, H, I: (lambda b, h, q, k: ((q // 128 - k // 128).abs() <= 6)
                                               & ((q % 128 - k % 128).abs() <= 6)), None),
    "dilated(512,4)": ("dilated(512, 4)", {},
                       lambda N, H, I: (lambda b, h, q, k: (q >= k) & (q - k < 2048)
                                        & ((q - k) % 4 == 0)), None),
    "strided(128)": ("strided(128)", {},
                     lambda N, H, I: (lambda b, h, q, k: (q >= k) & ((q - k < 128)
                                                                     | ((q - k) % 128 == 0))), None),
    "power2(256)": ("power2(256)", {},
                    lambda N, H, I: (lambda b, h, q, k: (q >= k) & ((q - k < 256)
                                                                    | (((q - k) & (q - k - 1)) == 0))),
                    None),
    "per-head": ("causal & (q - k < 1024 | k % H == h)", {},
                 lambda N, H, I: (lambda b, h, q, k: (q >= k) & ((q - k < 1024) | (k % H == h))), None),
}
#: Patterns run only when named (``--patterns``): packed documents of other counts than 12.
EXTRA = tuple(f"documents{n}" for n in DOC_COUNTS)
QUICK = ["causal", "window(1024)", "streaming", "documents", "longformer", "dilated(512,4)"]


def default_names(quick: bool = False) -> list:
    """The patterns run when none are named: :data:`QUICK`, or every one but :data:`EXTRA`."""
    return list(QUICK) if quick else [p for p in PATTERNS if p not in EXTRA]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


@contextlib.contextmanager
def overrides(names, values):
    """The environment variables ``names`` set to ``values`` (``None``: all of them unset;
    a None value: that one unset) inside the block, as they were after it: a plan built
    inside keeps the launch configuration they select."""
    saved = {n: os.environ.pop(n, None) for n in names}
    try:
        if values is not None:
            os.environ.update({n: str(x) for n, x in zip(names, values) if x is not None})
        yield
    finally:
        for n, x in saved.items():
            os.environ.pop(n, None)
            if x is not None:
                os.environ[n] = x


def bench_ms(fn, rep=100, grad_to_none=None):
    """Median ms of ``fn``; ``grad_to_none``: leaf tensors whose ``.grad`` is reset before
    every run, so a backward writes its gradients instead of adding them to the previous
    run's (three extra elementwise passes over q, k, v otherwise, for every library)."""
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=rep, grad_to_none=grad_to_none,
                                   return_mode="median")


def allowed_pairs(pat, N, H, inputs, chunk=None):
    """Exact allowed pairs summed over heads (for effective TF/s), counted in row chunks."""
    chunk = chunk or rows_per_chunk(1, H, N)
    total = 0
    for s in range(0, N, chunk):
        n = min(chunk, N - s)
        m = pat.mask(n, N, num_heads=H, q_offset=s, device="cuda", **inputs)
        total += int(m.sum())
    return total


def run_one(name, N, D, *, H=H_DEFAULT, bwd=True, flex=True, dev="cuda", dtype=torch.bfloat16,
            rounds=ROUNDS, B=1):
    src, params, mm_factory, in_factory = PATTERNS[name]
    inputs = in_factory(N, dev) if in_factory else {}
    row = {"pattern": name, "N": N, "D": D, "H": H, "B": B,
           "dtype": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))}
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dtype, generator=g) for _ in range(3))
    do = torch.randn_like(q)
    pat = spattn.compile(src, **params)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    o = pat(q, k, v, **inputs)
    torch.cuda.synchronize()
    row["first_call_s"] = time.perf_counter() - t0
    from spattn.codegen.config import pick
    row["strategy"] = pick(pat, "fwd", head_dim=D, dtype=dtype).strategy
    # setup: what a new shape costs (kernel already compiled), timed through the launchers'
    # own builders: for the table strategy the tile classes (shared by the heads unless the
    # pattern is per head, as the launcher does) and spans or CSR lists of the forward
    # ("setup_ms"), plus those of the backward, classified with the forward's at their
    # common divisor as a training step's plan does ("setup_train_ms": what a training step
    # pays; Flex's create_block_mask also builds both directions); for closed-form ranges
    # the per-tile bounds used to order the grid (the kernel computes its own loop bounds);
    # at the default tiles
    from spattn.runtime import tables as tb
    from spattn.codegen.config import default_bwd_tiles, default_tiles, dtype_name
    bm, bn = default_tiles(D, dtype_name(dtype))[:2]
    m1, n1, m2, n2 = default_bwd_tiles(D, dtype_name(dtype))[:4]

    def setup(train):
        if row["strategy"] == "table":
            kw = dict(B=1, H=H, q_offset=0, device=q.device, inputs=inputs)
            an = tb.Analysis(pat, N, N, **kw)      # a new shape or input: nothing classified
            if train:
                an.expect([(m2, n2), (m1, n1)])
            tb.fwd_tables(pat, N, N, bm, bn, analysis=an, **kw)
            if train:
                tb.bwd_tables(pat, N, N, (m1, n1, m2, n2), analysis=an, **kw)
        else:
            from spattn.ir.ranges import closed_form, tile_ranges
            tile_ranges(closed_form(pat.ir), N, N, bm, bn, num_heads=1, device=dev)
        torch.cuda.synchronize()
    for train, field in ((False, "setup_ms"), (True, "setup_train_ms")):
        setup(train)
        t0 = time.perf_counter()
        for _ in range(5):
            setup(train)
        row[field] = (time.perf_counter() - t0) * 1e3 / 5
    # a whole plan (kernels compiled and tuned already): what pat.plan(q, k, v) costs
    pat.plan(q, k, v, **inputs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        pat.plan(q, k, v, **inputs)
    torch.cuda.synchronize()
    row["plan_ms"] = (time.perf_counter() - t0) * 1e3 / 5
    pairs = allowed_pairs(pat, N, H, inputs)
    row["density"] = pairs / (H * N * N)
    flops_f = 4 * D * pairs * B
    # correctness before timing: against FlexAttention, or (where Flex cannot run, e.g. out
    # of memory) against the float64 reference computed in row chunks from the pattern's mask
    timed = {}          # what time_rounds times: name -> (fn, grad_to_none)
    if flex:
        try:
            _flex_part(row, name, src, mm_factory, inputs, q, k, v, do, o, pat, H, N, dev, bwd,
                       timed)
        except Exception as e:  # out of memory, or Flex's own kernel failing to compile
            _drop_flex(row, timed, e)
            flex = False
        if "error" in row:
            return row
    if not flex:
        err = chunked_check(pat, q, k, v, o, inputs)
        row["rel_err_vs_chunked_ref"] = err
        if not err < 2e-2:
            row["error"] = f"mismatch vs reference: {err:.3e}"
            return row
    _spattn_part(row, pat, q, k, v, do, inputs, bwd, timed)
    row["stages"] = _stages(pat, q, k, v, inputs, bwd)
    time_rounds(row, timed, rounds)
    _time_sdpa(row, name, q, k, v)
    _rates(row, flops_f)
    return row


def _stages(pat, q, k, v, inputs, bwd) -> str:
    """Which kernels a call runs: the plan's forward stage type (``WsFwdStage``: the Gluon
    forward) and its backward stage's, with the Gluon kernels that run in it."""
    plan = pat.plan(q, k, v, backward=bwd or None, **inputs)
    names = [type(plan.forward_stage).__name__]
    for s in list(plan._bwd.values())[:1]:
        gluon = [n for n, a in (("dQ", "ws_dq"), ("dK/dV", "ws"))
                 if getattr(s, a, None) is not None]
        names.append(type(s).__name__ + (f"(Gluon {' '.join(gluon)})" if gluon else ""))
    return "/".join(names)


def chunked_check(pat, q, k, v, o, inputs):
    """Relative error of ``o`` against the float64 reference, computed by row chunks."""
    ref = attention_reference_chunked(pat, q, k, v, **inputs)
    return float((o.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _flex_part(row, name, src, mm_factory, inputs, q, k, v, do, o, pat, H, N, dev, bwd, timed):
    create_block_mask, flex_attention = _flex()
    mm = mm_factory(N, H, inputs)
    hh = H if name == "per-head" else None
    t0 = time.perf_counter()
    bm = create_block_mask(mm, 1, hh, N, N, device=dev)
    torch.cuda.synchronize()
    row["flex_mask_ms"] = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    bm = create_block_mask(mm, 1, hh, N, N, device=dev)
    torch.cuda.synchronize()
    row["flex_mask_ms"] = min(row["flex_mask_ms"], (time.perf_counter() - t0) * 1e3)
    ref = flex_attention(q, k, v, block_mask=bm)
    err = float((o.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
    row["rel_err_vs_flex"] = err
    if not err < 2e-2:
        row["error"] = f"mismatch vs flex: {err:.3e}"
        return
    timed["flex_fwd"] = (lambda: flex_attention(q, k, v, block_mask=bm)), None
    if bwd:
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        og = pat(qg, kg, vg, **inputs)
        og.backward(do)
        qf, kf, vf = (t.detach().requires_grad_() for t in (q, k, v))
        flex_attention(qf, kf, vf, block_mask=bm).backward(do)
        gerr = max(float((a.grad.float() - b.grad.float()).norm() / b.grad.float().norm())
                   for a, b in ((qg, qf), (kg, kf), (vg, vf)))
        row["grad_rel_err_vs_flex"] = gerr
        if not gerr < 2e-2:
            row["error"] = f"gradient mismatch vs flex: {gerr:.3e}"
            return

        def fb_flex():
            flex_attention(qf, kf, vf, block_mask=bm).backward(do)
        timed["flex_fwdbwd"] = fb_flex, [qf, kf, vf]


def _spattn_part(row, pat, q, k, v, do, inputs, bwd, timed):
    timed["fwd"] = (lambda: pat(q, k, v, **inputs)), None
    if bwd:
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

        def fb():
            pat(qg, kg, vg, **inputs).backward(do)
        t0 = time.perf_counter()
        fb()                                   # the backward's first call (autotuning)
        torch.cuda.synchronize()
        row["first_bwd_s"] = time.perf_counter() - t0
        timed["fwdbwd"] = fb, [qg, kg, vg]


def time_rounds(row, timed, rounds, bench=None, groups=(("fwd", "flex_fwd"),
                                                      ("fwdbwd", "flex_fwdbwd")), first=0):
    """Time spattn and FlexAttention in ``rounds`` alternating rounds; ``row[name + "_ms"]``
    is the median of a name's rounds, ``row[name + "_ms_rounds"]`` the rounds themselves.

    Forwards first, then forward+backward passes; within each, the libraries alternate and
    the order flips every round (A B, B A, A B). An H200 running dense attention drifts
    by several per cent within seconds (clocks under the power limit: NOTES row 55);
    timed one after the other, whichever library came after the heavier work read slower
    (a forward timed right after the other's forward+backward reads slower). Alternating gives the two
    the same conditions. A Flex timing that raises (out of memory) drops Flex from the row
    with ``flex_error``; spattn's own errors propagate. ``groups``: the names timed in
    alternation with each other, group by group. ``first``: the number of the first round
    (a caller timing one round at a time passes each round's number, so the order still
    flips).
    """
    bench = bench or bench_ms
    for group in groups:
        names = [n for n in group if n in timed]
        times = {n: [] for n in names}
        for r in range(first, first + rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                if n not in timed:
                    continue
                fn, grads = timed[n]
                try:
                    times[n].append(bench(fn, grad_to_none=grads))
                except Exception as e:
                    if not n.startswith("flex_"):
                        raise
                    _drop_flex(row, timed, e)
        for n, ts in times.items():
            if n in timed and ts:
                row[n + "_ms"] = statistics.median(ts)
                row[n + "_ms_rounds"] = ts


def _drop_flex(row, timed, e):
    """Flex failed (out of memory, its kernel not compiling): note why, time it no more."""
    row["flex_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    for key in [t for t in timed if t.startswith("flex_")]:
        del timed[key]
    torch.cuda.empty_cache()


def _time_sdpa(row, name, q, k, v):
    if name in ("full", "causal"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        import torch.nn.functional as F
        for label, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    row[f"sdpa_{label}_fwd_ms"] = bench_ms(
                        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=name == "causal"))
            except RuntimeError as e:  # backend not available for this shape
                row[f"sdpa_{label}_fwd_ms"] = None
                log(f"  sdpa {label}: {e}")


def _rates(row, flops_f):
    for key in ("fwd_ms", "flex_fwd_ms", "sdpa_cudnn_fwd_ms", "sdpa_flash_fwd_ms"):
        if row.get(key):
            row[key.replace("_ms", "_tflops")] = flops_f / (row[key] * 1e-3) / 1e12
    for key in ("fwdbwd_ms", "flex_fwdbwd_ms"):
        if row.get(key):
            row[key.replace("_ms", "_tflops")] = 3.5 * flops_f / (row[key] * 1e-3) / 1e12
    return row


def _d(row) -> str:
    """The D column: the head dim, with the dtype when it is not bf16."""
    dt = row.get("dtype", "bf16")
    return f"{row['D']}" if dt == "bf16" else f"{row['D']} {dt}"


def table(rows):
    head = ("| pattern | B | N | D | dens. | strategy | spattn fwd TF/s | Flex fwd TF/s | x | "
            "spattn f+b TF/s | Flex f+b TF/s | x | setup ms (fwd / train) | Flex mask ms | "
            "first call s |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['pattern']} | {r.get('B', 1)} | {r['N']} | {_d(r)} | "
                         f"ERROR: {r['error']} |")
            continue

        def f(key, fmt="{:.0f}"):
            v = r.get(key)
            return fmt.format(v) if isinstance(v, (int, float)) and v is not None else "-"

        def ratio(a, b):
            va, vb = r.get(a), r.get(b)
            return f"{va / vb:.2f}" if va and vb else "-"
        if r.get("flex_error"):
            r = dict(r, strategy=f"{r.get('strategy', '-')} (Flex failed: {r['flex_error'][:60]})")
        lines.append(
            f"| {r['pattern']} | {r.get('B', 1)} | {r['N']} | {_d(r)} | {r['density']:.3f} | "
            f"{r.get('strategy', '-')} {r.get('stages', '')} | "
            f"{f('fwd_tflops')} | {f('flex_fwd_tflops')} | {ratio('fwd_tflops', 'flex_fwd_tflops')} | "
            f"{f('fwdbwd_tflops')} | {f('flex_fwdbwd_tflops')} | "
            f"{ratio('fwdbwd_tflops', 'flex_fwdbwd_tflops')} | {f('setup_ms', '{:.2f}')} / {f('setup_train_ms', '{:.2f}')} | "
            f"{f('flex_mask_ms', '{:.1f}')} | {f('first_call_s', '{:.1f}')} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--patterns", nargs="*", default=None)
    ap.add_argument("--n", nargs="*", type=int, default=None)
    ap.add_argument("--d", nargs="*", type=int, default=None)
    ap.add_argument("--heads", type=int, default=H_DEFAULT)
    ap.add_argument("--batch", nargs="*", type=int, default=[1], help="batch sizes B")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--rounds", type=int, default=ROUNDS,
                    help="alternating timing rounds of spattn and Flex (median of the rounds)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import logging
    logging.basicConfig(stream=sys.stderr, format="  %(message)s")
    logging.getLogger("spattn").setLevel(logging.INFO)    # autotuning progress and choices
    names = args.patterns or default_names(args.quick)
    ns = args.n or ([16384] if args.quick else [4096, 16384, 65536])
    ds = args.d or ([128] if args.quick else [64, 128])
    rows = []
    total = len(names) * len(ns) * len(ds) * len(args.batch)
    i = 0
    for B in args.batch:
        for N in ns:
            for D in ds:
                for name in names:
                    i += 1
                    if name.startswith("neighborhood2d") and N != 16384:
                        continue
                    log(f"[{i}/{total}] {name} B={B} N={N} D={D} {args.dtype}")
                    try:
                        row = run_one(name, N, D, H=args.heads, bwd=not args.no_bwd,
                                      flex=not args.no_flex, dtype=DTYPES[args.dtype],
                                      rounds=max(1, args.rounds), B=B)
                    except Exception as e:  # keep going: one failure must not lose the run
                        row = {"pattern": name, "N": N, "D": D, "B": B, "dtype": args.dtype,
                               "error": f"{type(e).__name__}: {e}"[:300]}
                    log("   ", {k: (round(v, 3) if isinstance(v, float) else v)
                                for k, v in row.items()})
                    rows.append(row)
                    torch.cuda.empty_cache()
                    if args.json:
                        with open(args.json, "w") as f:
                            json.dump({"device": torch.cuda.get_device_name(),
                                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(table(rows))


if __name__ == "__main__":
    main()
