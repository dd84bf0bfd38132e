"""GPU benchmark of token layouts (docs/layouts.md): grid neighbourhoods against cuDNN dense
attention, and 1-D structured patterns against FlexAttention.

Video / image problems (B=1, 24 heads unless ``--heads``, D=128, bf16, forward; spattn's
time includes gathering q, k, v into box order and o back): FLUX 256x256 with an 80x80
window and with stride 16x16, Hunyuan 30x48x80 with an 18x24x24 window and with stride
(16, 8, 8), each through ``spattn.neighborhood``; the FLUX window also written as a
flattened expression (``examples/patterns/neighborhood_2d.spattn``), which the runtime
recognises, as it does both strides written that way (``neighborhood_2d_strided``,
``video_neighborhood.spattn``'s ``video_strided_flat``: the ``-flat`` rows), and run in a
caller's token order (``order=``: 16 x 8 boxes, the permutation a user would give; an
``OrderedPlan``, its gathers timed). ``--full`` adds 77 text tokens before the FLUX image
with a cut 81 x 81 window (``grid (...) after 77``: a grid after extra tokens,
docs/layouts.md), and the same with 20 more text tokens after the image (``grid (...)
after 77 before 20``: the text after it reads causally). Against cuDNN dense (SDPA under
``SDPBackend.CUDNN_ATTENTION``), timed in alternating rounds in this process. Every output is checked against the float64 reference
on sampled query rows before timing. ``--full`` adds the 16K patterns of
``benchmarks/bench.py`` against FlexAttention (``dilated(512,4)``, ``strided(128)``,
2-D 13x13), forward and forward+backward, with layouts on (``SPATTN_LAYOUT=auto``) and off.
``--bwd`` adds forward+backward of the neighbourhood problems against cuDNN and, with
``--flex``, FlexAttention (its block mask from a NATTEN ``mask_mod``, checked against
spattn; Flex's forward timed too). ``--configs "BM,BN,W,S[,loop];..."`` times the forward
of each problem under each launch configuration (``SPATTN_BLOCK_M``, ``_N``,
``SPATTN_FWD_WARPS``, ``_STAGES``, ``_LOOP``; ``tuned``: the autotuner's choice), each
against cuDNN in alternating rounds. The plans take ``SPATTN_LAYOUT_GATHER``'s default,
``auto`` (a layout of boxes reads them through 5-D TMA in the forward on an H200:
docs/layouts.md, "The forward through boxes"; the row's ``gather`` says which way ran);
``--gathers copy,kernel,box`` times the forward of each layout problem through each of
those ways too, in the same alternating rounds (default ``copy``: the permutation pass
against the box forward).

    python benchmarks/layouts.py --out OUT          # the quick set (< 90 s on an H200)
    python benchmarks/layouts.py --out OUT --gathers copy,kernel,box
    python benchmarks/layouts.py --out OUT --full   # and the 16K Flex comparisons
    python benchmarks/layouts.py --out OUT --bwd --flex     # fwd+bwd, and Flex
    python benchmarks/layouts.py --out OUT --configs "128,64,8,3;128,128,8,3;tuned"
    python benchmarks/layouts.py --out OUT --cpu    # tiny shapes on the CPU (logic check,
                                                    # layouts forced: SPATTN_LAYOUT=on;
                                                    # TRITON_INTERPRET=1: Triton kernels)
    python benchmarks/layouts.py --out OUT --analysis   # the computed pairs, on the CPU

Writes ``OUT/layouts.json``; prints a markdown table last.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import spattn  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent

# name -> (kind, args, target speedup vs cuDNN dense)
PROBLEMS = {
    "flux-window-80x80": ("natten", ((256, 256), (80, 80)), 5.2),
    "flux-stride-16x16": ("natten", ((256, 256), (80, 80), (16, 16)), 9.2),
    "hunyuan-window-18x24x24": ("natten", ((30, 48, 80), (18, 24, 24)), 3.4),
    "hunyuan-stride-16x8x8": ("natten", ((30, 48, 80), (18, 24, 24), (16, 8, 8)), 9.7),
    "flux-window-80x80-flat": ("flat", (256, 80), 5.2),
    "flux-stride-16x16-flat": ("flat", (256, 80, 16), 9.2),
    "hunyuan-stride-16x8x8-flat": ("flat3", ((30, 48, 80), (18, 24, 24), (16, 8, 8)), 9.7),
    "flux-window-80x80-order": ("order", ((256, 256), (80, 80), (16, 8)), 5.2),
    "text77-flux-window-81x81": ("text", (77, 256, 40), None),
    "text77-flux-window-81x81-text20": ("around", (77, 256, 40, 20), None),
}
QUICK = ["flux-window-80x80", "flux-stride-16x16", "hunyuan-window-18x24x24",
         "flux-window-80x80-flat", "flux-window-80x80-order"]
# the same problems scaled down for --cpu
CPU_PROBLEMS = {
    "flux-window-80x80": ("natten", ((16, 16), (5, 5)), None),
    "flux-stride-16x16": ("natten", ((16, 16), (8, 8), (4, 4)), None),
    "hunyuan-window-18x24x24": ("natten", ((4, 6, 8), (3, 3, 3)), None),
    "hunyuan-stride-16x8x8": ("natten", ((4, 6, 8), (3, 4, 4), (2, 2, 2)), None),
    "flux-window-80x80-flat": ("flat", (16, 5), None),
    "flux-stride-16x16-flat": ("flat", (16, 8, 4), None),
    "hunyuan-stride-16x8x8-flat": ("flat3", ((4, 6, 8), (3, 4, 4), (2, 2, 2)), None),
    "flux-window-80x80-order": ("order", ((16, 16), (5, 5), (4, 4)), None),
    "text77-flux-window-81x81": ("text", (5, 16, 2), None),
    "text77-flux-window-81x81-text20": ("around", (5, 16, 2, 7), None),
}
FLEX_16K = ["dilated(512,4)", "strided(128)", "neighborhood2d(13x13)"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


#: a declared grid after text tokens: every token sees the text, a patch its square window
TEXT_IMAGE = """param T
param n
param r
grid (row: n, col: n) after T
pattern text_image = k < T | (q >= T & k >= T & abs(row(q) - row(k)) <= r &
                              abs(col(q) - col(k)) <= r)
"""


#: text, an image, text: the text after the image reads causally (every earlier token)
TEXT_AROUND = """param T
param n
param r
param U
grid (row: n, col: n) after T before U
pattern text_around = k < T | (q >= T + n * n & k <= q) | (q >= T & k >= T & k < T + n * n
    & abs(row(q) - row(k)) <= r & abs(col(q) - col(k)) <= r)
"""


def make_pattern(kind, args, backend="auto"):
    if kind in ("natten", "order"):
        pat = spattn.neighborhood(*args[:2 if kind == "order" else None], backend=backend)
        return pat, math.prod(args[0])
    if kind == "text":
        T, n, r = args
        return spattn.compile(TEXT_IMAGE, T=T, n=n, r=r, backend=backend), T + n * n
    if kind == "around":
        T, n, r, U = args
        return spattn.compile(TEXT_AROUND, T=T, n=n, r=r, U=U, backend=backend), T + n * n + U
    if kind == "flat3":
        grid, kernel, stride = args
        pat = spattn.load(ROOT / "examples/patterns/video_neighborhood.spattn",
                          pattern="video_strided_flat", grid=list(grid), kernel=list(kernel),
                          stride=list(stride), backend=backend)
        return pat, math.prod(grid)
    if len(args) == 3:
        W, size, s = args
        pat = spattn.load(ROOT / "examples/patterns/neighborhood_2d.spattn",
                          pattern="neighborhood_2d_strided", W=W, size=size, s=s,
                          backend=backend)
        return pat, W * W
    W, size = args
    pat = spattn.load(ROOT / "examples/patterns/neighborhood_2d.spattn",
                      pattern="neighborhood_2d_natten", W=W, size=size, backend=backend)
    return pat, W * W


def natten_mask_mod(shape, kernel_size, stride=None):
    """FlexAttention ``mask_mod`` of NATTEN's non-causal, undilated neighbourhood over the
    grid ``shape`` flattened row-major (docs/layouts.md): per axis, a query's stride group
    shares the window of its leader, windows shifted at the borders."""
    stride = stride or (1,) * len(shape)
    sizes = [math.prod(shape[a + 1:]) for a in range(len(shape))]

    def mask_mod(b, h, q, k):
        ok = None
        for n, K, s_, size in zip(shape, kernel_size, stride, sizes):
            qc, kc = (q // size) % n, (k // size) % n
            leader = ((qc // s_) * s_ + s_ // 2).clamp(max=n - 1)
            start = (leader - K // 2).clamp(min=0, max=n - K)
            cond = (kc >= start) & (kc < start + K)
            ok = cond if ok is None else ok & cond
        return ok
    return mask_mod


def sampled_error(pat, q, k, v, o, N, rows=256, samples=3, heads=2):
    """Largest relative error of ``o`` against the float64 reference on ``samples`` slices of
    ``rows`` query rows (heads 0..heads-1)."""
    from spattn.runtime.reference import attention_reference
    worst = 0.0
    rows = min(rows, N)
    for i in range(samples):
        s = (N - rows) * i // max(samples - 1, 1)
        n = min(rows, N - s)
        m = pat.mask(n, N, q_offset=s, device=q.device)
        ref, _ = attention_reference(q[:, :heads, s:s + n], k[:, :heads], v[:, :heads], m)
        got = o[:, :heads, s:s + n].double()
        worst = max(worst, float((got - ref).norm() / ref.norm().clamp_min(1e-30)))
    return worst


def timer(cpu):
    if cpu:
        def bench(fn):
            fn()
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(ts)
        return bench
    import triton

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    return bench


def dense_fn(q, k, v, cpu):
    import torch.nn.functional as F
    if cpu:
        return lambda: F.scaled_dot_product_attention(q, k, v)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def box_order(shape, box, device):
    """The permutation a caller would give for boxes ``box`` of the grid ``shape``: slot
    ``i`` holds token ``order[i]`` (every box whole: the grid's sides are multiples)."""
    from spattn.ir import layout as LY
    layout = LY.Layout(LY.Grid(tuple(shape)), tuple(box))
    assert layout.padded_size == math.prod(shape), "the boxes must tile the grid"
    return layout.permutation(device)[0]


def run_problem(name, kind, args, target, *, H, D, dev, dtype, rounds, cpu, bwd=False,
                flex=False, configs=None, gathers=()):
    # (--cpu under TRITON_INTERPRET=1: the generated kernels, the GPU path's logic)
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    pat, N = make_pattern(kind, args, backend="triton" if cpu and interp else
                          "torch" if cpu else "auto")
    row = {"problem": name, "N": N, "H": H, "D": D, "target_vs_dense": target}
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, device=dev, dtype=dtype, generator=g) for _ in range(3))
    order = box_order(args[0], args[2], dev) if kind == "order" else None
    t0 = time.perf_counter()
    plan = pat.plan(q, k, v, order=order)
    row["plan_s"] = time.perf_counter() - t0
    remap = getattr(plan, "remap", None)
    row["layout"] = str(remap.layout) if remap is not None else None
    row["gather"] = getattr(plan, "gather", None)
    row["tables"] = table_form(plan)
    if order is not None:
        row["layout"] = f"caller's order, boxes {args[2][0]}x{args[2][1]}"
    if remap is not None:
        row["useful_fraction_sequence"] = remap.fraction_sequence
        row["useful_fraction_layout"] = remap.fraction_layout
    t0 = time.perf_counter()
    o = pat(q, k, v, plan=plan)
    if not cpu:
        torch.cuda.synchronize()
    row["first_call_s"] = time.perf_counter() - t0
    stage = getattr(getattr(plan, "inner", plan), "forward_stage", None)
    row["forward"] = "warp-specialised" if getattr(stage, "gluon", False) else "generated"
    row["rel_err_sampled"] = err = sampled_error(pat, q, k, v, o, N)
    if not err < 2e-2:
        row["error"] = f"mismatch vs reference: {err:.3e}"
        return row
    bench = timer(cpu)
    dense = dense_fn(q, k, v, cpu)
    row["dense_backend"] = "math" if cpu else "cudnn"
    try:
        dense()
    except RuntimeError as e:          # cuDNN attention not available here: say so, use flash
        log(f"  cuDNN attention failed ({str(e).splitlines()[0][:120]}); timing flash")
        from torch.nn.attention import SDPBackend, sdpa_kernel
        import torch.nn.functional as F

        def dense():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)
        row["dense_backend"] = "flash"
    fns = {"spattn": lambda: pat(q, k, v, plan=plan), "dense": dense}
    grads = None
    if bwd and not cpu:
        do = torch.randn_like(q)
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        bplan = pat.plan(qg, kg, vg, order=order)

        def fb():
            qg.grad = kg.grad = vg.grad = None
            pat(qg, kg, vg, plan=bplan).backward(do)
        qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))

        def fb_dense():
            qd.grad = kd.grad = vd.grad = None
            dense_fn(qd, kd, vd, cpu)().backward(do)
        fb()
        grads = do, [t.grad.clone() for t in (qg, kg, vg)]
        fb_dense()
        fns["spattn_fwdbwd"], fns["dense_fwdbwd"] = fb, fb_dense
    if flex and kind == "natten" and not cpu:
        flex_setup(row, fns, q, k, v, o, args, grads)
    if remap is not None and order is None:
        gather_setup(row, fns, pat, plan, q, k, v, N, gathers)
    times = {n: [] for n in fns}
    for r in range(rounds):
        for n in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            times[n].append(bench(fns[n]))
    for n, ms in times.items():
        row[{"spattn": "fwd", "dense": "dense_fwd", "flex": "flex_fwd"}.get(n, n) + "_ms"] = \
            statistics.median(ms)
    for g in [g for g in row.get("gathers", {}) if f"gather_{g}_ms" in row]:
        row["gathers"][g]["fwd_ms"] = row.pop(f"gather_{g}_ms")
        row["gathers"][g]["speedup_vs_dense"] = row["dense_fwd_ms"] / row["gathers"][g]["fwd_ms"]
    row["speedup_vs_dense"] = row["dense_fwd_ms"] / row["fwd_ms"]
    if "spattn_fwdbwd_ms" in row:
        row["fwdbwd_speedup_vs_dense"] = row["dense_fwdbwd_ms"] / row["spattn_fwdbwd_ms"]
    if "flex_fwdbwd_ms" in row:
        row["fwdbwd_speedup_vs_flex"] = row["flex_fwdbwd_ms"] / row["spattn_fwdbwd_ms"]
    if "flex_fwd_ms" in row:
        row["speedup_vs_flex"] = row["flex_fwd_ms"] / row["fwd_ms"]
    for cfg in configs or ():
        row.setdefault("configs", []).append(
            time_config(cfg, pat, q, k, v, order, dense, bench, rounds))
    return row


def gather_setup(row, fns, pat, main, q, k, v, N, gathers):
    """A plan per way of ``gathers`` (``layout_gather``) in the layout of the plan ``main``,
    checked against the reference,
    its forward added to the timed functions as ``gather_<way>`` (``row["gathers"]``: the
    way the plan took, which falls back where the boxes cannot be read). The plans reuse
    the main plan's layout (no second choice: the quick set stays within its time)."""
    from spattn.runtime.plan import RemappedPlan
    from spattn.runtime.settings import current
    for g in gathers:
        plan = RemappedPlan(pat, main.backend, main.remap, q, k, v, scale=main.call.scale,
                            settings=current(), options={}, gather=g)
        o = pat(q, k, v, plan=plan)
        err = sampled_error(pat, q, k, v, o, N, samples=2)
        info = row.setdefault("gathers", {})[g] = {
            "took": getattr(plan, "gather", None), "rel_err_sampled": err}
        if not err < 2e-2:
            info["error"] = f"mismatch vs reference: {err:.3e}"
            row["error"] = f"layout_gather={g}: {info['error']}"
            continue
        fns[f"gather_{g}"] = (lambda p: (lambda: pat(q, k, v, plan=p)))(plan)


def parse_config(text: str):
    """``"BM,BN,W,S[,loop][,tables]"`` -> ``(env, label)``; ``"tuned"``: autotuning on.
    ``loop``: split, fused or persistent (``SPATTN_FWD_LOOP``); ``tables``: csr, spans or
    runs (``SPATTN_TABLES``)."""
    import sweep
    text = text.strip()
    if text == "tuned":
        return {"SPATTN_AUTOTUNE": "1"}, "tuned"
    xs = [x.strip() for x in text.split(",")]
    env = sweep.config_env("fwd", tuple(int(x) for x in xs[:4]))
    for extra in xs[4:]:
        if extra in ("split", "fused", "persistent"):
            env["SPATTN_FWD_LOOP"] = extra
        elif extra in ("csr", "spans", "runs"):
            env["SPATTN_TABLES"] = extra
        else:
            raise SystemExit(f"config {text!r}: {extra!r} is not a loop or a table form")
    return env, text


def table_form(plan):
    """The forward's table form (boxes, spans, csr; "-" for closed-form ranges)."""
    stage = getattr(getattr(plan, "inner", plan), "forward_stage", None)
    return getattr(stage, "tables", None)


def time_config(cfg, pat, q, k, v, order, dense, bench, rounds):
    """The forward under one launch configuration (``tuned``: autotuning on), against
    cuDNN in alternating rounds."""
    import sweep
    env, label = cfg
    saved = {name: os.environ.get(name) for name in env}
    sweep.apply_env(env)
    out = {"config": label}
    try:
        plan = pat.plan(q, k, v, order=order)
        out["tables"] = table_form(plan)
        o = pat(q, k, v, plan=plan)
        out["rel_err_sampled"] = err = sampled_error(pat, q, k, v, o, q.shape[2], samples=2)
        if not err < 2e-2:
            out["error"] = f"mismatch vs reference: {err:.3e}"
            return out
        fns = {"spattn": lambda: pat(q, k, v, plan=plan), "dense": dense}
        times = {n: [] for n in fns}
        for r in range(rounds):
            for n in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                times[n].append(bench(fns[n]))
        out["fwd_ms"] = statistics.median(times["spattn"])
        out["dense_fwd_ms"] = statistics.median(times["dense"])
        out["speedup_vs_dense"] = out["dense_fwd_ms"] / out["fwd_ms"]
    except Exception as e:                      # out of shared memory, say: report, go on
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        sweep.apply_env({})
    log(f"  config {out}")
    return out


def flex_setup(row, fns, q, k, v, o, args, grads):
    """FlexAttention on the same problem: its block mask built from
    :func:`natten_mask_mod`, its output (and, with ``grads = (dO, spattn's [dq, dk, dv])``,
    its gradients) checked against spattn's, then its forward (and forward+backward) added
    to ``fns``. A failure is recorded in the row, not raised."""
    import bench as B
    try:
        create_block_mask, flex_attention = B._flex()
        N = q.shape[2]
        t0 = time.perf_counter()
        bm = create_block_mask(natten_mask_mod(*args), None, None, N, N, device=q.device,
                               _compile=True)
        torch.cuda.synchronize()
        row["flex_mask_s"] = time.perf_counter() - t0
        ref = flex_attention(q, k, v, block_mask=bm)
        row["rel_err_vs_flex"] = err = float((o.float() - ref.float()).norm()
                                             / ref.float().norm())
        if not err < 2e-2:
            row["flex_error"] = f"mismatch vs flex: {err:.3e}"
            return
        fns["flex"] = lambda: flex_attention(q, k, v, block_mask=bm)
        if grads is not None:
            do, ours = grads
            qf, kf, vf = (t.detach().requires_grad_() for t in (q, k, v))

            def fb_flex():
                qf.grad = kf.grad = vf.grad = None
                flex_attention(qf, kf, vf, block_mask=bm).backward(do)
            fb_flex()
            row["grad_rel_err_vs_flex"] = gerr = max(
                float((a.float() - b.grad.float()).norm() / b.grad.float().norm())
                for a, b in zip(ours, (qf, kf, vf)))
            if not gerr < 2e-2:
                row["flex_error"] = f"gradient mismatch vs flex: {gerr:.3e}"
                return
            fns["flex_fwdbwd"] = fb_flex
    except Exception as e:
        row["flex_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        log(f"  flex failed: {row['flex_error']}")


def run_flex(names, H, rounds):
    """``benchmarks/bench.py``'s rows at 16K, with layouts on and off."""
    import bench
    rows = []
    for layout in ("auto", "off"):
        os.environ["SPATTN_LAYOUT"] = layout
        for name in names:
            log(f"flex: {name} layout={layout}")
            row = bench.run_one(name, 16384, 128, H=H, rounds=rounds)
            row["layout_setting"] = layout
            rows.append(row)
    os.environ.pop("SPATTN_LAYOUT", None)
    return rows


#: the 16K patterns of --full, as sources (benchmarks/bench.py's PATTERNS)
FLEX_SOURCES = {"dilated(512,4)": "dilated(512, 4)", "strided(128)": "strided(128)",
                "neighborhood2d(13x13)":
                    "abs(q // 128 - k // 128) <= 6 & abs(q % 128 - k % 128) <= 6"}


def analysis_rows():
    """The analysis of every problem on the CPU (no kernels): the layout chosen, and the
    pairs 128x64 tiles compute in sequence order (exact classification) and in the layout,
    with the useful fraction of each."""
    from spattn.ir import layout as LY
    cases = [(name, *make_pattern(kind, args)) for name, (kind, args, _) in PROBLEMS.items()
             if kind in ("natten", "flat", "flat3")]
    cases += [(name, spattn.compile(src), 16384) for name, src in FLEX_SOURCES.items()]
    rows = []
    for name, pat, N in cases:
        log(f"analysis: {name}")
        t0 = time.perf_counter()
        r = LY.choose(pat.ir, N, N, 0, force=True)
        choose_s = time.perf_counter() - t0
        seq = LY.computed_pairs(pat.ir, N, 128, 64, pad=True)
        useful = r.useful if r.useful is not None else int(pat.mask(N, N).sum())
        rows.append({"problem": name, "N": N, "layout": str(r.layout),
                     "padded_tokens": r.layout.padded_size, "useful_pairs": useful,
                     "computed_sequence": seq, "computed_layout": r.computed_layout,
                     "fraction_sequence": useful / seq, "fraction_layout":
                     useful / r.computed_layout, "dense_over_layout": N * N / r.computed_layout,
                     "choose_s": choose_s})
    return rows


def analysis_table(rows):
    out = ["| problem | N | layout | useful pairs / computed, sequence -> layout | "
           "dense pairs / layout's | choice s |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['problem']} | {r['N']} | {r['layout']} | "
                   f"{100 * r['fraction_sequence']:.1f}% -> {100 * r['fraction_layout']:.1f}% | "
                   f"{r['dense_over_layout']:.2f}x | {r['choose_s']:.2f} |")
    return "\n".join(out)


def table(rows, flex_rows):
    out = ["| problem | layout | useful seq -> layout | spattn fwd ms | cuDNN dense ms | "
           "speedup | target |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['problem']} | ERROR {r['error']} | | | | | |")
            continue
        fr = (f"{100 * r['useful_fraction_sequence']:.0f}% -> "
              f"{100 * r['useful_fraction_layout']:.0f}%"
              if r.get("useful_fraction_layout") is not None else "")
        tgt = f"{r['target_vs_dense']}x" if r.get("target_vs_dense") else ""
        how = f"{r.get('tables')}" + (f", {r['gather']}" if r.get("gather") else "") \
            + (", warp-specialised" if r.get("forward") == "warp-specialised" else "")
        out.append(f"| {r['problem']} | {r['layout'] or 'sequence order'} ({how}) | {fr} | "
                   f"{r['fwd_ms']:.3f} | {r['dense_fwd_ms']:.3f} | "
                   f"{r['speedup_vs_dense']:.2f}x | {tgt} |")
    extra = [r for r in rows if "error" not in r and ("spattn_fwdbwd_ms" in r
                                                    or "flex_fwd_ms" in r)]
    if extra:
        out += ["", "| problem | fwd ms | Flex fwd ms | fwd vs Flex | fwd+bwd ms | "
                "cuDNN fwd+bwd ms | vs cuDNN | Flex fwd+bwd ms | vs Flex |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in extra:
            def f(key, fmt="{:.2f}"):
                return fmt.format(r[key]) if key in r else (r.get("flex_error", "")[:40]
                                                            if "flex" in key else "")
            out.append(f"| {r['problem']} | {f('fwd_ms')} | {f('flex_fwd_ms')} | "
                       f"{f('speedup_vs_flex', '{:.2f}x')} | {f('spattn_fwdbwd_ms')} | "
                       f"{f('dense_fwdbwd_ms')} | {f('fwdbwd_speedup_vs_dense', '{:.2f}x')} | "
                       f"{f('flex_fwdbwd_ms')} | {f('fwdbwd_speedup_vs_flex', '{:.2f}x')} |")
    gat = [(r["problem"], g, x) for r in rows for g, x in r.get("gathers", {}).items()]
    if gat:
        out += ["", "| problem | layout_gather (took) | fwd ms | x cuDNN |", "|---|---|---|---|"]
        for name, g, x in gat:
            ms = f"{x['fwd_ms']:.3f} | {x['speedup_vs_dense']:.2f}x" if "fwd_ms" in x else \
                f"{x.get('error', 'not timed')} |"
            out.append(f"| {name} | {g} ({x['took']}) | {ms} |")
    cfg_rows = [(r["problem"], c) for r in rows for c in r.get("configs", ())]
    if cfg_rows:
        out += ["", "| problem | config (BM,BN,W,S) | fwd ms | cuDNN ms | x cuDNN |",
                "|---|---|---|---|---|"]
        for name, c in cfg_rows:
            if "error" in c:
                out.append(f"| {name} | {c['config']} | {c['error'][:60]} | | |")
            else:
                out.append(f"| {name} | {c['config']} ({c.get('tables')}) | {c['fwd_ms']:.2f} | "
                           f"{c['dense_fwd_ms']:.2f} | {c['speedup_vs_dense']:.2f}x |")
    if flex_rows:
        out += ["", "| 16K pattern | layouts | fwd ms | Flex fwd ms | fwd vs Flex | fwd+bwd ms |"
                " Flex fwd+bwd ms | fwd+bwd vs Flex |", "|---|---|---|---|---|---|---|---|"]
        for r in flex_rows:
            if "error" in r or "flex_fwd_ms" not in r:
                out.append(f"| {r['pattern']} | {r['layout_setting']} | "
                           f"{r.get('error', r.get('flex_error', '?'))} | | | | | |")
                continue
            fb = r.get("fwdbwd_ms"), r.get("flex_fwdbwd_ms")
            out.append(f"| {r['pattern']} | {r['layout_setting']} | {r['fwd_ms']:.3f} | "
                       f"{r['flex_fwd_ms']:.3f} | {r['flex_fwd_ms'] / r['fwd_ms']:.2f}x | "
                       + (f"{fb[0]:.3f} | {fb[1]:.3f} | {fb[1] / fb[0]:.2f}x |"
                          if all(fb) else "| | |"))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for layouts.json")
    ap.add_argument("--full", action="store_true", help="every problem, and the 16K Flex rows")
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (logic check)")
    ap.add_argument("--heads", type=int, default=None, help="heads (default 24; --cpu 2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="problem names")
    ap.add_argument("--bwd", action="store_true",
                    help="forward+backward of the problems against cuDNN (and Flex)")
    ap.add_argument("--flex", action="store_true",
                    help="FlexAttention on the neighbourhood problems (NATTEN mask_mod)")
    ap.add_argument("--configs", default=None,
                    help='forward launch configurations "BM,BN,W,S[,loop];...;tuned"')
    ap.add_argument("--gathers", default="copy",
                    help="ways a layout's tokens reach the kernels, each timed too "
                         "(copy, kernel, box; comma-separated; '' for none)")
    ap.add_argument("--analysis", action="store_true",
                    help="the layouts' computed pairs on the CPU (no kernels, no timing)")
    a = ap.parse_args(argv)
    if a.analysis:
        rows = analysis_rows()
        out = pathlib.Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "layouts_analysis.json").write_text(json.dumps(rows, indent=1))
        print(analysis_table(rows))
        return 0
    cpu = a.cpu or not torch.cuda.is_available()
    if cpu:     # tiny grids: box tiles do not pay there, but the logic is what is checked
        os.environ["SPATTN_LAYOUT"] = "on"
    dev, dtype = ("cpu", torch.float32) if cpu else ("cuda", torch.bfloat16)
    H = a.heads or (2 if cpu else 24)
    D = 32 if cpu else 128
    problems = CPU_PROBLEMS if cpu else PROBLEMS
    configs = None
    if a.configs:
        configs = [parse_config(c) for c in a.configs.split(";") if c.strip()]
    names = a.only or (list(problems) if a.full else QUICK)
    rows = []
    for name in names:
        kind, args, target = problems[name]
        log(f"{name}: {args}")
        row = run_problem(name, kind, args, target, H=H, D=D, dev=dev, dtype=dtype,
                          rounds=a.rounds if not cpu else 1, cpu=cpu, bwd=a.bwd,
                          flex=a.flex, configs=configs,
                          gathers=[g for g in a.gathers.split(",") if g.strip()])
        log(f"  {row}")
        rows.append(row)
    flex_rows = run_flex(FLEX_16K, 16, a.rounds) if a.full and not cpu else []
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": "cpu" if cpu else torch.cuda.get_device_name(), "torch": torch.__version__,
            "heads": H, "head_dim": D, "dtype": str(dtype)}
    (out / "layouts.json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                  "flex_16k": flex_rows}, indent=1))
    print(table(rows, flex_rows))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
