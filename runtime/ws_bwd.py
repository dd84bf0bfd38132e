"""The warp-specialised dK/dV kernel: FlashAttention-3's backward structure on Hopper, in Gluon.

spattn's backward is the dQ kernel (which also writes each row's delta and log2-unit lse)
and the dK/dV kernel, both generated in Triton's language (``codegen/templates``). On
Hopper, where this module's kernel runs the call (:func:`why_not`, :func:`query_lists`),
it replaces the generated dK/dV kernel, reading the rows' statistics the dQ kernel wrote:

* a loader partition (one warp group, 24 registers a thread) brings the program's 128
  keys of K and V once (two halves of 64), then, for each query head of the key head's
  group and each of that head's query tiles of 64 rows, the tile's Q, dO, lse and delta
  into a ring of ``STAGES`` shared-memory slots through TMA (a ready barrier for Q and
  the lse, one for dO and delta, an empty barrier both consumers release);
* two consumer warp groups, one per half of the keys (``setmaxnreg`` 240), each holding
  its dK and dV ``[64, D]`` in registers. Per query tile: S^T = K Q^T and dP^T = V dO^T
  issued together; P^T = exp2(S^T scale log2e - lse) while dP^T runs; dV += P^T dO from
  registers; dS^T = P^T (dP^T - delta); dK += dS^T Q. A PARTIAL tile's pairs come from its
  mask (uint8 ``[64, 128]``, evaluated from the pattern's IR at plan time, as the
  warp-specialised forward's), or where each key allows one run of the tile's queries
  from the keys' runs (4 bytes a key, loaded ahead of the tile's products): P^T is 0
  elsewhere. Each step waits for its own products
  (the schedule that keeps ptxas from serialising them: ``benchmarks/gluon_bwd.py``).
  An additive score (as the forward's, ``ws_fwd.score_vectors``) adds its keys' vector to
  S^T; its rows' terms are taken out of the lse before the kernel reads it
  (:meth:`WsBwd.rows`).

Measured on an H100 against the generated dK/dV kernel (benchmarks/RESULTS.md, "a
warp-specialised dK/dV kernel"): 1.21-1.38x on ``full`` and ``causal`` at 4K and 16K.
``SPATTN_WS_BWD`` (``auto`` / ``1`` / ``0``) chooses: ``1`` wherever it can run, ``0``
never, ``auto`` for calls of at least :data:`MIN_LENGTH` queries and keys and
:data:`MIN_WORK` computed tiles with at most
:data:`MAX_PARTIAL_SHARE` of them PARTIAL where their masks are read,
:data:`MAX_RUNS_SHARE` where each key's run is (docs/backends.md, "The warp-specialised
dK/dV kernel").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import tune as _tune
from .ws_fwd import (GLUON, GluonLaunches, ScoreVectors, descriptor, device_why_not,
                     score_vectors, score_why_not, share_refusal, tile_lists, tile_masks,
                     tile_runs, warm)

if GLUON:                       # (else never chosen: ws_fwd.device_why_not)
    from .ws_fwd import (_flags, _ring, _run_words, fence_async_shared, gl, gluon, mbarrier,
                         tma, warpgroup_mma, warpgroup_mma_init, warpgroup_mma_wait)

#: Query rows a step (one ring slot) and keys a program (two warp groups of 64).
BLOCK_M = 64
BLOCK_N = 128
#: The computed 64 x 128 tiles (over batch and heads) from which ``SPATTN_WS_BWD=auto``
#: takes the kernel. Below, the Gluon backward's card time is shorter than the host's time
#: to issue it: on an H100 (benchmarks/RESULTS.md, "the host's and the card's time of a
#: short backward"), causal at 4096 tokens, B = 1, 16 heads, D = 64 (16896 tiles) took
#: 361 us of the card's time with the Gluon dQ and dK/dV kernels and 388 us with the
#: generated ones, but 775-975 us and 416-490 us of the host's to issue, so 0.70-0.89 ms
#: and 0.39-0.40 ms a call; at 34816 tiles (causal, B = 8, 2048 tokens) the two backwards
#: are level, and from 35136 (20 documents at 16K) on the Gluon one is faster.
MIN_WORK = 32768
#: The fewest queries and keys with which ``auto`` takes the kernel (and so the Gluon dQ
#: kernel, which follows it). Timed on an H100 (benchmarks/RESULTS.md, "documents in three
#: processes, short calls at B = 8"; B = 8, 16 heads, bf16), forward+backward against the
#: generated backward: at 1024 tokens causal 0.40x (D = 64) and 0.85x (D = 128), ``full``
#: 0.59x and 0.74x; at 2048 causal 0.98x and 1.03x, at 4096 1.01x and 1.02x;
#: ``window(1024)`` at 16384 (B = 1) 1.13x.
MIN_LENGTH = 2048
#: The share of PARTIAL tiles up to which ``auto`` takes the kernel (their masks are read
#: from memory, where the generated kernel evaluates its predicate in registers). Timed
#: on an H100 against the generated backward (benchmarks/RESULTS.md): causal documents
#: at random cuts with 10% of their tiles PARTIAL 1.03-1.11x, 36% 1.02x, 77% 0.94x.
MAX_PARTIAL_SHARE = 0.2
#: The share where every key of every PARTIAL tile allows one run of queries (the kernel
#: reads the keys' runs, 4 bytes a key, ahead of the tile's products). Timed on an H100
#: with the Gluon dQ kernel (benchmarks/RESULTS.md, "rows' runs loaded ahead"): the
#: backward 1.26x, 1.11x and 1.08x the generated one's speed on causal documents at
#: random cuts with 5.6%, 10% and 43% of their tiles PARTIAL; above 50%, not yet timed.
MAX_RUNS_SHARE = 0.5
#: PARTIAL tiles whose masks the kernel reads at most (8 KiB each: 64 MiB).
MAX_MASKS = 8192
STAGES = 2
CONSUMER_REGS = 240


if GLUON:
    @gluon.jit
    def _item(geom, i_w):
        """Program ``i_w``'s key tile, batch element and key head."""
        B, HK = geom[0], geom[1]
        i_c = i_w // (B * HK)
        i_bk = i_w % (B * HK)
        return i_c, i_bk // HK, i_bk % HK

    @gluon.jit
    def _entry(geom, i_b, i_h, i_c):
        """The query-tile list entry of (batch element, query head, key tile)."""
        return i_b * geom[5] + i_h * geom[6] + i_c

    @gluon.jit
    def _load(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, lse_desc, delta_desc,
              q_smem, k_smem, v_smem, do_smem, l_smem, d_smem, bars, START, COUNT, ROWS,
              MIDX, MASKS, geom, sm_scale_log2, sm_scale, SA, SC, sc_b, sc_h, q_offset,
              flags):
        """The loader partition: K and V of the program's keys, then for each query head of
        its group each query tile's Q, lse, dO and delta into the ring, a slot refilled
        once both consumers released it."""
        kv_bar, q_ready, do_ready, empty = bars
        STAGES: gl.constexpr = q_smem.type.shape[0]
        H, G, LQS = geom[2], geom[3], geom[4]
        i_c, i_b, i_hk = _item(geom, gl.program_id(0))
        mbarrier.expect(kv_bar, 4 * k_desc.block_type.nbytes)
        for i_x in gl.static_range(2):
            o_k = [i_b, i_hk, i_c * 128 + i_x * 64, 0]
            tma.async_copy_global_to_shared(k_desc, o_k, kv_bar, k_smem.index(i_x))
            tma.async_copy_global_to_shared(v_desc, o_k, kv_bar, v_smem.index(i_x))
        it = 0
        for g in range(G):
            i_h = i_hk * G + g
            e = _entry(geom, i_b, i_h, i_c)
            o_list = gl.load(START + e)
            n_n = gl.load(COUNT + e)
            for j in range(n_n):
                i_s = it % STAGES
                phase = (it // STAGES) & 1
                i_t = gl.load(ROWS + o_list + j)
                o_q = [i_b, i_h, i_t * 64, 0]
                o_r = (i_b * H + i_h) * LQS + i_t * 64
                mbarrier.wait(empty.index(i_s), phase ^ 1)
                mbarrier.expect(q_ready.index(i_s), q_desc.block_type.nbytes
                                + lse_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(q_desc, o_q, q_ready.index(i_s),
                                                q_smem.index(i_s))
                tma.async_copy_global_to_shared(lse_desc, [o_r], q_ready.index(i_s),
                                                l_smem.index(i_s))
                mbarrier.expect(do_ready.index(i_s), do_desc.block_type.nbytes
                                + delta_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(do_desc, o_q, do_ready.index(i_s),
                                                do_smem.index(i_s))
                tma.async_copy_global_to_shared(delta_desc, [o_r], do_ready.index(i_s),
                                                d_smem.index(i_s))
                it += 1

    @gluon.jit
    def _rows(smem, i_s):
        """Slot ``i_s`` of a ring of ``[1, 1, rows, D]`` blocks as a ``[rows, D]`` operand."""
        t = smem.index(i_s)
        D: gl.constexpr = smem.type.shape[4]
        return t.reshape([t.numel // D, D])

    @gluon.jit
    def _consume(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, lse_desc, delta_desc,
                 q_smem, k_smem, v_smem, do_smem, l_smem, d_smem, bars, START, COUNT, ROWS,
                 MIDX, MASKS, geom, sm_scale_log2, sm_scale, SA, SC, sc_b, sc_h, q_offset,
                 flags, HALF: gl.constexpr):
        """A consumer warp group: keys ``[64 * HALF, +64)`` of the program's key tile
        against every query tile of its lists; dK (scaled) and dV stored through its own
        K and V halves. ``MASKED`` and ``SCORED`` (``flags``' shape,
        ``runtime.ws_fwd._flags``): some tiles are PARTIAL, 1 with their masks, 2 with
        their keys' runs of queries (read ahead of the tile's products); an additive score,
        whose terms of the key join S^T and whose terms of the query shift the lse (its
        derivative in s is its factor ``c``, in ``sm_scale``)."""
        kv_bar, q_ready, do_ready, empty = bars
        MASKED: gl.constexpr = (flags.type.shape[0] >= 2) + (flags.type.shape[0] >= 4)
        SCORED: gl.constexpr = flags.type.shape[1] >= 2
        STAGES: gl.constexpr = q_smem.type.shape[0]
        D: gl.constexpr = q_smem.type.shape[4]
        gl.static_assert(q_smem.type.shape[3] == 64)
        gl.static_assert(k_smem.type.shape[3] == 64)
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
        a_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=a_layout,
                                                      k_width=2)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        G, H = geom[3], geom[2]
        i_c, i_b, i_hk = _item(geom, gl.program_id(0))
        o_kr = i_c * 128 + HALF * 64 + gl.arange(0, 64, layout=row_s)   # this group's keys
        k_s = _rows(k_smem, HALF)
        v_s = _rows(v_smem, HALF)
        b_zero = gl.zeros([64, 64], gl.float32, s_layout)
        b_dk = warpgroup_mma_init(gl.zeros([64, D], gl.float32, a_layout))
        b_dv = warpgroup_mma_init(gl.zeros([64, D], gl.float32, a_layout))
        # a PARTIAL tile's mask [64 queries, 128 keys], read transposed (keys x queries),
        # or its keys' runs of queries [128] (this group's: o_kh)
        o_kh = HALF * 64 + gl.arange(0, 64, layout=row_s)
        o_qc = gl.expand_dims(gl.arange(0, 64, layout=col_s), 0)
        o_mk = gl.expand_dims(o_kh, 1) + o_qc * 128
        b_w = gl.zeros([64], gl.int32, row_s)      # (MASKED 1: no runs)
        mbarrier.wait(kv_bar, 0)
        it = 0
        for g in range(G):
            i_h = i_hk * G + g
            e = _entry(geom, i_b, i_h, i_c)
            o_list = gl.load(START + e)
            n_n = gl.load(COUNT + e)
            if SCORED:
                b_a = gl.load(SA + i_b * H + i_h)
                b_ck = gl.load(SC + i_b * sc_b + i_h * sc_h + o_kr)
            if MASKED:      # (a key tile may have no query tiles)
                i_mn = gl.load(MIDX + o_list, mask=n_n > 0, other=-1)
            for j in range(n_n):
                i_s = it % STAGES
                phase = (it // STAGES) & 1
                if MASKED:  # (this tile's runs, and the next tile's index, loaded ahead of
                    i_m = i_mn  # the waits)
                    if MASKED == 2:
                        b_w = _run_words(MASKS, i_m, o_kh)
                    i_mn = gl.load(MIDX + o_list + gl.minimum(j + 1, n_n - 1))
                if SCORED:
                    # the key's terms and the slope times k - r (r: the tile's first
                    # query; the rest of the row's terms are in the lse: WsBwd.rows)
                    b_cv = b_a * (o_kr - (gl.load(ROWS + o_list + j) * 64 + q_offset)
                                  ).to(gl.float32) + b_ck
                q_s = _rows(q_smem, i_s)
                do_s = _rows(do_smem, i_s)
                # products: S^T = K Q^T and dP^T = V dO^T in flight together
                mbarrier.wait(q_ready.index(i_s), phase)
                b_st = warpgroup_mma(k_s, q_s.permute((1, 0)), b_zero, use_acc=False,
                                     is_async=True)
                mbarrier.wait(do_ready.index(i_s), phase)
                b_dpt = warpgroup_mma(v_s, do_s.permute((1, 0)), b_zero, use_acc=False,
                                      is_async=True)
                b_st = warpgroup_mma_wait(1, deps=(b_st,))
                # P^T (rows at lse = +inf, past the end or without keys: 0); a PARTIAL
                # tile's pairs outside its mask: 0
                b_lse = l_smem.index(i_s).load(col_s)
                if SCORED:
                    b_pt = gl.exp2(b_st * sm_scale_log2 + gl.expand_dims(b_cv, 1)
                                   - gl.expand_dims(b_lse, 0))
                else:
                    b_pt = gl.exp2(b_st * sm_scale_log2 - gl.expand_dims(b_lse, 0))
                if MASKED:
                    if i_m >= 0:
                        if MASKED == 1:
                            m_ok = gl.load(MASKS + i_m.to(gl.int64) * 8192 + o_mk) != 0
                        else:
                            m_ok = (o_qc >= gl.expand_dims(b_w & 0xFFFF, 1)) \
                                & (o_qc < gl.expand_dims(b_w >> 16, 1))
                        b_pt = gl.where(m_ok, b_pt, 0.0)
                b_ptd = gl.convert_layout(b_pt.to(q_desc.dtype), op_layout)
                b_dv = warpgroup_mma(b_ptd, do_s, b_dv, is_async=True)
                b_dpt, b_dv = warpgroup_mma_wait(0, deps=(b_dpt, b_dv))
                b_dv = warpgroup_mma_init(b_dv)
                b_delta = d_smem.index(i_s).load(col_s)
                b_dst = b_pt * (b_dpt - gl.expand_dims(b_delta, 0))
                b_dstd = gl.convert_layout(b_dst.to(q_desc.dtype), op_layout)
                b_dk = warpgroup_mma(b_dstd, q_s, b_dk, is_async=True)
                b_dk = warpgroup_mma_init(warpgroup_mma_wait(0, deps=(b_dk,)))
                mbarrier.arrive(empty.index(i_s))
                it += 1
        # store dK (scaled) and dV through this group's K and V halves
        b_dk, b_dv = warpgroup_mma_wait(0, deps=(b_dk, b_dv))
        k_s.store((b_dk * sm_scale).to(dk_desc.dtype))
        v_s.store(b_dv.to(dv_desc.dtype))
        fence_async_shared()
        o_k = [i_b, i_hk, i_c * 128 + HALF * 64, 0]
        tma.async_copy_shared_to_global(dk_desc, o_k, k_smem.index(HALF))
        tma.async_copy_shared_to_global(dv_desc, o_k, v_smem.index(HALF))
        tma.store_wait(pendings=0)

    @gluon.jit
    def _consume0(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, lse_desc, delta_desc,
                  q_smem, k_smem, v_smem, do_smem, l_smem, d_smem, bars, START, COUNT, ROWS,
                  MIDX, MASKS, geom, sm_scale_log2, sm_scale, SA, SC, sc_b, sc_h, q_offset,
                  flags):
        _consume(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, lse_desc, delta_desc,
                 q_smem, k_smem, v_smem, do_smem, l_smem, d_smem, bars, START, COUNT, ROWS,
                 MIDX, MASKS, geom, sm_scale_log2, sm_scale, SA, SC, sc_b, sc_h, q_offset,
                 flags, 0)

    @gluon.jit
    def _consume1(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, lse_desc, delta_desc,
                  q_smem, k_smem, v_smem, do_smem, l_smem, d_smem, bars, START, COUNT, ROWS,
                  MIDX, MASKS, geom, sm_scale_log2, sm_scale, SA, SC, sc_b, sc_h, q_offset,
                  flags):
        _consume(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, lse_desc, delta_desc,
                 q_smem, k_smem, v_smem, do_smem, l_smem, d_smem, bars, START, COUNT, ROWS,
                 MIDX, MASKS, geom, sm_scale_log2, sm_scale, SA, SC, sc_b, sc_h, q_offset,
                 flags, 1)

    @gluon.jit
    def attn_bwd_dkdv_ws(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, lse_desc,
                         delta_desc, START, COUNT, ROWS, MIDX, MASKS, B, HK, H, G, LQS, LB,
                         LH, sm_scale_log2, sm_scale, SA, SC, sc_b, sc_h, q_offset,
                         STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                         MASKED: gl.constexpr, SCORED: gl.constexpr,
                         num_warps: gl.constexpr):
        """dK and dV ``[B, HK, Lk, D]`` of one key tile (128 keys) of one (batch element,
        key head): program ``(i_c * B + b) * HK + hk`` (key tile-major: the first key tiles,
        which causal masks give the most query tiles, start first). Q, dO ``[B, H, Lq,
        D]``, K, V, dK, dV through 4-D descriptors of 64-row blocks; the lse (log2 units)
        and delta, fp32 rows of ``LQS`` (``Lq`` rounded up to 4) a head, through 1-D
        descriptors of 64. The query tiles
        (64 rows) of list entry ``i = b * LB + h * LH + key tile``: ``ROWS[START[i] :
        START[i] + COUNT[i]]``, each FULL (``MIDX`` -1) or PARTIAL: ``MASKED`` 1, with its
        uint8 mask ``MASKS[MIDX]`` ``[64, 128]``; 2, with each key's run of queries
        ``MASKS[MIDX, key] = (lo, hi)`` (int16 ``[128, 2]``: the tile's queries ``lo <= r <
        hi``); 0, none PARTIAL. ``SCORED``: an additive score, its slopes ``SA`` and
        keys' terms ``SC`` (strides ``sc_b``, ``sc_h``) as the warp-specialised forward's,
        ``q_offset`` the first query's position, its rows' terms taken out of the lse
        (:meth:`WsBwd.rows`), ``sm_scale_log2`` and ``sm_scale`` times its factor of s."""
        q_smem = _ring(q_desc, STAGES)
        do_smem = _ring(do_desc, STAGES)
        k_smem = _ring(k_desc, 2)           # the program's keys, two halves of 64
        v_smem = _ring(v_desc, 2)
        l_smem = _ring(lse_desc, STAGES)
        d_smem = _ring(delta_desc, STAGES)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(do_ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)
        bars = (kv_bar, q_ready, do_ready, empty)
        geom = (B, HK, H, G, LQS, LB, LH)
        args = (q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, lse_desc, delta_desc,
                q_smem, k_smem, v_smem, do_smem, l_smem, d_smem, bars, START, COUNT, ROWS,
                MIDX, MASKS, geom, sm_scale_log2, sm_scale, SA, SC, sc_b, sc_h, q_offset,
                _flags(MASKED, SCORED))
        gl.warp_specialize([(_load, args), (_consume0, args), (_consume1, args)],
                           [4, 4], [CONSUMER_REGS, CONSUMER_REGS])


# ---------------------------------------------------------------- host side

def why_not(call, stage, q, k, v, o, do, options: dict | None, rows) -> str | None:
    """Why the warp-specialised dK/dV kernel does not run this backward (``stage``: the
    generated :class:`~spattn.runtime.triton_backend.BwdStage`, whose dQ kernel it
    follows), or None where it can, subject to its tiles (:func:`query_lists`): the
    device's rules (:func:`~spattn.runtime.ws_fwd.device_why_not`), then the call's
    (:func:`call_why_not`)."""
    return (device_why_not(call, q, call.settings.ws_bwd, "SPATTN_WS_BWD")
            or call_why_not(call, stage, q, k, v, do, options, rows))


def call_why_not(call, stage, q, k, v, do, options: dict | None, rows) -> str | None:
    """:func:`why_not`'s rules of the call itself: the dtype, head dimension, score, the
    stage's dQ form, options and settings, integer width, how the rows are reached, the
    lengths and the tensors' layout."""
    from .triton_backend import tma_ok
    s = call.settings
    if q.dtype not in (torch.bfloat16, torch.float16) or stage.upcast:
        return f"{q.dtype} (it runs bfloat16 and float16)"
    D = q.shape[-1]
    if D not in (64, 128) or k.shape[-1] != D or v.shape[-1] != D:
        return f"head dimension {D} (it runs 64 and 128)"
    if stage.pattern is not None and stage.pattern.score_inputs:
        return "a score that reads tables (their gradients are the generated kernels')"
    why = score_why_not(call, rows)
    if why is not None:
        return why
    c = stage.config
    if c.dq != "kernel" or c.lse_grad:
        return "an atomic dQ or the lse's gradient (its kernel reads neither)"
    fixed = sorted(n for n in (options or {}) if n in _FIXING)
    if fixed:
        return f"the options fix the generated backward ({', '.join(fixed)})"
    if s.strategy or s.tiles_set("bwd"):
        return "SPATTN_* settings fix the generated backward"
    if call.int64:
        return "64-bit offsets"
    if rows is not None:
        return "rows through tables or a layout's boxes"
    if min(call.Lq, call.Lk) < BLOCK_N:
        return f"fewer than {BLOCK_N} queries or keys"
    if not tma_ok(q, k, v, do):
        return "tensors TMA cannot read"
    return None


#: Options that fix the generated backward's configuration (the stage then keeps its dK/dV
#: kernel): its tuned fields (``runtime.tune.FIELDS``), the strategy, TMA, dQ's form and
#: the tables.
_FIXING = _tune.FIELDS["bwd"] + ("strategy", "tma", "dq", "tables")


@dataclass
class QueryLists:
    """The tiles the kernel computes, per list entry ``i = b * LB + h * LH + c`` (batch
    element, query head, key tile of 128; ``LB``, ``LH`` 0 where every batch element or
    head has the same): query tiles of 64 rows ``rows[start[i] : start[i] + count[i]]``,
    ascending, each FULL (``midx`` -1) or PARTIAL with its mask ``masks[midx]`` (uint8
    ``[64, 128]``: query rows by key columns, 0 where the pair is not allowed or past
    either end: :func:`~spattn.runtime.ws_fwd.tile_masks`). ``masks`` is int16 ``[n,
    128, 2]`` instead where each key of each PARTIAL tile allows one run of the tile's
    queries, ``[lo, hi)`` (:func:`~spattn.runtime.ws_fwd.tile_runs` of the masks
    transposed: causal, windows, documents)."""

    start: torch.Tensor
    count: torch.Tensor
    rows: torch.Tensor
    midx: torch.Tensor
    masks: torch.Tensor
    strides: tuple
    n_k: int
    n_partial: int = 0


def query_lists(call):
    """The :class:`QueryLists` of the call's non-EMPTY 64 x 128 tiles, or a string saying
    why the kernel does not run them: more than :data:`MAX_MASKS` PARTIAL tiles, or
    (``SPATTN_WS_BWD=auto``) fewer than :data:`MIN_LENGTH` queries or keys, fewer than
    :data:`MIN_WORK` tiles in all or a share of
    PARTIAL ones above :data:`MAX_PARTIAL_SHARE` (their masks read) or
    :data:`MAX_RUNS_SHARE` (their keys' runs)."""
    from .tables import _demote_ragged, _pool
    if call.settings.ws_bwd is None and min(call.Lq, call.Lk) < MIN_LENGTH:
        return (f"{min(call.Lq, call.Lk)} queries or keys (auto takes {MIN_LENGTH} or "
                "more)")
    tile = (BLOCK_M, BLOCK_N)
    ((fine_tile, fine),) = call.analysis.classes([tile])
    cls = _pool(fine, fine_tile, tile, call.Lq, call.Lk)
    cls = _demote_ragged(_demote_ragged(cls, call.Lq, BLOCK_M, 2), call.Lk, BLOCK_N, 3)
    ct = cls.transpose(2, 3)                                    # [B', H', n_k, n_q]
    shares = (MAX_PARTIAL_SHARE, MAX_RUNS_SHARE)
    got = tile_lists(ct, call, call.settings.ws_bwd, MAX_MASKS, MIN_WORK, shares)
    if isinstance(got, str):
        return got
    start, count, at, partial, midx, strides, _, _, n_partial = got
    masks = tile_masks(call, at[partial][:, [0, 1, 3, 2]], tile, rows_end=True)
    runs = tile_runs(masks.transpose(1, 2))
    why = share_refusal(call.settings.ws_bwd, n_partial, at.shape[0],
                        runs.dtype == torch.int16, shares)
    if why is not None:
        return why
    return QueryLists(start, count, at[:, 3].to(torch.int32).contiguous(), midx,
                      runs if runs.dtype == torch.int16 else masks, strides, ct.shape[2],
                      n_partial)


class WsBwd:
    """The warp-specialised dK/dV launch of a backward stage (:func:`build`):
    ``run(q, k, v, do, lse2, delta, dk, dv)`` fills ``dk`` and ``dv`` ``[B, HK, Lk, D]``
    from the rows' statistics the stage's dQ kernel wrote."""

    kernel = attn_bwd_dkdv_ws if GLUON else None

    def __init__(self, call, q, k, lists: QueryLists, score: ScoreVectors | None = None):
        from .triton_backend import _scale_log2
        B, H, _, D = q.shape
        HK = k.shape[1]
        self.lists = lists
        self.n_k = lists.n_k
        self.grid = (lists.n_k * B * HK,)
        gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
        self._layout = gl.NVMMASharedLayout.get_default_for([1, 1, BLOCK_M, D], gdt)
        self._row_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M], gl.float32)
        LB, LH = lists.strides
        self.lq_rows = -(-call.Lq // 4) * 4         # (a head's rows of the statistics)
        self.score = score
        c = 1.0 if score is None else score.c
        if score is None:       # (pointers never read)
            sc = (lists.count, lists.count, 0, 0)
            self.row_terms = None
        else:
            sb, sh, _, _ = score.strides()
            sc = (score.slopes, score.cols, sb, sh)
            # the rows' terms the kernel leaves out of its pairs: the slope times r - q
            # (r: the first query of the row's tile of 64) and the queries' terms
            q = torch.arange(call.Lq, device=score.rows.device)
            off = ((q // BLOCK_M) * BLOCK_M - q).to(torch.float32)
            self.row_terms = (score.slopes[:, :, None] * off + score.rows).contiguous()
        self.static = (lists.start, lists.count, lists.rows, lists.midx, lists.masks, B, HK,
                       H, H // HK, self.lq_rows, LB, LH, _scale_log2(call.scale) * c,
                       call.scale * c, *sc, call.positions.q_offset)
        self.runs = lists.masks.dtype == torch.int16
        self.meta = dict(STAGES=STAGES, CONSUMER_REGS=CONSUMER_REGS,
                         MASKED=(2 if self.runs else 1) if lists.n_partial else 0,
                         SCORED=int(score is not None), num_warps=4, maxnreg=168)
        self.launches = GluonLaunches(self.kernel, self.meta)

    def _desc(self, t):
        return descriptor(t, list(t.shape), list(t.stride()), [1, 1, BLOCK_M, t.shape[-1]],
                          self._layout)

    def _row_desc(self, t):
        return descriptor(t, [t.numel()], [1], [BLOCK_M], self._row_layout)

    def rows(self, lse2, delta):
        """The rows' statistics ``[B, H, Lq]`` as the kernel's 1-D descriptors read them:
        each head's rows from a multiple of 16 bytes (TMA's rule for a box's start), so
        copied into rows of ``Lq`` rounded up to 4 where it is not one, zeros after. With a
        score, the lse less the rows' terms the kernel leaves out of its pairs (a row at
        +inf stays there)."""
        B, H, Lq = lse2.shape
        if self.row_terms is not None:
            lse2 = lse2 - self.row_terms
        if Lq == self.lq_rows and lse2.data_ptr() % 16 == 0 and delta.data_ptr() % 16 == 0:
            return lse2.reshape(-1), delta.reshape(-1)
        buf = torch.zeros((2, B * H, self.lq_rows), dtype=torch.float32, device=lse2.device)
        buf[0, :, :Lq] = lse2.reshape(B * H, Lq)
        buf[1, :, :Lq] = delta.reshape(B * H, Lq)
        return buf[0].reshape(-1), buf[1].reshape(-1)

    def head(self, q, k, v, do, lse2, delta, dk, dv) -> tuple:
        """The per-call arguments: the descriptors."""
        lse2, delta = self.rows(lse2, delta)
        return (*(self._desc(t) for t in (q, k, v, do, dk, dv)), self._row_desc(lse2),
                self._row_desc(delta))

    def args(self, q, k, v, do, lse2, delta, dk, dv):
        return (*self.head(q, k, v, do, lse2, delta, dk, dv), *self.static)

    def run(self, q, k, v, do, lse2, delta, dk, dv):
        self.launches(q.device, self.grid, self.head(q, k, v, do, lse2, delta, dk, dv),
                      self.static)

    def __repr__(self) -> str:
        read = "keys' runs" if self.runs else "masks"
        return (f"dK/dV attn_bwd_dkdv_ws (Gluon, warp-specialised: a TMA loader and two "
                f"consumer warp groups of 64 keys): tiles {BLOCK_M}x{BLOCK_N}, "
                f"{int(self.lists.rows.numel())} query tiles ({self.lists.n_partial} "
                f"PARTIAL, their {read} read) over {self.lists.count.numel()} key-tile "
                f"lists, grid {self.grid}"
                + (", an additive score" if self.score is not None else ""))


def build(call, stage, q, k, v, o, do, options, rows):
    """The warp-specialised dK/dV launch for ``stage``, compiled, or ``(None, why)`` where
    it does not run the call (:func:`why_not`, :func:`query_lists`) or Triton fails to
    build it (the stage then keeps its generated dK/dV kernel)."""
    why = why_not(call, stage, q, k, v, o, do, options, rows)
    if why is not None:
        return None, why
    lists = query_lists(call)
    if isinstance(lists, str):
        return None, lists
    score = score_vectors(call, q.device)
    if isinstance(score, str):
        return None, score
    try:
        ws = WsBwd(call, q, k, lists, score)
        B, H, Lq, D = q.shape
        rows_ = torch.zeros((B, H, Lq), dtype=torch.float32, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        warm(ws.kernel, ws.args(q, k, v, do, rows_, rows_, dk, dk), ws.grid, ws.meta)
    except Exception as e:  # noqa: BLE001 -- any failure keeps the generated kernel
        return None, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return ws, None
