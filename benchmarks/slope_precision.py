"""Where a learnable slope's gradient loses precision on the GPU: a float64 emulation.

Pattern ``causal`` with score ``s + w[h] * float(q - k)`` (a learnable ALiBi slope per
head), bf16 q, k, v, dO (the inputs of ``benchmarks/score_table_grads.py``'s accuracy
check, seed 1). The slope's gradient is ``dw[h] = sum_ij dS_ij (i - j)`` with ``dS = P (dP -
delta)``. Each line below computes it in float64 with one of the kernels' roundings put
back, and prints its largest error relative to the exact gradient (float64 autograd):

* ``exact delta``: ``delta = rowsum(dO * O)`` of the exact O (a check of the formula);
* ``O from bf16 P``: O from P rounded to bf16 for the P V product, as the forward's
  kernel computes it (the fp32 O the backward reads for learnable tables);
* ``bf16-stored O``: that O stored in bf16 (a frozen table's delta);
* ``fp32 P, fp32 tile sums``: the backward's own rounding with an exact delta: P in fp32,
  the products summed in fp32 per 64 x 64 tile;
* ``all of the kernels'``: O from bf16 P, fp32 P, fp32 tile sums.

    python benchmarks/slope_precision.py              # L = 2048, H = 16, D = 128 (~2 min, CPU)
    python benchmarks/slope_precision.py --n 256 --heads 2 --dim 32

CPU only (float64, dense ``[H, L, L]`` tensors: about 6 GB at the default size).
"""
from __future__ import annotations

import argparse
import math

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    a = ap.parse_args(argv)
    N, H, D = a.n, a.heads, a.dim
    g = torch.Generator().manual_seed(1)
    q, k, v, do = (torch.randn(1, H, N, D, generator=g).to(torch.bfloat16) for _ in range(4))
    w = 0.1 * torch.randn(H, generator=g)
    qq, kk, vv, dd = (t.double()[0] for t in (q, k, v, do))
    pos = torch.arange(N, dtype=torch.float64)
    rel = pos[:, None] - pos[None, :]
    causal = rel >= 0

    ww = w.double().clone().requires_grad_()
    s = (qq @ kk.transpose(-1, -2) / math.sqrt(D) + ww[:, None, None] * rel)
    (torch.softmax(s.masked_fill(~causal, -math.inf), -1) @ vv).backward(dd)
    want = ww.grad
    with torch.no_grad():
        s = (qq @ kk.transpose(-1, -2) / math.sqrt(D) + w.double()[:, None, None] * rel)
        s = s.masked_fill(~causal, -math.inf)
        pe = torch.exp(s - s.max(-1, keepdim=True).values)
        del s
        l = pe.sum(-1, keepdim=True)
        P = pe / l
        dP = dd @ vv.transpose(-1, -2)

        def dw(delta, p=P, tiles=False):
            t = p * (dP - delta) * rel
            if tiles:
                t = t.float().view(H, N // 64, 64, N // 64, 64).sum((2, 4))
                return t.sum((1, 2)).double()
            return t.sum((-1, -2))

        def err(x):
            return float((x - want).abs().max() / want.abs().max())

        O = P @ vv
        Ob = (pe.to(torch.bfloat16).double() @ vv) / l
        P32 = (pe.float() / l.float()).double()
        rows = [("exact delta", dw((dd * O).sum(-1, keepdim=True))),
                ("O from bf16 P", dw((dd * Ob).sum(-1, keepdim=True))),
                ("bf16-stored O", dw((dd * Ob.to(torch.bfloat16).double()).sum(-1, keepdim=True))),
                ("fp32 P, fp32 tile sums", dw((dd * O).sum(-1, keepdim=True), P32, N % 64 == 0)),
                ("all of the kernels'", dw((dd * Ob).sum(-1, keepdim=True), P32, N % 64 == 0))]
    print(f"| L = {N}, H = {H}, D = {D} | slope gradient, relative error |")
    print("|---|---|")
    for name, x in rows:
        print(f"| {name} | {err(x):.2e} |")


if __name__ == "__main__":
    main()
