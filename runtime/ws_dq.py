"""The warp-specialised dQ kernel: the backward's dQ half on Hopper, in Gluon.

spattn's backward is a dQ kernel, which also writes each row's delta and log2-unit lse, and
a dK/dV kernel that reads them. Where the warp-specialised dK/dV kernel runs a backward
(``runtime.ws_bwd``), this module's kernel can replace the generated dQ kernel before it
(:func:`why_not`, :func:`build`). It is the warp-specialised forward's structure
(``runtime.ws_fwd``) with the backward's products:

* a loader partition (one warp group, 24 registers a thread) brings the work item's two
  halves of Q and dO (64 rows each), then its key tiles' K and V into a ring of
  ``STAGES`` shared-memory slots through TMA, from the forward's key-tile lists
  (:func:`~spattn.runtime.ws_fwd.key_lists`);
* two consumer warp groups of 64 query rows (``setmaxnreg`` 240), each holding its dQ
  ``[64, D]`` in registers. Per key tile: S = Q K^T and dP = dO V^T issued together;
  P = exp2(S scale log2e - lse) while dP runs (a PARTIAL tile's pairs outside its mask or
  its rows' runs 0, as the forward reads them); dS = P (dP - delta); dQ += dS K. Before
  its first tile a group computes its rows' delta = rowsum(dO O) and writes delta and the
  lse in log2 units (+inf for a row without keys) for the dK/dV kernel after it.

An additive score (``ws_fwd.score_vectors``) adds its keys' vector to S and takes its rows'
terms out of the lse, as the forward does; dQ is scaled by the score's factor of s. The
work items (one per program) start heaviest first: the lists' lengths sorted.

``SPATTN_WS_DQ`` (``auto`` / ``1`` / ``0``) chooses: ``1`` wherever it can run, ``0`` never,
``auto`` by the forward's rules (:data:`~spattn.runtime.ws_fwd.MIN_WORK` computed 128 x 128
tiles, at most :data:`MAX_PARTIAL_SHARE` of them PARTIAL where their masks are read,
:data:`MAX_RUNS_SHARE` where each row's run is). docs/backends.md, "The warp-specialised
dQ kernel".
"""
from __future__ import annotations

import torch

from .ws_fwd import (GLUON, TILE, GluonLaunches, KeyLists, ScoreVectors, WsFwdStage,
                     device_why_not, key_lists, warm)

if GLUON:                       # (else never chosen: ws_fwd.device_why_not)
    from .ws_fwd import (_at, _flags, _load_keys, _masked, _ring, _run_words, _score_rows,
                         _tile, _work, fence_async_shared, gl, gluon, mbarrier, tma, warpgroup_mma,
                         warpgroup_mma_init, warpgroup_mma_wait)

#: The share of PARTIAL 128 x 128 tiles up to which ``SPATTN_WS_DQ=auto`` takes the kernel
#: where it reads their masks (in P's path, as in the forward); :data:`MAX_RUNS_SHARE`
#: where it reads each row's run (the dK/dV kernel's, timed with it:
#: :data:`~spattn.runtime.ws_bwd.MAX_RUNS_SHARE`).
MAX_PARTIAL_SHARE = 0.05
MAX_RUNS_SHARE = 0.5
STAGES = 2
CONSUMER_REGS = 240


if GLUON:
    @gluon.jit
    def _load(q_desc, k_desc, v_desc, do_desc, dq_desc, q_smem, do_smem, k_smem, v_smem,
              bars, O, LSE, LSE2, DELTA, ORDER, START, COUNT, COLS, MIDX, MASKS, geom,
              o_strides, dq_scale, score, flags):
        """The loader partition: for each of the program's work items, the two halves of Q
        and dO (each half refilled once its consumer stored the dQ it held), then the
        item's key tiles' K and V into the ring of slots, each slot's K refilled once both
        consumers used it for dQ, its V once both used it for dP."""
        b_q, q_empty, k_ready, k_empty, v_ready, v_empty = bars
        QT1, QT2, KT1, KT2, N_WORK = geom[6], geom[7], geom[8], geom[9], geom[13]
        it = 0
        n = 0
        for i_p in range(gl.program_id(0), N_WORK, gl.num_programs(0)):
            i_bh, i_t, i_l, q_p, k_p = _work(geom, gl.load(ORDER + i_p))
            for i_h in gl.static_range(2):
                mbarrier.wait(q_empty.index(i_h), (n & 1) ^ 1)
                mbarrier.expect(b_q.index(i_h),
                                q_desc.block_type.nbytes + do_desc.block_type.nbytes)
                o_q = _at(i_t, q_p[0], q_p[1], QT1, QT2, q_smem, k_smem, i_h)
                tma.async_copy_global_to_shared(q_desc, o_q, b_q.index(i_h),
                                                q_smem.index(i_h))
                tma.async_copy_global_to_shared(do_desc, o_q, b_q.index(i_h),
                                                do_smem.index(i_h))
            it = _load_keys(k_desc, v_desc, q_smem, k_smem, v_smem, k_ready, k_empty,
                            v_ready, v_empty, START, COUNT, COLS, i_l, k_p, KT1, KT2, it)
            n += 1

    @gluon.jit
    def _consume(q_desc, k_desc, v_desc, do_desc, dq_desc, q_smem, do_smem, k_smem, v_smem,
                 bars, O, LSE, LSE2, DELTA, ORDER, START, COUNT, COLS, MIDX, MASKS, geom,
                 o_strides, dq_scale, score, flags, HALF: gl.constexpr):
        """A consumer warp group: for each of the program's work items, query rows
        ``[64 * HALF, +64)`` of its tile against its key tiles; the rows' delta and lse
        (log2 units) stored first, dQ (scaled) stored through its Q half at the end.
        ``MASKED`` and ``SCORED`` (``flags``' shape) as in the forward's consumers
        (``runtime.ws_fwd._consume``)."""
        b_q, q_empty, k_ready, k_empty, v_ready, v_empty = bars
        MASKED: gl.constexpr = (flags.type.shape[0] >= 2) + (flags.type.shape[0] >= 4)
        SCORED: gl.constexpr = (flags.type.shape[1] >= 2) + (flags.type.shape[1] >= 4)
        D: gl.constexpr = k_smem.type.shape[5]
        STAGES: gl.constexpr = k_smem.type.shape[0]
        BLOCK_M: gl.constexpr = 64
        BLOCK_N: gl.constexpr = k_smem.numel // (STAGES * D)
        gl.static_assert(q_smem.numel == 2 * BLOCK_M * D)       # one buffer of two halves
        gl.static_assert(BLOCK_N == 128)
        H, QN, N_WORK = geom[0], geom[12], geom[13]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        a_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=a_layout,
                                                      k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        # O and dO rows for delta: 8 columns a thread
        o_layout: gl.constexpr = gl.BlockedLayout([1, 8], [256 // D, D // 8], [4, 1], [1, 0])
        b_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        q_s = q_smem.index(HALF).reshape([BLOCK_M, D])
        do_s = do_smem.index(HALF).reshape([BLOCK_M, D])
        o_d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        o_rh = gl.arange(0, BLOCK_M, layout=row_s) + HALF * BLOCK_M     # the group's rows
        b_w = gl.zeros([BLOCK_M], gl.int32, row_s)      # (MASKED 1: no runs)
        it = 0
        n = 0
        for i_p in range(gl.program_id(0), N_WORK, gl.num_programs(0)):
            i_bh, i_t, i_l, q_p, k_p = _work(geom, gl.load(ORDER + i_p))
            n_n = gl.load(COUNT + i_l)
            o_list = gl.load(START + i_l)
            o_tok = i_t * 128 + HALF * 64 + gl.arange(0, BLOCK_M, layout=row_s)
            m_tok = o_tok < QN
            if SCORED:
                i_b = i_bh // H
                b_a = gl.load(score[0] + i_bh)
                o_r0 = i_t * 128 + score[7]         # the item's first query position
                p_sc = score[1] + i_b * score[3] + (i_bh % H) * score[4]
            mbarrier.wait(b_q.index(HALF), n & 1)

            # stage 1: the rows' statistics. delta = rowsum(dO O); the lse in log2 units, a
            # row without keys (-inf, or past the end) at +inf so that its P is 0; both
            # stored for the dK/dV kernel
            o_tk = i_t * 128 + HALF * 64 + gl.arange(0, BLOCK_M,
                                                     layout=gl.SliceLayout(1, o_layout))
            p_o = O + (i_bh // H).to(gl.int64) * o_strides[0] \
                + (i_bh % H).to(gl.int64) * o_strides[1] \
                + gl.expand_dims(o_tk.to(gl.int64) * o_strides[2], 1) \
                + gl.expand_dims(o_d, 0)
            b_o = gl.load(p_o, mask=gl.expand_dims(o_tk < QN, 1), other=0.0).to(gl.float32)
            b_do = do_s.load(o_layout).to(gl.float32)
            b_delta = gl.convert_layout(gl.sum(b_o * b_do, 1), row_s)
            p_row = i_bh.to(gl.int64) * QN + o_tok
            b_lse = gl.load(LSE + p_row, mask=m_tok, other=float("-inf")) * 1.4426950408889634
            b_lse = gl.where(b_lse == float("-inf"), float("inf"), b_lse)
            gl.store(DELTA + p_row, b_delta, mask=m_tok)
            gl.store(LSE2 + p_row, b_lse, mask=m_tok)
            if SCORED:      # (the rows' terms, left out of the pairs as in the forward)
                b_lse = gl.where(b_lse == float("inf"), b_lse,
                                 b_lse - _score_rows(score, i_bh, H, o_r0, o_tok, m_tok, b_a))
            b_dq = warpgroup_mma_init(gl.zeros([BLOCK_M, D], gl.float32, a_layout))

            # stage 2: per key tile, S and dP in flight together, P while dP runs, then
            # dS K into dQ; V's slot released after dP, K's after dQ's product
            if MASKED:      # (an entry may have no tiles here)
                i_mn = gl.load(MIDX + o_list, mask=n_n > 0, other=-1)
            for j in range(n_n):
                i_s = (it + j) % STAGES
                phase = ((it + j) // STAGES) & 1
                if MASKED:      # (this tile's runs, and the next tile's index, loaded ahead
                    i_m = i_mn  # of the waits)
                    if MASKED == 2:
                        b_w = _run_words(MASKS, i_m, o_rh)
                    i_mn = gl.load(MIDX + o_list + gl.minimum(j + 1, n_n - 1))
                if SCORED:
                    o_k0 = gl.load(COLS + o_list + j) * 128
                if SCORED == 2:
                    b_ck = gl.load(p_sc + o_k0 + gl.arange(0, 128, layout=col_s))
                mbarrier.wait(k_ready.index(i_s), phase)
                b_s = warpgroup_mma(q_s, _tile(k_smem, i_s).permute((1, 0)), b_zero,
                                    use_acc=False, is_async=True)
                mbarrier.wait(v_ready.index(i_s), phase)
                b_dp = warpgroup_mma(do_s, _tile(v_smem, i_s).permute((1, 0)), b_zero,
                                     use_acc=False, is_async=True)
                b_s = warpgroup_mma_wait(1, deps=(b_s,))
                if MASKED:
                    if i_m >= 0:
                        b_s = _masked(b_s, MASKS, i_m, b_w, HALF, MASKED)
                if SCORED:
                    # (the slope times k - r from the tile's columns, not a vector kept
                    # across the loop: registers are short here, unlike the forward's)
                    o_kr = o_k0 - o_r0 + gl.arange(0, 128, layout=col_s)
                    b_c = b_a * o_kr.to(gl.float32)
                    if SCORED == 2:
                        b_c = b_c + b_ck
                    b_p = gl.exp2(b_s * score[8] + gl.expand_dims(b_c, 0)
                                  - gl.expand_dims(b_lse, 1))
                else:
                    b_p = gl.exp2(b_s * geom[14] - gl.expand_dims(b_lse, 1))
                b_dp = warpgroup_mma_wait(0, deps=(b_dp,))
                mbarrier.arrive(v_empty.index(i_s))
                b_ds = b_p * (b_dp - gl.expand_dims(b_delta, 1))
                b_dsd = gl.convert_layout(b_ds.to(q_desc.dtype), op_layout)
                b_dq = warpgroup_mma(b_dsd, _tile(k_smem, i_s), b_dq, is_async=True)
                b_dq = warpgroup_mma_init(warpgroup_mma_wait(0, deps=(b_dq,)))
                mbarrier.arrive(k_empty.index(i_s))

            # stage 3: dQ (scaled) through the Q half, no longer read; the half goes back to
            # the loader once the store has read it
            b_dq = warpgroup_mma_wait(0, deps=(b_dq,))
            q_s.store((b_dq * dq_scale).to(dq_desc.dtype))
            fence_async_shared()
            o_q = _at(i_t, q_p[0], q_p[1], geom[6], geom[7], q_smem, k_smem, HALF)
            tma.async_copy_shared_to_global(dq_desc, o_q, q_smem.index(HALF))
            tma.store_wait(pendings=0)
            mbarrier.arrive(q_empty.index(HALF))
            it += n_n
            n += 1

    @gluon.jit
    def _consume0(q_desc, k_desc, v_desc, do_desc, dq_desc, q_smem, do_smem, k_smem, v_smem,
                  bars, O, LSE, LSE2, DELTA, ORDER, START, COUNT, COLS, MIDX, MASKS, geom,
                  o_strides, dq_scale, score, flags):
        _consume(q_desc, k_desc, v_desc, do_desc, dq_desc, q_smem, do_smem, k_smem, v_smem,
                 bars, O, LSE, LSE2, DELTA, ORDER, START, COUNT, COLS, MIDX, MASKS, geom,
                 o_strides, dq_scale, score, flags, 0)

    @gluon.jit
    def _consume1(q_desc, k_desc, v_desc, do_desc, dq_desc, q_smem, do_smem, k_smem, v_smem,
                  bars, O, LSE, LSE2, DELTA, ORDER, START, COUNT, COLS, MIDX, MASKS, geom,
                  o_strides, dq_scale, score, flags):
        _consume(q_desc, k_desc, v_desc, do_desc, dq_desc, q_smem, do_smem, k_smem, v_smem,
                 bars, O, LSE, LSE2, DELTA, ORDER, START, COUNT, COLS, MIDX, MASKS, geom,
                 o_strides, dq_scale, score, flags, 1)

    @gluon.jit
    def attn_bwd_dq_ws(q_desc, k_desc, v_desc, do_desc, dq_desc, O, so_b, so_h, so_n, LSE,
                       LSE2, DELTA, ORDER, START, COUNT, COLS, MIDX, MASKS, H, G, n_m, LB, LH,
                       FOLD, QT1, QT2, KT1, KT2, QA1, QA2, QN, N_WORK, sm_scale_log2, SA, SC,
                       SR, sc_b, sc_h, sr_b, sr_h, q_offset, s_mult, dq_scale,
                       STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                       MASKED: gl.constexpr, SCORED: gl.constexpr, num_warps: gl.constexpr):
        """dQ ``[B, H, QN, D]`` of ``N_WORK`` work items of 128 query rows, item ``(b * H +
        h) * n_m + t`` taken in the order ``ORDER`` (program ``i`` takes ``ORDER[i]``, ``+
        num_programs``, ...). The descriptors, lists, ``geom`` and the additive score as
        in :func:`~spattn.runtime.ws_fwd.attn_fwd_ws` (Q, dO, dQ through half boxes, K, V
        through whole ones); O ``[B, H, QN, D]`` read through pointers (strides ``so_*``,
        the last 1) for delta; LSE the forward's (natural log), LSE2 and DELTA ``[B, H,
        QN]`` fp32 written (the lse in log2 units, +inf for a row without keys; delta =
        rowsum(dO O)); ``dq_scale`` the softmax scale times the score's factor of s."""
        q_smem = _ring(q_desc, 2)           # one buffer of two halves
        do_smem = _ring(do_desc, 2)
        k_smem = _ring(k_desc, STAGES)
        v_smem = _ring(v_desc, STAGES)
        b_q = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(b_q.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(v_empty.index(i), count=2)
        bars = (b_q, q_empty, k_ready, k_empty, v_ready, v_empty)
        geom = (H, G, n_m, LB, LH, FOLD, QT1, QT2, KT1, KT2, QA1, QA2, QN, N_WORK,
                sm_scale_log2)
        score = (SA, SC, SR, sc_b, sc_h, sr_b, sr_h, q_offset, s_mult)
        args = (q_desc, k_desc, v_desc, do_desc, dq_desc, q_smem, do_smem, k_smem, v_smem,
                bars, O, LSE, LSE2, DELTA, ORDER, START, COUNT, COLS, MIDX, MASKS, geom,
                (so_b, so_h, so_n), dq_scale, score, _flags(MASKED, SCORED))
        gl.warp_specialize([(_load, args), (_consume0, args), (_consume1, args)],
                           [4, 4], [CONSUMER_REGS, CONSUMER_REGS])


# ---------------------------------------------------------------- host side

def why_not(call, stage, q, o) -> str | None:
    """Why the warp-specialised dQ kernel does not run this backward (``stage``: the
    generated :class:`~spattn.runtime.triton_backend.BwdStage`, with the warp-specialised
    dK/dV launch that must follow it), or None where it can, subject to its tiles
    (:func:`build`): the dK/dV kernel's rules hold already (it runs), plus the device's
    rules under its own setting and a forward output ``o`` whose rows are contiguous (it
    is read through pointers, any other strides)."""
    if stage.ws is None:
        return "the warp-specialised dK/dV kernel does not run this backward"
    why = device_why_not(call, q, call.settings.ws_dq, "SPATTN_WS_DQ")
    if why is not None:
        return why
    if o.stride(-1) != 1 or o.shape != q.shape:
        return "an output whose rows are not contiguous"
    return None


class WsDq(WsFwdStage):
    """The warp-specialised dQ launch of a backward stage (:func:`build`): ``run(q, k, v,
    o, lse, do, dq, lse2, delta)`` fills ``dq`` ``[B, H, Lq, D]`` and the rows' statistics
    ``lse2``, ``delta`` ``[B, H, Lq]``. Its descriptors and static arguments are the
    warp-specialised forward's (:class:`~spattn.runtime.ws_fwd.WsFwdStage`) over rows."""

    kernel = attn_bwd_dq_ws if GLUON else None

    def __init__(self, call, q, k, v, lists: KeyLists, score: ScoreVectors | None = None):
        super().__init__(call, q, k, v, None, lists, score)
        B, H = q.shape[:2]
        # one program per item, the longest lists first (stable: ties in item order)
        LB, LH = lists.strides
        per = lists.count.reshape(B if LB else 1, H if LH else 1, lists.n_q)
        self.order = torch.sort(per.expand(B, H, lists.n_q).reshape(-1), descending=True,
                                stable=True)[1].to(torch.int32).contiguous()
        self.grid = (self.n_work,)
        self.persistent = False
        self.dq_scale = call.scale * (1.0 if score is None else score.c)
        self.meta = dict(self.meta, STAGES=STAGES, CONSUMER_REGS=CONSUMER_REGS)
        self.launches = GluonLaunches(self.kernel, self.meta)
        self.tail = (self.order, *self.static, self.dq_scale)

    def head(self, q, k, v, o, lse, do, dq, lse2, delta) -> tuple:
        """The per-call arguments (the descriptors, o and its strides, the rows' vectors)."""
        descs = (self._desc(q, self.qg, self.half), self._desc(k, self.kg, self.kg.box),
                 self._desc(v, self.kg, self.kg.box), self._desc(do, self.qg, self.half),
                 self._desc(dq, self.qg, self.half))
        return (*descs, o, *o.stride()[:3], lse, lse2, delta)

    def args(self, q, k, v, o, lse, do, dq, lse2, delta):
        return (*self.head(q, k, v, o, lse, do, dq, lse2, delta), *self.tail)

    def run(self, q, k, v, o, lse, do, dq, lse2, delta):
        self.launches(q.device, self.grid, self.head(q, k, v, o, lse, do, dq, lse2, delta),
                      self.tail)

    def __repr__(self) -> str:
        return (f"dQ attn_bwd_dq_ws (Gluon, warp-specialised: a TMA loader and two consumer "
                f"warp groups of 64 queries): tiles {TILE}x{TILE}, {self.n_tiles} key tiles "
                f"({self.n_masks} PARTIAL, their {'row runs' if self.runs else 'masks'} "
                f"read) over {self.lists.count.numel()} query-tile lists, grid {self.grid}"
                + (", an additive score" if self.score is not None else ""))


def build(call, stage, q, k, v, o, do):
    """The warp-specialised dQ launch for ``stage`` (whose ``ws``, the dK/dV launch, is
    set), compiled, or ``(None, why)`` where it does not run the call (:func:`why_not`, the
    forward's key lists under ``SPATTN_WS_DQ``'s thresholds) or Triton fails to build it
    (the stage then keeps its generated dQ kernel)."""
    why = why_not(call, stage, q, o)
    if why is not None:
        return None, why
    lists = key_lists(call, call.settings.ws_dq, (MAX_PARTIAL_SHARE, MAX_RUNS_SHARE),
                      empty_row=None)
    if isinstance(lists, str):
        return None, lists
    try:
        ws = WsDq(call, q, k, v, lists, stage.ws.score)     # (the dK/dV launch's vectors)
        B, H, Lq, _ = q.shape
        lse = torch.zeros((B, H, Lq), dtype=torch.float32, device=q.device)
        warm(ws.kernel, ws.args(q, k, v, o, lse, do, torch.empty_like(q), lse, lse),
             ws.grid, ws.meta)
    except Exception as e:  # noqa: BLE001 -- any failure keeps the generated kernel
        return None, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return ws, None
