"""GPU benchmark: per-head key orders (S2-style head stripes) against FlexAttention.

Each problem is a pattern whose keys split into a class per head (``benchmarks/bench.py``'s
``per-head`` row, ``causal & (q - k < 1024 | k % H == h)``, and S2-Attention's stripes of 8
keys, ``causal & (q - k < 512 | (k // 8) % H == h)``) at 16K tokens, 16 heads, D = 128,
bf16. spattn runs it twice, from plans built under ``SPATTN_LAYOUT=on`` (the per-head key
order: a ``HeadOrderedPlan``, whose gathers of k and v count) and ``SPATTN_LAYOUT=off``
(sequence order), against FlexAttention (``torch.compile``d, its block mask per head built
outside the timed region), forward and forward+backward, timed in alternating rounds in one
process. Outputs and gradients are checked against Flex before timing.

    python benchmarks/headorder.py --out OUT          # H200: the 16K problems (< 90 s)
    python benchmarks/headorder.py --out OUT --cpu    # tiny shapes on the CPU (logic check)
    python benchmarks/headorder.py --out OUT --tune   # spattn autotuned (takes longer)

Writes ``OUT/headorder.json``; prints a markdown table last.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import spattn  # noqa: E402

#: name -> (source with H for the heads, Flex mask_mod factory(H))
PROBLEMS = {
    "per-head": ("causal & (q - k < 1024 | k % H == h)",
                 lambda H: (lambda b, h, q, k: (q >= k) & ((q - k < 1024) | (k % H == h)))),
    "s2-stripes8": ("causal & (q - k < 512 | (k // 8) % H == h)",
                    lambda H: (lambda b, h, q, k: (q >= k) & ((q - k < 512)
                                                              | ((k // 8) % H == h)))),
}
#: the CPU check's problems (tiny windows to match its tiny lengths)
CPU_PROBLEMS = {
    "per-head": "causal & (q - k < 32 | k % H == h)",
    "s2-stripes8": "causal & (q - k < 16 | (k // 8) % H == h)",
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def _bench(cpu):
    if cpu:
        def bench(fn, grads=None):
            fn()
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(ts)
        return bench
    import triton

    def bench(fn, grads=None):
        return triton.testing.do_bench(fn, warmup=10, rep=50, grad_to_none=grads,
                                       return_mode="median")
    return bench


def _plan(pat, q, k, v, layout):
    old = os.environ.get("SPATTN_LAYOUT")
    os.environ["SPATTN_LAYOUT"] = layout
    try:
        t0 = time.perf_counter()
        plan = pat.plan(q, k, v)
        return plan, (time.perf_counter() - t0) * 1e3
    finally:
        if old is None:
            os.environ.pop("SPATTN_LAYOUT", None)
        else:
            os.environ["SPATTN_LAYOUT"] = old


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def run_problem(name, src, mm_factory, *, N, H, D, dev, dtype, rounds, cpu):
    from spattn.runtime.plan import HeadOrderedPlan
    row = {"problem": name, "pattern": src, "N": N, "H": H, "D": D}
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, device=dev, dtype=dtype, generator=g) for _ in range(3))
    do = torch.randn_like(q)
    pat = spattn.compile(src, backend="torch" if cpu else "auto")
    plans = {}
    for label, layout in (("order", "on"), ("seq", "off")):
        plans[label], row[f"{label}_plan_ms"] = _plan(pat, q, k, v, layout)
    if not isinstance(plans["order"], HeadOrderedPlan):
        row["error"] = "no per-head key order found"
        return row
    ho = plans["order"].head
    row.update(order=str(ho), head_class=str(ho.atom), computed_order=ho.computed_order,
               computed_sequence=ho.computed_sequence, pays=ho.pays)
    # correctness first: the two orders against the reference (Flex on the GPU, the float64
    # reference of the mask on the CPU), outputs and gradients
    grads = {}
    outs = {}
    for label, plan in plans.items():
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        o = pat(qg, kg, vg, plan=plan)
        o.backward(do)
        outs[label] = o.detach()
        grads[label] = (qg, kg, vg)
    timed = {}
    if cpu:
        from spattn.runtime.reference import attention_reference
        qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
        ro, _ = attention_reference(qr, kr, vr, pat.mask(N, N, num_heads=H))
        ro.backward(do.double())
        ref_o, ref_g = ro, (qr, kr, vr)
    else:
        from bench import _flex
        create_block_mask, flex_attention = _flex()
        t0 = time.perf_counter()
        bm = create_block_mask(mm_factory(H), 1, H, N, N, device=dev)
        torch.cuda.synchronize()
        row["flex_mask_ms"] = (time.perf_counter() - t0) * 1e3
        qf, kf, vf = (t.detach().requires_grad_() for t in (q, k, v))
        ref_o = flex_attention(qf, kf, vf, block_mask=bm)
        ref_o.backward(do)
        ref_o, ref_g = ref_o.detach(), (qf, kf, vf)
        timed["flex_fwd"] = (lambda: flex_attention(q, k, v, block_mask=bm)), None

        def fb_flex():
            flex_attention(qf, kf, vf, block_mask=bm).backward(do)
        timed["flex_fwdbwd"] = fb_flex, [qf, kf, vf]
    tol = 1e-4 if cpu else 2e-2
    for label in plans:
        err = max([_rel(outs[label], ref_o)] + [_rel(a.grad, b.grad)
                                                for a, b in zip(grads[label], ref_g)])
        row[f"{label}_rel_err"] = err
        if not err < tol:
            row["error"] = f"{label}: mismatch against the reference: {err:.3e}"
            return row
    for label, plan in plans.items():
        qg, kg, vg = grads[label]
        timed[f"{label}_fwd"] = (lambda plan=plan: pat(q, k, v, plan=plan)), None

        def fb(plan=plan, qg=qg, kg=kg, vg=vg):
            pat(qg, kg, vg, plan=plan).backward(do)
        timed[f"{label}_fwdbwd"] = fb, [qg, kg, vg]
    bench = _bench(cpu)
    for part in ("fwd", "fwdbwd"):
        names = [n for n in (f"order_{part}", f"seq_{part}", f"flex_{part}") if n in timed]
        times = {n: [] for n in names}
        for r in range(rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                fn, gr = timed[n]
                times[n].append(bench(fn, gr))
        for n, ts in times.items():
            row[f"{n}_ms"] = statistics.median(ts)
    for part in ("fwd", "fwdbwd"):
        if f"flex_{part}_ms" in row:
            for label in ("order", "seq"):
                row[f"{label}_{part}_vs_flex"] = row[f"flex_{part}_ms"] / row[f"{label}_{part}_ms"]
    return row


def table(rows) -> str:
    out = ["| problem | key order per head | computed pairs order / seq | fwd ms order | fwd ms seq | "
           "Flex fwd ms | fwd vs Flex (order / seq) | fwd+bwd ms order | fwd+bwd ms seq | "
           "Flex fwd+bwd ms | fwd+bwd vs Flex (order / seq) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['problem']} | error: {r['error']} | | | | | | | | | |")
            continue

        def f(key, fmt="{:.3f}"):
            return fmt.format(r[key]) if key in r else "-"
        out.append(
            f"| {r['problem']} | class {r['head_class']} first | "
            f"{r['computed_order'] / max(r['computed_sequence'], 1):.3f} | "
            f"{f('order_fwd_ms')} | {f('seq_fwd_ms')} | {f('flex_fwd_ms')} | "
            f"{f('order_fwd_vs_flex', '{:.2f}x')} / {f('seq_fwd_vs_flex', '{:.2f}x')} | "
            f"{f('order_fwdbwd_ms')} | {f('seq_fwdbwd_ms')} | {f('flex_fwdbwd_ms')} | "
            f"{f('order_fwdbwd_vs_flex', '{:.2f}x')} / {f('seq_fwdbwd_vs_flex', '{:.2f}x')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for headorder.json")
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (logic check)")
    ap.add_argument("--only", nargs="*", help="problem names")
    ap.add_argument("--n", type=int, default=None, help="tokens (default 16384; --cpu 256)")
    ap.add_argument("--heads", type=int, default=None, help="heads (default 16; --cpu 4)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=45.0,
                    help="seconds after which no further problem is started (cold kernel "
                         "and Flex compiles dominate a first run; each row is whole)")
    ap.add_argument("--tune", action="store_true",
                    help="autotune spattn's kernels (default: their default configurations, "
                         "SPATTN_AUTOTUNE=0, to stay within 90 s)")
    args = ap.parse_args(argv)
    if not args.tune:
        os.environ["SPATTN_AUTOTUNE"] = "0"
    cpu = args.cpu or not torch.cuda.is_available()
    N = args.n or (256 if cpu else 16384)
    H = args.heads or (4 if cpu else 16)
    D = 16 if cpu else 128
    dev, dtype = ("cpu", torch.float32) if cpu else ("cuda", torch.bfloat16)
    rows = []
    start = time.perf_counter()
    for name, (src, mm) in PROBLEMS.items():
        if args.only and name not in args.only:
            continue
        if rows and time.perf_counter() - start > args.budget:
            log(f"{name}: skipped, past --budget {args.budget:.0f} s (run it with --only {name})")
            continue
        if cpu:
            src = CPU_PROBLEMS[name]
        log(f"{name}: {src} N={N} H={H}")
        t0 = time.perf_counter()
        rows.append(run_problem(name, src, mm, N=N, H=H, D=D, dev=dev, dtype=dtype,
                                rounds=args.rounds, cpu=cpu))
        rows[-1]["wall_s"] = time.perf_counter() - t0
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "device": "cpu" if cpu else torch.cuda.get_device_name()}
    (out / "headorder.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(table(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
