"""The warp-specialised forward: FlashAttention-3's structure on Hopper, written in Gluon.

The generated forward (``codegen/templates/fwd.py.j2``) is written in Triton's language,
whose compiler keeps every warp of a program in one partition: on an H100 or H200 it
reaches 84% of cuDNN's dense rate however its loop is written (benchmarks/RESULTS.md,
"FlashAttention-3's forward structure in Gluon"). Gluon, Triton's explicit layer, lets a
kernel name its partitions, barriers and asynchronous products; this module's kernel is
FlashAttention-3's forward in it:

* a loader partition (one warp group, 24 registers a thread) fills a ring of ``STAGES``
  shared-memory slots with K and V tiles through TMA, each slot guarded by a ready and an
  empty mbarrier, and reads the program's key tiles from a list;
* two consumer warp groups of 64 query rows each (240 registers) share the slots and
  take turns issuing their products (ping-pong: one group's softmax runs while the other's
  products hold the tensor cores), each turn's S issued before its P V, so that the
  softmax overlaps the group's own P V as well.

The kernel evaluates no pattern: a key tile is FULL, or PARTIAL with its 128 x 128 mask
materialised by the analysis at plan time (:func:`key_lists`, :func:`tile_masks`: the
pattern's IR evaluated at the tile's positions) and read by the consumers, or, where every
row of every PARTIAL tile allows one run of keys (causal, windows, documents, chunks), only
each row's run (:func:`tile_runs`: 4 bytes a row instead of 128). It suits the
patterns whose PARTIAL tiles are few: dense attention, long causal masks, masks aligned to
128 (block-diagonal, documents cut at multiples of 128), and the strided neighbourhoods in
their token layouts (every tile FULL: docs/layouts.md). A call with more than
:data:`MAX_MASKS` PARTIAL tiles keeps the generated forward, which evaluates its mask in
registers. Q, K, V and O are read and
written through 5-D TMA descriptors: a layout's boxes of the caller's tokens
(:class:`~spattn.runtime.triton_backend.BoxRows`, no copies) or runs of 128 rows (any
lengths: TMA fills the rows past the end with zeros and drops them on the store, and the
last key tile's mask stops at the keys' end). The lse is written in the caller's token
order, so the generated backward runs on it unchanged; rows with no allowed key give O = 0
and lse = -inf. An additive score (:func:`~spattn.ir.score.additive`: ALiBi, terms of the
key or the query alone) is applied from vectors evaluated at plan time
(:func:`score_vectors`): a ``[128]`` vector per key tile added to S, the rows' terms to the
lse; a capped one (:func:`~spattn.ir.score.capped`: softcapping) as ``tanh`` of every
pair's scaled q·k before the mask, the cap folded into the softmax's scale (its backward is
the generated kernels'). :func:`why_not` lists what the kernel does not run (the plan then
builds the generated forward): other devices, dtypes and head dimensions, other scores, options or
``SPATTN_*`` settings that fix the generated forward's configuration.

``SPATTN_WS_FWD`` (``auto`` / ``1`` / ``0``) chooses: ``1`` wherever it can run, ``0``
never, ``auto`` for calls of at least :data:`MIN_WORK` computed tiles, at most
:data:`MAX_PARTIAL_SHARE` of them PARTIAL. Below that much work the generated forward is
faster (``full`` at 1K tokens: 26 us against 54, with both launches bound,
:class:`GluonLaunches`; what remains is the kernel's start and its four descriptors
encoded at every launch, not measured apart); beyond that share the
masks' reads cost more than the kernel gains (timed with 128 x 128 masks; the rows' runs
bring documents at random cuts to 1.04x in one measurement, not enough to move the
share, :data:`MAX_RUNS_SHARE`). docs/backends.md, "The warp-specialised forward".
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ..dsl.errors import SpattnBackendError
from ..ir.score import Capped
from . import tune as _tune
from .settings import launch_guard

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_init,
        warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    GLUON = True
except ImportError:             # a Triton without Gluon's Hopper modules: never chosen
    GLUON = False

#: The kernel's tiles: 128 query rows (two warp groups of 64) by 128 keys.
TILE = 128
#: The computed 128 x 128 tiles (over batch and heads) from which ``SPATTN_WS_FWD=auto``
#: takes the kernel. Timed on an H100 (benchmarks/RESULTS.md, "The warp-specialised
#: forward in spattn"): ``full`` at 1K tokens and 16 heads (1024 tiles) takes 1.7x the
#: generated forward's time, at 2K (4096 tiles) 0.79x, at 16K 0.76x; with its launches
#: bound (:class:`GluonLaunches`, "bound launches of the Gluon kernels") 2.1x at 1K, 0.75x
#: at 2K.
MIN_WORK = 4096
#: The most key tiles per work item with which equal items run in persistent programs (one
#: per SM, taking items in turn: the next item's loads overlap this one's last tiles and
#: its O store). Timed on two H100s against a program per item (benchmarks/RESULTS.md,
#: "persistent programs in the warp-specialised forward"): items of 8-32 key tiles
#: 1.02-1.37x, FLUX stride (50) 1.01-1.03x, Hunyuan stride (81) 0.97-0.99x, ``full`` at
#: 16K (128) 0.99x.
PERSISTENT_MAX_TILES = 64
#: K/V slots of the loader's ring, and the consumers' registers (``setmaxnreg``).
STAGES = 2
CONSUMER_REGS = 240


if GLUON:
    @gluon.jit
    def _at(i_c, p0, p1, T1, T2, half_smem, box_smem, i_h: gl.constexpr):
        """The 5-D TMA coordinates of tile ``i_c`` (row-major over ``T0 x T1 x T2`` boxes)
        of the (batch, head) slice at ``(p0, p1)``: the whole box (``i_h`` 2, a key tile) or
        its half ``i_h`` (a consumer's 64 query rows, the outer axis cut)."""
        b0: gl.constexpr = box_smem.type.shape[2]
        b1: gl.constexpr = box_smem.type.shape[3]
        b2: gl.constexpr = box_smem.type.shape[4]
        h0: gl.constexpr = half_smem.type.shape[2]
        h1: gl.constexpr = half_smem.type.shape[3]
        h2: gl.constexpr = half_smem.type.shape[4]
        o0 = (i_c // (T1 * T2)) * b0
        o1 = ((i_c // T2) % T1) * b1
        o2 = (i_c % T2) * b2
        if i_h < 2:
            if h0 < b0:
                o0 = o0 + i_h * h0
            elif h1 < b1:
                o1 = o1 + i_h * h1
            else:
                o2 = o2 + i_h * h2
        return [p0, p1 + o0, o1, o2, 0]

    @gluon.jit
    def _work(geom, i_w):
        """Work item ``i_w``'s ``(b * H + h, query tile, its list entry, q's and k's slice
        coordinates)``."""
        H, G, n_m, LB, LH, FOLD = geom[0], geom[1], geom[2], geom[3], geom[4], geom[5]
        i_bh = i_w // n_m
        i_t = i_w % n_m
        i_b = i_bh // H
        i_h = i_bh % H
        i_l = i_b * LB + i_h * LH + i_t
        # FOLD: [B * heads, A0, A1, A2, D] views; else [B, heads, A1, A2, D] (A0 = 1)
        i_k = i_b * (H // G) + i_h // G
        q_p = (FOLD * i_bh + (1 - FOLD) * i_b, (1 - FOLD) * i_h)
        k_p = (FOLD * i_k + (1 - FOLD) * i_b, (1 - FOLD) * (i_h // G))
        return i_bh, i_t, i_l, q_p, k_p

    @gluon.jit
    def _load(q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, bars, LSE, START,
              COUNT, COLS, MIDX, MASKS, geom, sm_scale_log2, score, flags):
        """The loader partition: for each of the program's work items, the two halves of Q
        into the item's Q buffer (of two, each half refilled once its consumer stored the
        O it held), then the item's key tiles' K and V into the ring of slots, each slot
        refilled once both consumers released it. The ring and the Q buffers run on from
        one item to the next, so the next item's loads overlap this one's last tiles."""
        b_q, q_empty, k_ready, k_empty, v_ready, v_empty, pp_bar = bars
        QT1, QT2, KT1, KT2, N_WORK = geom[6], geom[7], geom[8], geom[9], geom[13]
        it = 0
        n = 0
        for i_w in range(gl.program_id(0), N_WORK, gl.num_programs(0)):
            i_bh, i_t, i_l, q_p, k_p = _work(geom, i_w)
            for i_h in gl.static_range(2):
                i_q = (n % 2) * 2 + i_h
                mbarrier.wait(q_empty.index(i_q), ((n // 2) & 1) ^ 1)
                mbarrier.expect(b_q.index(i_q), q_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(
                    q_desc, _at(i_t, q_p[0], q_p[1], QT1, QT2, q_smem, k_smem, i_h),
                    b_q.index(i_q), q_smem.index(i_q))
            it = _load_keys(k_desc, v_desc, q_smem, k_smem, v_smem, k_ready, k_empty,
                            v_ready, v_empty, START, COUNT, COLS, i_l, k_p, KT1, KT2, it)
            n += 1

    @gluon.jit
    def _load_keys(k_desc, v_desc, q_smem, k_smem, v_smem, k_ready, k_empty, v_ready,
                   v_empty, START, COUNT, COLS, i_l, k_p, KT1, KT2, it):
        """A loader's key tiles of list entry ``i_l``: each tile's K, then its V, into the
        ring's next slot (from ``it``, the ring's count so far, returned advanced), each
        slot's K and V refilled once both consumers released them."""
        STAGES: gl.constexpr = k_smem.type.shape[0]
        o_list = gl.load(START + i_l)
        n_n = gl.load(COUNT + i_l)
        for j in range(n_n):
            i_s = it % STAGES
            phase = (it // STAGES) & 1
            i_c = gl.load(COLS + o_list + j)
            o_k = _at(i_c, k_p[0], k_p[1], KT1, KT2, q_smem, k_smem, 2)
            mbarrier.wait(k_empty.index(i_s), phase ^ 1)
            mbarrier.expect(k_ready.index(i_s), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, o_k, k_ready.index(i_s),
                                            k_smem.index(i_s))
            mbarrier.wait(v_empty.index(i_s), phase ^ 1)
            mbarrier.expect(v_ready.index(i_s), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, o_k, v_ready.index(i_s),
                                            v_smem.index(i_s))
            it += 1
        return it

    @gluon.jit
    def _softmax(b_s, b_m, b_l, sm_scale_log2, MASKED: gl.constexpr):
        """One key tile of the online softmax in log2 units: P, the rescale of the running
        sums, the new row maxima and sums. ``MASKED``: a row with no allowed key so far
        keeps its maximum at -inf and its sum at 0 (its P and rescale 0, never NaN)."""
        b_m_new = gl.maximum(b_m, gl.max(b_s, 1) * sm_scale_log2)
        b_m_use = b_m_new
        if MASKED:
            b_m_use = gl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_alpha = gl.exp2(b_m - b_m_use)
        b_p = gl.exp2(b_s * sm_scale_log2 - gl.expand_dims(b_m_use, 1))
        b_l = b_l * b_alpha + gl.sum(b_p, 1)
        return b_p, b_alpha, b_m_new, b_l

    @gluon.jit
    def _run_words(MASKS, i_m, o_r):
        """The rows' runs of PARTIAL tile ``i_m`` (any tile index where the tile is FULL:
        the words are then not used) at rows ``o_r``, one int32 word a row (``lo | hi <<
        16``, ``MASKS`` int16 ``[n, 128, 2]``): loaded before the tile's products, so that
        their latency lies under the waits."""
        p_w = MASKS.to(gl.pointer_type(gl.int32)) + gl.maximum(i_m, 0).to(gl.int64) * 128
        return gl.load(p_w + o_r)

    @gluon.jit
    def _masked(b_s, MASKS, i_m, b_w, HALF: gl.constexpr, MASKED: gl.constexpr):
        """S of a PARTIAL tile with its disallowed pairs at -inf, rows ``[64 * HALF, +64)``
        of the tile: ``MASKED`` 1, by the tile's mask ``MASKS[i_m]`` (uint8 ``[128,
        128]``); 2, by each row's run of allowed keys, the words ``b_w`` of
        :func:`_run_words` (``MASKS[i_m, row] = (lo, hi)``, int16 ``[128, 2]``: the keys
        ``lo <= c < hi`` of the tile)."""
        s_layout: gl.constexpr = b_s.type.layout
        o_c = gl.arange(0, 128, layout=gl.SliceLayout(0, s_layout))
        if MASKED == 1:
            o_r = gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout)) + HALF * 64
            p_m = MASKS + i_m.to(gl.int64) * 16384 + gl.expand_dims(o_r * 128, 1) \
                + gl.expand_dims(o_c, 0)
            m_ok = gl.load(p_m) != 0
        else:
            o_c2 = gl.expand_dims(o_c, 0)
            m_ok = (o_c2 >= gl.expand_dims(b_w & 0xFFFF, 1)) \
                & (o_c2 < gl.expand_dims(b_w >> 16, 1))
        return gl.where(m_ok, b_s, float("-inf"))

    @gluon.jit
    def _score_cols(p_sc, COLS, START, i_l, j, b_a, b_ac, o_r0, col_s: gl.constexpr,
                    KEYS: gl.constexpr):
        """An additive score's terms of key tile ``j`` of list entry ``i_l`` (log2 units,
        ``[128]``): the slope ``b_a`` times the offset ``k - r`` from the item's first query
        ``r`` (exact in ints, small where the softmax is not 0; ``b_ac``: the slope times
        the tile's columns, once per item, so the tile adds one scalar), plus (``KEYS``)
        the keys' terms, loaded."""
        o_k0 = gl.load(COLS + gl.load(START + i_l) + j) * 128
        b_c = b_ac + b_a * (o_k0 - o_r0).to(gl.float32)
        if KEYS:
            b_c += gl.load(p_sc + o_k0 + gl.arange(0, 128, layout=col_s))
        return b_c

    @gluon.jit
    def _tanh(x):
        """tanh of fp32 ``x`` as one ``tanh.approx.f32`` (maximum relative error about
        2**-10.7, as the generated kernels' ``fast_tanh``: for 16-bit inputs)."""
        return gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x],
                                         dtype=gl.float32, is_pure=True, pack=1)

    @gluon.jit
    def _score_rows(score, i_bh, H, o_r0, o_tok, m_tok, b_a):
        """An additive score's terms of the query alone at the rows' tokens ``o_tok`` (log2
        units): the slope's part ``b_a * (r - q)`` left out of the pairs, plus the rows'
        terms; they shift the row's lse."""
        o_q = o_tok + score[7]
        p_sr = score[2] + (i_bh // H) * score[5] + (i_bh % H) * score[6] + o_tok
        return b_a * (o_r0 - o_q).to(gl.float32) + gl.load(p_sr, mask=m_tok, other=0.0)

    @gluon.jit
    def _tile(smem, i_s):
        """Slot ``i_s`` of a ring of boxes as a ``[cells, D]`` operand (the box's cells in
        row-major order are the tile's rows)."""
        t = smem.index(i_s)
        D: gl.constexpr = smem.type.shape[5]
        return t.reshape([t.numel // D, D])

    @gluon.jit
    def _consume(q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, bars, LSE, START,
                 COUNT, COLS, MIDX, MASKS, geom, sm_scale_log2, score, flags,
                 HALF: gl.constexpr):
        """A consumer warp group: for each of the program's work items, query rows
        ``[64 * HALF, +64)`` of its tile against its key tiles; O stored through its Q
        slot, the lse in the caller's order. The flags are ``flags``' shape (:func:`_flags`).
        ``MASKED`` (1: masks, 2: runs, :func:`_masked`): some tiles are PARTIAL (read, rows
        without an allowed key guarded); 0: every tile is FULL and none of that is compiled.
        ``SCORED``: an additive score (:func:`_score_cols`, :func:`_score_rows`) on every
        pair, 1 its slope alone (no loads per tile), 2 with terms of the key (loaded before
        the tile's wait); 3 a capped score (:class:`~spattn.ir.score.Capped`): ``tanh`` of
        every pair's q·k times ``score[8]``, before the mask, the cap the softmax's scale
        ``sm_scale_log2``. The ring's slot (``it``) and the ping-pong's turn (``tt``) count on
        across items, as the loader's and the other group's do."""
        b_q, q_empty, k_ready, k_empty, v_ready, v_empty, pp_bar = bars
        MASKED: gl.constexpr = (flags.type.shape[0] >= 2) + (flags.type.shape[0] >= 4)
        SCORED: gl.constexpr = ((flags.type.shape[1] >= 2) + (flags.type.shape[1] >= 4)
                                + (flags.type.shape[1] >= 8))
        ADDED: gl.constexpr = (SCORED > 0) & (SCORED < 3)
        CAPPED: gl.constexpr = SCORED == 3
        D: gl.constexpr = k_smem.type.shape[5]
        STAGES: gl.constexpr = k_smem.type.shape[0]
        BLOCK_M: gl.constexpr = 64
        BLOCK_N: gl.constexpr = k_smem.numel // (STAGES * D)
        gl.static_assert(q_smem.numel == 4 * BLOCK_M * D)       # two buffers of two halves
        gl.static_assert(BLOCK_N == 128)
        QT1, QT2, QA1, QA2, QN = geom[6], geom[7], geom[10], geom[11], geom[12]
        N_WORK = geom[13]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout,
                                                     k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        h1: gl.constexpr = q_smem.type.shape[3]
        h2: gl.constexpr = q_smem.type.shape[4]
        b_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        o_rh = gl.arange(0, BLOCK_M, layout=row_s) + HALF * BLOCK_M     # the group's rows
        b_w = gl.zeros([BLOCK_M], gl.int32, row_s)      # (MASKED 1: no runs)
        it = 0
        tt = 0
        n = 0
        for i_w in range(gl.program_id(0), N_WORK, gl.num_programs(0)):
            i_bh, i_t, i_l, q_p, k_p = _work(geom, i_w)
            n_n = gl.load(COUNT + i_l)
            i_q = (n % 2) * 2 + HALF
            q_half = q_smem.index(i_q)
            q_s = q_half.reshape([BLOCK_M, D])
            b_m = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
            b_l = gl.zeros([BLOCK_M], gl.float32, row_s)
            b_o = warpgroup_mma_init(gl.zeros([BLOCK_M, D], gl.float32, o_layout))
            if ADDED:
                i_b = i_bh // geom[0]
                b_a = gl.load(score[0] + i_bh)
                o_r0 = i_t * 128 + score[7]         # the item's first query position
                b_ac = b_a * gl.arange(0, 128, layout=col_s).to(gl.float32)
                p_sc = score[1] + i_b * score[3] + (i_bh % geom[0]) * score[4]
            mbarrier.wait(b_q.index(i_q), (n // 2) & 1)

            # stage 1: the first key tile's S, in this group's first turn (each tile's mask
            # index is loaded before the waits, its latency under them)
            if MASKED:
                o_list = gl.load(START + i_l)
                i_m = gl.load(MIDX + o_list)
                if MASKED == 2:
                    b_w = _run_words(MASKS, i_m, o_rh)
                i_mn = gl.load(MIDX + o_list + gl.minimum(1, n_n - 1))
            i_s = it % STAGES
            if SCORED == 2:
                b_c = _score_cols(p_sc, COLS, START, i_l, 0, b_a, b_ac, o_r0, col_s, True)
            mbarrier.wait(k_ready.index(i_s), (it // STAGES) & 1)
            mbarrier.wait(pp_bar.index(HALF), (tt & 1) ^ HALF ^ 1)
            b_s = warpgroup_mma(q_s, _tile(k_smem, i_s).permute((1, 0)), b_zero,
                                use_acc=False, is_async=True)
            mbarrier.arrive(pp_bar.index(1 - HALF))
            b_s = warpgroup_mma_wait(0, deps=(b_s,))
            mbarrier.arrive(k_empty.index(i_s))
            if CAPPED:
                b_s = _tanh(b_s * score[8])
            if MASKED:
                if i_m >= 0:
                    b_s = _masked(b_s, MASKS, i_m, b_w, HALF, MASKED)
            if SCORED == 1:
                b_c = _score_cols(p_sc, COLS, START, i_l, 0, b_a, b_ac, o_r0, col_s, False)
            if ADDED:
                b_s = b_s * score[8] + gl.expand_dims(b_c, 0)
                b_p, b_alpha, b_m, b_l = _softmax(b_s, b_m, b_l, 1.0, MASKED)
            else:
                b_p, b_alpha, b_m, b_l = _softmax(b_s, b_m, b_l, sm_scale_log2, MASKED)
            b_pd = gl.convert_layout(b_p.to(q_desc.dtype), p_layout)

            # stage 2: turns of (S of tile j, P V of tile j - 1); the softmax of tile j
            # overlaps the P V in flight and the other group's turn
            for j in range(1, n_n):
                i_s = (it + j) % STAGES
                i_sp = (it + j - 1) % STAGES
                if MASKED:      # (this tile's runs, and the next tile's index, loaded
                    i_m = i_mn  # ahead of the waits)
                    if MASKED == 2:
                        b_w = _run_words(MASKS, i_m, o_rh)
                    i_mn = gl.load(MIDX + o_list + gl.minimum(j + 1, n_n - 1))
                if SCORED == 2:
                    b_c = _score_cols(p_sc, COLS, START, i_l, j, b_a, b_ac, o_r0, col_s, True)
                mbarrier.wait(k_ready.index(i_s), ((it + j) // STAGES) & 1)
                mbarrier.wait(v_ready.index(i_sp), ((it + j - 1) // STAGES) & 1)
                mbarrier.wait(pp_bar.index(HALF), ((tt + j) & 1) ^ HALF ^ 1)
                b_s = warpgroup_mma(q_s, _tile(k_smem, i_s).permute((1, 0)), b_zero,
                                    use_acc=False, is_async=True)
                b_o = warpgroup_mma(b_pd, _tile(v_smem, i_sp), b_o, is_async=True)
                mbarrier.arrive(pp_bar.index(1 - HALF))
                b_s = warpgroup_mma_wait(1, deps=(b_s,))
                mbarrier.arrive(k_empty.index(i_s))
                if CAPPED:
                    b_s = _tanh(b_s * score[8])
                if MASKED:
                    if i_m >= 0:
                        b_s = _masked(b_s, MASKS, i_m, b_w, HALF, MASKED)
                if SCORED == 1:
                    b_c = _score_cols(p_sc, COLS, START, i_l, j, b_a, b_ac, o_r0, col_s, False)
                if ADDED:
                    b_s = b_s * score[8] + gl.expand_dims(b_c, 0)
                    b_p, b_alpha, b_m, b_l = _softmax(b_s, b_m, b_l, 1.0, MASKED)
                else:
                    b_p, b_alpha, b_m, b_l = _softmax(b_s, b_m, b_l, sm_scale_log2, MASKED)
                b_o = warpgroup_mma_wait(0, deps=(b_o,))
                mbarrier.arrive(v_empty.index(i_sp))
                b_pd = gl.convert_layout(b_p.to(q_desc.dtype), p_layout)
                b_o = warpgroup_mma_init(
                    b_o * gl.expand_dims(gl.convert_layout(b_alpha, row_o), 1))
            i_s = (it + n_n - 1) % STAGES
            mbarrier.wait(v_ready.index(i_s), ((it + n_n - 1) // STAGES) & 1)
            mbarrier.wait(pp_bar.index(HALF), ((tt + n_n) & 1) ^ HALF ^ 1)
            b_o = warpgroup_mma(b_pd, _tile(v_smem, i_s), b_o, is_async=True)
            mbarrier.arrive(pp_bar.index(1 - HALF))
            b_o = warpgroup_mma_wait(0, deps=(b_o,))
            mbarrier.arrive(v_empty.index(i_s))

            # stage 3: normalise, store O through the Q slot (no longer read) and the lse
            # at the caller's token of each row; the slot goes back to the loader once
            # the store has read it
            if MASKED:
                b_l_safe = gl.where(b_l == 0.0, 1.0, b_l)      # (rows without keys: O = 0)
            else:
                b_l_safe = b_l
            b_o = b_o / gl.expand_dims(gl.convert_layout(b_l_safe, row_o), 1)
            q_s.store(b_o.to(o_desc.dtype))
            fence_async_shared()
            o_q = _at(i_t, q_p[0], q_p[1], QT1, QT2, q_smem, k_smem, HALF)
            tma.async_copy_shared_to_global(o_desc, o_q, q_half)
            o_r = gl.arange(0, BLOCK_M, layout=row_s)
            a0 = o_q[1] - q_p[1] + o_r // (h1 * h2)
            a1 = o_q[2] + (o_r // h2) % h1
            a2 = o_q[3] + o_r % h2
            p_lse = LSE + i_bh.to(gl.int64) * QN + (a0 * QA1 + a1) * QA2 + a2
            if ADDED:
                b_m = b_m + _score_rows(score, i_bh, geom[0], o_r0,
                                        (a0 * QA1 + a1) * QA2 + a2, a2 < QA2, b_a)
            b_lse = (b_m + gl.log2(b_l_safe)) * 0.6931471805599453
            if MASKED:
                b_lse = gl.where(b_l == 0.0, float("-inf"), b_lse)
            gl.store(p_lse, b_lse, mask=a2 < QA2)       # (rows past a ragged end: none)
            tma.store_wait(pendings=0)
            mbarrier.arrive(q_empty.index(i_q))
            it += n_n
            tt += n_n + 1
            n += 1

    @gluon.jit
    def _consume0(q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, bars, LSE,
                  START, COUNT, COLS, MIDX, MASKS, geom, sm_scale_log2, score, flags):
        _consume(q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, bars, LSE, START,
                 COUNT, COLS, MIDX, MASKS, geom, sm_scale_log2, score, flags, 0)

    @gluon.jit
    def _consume1(q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, bars, LSE,
                  START, COUNT, COLS, MIDX, MASKS, geom, sm_scale_log2, score, flags):
        _consume(q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, bars, LSE, START,
                 COUNT, COLS, MIDX, MASKS, geom, sm_scale_log2, score, flags, 1)

    @gluon.jit
    def _flags(A: gl.constexpr, B: gl.constexpr):
        """The partitions' constexpr flags ``A``, ``B`` (0-3) as the shape ``[2^A, 2^B]`` of an
        unused buffer (Triton 3.6 passes a partition's arguments as values, constexprs
        included; a buffer's type reaches it whole; its shapes are powers of 2)."""
        return gl.allocate_shared_memory(gl.int8, [1 << A, 1 << B],
                                         gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))

    @gluon.jit
    def _ring(desc, n: gl.constexpr):
        """``n`` shared-memory slots of ``desc``'s block."""
        return gl.allocate_shared_memory(desc.dtype, [n] + desc.block_type.shape, desc.layout)

    @gluon.jit
    def attn_fwd_ws(q_desc, k_desc, v_desc, o_desc, LSE, START, COUNT, COLS, MIDX, MASKS,
                    H, G, n_m, LB, LH, FOLD, QT1, QT2, KT1, KT2, QA1, QA2, QN, N_WORK,
                    sm_scale_log2, SA, SC, SR, sc_b, sc_h, sr_b, sr_h, q_offset, s_mult,
                    STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, MASKED: gl.constexpr,
                    SCORED: gl.constexpr, num_warps: gl.constexpr):
        """``N_WORK`` work items of 128 query rows (one box of a layout, or 128 rows) of one
        (batch, head), item ``i_w = (b * H + h) * n_m + t``; a program takes the items
        ``program_id, + num_programs, ...`` (one each when the grid is ``N_WORK``, several
        when it is the SM count). Q, K, V, O through 5-D descriptors (``[B * heads, A0, A1,
        A2, D]`` views when ``FOLD``, else ``[B, heads, 1, A1, A2, D]``) whose blocks are a
        box (K, V) or half of one (Q, O); the query grid's boxes ``QT1 x QT2`` per outer
        slice, sides ``QA1 x QA2``, ``QN`` tokens; the key grid's boxes ``KT1 x KT2``;
        ``H`` query heads, ``G`` of them per key head. The key tiles of an item's list
        entry ``i = b * LB + h * LH + t``: ``COLS[START[i] : START[i] + COUNT[i]]`` (at
        least one), each FULL (``MIDX`` -1) or PARTIAL with its uint8 mask ``MASKS[MIDX]``
        ``[128, 128]``. The lse ``[B, H, QN]`` in the caller's order. ``SCORED``: an additive
        score (:class:`~spattn.ir.score.Additive`, :class:`ScoreVectors`) whose pair is
        ``s_mult`` times q·k plus ``SA[b * H + h]`` times ``k - q`` plus ``SC[b, h, k]``
        (strides ``sc_b``, ``sc_h``), its rows' terms ``SR[b, h, q]`` added to the lse;
        ``q_offset``: the first query's position. ``SCORED`` 3: a capped score, ``tanh``
        of ``s_mult`` times q·k, its cap ``sm_scale_log2``. The partitions read
        their tile shapes from the shared buffers' types (Triton 3.6 passes a partition's
        arguments as values, not constexprs)."""
        q_smem = _ring(q_desc, 4)           # two buffers of two halves
        k_smem = _ring(k_desc, STAGES)
        v_smem = _ring(v_desc, STAGES)
        b_q = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        pp_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(4):
            mbarrier.init(b_q.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=1)
        for i in gl.static_range(2):
            mbarrier.init(pp_bar.index(i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(v_empty.index(i), count=2)
        bars = (b_q, q_empty, k_ready, k_empty, v_ready, v_empty, pp_bar)
        geom = (H, G, n_m, LB, LH, FOLD, QT1, QT2, KT1, KT2, QA1, QA2, QN, N_WORK)
        score = (SA, SC, SR, sc_b, sc_h, sr_b, sr_h, q_offset, s_mult)
        args = (q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, bars, LSE, START,
                COUNT, COLS, MIDX, MASKS, geom, sm_scale_log2, score, _flags(MASKED, SCORED))
        gl.warp_specialize([(_load, args), (_consume0, args), (_consume1, args)],
                           [4, 4], [CONSUMER_REGS, CONSUMER_REGS])


# ---------------------------------------------------------------- host side

def why_not(call, q, k, v, options: dict | None, rows) -> str | None:
    """Why the warp-specialised forward does not run this call (``rows``: None, the
    plan's :class:`~spattn.runtime.triton_backend.RowTables` or ``BoxRows``), or None
    where it can, subject to its tiles (:func:`key_lists`): the device's rules
    (:func:`device_why_not`), then the call's (:func:`call_why_not`)."""
    return (device_why_not(call, q, call.settings.ws_fwd, "SPATTN_WS_FWD")
            or call_why_not(call, q, k, v, options, rows))


def device_why_not(call, q, flag: bool | None, name: str) -> str | None:
    """The device's rules of a Gluon Hopper kernel (this module's, ``runtime.ws_bwd``'s):
    its setting ``name`` not 0 (``flag``), Gluon's Hopper modules, a CUDA tensor outside
    the interpreter, an sm_90 GPU."""
    from . import cache
    if flag is False:
        return f"{name}=0"
    if not GLUON:
        return "this Triton has no Gluon Hopper modules"
    if call.settings.interpret or q.device.type != "cuda":
        return "not on a CUDA device"
    if (cache.capability(q.device) or (0, 0)) != (9, 0):
        return "not a Hopper GPU (sm_90)"
    return None


def call_why_not(call, q, k, v, options: dict | None, rows) -> str | None:
    """:func:`why_not`'s rules of the call itself (what a device does not change): the
    dtype, head dimension, score, options and settings, integer width, how the rows are
    reached, the lengths and the tensors' layout."""
    from .triton_backend import BoxRows, tma_ok
    s = call.settings
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"{q.dtype} (it runs bfloat16 and float16)"
    D = q.shape[-1]
    if D not in (64, 128) or k.shape[-1] != D or v.shape[-1] != D:
        return f"head dimension {D} (it runs 64 and 128)"
    why = score_why_not(call, rows, capped_ok=True)
    if why is not None:
        return why
    fixed = sorted(n for n in (options or {}) if n in _FIXING)
    if fixed:
        return f"the options fix the generated forward ({', '.join(fixed)})"
    if s.strategy or s.tiles_set("fwd") or s.tma is False:
        return "SPATTN_* settings fix the generated forward"
    if call.int64:
        return "64-bit offsets"
    if rows is not None and not isinstance(rows, BoxRows):
        return "rows through tables"
    if isinstance(rows, BoxRows):
        if rows.box[0] * rows.box[1] * rows.box[2] != TILE:
            return f"boxes {rows.box} of other than {TILE} cells"
        if any(a % b for a, b in zip(rows.shape, rows.box)):
            return "a grid its boxes do not divide"
        return None
    if min(call.Lq, call.Lk) < TILE:
        return f"fewer than {TILE} queries or keys"
    if not tma_ok(q, k, v):
        return "tensors TMA cannot read"
    return None


def score_why_not(call, rows, capped_ok: bool = False) -> str | None:
    """Why a Gluon kernel (this module's, ``runtime.ws_bwd``'s, ``runtime.ws_dq``'s) does
    not apply the call's score, or None where it has none or an additive one
    (:func:`~spattn.ir.score.additive`) over rows in sequence order, or (``capped_ok``: the
    forward) a capped one (:func:`~spattn.ir.score.capped`: softcapping, any rows)."""
    from ..ir.score import additive, capped
    score = getattr(call.pattern, "score", None)
    if score is None:
        return None
    if capped_ok and capped(score) is not None:
        return None
    if additive(score) is None:
        return ("a score that is not additive (its kernels add terms of k - q, k or q alone)"
                + (" or capped (c * tanh(f * s))" if capped_ok else ""))
    if rows is not None:
        return "a score in a layout's boxes or through row tables"
    return None


@dataclass
class ScoreVectors:
    """An additive score (:class:`~spattn.ir.score.Additive`) over a call, in log2 units, as
    the Gluon kernels read it: ``slopes`` fp32 ``[B, H]`` (the factor of ``k - q``),
    ``cols`` fp32 ``[B', H', Lk']`` (the keys' terms, zeros past ``Lk`` up to a multiple of
    128) and ``rows`` fp32 ``[B', H', Lq]`` (the queries' terms), ``B'``, ``H'`` 1 where the
    values do not vary with the batch element or the head; ``c`` the factor of ``s``. Zeros
    where the score has no such terms."""

    slopes: torch.Tensor
    cols: torch.Tensor
    rows: torch.Tensor
    c: float
    keys: bool = True           # the score has terms of the key (else ``cols`` is 0)

    def strides(self) -> tuple:
        """``(sc_b, sc_h, sr_b, sr_h)``: the batch and head strides of ``cols`` and ``rows``
        (0 along an axis of 1)."""
        return tuple(t.stride(i) if t.shape[i] > 1 else 0
                     for t in (self.cols, self.rows) for i in (0, 1))


def score_vectors(call, device) -> ScoreVectors | str | None:
    """The :class:`ScoreVectors` of the call's score (evaluated from its IR in float64),
    None for a call without a score, or a string saying why the kernels do not take them:
    a term that is not finite somewhere over the call (a row's ``-inf`` and the like stay
    with the generated kernels)."""
    from ..ir.evaluate import evaluate
    from ..ir.score import TILE_QUERY, additive
    B, H, Lq, Lk = call.B, call.H, call.Lq, call.Lk
    score = getattr(call.pattern, "score", None)
    if score is None:
        return None
    form = additive(score)
    lkp = -(-Lk // TILE) * TILE
    dev = call.analysis.device

    def ar(n, shape):
        return torch.arange(n, dtype=torch.int64, device=dev).view(shape)
    q = ar(Lq, (1, 1, Lq)) + call.positions.q_offset
    env = {"q": q, TILE_QUERY: q, "k": ar(Lk, (1, 1, Lk)), "h": ar(H, (1, H, 1)),
           "b": ar(B, (B, 1, 1)), "Lq": Lq, "Lk": Lk, "H": H}

    def values(node, n):
        if node is None:
            return torch.zeros((1, 1, n), dtype=torch.float64)
        v = torch.as_tensor(evaluate(node, env, call.inputs), dtype=torch.float64,
                            device=dev).cpu()
        v = v.reshape((1,) * (3 - v.dim()) + tuple(v.shape))
        # (the batch and head axes the values vary along: a runtime input [B, L] varies
        # with the batch element without the term naming b)
        return torch.broadcast_to(v, (B, H, n))[:v.shape[0], :v.shape[1]]
    a = values(form.slope, 1)
    c = values(form.cols, Lk)
    r = values(form.rows, Lq)
    if not all(bool(torch.isfinite(t).all()) for t in (a, c, r)):
        return "a score whose terms are not finite over the call"
    cols = torch.zeros((c.shape[0], c.shape[1], lkp), dtype=torch.float32)
    cols[..., :Lk] = c
    return ScoreVectors(torch.broadcast_to(a[..., 0], (B, H)).to(device, torch.float32)
                        .contiguous(), cols.to(device), r.to(device, torch.float32)
                        .contiguous(), form.c, form.cols is not None)


def fwd_score(call, device) -> ScoreVectors | Capped | str | None:
    """The forward's score of a call :func:`score_why_not` admits (``capped_ok``): its
    :class:`~spattn.ir.score.Capped` form (its cap a normal float32: the lowering refuses
    constants outside float32's range), else :func:`score_vectors`."""
    from ..ir.score import capped
    score = getattr(call.pattern, "score", None)
    cap = None if score is None else capped(score)
    return score_vectors(call, device) if cap is None else cap


#: Options that fix the generated forward's configuration (the plan then builds it): its
#: tuned fields (``runtime.tune.FIELDS``), the strategy and TMA.
_FIXING = _tune.FIELDS["fwd"] + ("strategy", "tma")


@dataclass
class KeyLists:
    """The tiles the kernel computes, per list entry ``i = b * LB + h * LH + t`` (batch
    element, head, query tile; ``LB``, ``LH`` 0 where every batch element or head has the
    same): key tiles ``cols[start[i] : start[i] + count[i]]``, ascending, each FULL
    (``midx`` -1) or PARTIAL with its mask ``masks[midx]`` (uint8 ``[128, 128]``: query
    rows by key columns, 0 where the pair is not allowed or past the keys' end).
    ``each``: the number of key tiles of every entry where all have the same (equal work
    items, which persistent programs can take in turn and stay balanced), else 0.
    ``n_partial``: how many tiles are PARTIAL (``midx`` >= 0).
    ``masks`` is int16 ``[n, 128, 2]`` instead where each row of each PARTIAL tile allows
    one run of keys: the run ``[lo, hi)`` of the tile's columns (:func:`tile_runs`)."""

    start: torch.Tensor
    count: torch.Tensor
    cols: torch.Tensor
    midx: torch.Tensor
    masks: torch.Tensor
    strides: tuple
    n_q: int
    each: int = 0
    n_partial: int = 0


def key_lists(call, setting: bool | None | str = "fwd", max_share: tuple = None,
              empty_row: str | None = "a query tile without keys"):
    """The :class:`KeyLists` of the call's non-EMPTY 128 x 128 tiles, or a string saying
    why the kernel does not run them: a query tile without keys, more than
    :data:`MAX_MASKS` PARTIAL tiles, or (``SPATTN_WS_FWD=auto``) fewer than
    :data:`MIN_WORK` tiles in all or a share of PARTIAL ones above
    :data:`MAX_PARTIAL_SHARE` (masks) or :data:`MAX_RUNS_SHARE` (rows' runs).
    ``setting``, ``max_share`` (masks', runs' shares) and ``empty_row`` (None: query tiles
    without keys are listed, empty): another kernel's rules over the same lists
    (``runtime.ws_dq``)."""
    from .tables import _demote_ragged, _pool
    ((fine_tile, fine),) = call.analysis.classes([(TILE, TILE)])
    cls = _demote_ragged(_pool(fine, fine_tile, (TILE, TILE), call.Lq, call.Lk), call.Lk,
                         TILE, 3)
    setting = call.settings.ws_fwd if setting == "fwd" else setting
    shares = (MAX_PARTIAL_SHARE, MAX_RUNS_SHARE) if max_share is None else max_share
    got = tile_lists(cls, call, setting, MAX_MASKS, MIN_WORK, shares, empty_row=empty_row)
    if isinstance(got, str):
        return got
    start, count, at, partial, midx, strides, least, most, n_partial = got
    runs = tile_runs(tile_masks(call, at[partial]))
    why = share_refusal(setting, n_partial, at.shape[0], runs.dtype == torch.int16, shares)
    if why is not None:
        return why
    return KeyLists(start, count, at[:, 3].to(torch.int32).contiguous(), midx, runs,
                    strides, cls.shape[2], least if least == most else 0, n_partial)


def share_refusal(setting: bool | None, n_partial: int, computed: int, runs: bool | None,
                  shares: tuple) -> str | None:
    """Why ``auto`` (``setting`` None) leaves a call of ``computed`` tiles, ``n_partial``
    of them PARTIAL, to the generated kernel, or None: a share of PARTIAL tiles above
    ``shares[1]`` where the kernel reads each row's run of a PARTIAL tile (``runs``), above
    ``shares[0]`` where it reads their masks (128 bytes a row, not 4); ``runs`` None (not
    yet known): above both."""
    share = shares[0] if runs is False else shares[1]
    if setting is not None or n_partial <= share * computed:
        return None
    read = "rows' runs" if runs else "masks"
    what = (f"their {read} read: auto takes {share:.0%}" if runs is not None else
            f"auto takes {share:.0%}" if shares[0] == shares[1] else
            f"auto takes {shares[1]:.0%} where rows' runs are read, {shares[0]:.0%} masks")
    return f"{int(n_partial)} of {int(computed)} tiles PARTIAL ({what})"


def tile_lists(cls: torch.Tensor, call, setting: bool | None, max_masks: int,
               min_work: int, max_share: tuple, empty_row: str | None = None):
    """The lists of a Gluon kernel's tiles (this module's, ``runtime.ws_bwd``'s) from tile
    classes ``cls`` ``[B', H', rows, cols]`` (a row: a list entry ``(b' * H' + h') * rows
    + row``; its non-EMPTY cols, ascending), or a string saying why the kernel does not run
    them: a row without a tile (where ``empty_row`` says so), more than ``max_masks``
    PARTIAL tiles, or (``setting`` auto, None) fewer than ``min_work`` tiles over the
    call's batch and heads or a share of PARTIAL ones above ``max_share[1]`` (the runs'
    share: the caller checks the masks' once it knows which the kernel reads,
    :func:`share_refusal`).

    Returns ``(start, count, at, partial, midx, strides, least, most, n_partial)``: int32
    list starts and lengths per entry; the tiles ``at`` ``[n, 4]`` (b', h', row, col) in
    list order and which of them are ``partial``; ``midx`` (int32, -1 FULL, else the
    PARTIAL tile's index); the entries' strides over ``(b, h)`` (0 where ``cls`` has one
    batch element or head); the fewest and most tiles of an entry; the PARTIAL count."""
    from .tables import EMPTY, PARTIAL
    count = (cls != EMPTY).sum(-1, dtype=torch.int32)           # [B', H', rows]
    n_partial, least, most, computed = torch.stack([(cls == PARTIAL).sum().float(),
                                                    count.min().float(), count.max().float(),
                                                    count.sum().float()]).tolist()
    if empty_row is not None and least < 1:
        return empty_row
    if n_partial > max_masks:
        return f"{int(n_partial)} PARTIAL tiles (their masks are kept up to {max_masks})"
    Bp, Hp, n_rows = count.shape
    tiles = computed * (call.B // Bp) * (call.H // Hp)
    if setting is None and tiles < min_work:
        return f"{int(tiles)} tiles in all (auto takes {min_work} or more)"
    why = share_refusal(setting, n_partial, computed, None, max_share)
    if why is not None:
        return why
    flat = count.reshape(-1)
    start = torch.cumsum(flat, 0, dtype=torch.int32) - flat
    at = (cls != EMPTY).nonzero()                               # [n, 4]: b', h', row, col
    partial = cls[at.unbind(1)] == PARTIAL
    midx = torch.full((at.shape[0],), -1, dtype=torch.int32, device=cls.device)
    midx[partial] = torch.arange(int(n_partial), dtype=torch.int32, device=cls.device)
    strides = ((Hp * n_rows) if Bp > 1 else 0, n_rows if Hp > 1 else 0)
    return (start.contiguous(), flat.contiguous(), at, partial, midx, strides, int(least),
            int(most), int(n_partial))


#: The share of PARTIAL tiles up to which ``SPATTN_WS_FWD=auto`` takes the kernel. Timed on
#: an H100 (benchmarks/RESULTS.md, "The warp-specialised forward in spattn"): causal at
#: 16K and 64K (1.5% and 0.4% PARTIAL) 1.17x and 1.25x the generated forward's speed, at
#: 4K (6%) 0.94x; documents at random cuts (42% and 99% of their tiles PARTIAL) 0.97x and
#: 0.88x. With the rows' runs (:func:`tile_runs`, one measurement of two rounds, "persistent
#: programs in the warp-specialised forward"): causal 4K 0.97x, 16K 1.24x, 20 documents
#: at random cuts 1.04x.
MAX_PARTIAL_SHARE = 0.05
#: The share of PARTIAL tiles up to which ``auto`` takes the kernel where it reads each
#: row's run of a PARTIAL tile (:func:`tile_runs`, loaded ahead of the tile's waits): the
#: masks' share until this forward is timed alone against the generated one (the runs
#: loaded ahead ran the forced forward 1.01-1.04x faster on documents at 16K, one A/B).
MAX_RUNS_SHARE = 0.05
#: PARTIAL tiles whose masks the kernel reads at most (16 KiB each: 64 MiB).
MAX_MASKS = 4096
#: Tiles whose masks are evaluated at once (their int64 intermediates: 128 KiB a tile).
_MASK_CHUNK = 256


def tile_masks(call, at: torch.Tensor, tile: tuple = (TILE, TILE),
               rows_end: bool = False) -> torch.Tensor:
    """uint8 ``[n, bm, bn]`` (``tile``): the call's mask on each tile of ``at`` ``[n, 4]``
    (batch element, head, query tile, key tile; 0 for a batch element or head the classes
    do not tell apart), evaluated from the pattern's IR at the tile's positions, 0 past
    the keys' end (and past the queries' end with ``rows_end``; the forward never reads
    those rows). At least one tile, so that the kernel always has a pointer."""
    from ..ir.evaluate import evaluate
    bm, bn = tile
    dev = call.analysis.device
    out = torch.zeros((max(1, at.shape[0]), bm, bn), dtype=torch.uint8, device=dev)
    rm = torch.arange(bm, device=dev, dtype=torch.int64)
    rn = torch.arange(bn, device=dev, dtype=torch.int64)
    node = getattr(call.pattern, "ir", call.pattern)
    for i in range(0, at.shape[0], _MASK_CHUNK):
        a = at[i:i + _MASK_CHUNK].to(dev, torch.int64)
        # rows past a ragged end are evaluated at the last one
        q = (a[:, 2, None] * bm + rm)[:, :, None]
        k = (a[:, 3, None] * bn + rn)[:, None, :]
        env = {"q": q.clamp(max=call.Lq - 1) + call.positions.q_offset,
               "k": k.clamp(max=call.Lk - 1), "h": a[:, 1, None, None],
               "b": a[:, 0, None, None], "Lq": call.Lq, "Lk": call.Lk, "H": call.H}
        m = torch.as_tensor(evaluate(node, env, call.inputs), device=dev) & (k < call.Lk)
        if rows_end:
            m = m & (q < call.Lq)
        out[i:i + a.shape[0]] = m.expand(a.shape[0], bm, bn)
    return out


def tile_runs(masks: torch.Tensor) -> torch.Tensor:
    """``masks`` (uint8 ``[n, rows, cols]``, ``cols`` at most 128) as each row's run of
    allowed columns, int16 ``[n, rows, 2]`` (``lo``, ``hi``: the columns ``lo <= c < hi``;
    ``0, 0`` for a row with none), where every row's allowed columns are one run; else
    ``masks`` itself. The kernels read a row's run as one int32 word, ``lo | hi << 16``."""
    m = masks.bool()
    w = m.shape[-1]
    cols = torch.arange(w, device=m.device, dtype=torch.int16)
    lo = torch.where(m, cols, w).amin(-1)
    hi = torch.where(m, cols + 1, 0).amax(-1)
    n = m.sum(-1, dtype=torch.int16)
    if not bool((n == (hi - lo).clamp(min=0)).all()):
        return masks
    lo = torch.where(n > 0, lo, 0)
    return torch.stack([lo, torch.where(n > 0, hi, 0)], -1).to(torch.int16).contiguous()


class WsFwdStage:
    """The forward stage of a call the warp-specialised kernel runs (:func:`build`):
    ``run(q, k, v) -> (o [B, H, N, D], lse fp32 [B, H, N])`` in the caller's order."""

    gluon = True
    kernel = attn_fwd_ws if GLUON else None

    def __init__(self, call, q, k, v, rows, lists, score: ScoreVectors | None = None):
        from .triton_backend import BoxRows, _persistent_programs, _scale_log2
        B, H, _, D = q.shape
        self.lists = lists
        (LB, LH), n_q = lists.strides, lists.n_q
        # q's and k's views: a layout's boxes, or rows as the grid (1, 1, L) in boxes of 128
        if rows is None:
            self.qg = BoxRows((1, 1, call.Lq), (1, 1, TILE), False)
            self.kg = BoxRows((1, 1, call.Lk), (1, 1, TILE), False)
        else:
            self.qg = self.kg = rows
        self.box = rows
        self.half = self.qg.sub(TILE // 2)      # a consumer's query rows: the outer axis cut
        N = self.qg.n
        self.out_shape = (B, H, N, D)
        self.n_q, self.n_tiles = n_q, int(lists.cols.numel())
        self.n_masks = lists.n_partial
        self.runs = lists.masks.dtype == torch.int16
        # short equal work items: persistent programs, one per SM, each taking items in
        # turn; else a program per item, the hardware balancing unequal ones
        self.n_work = B * H * n_q
        self.persistent = 0 < lists.each <= PERSISTENT_MAX_TILES and q.device.type == "cuda"
        self.grid = (_persistent_programs(call, self.n_work, 1, q.device) if self.persistent
                     else self.n_work,)
        gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
        self._layouts = {b: gl.NVMMASharedLayout.get_default_for([1, *b, D], gdt)
                         for b in (self.half, self.kg.box)}
        qt, kt = self.qg.tiles, self.kg.tiles
        self.score = score
        sm_scale_log2 = _scale_log2(call.scale)
        if score is None:       # (pointers never read)
            sc = (lists.count,) * 3 + (0,) * 5 + (1.0,)
        elif isinstance(score, Capped):
            sc = (lists.count,) * 3 + (0,) * 5 + (call.scale * score.f,)
            sm_scale_log2 = score.cap
        else:
            sc = (score.slopes, score.cols, score.rows, *score.strides(),
                  call.positions.q_offset, sm_scale_log2 * score.c)
        self.static = (lists.start, lists.count, lists.cols, lists.midx, lists.masks, H,
                       H // k.shape[1], n_q, LB, LH,
                       int(self.qg.fold), qt[1], qt[2], kt[1], kt[2], self.qg.shape[1],
                       self.qg.shape[2], N, self.n_work, sm_scale_log2, *sc)
        self.meta = dict(STAGES=STAGES, CONSUMER_REGS=CONSUMER_REGS,
                         MASKED=(2 if self.runs else 1) if self.n_masks else 0,
                         SCORED=(0 if score is None else 3 if isinstance(score, Capped)
                                 else 2 if score.keys else 1),
                         num_warps=4, maxnreg=168)
        self.aligned = True
        self.launches = GluonLaunches(self.kernel, self.meta)

    def _desc(self, t, grid, block: tuple):
        shape, strides, blk = grid.view(t, block)
        blk = blk + [t.shape[-1]]
        return descriptor(t, shape, strides, blk, self._layouts[block])

    def head(self, q, k, v):
        """The per-call arguments (the descriptors of q, k, v and a fresh o, then a fresh
        lse), o and lse."""
        o = torch.empty(self.out_shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(self.out_shape[:3], dtype=torch.float32, device=q.device)
        descs = (self._desc(q, self.qg, self.half), self._desc(k, self.kg, self.kg.box),
                 self._desc(v, self.kg, self.kg.box), self._desc(o, self.qg, self.half))
        return (*descs, lse), o, lse

    def args(self, q, k, v):
        head, o, lse = self.head(q, k, v)
        return (*head, *self.static), o, lse

    def run(self, q, k, v, tables=None, out_dtype=None):
        if out_dtype not in (None, q.dtype) or tables:
            raise SpattnBackendError("the warp-specialised forward writes o in q's dtype and "
                                     "reads no score tables (runtime.ws_fwd)")
        head, o, lse = self.head(q, k, v)
        self.launches(q.device, self.grid, head, self.static)
        return o, lse

    def __repr__(self) -> str:
        how = (f"boxes {self.qg.box} of the grid {self.qg.shape} through 5-D TMA"
               if self.box is not None else "rows through TMA")
        return (f"fwd attn_fwd_ws (Gluon, warp-specialised: a TMA loader and two consumer "
                f"warp groups in ping-pong): tiles {TILE}x{TILE}, {self.n_tiles} key tiles "
                f"({self.n_masks} PARTIAL, their {'row runs' if self.runs else 'masks'} "
                f"read) over "
                f"{self.lists.count.numel()} query-tile lists, {how}, grid {self.grid}"
                + (" (persistent)" if self.persistent else "")
                + ("" if self.score is None else ", a capped score (tanh per pair)"
                   if isinstance(self.score, Capped) else ", an additive score"))


def build(call, q, k, v, options, rows):
    """The warp-specialised forward stage of ``call``, compiled, or ``(None, why)`` where
    it does not run the call (:func:`why_not`, :func:`key_lists`) or Triton fails to
    build it (the plan then builds the generated forward and logs why)."""
    why = why_not(call, q, k, v, options, rows)
    if why is not None:
        return None, why
    lists = key_lists(call)
    if isinstance(lists, str):
        return None, lists
    score = fwd_score(call, q.device)
    if isinstance(score, str):
        return None, score
    try:
        stage = WsFwdStage(call, q, k, v, rows, lists, score)
        args, _, _ = stage.args(q, k, v)
        warm(stage.kernel, args, stage.grid, stage.meta)
    except Exception as e:  # noqa: BLE001 -- any failure leaves the generated forward
        return None, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return stage, None


#: The fields of Gluon's ``TensorDescriptor`` that :func:`descriptor` fills, in order.
DESCRIPTOR_FIELDS = ["base", "shape", "strides", "block_shape", "layout", "padding"]
_FAST_DESCRIPTOR = None


def descriptor(t, shape: list, strides: list, block: list, layout):
    """A Gluon ``TensorDescriptor`` of ``t``, made without the descriptor's own checks
    (rank, 16-byte base and strides, a power-of-two block, the layout's type: about 2 us of
    host time each, 13 a Gluon backward call) where its class has the fields this fills:
    the stages make descriptors only of tensors that pass those checks (``tma_ok``; the
    rows' vectors copied to 16 bytes where they are not; outputs allocated fresh), with
    their own blocks and layouts (``triton_backend._desc`` does the same for the generated
    kernels' descriptors)."""
    global _FAST_DESCRIPTOR
    if _FAST_DESCRIPTOR is None:
        from .triton_backend import fillable
        _FAST_DESCRIPTOR = fillable(TensorDescriptor, DESCRIPTOR_FIELDS)
    if not _FAST_DESCRIPTOR:
        return TensorDescriptor(t, shape, strides, block, layout)
    d = TensorDescriptor.__new__(TensorDescriptor)
    d.__dict__.update(base=t, shape=shape, strides=strides, block_shape=block, layout=layout,
                      padding="zero")
    return d


def launch_key(head: tuple):
    """How Triton's JIT specialises a Gluon launch's per-call ``head``
    (``triton_backend._launch_key``), a descriptor read from its fields (its base's dtype,
    its block, layout and padding: what the JIT's key string holds) rather than through the
    JIT's specialiser, which formats the layout into that string (~1.6 us a descriptor).
    None where Triton does not expose its specialiser."""
    from .triton_backend import _launch_key
    rest = _launch_key(tuple(a for a in head if type(a) is not TensorDescriptor))
    if rest is None:
        return None
    return rest + (tuple((a.base.dtype, tuple(a.block_shape), a.layout, a.padding)
                         for a in head if type(a) is TensorDescriptor),)


class GluonLaunches:
    """A Gluon kernel's launches for one stage: the first of each specialisation through
    the JIT (``kernel[grid](...)``, which binds the 20-40 arguments, specialises each and
    builds a cache key that holds the descriptors' layouts), the later ones through a
    :class:`~spattn.runtime.triton_backend.BoundLaunch` of that first one. The
    arguments after ``head`` are the stage's own; a launch is keyed by its grid (which a
    stage's caller may set) and by how the JIT specialises the per-call ``head``
    (descriptors' dtypes and blocks, tensors' 16-byte alignment, ints' divisibility), so a
    bound launch runs only calls its kernel was compiled for."""

    __slots__ = ("kernel", "meta", "bound")

    def __init__(self, kernel, meta: dict):
        self.kernel, self.meta, self.bound = kernel, meta, {}

    def __call__(self, device, grid: tuple, head: tuple, static: tuple) -> None:
        from .triton_backend import BoundLaunch, _keep, _scored_launch
        context_on_thread(device)
        key = launch_key(head) if device.type == "cuda" else None
        key = None if key is None else (grid, key)
        bound = _scored_launch(self.bound, key)
        if bound is not None and bound(*head):
            return
        args = (*head, *static)
        with launch_guard(device.type):
            compiled = self.kernel[grid](*args, **self.meta)
        if key is not None:
            _keep(self.bound, key,
                  BoundLaunch.of(self.kernel, compiled, grid, args, self.meta, device,
                                 len(head)))


_THREAD = threading.local()


def context_on_thread(device) -> None:
    """Make the device's CUDA context current on this thread, once per thread, before a
    launch that encodes TMA descriptors: Triton encodes them before its launcher makes the
    context current, and a thread whose first CUDA work is such a launch (autograd's
    device thread, when the caching allocator needed no new memory) has none ("invalid
    device context"). A stream query is a runtime call, which binds the context; it is not
    made while a CUDA graph is captured (a capture is begun where a context is current)."""
    done = getattr(_THREAD, "devices", None)
    if done is None:
        done = _THREAD.devices = set()
    if device.index not in done and not torch.cuda.is_current_stream_capturing():
        torch.cuda.current_stream(device).query()
        done.add(device.index)


def warm(kernel, args, grid, meta) -> None:
    """Compile a Gluon kernel for these arguments and load it onto the device, without
    running it (a failure raises here, at plan time, not at the call)."""
    compiled = kernel.warmup(*args, grid=grid, **meta)
    init = getattr(compiled, "_init_handles", None)
    if init is not None:
        init()
