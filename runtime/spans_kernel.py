"""Few-launch table setup for the table strategy on CUDA: row summaries and grid orders.

On the GPU the setup of a new shape is bound by launches, not by work: each torch op costs
~10-20 µs of host time on an H200, and the torch path of ``triton_backend`` spends ~10 of
them pooling a table's classes (:func:`triton_backend._pool`), ~30 summarising its rows
(``_spans``) and ~15 ordering its work items (``_grid_order``), on a few hundred thousand
int8 classes.  Here each of the two is one kernel:

* :func:`table_rows` reads the fine classes as classified (``CLASS_TILE`` tiles), pools
  them to the table's tiles, demotes a ragged last column's FULL tiles, reads them
  transposed for dK/dV, and summarises each row: the span of non-EMPTY tiles, the span of
  FULL tiles, the waste of running them as spans and the row's work;
* :func:`grid_order` computes each work item's sort key, so that one ``argsort`` gives
  ``_grid_order``'s order.

They answer the launcher's ``tables="auto"`` question only: where the waste is zero the
spans are exactly ``_spans``'s (the FULL tiles are then one run, which is also the
longest); elsewhere the FULL span may hold non-FULL tiles, so the spans are only valid
where the waste is zero (the launcher then builds CSR lists and never reads them).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ir.tiles import EMPTY, FULL, PARTIAL
from .settings import launch_guard

assert (EMPTY, PARTIAL, FULL) == (0, 1, 2), "the kernels compare classes with 0 and 2"

#: a work item's class is floor(log2(work)) < KEY_CLASSES (work < 2**40)
KEY_CLASSES = 40


@triton.jit
def _table_rows_kernel(CLS, SPANS, WORK, WASTE, n_rows, n_cols, n_frows, n_fcols, Hp,
                       stride_b, stride_h, stride_r, stride_c, RR, RC,
                       RAGGED: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``i_r`` of slice ``i_bh`` of the table: tile ``(i_r, j)`` pools the fine tiles
    ``[i_r * RR, +RR) x [j * RC, +RC)`` of ``CLS`` (int8, strides per slice, row and
    column of the table's orientation; fine tiles past ``n_frows``/``n_fcols`` count as
    EMPTY and FULL at once).  Writes ``SPANS[i_bh, i_r] = [lo, hi, flo, fhi]``,
    ``WORK[i_bh, i_r]`` and adds the row's waste to ``WASTE[0]``; row ``n_rows`` of each
    slice is the kernels' padding row, ``[0, 0, 0, 0]``."""
    i_p = tl.program_id(0)
    i_bh = i_p // (n_rows + 1)
    i_r = i_p % (n_rows + 1)
    live = i_r < n_rows
    p_cls = CLS + (i_bh // Hp).to(tl.int64) * stride_b + (i_bh % Hp).to(tl.int64) * stride_h
    zero = n_cols * 0
    lo, hi, flo, fhi = n_cols, zero, n_cols, zero
    n_ne, n_full = zero, zero
    for i_s in range(0, n_cols, BLOCK):
        o_c = i_s + tl.arange(0, BLOCK)
        m_c = (o_c < n_cols) & live
        b_min = tl.full([BLOCK], 2, dtype=tl.int32)
        b_max = tl.full([BLOCK], 0, dtype=tl.int32)
        for r in range(RR):
            o_fr = i_r * RR + r
            for s in range(RC):
                o_fc = o_c * RC + s
                m_f = m_c & (o_fc < n_fcols) & (o_fr < n_frows)
                b_f = tl.load(p_cls + o_fr.to(tl.int64) * stride_r + o_fc.to(tl.int64) * stride_c,
                              mask=m_f, other=-1).to(tl.int32)
                b_min = tl.minimum(b_min, tl.where(b_f < 0, 2, b_f))
                b_max = tl.maximum(b_max, b_f)
        b_c = tl.where(b_min == 2, 2, tl.where(b_max > 0, 1, 0))
        b_c = tl.where(m_c, b_c, 0)                        # beyond the row: EMPTY
        if RAGGED:                                         # the last column needs a bounds mask
            b_c = tl.where((o_c == n_cols - 1) & (b_c == 2), 1, b_c)
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
    p_s = SPANS + i_p.to(tl.int64) * 4
    tl.store(p_s, lo)
    tl.store(p_s + 1, hi)
    tl.store(p_s + 2, flo)
    tl.store(p_s + 3, fhi)
    tl.store(WORK + i_bh.to(tl.int64) * n_rows + i_r, 2 * n_ne - n_full, mask=live)
    # EMPTY tiles inside the span, non-FULL tiles inside the FULL span
    tl.atomic_add(WASTE, (hi - lo - n_ne) + (fhi - flo - n_full))


def table_rows(fine: torch.Tensor, factors: tuple, n_rows: int, n_cols: int, *,
               transposed: bool, ragged: bool, waste: torch.Tensor):
    """The rows of one table from the fine classes ``fine [B', H', nfq, nfk]`` (int8, any
    strides), in one launch: ``(spans [B', H', n_rows + 1, 4], work [B', H', n_rows])``,
    int32, with the padding row the kernels read past the last; the table's waste is
    added to ``waste`` (int32, one element on the device).

    ``factors = (rm, rn)``: fine tiles per table tile along queries and keys.  Rows are
    query tiles, or key tiles when ``transposed`` (dK/dV); ``ragged``: the last column's
    FULL tiles are PARTIAL (their bounds need a mask)."""
    Bp, Hp, nfq, nfk = fine.shape
    sb, sh, sq, sk = fine.stride()
    rm, rn = factors
    if transposed:
        geo = (nfk, nfq, sk, sq, rn, rm)
    else:
        geo = (nfq, nfk, sq, sk, rm, rn)
    n_fr, n_fc, s_r, s_c, rr, rc = geo
    spans = torch.empty((Bp, Hp, n_rows + 1, 4), dtype=torch.int32, device=fine.device)
    work = torch.empty((Bp, Hp, n_rows), dtype=torch.int32, device=fine.device)
    with launch_guard(fine.device.type):
        _table_rows_kernel[(Bp * Hp * (n_rows + 1),)](
            fine, spans, work, waste, n_rows, n_cols, n_fr, n_fc, Hp, sb, sh, s_r, s_c, rr,
            rc, RAGGED=ragged, BLOCK=min(1024, triton.next_power_of_2(max(n_cols, 16))))
    return spans, work


@triton.jit
def _order_key_kernel(WORK, KEY, n, HO, stride_b, stride_h, G, W_MAX,
                      KEY_CLASSES: tl.constexpr, BLOCK: tl.constexpr):
    """Keys of the work items ``(i_bh, i)``, ``i_bh = b * HO + ho``: the item's work is the
    sum of ``WORK[b, ho * G + g, i]`` over ``g < G`` (strides 0 over shared dims); the
    key orders by class ``floor(log2(work))`` descending, then ``i_bh``, then work
    descending, then ``i`` (unique keys)."""
    i_bh = tl.program_id(0)
    b = i_bh // HO
    ho = i_bh % HO
    span = (W_MAX + 1) * n
    for i_s in range(0, n, BLOCK):
        o_i = i_s + tl.arange(0, BLOCK)
        m_i = o_i < n
        b_w = tl.zeros([BLOCK], dtype=tl.int64)
        for g in range(G):
            p_w = WORK + b.to(tl.int64) * stride_b + (ho * G + g).to(tl.int64) * stride_h + o_i
            b_w += tl.load(p_w, mask=m_i, other=0).to(tl.int64)
        b_v = tl.maximum(b_w, 1)
        b_k = tl.zeros([BLOCK], dtype=tl.int64)           # floor(log2(work)), exactly
        for _ in range(KEY_CLASSES):
            b_v = b_v // 2
            b_k += (b_v > 0).to(tl.int64)
        key = ((KEY_CLASSES - 1 - b_k) * tl.num_programs(0) + i_bh) * span \
            + (W_MAX - b_w) * n + o_i
        tl.store(KEY + i_bh.to(tl.int64) * n + o_i, key, mask=m_i)


def grid_order(work: torch.Tensor, B: int, HO: int, group: int, w_max: int):
    """``tables._grid_order``'s order of the ``B * HO * n`` work items, from one
    key kernel and one ``argsort``, or None where the keys could overflow int64.

    ``work [B', H', n]`` int32 (``B'``, ``H'`` 1 or full); an item's work sums ``group``
    consecutive heads of ``work`` (a key head over its query heads; ``group`` is 1 when
    ``H'`` is 1); ``w_max`` bounds any item's work."""
    Bp, Hp, n = work.shape
    if KEY_CLASSES * B * HO * (w_max + 1) * n >= 2 ** 62 or w_max >= 2 ** KEY_CLASSES:
        return None
    work = work.contiguous()
    key = torch.empty(B * HO * n, dtype=torch.int64, device=work.device)
    with launch_guard(work.device.type):
        _order_key_kernel[(B * HO,)](
            work, key, n, HO, work.stride(0) if Bp > 1 else 0, work.stride(1) if Hp > 1 else 0,
            group, w_max, KEY_CLASSES=KEY_CLASSES,
            BLOCK=min(1024, triton.next_power_of_2(max(n, 16))))
    return torch.argsort(key).to(torch.int32)
