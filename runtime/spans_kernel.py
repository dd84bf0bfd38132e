"""One-launch row summaries of tile classes for the table strategy's setup (CUDA).

On the GPU the setup of a new shape is bound by launches, not by work: each torch op costs
~10-20 µs of host time on an H200, and ``triton_backend._spans`` spends ~30 of them per
table on a few hundred thousand int8 classes.  :func:`row_spans` computes what the launcher
needs to choose the table form, in one kernel: per row, the span of non-EMPTY tiles, the
span of FULL tiles, the waste of running them as spans and the row's work.

It answers the launcher's ``tables="auto"`` question only: where the waste is zero it gives
exactly ``_spans``'s spans (the FULL tiles are then one run, which is also the longest);
elsewhere its FULL span may hold non-FULL tiles, so its spans are only valid where the
waste is zero (the launcher then builds CSR lists and never reads them).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ir.tiles import EMPTY, FULL, PARTIAL

assert (EMPTY, PARTIAL, FULL) == (0, 1, 2), "the kernel compares classes with 0 and 2"


@triton.jit
def _row_spans_kernel(CLS, OUT, n_cols, BLOCK: tl.constexpr):
    """Row ``i_r`` of ``CLS [R, n_cols]`` (int8, contiguous) ->
    ``OUT[i_r] = [lo, hi, flo, fhi, waste, work]`` (int32)."""
    i_r = tl.program_id(0)
    p_row = CLS + i_r.to(tl.int64) * n_cols
    zero = n_cols * 0
    lo, hi, flo, fhi = n_cols, zero, n_cols, zero
    n_ne, n_full = zero, zero
    for i_s in range(0, n_cols, BLOCK):
        o_c = i_s + tl.arange(0, BLOCK)
        b_c = tl.load(p_row + o_c, mask=o_c < n_cols, other=0)     # beyond the row: EMPTY
        m_ne = b_c != 0
        m_full = b_c == 2
        lo = tl.minimum(lo, tl.min(tl.where(m_ne, o_c, n_cols), 0))
        hi = tl.maximum(hi, tl.max(tl.where(m_ne, o_c + 1, 0), 0))
        flo = tl.minimum(flo, tl.min(tl.where(m_full, o_c, n_cols), 0))
        fhi = tl.maximum(fhi, tl.max(tl.where(m_full, o_c + 1, 0), 0))
        n_ne += tl.sum(m_ne.to(tl.int32), 0)
        n_full += tl.sum(m_full.to(tl.int32), 0)
    # epilogue: a row without tiles is [0, 0); without FULL tiles its FULL span is [hi, hi)
    lo = tl.minimum(lo, hi)
    flo = tl.where(n_full > 0, flo, hi)
    fhi = tl.where(n_full > 0, fhi, hi)
    p_out = OUT + i_r.to(tl.int64) * 6
    tl.store(p_out, lo)
    tl.store(p_out + 1, hi)
    tl.store(p_out + 2, flo)
    tl.store(p_out + 3, fhi)
    # EMPTY tiles inside the span, non-FULL tiles inside the FULL span
    tl.store(p_out + 4, (hi - lo - n_ne) + (fhi - flo - n_full))
    tl.store(p_out + 5, 2 * n_ne - n_full)


def row_spans(cls: torch.Tensor):
    """``(spans [B', H', n, 4] int32, waste (0-dim), work [B', H', n] int32)`` of the classes
    ``cls [B', H', n, m]`` (any strides), as ``triton_backend._spans`` returns them wherever
    the waste is zero (see the module docstring)."""
    Bp, Hp, n, m = cls.shape
    rows = cls.reshape(Bp * Hp * n, m).contiguous()
    out = torch.empty((rows.shape[0], 6), dtype=torch.int32, device=cls.device)
    if rows.shape[0]:
        _row_spans_kernel[(rows.shape[0],)](rows, out, m,
                                            BLOCK=min(1024, triton.next_power_of_2(max(m, 16))))
    out = out.view(Bp, Hp, n, 6)
    return out[..., :4], out[..., 4].sum(), out[..., 5]
