"""The CPU backend's per-shape plan: which fused attention calls cover a pattern's tiles.

A :class:`CpuPlan` is built once per (pattern, shapes, q_offset, runtime inputs, dtype,
device) from the analysis (``pattern.tiles`` on :data:`BLOCK` x :data:`BLOCK` tiles) and
holds everything the forward and backward need: the calls, their index tensors, and the
masks of the calls that need one. Nothing in it depends on the values of q, k and v, so
one plan serves every call of that shape (a forward and its backward, every step of a
loop). :mod:`spattn.runtime.torch_backend` runs plans.

Items and calls. Work is done by one fused attention primitive (on CPU tensors ATen's
flash-attention kernel, which returns the log-sum-exp too) applied to *items*: a block of
R consecutive query rows and W key positions, all heads at once. A *call* runs ``n`` items
of one shape in one kernel invocation (``[n, lanes, G * R, D]`` queries against
``[n, lanes, W, D]`` keys). An item's softmax is exact over its keys; when several calls
cover a query row (different *slots*), their results are merged through the log-sum-exps,
and every (row, key) pair the pattern allows is counted exactly once. An item's additive
mask is 0 on FULL tiles, ``-inf`` on EMPTY tiles and keys outside ``[0, Lk)``, and the
pattern's predicate (``ir.evaluate.evaluate``) on PARTIAL tiles only; a call whose tiles
are all FULL has no mask.

Strategies (the cheapest by :func:`cost` wins):

* ``band`` (R = 64 .. 1024 rows): item i covers query rows ``[i R, (i + 1) R)`` and keys
  ``[s0 + i R, s0 + i R + W)``, the smallest window (in whole tiles) holding every non-EMPTY
  tile of every block. The windows are arithmetic, so q, k and v enter the kernel as
  strided views, without copies (k and v are copied once into a padded token-major buffer
  when a window leaves ``[0, Lk)`` or their strides allow no view). Sliding windows, local
  bands, small documents, decode steps (one item: its own key range) are bands.
* ``dense``: one item over every row and key (one per batch element where the pattern
  depends on the batch: ``Call.batch_items``). The kernel's own causal skipping
  (``is_causal``) replaces the mask when the pattern allows nothing above the diagonal,
  and the mask disappears when the pattern *is* causal there, or is one row per item when
  the pattern is causal and a predicate of the keys (a padding: :func:`_column_mask`).
* ``segments``: documents and chunks. Runs of positions whose queries see keys of their
  own run only (proposed where a position may not see its predecessor, proven from the
  tile classes) become one item each, bucketed by length; with the causal flag and no
  mask when the pattern is exactly causal within runs. Rows and keys are gathered once.
* ``tiles``: for patterns that are no band (strided, dilated, sinks with windows, block
  tables). Coarse levels (:data:`LEVELS` rows) take key tiles FULL for every row tile of
  a block as unmasked items; the remaining non-EMPTY tiles of each row tile become one
  masked item at the finest level; item widths are bucketed (padded, masked) to keep the
  calls few. Keys are gathered.
* ``keys``: for patterns whose PARTIAL tiles hold few allowed keys (global or strided
  columns beside a window, a keep mask over keys, the last keys of each block): per block
  of 64 or 256 query rows only the keys some row of it may see (those of its FULL tiles,
  and within its PARTIAL tiles those the predicate allows some row and head), gathered,
  one masked item per block, widths bucketed. Proposed while the PARTIAL tiles hold at
  most :data:`KEYS_BUDGET` pairs (they are evaluated to find the keys).

Heads. Grouped-query heads are folded into the rows of an item (query head ``hk * G + g``
reads key head ``hk``), so a key block is read once for its G query heads. When the
pattern depends on neither the batch index nor (for B > 1) the head, all batch elements
share the items and travel as kernel heads ("lanes" = B x Hk); otherwise an item belongs
to one batch element and lanes = Hk.

Why so few calls. On a machine whose cores are busy, each large torch operation is a
parallel region that waits for its slowest thread, often a scheduler slice: a plan of a
handful of big kernel calls degrades like dense SDPA does, where hundreds of small
operations would not.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..ir.evaluate import evaluate, query_offset
from ..ir.memory import available_memory, check_room
from ..ir.nodes import And, Range, Sum, Var, walk
from ..ir.tiles import EMPTY, FULL, PARTIAL
from . import cpu_ops

__all__ = ["BLOCK", "LEVELS", "BAND_ROWS", "Call", "CpuPlan", "build_plan"]

#: Tile size of the analysis (query rows and keys) and of the finest items.
BLOCK = 64
#: Row-block sizes (query rows) of the ``tiles`` strategy's coarse levels, largest first.
LEVELS = (1024, 256)
#: Rows per item tried by the ``band`` strategy (plus one item over all rows).
BAND_ROWS = (64, 128, 256, 512, 1024)
#: Mask elements a plan may hold (a strategy whose masks exceed it is not considered).
MASK_BUDGET = 1 << 25
#: The ``keys`` strategy is proposed while the PARTIAL tiles' pairs (times the heads the
#: pattern depends on) are at most this many: each is evaluated once to find the keys.
KEYS_BUDGET = 1 << 26
#: Row blocks (in tiles) the ``keys`` strategy tries.
KEYS_ROWS = (1, 4)
#: The ``keys`` strategy wins only where its estimate is below the others' by this factor:
#: at equal estimates it ran slower (scattered gathers; dilated in its layout, 39 against
#: 31 ms at 4096 tokens), which the cost model does not count.
KEYS_MARGIN = 1.1
#: Bytes a plan's analysis takes per tile of its grid at its peak (the tile classes, the
#: bool grids of the strategies and their index temporaries; 27-30 measured), checked
#: against the free memory before it starts.
PLAN_TILE_BYTES = 32
#: ATen's kernel splits the kv length into blocks of this size (its causal skip unit).
KV_SPLIT = 512

I64 = torch.int64
NINF = float("-inf")


#: Kernel calls a :class:`CpuPlan`'s ``repr`` lists (the rest are counted).
MAX_REPR_CALLS = 4


def _summary(t: torch.Tensor) -> str:
    """``int64 [1, 64]``: a tensor's dtype and shape, not its values."""
    return f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}"


@dataclass(frozen=True, eq=False)
class Call:
    """One kernel call over ``n`` items of ``R`` query rows and ``W`` keys each.

    Index tensors (on the plan's device):

    * ``bidx`` ``[n, 1]`` or ``[1, lanes]``: batch element of each (item, lane);
      ``hidx`` ``[1, lanes]``: the key head of each lane;
    * ``rows`` ``[n, R]``: query rows (rows >= Lq are padding);
    * ``cols`` ``[n, W]``: key positions (those outside ``[0, Lk)`` are masked).

    ``row_step`` (rows of item i = rows of item 0 + i * row_step) and ``col_step`` (the
    same for keys, which are then consecutive) are set when the items are arithmetic, so
    that the backend can pass views; ``row0``/``row_end`` and ``col0``/``col_end`` are the
    first and one past the last row and key of the items. ``mask``: ``[n, 1 or lanes, G * R, W]`` additive
    (0 / -inf) in the compute dtype, or None. ``row_any`` ``[n, 1 or lanes, G * R]``:
    whether a row has an allowed key (None when all have one; the kernel reports lse 0 for
    a row without one). ``is_causal``: the kernel masks key j > row i itself (and skips
    those blocks). ``row_valid`` / ``col_valid`` (``[n, R]`` / ``[n, W]`` bool, or None: all):
    the rows and keys an item owns; the others belong to another item (padding of a
    segment) and are neither written back nor allowed to contribute. ``build_mask``: builds
    ``(mask, row_any)`` when called, for plans whose masks are too big to keep (use
    :meth:`masks`). ``batch_items``: the items are the batch elements in order, each over
    the same consecutive rows and keys (a pattern that depends on the batch, as a padding
    mask does, in one item per element): the backend reads them as views ``[B, Hk, G * R,
    *]`` of the caller's tensors, as it reads one item shared by the batch. ``batch0``:
    every item belongs to batch element ``batch0`` (a call per element of a pattern that
    depends on the batch), and ``row_step`` / ``col_step`` describe views of that
    element alone.
    """

    slot: int
    bidx: torch.Tensor
    hidx: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    row_step: Optional[int]
    col_step: Optional[int]
    mask: Optional[torch.Tensor]
    row_any: Optional[torch.Tensor]
    is_causal: bool = False
    row_valid: Optional[torch.Tensor] = None
    col_valid: Optional[torch.Tensor] = None
    build_mask: Optional[object] = None
    batch_items: bool = False
    batch0: Optional[int] = None

    def masks(self):
        """``(mask, row_any)``: kept, or built now (``build_mask``: a plan whose masks are
        too big to keep)."""
        if self.build_mask is not None:
            return self.build_mask()
        return self.mask, self.row_any

    @property
    def masked(self) -> bool:
        return self.mask is not None or self.build_mask is not None

    def __post_init__(self):
        # first and last row and key of the items, as ints (no tensor reads per call)
        object.__setattr__(self, "row0", int(self.rows[0, 0]))
        object.__setattr__(self, "row_end", int(self.rows.max()) + 1)   # (items by batch)
        object.__setattr__(self, "col0", int(self.cols[0, 0]))
        object.__setattr__(self, "col_end", int(self.cols[-1, -1]) + 1)

    def __repr__(self) -> str:
        what = "causal" if self.is_causal else "masked" if self.masked else "unmasked"
        if self.build_mask is not None:
            what += " (masks built per call)"
        view = ", strided" if self.row_step is not None and self.col_step is not None else \
            ", one per batch element" if self.batch_items else ""
        tensors = ", ".join(f"{n}={_summary(getattr(self, n))}"
                            for n in ("bidx", "hidx", "rows", "cols", "mask", "row_any",
                                      "row_valid", "col_valid")
                            if getattr(self, n) is not None)
        return (f"Call(slot={self.slot}, {self.n} x [{self.R} rows x {self.W} keys] "
                f"{what}{view}; {tensors})")

    @property
    def n(self) -> int:
        return self.rows.shape[0]

    @property
    def R(self) -> int:
        return self.rows.shape[1]

    @property
    def W(self) -> int:
        return self.cols.shape[1]


@dataclass(frozen=True, eq=False)
class CpuPlan:
    """What the CPU backend runs for one (pattern, shapes, q_offset, inputs, dtype, device).

    ``calls`` write ``slots`` partial-softmax slots (merged by log-sum-exp). ``covers``:
    one call whose items cover every query row exactly once, in order (results need no
    scatter). ``partition``: every query row and every key is owned by exactly one item
    (results and gradients are written once, never accumulated). ``strategy``:
    ``"band"``, ``"dense"``, ``"segments"``, ``"tiles"`` or ``"keys"``. ``expand``: the
    caller's key heads are each repeated ``expand`` times before the calls (``Hk`` counts
    the repeated heads; their gradients are summed back), so that grouped-query heads run
    ungrouped: the kernel's causal flag needs a query head's rows in order, which grouped
    heads folded into the rows are not.
    """

    B: int
    Hq: int
    Hk: int
    Lq: int
    Lk: int
    q_offset: int
    dtype: torch.dtype
    device: torch.device
    shared: bool
    lanes: int
    slots: int
    calls: tuple
    covers: bool
    strategy: str
    cost: float
    partition: bool = False
    expand: int = 1

    @property
    def G(self) -> int:
        return self.Hq // self.Hk

    @property
    def Lq_pad(self) -> int:
        return max([self.Lq] + [c.row_end for c in self.calls])

    def pairs(self) -> int:
        """(query row, key) pairs the kernel calls compute over all heads and batches."""
        per_lane = sum(c.n * c.R * c.W for c in self.calls)
        return per_lane * self.lanes * self.G

    def __repr__(self) -> str:
        """A summary: the call's shapes, the strategy and each kernel call with its tensors'
        dtypes and shapes (never their values: a plan's index and mask tensors can hold
        millions of entries)."""
        flags = "".join(f", {f}" for f in ("covers", "partition") if getattr(self, f))
        shown = ", ".join(map(repr, self.calls[:MAX_REPR_CALLS]))
        more = len(self.calls) - MAX_REPR_CALLS
        if more > 0:
            shown += f", ... {more} more"
        hk = f"{self.Hk // self.expand} x {self.expand}" if self.expand > 1 else self.Hk
        return (f"CpuPlan({self.strategy}: B={self.B}, Hq={self.Hq}, Hk={hk}, "
                f"Lq={self.Lq}, Lk={self.Lk}, q_offset={self.q_offset}, "
                f"{str(self.dtype).replace('torch.', '')} on {self.device}; lanes={self.lanes}, "
                f"slots={self.slots}, pairs={self.pairs():,}{flags}; "
                f"{len(self.calls)} call(s): {shown})")

    def describe(self) -> str:
        """One line per call: slot, items, shape, mask."""
        lines = [f"{self.strategy}: {len(self.calls)} call(s), lanes={self.lanes}, "
                 f"G={self.G}, pairs={self.pairs()}"]
        for c in self.calls:
            what = "causal" if c.is_causal else "masked" if c.masked else "unmasked"
            view = " strided" if c.row_step is not None and c.col_step is not None else ""
            lines.append(f"  slot {c.slot}: {c.n} x [{c.R} rows x {c.W} keys] {what}{view}")
        return "\n".join(lines)


# ------------------------------------------------------------------ the analysis

@dataclass
class _Grid:
    """The analysis, collapsed to what planning needs (all on the CPU)."""

    cls: torch.Tensor        # int8 [Bu, Hc, nq, nk]
    nonempty: torch.Tensor   # bool [Bu, nq, nk]: non-EMPTY for some head
    full: torch.Tensor       # bool [Bu, nq, nk]: FULL for every head (ragged last key tile: no)
    shared: bool
    lanes: int
    head_dep: bool
    batch_dep: bool


def _input_dims(t: torch.Tensor, nd: int) -> tuple[int, int]:
    lead = t.shape[: t.dim() - nd]
    return (lead[0] if len(lead) >= 1 else 1), (lead[1] if len(lead) >= 2 else 1)


def dependence(pattern, inputs: dict) -> tuple[bool, bool, bool]:
    """``(batch, head, uses_H)``: whether the pattern varies with the batch index, with the
    head, and whether it reads the head count ``H``."""
    names = {n.name for n in walk(pattern.ir) if isinstance(n, Var)}
    dims = [_input_dims(t, pattern.inputs[n]) for n, t in inputs.items()]
    batch = "b" in names or any(b > 1 for b, _ in dims)
    head = "h" in names or any(h > 1 for _, h in dims)
    return batch, head, "H" in names


def _grid(pattern, B, Hq, Hk, Lq, Lk, off, inputs, device, dep) -> _Grid:
    batch_dep, head_dep, uses_H = dep                   # :func:`dependence`
    cls = pattern.tiles(Lq, Lk, BLOCK, BLOCK, num_heads=Hq if (head_dep or uses_H) else 1,
                        batch=B if batch_dep else 1, q_offset=off, device=device,
                        **inputs).cpu()
    if not head_dep:
        cls = cls[:, :1]
    shared = not batch_dep and not (head_dep and B > 1)
    Bu = 1 if shared else B
    cls = cls.expand(Bu, *cls.shape[1:])
    full = (cls == FULL).all(1)
    if Lk % BLOCK:
        full[..., -1] = False                     # keys past Lk in the tile: it needs a mask
    return _Grid(cls=cls, nonempty=(cls != EMPTY).any(1), full=full, shared=shared,
                 lanes=B * Hk if shared else Hk, head_dep=head_dep, batch_dep=batch_dep)


# ------------------------------------------------------------------ cost

def _eff(rows: int) -> float:
    """Relative throughput of the kernel by query rows per item (its query block is 256
    rows from 768 rows on, 64 from 192, else 32)."""
    return 1.0 if rows >= 768 else 0.75 if rows >= 192 else 0.55


#: Cost units: one (row, key) pair of one head at full kernel speed. A call costs about a
#: scheduler slice's worth of pairs (what a parallel region waits on a busy machine); an
#: element the backend copies (counted once for the forward: the backward moves about
#: twice as many) costs about a pair; reading a mask adds a fraction of a pair. Fitted
#: to forward + backward times on 2 cores (documents, windows, causal at L = 1024..4096).
CALL_COST = 5e5
COPY_COST = 1.2
MASK_COST = 0.15


def cost(calls, lanes: int, G: int, copies: int = 0) -> float:
    """Estimated cost of ``calls`` ``(n, R, W, is_causal, masked)`` (plus ``copies``
    elements moved)."""
    total = 0.0
    for n, R, W, is_causal, masked in calls:
        rows = G * R
        pairs = _causal_pairs(rows, W) if is_causal else rows * W
        total += n * lanes * pairs * (1 / _eff(rows) + (MASK_COST if masked else 0.0))
        total += CALL_COST
    return total + COPY_COST * copies


def _causal_pairs(rows: int, W: int) -> int:
    """Pairs ATen's kernel computes with ``is_causal`` (it skips whole kv blocks only)."""
    qs = 256 if rows >= 768 else 64 if rows >= 192 else 32
    total = 0
    for m in range(0, rows, qs):
        keys = min(m + qs, W)
        total += min(qs, rows - m) * min(W, -(-keys // KV_SPLIT) * KV_SPLIT)
    return total


# ------------------------------------------------------------------ building

def build_plan(pattern, B: int, Hq: int, Hk: int, Lq: int, Lk: int, *, q_offset: int | None,
               inputs: dict, dtype: torch.dtype, device, strategy: str | None = None,
               head_dim: int = 64) -> CpuPlan:
    """The plan of ``pattern`` for q ``[B, Hq, Lq, D]`` and k, v ``[B, Hk, Lk, D]``.

    ``strategy`` forces ``"band"``, ``"dense"``, ``"segments"``, ``"tiles"`` or ``"keys"``
    (default: the cheapest; then grouped heads may run repeated, ``CpuPlan.expand``, where
    K and V so copied, ``head_dim`` wide, fit twice in the free memory).
    """
    device = torch.device(device)
    off = query_offset(Lq, Lk, q_offset)
    dep = dependence(pattern, inputs)
    check_room(((B if dep[0] or dep[1] else 1) * -(-Lq // BLOCK) * -(-Lk // BLOCK)
                * PLAN_TILE_BYTES), "cpu",
               f"the CPU plan of [{B}, {Hq}, {Lq}, D] queries over {Lk} keys "
               f"({PLAN_TILE_BYTES} bytes a {BLOCK}x{BLOCK} tile)")
    grid = _grid(pattern, B, Hq, Hk, Lq, Lk, off, inputs, device, dep)
    ctx = _Ctx(pattern, grid, B, Hq, Hk, Lq, Lk, off, inputs, dtype, device)
    options = []
    if strategy in (None, "band", "dense"):
        options += [o for o in _band_options(ctx, dense_only=strategy == "dense")
                    if strategy != "band" or o[0] == "band" or ctx.nq == 1]
    if strategy in (None, "segments"):
        options.append(_segments_option(ctx))
    if strategy in (None, "tiles"):
        options.append(_tiles_option(ctx))
    if strategy in (None, "keys"):
        options += _keys_options(ctx)
    options = [o for o in options if o is not None]
    if not options:
        raise ValueError(f"no {strategy} plan for these shapes")
    name, est, make = min(options, key=lambda o: o[1] * (KEYS_MARGIN if o[0] == "keys" else 1))
    G = Hq // Hk
    if G > 1 and strategy is None and Lq <= Lk and _causal_ok(ctx, 0):
        # grouped heads repeated: the causal flag, for the copy of K and V (and the sum of
        # their gradients), where that copy fits twice in the free memory
        copy = 2 * B * Hq * Lk * head_dim * dtype.itemsize
        free = available_memory(device)
        if free is None or 2 * copy < free:
            alt = build_plan(pattern, B, Hq, Hq, Lq, Lk, q_offset=q_offset, inputs=inputs,
                             dtype=dtype, device=device)
            repeated = alt.cost + COPY_COST * 2 * B * Hq * Lk * ctx.D
            if repeated < est:
                return replace(alt, expand=G, cost=repeated)
    calls = make()
    c = calls[0] if len(calls) == 1 else None
    covers = c is not None and c.row0 == 0 and (
        (c.batch_items and c.R == Lq)
        or ((c.n == 1 or c.row_step == c.R) and c.n * c.R == Lq and (grid.shared or B == 1)))
    return CpuPlan(B=B, Hq=Hq, Hk=Hk, Lq=Lq, Lk=Lk, q_offset=off, dtype=dtype, device=device,
                   shared=grid.shared, lanes=grid.lanes,
                   slots=1 + max([c.slot for c in calls], default=-1), calls=tuple(calls),
                   covers=covers, strategy=name, cost=est, partition=name == "segments")


class _Ctx:
    def __init__(self, pattern, grid, B, Hq, Hk, Lq, Lk, off, inputs, dtype, device):
        self.pattern, self.grid = pattern, grid
        self.B, self.Hq, self.Hk, self.G, self.Lq, self.Lk = B, Hq, Hk, Hq // Hk, Lq, Lk
        self.off, self.inputs, self.dtype, self.device = off, inputs, dtype, device
        self.nq, self.nk = grid.cls.shape[2], grid.cls.shape[3]
        self.D = 64                              # nominal head dim: copies and pairs both scale with D
        self.Bu = grid.cls.shape[0]
        self.column = _column_part(pattern.ir)

    def lane_index(self, units: torch.Tensor):
        """``(bidx, hidx)`` for items of batch units ``units`` ``[n]``."""
        g = self.grid
        if g.shared:
            lanes = torch.arange(g.lanes)
            return (lanes // self.Hk).view(1, -1), (lanes % self.Hk).view(1, -1)
        return units.view(-1, 1), torch.arange(self.Hk).view(1, -1)


# ---- band

def _band_options(ctx: _Ctx, dense_only: bool = False) -> list:
    """(name, cost, make) of the band plans worth considering (and of dense attention)."""
    g = ctx.grid
    nq, nk, Bu = ctx.nq, ctx.nk, ctx.Bu
    rows_any = g.nonempty.any(0)                                        # [nq, nk]
    if not bool(rows_any.any()):
        return [("band", 0.0, lambda: [])]
    out = []
    cands = [] if dense_only else [r // BLOCK for r in BAND_ROWS if r // BLOCK < nq]
    cands.append(nq)                                                    # one item: dense rows
    for rt in cands:
        ng = -(-nq // rt)
        pad = ng * rt - nq
        ne = torch.cat([rows_any, torch.zeros(pad, nk, dtype=torch.bool)]) if pad else rows_any
        blk = ne.view(ng, rt, nk).any(1)                                # [ng, nk]
        has = blk.any(1)
        lo = blk.to(torch.uint8).argmax(1)                      # first True (0 if none)
        hi = nk - 1 - blk.flip(1).to(torch.uint8).argmax(1)     # last True
        shift = torch.arange(ng) * rt
        kt0 = int((lo - shift)[has].min())
        w = int((hi - shift)[has].max()) - kt0 + 1
        if ng == 1:
            kt0, w = int(lo[0]), int(hi[0]) - int(lo[0]) + 1
        R = rt * BLOCK if ng > 1 else ctx.Lq
        W = w * BLOCK
        first, last = kt0 * BLOCK, (kt0 + (ng - 1) * rt + w) * BLOCK
        inside = first >= 0 and last <= ctx.Lk
        if ng == 1:
            W = min(W, ctx.Lk - first)
            inside = True
        n_items = ng * Bu
        units = torch.arange(Bu).repeat_interleave(ng)
        blocks = torch.arange(ng).repeat(Bu)
        causal = ng == 1 and ctx.G == 1 and _causal_ok(ctx, first)
        unmasked = _band_all_full(ctx, blocks, units, kt0, rt, w, W)
        # causal and a predicate of the keys alone: the kernel's flag and one mask row
        column = (bool(causal) and not causal[1] and not unmasked and ctx.column is not None
                  and ctx.off == 0 and first == 0)
        mask_elems = 0 if unmasked else \
            n_items * (ctx.Hq if g.head_dep else ctx.G) * (1 if column else R) * W
        if mask_elems > MASK_BUDGET and not (causal and causal[1]):
            continue
        padded = 0 if inside else 2 * ctx.B * ctx.Hk * (last - first) * ctx.D
        copies = padded
        if not g.shared and ctx.B > 1 and ng > 1:     # (one item per element: views)
            copies += (2 * n_items * ctx.Hk * W + ctx.Hq * R * n_items) * ctx.D
        masked = not unmasked and not (causal and causal[1])
        est = cost([(n_items, R, W, bool(causal), masked)], g.lanes if g.shared else ctx.Hk,
                   ctx.G, copies)
        name = "dense" if ng == 1 and W == ctx.Lk and first == 0 else "band"

        def make(rt=rt, ng=ng, kt0=kt0, w=w, R=R, W=W, units=units, blocks=blocks,
                 causal=causal, unmasked=unmasked, column=column):
            return [_band_call(ctx, units, blocks, rt, ng, kt0, w, R, W, causal, unmasked,
                               column)]
        out.append((name, est, make))
        if not g.shared and ctx.B > 1 and ng > 1:
            # a call per batch element over strided views instead of the items gathered
            est = cost([(ng, R, W, False, masked)] * ctx.B, ctx.Hk, ctx.G, padded)

            def make(rt=rt, ng=ng, kt0=kt0, w=w, R=R, W=W, units=units, blocks=blocks,
                     unmasked=unmasked):
                return [_band_call(ctx, units[b * ng:(b + 1) * ng],
                                   blocks[b * ng:(b + 1) * ng], rt, ng, kt0, w, R, W, False,
                                   unmasked, batch0=b) for b in range(ctx.B)]
            out.append(("band", est, make))
    return out


def _band_all_full(ctx, blocks, units, kt0, rt, w, W) -> bool:
    """Every element of every band item is allowed (no mask needed)."""
    ct = _band_tiles(ctx, units, blocks, kt0, rt, w)                    # [n, Hc, rt, w]
    if W != w * BLOCK:
        return False
    return bool((ct == FULL).all()) and bool((_band_keys(ctx, blocks, kt0, rt, w) < ctx.Lk).all())


def _band_keys(ctx, blocks, kt0, rt, w) -> torch.Tensor:
    """Key positions ``[n, w * BLOCK]`` of band items (may leave ``[0, Lk)``)."""
    start = (kt0 + blocks * rt) * BLOCK
    return start.view(-1, 1) + torch.arange(w * BLOCK).view(1, -1)


def _band_tiles(ctx, units, blocks, kt0, rt, w) -> torch.Tensor:
    """Tile classes ``[n, Hc, rt, w]`` of band items (EMPTY outside the grid)."""
    qt = blocks.view(-1, 1) * rt + torch.arange(rt).view(1, -1)                # [n, rt]
    kt = kt0 + blocks.view(-1, 1) * rt + torch.arange(w).view(1, -1)           # [n, w]
    return _item_tiles(ctx, units, qt, kt)


def _causal_ok(ctx, first: int):
    """For one item over keys from ``first``: ``(allowed, exact)``: the pattern allows no key
    above the diagonal (local key index > local row index), and it allows exactly the keys
    on or below it (then the kernel's causal flag replaces the mask); or False."""
    if first != 0 or ctx.Lq > ctx.Lk:
        return False
    g = ctx.grid
    nq, nk = ctx.nq, ctx.nk
    qi = torch.arange(nq).view(-1, 1)
    kj = torch.arange(nk).view(1, -1)
    above = kj * BLOCK > qi * BLOCK + BLOCK - 1                 # every key above every row
    below = kj * BLOCK + BLOCK - 1 <= qi * BLOCK                # every key on/below every row
    if bool((g.nonempty & above).any()):
        return False
    cross = ~above & ~below
    exact = bool(g.full[:, below].all()) if bool(below.any()) else True
    if bool((cross & (g.cls == FULL).any(1)).any()):
        return False                              # a FULL tile with keys above the diagonal
    u, h, ti, tj = ((g.cls == PARTIAL) & cross).nonzero(as_tuple=True)
    if bool((cross & (g.cls == EMPTY).any(1)).any()):
        exact = False                             # an EMPTY tile with keys below the diagonal
    if ti.numel():
        rows = (ti * BLOCK).view(-1, 1, 1) + torch.arange(BLOCK).view(1, -1, 1)
        keys = (tj * BLOCK).view(-1, 1, 1) + torch.arange(BLOCK).view(1, 1, -1)
        valid = (rows < ctx.Lq) & (keys < ctx.Lk)
        allowed = _predicate(ctx, rows.clamp(max=ctx.Lq - 1), keys.clamp(max=ctx.Lk - 1),
                             u.view(-1, 1, 1), h.view(-1, 1, 1)) & valid
        if bool((allowed & (keys > rows)).any()):
            return False
        exact = exact and bool((allowed == ((keys <= rows) & valid)).all())
    return True, exact


def _band_call(ctx, units, blocks, rt, ng, kt0, w, R, W, causal, unmasked,
               column=False, batch0=None) -> Call:
    """The call of band items (batch units ``units``, row blocks ``blocks`` of ``rt`` tiles,
    key tiles from ``kt0 + block * rt``, ``w`` of them); ``column``: one item over every
    row whose pattern is causal and ``ctx.column`` (:func:`_column_mask`); ``batch0``: the
    items are those of batch element ``batch0`` alone (strided views of it)."""
    rows = (blocks * rt * BLOCK).view(-1, 1) + torch.arange(R).view(1, -1)
    cols = _band_keys(ctx, blocks, kt0, rt, w)[:, :W]
    bidx, hidx = ctx.lane_index(units)
    mask = row_any = None
    is_causal = bool(causal)
    if column:
        mask, row_any = _column_mask(ctx, units, R, cols)
    elif not unmasked and not (causal and causal[1]):
        tiles = _band_tiles(ctx, units, blocks, kt0, rt, w)
        mask, row_any = _mask(ctx, tiles, units, rows, cols)
    same_b = ctx.grid.shared or ctx.B == 1
    step = rt * BLOCK if same_b or batch0 is not None else None
    return Call(slot=0, bidx=bidx.to(ctx.device), hidx=hidx.to(ctx.device),
                rows=rows.to(ctx.device), cols=cols.to(ctx.device), row_step=step,
                col_step=step, mask=mask, row_any=row_any, is_causal=is_causal,
                batch_items=not same_b and ng == 1, batch0=batch0)


def _column_part(ir) -> Optional[tuple]:
    """The conjuncts of a pattern that read no query position, where the others are
    exactly causal (``q - k >= 0``, at least one) and these at least one: a padding
    ``causal & k >= first[b]``, a key mask ``causal & keep[b, h, k]``. Else None."""
    parts = ir.args if isinstance(ir, And) else (ir,)
    causal, column = [], []
    for c in parts:
        if any(isinstance(n, Var) and n.name == "q" for n in walk(c)):
            causal.append(c)
        else:
            column.append(c)
    if not causal or not column:
        return None
    for c in causal:
        if not (isinstance(c, Range) and isinstance(c.x, Sum) and c.hi is None
                and c.lo is not None and c.lo - c.x.const == 0):
            return None
        coeff = {t.name: a for t, a in c.x.terms if isinstance(t, Var)}
        if len(c.x.terms) != 2 or coeff != {"q": 1, "k": -1}:
            return None
    return tuple(column)


def _column_mask(ctx, units, R: int, cols):
    """``(mask, row_any)`` of items over every row (from row 0, keys from 0, ``q`` at its
    row) whose pattern is causal and the key predicate ``ctx.column``: the kernel's causal
    flag does the first, and the mask ``[n, 1 or Hk, 1, W]`` (0 / -inf) the second, one row
    the kernel broadcasts over the item's rows. Row ``r`` sees a key where its item allows
    one at or before ``r``: ``row_any [n, 1 or Hk, R]`` (None when every row does)."""
    n, W = cols.shape
    Hc = ctx.grid.cls.shape[1]
    dev = ctx.device
    allowed = _predicate(ctx, torch.zeros((1, 1, 1, 1), dtype=I64),
                         cols.clamp(0, ctx.Lk - 1).view(n, 1, 1, W), units.view(n, 1, 1, 1),
                         torch.arange(Hc).view(1, Hc, 1, 1), ctx.column)
    allowed = allowed & ((cols >= 0) & (cols < ctx.Lk)).view(n, 1, 1, W)       # [n, Hc, 1, W]
    mask = torch.where(allowed, 0.0, NINF).to(ctx.dtype).to(dev)
    first = torch.where(allowed.any(-1), allowed.to(torch.uint8).argmax(-1), R)  # [n, Hc, 1]
    row_any = torch.arange(R).view(1, 1, R) >= first          # (none where no key: R > all)
    return mask, (None if bool(row_any.all()) else row_any.to(dev))


# ---- tiles

def _tiles_option(ctx: _Ctx):
    """(name, cost, make) of the ``tiles`` strategy: always possible (it is the fallback;
    masks too big to keep in the plan are built by each call when it runs)."""
    g = ctx.grid
    nq, nk, Bu = ctx.nq, ctx.nk, ctx.Bu
    remaining = g.nonempty.clone()
    levels = []                                   # (rt, masked, selected [Bu, ng, nk])
    for rt in sorted({min(r // BLOCK, nq) for r in LEVELS if r // BLOCK > 1 and nq > 1},
                     reverse=True):
        ng = -(-nq // rt)
        pad = ng * rt - nq
        f = g.full & remaining
        if pad:                                   # rows past the end do not constrain a block
            f = torch.cat([f, torch.ones(Bu, pad, nk, dtype=torch.bool)], 1)
        F = f.view(Bu, ng, rt, nk).all(2)
        if not bool(F.any()):
            continue
        remaining &= ~F.unsqueeze(2).expand(Bu, ng, rt, nk).reshape(Bu, ng * rt, nk)[:, :nq]
        levels.append((rt, False, F))
    levels.append((1, True, remaining))
    lanes, G = g.lanes, ctx.G
    specs, est_calls = [], []                     # (slot, rt, masked, units, blocks, cols_t)
    copies = mask_elems = 0
    slot = 0
    for rt, masked, sel in levels:
        width = sel.sum(-1)                                             # [Bu, ng]
        u, b = width.nonzero(as_tuple=True)
        if u.numel() == 0:
            continue
        R = rt * BLOCK if nq > 1 else ctx.Lq
        w_items = width[u, b]
        for lo, hi, w in _buckets(w_items.tolist(), lanes * G * R * BLOCK / _eff(G * R)):
            pick = ((w_items >= lo) & (w_items <= hi)).nonzero().flatten()
            su, sb = u[pick], b[pick]
            cols_t = _first_true(sel[su, sb], w)                        # [n, w], -1 padding
            m = masked or bool((cols_t < 0).any())
            specs.append((slot, rt, m, su, sb, cols_t))
            n = su.numel()
            est_calls.append((n, R, w * BLOCK, False, m))
            copies += n * lanes * (2 * w * BLOCK + 2 * G * R) * ctx.D
            if m:
                mask_elems += n * (ctx.Hq if g.head_dep else G) * R * w * BLOCK
        slot += 1
    lazy = mask_elems > MASK_BUDGET
    if lazy:
        # Masks too big to keep: each call builds its own when it runs, a chunk of items
        # at a time (about MASK_BUDGET / 8 mask elements per call).
        chunked, est_calls = [], []
        for slot_, rt, m, su, sb, cols_t in specs:
            R = rt * BLOCK if nq > 1 else ctx.Lq
            per_item = (ctx.Hq if g.head_dep else G) * R * cols_t.shape[1] * BLOCK
            step = max(1, (MASK_BUDGET // 8) // per_item) if m else su.numel()
            for i in range(0, su.numel(), step):
                chunked.append((slot_, rt, m, su[i:i + step], sb[i:i + step],
                                cols_t[i:i + step]))
                est_calls.append((su[i:i + step].numel(), R, cols_t.shape[1] * BLOCK, False, m))
        specs = chunked
        copies += 2 * mask_elems                  # built again in every forward and backward
    est = cost(est_calls, lanes, G, copies)
    # each call's row and key positions (int64) and a bool test over its keys
    index_bytes = sum(s[3].numel() * (s[1] * BLOCK * 8 + s[5].shape[1] * BLOCK * 10)
                      for s in specs)

    def make():
        check_room(index_bytes, "cpu", f"the CPU plan's key lists for {ctx.Lq} queries over "
                   f"{ctx.Lk} keys (every allowed key of every tile row, as int64)")
        return [_tiles_call(ctx, *s, lazy=lazy) for s in specs]
    return ("tiles", est, make)


def _buckets(widths: list, unit: float) -> list:
    """Partition item widths (in tiles) into ranges ``(lo, hi, padded width)`` minimising
    ``unit * items * padded width + CALL_COST`` per range (items are padded to the widest
    of their range)."""
    vals = sorted(set(widths))
    counts = [widths.count(v) for v in vals]
    if len(vals) > 48:                            # coarsen: widths rounded up on a 1.1 ratio
        grid, x = [], 1
        while x < vals[-1]:
            grid.append(x)
            x = max(x + 1, int(x * 1.1))
        grid.append(vals[-1])
        merged = {}
        for v, c in zip(vals, counts):
            key = next(gv for gv in grid if gv >= v)
            merged[key] = merged.get(key, 0) + c
        vals, counts = sorted(merged), [merged[k] for k in sorted(merged)]
    m = len(vals)
    pre = [0]
    for c in counts:
        pre.append(pre[-1] + c)
    best = [0.0] + [float("inf")] * m
    cut = [0] * (m + 1)
    for j in range(1, m + 1):
        for i in range(j):
            c = best[i] + unit * (pre[j] - pre[i]) * vals[j - 1] + CALL_COST
            if c < best[j]:
                best[j], cut[j] = c, i
    out, j = [], m
    while j > 0:
        i = cut[j]
        lo = vals[i - 1] + 1 if i > 0 else 1
        out.append((lo, vals[j - 1], vals[j - 1]))
        j = i
    return out[::-1]


def _first_true(sel: torch.Tensor, w: int) -> torch.Tensor:
    """Indices of the True entries of each row of ``sel [n, nk]``, padded with -1 to ``w``
    (from the True entries alone: no int64 copy of ``sel``)."""
    r, c = sel.nonzero(as_tuple=True)                       # row-major: each row's in order
    counts = torch.bincount(r, minlength=sel.shape[0])
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(r.numel()) - start[r]
    out = torch.full((sel.shape[0], w), -1, dtype=torch.int64)
    keep = rank < w
    out[r[keep], rank[keep]] = c[keep]
    return out


def _item_tiles(ctx, units, qt, kt) -> torch.Tensor:
    """Tile classes ``[n, Hc, rt, w]`` of items with row tiles ``qt [n, rt]`` and key tiles
    ``kt [n, w]`` of batch units ``units [n]`` (EMPTY outside the grid)."""
    cls = ctx.grid.cls
    nq, nk = ctx.nq, ctx.nk
    qv, kv = (qt >= 0) & (qt < nq), (kt >= 0) & (kt < nk)
    t = cls[units.view(-1, 1, 1), :, qt.clamp(0, nq - 1).unsqueeze(-1),
            kt.clamp(0, nk - 1).unsqueeze(1)]                                   # [n, rt, w, Hc]
    t = t.permute(0, 3, 1, 2)
    ok = (qv.unsqueeze(-1) & kv.unsqueeze(1)).unsqueeze(1)
    return torch.where(ok, t, torch.tensor(EMPTY, dtype=t.dtype))


def _tiles_call(ctx, slot, rt, masked, units, blocks, cols_t, *, lazy=False) -> Call:
    n, w = cols_t.shape
    R = rt * BLOCK if ctx.nq > 1 else ctx.Lq
    rows = (blocks * rt * BLOCK).view(n, 1) + torch.arange(R).view(1, R)
    cols = ((cols_t * BLOCK).unsqueeze(-1) + torch.arange(BLOCK)) \
        .masked_fill_((cols_t < 0).unsqueeze(-1), -1).view(n, w * BLOCK)
    qt = blocks.view(n, 1) * rt + torch.arange(rt).view(1, rt)
    if masked and bool(((cols >= 0) & (cols < ctx.Lk)).all()) and rt == 1 and \
            bool(ctx.grid.full[units.view(n, 1), blocks.view(n, 1), cols_t].all()):
        masked = False                            # every tile FULL for every head: no mask
    bidx, hidx = ctx.lane_index(units)
    mask = row_any = build = None
    if masked and lazy:
        tiles = _item_tiles(ctx, units, qt, cols_t)

        def build(ctx=ctx, tiles=tiles, units=units, rows=rows, cols=cols):
            return _mask(ctx, tiles, units, rows, cols)
    elif masked:
        mask, row_any = _mask(ctx, _item_tiles(ctx, units, qt, cols_t), units, rows, cols)
    starts = cols[:, 0]
    contiguous = bool(((cols[:, -1] - cols[:, 0]) == cols.shape[1] - 1).all()) and \
        bool((cols >= 0).all())
    same_b = ctx.grid.shared or ctx.B == 1
    steps = (starts[1:] - starts[:-1]).unique() if n > 1 else torch.tensor([0])
    # (one step between consecutive items, never negative: views take no negative stride)
    col_step = int(steps[0]) if contiguous and same_b and steps.numel() == 1 \
        and int(steps[0]) >= 0 else None
    return Call(slot=slot, bidx=bidx.to(ctx.device), hidx=hidx.to(ctx.device),
                rows=rows.to(ctx.device), cols=cols.to(ctx.device),
                row_step=_row_step(ctx, rows), col_step=col_step, mask=mask, row_any=row_any,
                build_mask=build)


def _row_step(ctx, rows) -> Optional[int]:
    """The one step between consecutive items' first rows (``rows`` ``[n, R]``; R for one
    item), or None where the steps differ, go back (views take no negative stride) or the
    items belong to different batch elements."""
    n, R = rows.shape
    rsteps = (rows[1:, 0] - rows[:-1, 0]).unique() if n > 1 else torch.tensor([R])
    same_b = ctx.grid.shared or ctx.B == 1
    return int(rsteps[0]) if same_b and rsteps.numel() == 1 and int(rsteps[0]) >= 0 else None


def _additive(ctx, allowed) -> tuple:
    """``(mask, any_key)`` of items' allowed pairs ``allowed`` ``[n, Hc, R, W]``: the additive
    mask ``[n, 1 or Hk, G * R, W]`` (0 / -inf) in the plan's dtype on its device (a
    head-independent mask repeated for the G query heads folded into the rows), and
    whether each of its rows has an allowed key (on the CPU)."""
    n, Hc, R, W = allowed.shape
    G = ctx.G
    m = torch.where(allowed, 0.0, NINF)
    if Hc == 1 and G > 1:
        m = m.unsqueeze(2).expand(n, 1, G, R, W)
    m = m.reshape(n, -1, G * R, W)
    return m.to(ctx.dtype).to(ctx.device), m.isfinite().any(-1)


# ---- keys

def _keys_seen(ctx: _Ctx):
    """The keys each row tile may see: bool ``[Bu, nq, Lk]`` (those of its FULL tiles, and
    within its PARTIAL tiles those the predicate allows some row and head), or None where
    the PARTIAL tiles hold more than :data:`KEYS_BUDGET` pairs."""
    g = ctx.grid
    Bu, Hc, nq, nk = g.cls.shape
    pn, pv, pi, pj = (g.cls == PARTIAL).nonzero(as_tuple=True)
    if pn.numel() * BLOCK * BLOCK > KEYS_BUDGET or Bu * nq * nk * BLOCK > KEYS_BUDGET * 4:
        return None
    seen = (g.cls == FULL).any(1).unsqueeze(-1).repeat(1, 1, 1, BLOCK).to(torch.uint8)
    flat = seen.view(-1, BLOCK)                                       # [Bu * nq * nk, 64]
    lane = torch.arange(BLOCK)
    step = max(1, (1 << 22) // (BLOCK * BLOCK))
    for s in range(0, pn.numel(), step):
        u, h, i, j = (t[s:s + step] for t in (pn, pv, pi, pj))
        rows = (i.view(-1, 1, 1) * BLOCK + lane.view(1, -1, 1)).clamp(max=ctx.Lq - 1)
        keys = j.view(-1, 1, 1) * BLOCK + lane.view(1, 1, -1)
        ok = _predicate(ctx, rows, keys.clamp(max=ctx.Lk - 1), u.view(-1, 1, 1),
                        h.view(-1, 1, 1)) & (keys < ctx.Lk)              # [P, 64, 64]
        flat.index_put_(((u * nq + i) * nk + j,), ok.any(1).to(torch.uint8), accumulate=True)
    return seen.view(Bu, nq, nk * BLOCK)[..., :ctx.Lk] > 0


def _keys_options(ctx: _Ctx) -> list:
    """(name, cost, make) of the ``keys`` strategy for each row block of :data:`KEYS_ROWS`
    tiles whose masks fit :data:`MASK_BUDGET`; none without PARTIAL tiles or where they
    are too many to evaluate (:func:`_keys_seen`)."""
    g = ctx.grid
    if not bool((g.cls == PARTIAL).any()):
        return []
    seen = _keys_seen(ctx)
    if seen is None:
        return []
    Bu, nq = seen.shape[:2]
    lanes, G = g.lanes, ctx.G
    heads = ctx.Hq if g.head_dep else G
    out = []
    for rt in sorted({min(r, nq) for r in KEYS_ROWS}):
        ng = -(-nq // rt)
        sel = seen
        if ng * rt > nq:
            sel = torch.cat([sel, torch.zeros(Bu, ng * rt - nq, ctx.Lk, dtype=torch.bool)], 1)
        sel = sel.view(Bu, ng, rt, ctx.Lk).any(2)                       # [Bu, ng, Lk]
        width = sel.sum(-1)
        u, b = width.nonzero(as_tuple=True)
        if u.numel() == 0:
            continue
        R = rt * BLOCK if nq > 1 else ctx.Lq
        w_items = width[u, b]
        specs, est_calls, copies, mask_elems = [], [], 0, 0
        for lo, hi, w in _buckets(w_items.tolist(), lanes * G * R / _eff(G * R)):
            pick = ((w_items >= lo) & (w_items <= hi)).nonzero().flatten()
            su, sb = u[pick], b[pick]
            n = su.numel()
            specs.append((rt, su, sb, w))
            est_calls.append((n, R, w, False, True))
            copies += n * lanes * (2 * w + 2 * G * R) * ctx.D
            mask_elems += n * heads * R * w
        if mask_elems > MASK_BUDGET:
            continue
        est = cost(est_calls, lanes, G, copies)

        def make(specs=specs, sel=sel):
            return [_keys_call(ctx, rt, su, sb, _first_true(sel[su, sb], w))
                    for rt, su, sb, w in specs]
        out.append(("keys", est, make))
    return out


def _keys_call(ctx, rt, units, blocks, cols) -> Call:
    """One masked call of the ``keys`` strategy: items of ``rt`` row tiles of batch units
    ``units`` and blocks ``blocks`` against key positions ``cols`` ``[n, w]`` (-1 padding)."""
    n, w = cols.shape
    R = rt * BLOCK if ctx.nq > 1 else ctx.Lq
    rows = (blocks * rt * BLOCK).view(n, 1) + torch.arange(R).view(1, R)
    Hc = ctx.grid.cls.shape[1]
    allowed = _predicate(ctx, rows.clamp(max=ctx.Lq - 1).view(n, 1, R, 1),
                         cols.clamp(0, ctx.Lk - 1).view(n, 1, 1, w), units.view(n, 1, 1, 1),
                         torch.arange(Hc).view(1, Hc, 1, 1)) & (cols >= 0).view(n, 1, 1, w)
    mask, any_key = _additive(ctx, allowed)
    bidx, hidx = ctx.lane_index(units)
    dev = ctx.device
    return Call(slot=0, bidx=bidx.to(dev), hidx=hidx.to(dev), rows=rows.to(dev),
                cols=cols.to(dev), row_step=_row_step(ctx, rows), col_step=None, mask=mask,
                row_any=None if bool(any_key.all()) else any_key.to(dev))


# ---- segments

def _segments_option(ctx: _Ctx):
    """(name, cost, make) of the ``segments`` strategy, or None when the pattern does not
    split the sequence into independent segments (documents, chunks).

    A segment is a run of positions whose queries see keys of the same run only. Their
    boundaries are proposed where a position may not see its predecessor, then proven: a
    tile spanning two segments must be EMPTY, or its allowed pairs (predicate on PARTIAL
    tiles) all within one segment. Each segment is one item (rows and keys of its run),
    padded to the length of its bucket; with the kernel's causal flag and no mask when
    the pattern is exactly causal within segments.
    """
    if ctx.off != 0 or ctx.Lq != ctx.Lk or ctx.Lq < 2:
        return None
    L, Bu = ctx.Lq, ctx.Bu
    see_prev = _pairs_allowed(ctx, torch.arange(1, L), torch.arange(L - 1)).any(1)  # [Bu, L-1]
    starts = torch.cat([torch.ones(Bu, 1, dtype=torch.bool), ~see_prev], 1)      # [Bu, L]
    n_seg = int(starts.sum(1).max())
    if n_seg < 2:
        return None
    seg = starts.cumsum(1) - 1                                                   # [Bu, L]
    if not _segments_hold(ctx, seg):
        return None
    exact = ctx.G == 1 and _segments_causal(ctx, seg)
    units, begin, length = [], [], []
    for u in range(Bu):
        b = starts[u].nonzero().flatten()
        e = torch.cat([b[1:], torch.tensor([L])])
        units.append(torch.full_like(b, u))
        begin.append(b)
        length.append(e - b)
    units, begin, length = torch.cat(units), torch.cat(begin), torch.cat(length)
    lanes, G = ctx.grid.lanes, ctx.G
    specs, est_calls = [], []
    copies = 0
    for lo, hi, Lb in _length_buckets(length.tolist(), lanes * G):
        pick = ((length >= lo) & (length <= hi)).nonzero().flatten()
        specs.append((units[pick], begin[pick], length[pick], Lb))
        est_calls.append((pick.numel(), Lb, Lb, G == 1, not exact))
        copies += pick.numel() * lanes * Lb * (3 * G + 3) * ctx.D
    mask_elems = 0 if exact else \
        sum(s[0].numel() * (ctx.Hq if ctx.grid.head_dep else G) * s[3] * s[3] for s in specs)
    if mask_elems > MASK_BUDGET:
        return None
    est = cost(est_calls, lanes, G, copies)

    def make():
        return [_segment_call(ctx, *s, exact=exact) for s in specs]
    return ("segments", est, make)


def _pairs_allowed(ctx, rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Whether the pattern allows (row, key) pairs ``rows [P]``, ``keys [P]``: ``[Bu, Hc, P]``,
    from the tile classes, with the predicate evaluated on pairs in PARTIAL tiles only."""
    cls = ctx.grid.cls[:, :, rows // BLOCK, keys // BLOCK]                          # [Bu, Hc, P]
    out = cls == FULL
    u, h, i = (cls == PARTIAL).nonzero(as_tuple=True)
    if u.numel():
        out[u, h, i] = _predicate(ctx, rows[i], keys[i], u, h)
    return out


def _segments_hold(ctx, seg: torch.Tensor) -> bool:
    """No allowed pair joins two segments (``seg [Bu, L]``: segment of each position)."""
    g = ctx.grid
    nq, L = ctx.nq, ctx.Lq
    pad = nq * BLOCK - L
    sp = torch.cat([seg, seg[:, -1:].expand(-1, pad)], 1) if pad else seg
    lo = sp.view(-1, nq, BLOCK).amin(-1)                                         # [Bu, nq]
    hi = sp.view(-1, nq, BLOCK).amax(-1)
    same = (lo.unsqueeze(2) == hi.unsqueeze(2)) & (lo.unsqueeze(2) == lo.unsqueeze(1)) & \
        (hi.unsqueeze(1) == lo.unsqueeze(1))                                     # [Bu, nq, nk]
    apart = (hi.unsqueeze(2) < lo.unsqueeze(1)) | (hi.unsqueeze(1) < lo.unsqueeze(2))
    if bool((g.nonempty & apart).any()):
        return False
    mixed = g.nonempty & ~same & ~apart
    if bool((mixed & (g.cls == FULL).any(1)).any()):
        return False
    u, ti, tj = mixed.nonzero(as_tuple=True)
    for s in range(0, u.numel(), 256):
        uu, ii, jj = u[s:s + 256], ti[s:s + 256], tj[s:s + 256]
        r = (ii * BLOCK).view(-1, 1, 1) + torch.arange(BLOCK).view(1, -1, 1)
        c = (jj * BLOCK).view(-1, 1, 1) + torch.arange(BLOCK).view(1, 1, -1)
        valid = (r < L) & (c < L)
        r, c = r.clamp(max=L - 1), c.clamp(max=L - 1)
        rows_seg = seg[uu.view(-1, 1, 1), r]
        cols_seg = seg[uu.view(-1, 1, 1), c]
        allowed = torch.zeros(r.shape[0], BLOCK, BLOCK, dtype=torch.bool)
        for h in range(g.cls.shape[1]):
            part = (g.cls[uu, h, ii, jj] == PARTIAL).view(-1, 1, 1)
            allowed |= part & _predicate(ctx, r, c, uu.view(-1, 1, 1),
                                         torch.full((1, 1, 1), h, dtype=I64))
        if bool((allowed & valid & (rows_seg != cols_seg)).any()):
            return False
    return True


def _segments_causal(ctx, seg: torch.Tensor) -> bool:
    """Whether the pattern is exactly causal within segments: a pair of one segment is
    allowed if and only if its key is at or before its query. From the tile classes, with
    the predicate evaluated on PARTIAL tiles only (pairs of different segments are already
    known to be disallowed)."""
    g = ctx.grid
    nq, L = ctx.nq, ctx.Lq
    pad = nq * BLOCK - L
    sp = torch.cat([seg, seg[:, -1:].expand(-1, pad)], 1) if pad else seg
    lo = sp.view(-1, nq, BLOCK).amin(-1)
    hi = sp.view(-1, nq, BLOCK).amax(-1)
    shared = (lo.unsqueeze(2) <= hi.unsqueeze(1)) & (lo.unsqueeze(1) <= hi.unsqueeze(2))
    i = torch.arange(nq).view(-1, 1)
    j = torch.arange(nq).view(1, -1)
    below, above = j < i, j > i                        # whole tiles (the same length on both)
    full, empty = (g.cls == FULL).all(1), (g.cls == EMPTY).all(1)
    # Settled by the class: FULL tiles below the diagonal, EMPTY ones above; the others
    # holding pairs of one segment are checked pair by pair.
    check = shared & ~(below & full) & ~(above & empty)
    u, ti, tj = check.nonzero(as_tuple=True)
    for h in range(g.cls.shape[1]):
        cls_h = g.cls[u, h, ti, tj]
        for s in range(0, u.numel(), 256):
            uu, ii, jj, ch = u[s:s + 256], ti[s:s + 256], tj[s:s + 256], cls_h[s:s + 256]
            r = (ii * BLOCK).view(-1, 1, 1) + torch.arange(BLOCK).view(1, -1, 1)
            c = (jj * BLOCK).view(-1, 1, 1) + torch.arange(BLOCK).view(1, 1, -1)
            valid = (r < L) & (c < L)
            r, c = r.clamp(max=L - 1), c.clamp(max=L - 1)
            same = seg[uu.view(-1, 1, 1), r] == seg[uu.view(-1, 1, 1), c]
            allowed = (ch == FULL).view(-1, 1, 1).expand(-1, BLOCK, BLOCK).clone()
            p = (ch == PARTIAL).nonzero().flatten()
            if p.numel():
                allowed[p] = _predicate(ctx, r[p], c[p], uu[p].view(-1, 1, 1),
                                        torch.full((1, 1, 1), h, dtype=I64))
            if bool((valid & same & (allowed != (c <= r))).any()):
                return False
    return True


def _length_buckets(lengths: list, unit: float) -> list:
    """Segment lengths grouped into ranges ``(lo, hi, padded length)`` minimising
    ``unit * items * padded length**2 + CALL_COST`` per range."""
    vals = sorted(set(lengths))
    counts = [lengths.count(v) for v in vals]
    m = len(vals)
    pre = [0]
    for c in counts:
        pre.append(pre[-1] + c)
    best = [0.0] + [float("inf")] * m
    cut = [0] * (m + 1)
    for j in range(1, m + 1):
        for i in range(max(0, j - 64), j):
            c = best[i] + unit * (pre[j] - pre[i]) * vals[j - 1] ** 2 / _eff(vals[j - 1]) \
                + CALL_COST
            if c < best[j]:
                best[j], cut[j] = c, i
    out, j = [], m
    while j > 0:
        i = cut[j]
        out.append((vals[i - 1] + 1 if i > 0 else 1, vals[j - 1], vals[j - 1]))
        j = i
    return out[::-1]


def _segment_call(ctx, units, begin, length, Lb, *, exact: bool) -> Call:
    """The call of segments ``[begin, begin + length)`` (of batch units ``units``), each as an
    item of ``Lb`` rows and keys; ``exact``: the pattern is exactly causal within segments
    (the kernel's causal flag, no mask)."""
    n = units.numel()
    L = ctx.Lq
    local = torch.arange(Lb)
    rows = begin.view(-1, 1) + local.view(1, -1)                                  # [n, Lb]
    own = local.view(1, -1) < length.view(-1, 1)
    cols = torch.where(own, rows, -1)                                             # keys it owns
    bidx, hidx = ctx.lane_index(units)
    dev = ctx.device
    if exact:
        return Call(slot=0, bidx=bidx.to(dev), hidx=hidx.to(dev), rows=rows.to(dev),
                    cols=cols.to(dev), row_step=None, col_step=None, mask=None, row_any=None,
                    is_causal=True, row_valid=own.to(dev), col_valid=own.to(dev))
    qt = rows.clamp(max=L - 1) // BLOCK
    tiles = ctx.grid.cls[units.view(-1, 1, 1), :, qt.unsqueeze(-1),
                         (cols.clamp(min=0) // BLOCK).unsqueeze(1)]               # [n, Lb, Lb, Hc]
    tiles = tiles.permute(0, 3, 1, 2)
    pair_own = (own.unsqueeze(2) & own.unsqueeze(1)).unsqueeze(1)                 # [n, 1, Lb, Lb]
    allowed = (tiles == FULL) & pair_own
    pn, pv, pr, pc = ((tiles == PARTIAL) & pair_own).nonzero(as_tuple=True)
    if pn.numel():
        vals = _predicate(ctx, rows[pn, pr], cols[pn, pc], units[pn], pv)
        allowed[pn, pv, pr, pc] = vals
    below = (local.view(-1, 1) >= local.view(1, -1)) & pair_own                   # j <= i
    G = ctx.G
    is_causal = G == 1 and not bool((allowed & ~below).any())
    mask = row_any = None
    if not (is_causal and bool((allowed == below.expand_as(allowed)).all())):
        mask, any_key = _additive(ctx, allowed)
        own_rows = own.view(n, 1, 1, Lb).expand(n, 1, G, Lb).reshape(n, 1, G * Lb)
        row_any = None if bool((any_key | ~own_rows).all()) else any_key.to(ctx.device)
    return Call(slot=0, bidx=bidx.to(dev), hidx=hidx.to(dev), rows=rows.to(dev),
                cols=cols.to(dev), row_step=None, col_step=None, mask=mask, row_any=row_any,
                is_causal=is_causal, row_valid=own.to(dev), col_valid=own.to(dev))


# ---- masks

def _predicate(ctx, rows, keys, units, heads, nodes=None) -> torch.Tensor:
    """The pattern (or the conjunction of ``nodes``, bool IR nodes of it) at query rows
    ``rows`` and key positions ``keys`` (broadcastable int64), for batch units ``units`` and
    heads ``heads`` (broadcastable, or None for all: then the result gets leading
    ``[Bu, Hc]`` dims)."""
    g = ctx.grid
    if units is None:
        Bu, Hc = g.cls.shape[0], g.cls.shape[1]
        extra = rows.dim()
        units = torch.arange(Bu).view(-1, *([1] * (extra + 1)))
        heads = torch.arange(Hc).view(1, -1, *([1] * extra))
    zero = torch.zeros((), dtype=I64)
    dev = ctx.device
    env = {"q": (rows + ctx.off).to(dev), "k": keys.to(dev),
           "h": (heads if g.head_dep else zero).to(dev),
           "b": (units if g.batch_dep else zero).to(dev),
           "Lq": ctx.Lq, "Lk": ctx.Lk, "H": ctx.Hq}
    out = None
    for node in nodes or (ctx.pattern.ir,):
        x = torch.as_tensor(evaluate(node, env, ctx.inputs), device=dev).to(torch.bool)
        out = x if out is None else out & x
    shape = torch.broadcast_shapes(rows.shape, keys.shape, units.shape, heads.shape)
    return out.cpu().expand(shape)


def _mask(ctx, tiles, units, rows, cols):
    """The additive mask ``[n, 1 or Hk, G * R, W]`` and ``row_any`` of items.

    ``tiles`` ``[n, Hc, rt, w]``: the class of each of an item's tiles (EMPTY where the
    item does not own the tile); ``rows`` ``[n, R]`` query rows; ``cols`` ``[n, W]`` key
    positions, in whole tiles of ``BLOCK``. FULL and EMPTY tiles are filled from their
    class, the predicate is evaluated on PARTIAL tiles only. Every operation on the mask is
    a piece below the parallel grain (:mod:`spattn.runtime.cpu_ops`).
    """
    n, Hc, rt, w = tiles.shape
    R, W = rows.shape[1], cols.shape[1]
    G = ctx.G
    gm = G if Hc == 1 else 1                      # GQA copies of a head-independent mask
    dt = ctx.dtype
    mask = torch.empty((n, Hc, gm, rt * BLOCK, w * BLOCK), dtype=dt, device=ctx.device)
    base = torch.where(tiles == FULL, 0.0, NINF).to(dt)                        # [n, Hc, rt, w]
    blocks = mask.view(n, Hc, gm, rt, BLOCK, w, BLOCK)
    cpu_ops.copy_(blocks, base.view(n, Hc, 1, rt, 1, w, 1).to(ctx.device))
    in_range = (cols >= 0) & (cols < ctx.Lk)                                    # [n, W]
    row_any = (tiles == FULL).any(-1)                                           # [n, Hc, rt]
    row_any = row_any.unsqueeze(-1).expand(n, Hc, rt, BLOCK).reshape(n, Hc, rt * BLOCK)
    pn, pv, pi, pj = (tiles == PARTIAL).nonzero(as_tuple=True)
    if pn.numel():
        r = pi.view(-1, 1, 1) * BLOCK + torch.arange(BLOCK).view(1, -1, 1)      # local rows
        c = pj.view(-1, 1, 1) * BLOCK + torch.arange(BLOCK).view(1, 1, -1)      # local keys
        qrow = rows[pn.view(-1, 1, 1), r.clamp(max=R - 1)].clamp(max=ctx.Lq - 1)
        key = cols[pn.view(-1, 1, 1), c.clamp(max=W - 1)]
        ok = in_range[pn.view(-1, 1, 1), c.clamp(max=W - 1)] & (c < W)
        allowed = _predicate(ctx, qrow, key.clamp(0, ctx.Lk - 1), units[pn].view(-1, 1, 1),
                             pv.view(-1, 1, 1)) & ok                            # [P, 64, 64]
        vals = torch.where(allowed, 0.0, NINF).to(dt).to(ctx.device)
        for t, (a, b, i, j) in enumerate(zip(pn.tolist(), pv.tolist(), pi.tolist(),
                                             pj.tolist())):
            blocks[a, b, :, i, :, j, :].copy_(vals[t].unsqueeze(0).expand(gm, BLOCK, BLOCK))
        part_any = torch.zeros(n * Hc * rt, BLOCK, dtype=torch.bool)
        flat = (pn * Hc + pv) * rt + pi
        part_any.index_put_((flat,), allowed.any(-1), accumulate=True)
        row_any = row_any | part_any.view(n, Hc, rt * BLOCK)
    mask = mask[..., :R, :W]
    ragged = ~in_range & (cols >= 0)                    # keys past Lk inside a kept tile
    for i in ragged.any(1).nonzero().flatten().tolist():
        idx = ragged[i].nonzero().flatten().to(ctx.device)
        mask[i].index_fill_(-1, idx, NINF)
    # [n, Hc, gm, R, W] -> [n, 1 or Hk, G * R, W]: a head-dependent mask's heads are
    # (key head, group) pairs, the group folded into the rows as the queries are
    row_any = row_any[..., :R].unsqueeze(2).expand(n, Hc, gm, R).reshape(n, -1, G * R)
    mask = mask.reshape(n, -1, G * R, W) if R == rt * BLOCK and W == w * BLOCK else \
        cpu_ops.contiguous(mask).view(n, -1, G * R, W)
    return mask, (None if bool(row_any.all()) else row_any.to(ctx.device))


# ------------------------------------------------------------------ memo
