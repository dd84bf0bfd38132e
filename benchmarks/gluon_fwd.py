"""FlashAttention-3's forward structure written in Gluon (Triton 3.6's explicit layer), on
Hopper: how far a warp-specialised kernel takes the dense rate past Triton's (GPU).

The forms this benchmark measured; spattn's own forward on Hopper is the one it found
fastest (ping-pong with the overlap, two stages), generalised in ``runtime/ws_fwd.py``
(masks, GQA, batches, any lengths: docs/backends.md, "The warp-specialised forward").
NOTES row 91 found Triton's automatic warp specialisation unusable in
Triton 3.6 and the generated forward at Triton's dense rate, 84% of cuDNN's. Gluon writes
the partitions, barriers and asynchronous products by hand:

* ``attn_fwd_ws``: a loader partition (TMA loads of K and V tiles into a ring of
  ``STAGES`` shared-memory slots, each guarded by a ready and an empty mbarrier) and two
  consumer warp groups of 64 query rows each (``setmaxnreg`` 240), sharing the K and V
  slots. ``MODE`` 0: each group overlaps its own products (S of the next key tile in
  flight during the current softmax, P V in flight across the next S); 1: ping-pong, the
  groups take turns to issue their products (P V of the previous tile with S of this one),
  so that one group's softmax runs while the other's products occupy the tensor cores; 2:
  ping-pong with each turn's S issued before its P V, so that the softmax overlaps the
  group's own P V as well (FlashAttention-3's schedule). The key tiles of each query tile
  come from a list (``START``, ``COUNT``, ``COLS``: the tiles a layout's plan computes),
  which only the loader reads. Q, K, V and O are rows through 2-D descriptors, or a
  layout's boxes of the caller's tensors through 4-D descriptors (no copies).
* ``attn_fwd_sp``: one partition of 8 warps (the Triton kernel's form), its products
  issued asynchronously by hand, with (``OVERLAP``) or without the overlap of S and the
  softmax.

Both keep an online softmax in log2 units and store O (the warp-specialised one also the
lse, by query tile, not checked here), and require the sequence lengths to be multiples of
the tiles (128 rows, 128 keys). ``--dense``: ``full`` attention
(16 heads at 16K; 24 heads of 65536 queries on 6400 keys, the strided FLUX problem's
rows) against cuDNN, the Triton minimal kernel of ``min_fwd.py`` and spattn's plan.
``--layouts``: the strided FLUX and Hunyuan problems (``spattn.neighborhood``) in the
layout spattn chooses, the tokens copied into its order and the output back (the copies
timed with the kernel), the kernel fed the plan's non-EMPTY key tiles (all FULL), against
cuDNN's dense forward and spattn's own call; and the kernel reading and writing the
tokens in their own order, a layout's boxes through 4-D TMA descriptors (no copies).
Alternating rounds of ``triton.testing.do_bench`` medians; each kernel's output checked
first (against cuDNN, or against spattn's call on the layouts). B = 1, D = 128, bf16.

    python benchmarks/gluon_fwd.py --dense --layouts [--rounds 3] [--out DIR]
    python benchmarks/gluon_fwd.py --compile-only   # no GPU: compile for sm_90a here
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

os.environ.setdefault("SPATTN_AUTOTUNE", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_init, warpgroup_mma_wait)

LOG2E = 1.4426950408889634


# ------------------------------------------------------------------ the warp-specialised kernel
@gluon.jit
def _ws_load(q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, bars, LSE, START, COUNT,
             COLS, geom, sm_scale_log2, Lq, Lk):
    """The loader partition: this program's two Q tiles, then its key tiles' K and V into
    the ring of slots, each slot refilled once both consumers released it."""
    b_q, k_ready, k_empty, v_ready, v_empty, pp_bar = bars
    BOX: gl.constexpr = len(k_smem.type.shape) == 5
    STAGES: gl.constexpr = k_smem.type.shape[0]
    n_m = Lq // 128
    i_w = gl.program_id(0)
    i_bh = i_w // n_m
    i_t = i_w % n_m
    for i_h in gl.static_range(2):
        mbarrier.expect(b_q.index(i_h), q_desc.block_type.nbytes)
        if BOX:
            tma.async_copy_global_to_shared(q_desc, _box_at(i_t, i_bh, i_h, q_smem, k_smem, geom),
                                            b_q.index(i_h), q_smem.index(i_h))
        else:
            tma.async_copy_global_to_shared(q_desc, [i_bh * Lq + i_t * 128 + i_h * 64, 0],
                                            b_q.index(i_h), q_smem.index(i_h))
    o_list = gl.load(START + i_t)
    n_n = gl.load(COUNT + i_t)
    for j in range(n_n):
        i_s = j % STAGES
        phase = (j // STAGES) & 1
        i_c = gl.load(COLS + o_list + j)
        mbarrier.wait(k_empty.index(i_s), phase ^ 1)
        mbarrier.expect(k_ready.index(i_s), k_desc.block_type.nbytes)
        if BOX:
            o_b = _box_at(i_c, i_bh, 2, q_smem, k_smem, geom)
            tma.async_copy_global_to_shared(k_desc, o_b, k_ready.index(i_s), k_smem.index(i_s))
        else:
            o_n = i_bh * Lk + i_c * k_smem.type.shape[1]
            tma.async_copy_global_to_shared(k_desc, [o_n, 0], k_ready.index(i_s), k_smem.index(i_s))
        mbarrier.wait(v_empty.index(i_s), phase ^ 1)
        mbarrier.expect(v_ready.index(i_s), v_desc.block_type.nbytes)
        if BOX:
            tma.async_copy_global_to_shared(v_desc, o_b, v_ready.index(i_s), v_smem.index(i_s))
        else:
            tma.async_copy_global_to_shared(v_desc, [o_n, 0], v_ready.index(i_s), v_smem.index(i_s))


@gluon.jit
def _box_at(i_c, i_bh, i_h, q_smem, k_smem, geom):
    """The 4-D TMA coordinates of tile ``i_c`` of head ``i_bh`` in a layout of boxes
    (``geom``: the grid's sides ``A0, A1, A2``, boxes per side ``T1, T2`` of the last two):
    the whole box (``i_h`` 2, a key tile) or its half ``i_h`` (a consumer's query rows)."""
    A0, T1, T2 = geom
    b0: gl.constexpr = k_smem.type.shape[1]
    b1: gl.constexpr = k_smem.type.shape[2]
    b2: gl.constexpr = k_smem.type.shape[3]
    h0: gl.constexpr = q_smem.type.shape[1]
    h1: gl.constexpr = q_smem.type.shape[2]
    t0 = i_c // (T1 * T2)
    t1 = (i_c // T2) % T1
    t2 = i_c % T2
    o0 = i_bh * A0 + t0 * b0
    o1 = t1 * b1
    if i_h < 2:
        if h0 < b0:
            o0 = o0 + i_h * h0
        else:
            o1 = o1 + i_h * h1
    return [o0, o1, t2 * b2, 0]


@gluon.jit
def _softmax(b_s, b_m, b_l, sm_scale_log2):
    """One key tile of the online softmax in log2 units: P, the rescale of the running sums
    and the new row maxima and sums."""
    b_m_new = gl.maximum(b_m, gl.max(b_s, 1) * sm_scale_log2)
    b_alpha = gl.exp2(b_m - b_m_new)
    b_p = gl.exp2(b_s * sm_scale_log2 - gl.expand_dims(b_m_new, 1))
    b_l = b_l * b_alpha + gl.sum(b_p, 1)
    return b_p, b_alpha, b_m_new, b_l


@gluon.jit
def _ws_consume(q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, bars, LSE, START,
                COUNT, COLS, geom, sm_scale_log2, Lq, Lk, HALF: gl.constexpr):
    """A consumer warp group: 64 query rows of the program's tile against its key tiles."""
    b_q, k_ready, k_empty, v_ready, v_empty, pp_bar = bars
    BOX: gl.constexpr = len(k_smem.type.shape) == 5
    D: gl.constexpr = k_smem.type.shape[len(k_smem.type.shape) - 1]
    BLOCK_M: gl.constexpr = 64          # one warp group's rows
    BLOCK_N: gl.constexpr = k_smem.numel // (k_smem.type.shape[0] * D)
    STAGES: gl.constexpr = k_smem.type.shape[0]
    MODE: gl.constexpr = pp_bar.type.shape[0] - 1
    gl.static_assert(q_smem.numel == 2 * BLOCK_M * D)
    n_m = Lq // 128
    i_w = gl.program_id(0)
    i_bh = i_w // n_m
    i_t = i_w % n_m
    o_q = i_bh * Lq + i_t * 128 + HALF * BLOCK_M
    n_n = gl.load(COUNT + i_t)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    q_box = q_smem.index(HALF)
    q_s = q_box.reshape([BLOCK_M, D]) if BOX else q_box
    b_m = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
    b_l = gl.zeros([BLOCK_M], gl.float32, row_s)
    b_o = warpgroup_mma_init(gl.zeros([BLOCK_M, D], gl.float32, o_layout))
    b_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(b_q.index(HALF), 0)

    # stage 1: the first key tile's S (its turn 0 under ping-pong)
    mbarrier.wait(k_ready.index(0), 0)
    if MODE > 0:
        mbarrier.wait(pp_bar.index(HALF), HALF ^ 1)
    b_s = warpgroup_mma(q_s, _tile(k_smem, 0).permute((1, 0)), b_zero, use_acc=False,
                        is_async=True)
    if MODE > 0:
        mbarrier.arrive(pp_bar.index(1 - HALF))
    b_s = warpgroup_mma_wait(0, deps=(b_s,))
    mbarrier.arrive(k_empty.index(0))

    if MODE == 0:
        # stage 2: S of tile j + 1 in flight during tile j's softmax; P V across the next S
        for j in range(n_n - 1):
            i_s = j % STAGES
            i_s1 = (j + 1) % STAGES
            mbarrier.wait(k_ready.index(i_s1), ((j + 1) // STAGES) & 1)
            b_s1 = warpgroup_mma(q_s, _tile(k_smem, i_s1).permute((1, 0)), b_zero,
                                 use_acc=False, is_async=True)
            b_p, b_alpha, b_m, b_l = _softmax(b_s, b_m, b_l, sm_scale_log2)
            b_pd = gl.convert_layout(b_p.to(q_desc.dtype), p_layout)
            b_o = warpgroup_mma_wait(1, deps=(b_o,))
            if j >= 1:
                mbarrier.arrive(v_empty.index((j - 1) % STAGES))
            b_o = b_o * gl.expand_dims(gl.convert_layout(b_alpha, row_o), 1)
            mbarrier.wait(v_ready.index(i_s), (j // STAGES) & 1)
            b_o = warpgroup_mma(b_pd, _tile(v_smem, i_s), b_o, is_async=True)
            b_s = warpgroup_mma_wait(1, deps=(b_s1,))
            mbarrier.arrive(k_empty.index(i_s1))
        j = n_n - 1
        b_p, b_alpha, b_m, b_l = _softmax(b_s, b_m, b_l, sm_scale_log2)
        b_pd = gl.convert_layout(b_p.to(q_desc.dtype), p_layout)
        b_o = warpgroup_mma_wait(0, deps=(b_o,))
        b_o = b_o * gl.expand_dims(gl.convert_layout(b_alpha, row_o), 1)
        mbarrier.wait(v_ready.index(j % STAGES), (j // STAGES) & 1)
        b_o = warpgroup_mma(b_pd, _tile(v_smem, j % STAGES), b_o, is_async=True)
        b_o = warpgroup_mma_wait(0, deps=(b_o,))
    else:
        # stage 2: turns of (P V of tile j - 1, S of tile j), the softmax between turns
        b_p, b_alpha, b_m, b_l = _softmax(b_s, b_m, b_l, sm_scale_log2)
        b_pd = gl.convert_layout(b_p.to(q_desc.dtype), p_layout)
        for j in range(1, n_n):
            i_s = j % STAGES
            i_sp = (j - 1) % STAGES
            mbarrier.wait(k_ready.index(i_s), (j // STAGES) & 1)
            mbarrier.wait(v_ready.index(i_sp), ((j - 1) // STAGES) & 1)
            mbarrier.wait(pp_bar.index(HALF), (j & 1) ^ HALF ^ 1)
            if MODE == 2:
                b_s = warpgroup_mma(q_s, _tile(k_smem, i_s).permute((1, 0)), b_zero,
                                    use_acc=False, is_async=True)
                b_o = warpgroup_mma(b_pd, _tile(v_smem, i_sp), b_o, is_async=True)
                mbarrier.arrive(pp_bar.index(1 - HALF))
                b_s = warpgroup_mma_wait(1, deps=(b_s,))
                mbarrier.arrive(k_empty.index(i_s))
                b_p, b_alpha, b_m, b_l = _softmax(b_s, b_m, b_l, sm_scale_log2)
                b_o = warpgroup_mma_wait(0, deps=(b_o,))
                mbarrier.arrive(v_empty.index(i_sp))
            else:
                b_o = warpgroup_mma(b_pd, _tile(v_smem, i_sp), b_o, is_async=True)
                b_s = warpgroup_mma(q_s, _tile(k_smem, i_s).permute((1, 0)), b_zero,
                                    use_acc=False, is_async=True)
                mbarrier.arrive(pp_bar.index(1 - HALF))
                b_s, b_o = warpgroup_mma_wait(0, deps=(b_s, b_o))
                mbarrier.arrive(k_empty.index(i_s))
                mbarrier.arrive(v_empty.index(i_sp))
                b_p, b_alpha, b_m, b_l = _softmax(b_s, b_m, b_l, sm_scale_log2)
            b_pd = gl.convert_layout(b_p.to(q_desc.dtype), p_layout)
            b_o = warpgroup_mma_init(b_o * gl.expand_dims(gl.convert_layout(b_alpha, row_o), 1))
        j = n_n - 1
        mbarrier.wait(v_ready.index(j % STAGES), (j // STAGES) & 1)
        mbarrier.wait(pp_bar.index(HALF), (n_n & 1) ^ HALF ^ 1)
        b_o = warpgroup_mma(b_pd, _tile(v_smem, j % STAGES), b_o, is_async=True)
        mbarrier.arrive(pp_bar.index(1 - HALF))
        b_o = warpgroup_mma_wait(0, deps=(b_o,))

    # stage 3: normalise, store O (through Q's slot, no longer read) and the lse
    b_o = b_o / gl.expand_dims(gl.convert_layout(b_l, row_o), 1)
    q_s.store(b_o.to(o_desc.dtype))
    fence_async_shared()
    if BOX:
        tma.async_copy_shared_to_global(o_desc, _box_at(i_t, i_bh, HALF, q_smem, k_smem, geom),
                                        q_box)
    else:
        tma.async_copy_shared_to_global(o_desc, [o_q, 0], q_s)
    o_r = o_q + gl.arange(0, BLOCK_M, layout=row_s)
    gl.store(LSE + o_r, (b_m + gl.log2(b_l)) * 0.6931471805599453)
    tma.store_wait(pendings=0)


@gluon.jit
def _tile(smem, i_s):
    """Slot ``i_s`` of a ring of K or V tiles as a ``[rows, D]`` operand (a box's slot
    reshaped: its rows are the box's cells in the layout's order)."""
    t = smem.index(i_s)
    if len(smem.type.shape) == 5:
        D: gl.constexpr = smem.type.shape[4]
        t = t.reshape([t.numel // D, D])
    return t


@gluon.jit
def _ws_consume0(q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, bars, LSE, START,
                 COUNT, COLS, geom, sm_scale_log2, Lq, Lk):
    _ws_consume(q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, bars, LSE, START,
                COUNT, COLS, geom, sm_scale_log2, Lq, Lk, 0)


@gluon.jit
def _ws_consume1(q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, bars, LSE, START,
                 COUNT, COLS, geom, sm_scale_log2, Lq, Lk):
    _ws_consume(q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, bars, LSE, START,
                COUNT, COLS, geom, sm_scale_log2, Lq, Lk, 1)


@gluon.jit
def attn_fwd_ws(q_desc, k_desc, v_desc, o_desc, LSE, START, COUNT, COLS, A0, T1, T2,
                sm_scale_log2, Lq, Lk, STAGES: gl.constexpr, MODE: gl.constexpr,
                CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """Q, K, V, O ``[B * H * L, D]`` through TMA descriptors (blocks of 64 rows for Q and O,
    ``BLOCK_N`` for K and V); one program per two 64-row query tiles of one (batch, head),
    its key tiles ``COLS[START[t] : START[t] + COUNT[t]]`` (``t``: the program's tile of 128
    rows). The partitions read their tile shapes and mode from the shared buffers' types
    (Triton 3.6 passes a partition's arguments as values, not constexprs)."""
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape,
                                       k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape,
                                       v_desc.layout)
    b_q = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    pp_bar = gl.allocate_shared_memory(gl.int64, [MODE + 1, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(b_q.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=2)
    for i in gl.static_range(MODE + 1):
        mbarrier.init(pp_bar.index(i), count=1)
    bars = (b_q, k_ready, k_empty, v_ready, v_empty, pp_bar)
    args = (q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, bars, LSE, START, COUNT,
            COLS, (A0, T1, T2), sm_scale_log2, Lq, Lk)
    gl.warp_specialize([(_ws_load, args), (_ws_consume0, args), (_ws_consume1, args)],
                       [4, 4], [CONSUMER_REGS, CONSUMER_REGS])


# ------------------------------------------------------------------ the one-partition kernel
@gluon.jit
def attn_fwd_sp(q_desc, k_desc, v_desc, o_desc, sm_scale_log2, Lq, Lk,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
                STAGES: gl.constexpr, OVERLAP: gl.constexpr, num_warps: gl.constexpr):
    """Dense; one program per ``BLOCK_M`` query rows of one (batch, head), all warps in one
    partition, its K and V loads issued ``STAGES`` tiles ahead."""
    n_m = Lq // BLOCK_M
    i_w = gl.program_id(0)
    i_bh = i_w // n_m
    o_q = i_bh * Lq + (i_w % n_m) * BLOCK_M
    o_k = i_bh * Lk
    n_n = Lk // BLOCK_N
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, D], v_desc.layout)
    b_q = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(b_q, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)
    mbarrier.expect(b_q, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [o_q, 0], b_q, q_smem)
    for i in gl.static_range(STAGES):
        mbarrier.expect(k_bar.index(i), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [o_k + i * BLOCK_N, 0], k_bar.index(i),
                                        k_smem.index(i))
        mbarrier.expect(v_bar.index(i), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [o_k + i * BLOCK_N, 0], v_bar.index(i),
                                        v_smem.index(i))
    b_m = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    b_l = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    b_o = warpgroup_mma_init(gl.zeros([BLOCK_M, D], gl.float32, o_layout))
    b_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(b_q, 0)
    if OVERLAP:
        mbarrier.wait(k_bar.index(0), 0)
        b_s = warpgroup_mma(q_smem, _tile(k_smem, 0).permute((1, 0)), b_zero, use_acc=False,
                            is_async=True)
        b_s = warpgroup_mma_wait(0, deps=(b_s,))
        for j in range(n_n - 1):
            i_s = j % STAGES
            i_s1 = (j + 1) % STAGES
            mbarrier.wait(k_bar.index(i_s1), ((j + 1) // STAGES) & 1)
            b_s1 = warpgroup_mma(q_smem, _tile(k_smem, i_s1).permute((1, 0)), b_zero,
                                 use_acc=False, is_async=True)
            b_p, b_alpha, b_m, b_l = _softmax(b_s, b_m, b_l, sm_scale_log2)
            b_pd = gl.convert_layout(b_p.to(q_desc.dtype), p_layout)
            b_o = warpgroup_mma_wait(1, deps=(b_o,))
            if j >= 1:
                if j - 1 + STAGES < n_n:
                    i_v = (j - 1) % STAGES
                    mbarrier.expect(v_bar.index(i_v), v_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(v_desc, [o_k + (j - 1 + STAGES) * BLOCK_N, 0],
                                                    v_bar.index(i_v), v_smem.index(i_v))
            b_o = b_o * gl.expand_dims(gl.convert_layout(b_alpha, row_o), 1)
            mbarrier.wait(v_bar.index(i_s), (j // STAGES) & 1)
            b_o = warpgroup_mma(b_pd, _tile(v_smem, i_s), b_o, is_async=True)
            b_s = warpgroup_mma_wait(1, deps=(b_s1,))
            if j + STAGES < n_n:
                mbarrier.expect(k_bar.index(i_s), k_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(k_desc, [o_k + (j + STAGES) * BLOCK_N, 0],
                                                k_bar.index(i_s), k_smem.index(i_s))
        j = n_n - 1
        b_p, b_alpha, b_m, b_l = _softmax(b_s, b_m, b_l, sm_scale_log2)
        b_pd = gl.convert_layout(b_p.to(q_desc.dtype), p_layout)
        b_o = warpgroup_mma_wait(0, deps=(b_o,))
        b_o = b_o * gl.expand_dims(gl.convert_layout(b_alpha, row_o), 1)
        mbarrier.wait(v_bar.index(j % STAGES), (j // STAGES) & 1)
        b_o = warpgroup_mma(b_pd, _tile(v_smem, j % STAGES), b_o, is_async=True)
        b_o = warpgroup_mma_wait(0, deps=(b_o,))
    else:
        for j in range(n_n):
            i_s = j % STAGES
            mbarrier.wait(k_bar.index(i_s), (j // STAGES) & 1)
            b_s = warpgroup_mma(q_smem, _tile(k_smem, i_s).permute((1, 0)), b_zero,
                                use_acc=False, is_async=True)
            b_s = warpgroup_mma_wait(0, deps=(b_s,))      # (and P V of tile j - 1)
            if j >= 1:
                if j - 1 + STAGES < n_n:
                    i_v = (j - 1) % STAGES
                    mbarrier.expect(v_bar.index(i_v), v_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(v_desc, [o_k + (j - 1 + STAGES) * BLOCK_N, 0],
                                                    v_bar.index(i_v), v_smem.index(i_v))
            if j + STAGES < n_n:
                mbarrier.expect(k_bar.index(i_s), k_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(k_desc, [o_k + (j + STAGES) * BLOCK_N, 0],
                                                k_bar.index(i_s), k_smem.index(i_s))
            b_p, b_alpha, b_m, b_l = _softmax(b_s, b_m, b_l, sm_scale_log2)
            b_pd = gl.convert_layout(b_p.to(q_desc.dtype), p_layout)
            b_o = warpgroup_mma_wait(0, deps=(b_o,))
            b_o = b_o * gl.expand_dims(gl.convert_layout(b_alpha, row_o), 1)
            mbarrier.wait(v_bar.index(i_s), (j // STAGES) & 1)
            b_o = warpgroup_mma(b_pd, _tile(v_smem, i_s), b_o, is_async=True)
        b_o = warpgroup_mma_wait(0, deps=(b_o,))
    b_o = b_o / gl.expand_dims(gl.convert_layout(b_l, row_o), 1)
    o_smem = gl.allocate_shared_memory(o_desc.dtype, [BLOCK_M, D], o_desc.layout)
    o_smem.store(b_o.to(o_desc.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [o_q, 0], o_smem)
    tma.store_wait(pendings=0)


# ------------------------------------------------------------------ host side
#: warp-specialised configurations: (label, BLOCK_N, STAGES, MODE)
WS_CONFIGS = [("ws overlap", 128, 2, 0), ("ws ping-pong", 128, 2, 1),
              ("ws ping-pong + overlap", 128, 2, 2),
              ("ws ping-pong + overlap, 3 stages", 128, 3, 2)]
#: one-partition configurations: (label, BLOCK_M, BLOCK_N, warps, STAGES, OVERLAP)
SP_CONFIGS = [("one partition", 128, 128, 8, 2, False),
              ("one partition, overlap", 128, 128, 8, 2, True)]


def _descs(blocks, D, dtype):
    """Gluon TMA descriptors over ``[rows, D]`` views: ``blocks`` (tensor, block rows)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    gdt = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[dtype]
    out = []
    for t, r in blocks:
        t2 = t.reshape(-1, D)
        lay = gl.NVMMASharedLayout.get_default_for([r, D], gdt)
        out.append(TensorDescriptor(t2, list(t2.shape), list(t2.stride()), [r, D], lay))
    return out


def dense_lists(Lq: int, Lk: int, block_n: int, device):
    """``(START, COUNT, COLS)`` of dense attention: every key tile for every query tile."""
    n_m, n_n = Lq // 128, Lk // block_n
    return (torch.zeros(n_m, dtype=torch.int32, device=device),
            torch.full((n_m,), n_n, dtype=torch.int32, device=device),
            torch.arange(n_n, dtype=torch.int32, device=device))


def ws_launch(q, k, v, cfg, lists=None, scale=None, box=None):
    """A closure running :func:`attn_fwd_ws` on contiguous ``[1, H, L, D]`` q, k, v (one
    key list for every head), returning ``(o, lse)``. ``box``: ``(grid, box)``, the
    tensors' tokens a row-major grid of three sides (a 2-D grid with a leading side of 1)
    read and written in boxes of three sides through 4-D descriptors (the key tiles
    numbered row-major over the boxes); else rows through 2-D descriptors."""
    _, bn, stages, mode = cfg
    H, Lq, D = q.shape[1], q.shape[2], q.shape[3]
    Lk = k.shape[2]
    assert Lq % 128 == 0 and Lk % bn == 0 and D in (64, 128)
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    start, count, cols = lists if lists is not None else dense_lists(Lq, Lk, bn, q.device)
    if box is None:
        descs = _descs(((q, 64), (k, bn), (v, bn), (o, 64)), D, q.dtype)
        geom = (0, 1, 1)
    else:
        (A0, A1, A2), (b0, b1, b2) = box
        assert b0 * b1 * b2 == 128 and A0 % b0 == 0 and A1 % b1 == 0 and A2 % b2 == 0
        half = (b0 // 2, b1, b2) if b0 > 1 else (1, b1 // 2, b2)
        descs = _box_descs(((q, half), (k, (b0, b1, b2)), (v, (b0, b1, b2)), (o, half)),
                           (A0, A1, A2), D, q.dtype)
        geom = (A0, A1 // b1, A2 // b2)
    scale = D ** -0.5 if scale is None else scale
    grid = (q.shape[0] * H * (Lq // 128),)
    args = (*descs, lse, start, count, cols, *geom, scale * LOG2E, Lq, Lk)
    kw = dict(STAGES=stages, MODE=mode, CONSUMER_REGS=240, num_warps=4, maxnreg=168)

    def run():
        attn_fwd_ws[grid](*args, **kw)
        return o, lse
    return run


def _box_descs(blocks, sides, D, dtype):
    """Gluon TMA descriptors over ``[B * H * A0, A1, A2, D]`` views: ``blocks`` (tensor,
    block sides)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    gdt = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[dtype]
    A0, A1, A2 = sides
    out = []
    for t, b in blocks:
        t4 = t.reshape(-1, A1, A2, D)
        lay = gl.NVMMASharedLayout.get_default_for([*b, D], gdt)
        out.append(TensorDescriptor(t4, list(t4.shape), list(t4.stride()), [*b, D], lay))
    return out


def sp_launch(q, k, v, cfg):
    """A closure running :func:`attn_fwd_sp` (dense) on contiguous ``[1, H, L, D]``."""
    _, bm, bn, nw, stages, overlap = cfg
    H, Lq, D = q.shape[1], q.shape[2], q.shape[3]
    Lk = k.shape[2]
    assert Lq % bm == 0 and Lk % bn == 0 and Lk // bn >= stages
    o = torch.empty_like(q)
    descs = _descs(((q, bm), (k, bn), (v, bn), (o, bm)), D, q.dtype)
    grid = (q.shape[0] * H * (Lq // bm),)
    args = (*descs, D ** -0.5 * LOG2E, Lq, Lk)
    kw = dict(BLOCK_M=bm, BLOCK_N=bn, D=D, STAGES=stages, OVERLAP=overlap, num_warps=nw)

    def run():
        attn_fwd_sp[grid](*args, **kw)
        return o
    return run


def compile_sm90(fn, args, kwargs):
    """Compile a Gluon kernel for sm_90a on this machine (no GPU), through the JIT's own
    argument binder (descriptors over CPU tensors carry the types)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import compile as triton_compile, make_backend
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                          specialization, options)
    return triton_compile(GluonASTSource(fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def compile_report() -> list:
    """Every configuration compiled for sm_90a here: ``(label, error or None, PTX facts)``,
    the facts being the ``setmaxnreg`` counts and the ``wgmma.wait_group`` arguments (a
    wait of 1 keeps a product in flight)."""
    D, L = 128, 1024
    t = torch.empty(1, 1, L, D, dtype=torch.bfloat16)
    out = []
    for cfg in WS_CONFIGS + [("ws ping-pong + overlap, boxes 2x8x8", 128, 2, 2)]:
        _, bn, stages, mode = cfg
        lists = dense_lists(L, L, bn, "cpu")
        if "boxes" in cfg[0]:
            descs = _box_descs(((t, (1, 8, 8)), (t, (2, 8, 8)), (t, (2, 8, 8)), (t, (1, 8, 8))),
                               (4, 16, 16), D, t.dtype)
            geom = (4, 2, 2)
        else:
            descs = _descs(((t, 64), (t, bn), (t, bn), (t, 64)), D, t.dtype)
            geom = (0, 1, 1)
        args = (*descs, torch.empty(L), *lists, *geom, 0.1, L, L)
        kw = dict(STAGES=stages, MODE=mode, CONSUMER_REGS=240, num_warps=4, maxnreg=168)
        out.append(_compiled(cfg[0], attn_fwd_ws, args, kw))
    for cfg in SP_CONFIGS:
        _, bm, bn, nw, stages, overlap = cfg
        descs = _descs(((t, bm), (t, bn), (t, bn), (t, bm)), D, t.dtype)
        kw = dict(BLOCK_M=bm, BLOCK_N=bn, D=D, STAGES=stages, OVERLAP=overlap, num_warps=nw)
        out.append(_compiled(cfg[0], attn_fwd_sp, (*descs, 0.1, L, L), kw))
    return out


def _compiled(label, fn, args, kw):
    try:
        ptx = compile_sm90(fn, args, kw).asm["ptx"]
    except Exception as e:  # noqa: BLE001 - reported
        return label, f"{type(e).__name__}: {str(e)[-300:]}", {}
    return label, None, dict(
        setmaxnreg=sorted(set(re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx))),
        waits=sorted(set(re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx))))


def _cudnn(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def _alternate(fns: dict, rounds: int) -> dict:
    """Median ms of each closure over alternating rounds (the order flips every round)."""
    times = {n: [] for n in fns}
    for r in range(rounds):
        for n in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            times[n].append(triton.testing.do_bench(fns[n], warmup=25, rep=100))
    return {n: (sorted(ts)[len(ts) // 2], ts) for n, ts in times.items()}


def dense(rounds: int) -> list:
    import min_fwd
    import spattn
    rows = []
    for name, H, Lq, Lk in (("full, 16 heads, 16K", 16, 16384, 16384),
                            ("full, 24 heads, 65536 x 6400 keys", 24, 65536, 6400)):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, H, L, 128, device="cuda", dtype=torch.bfloat16, generator=g)
                   for L in (Lq, Lk, Lk))
        ref = _cudnn(q, k, v).float()
        pat = spattn.compile("full")
        plan = pat.plan(q, k, v)
        fns = {"cuDNN": lambda: _cudnn(q, k, v),
               "spattn (full plan)": lambda: pat(q, k, v, plan=plan),
               "Triton minimal 128x128 w8 s3": min_fwd.launch(q, k, v, min_fwd.CONFIGS[0], False)}
        for cfg in SP_CONFIGS:
            fns["gluon " + cfg[0]] = sp_launch(q, k, v, cfg)
        for cfg in WS_CONFIGS:
            run = ws_launch(q, k, v, cfg)
            fns["gluon " + cfg[0]] = (lambda run=run: run()[0])
        for n, fn in list(fns.items()):
            err = (fn().float() - ref).abs().max().item()
            print(f"{name}: {n} max error {err:.3g}", flush=True)
            if not err < 3e-2:
                del fns[n]
        flops = 4 * 128 * H * Lq * Lk
        times = _alternate(fns, rounds)
        base = times["cuDNN"][0]
        for n, (t, ts) in times.items():
            rows.append(dict(case=name, kernel=n, ms=t, tflops=flops / t / 1e9,
                             of_cudnn_rate=base / t, rounds=ts))
    return rows


#: the strided problems of #21: (name, grid, window, stride)
LAYOUT_CASES = [("FLUX 256x256, window 80x80, stride 16x16", (256, 256), (80, 80), (16, 16)),
                ("Hunyuan 30x48x80, window 18x24x24, stride 16x8x8", (30, 48, 80), (18, 24, 24),
                 (16, 8, 8))]


def layout_lists(pat, N: int, device):
    """``(layout, order, inverse, (START, COUNT, COLS), FULL tiles, PARTIAL tiles)`` of the
    layout spattn chooses for ``pat`` at ``N`` tokens (128 x 128 tiles), its non-EMPTY key
    tiles per query tile."""
    import spattn
    from spattn.ir.layout import choose
    r = choose(pat.ir, N, N, 0, block_m=128, block_n=128, force=True)
    order, inverse = r.layout.permutation(device)
    P = r.layout.padded_size
    tiles = spattn.Pattern(r.ir, name="slots").tiles(P, P, 128, 128)[0, 0]
    full, partial = int((tiles == 2).sum()), int((tiles == 1).sum())
    nz = tiles != 0
    count = nz.sum(1).to(torch.int32)
    start = torch.cumsum(count, 0, dtype=torch.int32) - count
    cols = nz.nonzero()[:, 1].to(torch.int32)
    return (r.layout, order, inverse, tuple(x.to(device) for x in (start, count, cols)), full,
            partial)


def _three(sides) -> tuple:
    return (1,) * (3 - len(sides)) + tuple(sides)


def layouts(rounds: int) -> list:
    import spattn
    rows = []
    cfg = WS_CONFIGS[2]
    for name, shape, window, stride in LAYOUT_CASES:
        H, N = 24, 1
        for n in shape:
            N *= n
        pat = spattn.neighborhood(shape, window, stride=stride)
        lay, order, inverse, lists, full, partial = layout_lists(pat, N, "cuda")
        P = order.numel()
        box = lay.box_by_axis()
        plain = P == N and len(lay.virtual) == len(shape) and tuple(lay.box) == box
        print(f"{name}: {lay}; {P} slots, {full} FULL and {partial} PARTIAL tiles", flush=True)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, H, N, 128, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(3))
        qs, ks, vs = (t[:, :, order] for t in (q, k, v))
        run = ws_launch(qs, ks, vs, cfg, lists)

        def gluon(run=run):
            for t, s in ((q, qs), (k, ks), (v, vs)):
                torch.index_select(t, 2, order, out=s)
            return run()[0][:, :, inverse]
        plan = pat.plan(q, k, v)
        fns = {"cuDNN dense": lambda: _cudnn(q, k, v),
               "spattn": lambda: pat(q, k, v, plan=plan),
               "gluon, copies into the layout (timed)": gluon,
               "gluon kernel alone (tensors in the layout)": lambda run=run: run()[0]}
        if plain:
            run_box = ws_launch(q, k, v, cfg, lists, box=(_three(shape), _three(box)))
            fns["gluon, boxes through 4-D TMA (no copies)"] = lambda run=run_box: run()[0]
        want = fns["spattn"]().float()
        for n in [n for n in fns if n.startswith("gluon") and "alone" not in n]:
            err = (fns[n]().float() - want).abs().max().item()
            print(f"{name}: {n}: max difference from spattn {err:.3g}", flush=True)
            if partial or not err < 3e-2:
                rows.append(dict(case=name, kernel=n, error=f"partial {partial}, err {err}"))
                del fns[n]
        times = _alternate(fns, rounds)
        base = times["cuDNN dense"][0]
        for n, (t, ts) in times.items():
            rows.append(dict(case=name, kernel=n, ms=t, over_cudnn=base / t, rounds=ts))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dense", action="store_true")
    ap.add_argument("--layouts", action="store_true")
    ap.add_argument("--compile-only", action="store_true",
                    help="compile every configuration for sm_90a here (no GPU)")
    a = ap.parse_args(argv)
    if a.compile_only:
        for label, err, facts in compile_report():
            print(f"{label:34s} " + (f"ERROR {err}" if err else f"OK {facts}"), flush=True)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    t0 = time.time()
    rows = (dense(a.rounds) if a.dense else []) + (layouts(a.rounds) if a.layouts else [])
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "gluon_fwd.json"), "w") as f:
            json.dump(dict(torch=torch.__version__, triton=triton.__version__,
                           device=torch.cuda.get_device_name(), rows=rows,
                           seconds=time.time() - t0), f, indent=1)
    print(f"{'case':52s} {'kernel':40s} {'ms':>8s} {'TF/s':>7s} {'ratio':>7s}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:52s} {r['kernel']:40s} {r['error']}")
            continue
        ratio = r.get("of_cudnn_rate", r.get("over_cudnn"))
        print(f"{r['case']:52s} {r['kernel']:40s} {r['ms']:8.3f} "
              f"{r.get('tflops', float('nan')):7.1f} {ratio:7.3f}")


if __name__ == "__main__":
    main()
