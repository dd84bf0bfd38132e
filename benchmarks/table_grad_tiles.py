"""GPU: the precision of a learned slope's fp32 gradient at forward and backward tiles.

Pattern ``causal`` with score ``s + w[b, h] * float(q - k) * 0.1`` (``w = rand + 0.5``: a
positive slope, scores in the hundreds), fp32 q, k, v, dO (B = 2, H = 4, L = 2048, D =
64), ``deterministic=True``. Each line: the largest error of o, lse and every gradient
relative to the largest entry of the float64 reference (``pattern_reference``), for the
Triton backend at its defaults and with the forward's (``SPATTN_BLOCK_*``) or the
backward's (``SPATTN_BWD_BLOCK_*``) tiles overridden, and for the torch backend on the
GPU. The slope's gradient sums ``dS (q - k)`` over each row, which amplifies any
difference between the forward's probabilities (in ``delta = rowsum(dO * O)``) and those
the backward recomputes: kernels that round each q·k product differently show it.

    python benchmarks/table_grad_tiles.py > OUT.txt        # H200: ~20 s
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spattn  # noqa: E402
from bench import overrides  # noqa: E402
from spattn.runtime.reference import pattern_reference  # noqa: E402

SCORE = "s + w[b, h] * float(q - k) * 0.1"
T = ("SPATTN_BWD_BLOCK_M1", "SPATTN_BWD_BLOCK_N1", "SPATTN_BWD_BLOCK_M2", "SPATTN_BWD_BLOCK_N2")
VARIANTS = [("triton default", "triton", {}),
            ("triton bwd 16x16", "triton", dict.fromkeys(T, "16")),
            ("triton fwd 16x16", "triton", {"SPATTN_BLOCK_M": "16", "SPATTN_BLOCK_N": "16"}),
            ("triton fwd 64x32", "triton", {"SPATTN_BLOCK_M": "64", "SPATTN_BLOCK_N": "32"}),
            ("triton fwd+bwd 32x32", "triton", {"SPATTN_BLOCK_M": "32", "SPATTN_BLOCK_N": "32",
                                                **dict.fromkeys(T, "32")}),
            ("torch", "torch", {})]


def rel(x, y) -> float:
    return ((x.double() - y).abs().max() / y.abs().max()).item()


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    os.environ.setdefault("SPATTN_AUTOTUNE", "0")
    B, H, L, D = 2, 4, 2048, 64
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, H, L, D, generator=g).cuda() for _ in range(4))
    w = (torch.rand(B, H, generator=g) + 0.5).cuda()
    ref = [t.double().requires_grad_() for t in (q, k, v, w)]
    ro, rl = pattern_reference(spattn.compile("causal", score=SCORE, backend="torch"),
                               *ref[:3], w=ref[3])
    want = torch.autograd.grad(ro, ref, do.double())
    for label, backend, env in VARIANTS:
        try:
            with overrides(tuple(env), tuple(env.values())):
                pat = spattn.compile("causal", score=SCORE, backend=backend)
                leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]
                o, lse = pat(*leaves[:3], w=leaves[3], deterministic=True, return_lse=True)
                got = torch.autograd.grad(o, leaves, do)
            print(f"{label:22s} o {rel(o, ro.detach()):.1e} lse {rel(lse, rl):.1e} " + " ".join(
                f"{n} {rel(x, y):.1e}" for n, x, y in zip("qkvw", got, want)), flush=True)
        except Exception as e:      # one variant failing must not hide the others
            print(f"{label:22s} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
