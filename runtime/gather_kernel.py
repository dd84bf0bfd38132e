"""Token gathers of a permuted plan on CUDA: one kernel copying whole rows.

A plan that runs its pattern in another token order (a layout's box order, a caller's
order: ``plan.PermutedPlan``) gathers q, k, v into that order and o, the lse and the
gradients back. ``index_select`` along the tokens of a ``[B, H, N, D]`` tensor computes the
source of every element apart; it moves about 1.2 TB/s on an H200 (``benchmarks/
layout_cost.py``), so the gathers cost as much as a small pattern's whole forward. Here a
program copies ``BLOCK_R`` rows of ``D`` contiguous elements, each read through the index
once: wide loads and stores, one index load per row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .settings import launch_guard


@triton.jit
def _gather_rows_kernel(SRC, DST, INDEX, n_rows, n_blocks, H, D, group,
                        stride_sb, stride_sh, stride_sn, stride_sd,
                        stride_db, stride_dh, stride_dn, stride_ib, stride_ih,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """``DST[b, h, r, :] = SRC[b, h // group, INDEX[b, h, r], :]`` for the rows ``[i_r *
    BLOCK_R, +BLOCK_R)`` of slice ``i_bh = b * H + h`` of ``DST`` (``stride_ib`` 0: one
    index for every batch element, ``stride_ih`` 0: for every head). ``DST`` is contiguous
    along its last axis. One grid axis of ``n_blocks`` row blocks per slice (a second axis
    would cap B * H at 65535)."""
    i_p = tl.program_id(0)
    i_r = i_p % n_blocks
    i_bh = i_p // n_blocks
    i_b = i_bh // H
    i_h = i_bh % H
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < n_rows
    b_idx = tl.load(INDEX + i_b.to(tl.int64) * stride_ib + i_h.to(tl.int64) * stride_ih + o_r,
                    mask=m_r, other=0)
    p_src = SRC + i_b.to(tl.int64) * stride_sb + (i_h // group).to(tl.int64) * stride_sh \
        + b_idx.to(tl.int64)[:, None] * stride_sn
    p_dst = DST + i_b.to(tl.int64) * stride_db + i_h.to(tl.int64) * stride_dh \
        + o_r.to(tl.int64)[:, None] * stride_dn
    for i_d in range(0, D, BLOCK_D):
        o_d = i_d + tl.arange(0, BLOCK_D)
        m = m_r[:, None] & (o_d < D)[None, :]
        b_x = tl.load(p_src + o_d[None, :] * stride_sd, mask=m)
        tl.store(p_dst + o_d[None, :], b_x, mask=m)


def gather_rows(t: torch.Tensor, index: torch.Tensor, *, per_head: bool = False,
                group: int = 1) -> torch.Tensor:
    """``t [B, H, N, D]`` (or ``[B, H, N]``) gathered along the tokens at ``index``: ``[M]``
    (int64, every batch element) or ``[B, M]`` (one row each); with ``per_head``, ``[G,
    M]``, one row per output head (a head order, ``plan.HeadOrderedPlan``), output head
    ``g`` reading head ``g // group`` of ``t`` (GQA: ``G = H * group``). Every index in
    ``[0, N)`` (the plan's permutation, checked where it was built). Returns a new
    contiguous ``[B, G, M, D]`` (``[B, G, M]``) tensor (``G = H`` without ``per_head``)."""
    flat = t.dim() == 3
    src = t.unsqueeze(-1) if flat else t
    B, H, _, D = src.shape
    H = H * group
    M = index.shape[-1]
    index = index.contiguous()
    out = torch.empty((B, H, M, D), dtype=t.dtype, device=t.device)
    if out.numel():
        block_d = min(triton.next_power_of_2(D), 128)
        block_r = 1024 if D == 1 else max(16, min(64, 4096 // block_d))
        n_blocks = triton.cdiv(M, block_r)
        with launch_guard(out.device.type):
            _gather_rows_kernel[(n_blocks * B * H,)](
                src, out, index, M, n_blocks, H, D, group,
                src.stride(0), src.stride(1), src.stride(2), src.stride(3),
                out.stride(0), out.stride(1), out.stride(2),
                0 if index.dim() == 1 or per_head else index.stride(0),
                index.stride(0) if per_head else 0,
                BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return out.squeeze(-1) if flat else out
