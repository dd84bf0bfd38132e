"""Tile tables of the table strategy: classes, spans or CSR lists, and the grid order.

Built from the tile classes of the analysis (:func:`spattn.ir.tiles.classify`) on their
device, vectorised (no Python loop over tiles). One :class:`Analysis` holds what a call
classifies and builds (a plan keeps it): the tile shapes of a training step's kernels share
one classification (coarser shapes are pooled from finer ones, :func:`_pool`), and a table
built for one kernel serves every other kernel of the same tile shape.

Table arguments of a kernel, ``[ROWS_P, COLS_P, ROWS_F, COLS_F, SPAN, stride_b, stride_h]``:
the CSR lists of PARTIAL and of FULL tiles and the spans ``[B', H', n_rows + 1, 4]`` (or,
in the runs form, each row's FULL tiles as runs ``[B', H', n_rows + 1, 8]``), all indexed
by row ``b * stride_b + h * stride_h + i``; what the kernel does not read is a stand-in.
The form (:data:`TABLE_FORMS`, chosen by :data:`TABLE_MODES`) is the ``SPANS`` and
``RUNS`` constexprs.
"""
from __future__ import annotations

import math

import torch

from ..ir.tiles import EMPTY, FULL, PARTIAL

#: tiles are classified at most this coarse (per side), and coarser shapes pooled: a
#: training step's tile shapes then share one classification at their common divisor
#: (a classification is ~40 device launches on the GPU, a pooling ~10)
CLASS_TILE = 64


def _classify(pattern, Lq, Lk, bm, bn, *, H, B, device, inputs, q_offset=None,
              positions=None) -> torch.Tensor:
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
                 positions=positions, device=device, inputs=inputs or {}).to(device)
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


#: The tile side of the row statistic of the tuning key (:meth:`Analysis.row_span`).
ROW_TILE = CLASS_TILE
#: Heads whose closed-form rows :meth:`Analysis.row_span` counts, for per-head patterns.
ROW_HEADS = 16


def row_bucket(tiles: int, rows: int) -> int:
    """``floor(log2(tiles / rows))`` in integers (exact, the same in every process): the
    tuning key's bucket of the mean number of non-EMPTY tiles in a non-empty query row;
    -1 when no row has one."""
    return (tiles // rows).bit_length() - 1 if rows > 0 and tiles >= rows else -1


#: ``tables`` launcher option / ``$SPATTN_TABLES``: how the table strategy's kernels find
#: their tiles.  "auto": spans where they visit exactly the CSR lists' tiles (zero waste,
#: e.g. ``causal & same(doc)`` with sorted ids), else runs where every row's FULL tiles are
#: runs and the rows hold enough of them (:func:`_runs`, :data:`RUNS_MIN_TILES`: a token
#: layout's strided windows), else the CSR lists; "csr" / "spans": always; "runs":
#: wherever the FULL tiles are runs, else the CSR lists.
TABLE_MODES = ("auto", "csr", "spans", "runs")
#: The forms a table takes in a kernel (the ``SPANS`` and ``RUNS`` launch constexprs).
TABLE_FORMS = ("csr", "spans", "runs")
#: Integers per row of the runs form (:func:`_runs`).
RUN_FIELDS = 8
#: ``auto`` takes the runs form where the rows with FULL tiles hold at least this many on
#: average. Measured on an H200 (benchmarks/RESULTS.md, "a layout's FULL key tiles as
#: runs"): 3-4% faster forward and forward+backward with 50-81 per row (strided FLUX and
#: Hunyuan layouts), up to 5% slower forward+backward with a few per row (``power2(256)``,
#: ``strided(128)`` in sequence order), where the row's record loads before its loop are
#: not paid back.
RUNS_MIN_TILES = 8


def _runs(full: torch.Tensor, min_tiles: int = 0):
    """Each row's FULL tiles as *runs*, or None where one row's are not: for ``full``, bool
    ``[B', H', n, m]``, the records int32 ``[B', H', n, RUN_FIELDS]``
    ``[lo, L, R2, P2, P1, count, 0, 0]`` such that the row's FULL tiles are exactly

        lo + a * P1 + b * P2 + j,   0 <= a < R1,  0 <= b < R2,  0 <= j < L

    (``count = R1 * R2 * L``; ``L <= P2`` and ``R2 * P2 <= P1``, so every step of the loop
    over ``[0, count)`` reaches a different tile). A query tile of a box layout reaches the
    key boxes of a 2-D window as ``R2`` runs of ``L`` boxes one grid row (``P2`` tiles)
    apart, those of a 3-D window as ``R1`` such slabs ``P1`` tiles apart: the kernel then
    finds each FULL tile from its loop counter, with no index load (the CSR list's load
    cost about 5% of an all-FULL forward on an H200, benchmarks/RESULTS.md). A row without
    FULL tiles has ``count = 0`` (and ``L = R2 = P2 = P1 = 1``).

    The parameters come from the row's maximal runs of FULL tiles (their first start, the
    first run's length, the pitch of the first starts); the records are kept only if they
    rebuild every row exactly: a proof, like the classes they restate. ``min_tiles``: None
    also where there is no FULL tile or the rows with FULL tiles hold fewer than
    ``min_tiles`` on average (:data:`RUNS_MIN_TILES`)."""
    m = full.shape[-1]
    dev = full.device
    i32 = torch.int32
    count = full.sum(-1, dtype=i32)
    if min_tiles:           # (one read first: most tables that fail it skip the rest)
        total = count.sum()
        if not bool((total > 0) & (total >= min_tiles * (count > 0).sum())):
            return None
    j = torch.arange(m, device=dev, dtype=i32)
    before = torch.nn.functional.pad(full[..., :-1], (1, 0), value=False)
    after = torch.nn.functional.pad(full[..., 1:], (0, 1), value=False)
    first = full & ~before
    n_runs = first.sum(-1, dtype=i32)
    # the runs' starts in order (a scatter by rank; the other tiles land in column m)
    starts = torch.full((*full.shape[:-1], m + 1), m, dtype=i32, device=dev)
    starts.scatter_(-1, torch.where(first, first.cumsum(-1) - 1, m), j.expand(full.shape))
    starts = starts[..., :m]
    some = n_runs > 0
    lo = torch.where(some, starts[..., 0], 0)
    # (a row without FULL tiles: L = 1, count 0, so that no step divides by 0)
    L = torch.where(some, torch.where(full & ~after, j, m).amin(-1) - lo + 1, 1)
    second = starts[..., 1] if m > 1 else torch.full_like(lo, m)
    P2 = torch.where(n_runs > 1, second - lo, L.clamp(min=1))
    pitch = (starts - lo[..., None] == j * P2[..., None]) & (j < n_runs[..., None])
    R2 = pitch.cumprod(-1, dtype=i32).sum(-1, dtype=i32).clamp(min=1)
    at = starts.gather(-1, R2.clamp(max=m - 1).long()[..., None])[..., 0]
    P1 = torch.where(R2 < n_runs, at - lo, (R2.long() * P2).clamp(max=2 ** 31 - 1).to(i32))
    R1 = torch.where(some, n_runs // R2, 0)
    x = j - lo[..., None]
    a = torch.div(x, P1.clamp(min=1)[..., None], rounding_mode="floor")
    rest = x - a * P1[..., None]
    b = torch.div(rest, P2.clamp(min=1)[..., None], rounding_mode="floor")
    rest -= b * P2[..., None]
    member = (x >= 0) & (a < R1[..., None]) & (b < R2[..., None]) & (rest < L[..., None])
    exact = ((member == full).all(-1) & (R1.long() * R2 * L == count)
             & (L <= P2) & (R2.long() * P2 <= P1)).all()
    if not bool(exact):
        return None
    zero = torch.zeros_like(lo)
    return torch.stack([lo, L, R2, P2, P1, count, zero, zero], dim=-1).to(i32)


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
    ``[B', H', n_rows]`` for :func:`_grid_order`, the form of :data:`TABLE_FORMS` the
    kernel runs), with one device read for all (the spans' waste decides the form in
    ``auto`` mode) and, where CSR lists are built, one more (whether the FULL tiles are
    runs).  On CUDA in ``auto`` mode a table is one kernel launch from the fine classes
    (:func:`spattn.runtime.spans_kernel.table_rows`: pooling, demotion, transposition and
    the row summary; the same spans wherever the waste is zero, the only place they are
    read); its classes are pooled in torch only where CSR lists are built.

    Table arguments ``[ROWS_P, COLS_P, ROWS_F, COLS_F, SPAN, stride_b, stride_h]``: the CSR
    of PARTIAL and of FULL tiles and the spans ``[B', H', n_rows + 1, 4]`` (the runs form:
    the runs ``[B', H', n_rows + 1, RUN_FIELDS]`` as SPAN, the FULL lists stand-ins), all
    indexed by row ``b * stride_b + h * stride_h + i``; what the kernel does not read is a
    stand-in."""
    if not items:
        return []
    classes = [None] * len(items)
    if mode in ("auto", "runs") and _device_tables(items[0].fine.device):
        from .spans_kernel import table_rows      # one launch per table instead of ~45 ops
        waste = torch.zeros(len(items), dtype=torch.int32, device=items[0].fine.device)
        parts = []
        for t, job in enumerate(items):
            parts.append(table_rows(job.fine, job.factors, job.n_rows, job.n_cols,
                                    transposed=job.transposed, ragged=job.ragged,
                                    waste=waste[t:t + 1]))
        use = [w == 0 and mode == "auto" for w in waste.tolist()]
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
        form = "spans" if use_spans else "csr"
        if use_spans:
            csr = [spans] * 4
        else:
            cls = job.classes() if cls is None else cls
            runs = None if mode not in ("auto", "runs") else \
                _runs(cls == FULL, RUNS_MIN_TILES if mode == "auto" else 0)
            if runs is not None:
                form, spans = "runs", torch.nn.functional.pad(runs, (0, 0, 0, 1)).contiguous()
                csr = [*_csr(cls == PARTIAL), spans, spans]
            else:
                csr = [*_csr(cls == PARTIAL), *_csr(cls == FULL)]
        # the kernel reads row (b, h, i) at b * sb + h * sh + i of the flat pointers
        sb = Hp * (job.n_rows + 1) if Bp > 1 else 0
        sh = job.n_rows + 1 if Hp > 1 else 0
        out.append(([*csr, spans, sb, sh], work, form))
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


#: The forward tiles of a token layout's call when nothing else chooses them (no
#: autotuning, no tile given): ``(block_m, block_n, num_warps, num_stages)`` for every
#: computed tile FULL at 128 x 128, and for tiles whose 64 x 64 classes compute at most
#: :data:`LAYOUT_SMALL_PAIRS` of the pairs of 128 x 64 ones. Measured on an H200
#: (benchmarks/RESULTS.md, "token layouts"): strided FLUX and Hunyuan neighbourhoods
#: (every tile FULL) run 16-17% faster in 128 x 128 tiles than in 128 x 64, their windows
#: (a third to three quarters of the tiles PARTIAL) 17-18% faster in 64 x 64. The
#: forward's default (``codegen.config.default_tiles``) is 64 x 64 with 4 warps too: the
#: 128 x 128 tiles are what the prior changes, measured against 128 x 64 only.
LAYOUT_FULL_TILES = (128, 128, 8, 3)
LAYOUT_SMALL_TILES = (64, 64, 4, 3)
LAYOUT_SMALL_PAIRS = 0.95


def layout_tiles(analysis: "Analysis") -> tuple | None:
    """The forward tile prior of a token layout's call (:data:`LAYOUT_FULL_TILES`,
    :data:`LAYOUT_SMALL_TILES`) from its tile classes at 64 x 64 (pooled to 128 x 64 and
    128 x 128: one classification, which the 64 x 64 forward then reuses), or None (the
    default tiles)."""
    (fine, c64), = analysis.classes([(64, 64)])
    c_def = _pool(c64, fine, (128, 64), analysis.Lq, analysis.Lk)
    c_big = _pool(c64, fine, (128, 128), analysis.Lq, analysis.Lk)
    small, default, partial = torch.stack([(c64 != EMPTY).sum() * (64 * 64),
                                           (c_def != EMPTY).sum() * (128 * 64),
                                           (c_big == PARTIAL).sum()]).tolist()
    if default == 0:
        return None
    if partial == 0:
        return LAYOUT_FULL_TILES
    if small <= LAYOUT_SMALL_PAIRS * default:
        return LAYOUT_SMALL_TILES
    return None


class Analysis:
    """The tile classes and tables of one call: ``pattern`` at ``Lq`` x ``Lk`` with
    ``B`` batches, ``H`` query heads, the query offset and the runtime ``inputs``
    (validated int64 tensors). Built lazily, kept for the life of the plan that holds it.

    :meth:`tables` gives each kernel's table arguments, grid order and form; the shapes
    share one classification where they can: a shape whose tiles are unions of tiles
    already classified is pooled from them, the others classified once at their common
    divisor tile (at most :data:`CLASS_TILE` per side). The backward needs two tile
    shapes (dQ, dK/dV), the forward one: a training step classifies once instead of three
    times, and the dQ kernel reuses the forward's table when their tiles agree."""

    def __init__(self, pattern, Lq: int, Lk: int, *, B: int, H: int, q_offset: int = None,
                 device=None, inputs: dict = None, positions=None):
        from ..ir.positions import Positions
        self.positions = positions or Positions.of(Lq, Lk, q_offset)
        self.pattern, self.Lq, self.Lk, self.B, self.H = pattern, Lq, Lk, B, H
        self.q_offset, self.device, self.inputs = self.positions.q_offset, device, \
            dict(inputs or {})
        self.fine: dict = {}        # classified tile -> classes [B', H', nq, nk]
        self.expected: tuple = ()   # tiles a later stage will ask for (:meth:`expect`)
        self.built: dict = {}       # (tile, transposed, mode) -> (args, work, spans); orders
        self._row_span = None

    def __repr__(self) -> str:
        tiles = ", ".join(f"{m}x{n}" for m, n in self.fine) or "none yet"
        return f"Analysis(classified at {tiles}; {len(self.built)} tables and orders)"

    def expect(self, tiles) -> None:
        """Tile shapes ``(bm, bn)`` a later stage of the call will ask for (a training
        step's dQ and dK/dV tiles, known when its forward is built): a classification made
        before then is at their common divisor too, so that they are pooled from it, not
        classified a second time (the GPU's default forward 64 x 64 and backward 32 x 64 /
        64 x 32 share 32 x 32)."""
        self.expected = tuple((int(m), int(n)) for m, n in tiles)

    def classes(self, tiles) -> list:
        """For each ``(bm, bn)`` of ``tiles`` the classified shape and classes it is pooled
        from, ``(fine_tile, classes)``; a classification covers the :meth:`expect`-ed
        tiles too."""
        def known(t):
            return next((f for f in self.fine if t[0] % f[0] == 0 and t[1] % f[1] == 0), None)

        missing = [t for t in tiles if known(t) is None]
        if missing:
            missing += [t for t in self.expected if known(t) is None]
            g = (math.gcd(CLASS_TILE, *(t[0] for t in missing)),
                 math.gcd(CLASS_TILE, *(t[1] for t in missing)))
            self.fine[g] = _classify(self.pattern, self.Lq, self.Lk, g[0], g[1], H=self.H,
                                     B=self.B, positions=self.positions, device=self.device,
                                     inputs=self.inputs)
        return [(known(t), self.fine[known(t)]) for t in tiles]

    def row_span(self, closed_form=None) -> tuple:
        """``(tiles, rows)``: the non-EMPTY :data:`ROW_TILE`-square tiles of the call and
        the query-tile rows holding at least one (over the batches and heads whose tiles
        differ), the statistic of the tuning key's row bucket (:func:`row_bucket`: 20
        documents in 16K tokens and 12 want different tiles). Computed once per analysis.

        From the closed form on the host (:func:`ranges_tiles`, no device work; heads
        ``0 .. ROW_HEADS - 1`` when the pattern reads the head) when one is given and the
        call has no runtime inputs, else from the tile classes on the device (those the
        table strategy's tables are then pooled from) with one read of two integers: a plan
        build's cost, never a launch's."""
        if self._row_span is None:
            T = ROW_TILE
            span = None
            if closed_form is not None and not self.inputs:
                try:
                    span = self._row_span_host(closed_form)
                except Exception:   # a closed form that cannot be evaluated: the classes
                    span = None
            if span is None:
                ((fine_tile, fine),) = self.classes([(T, T)])
                n = (_pool(fine, fine_tile, (T, T), self.Lq, self.Lk) != EMPTY).sum(-1)
                span = torch.stack([n.sum(), (n > 0).sum()]).tolist()
            tiles, rows = span
            self._row_span = (int(tiles), int(rows))
        return self._row_span

    def _row_span_host(self, closed_form) -> tuple:
        from ..ir.nodes import free_vars
        T = ROW_TILE
        per_head = bool({"h", "H"} & free_vars(self.pattern.ir))
        tiles = rows = 0
        for h in range(min(self.H, ROW_HEADS) if per_head else 1):
            w = union_count(*ranges_tiles(
                closed_form.rows, n_tiles=-(-self.Lq // T), block=T, other_len=self.Lk,
                other_block=T, length=self.Lq, shift=self.q_offset, query=True, H=self.H,
                h=h))
            tiles += int(w.sum())
            rows += int((w > 0).sum())
        return tiles, rows

    def tables(self, specs, mode: str = "auto", HK: int | None = None) -> list:
        """``(table arguments, grid order, form)`` for each ``(tile, transposed)`` of
        ``specs`` (``transposed``: rows are key tiles, as dK/dV reads them, over ``HK`` key
        heads whose work sums that of their query heads); the tables built together share
        one device read."""
        HK = self.H if HK is None else HK
        fine_all = self.classes([t for t, _ in specs])
        todo = {}
        for (tile, transposed), (fine_tile, fine) in zip(specs, fine_all):
            tkey = (tile, transposed, mode)
            if tkey not in self.built and tkey not in todo:
                todo[tkey] = _Job(fine, fine_tile, tile, transposed, self.Lq, self.Lk)
        self.built.update(zip(todo, _table_many(list(todo.values()), mode)))
        out = []
        for t, tr in specs:
            args, work, form = self.built[(t, tr, mode)]
            heads = HK if tr else self.H
            okey = ("order", t, tr, mode, self.B, heads)
            if okey not in self.built:
                self.built[okey] = _order(work, self.B, heads, t, tr, self.Lq, self.Lk)
            out.append((args, self.built[okey], form))
        return out


def fwd_tables(pattern, Lq, Lk, block_m, block_n, *, B, H, q_offset, device, inputs,
               tables="auto", analysis=None):
    """What the forward of the table strategy builds for a new shape: the tile classes
    (shared by the heads and batches that share them), the spans or CSR lists of key tiles
    per query tile (``tables``: see :data:`TABLE_MODES`), the heavy-first order and the form
    (:data:`TABLE_FORMS`). ``benchmarks/bench.py`` times exactly this as the setup of a shape."""
    analysis = analysis or Analysis(pattern, Lq, Lk, B=B, H=H, q_offset=q_offset,
                                    device=device, inputs=inputs)
    (out,) = analysis.tables([((block_m, block_n), False)], tables)
    return out


def bwd_tables(pattern, Lq, Lk, blocks, *, B, H, q_offset, device, inputs, tables="auto",
               HK=None, analysis=None, dq=True):
    """What the backward of the table strategy builds for a new shape: the dQ tables over
    (BLOCK_M2, BLOCK_N2) tiles and the transposed dK/dV tables over (BLOCK_M1, BLOCK_N1)
    tiles (``blocks = (m1, n1, m2, n2)``), each as (table arguments, grid order, form).
    With the forward's ``analysis`` its classes are pooled, often without classifying.
    ``HK`` key heads (default ``H``): a dK/dV program serves the ``H // HK`` query heads
    of its key head, its work is theirs summed. ``dq=False`` (atomic dQ: no dQ kernel):
    the dK/dV tables only, the dQ ones None."""
    m1, n1, m2, n2 = blocks
    analysis = analysis or Analysis(pattern, Lq, Lk, B=B, H=H, q_offset=q_offset,
                                    device=device, inputs=inputs)
    if not dq:
        return None, analysis.tables([((m1, n1), True)], tables, HK=HK)[0]
    return tuple(analysis.tables([((m2, n2), False), ((m1, n1), True)], tables, HK=HK))


def ranges_tiles(intervals, *, n_tiles, block, other_len, other_block, length, shift, query,
                 H, h=0):
    """The tile ranges ``(lo, hi)``, int64 ``[len(intervals), n_tiles]`` on the host, of
    the closed-form ``intervals`` for each of the ``n_tiles`` tiles of ``block`` at head
    ``h`` (batch 0): the first and last tile of ``other_block`` each interval reaches
    (query tiles' key tiles when ``query``, else key tiles' query tiles); ``hi < lo``
    where an interval is empty. Raises what evaluating the closed form raises."""
    from ..ir.evaluate import evaluate
    start = torch.arange(n_tiles, dtype=torch.int64) * block
    end = torch.clamp(start + block, max=length) - 1
    if query:
        env = {"qs": start + shift, "qe": end + shift}
    else:
        env = {"ks": start, "ke": end}
    env.update({"h": h, "b": 0, "Lq": length if query else other_len,
                "Lk": other_len if query else length, "H": H})
    los, his = [], []
    for iv in intervals:
        lo = 0 if iv.lo is None else torch.as_tensor(evaluate(iv.lo, env))
        hi = other_len - 1 if iv.hi is None else torch.as_tensor(evaluate(iv.hi, env))
        osh = 0 if query else shift
        lo = torch.clamp(torch.as_tensor(lo) - osh, min=0)
        hi = torch.clamp(torch.as_tensor(hi) - osh, max=other_len - 1)
        lo_t = (lo // other_block).expand(n_tiles)
        los.append(lo_t)
        his.append(torch.where(hi >= lo, hi // other_block, lo_t - 1).expand(n_tiles))
    if not los:
        return torch.zeros(0, n_tiles, dtype=torch.int64), torch.zeros(0, n_tiles,
                                                                       dtype=torch.int64)
    return torch.stack(los), torch.stack(his)


def ranges_work(intervals, **kw) -> torch.Tensor:
    """Per tile, the tiles its closed-form ``intervals`` span, summed over the intervals
    (a tile two pieces reach is visited twice), int64 ``[n_tiles]`` on the host
    (:func:`ranges_tiles`'s arguments). A heuristic's input: zeros when the closed form
    cannot be evaluated."""
    try:
        lo, hi = ranges_tiles(intervals, **kw)
        return torch.clamp(hi - lo + 1, min=0).sum(0)
    except Exception:   # heuristic only
        return torch.zeros(kw["n_tiles"], dtype=torch.int64)


def union_count(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Per column of the integer ranges ``[lo, hi]`` ``[k, n]`` (empty where ``hi < lo``),
    the number of integers in their union, ``[n]``."""
    if lo.shape[0] == 0:
        return torch.zeros(lo.shape[1], dtype=torch.int64)
    hi = torch.where(hi >= lo, hi, lo - 1)
    order = torch.argsort(lo, dim=0, stable=True)
    lo, hi = lo.gather(0, order), hi.gather(0, order)
    reach = torch.cat([torch.full_like(hi[:1], -1 << 62), hi[:-1]]).cummax(0).values
    return torch.clamp(hi - torch.maximum(lo, reach + 1) + 1, min=0).sum(0)


def ranges_order(intervals, *, n_tiles, block, other_len, other_block, length, shift, query,
                  device, H, B=1):
    """The programs' work items for the ranges strategy (:func:`_grid_order`; a host
    heuristic, computed once per plan).

    Counts the tiles each interval spans at head 0 as every head's work
    (:func:`ranges_work`): for causal patterns the last query tiles (longest rows) start
    first; natural order if the closed form cannot be evaluated.
    """
    work = ranges_work(intervals, n_tiles=n_tiles, block=block, other_len=other_len,
                       other_block=other_block, length=length, shift=shift, query=query, H=H)
    return _grid_order(work.view(1, 1, n_tiles), B, H).to(device)
