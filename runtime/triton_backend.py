"""Launchers of the generated Triton kernels (forward and backward).

The runtime front (``runtime/api.py``, ``runtime/autograd.py``) validates tensors
and calls exactly these::

    fwd(pattern, q, k, v, *, scale, q_offset, inputs) -> (o, lse)
    bwd(pattern, q, k, v, o, lse, do, *, scale, q_offset, inputs) -> (dq, dk, dv)

q ``[B, Hq, Lq, D]``, k, v ``[B, Hk, Lk, D]`` with any strides (no copies), o in
q's dtype, lse fp32 ``[B, Hq, Lq]`` (natural log; ``-inf`` for a fully masked
row).  ``inputs`` are the pattern's runtime inputs, already validated (int
tensors of ``n`` index dims, optionally with leading ``[B]`` or ``[B, H]``).

Options for tests and tuning (keyword only, all optional): ``strategy``
("ranges" | "table"; also ``$SPATTN_STRATEGY``), ``block_m``, ``block_n``,
``num_warps``, ``num_stages``, ``closed_form``; backward only: ``block_m1``,
``block_n1`` (dK/dV tile), ``block_m2``, ``block_n2`` (dQ tile) -- ``block_m``/``block_n``
set both backward tiles.  The ``SPATTN_*`` environment overrides (see
``codegen/config.py``) in force at call time are part of the per-process config
memo, so changing them between calls picks the new configuration.

``tma`` (bool) picks the block loads and stores of Q, K, V, O (and dO, dQ, dK, dV)
through TMA tensor descriptors.  By default (``None``, or ``$SPATTN_TMA`` unset or
``auto``) it is on for the forward on CUDA, where it measured faster, and off for the
backward, whose 12 descriptors per call cost more host time than its kernels gain
(``benchmarks/NOTES.md`` rows 36-37; :data:`TMA_AUTO`); ``$SPATTN_TMA`` = ``1`` / ``0``
turns it on for both (also under the interpreter, which emulates descriptors: how the
CPU tests cover these kernels) or off, and the option overrides the environment.  It is used only where TMA exists (CUDA compute capability
9 or more, or the interpreter) and every tensor of the launch meets its layout rules
(:func:`tma_ok`); otherwise the pointer kernels run.

``int64`` (bool, default False) selects kernels whose integer arithmetic is 64-bit:
positions (``q_offset`` near 2**31), lengths, head and batch ids, runtime-input values
(passed as int64 tensors instead of int32 ones, which would truncate values beyond
int32), closed-form bounds and the in-head element offsets (``(L - 1) * stride`` beyond
2**31).  It is a field of the kernel config, so an int64 kernel is a file of its own.

On CUDA, a call that sets no tile, warps or stages (neither as an option nor through
the environment) is autotuned once per (pattern, kind, head-dim block, dtype, device,
strategy, power-of-two buckets of the lengths and of batch x heads, TMA or not), and the
choice is persisted in the cache (``runtime/tune.py``; ``SPATTN_AUTOTUNE=0`` turns it off): the chosen tile options are
then passed exactly like explicit ones.

A call without options resolves these (environment, TMA, tuned choice) once per call
signature and remembers the answer (:func:`_planned`); a changed environment, layout or
tuner state is a new signature.
"""
from __future__ import annotations

import math

import torch

from ..codegen.config import (ENV_VARS, FLAG_OFF, FLAG_ON, choice, env_overrides, getenv,
                                interpret_mode)
from .inputs import converted
from ..ir.tiles import EMPTY, FULL, PARTIAL
from . import cache as _cache
from . import tune as _tune

LOG2E = 1.4426950408889634
#: The smallest normal fp32 number (2**-126).
FP32_TINY = 2.0 ** -126

_OPTION_NAMES = ("strategy", "block_m", "block_n", "num_warps", "num_stages", "closed_form",
                 "block_m1", "block_n1", "block_m2", "block_n2", "loop", "tables", "tma",
                 "int64")


def tma_ok(*tensors) -> bool:
    """Every tensor can be read through a TMA descriptor over its 4-D [B, heads, L, D]
    layout: contiguous last dim, other strides positive multiples of 16 bytes, base
    16-byte aligned (``cuTensorMapEncodeTiled``'s rules)."""
    for t in tensors:
        if t.dim() != 4 or t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any(s <= 0 or (s * t.element_size()) % 16 for s in t.stride()[:-1]):
            return False
    return True


#: Environment settings the resolved options depend on, per kind (:func:`_planned`).
_PLAN_ENV = {kind: ENV_VARS[kind] + ("SPATTN_TMA", "SPATTN_AUTOTUNE", "SPATTN_CACHE_DIR",
                                     "TRITON_INTERPRET") for kind in ("fwd", "bwd")}

#: TMA by default (``SPATTN_TMA`` unset or ``auto``) on CUDA, per kernel kind.
TMA_AUTO = {"fwd": True, "bwd": False}


def _tma(opts: dict, kind: str, device, *tensors) -> dict:
    """``opts`` with ``tma`` resolved to a bool (see the module docstring)."""
    want = opts.get("tma")
    if want is None:
        env = (getenv("SPATTN_TMA") or "").strip().lower()
        if env in FLAG_ON:
            want = True
        elif env in FLAG_OFF:
            want = False
        elif env not in ("", "auto"):
            raise ValueError(f"SPATTN_TMA={env!r}: expected 1, 0 or auto")
        else:
            want = device.type == "cuda" and TMA_AUTO[kind]
    return {**opts, "tma": bool(want) and _tma_device(device) and tma_ok(*tensors)}


def _tma_device(device) -> bool:
    """TMA exists: the interpreter (which emulates descriptors) or CUDA capability >= 9."""
    if interpret_mode():
        return True
    return device.type == "cuda" and (_cache.capability(device) or (0,))[0] >= 9


def _desc(t, rows: int, block_d: int):
    """A TMA descriptor over ``t`` [B, heads, L, D] with block [1, 1, rows, block_d]."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, block_d])


def _opts(options: dict, kind: str) -> dict:
    bad = set(options) - set(_OPTION_NAMES)
    if bad:
        raise TypeError(f"unknown option(s) {sorted(bad)}; expected {_OPTION_NAMES}")
    out = {k: v for k, v in options.items() if v is not None}
    # Not a kernel option (``strategy.pick`` ignores it): the overrides in force, read once
    # per call, so that ``cache.resolve``'s memo and the autotuner see a changed environment.
    out["_env"] = env_overrides(kind)
    return out


#: Resolved launch options per call signature (:func:`_planned`): signature -> (pattern, opts).
_PLANS: dict = {}
PLANS_SIZE = 256


def _planned(pattern, kind: str, options: dict, tensors: tuple, run, compile_only) -> dict:
    """The options a ``kind`` launch runs with: :func:`_opts`, :func:`_tma` and the
    autotuner's choice (``tune.tuned_options``), resolved once per call signature.

    Those three steps read a dozen environment settings, check every tensor's layout for
    TMA and build the tuner's lookup key (~4 of the ~30 us of Python a forward runs on
    the CPU, more on a GPU host; ``benchmarks/NOTES.md`` row 51). Their
    result depends only on what the signature holds: the pattern (by identity), the
    tensors' shapes, strides, dtype, device and 16-byte alignment, every environment
    setting they read (the overrides of ``kind``, ``SPATTN_TMA``, ``SPATTN_AUTOTUNE``,
    ``SPATTN_CACHE_DIR``, ``TRITON_INTERPRET``) and the tuner's in-memory generation (a
    new choice or ``tune.clear_memory()`` resolves again). Calls with explicit options
    (tests, the tuner's own runs) resolve every time; nothing is remembered while a CUDA
    graph is being captured (the tuner does not tune then). The returned dict is shared:
    callers read it, never modify it.
    """
    def resolve():
        q, k = tensors[0], tensors[1]
        opts = _tma(_opts(options, kind), kind, q.device, *tensors)
        return _tune.tuned_options(
            pattern, kind, head_dim=q.shape[-1], dtype=q.dtype, device=q.device,
            Lq=q.shape[2], Lk=k.shape[2], BH=q.shape[0] * q.shape[1], options=opts, run=run,
            compile_only=compile_only)
    if options:
        return resolve()
    aligned = True
    for t in tensors:
        aligned = aligned and t.data_ptr() % 16 == 0
    sig = (kind, id(pattern), tuple((t.shape, t.stride()) for t in tensors), tensors[0].dtype,
           tensors[0].device, aligned, tuple(getenv(n) for n in _PLAN_ENV[kind]))
    hit = _PLANS.get(sig + (_tune.generation(),))
    if hit is not None and hit[0] is pattern:
        return hit[1]
    opts = resolve()
    if not _tune._capturing():
        if len(_PLANS) >= PLANS_SIZE:
            _PLANS.clear()
        # the generation after resolving: a first call's own tuning is part of its answer
        _PLANS[sig + (_tune.generation(),)] = (pattern, opts)
    return opts


def _scale_log2(scale: float) -> float:
    """The kernels' ``sm_scale_log2`` (fp32): ``scale * log2(e)``, at least
    :data:`FP32_TINY`.

    A smaller positive value would reach the kernel as 0 (fp32 underflow: ``scale=1e-300``)
    or as a subnormal that the GPU flushes to 0, and the masked scores' ``-inf * 0`` are
    NaN.  The floor changes nothing else: below it every ``|s| * scale * log2(e)`` of a
    finite fp32 score ``|s| < 2**100`` is under ``2**-26``, so each softmax weight is 1
    to fp32 precision (``exp2(x) = 1 + 0.69 x``) with the true scale and with the floor
    alike, and the lse is the log of the allowed keys' count either way.
    """
    return max(scale * LOG2E, FP32_TINY)


def _dot_prec(dtype) -> str:
    # fp32 inputs: exact fp32 products ("ieee"), the precision the float64 tests need
    # (1e-3); tf32 would be faster on the GPU but loses ~3 decimal digits.
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------- inputs

def _input_args(pattern, inputs: dict | None, device, int64: bool = False) -> list:
    """Kernel arguments of the runtime inputs, in the order of ``pattern.inputs``: int32
    tensors (cheaper loads; values must fit), int64 tensors for an ``int64`` kernel."""
    args = []
    inputs = inputs or {}
    for name, nd in pattern.inputs.items():
        # one converted copy per input, cached while the input is unchanged
        t = converted(inputs[name], device, torch.int64 if int64 else torch.int32)
        lead = t.dim() - nd
        sb = t.stride(0) if lead >= 1 and t.shape[0] > 1 else 0
        sh = t.stride(1) if lead >= 2 and t.shape[1] > 1 else 0
        args += [t, sb, sh]
        args += [t.stride(lead + d) for d in range(nd)]
        args += [t.shape[lead + d] for d in range(nd)]
    return args


# ------------------------------------------------------------ tile tables

def _classify(pattern, Lq, Lk, bm, bn, *, H, B, q_offset, device, inputs) -> torch.Tensor:
    """Tile classes int8 ``[B', H', nq, nk]`` from the analysis (B', H' may be 1)."""
    # Tiles shared by every head / batch are classified once and broadcast (stride 0).
    from ..ir.nodes import free_vars
    fv = free_vars(pattern.ir)
    nd = dict(pattern.inputs)
    lead = [t.dim() - nd[n] for n, t in (inputs or {}).items() if n in nd]
    sizes = [t.shape for n, t in (inputs or {}).items() if n in nd]
    per_b = "b" in fv or any(l >= 1 and s[0] > 1 for l, s in zip(lead, sizes))
    per_h = bool({"h", "H"} & fv) or any(l >= 2 and s[1] > 1 for l, s in zip(lead, sizes))
    B, H = (B if per_b else 1), (H if per_h else 1)
    if inputs and (not per_b or not per_h):
        inputs = {n: _squeeze_lead(t, nd[n], per_b, per_h) for n, t in inputs.items()}
    from ..ir.tiles import classify
    t = classify(pattern, Lq, Lk, bm, bn, num_heads=H, batch=B, q_offset=q_offset,
                 device=device, inputs=inputs or {}).to(device)
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _squeeze_lead(t: torch.Tensor, nd: int, per_b: bool, per_h: bool) -> torch.Tensor:
    """Drop size-1 leading batch/head dims of an input when the tiles are shared."""
    lead = t.dim() - nd
    if lead == 2 and not per_h:
        t = t[:, 0]
        lead = 1
    if lead == 1 and not per_b and not (t.dim() - nd == 2):
        t = t[0]
    return t


def _csr(sel: torch.Tensor):
    """``ir.tables.csr`` of a bool ``[B', H', n, m]`` as kernel arguments: the flat row
    pointers (``n + 1`` per (b, h)) and the column indices (never empty: a kernel argument
    needs storage)."""
    from ..ir.tables import csr
    ptr, idx = csr(sel)
    if idx.numel() == 0:
        idx = torch.zeros(1, dtype=torch.int32, device=sel.device)
    return ptr.reshape(-1), idx


def _spans(cls: torch.Tensor):
    """Per row of ``cls [B', H', n, m]``: ``[lo, hi, flo, fhi]`` int32 ``[B', H', n, 4]`` --
    the span ``[lo, hi)`` from the first to the last non-EMPTY tile and, inside it, the
    longest run ``[flo, fhi)`` of FULL tiles (``flo = fhi = hi`` without one) --, the
    *waste* of visiting every tile of ``[lo, hi)`` with only ``[flo, fhi)`` unmasked (the
    EMPTY tiles inside the span plus the FULL tiles outside the run, summed over all rows),
    and each row's work ``[B', H', n]`` for the heavy-first order: its non-EMPTY tiles,
    PARTIAL ones counted twice (they evaluate the predicate).

    A kernel that runs ``[lo, flo)`` and ``[fhi, hi)`` with the predicate and ``[flo, fhi)``
    without is correct for any classes (an EMPTY tile under the predicate contributes
    nothing); with zero waste it visits exactly the tiles of the CSR lists, with the same
    masking, and addresses them from the loop counter instead of an index load."""
    m = cls.shape[-1]
    j = torch.arange(m, device=cls.device, dtype=torch.int32)
    ne = cls != EMPTY
    full = cls == FULL
    hi = torch.where(ne, j + 1, 0).amax(-1)
    lo = torch.minimum(torch.where(ne, j, m).amin(-1), hi)
    # length of the FULL run ending at j: j + 1 - (first index after the last non-FULL <= j)
    run_start = torch.where(full, -1, j).cummax(-1).values + 1
    run = torch.where(full, j + 1 - run_start, 0)
    best, at = run.max(-1)
    fhi = torch.where(best > 0, at + 1, hi)
    flo = fhi - best
    count = ne.sum(-1, dtype=torch.int32)
    n_full = full.sum(-1, dtype=torch.int32)
    waste = (hi - lo - count) + (n_full - best)
    spans = torch.stack([lo, hi, flo, fhi], dim=-1).to(torch.int32)
    return spans, waste.sum(), 2 * count - n_full


#: ``tables`` launcher option / ``$SPATTN_TABLES``: how the table strategy's kernels find
#: their tiles.  "auto": spans where they visit exactly the CSR lists' tiles (zero waste,
#: e.g. ``causal & same(doc)`` with sorted ids), else the CSR lists; "csr" / "spans": always.
TABLE_MODES = ("auto", "csr", "spans")


def _table_mode(opts: dict) -> str:
    return choice(opts.get("tables"), "tables", "SPATTN_TABLES", TABLE_MODES)


def _table_dims(tile, transposed, Lq, Lk) -> tuple:
    """(rows, columns) of a table of ``tile = (bm, bn)`` tiles: query tiles by key tiles,
    or key tiles by query tiles when ``transposed`` (dK/dV)."""
    nq, nk = -(-Lq // tile[0]), -(-Lk // tile[1])
    return (nk, nq) if transposed else (nq, nk)


class _Job:
    """One table to build: its tile ``(bm, bn)``, orientation (``transposed``: rows are key
    tiles, as dK/dV reads them) and the fine classes ``fine [B', H', nfq, nfk]`` of
    ``fine_tile`` tiles it is pooled from (:func:`_classes`)."""

    def __init__(self, fine, fine_tile, tile, transposed, Lq, Lk):
        self.fine, self.fine_tile, self.tile, self.transposed = fine, fine_tile, tile, transposed
        self.Lq, self.Lk = Lq, Lk
        (bm, bn), (fm, fn) = tile, fine_tile
        self.factors = (bm // fm, bn // fn)
        self.n_rows, self.n_cols = _table_dims(tile, transposed, Lq, Lk)
        self.ragged = (Lq % bm if transposed else Lk % bn) != 0

    def classes(self) -> torch.Tensor:
        """The table's classes ``[B', H', n_rows, n_cols]``: pooled, the ragged last column
        demoted (FULL tiles there need a bounds mask), transposed for dK/dV."""
        (bm, bn), Lq, Lk = self.tile, self.Lq, self.Lk
        cls = _pool(self.fine, self.fine_tile, self.tile, Lq, Lk)
        if self.transposed:
            return _demote_ragged(cls, Lq, bm, 2).transpose(2, 3)
        return _demote_ragged(cls, Lk, bn, 3)


def _device_tables(device) -> bool:
    """Whether ``auto``-mode tables come from the one-launch kernels of
    :mod:`spattn.runtime.spans_kernel` (on CUDA; the tests also run them on the CPU under
    the interpreter)."""
    return torch.device(device).type == "cuda"


def _table_many(items: list, mode: str = "auto") -> list:
    """For each :class:`_Job` of ``items``: (the table arguments, each row's work
    ``[B', H', n_rows]`` for :func:`_grid_order`, whether the kernel runs spans), with one
    device read for all (the spans' waste decides the form in ``auto`` mode).  On CUDA in
    ``auto`` mode a table is one kernel launch from the fine classes
    (:func:`spattn.runtime.spans_kernel.table_rows`: pooling, demotion, transposition and
    the row summary; the same spans wherever the waste is zero, the only place they are
    read); its classes are pooled in torch only where CSR lists are built.

    Table arguments ``[ROWS_P, COLS_P, ROWS_F, COLS_F, SPAN, stride_b, stride_h]``: the CSR
    of PARTIAL and of FULL tiles and the spans ``[B', H', n_rows + 1, 4]``, all indexed by
    row ``b * stride_b + h * stride_h + i``; what the kernel does not read is a stand-in."""
    if not items:
        return []
    classes = [None] * len(items)
    if mode == "auto" and _device_tables(items[0].fine.device):
        from .spans_kernel import table_rows      # one launch per table instead of ~45 ops
        waste = torch.zeros(len(items), dtype=torch.int32, device=items[0].fine.device)
        parts = []
        for t, job in enumerate(items):
            parts.append(table_rows(job.fine, job.factors, job.n_rows, job.n_cols,
                                    transposed=job.transposed, ragged=job.ragged,
                                    waste=waste[t:t + 1]))
        use = [w == 0 for w in waste.tolist()]
    else:
        classes = [job.classes() for job in items]
        parts = []
        for cls in classes:
            spans, waste, work = _spans(cls)
            spans = torch.nn.functional.pad(spans, (0, 0, 0, 1)).contiguous()  # padding row
            parts.append((spans, work, waste))
        if mode == "auto":
            use = [w == 0 for w in torch.stack([w for _, _, w in parts]).tolist()]
        else:
            use = [mode == "spans"] * len(items)
    out = []
    for job, cls, (spans, work, *_), use_spans in zip(items, classes, parts, use):
        Bp, Hp = job.fine.shape[0], job.fine.shape[1]
        if use_spans:
            csr = [spans] * 4
        else:
            cls = job.classes() if cls is None else cls
            csr = [*_csr(cls == PARTIAL), *_csr(cls == FULL)]
        # the kernel reads row (b, h, i) at b * sb + h * sh + i of the flat pointers
        sb = Hp * (job.n_rows + 1) if Bp > 1 else 0
        sh = job.n_rows + 1 if Hp > 1 else 0
        out.append(([*csr, spans, sb, sh], work, use_spans))
    return out


def _grid_order(work: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """The programs' work items, int32 ``[B * H * n]``: item ``(b * H + h) * n + i`` is
    tile ``i`` of (batch, head) ``(b, h)``, with ``work [B', H', n]`` (``B'``, ``H'`` 1 or
    ``B``, ``H``) each tile's cost.

    Heavy first across the whole grid (a heavy tile started last is the tail of the
    launch: the sink key tile of ``causal & (window | sink)`` has ~16x the work of the
    others), but only as finely as work classes of a factor of two: within a class the
    items stay head by head, tiles of a head in decreasing work.  CUDA starts programs
    in index order, so the programs resident together are then mostly neighbouring
    tiles of one head, which read the same keys and values through L2 (an order
    interleaving the heads lost ~12% on ``causal & same(doc)`` and ``chunked & causal``
    at N = 65536 on an H200: benchmarks/NOTES.md)."""
    n = work.shape[-1]
    work = work.to(torch.int64).expand(B, H, n)
    rank = torch.argsort(-work, dim=-1, stable=True)
    item = torch.arange(B * H, device=work.device).view(B, H, 1) * n + rank
    # the class floor(log2(work)) + 1, exactly (frexp: w = m * 2**e, m in [0.5, 1));
    # CUDA's log2 of 8.0 is 2.999..., which moved such tiles a class down
    klass = torch.frexp(torch.gather(work, -1, rank).clamp(min=1).to(torch.float64)).exponent
    perm = torch.argsort(-klass.reshape(-1), stable=True)
    return item.reshape(-1)[perm].to(torch.int32).contiguous()


def _demote_ragged(cls: torch.Tensor, L: int, block: int, axis: int) -> torch.Tensor:
    """FULL tiles on a ragged edge still need a bounds mask: count them as PARTIAL."""
    if L % block == 0:
        return cls
    cls = cls.clone()
    edge = cls.select(axis, cls.shape[axis] - 1)
    edge[edge == FULL] = PARTIAL
    return cls


def _pool(cls: torch.Tensor, fine: tuple, tile: tuple, Lq: int, Lk: int) -> torch.Tensor:
    """Classes of ``tile = (bm, bn)`` tiles from classes ``cls`` of finer ``fine = (fm, fn)``
    tiles (``fm | bm``, ``fn | bn``): a tile is EMPTY iff all its sub-tiles are, FULL iff all
    are (sub-tiles beyond the lengths count as both).  As exact as the fine classes: each
    class is a statement about every in-range pair of the tile."""
    (fm, fn), (bm, bn) = fine, tile
    if (fm, fn) == (bm, bn):
        return cls
    rm, rn = bm // fm, bn // fn
    nq, nk = -(-Lq // bm), -(-Lk // bn)
    pad = (0, nk * rn - cls.shape[3], 0, nq * rm - cls.shape[2])
    nonempty = torch.nn.functional.pad(cls != EMPTY, pad, value=False)
    full = torch.nn.functional.pad(cls == FULL, pad, value=True)
    shape = (cls.shape[0], cls.shape[1], nq, rm, nk, rn)
    nonempty = nonempty.view(shape).any(5).any(3)
    full = full.view(shape).all(5).all(3)
    return torch.where(full, FULL, nonempty.to(torch.int8)).to(torch.int8)


_CLASS_MEMO: "OrderedDict" = None
CLASS_MEMO_SIZE = 8
#: tiles are classified at most this coarse (per side), and coarser shapes pooled: the
#: forward's 128x64 and the backward's 64x128 (dK/dV) then share one classification at
#: 64x64 (a classification is ~40 device launches on the GPU, a pooling ~10)
CLASS_TILE = 64


def _classes(pattern, Lq, Lk, tiles, *, B, H, q_offset, device, inputs) -> tuple:
    """``(fine, tables)``: for each ``(bm, bn)`` of ``tiles`` the classified tile shape
    and classes ``(fine_tile, classes)`` it is pooled from (:func:`_pool`, or the table
    kernel on CUDA), and the dict in which :func:`_tables` keeps what it builds from this
    classification.  The shapes share one classification where they can: a shape whose
    tiles are unions of tiles already classified for the same call (pattern, lengths,
    offset, inputs by identity and version: the forward's, say) is pooled from them; the
    others from one classification at their common divisor tile, at most
    :data:`CLASS_TILE` per side.  The backward needs two tile shapes (dQ, dK/dV), the
    forward one: a training step classifies once instead of three times."""
    import math
    from collections import OrderedDict
    global _CLASS_MEMO
    if _CLASS_MEMO is None:
        _CLASS_MEMO = OrderedDict()
    key = _memo_key(pattern, "classes", Lq, Lk, (), B, H, q_offset, device, inputs)
    _, have, tabs = _CLASS_MEMO.get(key, (None, {}, {}))

    def known(t):
        return next((f for f in have if t[0] % f[0] == 0 and t[1] % f[1] == 0), None)

    missing = [t for t in tiles if known(t) is None]
    if missing:
        g = (math.gcd(CLASS_TILE, *(t[0] for t in missing)),
             math.gcd(CLASS_TILE, *(t[1] for t in missing)))
        have = dict(have)
        have[g] = _classify(pattern, Lq, Lk, g[0], g[1], H=H, B=B, q_offset=q_offset,
                            device=device, inputs=inputs)
        _CLASS_MEMO[key] = (tuple((inputs or {}).values()), have, tabs)
        while len(_CLASS_MEMO) > CLASS_MEMO_SIZE:
            _CLASS_MEMO.popitem(last=False)
    if key in _CLASS_MEMO:
        _CLASS_MEMO.move_to_end(key)
    return [(known(t), have[known(t)]) for t in tiles], tabs


def _tables(pattern, Lq, Lk, specs, *, B, H, q_offset, device, inputs, mode, HK=None) -> list:
    """``(table arguments, grid order, spans?)`` for each ``(tile, transposed)`` of ``specs``
    (``transposed``: rows are key tiles, as dK/dV reads them, over ``HK`` key heads whose
    work sums that of their query heads), built once per classification: they are kept
    with the classes in their memo entry, so the dQ kernel reuses the forward's table and
    order when their tile shapes agree (the autotuner's usual choice, 128x64 for both), and
    the tables built together share one device read."""
    HK = H if HK is None else HK
    fine_all, tabs = _classes(pattern, Lq, Lk, [t for t, _ in specs], B=B, H=H,
                              q_offset=q_offset, device=device, inputs=inputs)
    todo = {}
    for (tile, transposed), (fine_tile, fine) in zip(specs, fine_all):
        tkey = (tile, transposed, mode)
        if tkey not in tabs and tkey not in todo:
            todo[tkey] = _Job(fine, fine_tile, tile, transposed, Lq, Lk)
    tabs.update(zip(todo, _table_many(list(todo.values()), mode)))
    out = []
    for t, tr in specs:
        args, work, spans = tabs[(t, tr, mode)]
        okey = ("order", t, tr, mode, B, HK if tr else H)
        if okey not in tabs:
            tabs[okey] = _order(work, B, HK if tr else H, t, tr, Lq, Lk)
        out.append((args, tabs[okey], spans))
    return out


def _order(work, B, HO, tile, transposed, Lq, Lk) -> torch.Tensor:
    """:func:`_grid_order` of a table's rows over ``HO`` heads (for dK/dV the key heads,
    whose work sums that of their query heads when the tiles are per head): one key
    kernel and a sort on CUDA (:func:`spattn.runtime.spans_kernel.grid_order`)."""
    Hp = work.shape[1]
    group = work.shape[1] // HO if transposed and Hp > 1 else 1
    if _device_tables(work.device):
        from .spans_kernel import grid_order
        _, n_cols = _table_dims(tile, transposed, Lq, Lk)
        order = grid_order(work, B, HO, group, w_max=2 * n_cols * group)
        if order is not None:
            return order
    if group > 1:
        work = work.view(work.shape[0], HO, group, work.shape[2]).sum(2)
    return _grid_order(work, B, HO)


def fwd_tables(pattern, Lq, Lk, block_m, block_n, *, B, H, q_offset, device, inputs,
               tables="auto"):
    """What the forward launcher of the table strategy builds for a new shape (then
    memoises): the tile classes (shared by the heads and batches that share them), the
    spans or CSR lists of key tiles per query tile (``tables``: see :data:`TABLE_MODES`),
    the heavy-first order and whether spans are used.  ``benchmarks/bench.py`` times
    exactly this as the setup cost of a shape."""
    (out,) = _tables(pattern, Lq, Lk, [((block_m, block_n), False)], B=B, H=H,
                     q_offset=q_offset, device=device, inputs=inputs, mode=tables)
    return out


def bwd_tables(pattern, Lq, Lk, blocks, *, B, H, q_offset, device, inputs, tables="auto",
               HK=None):
    """What the backward launcher of the table strategy builds for a new shape: the dQ
    tables over (BLOCK_M2, BLOCK_N2) tiles and the transposed dK/dV tables over
    (BLOCK_M1, BLOCK_N1) tiles (``blocks = (m1, n1, m2, n2)``), each as (table arguments,
    grid order, spans?) (spans or CSR chosen per kernel).  The classes come from
    :func:`_classes`: after the forward of the same call, often without classifying.
    ``HK`` key heads (default ``H``): a dK/dV program serves the ``H // HK`` query heads
    of its key head, its work is theirs summed."""
    m1, n1, m2, n2 = blocks
    # dQ: rows = query tiles of BLOCK_M2; dK/dV: the transpose of the (BLOCK_M1, BLOCK_N1)
    # classes, rows = key tiles of BLOCK_N1
    return tuple(_tables(pattern, Lq, Lk, [((m2, n2), False), ((m1, n1), True)], B=B, H=H,
                         q_offset=q_offset, device=device, inputs=inputs, mode=tables, HK=HK))


# ------------------------------------------------------------ table memo

_TABLE_MEMO: "OrderedDict" = None
TABLE_MEMO_SIZE = 32


def _memo_key(pattern, kind, Lq, Lk, tiles, B, H, q_offset, device, inputs):
    """Key of a tile table: shapes (``tiles``: every tile shape it was built for),
    offset, and each input's identity and version.

    The memo holds a reference to every input tensor it keys on, so an ``id`` cannot
    be reused by another tensor while its entry lives; ``_version`` changes on any
    in-place write, so a modified input is re-analysed.
    """
    ins = tuple(sorted((n, id(t), t._version, tuple(t.shape), t.stride(), t.data_ptr())
                       for n, t in (inputs or {}).items()))
    return (pattern.source, kind, Lq, Lk, tuple(tiles), B, H, q_offset, str(device), ins)


def _memo(key, inputs, build):
    global _TABLE_MEMO
    from collections import OrderedDict
    if _TABLE_MEMO is None:
        _TABLE_MEMO = OrderedDict()
    hit = _TABLE_MEMO.get(key)
    if hit is not None:
        _TABLE_MEMO.move_to_end(key)
        return hit[0]
    value = build()
    _TABLE_MEMO[key] = (value, tuple((inputs or {}).values()))
    while len(_TABLE_MEMO) > TABLE_MEMO_SIZE:
        _TABLE_MEMO.popitem(last=False)
    return value


# ----------------------------------------------------------- ranges order

_order_cache: dict = {}


def _ranges_order(intervals, *, n_tiles, block, other_len, other_block, length, shift, query,
                  device, H, B=1):
    """The programs' work items for the ranges strategy (:func:`_grid_order`; host
    heuristic, cached).

    Counts the tiles each interval spans at head 0 as every head's work: for causal
    patterns the last query tiles (longest rows) start first.
    """
    from ..ir.evaluate import evaluate
    # keyed by the intervals' identity (the config memo keeps one closed form per pattern):
    # hashing or printing the expression trees on every call costs more than the launch
    key = (id(intervals), n_tiles, block, other_len, other_block, length, shift, query,
           device, H, B)
    hit = _order_cache.get(key)
    if hit is not None and hit[0] is intervals:
        return hit[1]
    try:
        start = torch.arange(n_tiles, dtype=torch.int64) * block
        end = torch.clamp(start + block, max=length) - 1
        if query:
            env = {"qs": start + shift, "qe": end + shift}
        else:
            env = {"ks": start, "ke": end}
        env.update({"h": 0, "b": 0, "Lq": length if query else other_len,
                    "Lk": other_len if query else length, "H": H})
        work = torch.zeros(n_tiles, dtype=torch.int64)
        for iv in intervals:
            lo = 0 if iv.lo is None else torch.as_tensor(evaluate(iv.lo, env))
            hi = other_len - 1 if iv.hi is None else torch.as_tensor(evaluate(iv.hi, env))
            osh = 0 if query else shift
            lo = torch.clamp(torch.as_tensor(lo) - osh, min=0)
            hi = torch.clamp(torch.as_tensor(hi) - osh, max=other_len - 1)
            work += torch.clamp(hi // other_block - lo // other_block + 1, min=0) * (hi >= lo)
    except Exception:   # heuristic only: natural order if the closed form cannot be evaluated
        work = torch.zeros(n_tiles, dtype=torch.int64)
    order = _grid_order(work.view(1, 1, n_tiles), B, H).to(device)
    if len(_order_cache) > 256:
        _order_cache.clear()
    _order_cache[key] = (intervals, order)
    return order


# ---------------------------------------------------------------- forward

def _interpreter_bf16(*ts) -> bool:
    """Triton 3.6's interpreter feeds bf16 bits to numpy's matmul unconverted (wrong
    products): under TRITON_INTERPRET=1 bf16 runs are computed in fp32 and cast back."""
    return interpret_mode() and any(t.dtype == torch.bfloat16 for t in ts)


def fwd(pattern, q, k, v, *, scale: float, q_offset: int, inputs: dict | None = None,
        **options):
    """Forward attention: ``(o [B, Hq, Lq, D] in q.dtype, lse fp32 [B, Hq, Lq])``."""
    if _interpreter_bf16(q, k, v):
        o, lse = fwd(pattern, q.float(), k.float(), v.float(), scale=scale, q_offset=q_offset,
                     inputs=inputs, **options)
        return o.to(q.dtype), lse
    opts = _planned(
        pattern, "fwd", options, (q, k, v),
        run=lambda t: _fwd(pattern, q, k, v, scale=scale, q_offset=q_offset, inputs=inputs,
                           opts=t),
        compile_only=lambda t: _fwd(pattern, q, k, v, scale=scale, q_offset=q_offset,
                                    inputs=inputs, opts=t, warmup=True))
    return _fwd(pattern, q, k, v, scale=scale, q_offset=q_offset, inputs=inputs, opts=opts)


def _launch(kernel, grid, warmup, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, or with ``warmup`` only its compilation
    (Triton's ``warmup``: nothing runs, no output is written)."""
    if warmup:
        return kernel.warmup(*args, grid=grid, **kwargs)
    return kernel[grid](*args, **kwargs)


def _fwd(pattern, q, k, v, *, scale, q_offset, inputs, opts, warmup=False):
    B, H, Lq, D = q.shape
    HK, Lk = k.shape[1], k.shape[2]
    mod, cfg, cf = _cache.load_with_form(pattern, "fwd", head_dim=D, dtype=q.dtype,
                                         device=q.device, **opts)
    bm, bn = cfg.block_m, cfg.block_n
    nq = -(-Lq // bm)
    o = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    in_args = _input_args(pattern, inputs, q.device, cfg.int64)
    if cfg.strategy == "table":
        mode = _table_mode(opts)

        def build():
            return fwd_tables(pattern, Lq, Lk, bm, bn, B=B, H=H, q_offset=q_offset,
                              device=q.device, inputs=inputs, tables=mode)
        key = _memo_key(pattern, "fwd", Lq, Lk, (bm, bn, mode), B, H, q_offset, q.device,
                        inputs)
        tab, order, spans = _memo(key, inputs, build)
        table_kw = {"SPANS": spans}
    else:
        tab, table_kw = [], {}
        order = _ranges_order(cf.rows, n_tiles=nq, block=bm, other_len=Lk, other_block=bn,
                              length=Lq, shift=q_offset, query=True, device=q.device, H=H,
                              B=B)
    persistent = cfg.loop == "persistent"
    if persistent:
        n_work = B * H * nq
        grid = (_persistent_programs(mod, cfg, q.device, n_work),)
        extra = (B * H, n_work)
    else:
        grid, extra = (nq * B * H,), ()
    qa, ka, va, oa = q, k, v, o
    if cfg.tma:
        qa, oa = _desc(q, bm, cfg.block_d), _desc(o, bm, cfg.block_d)
        ka, va = _desc(k, bn, cfg.block_d), _desc(v, bn, cfg.block_d)
    compiled = _launch(
        mod.KERNEL, grid, warmup, qa, ka, va, oa, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        *in_args, *tab,
        order,
        _scale_log2(scale), H, H // HK, Lq, Lk, q_offset, *extra,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg.block_d, HEAD_DIM=D, DOT_PREC=_dot_prec(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **table_kw,
    )
    if persistent and not warmup:
        _note_occupancy(mod, cfg, q.device, compiled)
    return o, lse


# ------------------------------------------------------- persistent grid

#: Programs of a persistent kernel under the interpreter: fewer than the work items of
#: any but the smallest test shapes, so every test exercises the work-item loop.
INTERPRET_PROGRAMS = 3
_OCCUPANCY: dict = {}     # (kernel name, config, device) -> resident programs per SM


def _persistent_programs(mod, cfg, device, n_work: int) -> int:
    """Programs to launch for ``n_work`` work items: one per resident slot of the device
    (SMs x programs per SM, learnt from the compiled kernel's registers and shared memory
    after its first launch; 1 per SM until then), never more than the work."""
    if interpret_mode() or device.type != "cuda":
        return max(1, min(n_work, INTERPRET_PROGRAMS))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    per_sm = _OCCUPANCY.get((mod.KERNEL.__name__, cfg, str(device)), 1)
    return max(1, min(n_work, sms * per_sm))


def _note_occupancy(mod, cfg, device, compiled) -> None:
    """Record how many programs of ``compiled`` fit on one SM (registers, shared memory,
    threads), as the CUDA occupancy calculator counts them."""
    key = (mod.KERNEL.__name__, cfg, str(device))
    if key in _OCCUPANCY or device.type != "cuda":
        return
    per_sm = 1
    try:
        import triton
        props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
        threads = 32 * cfg.num_warps
        regs = max(1, int(compiled.n_regs)) * threads
        smem = max(1, int(compiled.metadata.shared))
        per_sm = max(1, min(props["max_num_regs"] // regs, props["max_shared_mem"] // smem,
                            2048 // threads))
    except Exception:   # no compiled-kernel metadata (other Triton versions): one per SM
        pass
    _OCCUPANCY[key] = per_sm


# --------------------------------------------------------------- backward

def bwd(pattern, q, k, v, o, lse, do, *, scale: float, q_offset: int, inputs: dict | None = None,
        **options):
    """Gradients ``(dq, dk, dv)`` (dk, dv summed over the query heads of each key head)."""
    if _interpreter_bf16(q, k, v, o, do):
        grads = bwd(pattern, q.float(), k.float(), v.float(), o.float(), lse, do.float(),
                    scale=scale, q_offset=q_offset, inputs=inputs, **options)
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))
    opts = _planned(
        pattern, "bwd", options, (q, k, v, do, o),
        run=lambda t: _bwd(pattern, q, k, v, o, lse, do, scale=scale, q_offset=q_offset,
                           inputs=inputs, opts=t),
        compile_only=lambda t: _bwd(pattern, q, k, v, o, lse, do, scale=scale,
                                    q_offset=q_offset, inputs=inputs, opts=t, warmup=True))
    return _bwd(pattern, q, k, v, o, lse, do, scale=scale, q_offset=q_offset, inputs=inputs,
                opts=opts)


def _bwd(pattern, q, k, v, o, lse, do, *, scale, q_offset, inputs, opts, warmup=False):
    B, H, Lq, D = q.shape
    HK, Lk = k.shape[1], k.shape[2]
    G = H // HK
    mod, cfg, cf = _cache.load_with_form(pattern, "bwd", head_dim=D, dtype=q.dtype,
                                         device=q.device, **opts)
    m1, n1 = cfg.block_m, cfg.block_n          # dK/dV: BLOCK_M1 queries per step, BLOCK_N1 keys
    m2, n2 = cfg.block_m2, cfg.block_n2        # dQ: BLOCK_M2 queries, BLOCK_N2 keys per step
    nq2, nk1 = -(-Lq // m2), -(-Lk // n1)
    dev = q.device
    prec = _dot_prec(q.dtype)
    kw = dict(BLOCK_D=cfg.block_d, HEAD_DIM=D, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    # written by the dQ kernel for the dK/dV kernel: delta = rowsum(dO * O), lse in log2 units
    delta, lse2 = torch.empty((2, B, H, Lq), dtype=torch.float32, device=dev).unbind(0)
    lse = lse.contiguous()
    in_args = _input_args(pattern, inputs, dev, cfg.int64)
    if cfg.strategy == "table":
        mode = _table_mode(opts)

        def build():
            return bwd_tables(pattern, Lq, Lk, (m1, n1, m2, n2), B=B, H=H, q_offset=q_offset,
                              device=dev, inputs=inputs, tables=mode, HK=HK)
        key = _memo_key(pattern, "bwd", Lq, Lk, (m1, n1, m2, n2, mode, HK), B, H, q_offset,
                        dev, inputs)
        (tab_q, order_q, spans_q), (tab_k, order_k, spans_k) = _memo(key, inputs, build)
        kw_k, kw_q = {"SPANS": spans_k}, {"SPANS": spans_q}
    else:
        tab_q = tab_k = []
        kw_k = kw_q = {}
        order_q = _ranges_order(cf.rows, n_tiles=nq2, block=m2, other_len=Lk, other_block=n2,
                                length=Lq, shift=q_offset, query=True, device=dev, H=H, B=B)
        order_k = _ranges_order(cf.cols, n_tiles=nk1, block=n1, other_len=Lq, other_block=m1,
                                length=Lk, shift=q_offset, query=False, device=dev, H=HK, B=B)

    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=dev)
    dk = torch.empty((B, HK, Lk, D), dtype=k.dtype, device=dev)
    dv = torch.empty((B, HK, Lk, D), dtype=v.dtype, device=dev)
    bd = cfg.block_d
    if cfg.tma:   # per kernel: the descriptors' blocks are that kernel's tiles
        args_k = (_desc(q, m1, bd), _desc(k, n1, bd), _desc(v, n1, bd), _desc(do, m1, bd),
                  lse2, delta, _desc(dk, n1, bd), _desc(dv, n1, bd))
        args_q = (_desc(q, m2, bd), _desc(k, n2, bd), _desc(v, n2, bd), _desc(do, m2, bd),
                  _desc(o, m2, bd), lse, lse2, delta, _desc(dq, m2, bd))
    else:
        args_k = (q, k, v, do, lse2, delta, dk, dv)
        args_q = (q, k, v, do, o, lse, lse2, delta, dq)
    _launch(
        mod.DQ, (nq2 * B * H,), warmup, *args_q,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *o.stride(), *dq.stride(),
        *in_args, *tab_q,
        order_q,
        scale, _scale_log2(scale), H, G, Lq, Lk, q_offset,
        BLOCK_M2=m2, BLOCK_N2=n2, DOT_PREC=prec, **kw, **kw_q,
    )
    _launch(
        mod.DKDV, (nk1 * B * HK,), warmup, *args_k,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        *in_args, *tab_k,
        order_k,
        scale, _scale_log2(scale), H, HK, G, Lq, Lk, q_offset,
        BLOCK_M1=m1, BLOCK_N1=n1, DOT_PREC=prec, **kw, **kw_k,
    )
    return dq, dk, dv
