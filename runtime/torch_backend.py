"""Block-sparse attention in plain torch: the CPU backend (and a CUDA fallback).

Same contract as the Triton launchers (:mod:`spattn.runtime.triton_backend`):

* ``fwd(pattern, q, k, v, *, scale, q_offset, inputs) -> (o, lse)``
* ``bwd(pattern, q, k, v, o, lse, do, *, scale, q_offset, inputs, dlse=None) -> (dq, dk, dv)``

How it works. The analysis classifies the ``BLOCK_M x BLOCK_N`` tiles of the
attention matrix as EMPTY / PARTIAL / FULL per (batch, head)
(``pattern.tiles``). The backend walks the query tiles; for each it gathers the
key tiles that are non-empty for at least one (batch, head), computes the scores
for those columns only (``[B, Hq, BLOCK_M, ncols]``), evaluates the pattern's
predicate only on columns of PARTIAL tiles, masks EMPTY ones, and runs an exact
softmax in float32 (float64 for float64 inputs). Memory per step is
``O(B * Hq * BLOCK_M * ncols)`` with ``ncols <= Lk``: the ``Lq x Lk`` score
matrix is never materialised. The backward pass recomputes the probabilities per
query tile from the saved lse and accumulates dk, dv (summed over the query
heads of each key head for GQA) with ``index_add_``; it is deterministic.

Fully masked rows give output 0, lse ``-inf`` and zero gradients, never NaN.
Inputs may have any strides; outputs are contiguous.
"""
from __future__ import annotations

import torch

from ..ir.evaluate import evaluate, query_offset
from ..ir.tiles import EMPTY, FULL, PARTIAL

__all__ = ["fwd", "bwd", "BLOCK_M", "BLOCK_N", "tile_classes"]

BLOCK_M = 64
BLOCK_N = 64


def tile_classes(pattern, Lq: int, Lk: int, block_m: int, block_n: int, *, num_heads: int,
                 batch: int, q_offset: int, device, inputs) -> torch.Tensor:
    """Tile classes ``int8 [B or 1, H or 1, nq, nk]`` from the analysis."""
    return pattern.tiles(Lq, Lk, block_m, block_n, num_heads=num_heads, batch=batch,
                         q_offset=q_offset, device=device, **inputs).to(device)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _Plan:
    """Per-call state shared by the forward and backward walks."""

    def __init__(self, pattern, q, k, *, q_offset, inputs, block_m=BLOCK_M, block_n=BLOCK_N):
        B, Hq, Lq, _ = q.shape
        Lk = k.shape[2]
        self.pattern = pattern
        self.B, self.Hq, self.Lq, self.Lk = B, Hq, Lq, Lk
        self.Hk = k.shape[1]
        self.G = Hq // self.Hk
        self.bm, self.bn = block_m, block_n
        self.off = query_offset(Lq, Lk, q_offset)
        self.inputs = dict(inputs or {})
        self.device = q.device
        self.tiles = tile_classes(pattern, Lq, Lk, block_m, block_n, num_heads=Hq, batch=B,
                                  q_offset=self.off, device=q.device, inputs=self.inputs)
        self.nq = self.tiles.shape[2]
        # Index bookkeeping happens on the CPU (the class grid is small): no device syncs
        # per tile on CUDA. Key tiles non-empty for at least one (batch, head), per query tile:
        self.tiles_cpu = self.tiles.cpu()
        self.any_nonempty = (self.tiles_cpu != EMPTY).flatten(0, 1).any(0)  # [nq, nk]
        self.env_static = {
            "h": torch.arange(Hq, device=q.device, dtype=torch.int64).view(1, Hq, 1, 1),
            "b": torch.arange(B, device=q.device, dtype=torch.int64).view(B, 1, 1, 1),
            "Lq": Lq, "Lk": Lk, "H": Hq,
        }

    def query_tiles(self):
        for i in range(self.nq):
            r0 = i * self.bm
            r1 = min(r0 + self.bm, self.Lq)
            yield i, r0, r1

    def columns(self, i: int):
        """``(cols, sl, allowed)`` for query tile ``i``; ``cols`` is None if nothing is allowed.

        ``cols``: int64 key positions gathered; ``sl``: a slice when they are contiguous
        (so k, v are views, not copies); ``allowed``: bool broadcastable to
        ``[B, Hq, bm, ncols]``.
        """
        J = self.any_nonempty[i].nonzero().flatten()
        if J.numel() == 0:
            return None, None, None
        bn = self.bn
        cols = (J.view(-1, 1) * bn + torch.arange(bn, dtype=torch.int64).view(1, -1)).flatten()
        valid = cols < self.Lk
        cols = cols[valid]
        cls = self.tiles_cpu[:, :, i, :].index_select(-1, J)                 # [B', H', nJ]
        colcls = cls.unsqueeze(-1).expand(*cls.shape, bn).flatten(-2)[..., valid]  # [B', H', nc]
        sl = None
        first, last = int(cols[0]), int(cols[-1])
        if last - first + 1 == cols.numel():
            sl = slice(first, last + 1)
        part = colcls == PARTIAL
        pcols = part.flatten(0, -2).any(0).nonzero().flatten()               # gathered indices
        dev = self.device
        allowed = (colcls == FULL).unsqueeze(-2).to(dev)                     # [B', H', 1, nc]
        cols = cols.to(dev)
        if pcols.numel():
            r0 = i * self.bm
            r1 = min(r0 + self.bm, self.Lq)
            part = part.index_select(-1, pcols).unsqueeze(-2).to(dev)
            pcols = pcols.to(dev)
            env = dict(self.env_static)
            env["q"] = (torch.arange(r0, r1, device=dev, dtype=torch.int64)
                        + self.off).view(1, 1, -1, 1)
            env["k"] = cols.index_select(0, pcols).view(1, 1, 1, -1)
            pred = evaluate(self.pattern.ir, env, self.inputs)
            pred = torch.as_tensor(pred, device=dev).to(torch.bool) & part   # only PARTIAL tiles
            B, H = self.B, self.Hq
            allowed = allowed.expand(B, H, r1 - r0, cols.numel()).clone()
            allowed[..., pcols] |= pred.expand(B, H, r1 - r0, pcols.numel())
        return cols, sl, allowed

    def gather(self, t: torch.Tensor, cols, sl, dtype) -> torch.Tensor:
        """Key rows ``cols`` of ``t [B, Hk, Lk, *]`` as ``dtype``."""
        sel = t[:, :, sl] if sl is not None else t.index_select(2, cols)
        return sel.to(dtype)

    def scores(self, qt: torch.Tensor, kt: torch.Tensor, scale: float) -> torch.Tensor:
        """``qt [B, Hq, bm, D] @ kt [B, Hk, nc, D]^T`` -> ``[B, Hq, bm, nc]`` (GQA-aware)."""
        B, Hk, G = self.B, self.Hk, self.G
        bm = qt.shape[2]
        s = torch.matmul(qt.reshape(B, Hk, G * bm, qt.shape[-1]), kt.transpose(-1, -2))
        return s.view(B, self.Hq, bm, -1) * scale

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, Hq, bm, n]`` -> ``[B, Hk, G * bm, n]``."""
        return x.reshape(self.B, self.Hk, self.G * x.shape[2], x.shape[3])


def fwd(pattern, q, k, v, *, scale: float, q_offset: int | None, inputs,
        block_m: int = BLOCK_M, block_n: int = BLOCK_N):
    """Forward: ``o [B, Hq, Lq, Dv]`` (q's dtype) and ``lse [B, Hq, Lq]`` (float32).

    ``lse`` is float64 when the inputs are float64 (handy for testing).
    """
    plan = _Plan(pattern, q, k, q_offset=q_offset, inputs=inputs, block_m=block_m,
                 block_n=block_n)
    B, Hq, Lq = plan.B, plan.Hq, plan.Lq
    Dv = v.shape[-1]
    cdt = _compute_dtype(q)
    o = torch.zeros(B, Hq, Lq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, Lq), float("-inf"), dtype=cdt, device=q.device)
    neg_inf = torch.tensor(float("-inf"), dtype=cdt, device=q.device)
    for i, r0, r1 in plan.query_tiles():
        cols, sl, allowed = plan.columns(i)
        if cols is None:
            continue                                    # whole tile masked: 0 and -inf
        qt = q[:, :, r0:r1].to(cdt)
        kt = plan.gather(k, cols, sl, cdt)
        vt = plan.gather(v, cols, sl, cdt)
        s = torch.where(allowed, plan.scores(qt, kt, scale), neg_inf)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        l = p.sum(-1, keepdim=True)
        has = l > 0
        l_safe = torch.where(has, l, torch.ones_like(l))
        ot = torch.matmul(plan.grouped(p / l_safe), vt).view(B, Hq, r1 - r0, Dv)
        o[:, :, r0:r1] = ot.to(o.dtype)
        lse[:, :, r0:r1] = torch.where(has, m + torch.log(l_safe), neg_inf).squeeze(-1)
    if cdt == torch.float64:
        return o, lse
    return o, lse.to(torch.float32)


def bwd(pattern, q, k, v, o, lse, do, *, scale: float, q_offset: int | None, inputs,
        dlse: torch.Tensor | None = None, block_m: int = BLOCK_M, block_n: int = BLOCK_N):
    """Backward: ``(dq, dk, dv)`` in the dtypes of q, k, v.

    ``dlse`` (optional, ``[B, Hq, Lq]``) is the gradient flowing into the lse output;
    it adds ``p * dlse`` to the score gradients.
    """
    plan = _Plan(pattern, q, k, q_offset=q_offset, inputs=inputs, block_m=block_m,
                 block_n=block_n)
    B, Hq, Hk, Lq, Lk = plan.B, plan.Hq, plan.Hk, plan.Lq, plan.Lk
    D, Dv = q.shape[-1], v.shape[-1]
    cdt = _compute_dtype(q)
    dq = torch.zeros(B, Hq, Lq, D, dtype=cdt, device=q.device)
    dk = torch.zeros(B, Hk, Lk, D, dtype=cdt, device=q.device)
    dv = torch.zeros(B, Hk, Lk, Dv, dtype=cdt, device=q.device)
    delta = (do.to(cdt) * o.to(cdt)).sum(-1)                                  # [B, Hq, Lq]
    if dlse is not None:
        delta = delta - torch.where(torch.isfinite(lse), dlse.to(cdt), torch.zeros_like(delta))
    lse_c = lse.to(cdt)
    lse_safe = torch.where(torch.isfinite(lse_c), lse_c, torch.zeros_like(lse_c))
    zero = torch.zeros((), dtype=cdt, device=q.device)
    for i, r0, r1 in plan.query_tiles():
        cols, sl, allowed = plan.columns(i)
        if cols is None:
            continue                                    # no allowed pair: zero gradients
        bm = r1 - r0
        qt = q[:, :, r0:r1].to(cdt)
        dot = do[:, :, r0:r1].to(cdt)
        kt = plan.gather(k, cols, sl, cdt)
        vt = plan.gather(v, cols, sl, cdt)
        s = plan.scores(qt, kt, scale)
        p = torch.where(allowed, torch.exp(s - lse_safe[:, :, r0:r1, None]), zero)
        pg = plan.grouped(p)                                                  # [B, Hk, G*bm, nc]
        dog = plan.grouped(dot)                                               # [B, Hk, G*bm, Dv]
        dv_t = torch.matmul(pg.transpose(-1, -2), dog)                        # [B, Hk, nc, Dv]
        dp = torch.matmul(dog, vt.transpose(-1, -2)).view(B, Hq, bm, -1)
        ds = p * (dp - delta[:, :, r0:r1, None])
        dsg = plan.grouped(ds)
        dq[:, :, r0:r1] = (torch.matmul(dsg, kt) * scale).view(B, Hq, bm, D)
        dk_t = torch.matmul(dsg.transpose(-1, -2), plan.grouped(qt)) * scale  # [B, Hk, nc, D]
        if sl is not None:
            dk[:, :, sl] += dk_t
            dv[:, :, sl] += dv_t
        else:
            dk.index_add_(2, cols, dk_t)
            dv.index_add_(2, cols, dv_t)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
