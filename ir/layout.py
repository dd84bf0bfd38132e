"""Token layouts: a pattern over flattened grid positions, run with box-shaped tiles.

A pattern sees tokens in sequence order. When the tokens are the cells of a grid
``(n_1, ..., n_d)`` flattened row-major (an image, a video, a residue class of a dilated
window), no contiguous tile of a 2-D neighbourhood is FULL and most computed pairs are
masked. Permuting the tokens so that each contiguous run of ``T`` tokens is a *box* of the
grid (``16 x 8`` cells, ``2 x 8 x 8``, one residue class) makes the tile pairs products of
per-axis intervals: the interval analysis then proves most of them FULL or EMPTY.

A layout is two pieces of data:

* the **grid**: the axes' sizes (row-major, ``N = prod(shape)`` tokens) and, per axis, an
  optional *split* ``d`` (the axis coordinate ``c = m * d + r``, ``0 <= r < d``): the
  residue classes of a dilation. A split that does not divide its axis pads it.
* the **box**: the tile shape over the *virtual axes* (every residue part first, then the
  major parts in axis order), ``T = prod(box)`` tokens.

The permuted index ``i`` is tile ``i // T`` (row-major over the tile grid) and offset
``i % T`` (row-major within the box); the virtual coordinates follow by mixed radix,
the grid coordinates by ``c = m * d + r`` and the original position by
``sum(c_a * stride_a)``. Cells past an axis (padding) are masked out of the remapped pattern.

:func:`coordinate_form` rewrites the pattern in grid coordinates (``q // W`` becomes the
row of q, ``q % W`` its column; any subterm the rewriting cannot read stays as written, and
is still exact); :func:`remap` substitutes the coordinates of the permuted index and adds
the padding condition; :func:`discover` infers the grid from the divisors and moduli of a
pattern; :func:`choose` picks the box whose tiles compute the fewest pairs and keeps the
layout only when the cost model predicts it faster than sequence order by :data:`MARGIN`
(:func:`layout_cost`).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Optional

import torch

from ..dsl.errors import SpattnError
from . import build as B
from .nodes import Const, FloorDiv, Load, Mod, Node, Range, Sum, Table, Var, free_vars, walk

__all__ = ["Grid", "Layout", "Remap", "Ordered", "coordinate_form", "remap", "discover",
           "declared",
           "choose", "ordered",
           "candidate_boxes", "computed_pairs", "sampled_pairs", "layout_cost", "MARGIN",
           "TILE_TOKENS",
           "AUTO_MIN_TOKENS"]

#: tokens per box (the largest kernel tile of a side).
TILE_TOKENS = 128
#: a layout is used only when its predicted cost (:func:`layout_cost`: its computed pairs,
#: the reads of its tile lists, its query tiles and the gathers into and out of box order)
#: is at most this fraction of the sequence order's (the model's error on the layouts of
#: ``benchmarks/layout_cost.py``: predicted 0.49-0.83 where 0.72-0.83 was measured).
MARGIN = 0.9
#: boxes tried per grid at most (the squarest first), and when a pattern is not a product
#: of per-axis conditions (each is then a classification at the call's size).
MAX_CANDIDATES = 64
FULL_CANDIDATES = 12
#: query-tile rows classified per candidate box of a pattern that is not a product (spread
#: evenly over the grid; the counts scaled up): the choice's estimate.
SAMPLED_ROWS = 16
#: the smallest box tried when a grid is too small for boxes of a whole tile.
MIN_TOKENS = 16
#: calls shorter than this run in sequence order under ``SPATTN_LAYOUT=auto`` (a few tiles:
#: the gathers and the choice cost more than the tiles they could save).
AUTO_MIN_TOKENS = 1024


def _vplaceholder(side: str, j: int) -> Var:
    """The coordinate of ``side`` (q or k) on virtual axis ``j`` during the rewriting (a
    variable that never leaves this module)."""
    return Var(f"{side}#{j}")


@dataclass(frozen=True)
class Grid:
    """Tokens as the cells of ``shape`` flattened row-major; ``splits[a]`` > 1 splits axis a
    into residue classes (``c = m * splits[a] + r``). ``offset``: tokens before the grid
    (text before an image): positions ``0 .. offset - 1`` are extra tokens, the grid's
    cells are ``offset + sum(c_a * stride_a)``. ``suffix``: tokens after the grid (text
    after an image): positions ``offset + size .. tokens - 1``."""

    shape: tuple[int, ...]
    splits: tuple[int, ...] = ()
    offset: int = 0
    suffix: int = 0

    def __post_init__(self):
        if not self.splits:
            object.__setattr__(self, "splits", (1,) * len(self.shape))

    @property
    def size(self) -> int:
        """The grid's cells."""
        return math.prod(self.shape)

    @property
    def tokens(self) -> int:
        """Every token: the extra ones before the grid, the cells, the extra ones after."""
        return self.offset + self.size + self.suffix

    @property
    def end(self) -> int:
        """The position of the first token after the grid."""
        return self.offset + self.size

    @property
    def strides(self) -> tuple[int, ...]:
        out, s = [], 1
        for n in reversed(self.shape):
            out.append(s)
            s *= n
        return tuple(reversed(out))

    def virtual(self) -> list[tuple[int, int, int]]:
        """The virtual axes ``(axis, weight, size)``: residue parts first, then majors."""
        res = [(a, 1, d) for a, d in enumerate(self.splits) if d > 1]
        maj = [(a, d, -(-n // d)) for a, (n, d) in enumerate(zip(self.shape, self.splits))]
        return res + maj

    def __str__(self) -> str:
        axes = " x ".join(f"{n}" + (f"/{d}" if d > 1 else "")
                          for n, d in zip(self.shape, self.splits))
        return (f"grid {axes}" + (f" after {self.offset} tokens" if self.offset else "")
                + (f" before {self.suffix} tokens" if self.suffix else ""))


@dataclass(frozen=True)
class Layout:
    """A grid and a box over its virtual axes (module docstring)."""

    grid: Grid
    box: tuple[int, ...]

    @property
    def virtual(self):
        return self.grid.virtual()

    @property
    def tokens(self) -> int:
        return math.prod(self.box)

    @property
    def tiles(self) -> tuple[int, ...]:
        """Boxes per virtual axis (the virtual sizes rounded up to whole boxes)."""
        return tuple(-(-v // b) for (_, _, v), b in zip(self.virtual, self.box))

    @property
    def prefix(self) -> int:
        """Slots of the extra tokens before the grid: their count rounded up to whole boxes
        (they keep their sequence order; slots past them are padding)."""
        return -(-self.grid.offset // self.tokens) * self.tokens

    @property
    def suffix_start(self) -> int:
        """The slot of the first extra token after the grid: past the prefix and the
        boxes (the extra tokens after the grid keep their sequence order there)."""
        return self.prefix + math.prod(self.tiles) * self.tokens

    @property
    def padded_size(self) -> int:
        return self.suffix_start + self.grid.suffix

    def box_by_axis(self) -> tuple[int, ...]:
        """Cells of a box along each grid axis (a residue part counts its weight)."""
        out = [1] * len(self.grid.shape)
        for (a, _, _), b in zip(self.virtual, self.box):
            out[a] *= b
        return tuple(out)

    def virtual_coords(self, x: Node) -> list[Node]:
        """IR of the virtual coordinates of permuted index ``x``."""
        T = self.tokens
        out = []
        tiles = self.tiles
        for j, b in enumerate(self.box):
            # tile coordinate: (x // (T * tiles after j)) % tiles[j]; box coordinate:
            # (x // boxes after j) % b (the box strides divide T, so no x % T is needed)
            tc = B.floordiv(x, B.const(T * math.prod(tiles[j + 1:])))
            if j > 0:
                tc = B.mod(tc, B.const(tiles[j]))
            bc = B.mod(B.floordiv(x, B.const(math.prod(self.box[j + 1:]))), B.const(b))
            out.append(B.add(B.scale(tc, b), bc))
        return out

    def coords(self, x: Node) -> list[Node]:
        """IR of the grid coordinates of permuted index ``x`` (valid cells)."""
        v = self.virtual_coords(x)
        out = [B.const(0)] * len(self.grid.shape)
        for (a, w, _), c in zip(self.virtual, v):
            out[a] = B.add(out[a], B.scale(c, w))
        return out

    def valid(self, x: Node) -> Node:
        """IR: ``x`` is a cell of the grid, not padding."""
        conds = []
        for (_, _, size), c, nb, b in zip(self.virtual, self.virtual_coords(x), self.tiles,
                                           self.box):
            if nb * b != size:
                conds.append(B.cmp("<", c, B.const(size)))
        for n, c, d in zip(self.grid.shape, self.coords(x), self.grid.splits):
            if d > 1 and n % d:
                conds.append(B.cmp("<", c, B.const(n)))
        return B.and_(*conds) if conds else B.TRUE

    def permutation(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(order, inverse)``: int64 ``[padded_size]`` original position of each permuted
        slot (padding slots: position 0, masked out) and ``[N]`` permuted slot of each
        original position. The extra tokens before an offset grid take the first slots in
        sequence order, those after it the last slots."""
        P, T0 = self.prefix, self.grid.offset
        Np, N = self.suffix_start - P, self.grid.size
        i = torch.arange(Np, dtype=torch.int64)
        T = self.tokens
        tile, off = i // T, i % T
        tiles = self.tiles
        coords = [torch.zeros(Np, dtype=torch.int64) for _ in self.grid.shape]
        valid = torch.ones(Np, dtype=torch.bool)
        for j, ((a, w, size), b) in enumerate(zip(self.virtual, self.box)):
            tc = (tile // math.prod(tiles[j + 1:])) % tiles[j]
            bc = (off // math.prod(self.box[j + 1:])) % b
            c = tc * b + bc
            valid &= c < size
            coords[a] += c * w
        pos = torch.zeros(Np, dtype=torch.int64)
        for n, s, c in zip(self.grid.shape, self.grid.strides, coords):
            valid &= c < n
            pos += c * s
        order = torch.where(valid, pos + T0, torch.zeros_like(pos))
        inverse = torch.empty(self.grid.tokens, dtype=torch.int64)
        inverse[pos[valid] + T0] = i[valid] + P
        text = torch.arange(P, dtype=torch.int64)
        order = torch.cat([torch.where(text < T0, text, torch.zeros_like(text)), order])
        inverse[:T0] = text[:T0]
        U, S0 = self.grid.suffix, self.suffix_start
        if U:
            order = torch.cat([order, torch.arange(U, dtype=torch.int64) + (T0 + N)])
            inverse[T0 + N:] = torch.arange(U, dtype=torch.int64) + S0
        return order.to(device), inverse.to(device)

    def __str__(self) -> str:
        per_axis = "x".join(map(str, self.box_by_axis()))
        return f"{self.grid}, tiles of {self.tokens} tokens as boxes {per_axis}"


# ------------------------------------------------------------ rewriting

def _known_range(n: Node, known: dict) -> Optional[tuple[int, int]]:
    """A range of ``n`` over the valid cells, when cheap to tell; else None."""
    if isinstance(n, Const):
        return n.value, n.value
    if isinstance(n, Var):
        return known.get(n.name)
    if isinstance(n, Mod) and isinstance(n.b, Const) and n.b.value > 0:
        return 0, n.b.value - 1
    if isinstance(n, FloorDiv) and isinstance(n.b, Const) and n.b.value > 0:
        r = _known_range(n.a, known)
        return None if r is None else (r[0] // n.b.value, r[1] // n.b.value)
    if isinstance(n, Sum):
        lo = hi = n.const
        for atom, c in n.terms:
            r = _known_range(atom, known)
            if r is None:
                return None
            lo += min(c * r[0], c * r[1])
            hi += max(c * r[0], c * r[1])
        return lo, hi
    return None


def _divmod(a: Node, m: int, known: dict) -> Optional[tuple[Node, Node]]:
    """``(a // m, a % m)`` rewritten when the terms of ``a`` not divisible by ``m`` stay in
    one block of ``m`` over the valid cells; else None."""
    terms, c = B.linear(a)
    whole = {x: v // m for x, v in terms.items() if v % m == 0}
    rest = B.from_linear({x: v for x, v in terms.items() if v % m}, c)
    r = _known_range(rest, known)
    if r is None or r[0] // m != r[1] // m:
        if whole:       # (m * a + rest) % m == rest % m, whatever rest's range
            return B.floordiv(a, B.const(m)), B.mod(rest, B.const(m))
        return None
    k = r[0] // m
    return B.add(B.from_linear(whole, 0), B.const(k)), B.sub(rest, B.const(k * m))


def _range_on_blocks(x: Node, lo, hi, known: dict) -> Optional[Node]:
    """``lo <= x <= hi`` as a range of the block index when ``x = m * w + rest`` with
    ``rest`` in less than one block and each bound deciding every cell of a block alike
    (``64 * row + col <= 511`` is ``row <= 7``: the first rows of a grid, text tokens
    before an image); else None."""
    terms, c = B.linear(x)
    big = [abs(v) for v in terms.values() if abs(v) > 1]
    if not big:
        return None
    m = math.gcd(*big)
    if m < 2:
        return None
    whole = B.from_linear({a: v // m for a, v in terms.items() if v % m == 0}, 0)
    rest = B.from_linear({a: v for a, v in terms.items() if v % m}, c)
    r = _known_range(rest, known)
    if r is None or r[1] - r[0] >= m or isinstance(whole, Const):
        return None
    parts = []
    if hi is not None:
        top, bottom = (hi - r[1]) // m, (hi - r[0]) // m
        if top != bottom:
            return None
        parts.append(B.range_(whole, None, bottom))
    if lo is not None:
        a, b = -((r[0] - lo) // m), -((r[1] - lo) // m)    # ceil((lo - r) / m)
        if a != b:
            return None
        parts.append(B.range_(whole, a, None))
    return B.and_(*parts)


def _simplify(n: Node, known: dict, sub: dict, memo: Optional[dict] = None) -> Node:
    """``n`` with ``sub``'s variables replaced, ``//`` and ``%`` by constants read through
    the ranges of ``known`` (see :func:`_divmod`), rebuilt through ``ir.build``. Each
    distinct subtree is rewritten once (``memo``: a pattern of many ranges repeats its
    coordinate atoms in every one), and its occurrences share the result."""
    if memo is None:
        memo = {}
    got = memo.get(n)
    if got is None:
        got = memo[n] = _simplify_node(n, known, sub, memo)
    return got


def _simplify_node(n: Node, known: dict, sub: dict, memo: dict) -> Node:
    from .intervals import rebuild
    if isinstance(n, Var):
        return sub.get(n.name, n)
    kids = n.children()
    if not kids:
        return n
    new = [_simplify(c, known, sub, memo) for c in kids]
    if isinstance(n, (FloorDiv, Mod)) and isinstance(new[1], Const) and new[1].value > 0:
        m = new[1].value
        a = new[0]
        if isinstance(n, Mod) and isinstance(a, Mod) and isinstance(a.b, Const) \
                and a.b.value % m == 0:
            a = a.a
        if isinstance(n, FloorDiv) and isinstance(a, FloorDiv) and isinstance(a.b, Const) \
                and a.b.value > 0:
            a, m = a.a, a.b.value * m
        got = _divmod(a, m, known)
        if got is not None:
            return got[0] if isinstance(n, FloorDiv) else got[1]
        return B.floordiv(a, B.const(m)) if isinstance(n, FloorDiv) else B.mod(a, B.const(m))
    if isinstance(n, Range) and known:
        got = _range_on_blocks(new[0], n.lo, n.hi, known)
        if got is not None:
            return got
    if all(a is b for a, b in zip(new, kids)):
        return n
    return rebuild(n, new)


def coordinate_form(ir: Node, grid: Grid, sides=("q", "k"), moved=None) -> Node:
    """``ir`` with q and k (``sides``: those of them that are cells of the grid; the others
    stay positions) replaced by the grid coordinates of the tokens (placeholder variables
    ``q#j``, ``k#j`` on the virtual axes: the splits' parts), Lq and Lk by the tokens.
    ``moved``: ``{side: delta}``, sides that are not cells and read ``side + delta``.
    Cached per argument (it depends on the grid, not on the box: :func:`choose` remaps
    every candidate box of a grid from the same forms)."""
    return _coordinate_form(ir, grid, tuple(sides), tuple(sorted((moved or {}).items())))


@lru_cache(maxsize=64)
def _coordinate_form(ir: Node, grid: Grid, sides: tuple, moved: tuple) -> Node:
    virt = grid.virtual()
    known, sub = {}, {"Lq": B.const(grid.tokens), "Lk": B.const(grid.tokens)}
    for side, delta in moved:
        sub[side] = B.add(Var(side), B.const(delta))
    for side in sides:
        pos = B.const(grid.offset)
        for a, (n, s) in enumerate(zip(grid.shape, grid.strides)):
            c = B.const(0)
            for j, (axis, w, size) in enumerate(virt):
                if axis == a:
                    v = _vplaceholder(side, j)
                    known[v.name] = (0, size - 1)
                    c = B.add(c, B.scale(v, w))
            pos = B.add(pos, B.scale(c, s))
        sub[side] = pos
    return _simplify(ir, known, sub)


def remap(ir: Node, layout: Layout) -> Node:
    """The pattern over permuted indices: ``ir`` in grid coordinates with the coordinates
    of the permuted q and k substituted and padding cells masked out. With extra tokens
    before or after the grid, each side is in one of the regions: an extra token before
    (a slot below ``grid.offset``: its position), a cell (a valid slot of the boxes), an
    extra token after (a slot from ``layout.suffix_start``: its position is ``slot +
    grid.end - suffix_start``); the cases (4, or 9 with both) are joined by ``|``, each under the ranges of
    slots it holds for (a tile within one region of each side decides them)."""
    g = layout.grid
    if not g.offset and not g.suffix:
        return B.and_(_remap_cells(ir, layout, ("q", "k"), 0),
                      layout.valid(Var("q")), layout.valid(Var("k")))
    P, T0, S0 = layout.prefix, g.offset, layout.suffix_start
    regions = ("before",) * bool(T0) + ("cells",) + ("after",) * bool(g.suffix)
    parts = []
    for rq, rk in itertools.product(regions, repeat=2):
        conds, cells, moved = [], [], {}
        for side, region in (("q", rq), ("k", rk)):
            x = Var(side)
            if region == "cells":
                cells.append(side)
                conds += [B.range_(x, P, S0 - 1 if g.suffix else None),
                          layout.valid(B.sub(x, B.const(P)))]
            elif region == "before":
                conds.append(B.range_(x, 0, T0 - 1))
            else:
                conds.append(B.range_(x, S0, None))
                moved[side] = g.end - S0
        parts.append(B.and_(*conds, _remap_cells(ir, layout, tuple(cells), P, moved)))
    return B.or_(*parts)


def remap_score(score: Node, layout: Layout) -> Node:
    """A score (a float expression of ``s``, q, k and tables) over permuted indices, for a
    layout without extra tokens: q and k read as the grid coordinates of their slots, as
    :func:`remap` reads them, each virtual coordinate clamped into its axis. On a cell the
    clamp changes nothing; a padding slot (whose pairs the remapped mask excludes) reads a
    cell's coordinates, so the score's table indices stay within what the cells index:
    the tables' bounds over the slots are their bounds over the grid."""
    if layout.grid.offset or layout.grid.suffix:
        raise ValueError("remap_score: a layout with extra tokens (their positions are "
                         "not coordinates)")
    grid, sub = layout.grid, {}
    for side in ("q", "k"):
        for j, (c, (_, _, size)) in enumerate(zip(layout.virtual_coords(Var(side)),
                                                  grid.virtual())):
            sub[_vplaceholder(side, j).name] = B.min_(c, B.const(size - 1))

    def ints(n: Node) -> Node:      # an int or bool sub-tree of the score (an index, a test)
        return _simplify(coordinate_form(n, grid, ("q", "k")), {}, sub)
    return _score_ints(ints)(score)


def _score_ints(fn):
    """A :class:`~spattn.ir.score.FloatRebuild` whose float nodes' int and bool operands
    (table indices, conditions, converted ints) are rewritten by ``fn``."""
    from .nodes import FLoad, FSelect, FTable, ToFloat
    from .score import FloatRebuild
    from .visitor import rule

    class Ints(FloatRebuild):
        @rule(ToFloat)
        def to_float(self, n):
            return B.to_float(fn(n.a))

        @rule(FSelect)
        def fselect(self, n):
            return B.fselect(fn(n.cond), self(n.a), self(n.b))

        @rule(FTable)
        def ftable(self, n):
            return B.ftable(n.values, fn(n.index))

        @rule(FLoad)
        def fload(self, n):
            return B.fload(n.name, [fn(i) for i in n.index])
    return Ints()


def _remap_cells(ir: Node, layout: Layout, sides, prefix: int, moved=None) -> Node:
    """``ir`` with the ``sides`` that are cells read from the permuted slot (``prefix``
    slots of extra tokens before the boxes); the other sides stay positions (= slots), or
    ``slot + moved[side]`` after the grid."""
    form = coordinate_form(ir, layout.grid, sides, moved)
    sub = {}
    for side in sides:
        x = B.sub(Var(side), B.const(prefix)) if prefix else Var(side)
        for j, c in enumerate(layout.virtual_coords(x)):
            sub[_vplaceholder(side, j).name] = c
    return _simplify(form, {}, sub)


# ------------------------------------------------------------ discovery

def _side_linear(x: Node) -> bool:
    """``x`` is an affine form whose only non-uniform atoms are q and k."""
    terms, _ = B.linear(x)
    return bool(terms) and any(isinstance(a, Var) and a.name in ("q", "k") for a in terms) \
        and all(B.is_uniform(a) or (isinstance(a, Var) and a.name in ("q", "k"))
                for a in terms)


def _chain(x: Node) -> Optional[int]:
    """The product of the divisors of ``x = ((q // a) // b) ...`` (1 for a bare q, k or affine
    form of them), or None."""
    if _side_linear(x):
        return 1
    if isinstance(x, FloorDiv) and isinstance(x.b, Const) and x.b.value > 0:
        inner = _chain(x.a)
        return None if inner is None else inner * x.b.value
    return None


def _strides(ir: Node) -> set[int]:
    out = set()
    for n in walk(ir):
        if isinstance(n, (FloorDiv, Mod)) and isinstance(n.b, Const) and n.b.value > 1:
            inner = _chain(n.a)
            if inner is None or (isinstance(n, FloorDiv) and inner > 1):
                continue        # ((q // W) // s): a group of a coordinate, not an axis
            if inner > 1:
                out.add(inner)
            out.add(inner * n.b.value)
    return out


def _offsets(ir: Node) -> set[int]:
    """Positive ``T`` of every ``(q - T) // m`` and ``(q - T) % m`` (``k`` alike): where a
    grid after ``T`` extra tokens starts."""
    out = set()
    for n in walk(ir):
        if isinstance(n, (FloorDiv, Mod)) and isinstance(n.b, Const) and n.b.value > 1:
            terms, c = B.linear(n.a)
            if len(terms) == 1 and c < 0 and all(
                    isinstance(a, Var) and a.name in ("q", "k") and v == 1
                    for a, v in terms.items()):
                out.add(-c)
    return out


def _ends(ir: Node) -> set[int]:
    """Where a range of q or k alone flips (``q < 4173``: 4173, ``k >= 77``: 77): where a
    grid followed by extra tokens may end."""
    out = set()
    for n in walk(ir):
        if isinstance(n, Range):
            terms, c = B.linear(n.x)
            if len(terms) == 1 and all(isinstance(a, Var) and a.name in ("q", "k") and v == 1
                                       for a, v in terms.items()):
                out |= {b - c for b in (n.lo, None if n.hi is None else n.hi + 1)
                        if b is not None}
    return out


def declared(pattern) -> Optional[Grid]:
    """The grid a pattern declares (``pattern.grid``, with ``grid_offset`` extra tokens
    before it and ``grid_suffix`` after it), or None."""
    shape = getattr(pattern, "grid", None)
    return None if shape is None else Grid(tuple(shape),
                                           offset=getattr(pattern, "grid_offset", 0),
                                           suffix=getattr(pattern, "grid_suffix", 0))


def _position_list(n: Node) -> bool:
    """A list indexed by a position (``[..][q // 8]``): over a padded layout's slots or
    around extra tokens the index would leave the list where the mask does not read it,
    but the kernels' list bounds are proven for every slot."""
    return isinstance(n, Table) and bool({"q", "k"} & free_vars(n.index))


def discover(ir: Node, N: int, declared: Optional[Grid] = None) -> list[Grid]:
    """Grids the pattern's divisors and moduli suggest for ``N`` tokens (the finest first);
    empty when none does. Strides dividing ``N`` and each other chain into a row-major grid;
    a divisor of a coordinate that does not divide its axis becomes a split. The offsets the
    pattern subtracts before dividing (``(q - 77) // 64``) suggest more: grids of the
    ``N - T`` tokens after ``T`` extra ones (after the grids of all ``N`` tokens); and the
    positions where a range of q or k alone flips (``q < 4096``, ``k >= T + 4096``) suggest
    grids that end there, the tokens after them extra ones (after the grids that end at
    ``N``), of those only the longest of each start and row shape: the ranges of a
    pattern of documents written as constants flip at each document's end, and the grids
    ending there are shorter copies of one grid, each costed by sampling in
    :func:`choose`. ``declared``: the pattern's declared grid (``grid (...) after T before U``),
    tried last when no grid found has its shape and extra tokens."""
    if any(isinstance(n, Load) or _position_list(n) for n in walk(ir)) \
            or not ({"q", "k"} & free_vars(ir)):
        return []
    every, found = _strides(ir), []
    starts = [0] + sorted(t for t in _offsets(ir) if t < N - 1)
    ends = sorted((e for e in _ends(ir) if e < N), reverse=True)
    rows = set()        # (start, shape of a row) of the grids ending before N found
    for T, E in [(T, N) for T in starts] + [(T, E) for T in starts for E in ends if E > T + 1]:
        M = E - T
        strides = sorted(s for s in every if 1 < s < M and M % s == 0)
        chain: list[int] = []
        for s in strides:
            if all(s % c == 0 for c in chain):
                chain.append(s)
        if (T or E < N) and not chain:
            continue
        shape, prev = [], M
        for s in reversed(chain):
            shape.append(prev // s)
            prev = s
        shape.append(prev)
        if E < N:
            if (T, tuple(shape[1:])) in rows:
                continue    # a shorter copy of a grid from T ending at a later end
            rows.add((T, tuple(shape[1:])))
        grid = Grid(tuple(shape), offset=T, suffix=N - E)
        splits = _splits(coordinate_form(ir, grid), grid)
        found += [Grid(grid.shape, splits, T, N - E)] if any(d > 1 for d in splits) else []
        found += [grid] if chain else []
    if declared is not None and declared.tokens == N and not any(
            (g.shape, g.offset, g.suffix) == (declared.shape, declared.offset, declared.suffix)
            for g in found):
        found.append(declared)
    return found


def _splits(form: Node, grid: Grid) -> tuple[int, ...]:
    """Per axis, the modulus of a coordinate's ``%`` (a residue class; the largest), or 1."""
    splits = [1] * len(grid.shape)
    for n in walk(form):
        if isinstance(n, Mod) and isinstance(n.b, Const) and n.b.value > 1:
            terms, _ = B.linear(n.a)
            axes = {int(v.name[2:]) for v in terms if isinstance(v, Var) and "#" in v.name}
            names = {v.name[0] for v in terms if isinstance(v, Var) and "#" in v.name}
            if len(axes) == 1 and len(terms) <= 2 and names <= {"q", "k"}:
                a = next(iter(axes))
                if n.b.value < grid.shape[a]:
                    splits[a] = max(splits[a], n.b.value)
    return tuple(splits)


def candidate_boxes(grid: Grid, tokens: int = TILE_TOKENS) -> list[tuple[int, ...]]:
    """Boxes of ``tokens`` cells (powers of two per axis, one cell along residue axes, none
    longer than twice its axis), the squarest (by cells per grid axis) first."""
    virt = grid.virtual()
    free = [j for j, (_, w, _) in enumerate(virt) if not (w == 1 and grid.splits[virt[j][0]] > 1)]
    e = int(math.log2(tokens))
    out = []
    for exps in itertools.product(range(e + 1), repeat=len(free)):
        if sum(exps) != e:
            continue
        box = [1] * len(virt)
        for j, x in zip(free, exps):
            box[j] = 1 << x
        if any(b > 2 * size and b > 1 for b, (_, _, size) in zip(box, virt)):
            continue
        out.append(tuple(box))
    out.sort(key=lambda b: (max(b) / max(min(x for x in b if x > 1) if any(x > 1 for x in b)
                                         else 1, 1), b))
    return out[:MAX_CANDIDATES]


# ------------------------------------------------------------ choice

@dataclass(frozen=True)
class Remap:
    """The chosen layout of a pattern at one length: the layout, the remapped IR and the
    computed pairs in sequence order and in the layout (``useful`` = allowed pairs)."""

    layout: Layout
    ir: Node
    useful: Optional[int]
    computed_sequence: int
    computed_layout: int
    #: predicted costs (:func:`layout_cost`, FULL-tile units per head) of the two orders
    cost_sequence: float = 0.0
    cost_layout: float = 0.0

    @property
    def pays(self) -> bool:
        """Whether ``SPATTN_LAYOUT=auto`` uses the layout (:func:`choose` without ``force``):
        its computed pairs and its predicted cost are each at most :data:`MARGIN` of the
        sequence order's."""
        return (self.computed_layout <= MARGIN * self.computed_sequence
                and self.cost_layout <= MARGIN * self.cost_sequence)

    @property
    def fraction_sequence(self) -> Optional[float]:
        return None if self.useful is None else self.useful / max(self.computed_sequence, 1)

    @property
    def fraction_layout(self) -> Optional[float]:
        return None if self.useful is None else self.useful / max(self.computed_layout, 1)


def layout_cost(pairs: int, tokens: int, block_m: int, block_n: int, *, table: bool,
                gathers: bool, target: str = "cuda") -> float:
    """Predicted forward cost, in FULL tiles of the target's kernel (``ir.cost.COSTS``), of
    one head computing ``pairs`` pairs over ``tokens`` (padded) tokens: the pairs as whole
    tiles, a read of the tile list per tile where the order runs the table strategy
    (``table``), each query tile's prologue and epilogue, and, for a layout (``gathers``),
    gathering q, k, v into box order and o and the lse back (``gather_token`` per token,
    measured; it does not depend on D, which scales both). PARTIAL and FULL tiles are
    priced alike (the remapped predicate is dearer than sequence order's; the margin
    absorbs that)."""
    from .cost import COSTS
    c = COSTS[target]
    tiles = pairs / (block_m * block_n)
    cost = tiles * (c["full_tile"] + (c["table_tile"] if table else 0.0))
    cost += -(-tokens // block_m) * c["per_row_tile"]
    if gathers:
        cost += tokens * c.get("gather_token", 0.0)
    return cost


def sampled_rows(nq: int) -> list[int]:
    """The :data:`SAMPLED_ROWS` query-tile rows :func:`sampled_pairs` classifies of ``nq``:
    the middles of equal parts (distinct once ``nq`` exceeds :data:`SAMPLED_ROWS`)."""
    return [(2 * i + 1) * nq // (2 * SAMPLED_ROWS) for i in range(SAMPLED_ROWS)]


def sampled_pairs(ir: Node, L: int, block_m: int, block_n: int, pad: bool = True) -> int:
    """:func:`computed_pairs` estimated from :data:`SAMPLED_ROWS` query-tile rows spread
    over the ``L`` queries (exact when there are no more rows than that): the non-EMPTY
    tiles of those rows of the call's grid, classified in one pass (one bounds analysis,
    one interval evaluation of the IR over every sampled tile), scaled up."""
    nq = -(-L // block_m)
    if nq <= SAMPLED_ROWS:
        return computed_pairs(ir, L, block_m, block_n, pad=pad)
    from .pattern import CompiledPattern
    from .tiles import EMPTY, classify
    t = classify(CompiledPattern(ir), L, L, block_m, block_n, rows=sampled_rows(nq))
    live = int((t != EMPTY).sum())
    return live * block_m * block_n * nq // SAMPLED_ROWS


def computed_pairs(ir: Node, L: int, block_m: int, block_n: int, *, num_heads: int = 1,
                   q_offset: int = 0, pad: bool = False) -> int:
    """Pairs the kernel computes: the in-range pairs of every non-EMPTY tile (``pad``:
    every tile counted whole)."""
    from .pattern import CompiledPattern
    from .tiles import EMPTY, classify, row_slabs
    t = classify(CompiledPattern(ir), L, L, block_m, block_n, num_heads=num_heads,
                 q_offset=q_offset)
    rows = torch.full((t.shape[-2],), block_m, dtype=torch.int64)
    cols = torch.full((t.shape[-1],), block_n, dtype=torch.int64)
    if not pad:
        rows[-1] = L - block_m * (t.shape[-2] - 1)
        cols[-1] = L - block_n * (t.shape[-1] - 1)
    total = 0
    for r, part in row_slabs(t):             # by slabs: no int64 copy of the whole grid
        live = (part != EMPTY).sum((0, 1))
        total += int((live * rows[r:r + part.shape[2], None] * cols[None, :]).sum())
    return total


def sub_box(box: tuple[int, ...], tokens: int) -> tuple[int, ...]:
    """The first ``tokens`` cells of ``box`` (row-major): a box again, the outer axes cut."""
    ratio = math.prod(box) // tokens
    out = list(box)
    for j, b in enumerate(out):
        f = math.gcd(ratio, b)
        out[j] //= f
        ratio //= f
    return tuple(out)


def _axis_groups(form: Node, grid: Grid) -> Optional[list[Node]]:
    """Per grid axis, the conjunction of the conjuncts of ``form`` over that axis alone;
    None unless every conjunct reads one axis (no h, b, inputs)."""
    from .nodes import And
    virt = grid.virtual()
    args = form.args if isinstance(form, And) else (form,)
    groups: list[list[Node]] = [[] for _ in grid.shape]
    for a in args:
        names = free_vars(a)
        if not names <= {f"{s}#{j}" for s in "qk" for j in range(len(virt))}:
            return None
        axes = {virt[int(n[2:])][0] for n in names}
        if len(axes) != 1:
            return None
        groups[next(iter(axes))].append(a)
    return [B.and_(*g) if g else B.TRUE for g in groups]


def _product_pairs(groups: list[Node], layout: Layout, block_m: int, block_n: int) -> int:
    """Computed pairs of a product pattern: per axis, its conjuncts remapped onto that
    axis's part of the box and classified alone; the counts multiply (a box tile pair is
    EMPTY iff one of its axes is)."""
    virt = layout.virtual
    qbox, kbox = sub_box(layout.box, block_m), sub_box(layout.box, block_n)
    total = 1
    for a, g in enumerate(groups):
        js = [j for j, (axis, _, _) in enumerate(virt) if axis == a]
        sub = Layout(Grid((layout.grid.shape[a],), (layout.grid.splits[a],)),
                     tuple(layout.box[j] for j in js))
        names = {f"{s}#{j}": c for s in "qk" for j, c in
                 zip(js, sub.virtual_coords(Var(s)))}
        rir = B.and_(_simplify(g, {}, names), sub.valid(Var("q")), sub.valid(Var("k")))
        bm = math.prod(qbox[j] for j in js)
        bn = math.prod(kbox[j] for j in js)
        total *= computed_pairs(rir, sub.padded_size, bm, bn, pad=True)
        if total == 0:
            return 0
    return total


def choose(ir: Node, Lq: int, Lk: int, q_offset: int, *, num_heads: int = 1,
           block_m: int = 128, block_n: int = 64, grids: Optional[list] = None,
           force: bool = False, sequence: Optional[int] = None,
           declared: Optional[Grid] = None, target: str = "cuda",
           gathers: bool = True) -> Optional[Remap]:
    """The best layout of ``ir`` for a self-attention call of ``Lq = Lk`` tokens (module
    docstring), or None (no grid, or none pays by :data:`MARGIN`, :attr:`Remap.pays`;
    ``force``: the best whatever the margin; ``sequence``: the sequence order's computed
    pairs when known, else estimated by :func:`sampled_pairs`; ``declared``: the pattern's
    declared grid, a candidate of :func:`discover`; ``target``: the cost model's,
    ``"cuda"`` or ``"cpu"``; ``gathers``: the layout's tokens are gathered into box order
    and back, False where the kernels address them through row tables,
    ``SPATTN_LAYOUT_GATHER=kernel``: no gather cost). Boxes are ranked by computed pairs: product patterns (a
    conjunction of per-axis conditions) per axis; others by classifying sampled query-tile
    rows of the remapped pattern (:func:`sampled_pairs`), and the chosen one at the call's
    size. The chosen box is then priced against sequence order by :func:`layout_cost`. A box
    whose remapped pattern cannot be analysed is no candidate: its arithmetic may leave the
    64-bit integers where the pattern's own does not (padding slots lie past ``Lq``), or
    expand past :data:`~spattn.ir.build.MAX_PRODUCT_TERMS`; the call then runs in sequence
    order, which the caller's checks have accepted."""
    if Lq != Lk or q_offset != 0 or ("h" in free_vars(ir) and num_heads > 1):
        return None
    grids = discover(ir, Lq, declared) if grids is None else grids
    if not grids:
        return None
    best = None
    tokens = block_m
    while best is None and tokens >= MIN_TOKENS:
        bm, bn = min(block_m, tokens), min(block_n, tokens)
        for grid in grids:
            if grid.tokens != Lq:
                continue
            groups = None if grid.offset or grid.suffix else \
                _axis_groups(coordinate_form(ir, grid), grid)
            boxes = candidate_boxes(grid, tokens)
            if groups is None:
                boxes = boxes[:FULL_CANDIDATES]
            for box in boxes:
                layout = Layout(grid, box)
                if layout.padded_size > 2 * Lq:
                    continue
                try:
                    if groups is not None:
                        cost = _product_pairs(groups, layout, bm, bn)
                    else:
                        cost = sampled_pairs(remap(ir, layout), layout.padded_size, bm, bn)
                except SpattnError:
                    continue        # the remapped pattern cannot be computed: no candidate
                if best is None or cost < best[0]:
                    best = (cost, layout, groups)
        tokens //= 2
    if best is None:
        return None
    seq = sequence if sequence is not None else sampled_pairs(
        ir, Lq, min(block_m, 2 * tokens), min(block_n, 2 * tokens))
    if not force and best[0] > MARGIN * seq:
        return None
    cost, layout, groups = best
    from .cost import pick_strategy
    try:
        rir = remap(ir, layout)
        if groups is None:
            cost = computed_pairs(rir, layout.padded_size, bm, bn)
        table_lay = pick_strategy(rir) == "table"
    except SpattnError:
        return None
    if groups is None and not force and cost > MARGIN * seq:
        return None
    useful = _product_allowed(groups, layout.grid) if groups is not None else None
    cost_seq = layout_cost(seq, Lq, bm, bn, table=pick_strategy(ir) == "table",
                           gathers=False, target=target)
    cost_lay = layout_cost(cost, layout.padded_size, bm, bn,
                           table=table_lay, gathers=gathers, target=target)
    r = Remap(layout, rir, useful, seq, cost, cost_seq, cost_lay)
    if not force and not r.pays:
        return None
    return r


def boxes_readable(layout: "Layout") -> bool:
    """Whether each box of ``layout`` is a rectangular block of the caller's tokens, which
    one multi-dimensional TMA load can read (``SPATTN_LAYOUT_GATHER=box``): 1 to 3 axes,
    no residue classes, no extra tokens."""
    g = layout.grid
    return len(g.shape) <= 3 and all(d == 1 for d in g.splits) and not g.offset \
        and not g.suffix


#: Whether ``SPATTN_LAYOUT_GATHER=auto`` takes the box forward on CUDA (where it can run).
#: Timed on an H200 (benchmarks/RESULTS.md, "GPU: the box forward by default"): the boxes
#: save the forward's gathers at the kernel's speed, 0.94-0.97x the copies' forward time on
#: FLUX and Hunyuan and 0.66x on the 16K 13 x 13 neighbourhood.
AUTO_BOX = True


class Gathers(NamedTuple):
    """How a layout's tokens reach the kernels (:func:`resolve_gathers`): ``remap`` (None
    where the layout no longer pays), ``mode`` the forward's ("copy", "kernel" or "box")
    and ``backward`` the backward's ("copy" or "kernel": the box forward's backward runs
    one of these)."""

    remap: Optional["Remap"]
    mode: str
    backward: str


def resolve_gathers(r: Optional["Remap"], mode: str, target: str, force: bool = False,
                    box=None) -> Gathers:
    """:class:`Gathers`: how a layout's tokens reach the kernels. For ``mode`` "auto"
    (``r`` chosen without the gathers' cost) the cheaper of "copy" (the layout's cost plus
    its gathers, ``gather_token`` per token) and "kernel" (its cost times ``1 +
    rows_factor``: row tables, no TMA) by ``ir.cost.COSTS[target]``, the remap's
    ``cost_layout`` set to that way's cost; None for the remap when that cost no longer
    pays (:attr:`Remap.pays`, unless ``force``). "kernel" is priced the same way (its
    ``rows_factor``); "copy" (``r`` chosen with its gathers) is returned as it is. The
    backward runs the forward's way.
    ``box``: a test of a layout, whether the forward can read its boxes through TMA on the
    call's tensors (``runtime.triton_backend.BoxRows``). Where it passes, "auto" decides
    and prices the layout as above and, for a layout it keeps, runs the forward through
    the boxes (no gathers, TMA loads: measured faster than either way's forward) and the
    backward the way it priced; "box" runs the same forward and backward, the layout
    priced as its kernel alone. "box" where the test fails is "auto"."""
    if r is None or mode == "copy":
        return Gathers(r, mode, mode)
    from dataclasses import replace
    from .cost import COSTS
    c = COSTS[target]
    copy = r.cost_layout + r.layout.padded_size * c.get("gather_token", 0.0)
    kernel = r.cost_layout * (1.0 + c.get("rows_factor", 0.0))
    way = "kernel" if mode == "kernel" or kernel < copy else "copy"
    readable = mode in ("auto", "box") and box is not None and box(r.layout)
    if mode == "box" and readable:
        return Gathers(r if force or r.pays else None, "box", way)
    priced = replace(r, cost_layout=kernel if way == "kernel" else copy)
    if not (force or priced.pays):
        return Gathers(None, way, way)
    return Gathers(priced, "box" if readable else way, way)


def _product_allowed(groups: list[Node], grid: Grid) -> int:
    """Allowed pairs of a product pattern: the product of each axis's allowed pairs
    (counted as ``explain`` counts them, from the closed form or the tiles: never a dense
    mask of an axis, which is O(L^2) for a pattern over one long axis)."""
    from .explain import allowed_pairs
    total = 1
    for a, g in enumerate(groups):
        sub = Layout(Grid((grid.shape[a],), (grid.splits[a],)), (1,) * (1 + (grid.splits[a] > 1)))
        js = [j for j, (axis, _, _) in enumerate(grid.virtual()) if axis == a]
        names = {f"{s}#{j}": c for s in "qk" for j, c in zip(js, sub.virtual_coords(Var(s)))}
        rir = B.and_(_simplify(g, {}, names), sub.valid(Var("q")), sub.valid(Var("k")))
        n = sub.padded_size
        total *= allowed_pairs(rir, None, n, n, 64, 64, num_heads=1, batch=1, q_offset=0,
                               inputs={})[0]
    return total


# ------------------------------------------------------------ a caller's token order

@dataclass(frozen=True)
class Ordered:
    """A pattern read through a caller's token order (a permutation given as data): ``ir``
    is the pattern over slots, whose q and k are read as the grid coordinates of the token
    in that slot, loaded from the int inputs ``names`` (one ``[N]`` table per virtual axis
    of ``grid``: :meth:`tables`)."""

    grid: Grid
    names: tuple[str, ...]
    ir: Node

    def tables(self, order: torch.Tensor) -> dict[str, torch.Tensor]:
        """The coordinate tables of ``order`` (int64 ``[N]``: the original position of each
        slot): per virtual axis, the coordinate of each slot's token on it."""
        grid, out = self.grid, {}
        residues = sum(d > 1 for d in grid.splits)
        for j, ((a, _, _), name) in enumerate(zip(grid.virtual(), self.names)):
            c = (order // grid.strides[a]) % grid.shape[a]
            d = grid.splits[a]
            out[name] = c % d if j < residues else c // d
        return out


def ordered(ir: Node, N: int, taken=()) -> Ordered:
    """``ir`` read through a token order of ``N`` tokens: the pattern over slots ``i, j``
    that allows a pair when ``ir`` allows the tokens ``order[i], order[j]``.

    The pattern is put in coordinate form over the grid it suggests (:func:`discover`; one
    axis of ``N`` when none) and each coordinate placeholder becomes a load of that
    coordinate's table at the slot: the tile analysis then bounds each coordinate over a
    tile by the table's min/max there, which a tile that is a box of the grid makes exact
    per axis. ``taken``: names the tables must not use (the pattern's own inputs)."""
    # every token a cell, and no padding: a ragged residue class would let the tables'
    # ranges bound a position past N - 1 (a list indexed by q refused as out of range)
    grids = [g for g in discover(ir, N) if not g.offset and not g.suffix
             and all(n % d == 0 for n, d in zip(g.shape, g.splits))]
    grid = grids[0] if grids else Grid((N,))
    prefix = "order_"
    while any(t.startswith(prefix) for t in taken):
        prefix = "_" + prefix
    names = tuple(f"{prefix}{j}" for j in range(len(grid.virtual())))
    form = coordinate_form(ir, grid)
    sub = {_vplaceholder(side, j).name: B.load(name, (B.var(side),))
           for side in ("q", "k") for j, name in enumerate(names)}
    return Ordered(grid, names, _simplify(form, {}, sub))
