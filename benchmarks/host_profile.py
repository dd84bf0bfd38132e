"""Host time of one short call on the GPU: where a call's microseconds go.

For B = 1, H = 16, N = 1024, D = 128, bf16 and causal, window(256) and documents: the time
per call of ``pat(q, k, v)`` issued back to back (host-bound: one synchronisation after
``--calls`` calls), of the same with an explicit plan (``plan=``), of a forward+backward,
and of FlexAttention's compiled call; then a cProfile of the forward and of the
forward+backward (top functions by own time). Text goes to stdout and ``--out``.

    python benchmarks/host_profile.py --out DIR
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

import spattn

sys.path.insert(0, os.path.dirname(__file__))
from bench import PATTERNS, _flex  # noqa: E402


def per_call_us(fn, calls):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--patterns", nargs="*", default=["causal", "window(256)", "documents"])
    a = ap.parse_args()
    dev = "cuda"
    lines = []

    def say(*x):
        s = " ".join(str(v) for v in x)
        print(s, flush=True)
        lines.append(s)

    create_block_mask, flex = _flex()
    B, H, N, D = 1, 16, a.n, a.d
    for name in a.patterns:
        src, params, mm, inputs = PATTERNS[name]
        I = inputs(N, dev) if inputs else {}
        pat = spattn.compile(src, **params)
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        do = torch.randn_like(q)
        plan = pat.plan(q, k, v, **I)
        bm = create_block_mask(mm(N, H, I), None, None, N, N, device=dev)

        def fwd():
            with torch.no_grad():
                pat(q, k, v, **I)

        def fwd_plan():
            with torch.no_grad():
                pat(q, k, v, plan=plan)

        def fb():
            o = pat(q, k, v, **I)
            o.backward(do)

        def flex_fwd():
            with torch.no_grad():
                flex(q, k, v, block_mask=bm)

        def flex_fb():
            o = flex(q, k, v, block_mask=bm)
            o.backward(do)

        for _ in range(3):
            fwd(), fb(), flex_fwd(), flex_fb()
        torch.cuda.synchronize()
        r = {}
        for rnd in range(3):
            for key, fn in (("fwd", fwd), ("fwd_plan", fwd_plan), ("flex_fwd", flex_fwd),
                            ("fwd+bwd", fb), ("flex_fwd+bwd", flex_fb)):
                r.setdefault(key, []).append(per_call_us(fn, a.calls))
        say(f"## {name} B={B} H={H} N={N} D={D}: us per call (min of 3 rounds)")
        say("  " + "  ".join(f"{k2}={min(v2):.1f}" for k2, v2 in r.items()))
        for key, fn in (("fwd", fwd), ("fwd+bwd", fb)):
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(a.calls):
                fn()
            pr.disable()
            torch.cuda.synchronize()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22)
            say(f"### cProfile {name} {key} ({a.calls} calls), by own time")
            say(s.getvalue())
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "host_profile.txt"), "w") as f:
            f.write("\n".join(lines))


if __name__ == "__main__":
    main()
