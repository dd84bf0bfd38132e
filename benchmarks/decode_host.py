"""Host time of routed decode steps on the GPU: the fast entry and the bound launches, A/B.

A step that is bound by the host (B = 8, GQA 32/8, D = 128, bf16, 4096 keys: the kernel
takes a fraction of what Python takes to launch it) is called 640 times at lengths growing
by one key every 32 calls (the layers of a model at one token), for

* ``first``: ``pat(q, k, v, first=first)`` with ``causal & k >= first[b]`` (a left
  padding, as the transformers adapter passes it);
* ``causal``: ``pat(q, k, v)`` with ``causal``;
* ``sdpa``: dense SDPA with the boolean mask ``[B, 1, 1, L]`` (``enable_gqa=True``),

each with four variants of spattn's decode path, switched in one process and timed in
alternating rounds: ``new`` (the plan's fast entry ``decode.fast_routed`` and its bound
launches), ``no-fast`` (the full path of checks every call), ``no-bind`` (launches through
Triton's JIT dispatch), ``neither``. A figure is the wall time per call (synchronised at
the end of the 640), median over the rounds.

    python benchmarks/decode_host.py [--rounds 5] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import spattn
import spattn.pattern as P
from spattn.runtime import decode as dec


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = "cuda"
    B, Hq, Hk, D, L = 8, 32, 8, 128, 4096
    k = torch.randn(B, Hk, L + 256, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.bfloat16)
    first = torch.tensor([0, 397, 794, 1191, 223, 620, 1017, 49], device=dev)
    am = torch.arange(L + 256, device=dev)[None] >= first[:, None]
    by_first, causal = spattn.compile("causal & k >= first[b]"), spattn.compile("causal")

    def loop(f, n=640):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(n):
            f(i)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n * 1e6

    cases = {
        "first": lambda i: by_first(q, k[:, :, :L + i // 32], v[:, :, :L + i // 32], first=first),
        "causal": lambda i: causal(q, k[:, :, :L + i // 32], v[:, :, :L + i // 32]),
        "sdpa": lambda i: F.scaled_dot_product_attention(
            q, k[:, :, :L + i // 32], v[:, :, :L + i // 32],
            attn_mask=am[:, None, None, :L + i // 32], enable_gqa=True)}
    fast, bound = P._fast_routed, dec.BOUND_LAUNCHES

    def variant(name):
        P._fast_routed = fast if name in ("new", "no-bind") else (lambda *x, **y: None)
        dec.BOUND_LAUNCHES = bound if name in ("new", "no-fast") else 0
        dec.DECODE_PLANS.clear()

    variants = ["new", "no-fast", "no-bind", "neither"]
    res: dict = {}
    try:
        with torch.no_grad():
            for r in range(a.rounds):
                for var in (variants if r % 2 == 0 else variants[::-1]):
                    variant(var)
                    for name, f in cases.items():
                        if name == "sdpa" and var != "new":
                            continue
                        loop(f, 40)
                        res.setdefault(f"{name} {var}", []).append(loop(f))
    finally:
        variant("new")
    print(f"{torch.cuda.get_device_name()}: wall us per call, B={B} {Hq}/{Hk} D={D} bf16, "
          f"{L}..{L + 19} keys, median of {a.rounds} rounds (min-max)")
    for key, x in res.items():
        print(f"{key:18s} {statistics.median(x):7.1f} ({min(x):.1f}-{max(x):.1f})")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "decode_host.json"), "w") as f:
            json.dump({"us_per_call": res, "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
