"""Where a short forward+backward's time goes on the GPU machine: the host's issue time and
the card's own time, apart, for spattn and FlexAttention, round after round.

A call bound by the host reads as the host's time in ``do_bench``; one bound by the card
reads as the card's. Here the two are taken apart: the card is first kept busy
(``torch.cuda._sleep``) while ``--calls`` calls are issued, so the host never waits on it;
the wall time of issuing them is the host's time per call. CUDA events around the same
calls, which the card then runs back to back, give the card's time per call. Each pattern
runs ``--rounds`` rounds of both measures and of ``do_bench`` (median, 25 ms warm-up,
50 ms of runs), printed round by round, so that a first round slower than the rest shows.

    python benchmarks/host_gpu_split.py [--n 4096] [--d 64 128] [--patterns causal ...]

Run it once with ``SPATTN_WS_BWD=0 SPATTN_WS_DQ=0`` to see the generated backward where
``auto`` takes the Gluon kernels. ``--fwd`` times forwards (under ``no_grad``) instead;
``--raw-ab`` adds spattn with its bound launches through Triton's launcher object
(``triton_backend.RAW_LAUNCH`` off) as a third rival. B = 1, H = 16, bf16, autotuning off.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

os.environ.setdefault("SPATTN_AUTOTUNE", "0")
import spattn  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench import PATTERNS, _flex  # noqa: E402


def split_us(fn, calls: int, grads) -> tuple[float, float]:
    """(host us per call, card us per call) of ``calls`` calls issued behind a busy card."""
    for t in grads:
        t.grad = None
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(3e8))          # ~0.2 s of the card's clock: time to issue
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        for t in grads:
            t.grad = None
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    end.record()
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) / calls * 1e3


def main(argv=None) -> None:
    import triton
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--patterns", nargs="*", default=["causal", "window(256)", "documents"])
    ap.add_argument("--fwd", action="store_true", help="forwards instead of forward+backward")
    ap.add_argument("--raw-ab", action="store_true",
                    help="also spattn with RAW_LAUNCH off (Triton's launcher object)")
    a = ap.parse_args(argv)
    from spattn.runtime import triton_backend as tb
    create_block_mask, flex = _flex()
    B, H, N, dev = 1, 16, a.n, "cuda"
    ws = (os.environ.get("SPATTN_WS_BWD", "auto"), os.environ.get("SPATTN_WS_DQ", "auto"))
    print(f"device: {torch.cuda.get_device_name(0)}; SPATTN_WS_BWD/WS_DQ = {ws}; "
          f"{'forward' if a.fwd else 'forward+backward'}")
    print("| pattern | D | lib | host us | card us | do_bench us | round |")
    print("|---|---|---|---|---|---|---|")
    for D in a.d:
        for name in a.patterns:
            src, params, mm, inputs = PATTERNS[name]
            ins = inputs(N, dev) if inputs else {}
            pat = spattn.compile(src, **params)
            q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16,
                                   requires_grad=True) for _ in range(3))
            do = torch.randn_like(q)
            plan = pat.plan(q, k, v, backward=True, **ins)
            bm = create_block_mask(mm(N, H, ins), None, None, N, N, device=dev)

            def timed(call):
                """The forward under ``no_grad`` (``--fwd``), else forward and backward."""
                def run():
                    if a.fwd:
                        with torch.no_grad():
                            call()
                    else:
                        call().backward(do)
                return run
            fb = timed(lambda: pat(q, k, v, plan=plan))
            flex_fb = timed(lambda: flex(q, k, v, block_mask=bm))
            libs = [("spattn", fb, True), ("flex", flex_fb, True)]
            if a.raw_ab:
                libs.insert(1, ("spattn, Triton's launcher", fb, False))
            fb(), flex_fb()
            torch.cuda.synchronize()
            for r in range(a.rounds):
                for lib, fn, raw in libs[:: 1 if r % 2 == 0 else -1]:
                    tb.RAW_LAUNCH = raw
                    host, card = split_us(fn, a.calls, (q, k, v))
                    db = triton.testing.do_bench(fn, warmup=25, rep=50, grad_to_none=(q, k, v),
                                                 return_mode="median") * 1e3
                    print(f"| {name} | {D} | {lib} | {host:.1f} | {card:.1f} | {db:.1f} | {r} |",
                          flush=True)
                tb.RAW_LAUNCH = True


if __name__ == "__main__":
    main()
