"""Tile classification: EMPTY (0), PARTIAL (1) or FULL (2) for every tile of the attention matrix.

``classify(pattern, Lq, Lk, block_m, block_n, ...)`` returns ``int8 [B, H, nq, nk]``.
A tile ``(i, j)`` holds the query rows ``i*BM .. min((i+1)*BM, Lq) - 1`` (positions shifted by
the query offset) and the keys ``j*BN .. min((j+1)*BN, Lk) - 1``: ragged last tiles only hold
in-range pairs, and FULL means "every in-range pair allowed".

Two passes, both vectorised over tiles (O(tiles) time and memory, never O(Lq*Lk)):

1. **Intervals** (:mod:`spattn.ir.intervals`): each tile is a box of q and k; every node gets
   a sound interval, every bool a three-valued pair (can be true, can be false). Sound for
   every expression of the language (``//``, ``%``, ``abs``, ``min``/``max``, ``if``, lists,
   runtime inputs); exact for any single comparison of an affine form whose atoms are
   independent over the box (``q - k < W``, ``q // c == k // c``, ``doc[q] == doc[k]``
   whenever the per-tile min/max summary decides it).

2. **Exact refinement** of the tiles pass 1 leaves PARTIAL (only those, gathered); skipped
   when :func:`spattn.ir.intervals.interval_exact` proves pass 1 exact for the formula, and
   when :func:`refinement_cannot_change` proves the refinement a no-op: the formula needs no
   lifting, reads no n-D input and is read-once in its only cellable atom, which compares a
   consecutive value (``causal & same(doc)``, ``dilated(s, n)``, ``chunked(c) & same(doc)``),
   or its cellable atoms all cut one direction at fixed thresholds and an enumeration of the
   segment runs shows no run can change (``strided(s)``, ``power2(w)``); then a cell split
   cannot decide more than the tile-level value (see its docstring). The formula
   is first *lifted* (``abs``/``min``/``max``/``if`` inside comparisons become case splits, so
   each comparison is over a plain affine form). A comparison is *cellable* when its form is
   uniform (depends on h, b, lengths, params, lists indexed by uniform values) plus one of

   * ``a*u`` with a single direction ``u`` in ``q``, ``k`` or ``q - k``: it flips at (at most)
     two thresholds along ``u``, computed per (b, h);
   * a sum of ``c_i * ((a_i*u_i + e_i) // m_i)`` (chunk indices of a direction, ``a_i > 0``,
     ``m_i > 0`` uniform): it can only change where a chunk index changes; at most
     :data:`MAX_FLOOR_CUTS` cuts per term and tile (as many as the partial tiles need), else
     the atom is not exact in that tile.

   The thresholds cut the tile into cells (q-segment x k-segment x (q-k)-segment) on which
   every cellable atom is constant. Each feasible cell is tested at one representative point
   with the reference :func:`spattn.ir.evaluate.evaluate`; the atoms that are not cellable
   keep their pass-1 three-valued value over the tile. The tile is FULL iff every feasible
   cell is surely true, EMPTY iff every feasible cell is surely false. When every atom is
   cellable this is exact.

Precision limits (all sound, the tile is then PARTIAL where it might be FULL/EMPTY):

* comparisons over other directions (``q + k``, ``2*q - k``), products of q and k, ``%`` of
  a non-uniform value (``(q - k) % d == 0``), ``is_pow2`` of a non-uniform value, list
  params indexed by q or k: the tile-level interval value is used for that atom, which is
  exact alone but not in every combination with other atoms;
* runtime inputs: per-tile min/max summaries; exact for ``same(doc)`` with sorted ids and for
  0/1 block tables indexed by tile-aligned expressions (``blocks[q // 32, k // 32]`` with
  32 | BM, BN); for n-D inputs whose tile index boxes exceed
  :data:`spattn.ir.intervals.NARROW_GATHER` entries the whole input's min/max is used;
* very large formulas: lifting gives up above 64 atoms, the refinement above
  :data:`MAX_CELLS` cells per tile.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Optional, Sequence

import torch

from ..dsl.errors import SpattnValueError
from . import build as B
from .bounds import Checked, Domain, analyse, bounds_of, check_call
from .evaluate import evaluate
from .inputs import check_lengths, query_offset, validate_inputs
from .memory import check_room
from .intervals import (IntervalEval, _consecutive, bool_atoms, check_input_bounds, combine,
                        interval_exact, lift)
from .nodes import (And, BoolConst, Const, FloorDiv, Load, Node, Not, Or, Range, Var, distinct,
                    free_vars, walk)

EMPTY, PARTIAL, FULL = 0, 1, 2
MAX_FLOOR_CUTS = 64
MAX_CELLS = 8192
#: cells evaluated per refinement chunk (elements of each tensor op), on the CPU and on CUDA
CPU_CHUNK = 1 << 15
GPU_CHUNK = 1 << 22
#: tiles per slab of the vectorised pass (bounds the peak memory: O(slab), not O(grid))
SLAB_TILES = 1 << 21
I64 = torch.int64


# ------------------------------------------------------------------ validation

def _check_int(name: str, v, *, positive=True) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or (positive and v <= 0):
        raise SpattnValueError(f"{name} must be a positive integer, got {v!r}")


def validate_args(pattern, Lq, Lk, block_m, block_n, *, num_heads, batch, q_offset, device,
                  inputs) -> tuple[dict, torch.device, Checked]:
    """Check the arguments of :func:`classify`; returns (validated inputs, device, the call's
    integer check :func:`spattn.ir.bounds.check_call`, which raises where a value the
    pattern needs exactly is beyond int64)."""
    check_lengths(Lq, Lk, num_heads=num_heads, batch=batch)
    _check_int("block_m", block_m)
    _check_int("block_n", block_n)
    if q_offset is not None and (isinstance(q_offset, bool) or not isinstance(q_offset, int)):
        raise SpattnValueError(f"q_offset must be an integer or None, got {q_offset!r}")
    declared = getattr(pattern, "inputs", {}) or {}
    ins = validate_inputs(declared, dict(inputs or {}), batch=batch, num_heads=num_heads,
                          device=device)
    if device is None:
        dev = next((t.device for t in ins.values()), torch.device("cpu"))
    else:
        dev = torch.device(device)
    ins = {k: v.to(dev) for k, v in ins.items()}
    checked = check_call(pattern, Lq, Lk, num_heads=num_heads, batch=batch, q_offset=q_offset,
                         inputs=ins)
    if ins:
        check_input_bounds(pattern, ins, Lq, Lk, num_heads=num_heads, batch=batch,
                           q_offset=q_offset, checked=checked)
    return ins, dev, checked


# ------------------------------------------------------------------ tile boxes

def tile_bounds(L: int, block: int, offset: int, device, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last position of each tile of ``block`` along ``L`` positions from ``offset``
    (the positions are in int64: ``bounds.check_call``)."""
    n = -(-L // block)
    # tile starts from 0, their ends clamped, then shifted: no intermediate leaves the
    # positions' range (arange's own length arithmetic would, over a span near 2**63)
    rows = torch.arange(n, dtype=I64, device=device) * block
    last = rows + (L - 1 - rows).clamp_(max=block - 1)
    lo, hi = rows + offset, last + offset
    return lo.view(shape), hi.view(shape)


@lru_cache(maxsize=512)
def _free_vars(ir: Node) -> frozenset:
    """Variables the interval pass reads (loads read ``b`` and ``h`` for per-batch/head inputs)."""
    names = set(free_vars(ir))
    if any(isinstance(n, Load) for n in distinct(ir)):
        names |= {"b", "h"}
    return frozenset(names)


def grid_env(Lq, Lk, block_m, block_n, *, num_heads, batch, q_offset, device, names=None) -> dict:
    """The tile boxes: ``q``/``k`` intervals, ``h``/``b`` points (only those in ``names``)."""
    off = query_offset(Lq, Lk, q_offset)
    nq, nk = -(-Lq // block_m), -(-Lk // block_n)
    env = {
        "q": tile_bounds(Lq, block_m, off, device, (1, 1, nq, 1)),
        "k": tile_bounds(Lk, block_n, 0, device, (1, 1, 1, nk)),
        "Lq": Lq, "Lk": Lk, "H": num_heads,
        "widths": {"q": block_m, "k": block_n, "h": 1, "b": 1},
        "origins": {"q": off, "k": 0},
    }
    if names is None or "h" in names:
        env["h"] = torch.arange(num_heads, dtype=I64, device=device).view(1, num_heads, 1, 1)
    if names is None or "b" in names:
        env["b"] = torch.arange(batch, dtype=I64, device=device).view(batch, 1, 1, 1)
    return env


def row_slabs(tiles: torch.Tensor, slab_tiles: int = SLAB_TILES):
    """``(r, tiles[:, :, r:r + n])`` over the query-tile rows of a grid ``[B, H, nq, nk]``,
    ``n`` rows of about ``slab_tiles`` tiles at a time (at least one row): what a count
    over the grid walks so that its intermediates stay O(slab), not O(grid)."""
    B_, H_, nq, nk = tiles.shape
    n = max(1, slab_tiles // max(1, B_ * H_ * nk))
    for r in range(0, nq, n):
        yield r, tiles[:, :, r:r + n]


def _classes(ct, cf, device) -> torch.Tensor:
    """int8 classes ``ct + !cf`` from the three-valued pair: EMPTY (0) where it cannot be
    true, FULL (2) where it cannot be false, PARTIAL (1) otherwise (also for the impossible
    "neither", which stays safe). Three device ops."""
    ct = torch.as_tensor(ct, device=device)
    cf = torch.as_tensor(cf, device=device)
    return torch.add(ct.to(torch.int8), ~cf)


# ------------------------------------------------------------------ classify

def classify(pattern, Lq: int, Lk: int, block_m: int, block_n: int, *, num_heads: int = 1,
             batch: int = 1, q_offset: Optional[int] = None, device=None,
             inputs: Optional[Mapping[str, torch.Tensor]] = None, refine: bool = True,
             positions=None, rows: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Tile classes ``int8 [batch, num_heads, ceil(Lq/block_m), ceil(Lk/block_n)]``.

    ``positions`` (a :class:`spattn.ir.positions.Positions`) or ``q_offset`` say where the
    rows sit (default: bottom-right aligned). ``rows``: only these query-tile rows (indices
    into the ``ceil(Lq/block_m)`` rows; the result has ``len(rows)`` rows, each classified
    as in the whole grid): one pass over the IR for a sample of rows of a call.

    0 = EMPTY, 1 = PARTIAL, 2 = FULL. ``pattern`` is a :class:`spattn.Pattern` (or an IR node
    for patterns without inputs). ``refine=False`` skips the exact refinement (pass 1 only).
    The refinement is also skipped when pass 1 is provably exact for the formula
    (:func:`spattn.ir.intervals.interval_exact`): then the whole call launches a handful of
    device ops and never synchronises (no input checks without inputs, no gathers); and when
    it provably cannot change a tile (:func:`refinement_cannot_change`: e.g.
    ``causal & same(doc)``, where ``doc`` is only seen through its tile-level summary; the
    refinement was ~2 ms of the ~3.3 ms table setup at N = 65536 on an H200).
    """
    if positions is not None:
        q_offset = positions.q_offset
    ir = pattern.ir if hasattr(pattern, "ir") else pattern
    ins, dev, checked = validate_args(pattern, Lq, Lk, block_m, block_n, num_heads=num_heads,
                                      batch=batch, q_offset=q_offset, device=device,
                                      inputs=inputs)
    nq, nk = -(-Lq // block_m), -(-Lk // block_n)
    # the int8 grid and the tiles' bounds (two int64 per row and column), before any is made
    check_room(batch * num_heads * (len(rows) if rows is not None else nq) * nk
               + 16 * (nq + nk), dev, f"the tile grid [{batch}, {num_heads}, {nq}, {nk}]")
    env = grid_env(Lq, Lk, block_m, block_n, num_heads=num_heads, batch=batch,
                   q_offset=q_offset, device=dev, names=_free_vars(ir))
    if rows is not None:
        nq = env["q"][0].shape[2]
        if not rows or any(not 0 <= r < nq for r in rows):
            raise SpattnValueError(f"rows must be query-tile rows in 0..{nq - 1}, got "
                                   f"{list(rows)!r}")
        at = torch.as_tensor(list(rows), dtype=I64, device=dev)
        env["q"] = tuple(t.index_select(2, at) for t in env["q"])
    nq, nk = env["q"][0].shape[2], env["k"][0].shape[3]
    refine = refine and not interval_exact(ir) and not refinement_cannot_change(ir)
    summaries: dict = {}
    shape = (batch, num_heads, nq, nk)
    # slabs of query tiles bound the intermediate tensors to ~SLAB_TILES tiles each
    slab = max(1, SLAB_TILES // (batch * num_heads * nk))
    cls = None
    for s in range(0, nq, slab):
        e = min(nq, s + slab)
        senv = env if (s, e) == (0, nq) else \
            dict(env, q=(env["q"][0][:, :, s:e], env["q"][1][:, :, s:e]))
        ev = IntervalEval(senv, ins, device=dev, summaries=summaries, wrapped=checked.wrapped)
        c = _classes(*ev.bool_(ir), dev)
        if (s, e) == (0, nq) and tuple(c.shape) == shape:
            cls = out = c                       # one slab, already full size: no copy
        else:
            if cls is None:
                cls = torch.empty(shape, dtype=torch.int8, device=dev)
            out = cls[:, :, s:e]
            out.copy_(c.expand(out.shape))
        if refine:
            refine_partial(ir, out, senv, ins, summaries, dev, blocks=(block_m, block_n),
                           grid=ev, checked=checked)
    return cls


# ------------------------------------------------------------------ refinement

@dataclass(frozen=True)
class _Atom:
    node: Node
    kind: str                     # "const" | "lin" | "floor" | "opaque"
    direction: str = ""           # lin: q | k | d
    coeff: int = 0                # lin: coefficient of the direction
    uniform: Node = None          # lin: uniform part
    floors: tuple = ()            # floor: ((direction, a, e_node, m_node), ...)


def _direction(terms: dict) -> Optional[tuple[str, int]]:
    aq = terms.get(Var("q"), 0)
    ak = terms.get(Var("k"), 0)
    if aq and not ak:
        return "q", aq
    if ak and not aq:
        return "k", ak
    if aq and aq == -ak:
        return "d", aq
    return None


def _analyse_atom(atom: Node) -> _Atom:
    if B.is_uniform(atom):
        return _Atom(atom, "const")
    if not isinstance(atom, Range):
        return _Atom(atom, "opaque")
    terms, c = B.linear(atom.x)
    qk = {v: terms[v] for v in (Var("q"), Var("k")) if v in terms}
    rest = {a: v for a, v in terms.items() if a not in qk}
    uni = {a: v for a, v in rest.items() if B.is_uniform(a)}
    nonuni = {a: v for a, v in rest.items() if a not in uni}
    if qk and not nonuni:
        d = _direction(qk)
        if d is None:
            return _Atom(atom, "opaque")
        return _Atom(atom, "lin", d[0], d[1], B.from_linear(uni, c))
    if not qk and nonuni:
        floors = []
        for a in nonuni:
            if not isinstance(a, FloorDiv):
                return _Atom(atom, "opaque")
            it, ic = B.linear(a.a)
            iqk = {v: it[v] for v in (Var("q"), Var("k")) if v in it}
            irest = {x: v for x, v in it.items() if x not in iqk}
            if not all(B.is_uniform(x) for x in irest):
                return _Atom(atom, "opaque")
            d = _direction(iqk)
            if d is None or d[1] <= 0:
                return _Atom(atom, "opaque")
            floors.append((d[0], d[1], B.from_linear(irest, ic), a.b))
        return _Atom(atom, "floor", floors=tuple(floors))
    return _Atom(atom, "opaque")


@lru_cache(maxsize=256)
def refinement_plan(ir: Node):
    """(formula, atoms) used by the refinement, or None when no atom is cellable."""
    lifted = lift(ir)
    formula = ir if lifted is None else lifted
    atoms = [_analyse_atom(a) for a in bool_atoms(formula)]
    if isinstance(formula, BoolConst):
        return formula, ()
    if not any(a.kind in ("lin", "floor") for a in atoms):
        return None
    return formula, tuple(atoms)


@lru_cache(maxsize=256)
def refinement_cannot_change(ir: Node) -> bool:
    """True when :func:`refine_partial` provably leaves every tile as pass 1 classified it
    (then :func:`classify` skips it: for ``causal & same(doc)`` at N = 65536 it was ~2 ms of
    the ~3.3 ms table setup on an H200). Decided statically from the IR, cached per node.
    Sufficient conditions:

    (a) lifting leaves the formula unchanged (``refinement_plan(ir)`` uses ``ir`` itself), so
        the refinement's tile-level three-valued value of every tile is pass 1's;
    (b) no runtime input indexed by two or more dimensions occurs: their per-tile summaries
        depend on the widest index box among the tiles evaluated together (gather at most
        :data:`spattn.ir.intervals.NARROW_GATHER` entries, else the whole input's min/max),
        and the refinement re-evaluates only the PARTIAL tiles, so it may gather where pass 1
        did not and decide a tile from the tile-level value alone (1-D inputs and lists are
        summarised exactly per tile either way);
    (c) exactly one cellable atom occurrence (kind ``lin`` or ``floor``), counted *with
        multiplicity* in the formula tree (the formula is read-once in that atom ``x``);
    (d) ``x`` compares a consecutive value (:func:`spattn.ir.intervals._consecutive`: its
        interval over a tile box is exact and every integer of it is attained), so ``x``'s
        pass-1 pair is exact: if it can be true and can be false over a tile, some point of
        the tile makes it true and some point makes it false. This covers ``lin`` atoms with
        coefficient +-1 (``q - k <= w``, ``k < n``) and ``floor`` atoms such as
        ``q // c == k // c`` or ``(q - k) // c <= 1``;

    or (a), (b) and (e) :func:`_segment_runs_agree` (several cellable atoms, all of one
    direction with fixed thresholds: ``strided(s)``, ``power2(w)``, the per-head
    ``causal & (q - k < w | k % H == h)``; its docstring has the proof).

    Proof of (c), (d). Take a tile pass 1 left PARTIAL. Where ``x`` is decided over the tile, the
    refinement only writes the tile-level value, which is pass 1's by (a) and (b). Where it is
    undecided, the feasible cells partition the tile and ``x`` is constant on each cell (a
    ``floor`` atom whose chunk index changes more than the allowed cuts keeps its tile-level
    pair in every cell, which gives pass 1's value in every cell); by (d) some cell has ``x``
    true and some has it false. Every other atom keeps its tile-level pair in every cell:
    ``opaque`` atoms by construction, ``const`` atoms because they are points (decided, the
    same in every cell). For a formula read-once in ``x``, strong-Kleene evaluation with
    ``x`` = {true, false} is the union of the evaluations at ``x`` = true and ``x`` = false
    (induction: ``~`` swaps the pair; ``&``/``|`` of ``x``'s subtree with an operand free of
    ``x`` distribute over the union, componentwise ``and``/``or`` of the pairs). So the union
    over the cells is pass 1's pair: the tile stays PARTIAL. Without cellable atoms the
    refinement does nothing (``refinement_plan`` is None): True as well.

    Not claimed (the refinement can decide tiles there, see tests/test_refine_skip.py):
    ``causal & (window(w) | sink(n)) & same(doc)`` (cellable atoms of two directions); a cellable atom that
    occurs twice (``(w | a) & (~w | a)`` is ``a``: the cells decide it where ``a`` is decided,
    Kleene with ``w`` unknown does not); ``2*k + h == 3`` (not consecutive: the interval of
    ``2*k`` has holes); lifted formulas (``abs``, ``min``, ``max``, ``if`` around q/k); 2-D
    inputs such as ``blocks[q // c, k // c]``.
    """
    plan = refinement_plan(ir)
    if plan is None:
        return True
    formula, atoms = plan
    if formula != ir:
        return False
    if any(isinstance(n, Load) and len(n.index) > 1 for n in walk(formula)):
        return False
    cellable = {a.node for a in atoms if a.kind in ("lin", "floor")}
    memo: dict = {}

    def occurrences(n) -> int:
        """Occurrences of cellable atoms in the tree below ``n`` (capped at 2)."""
        if n in memo:
            return memo[n]
        if isinstance(n, (And, Or)):
            out = min(2, sum(occurrences(a) for a in n.args))
        elif isinstance(n, Not):
            out = occurrences(n.a)
        else:
            out = 1 if n in cellable else 0
        memo[n] = out
        return out

    if len(cellable) == 1 and occurrences(formula) == 1:
        (x,) = cellable
        if _consecutive(x.x) is not None:
            return True
    return _segment_runs_agree(formula, atoms)


#: most work :func:`_segment_runs_agree` does: (assignments of the other atoms) x (segments +
#: 2) x (formula nodes); above it the refinement is not skipped (it stays correct, only slower)
MAX_RUN_WORK = 1 << 18
_PAIRS = ((True, False), (False, True), (True, True), (False, False))


def _segment_runs_agree(formula: Node, atoms: tuple) -> bool:
    """Condition (e) of :func:`refinement_cannot_change`, given (a) and (b): every cellable
    atom is a ``lin`` atom of one direction ``u`` with coefficient +-1 and a constant uniform
    part, whose compared value is consecutive, and no tile can change. Such an atom is true
    on one interval of ``u`` fixed by the program, so its thresholds cut the integers into
    the same segments for every tile and (b, h), with every cellable atom constant on each. A
    tile's ``u``-range is an integer interval, all of whose values occur in the tile: it meets
    a contiguous run of segments, the refinement's cells are finer than those segments, and so
    the refinement's value is the union over the run's segments of the formula evaluated with
    the segment's atom values and the tile-level pairs of the other atoms; pass 1's is
    Kleene's with each cellable atom's exact pair over the run (true on some segment of it,
    false on some). The refinement changes a tile iff pass 1 leaves it PARTIAL (both flags,
    some cellable atom undecided) while the union is not (no segment of the run can be true,
    or none can be false).

    Checked for every pair of the other atoms (``const``: decided; ``opaque``: any of the
    four pairs) without enumerating the runs: a changing run lies inside a maximal block of
    consecutive segments that cannot be true (or cannot be false), and Kleene evaluation is
    monotone in the run (a longer run makes each atom's pair only less decided), so the block
    itself changes too. Hence it suffices to evaluate the formula on every segment at once (a
    bit per segment: Python ints as bit sets) and Kleene's value on each maximal block:
    O(segments x formula) per assignment, at most :data:`MAX_RUN_WORK` in all (beyond, False:
    the refinement runs). E.g. ``strided(s)``, ``power2(w)``,
    ``causal & (q - k < w | k % H == h)``: the cell below the diagonal is false and the
    band's cell true wherever the Kleene value is undecided.
    """
    cellable = [a for a in atoms if a.kind in ("lin", "floor")]
    if not cellable or any(a.kind != "lin" or abs(a.coeff) != 1 or not isinstance(a.uniform, Const)
                           or _consecutive(a.node.x) is None for a in cellable):
        return False
    if len({a.direction for a in cellable}) != 1:
        return False
    spans = {}                    # atom -> (first, last) value of u where it is true (None: open)
    for a in cellable:
        r, U = a.node, a.uniform.value
        lo = None if r.lo is None else r.lo - U
        hi = None if r.hi is None else r.hi - U
        if a.coeff < 0:
            lo, hi = (None if hi is None else -hi), (None if lo is None else -lo)
        spans[a.node] = (lo, hi)
    cuts = sorted({c for lo, hi in spans.values() for c in
                   ((lo,) if lo is not None else ()) + ((hi + 1,) if hi is not None else ())})
    points = [cuts[0] - 1] + cuts          # one value of u in each segment
    S = len(points)
    full = (1 << S) - 1
    masks = {x: sum(1 << s for s, u in enumerate(points)
                    if (lo is None or u >= lo) and (hi is None or u <= hi))
             for x, (lo, hi) in spans.items()}
    others = [a for a in atoms if a.kind not in ("lin", "floor")]
    choices = [_PAIRS[:2] if a.kind == "const" else _PAIRS for a in others]
    work = (S + 2) * _junction_size(formula)
    for c in choices:
        work *= len(c)
    if work > MAX_RUN_WORK:
        return False
    seg_leaf = {x: (m, full ^ m) for x, m in masks.items()}
    for pairs in itertools.product(*choices):
        leaf = {a.node: (full if ct else 0, full if cf else 0) for a, (ct, cf) in zip(others, pairs)}
        st, sf = combine(formula, {**leaf, **seg_leaf})      # bit s: segment s can be true/false
        point = dict(zip((a.node for a in others), pairs))
        for can in (st, sf):
            for block in _zero_runs(can, S):
                kleene = {x: (m & block != 0, m & block != block) for x, m in masks.items()}
                if not any(ct and cf for ct, cf in kleene.values()):
                    continue               # no cellable atom undecided: not refined
                ct, cf = combine(formula, {**point, **kleene})
                if ct and cf:
                    return False           # pass 1 PARTIAL, the cells decide the block
    return True


def _junction_size(formula: Node) -> int:
    """Distinct nodes of the ``& | ~`` structure of ``formula`` (its leaves included)."""
    seen: set = set()
    stack = [formula]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if isinstance(n, (And, Or, Not)):
            stack.extend(n.children())
    return len(seen)


def _zero_runs(bits: int, n: int):
    """The maximal runs of 0 bits among the low ``n`` bits of ``bits``, as bit masks."""
    s = 0
    while s < n:
        if bits >> s & 1:
            s += 1
            continue
        e = s
        while e + 1 < n and not bits >> (e + 1) & 1:
            e += 1
        yield ((1 << (e - s + 1)) - 1) << s
        s = e + 1


#: the refinement computes cuts and cell corners in int64 from positions, thresholds, chunk
#: offsets and divisors; it takes atoms whose such values stay within +-SAFE_CUTS
SAFE_CUTS = 1 << 62


def _safe_atoms(atoms: tuple, domain: Domain) -> tuple | None:
    """``atoms`` with each cellable one whose cut arithmetic could leave ``+-SAFE_CUTS`` over
    the call made opaque (it keeps its tile-level pair: sound); None when no cellable atom
    is left, or positions and their differences themselves could leave it (then the
    refinement does nothing)."""
    def safe(lo, hi):
        return -SAFE_CUTS < lo and hi < SAFE_CUTS

    var = {n: (lo, hi) for n, lo, hi in domain.variables}
    (qlo, qhi), (klo, khi) = var["q"], var["k"]
    pos = {"q": (qlo, qhi), "k": (klo, khi), "d": (qlo - khi, qhi - klo)}
    if not all(safe(*r) for r in pos.values()):
        return None
    of = bounds_of(domain)
    out = []
    for a in atoms:
        ok = True
        if a.kind == "lin":
            ulo, uhi = of(a.uniform)
            for bound in (a.node.lo, a.node.hi):
                ok = ok and safe(ulo, uhi) and (bound is None or safe(bound - uhi, bound - ulo))
        elif a.kind == "floor":
            for u, coef, e_node, m_node in a.floors:
                (elo, ehi), (mlo, mhi) = of(e_node), of(m_node)
                slo, shi = coef * pos[u][0], coef * pos[u][1]
                ok = (ok and safe(elo, ehi) and safe(slo, shi) and safe(slo + elo, shi + ehi)
                      and safe(66 * mlo, 66 * mhi))
        out.append(a if ok else _Atom(a.node, "opaque"))
    if not any(a.kind in ("lin", "floor") for a in out):
        return None
    return tuple(out)


def _fdiv(a, b):
    return torch.div(a, b, rounding_mode="floor")


def _cdiv(a, b):
    return -torch.div(-a, b, rounding_mode="floor")


def refine_partial(ir: Node, cls: torch.Tensor, env: dict, inputs: dict, summaries: dict,
                   device, chunk_elems: int | None = None, blocks=None, grid=None,
                   checked: Optional[Checked] = None) -> None:
    """Exact refinement of the PARTIAL tiles of ``cls`` (in place). See the module docstring.

    ``blocks=(block_m, block_n)`` gives static bounds on the chunk cuts per tile (no device
    read); without it they are read from the device. ``grid``: pass 1's evaluator over
    ``env`` (the tiles of ``cls``); when the formula needs no lifting and no n-D input was
    summarised by its whole-input min/max, every tile-level value is read from its memo
    (:func:`_select_from_grid`), else the PARTIAL tiles are gathered and re-evaluated
    (:func:`_select_gathered`). ``checked``: the call's :func:`spattn.ir.bounds.check_call`
    result. A lifted formula is checked over the same domain (lifting compares operands of
    ``min``/``max`` with each other, new sums that may leave int64: then nothing is refined),
    and cellable atoms whose cut arithmetic could leave int64 keep their tile-level pair
    (:func:`_safe_atoms`).
    Device synchronisations: the selection of the tiles to refine (``nonzero``; two in the
    gathered way), and one per floor term whose cuts are not bounded statically.
    """
    plan = refinement_plan(ir)
    if plan is None:
        return
    formula, atoms = plan
    if isinstance(formula, BoolConst):    # lifting proved the pattern constant
        cls.copy_(torch.where(cls == PARTIAL, FULL if formula.value else EMPTY, cls))
        return
    wrapped = frozenset()
    if checked is not None:
        if formula != ir:
            lifted = analyse(formula, checked.domain)
            if lifted.problems:
                return
            wrapped = lifted.wrapped
        else:
            wrapped = checked.wrapped
        atoms = _safe_atoms(atoms, checked.domain)
        if atoms is None:
            return
    if grid is not None and formula == ir and not grid.coarse:
        idx, tile = _select_from_grid(formula, atoms, cls, grid, device)
    else:
        idx, tile = _select_gathered(formula, atoms, cls, env, inputs, summaries, device,
                                     wrapped)
    if idx is None:
        return
    # cuts per floor term: as many as the partial tiles need, within MAX_FLOOR_CUTS
    ncut = {"q": 0, "k": 0, "d": 0}
    kcuts = {}
    penv = ranges = None
    for a in atoms:
        if a.kind == "lin":
            ncut[a.direction] += 2
        elif a.kind == "floor":
            for term in a.floors:
                u, coef, e_node, m_node = term
                if term in kcuts:
                    continue
                if blocks is not None and isinstance(m_node, Const) and m_node.value > 0:
                    # static bound: u spans at most `ext` values in a tile, so the chunk
                    # index coef*u+e // m changes at most coef*(ext-1)//m + 1 times
                    ext = {"q": blocks[0], "k": blocks[1], "d": blocks[0] + blocks[1] - 1}[u]
                    count = coef * (ext - 1) // m_node.value + 1
                else:
                    if ranges is None:
                        qlo, qhi, klo, khi, b_t, h_t = _boxes(env, idx)
                        ranges = {"q": (qlo, qhi), "k": (klo, khi), "d": (qlo - khi, qhi - klo)}
                        penv = {"Lq": env["Lq"], "Lk": env["Lk"], "H": env["H"], "h": h_t,
                                "b": b_t}
                    e = torch.as_tensor(evaluate(e_node, penv), device=device)
                    m = torch.as_tensor(evaluate(m_node, penv), device=device)
                    m = torch.where(m > 0, m, torch.ones_like(m))
                    ulo, uhi = ranges[u]
                    count = int((_fdiv(coef * uhi + e, m) - _fdiv(coef * ulo + e, m)).max())
                kcuts[term] = max(0, min(count, MAX_FLOOR_CUTS))
                ncut[u] += kcuts[term]
    ncells = (ncut["q"] + 1) * (ncut["k"] + 1) * (ncut["d"] + 1)
    if ncells > MAX_CELLS and kcuts:   # too many cells: fewer floor cuts (those atoms go inexact)
        for key in kcuts:
            ncut[key[0]] -= kcuts[key] - min(kcuts[key], 4)
            kcuts[key] = min(kcuts[key], 4)
        ncells = (ncut["q"] + 1) * (ncut["k"] + 1) * (ncut["d"] + 1)
    if ncells > MAX_CELLS:
        return
    if chunk_elems is None:
        # on the CPU, chunks below torch's parallel grain (32768 elements): each op runs on
        # one thread, which a busy machine does not make wait for a scheduler slice per op
        # (200 atoms at L = 4096: 0.09 s instead of 2-4 s with the cores shared)
        chunk_elems = CPU_CHUNK if torch.device(device).type == "cpu" else GPU_CHUNK
    cells = ncells
    if torch.device(device).type == "cpu" and blocks is not None:
        # _distinct_cuts leaves at most (extent - 1) cuts of a direction inside a tile
        ext = {"q": blocks[0], "k": blocks[1], "d": blocks[0] + blocks[1] - 1}
        cells = math.prod(min(ncut[u], ext[u] - 1) + 1 for u in ("q", "k", "d"))
    step = max(1, chunk_elems // cells)
    for s in range(0, idx.shape[0], step):
        part = idx[s:s + step]
        new = _refine_chunk(formula, atoms, kcuts, *_boxes(env, part), env, inputs, device,
                            tile(part))
        cls[part[:, 0], part[:, 1], part[:, 2], part[:, 3]] = new


def _boxes(env: dict, part: torch.Tensor):
    """The q and k boxes and the b, h points (``[P, 1]`` each) of the tiles ``part``
    (rows ``(b, h, i, j)``)."""
    bi, hi_, qi, ki = part.unbind(1)
    qlo, qhi = env["q"][0].reshape(-1), env["q"][1].reshape(-1)
    klo, khi = env["k"][0].reshape(-1), env["k"][1].reshape(-1)
    return (qlo[qi].unsqueeze(1), qhi[qi].unsqueeze(1), klo[ki].unsqueeze(1),
            khi[ki].unsqueeze(1), bi.unsqueeze(1), hi_.unsqueeze(1))


def _tile_nodes(atoms) -> list:
    """The atoms whose tile-level pair the cells read (opaque ones; floor ones where a term
    has too many cuts)."""
    return [a.node for a in atoms if a.kind in ("opaque", "floor")]


def _select_from_grid(formula, atoms, cls, grid, device):
    """The tiles to refine, from pass 1's values: some cellable atom and the formula are
    undecided (pass 1's class is then PARTIAL). One synchronisation, no re-evaluation.

    Returns ``(idx [P, 4], tile)`` with ``tile(part)`` giving the tile-level pairs of
    :func:`_tile_nodes` for the rows ``part`` of ``idx`` (gathered from the grid), or
    ``(None, None)``. Identical to :func:`_select_gathered` for unlifted formulas: each
    tile's interval values depend on its own box only, except for n-D inputs summarised by
    their whole-input min/max, which the caller excludes (``grid.coarse``)."""
    shape = cls.shape
    ct, cf = grid.bool_(formula)
    sel = None
    for a in atoms:
        if a.kind in ("lin", "floor"):
            act, acf = grid.bool_(a.node)
            u = act & acf
            sel = u if sel is None else sel | u
    sel = sel & ct & cf
    idx = torch.as_tensor(sel, device=device).expand(shape).nonzero()
    if idx.numel() == 0:
        return None, None
    nodes = _tile_nodes(atoms)

    def tile(part):
        if not nodes:
            return {}
        flat = [t for n in nodes for t in grid.bool_(n)]
        b, h, i, j = part.unbind(1)
        if len(flat) == 2:
            got = [torch.as_tensor(t, device=device).expand(shape)[b, h, i, j] for t in flat]
        else:
            got = torch.stack([torch.as_tensor(t, device=device).expand(shape) for t in flat])
            got = got[:, b, h, i, j].unbind(0)
        return {n: (got[2 * x].unsqueeze(1), got[2 * x + 1].unsqueeze(1))
                for x, n in enumerate(nodes)}
    return idx, tile


def _select_gathered(formula, atoms, cls, env, inputs, summaries, device,
                     wrapped: frozenset = frozenset()):
    """The tiles to refine, by gathering the PARTIAL tiles and evaluating the (lifted)
    formula's atoms over them: tiles where no cellable atom is undecided get the tile-level
    value of the formula (which may decide a lifted one). Two synchronisations.
    Returns ``(idx, tile)`` as :func:`_select_from_grid`, ``tile`` evaluating the rows."""
    idx = (cls == PARTIAL).nonzero()
    if idx.numel() == 0:
        return None, None
    point_env = {"Lq": env["Lq"], "Lk": env["Lk"], "H": env["H"], "widths": env.get("widths"),
                 "origins": env.get("origins")}

    def evaluator(rows):
        qlo, qhi, klo, khi, b_t, h_t = _boxes(env, rows)
        return IntervalEval(dict(point_env, h=h_t, b=b_t, q=(qlo, qhi), k=(klo, khi)), inputs,
                            device=device, summaries=summaries, wrapped=wrapped)

    tev = evaluator(idx)
    undecided = None
    leaf = {}
    for a in atoms:
        leaf[a.node] = tev.bool_(a.node)
        if a.kind in ("lin", "floor"):
            ct, cf = leaf[a.node]
            undecided = (ct & cf) if undecided is None else undecided | (ct & cf)
    # the lifted formula at tile level may already decide (it has no min/max/abs/if)
    ct, cf = combine(formula, leaf)
    ct = torch.as_tensor(ct, device=device).expand(idx.shape[0], 1).reshape(-1)
    cf = torch.as_tensor(cf, device=device).expand(idx.shape[0], 1).reshape(-1)
    # write the tile-level decision of every gathered tile (PARTIAL where undecided): an
    # index_put with integer indices, no device read
    cls[idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]] = _classes(ct, cf, device)
    undecided = undecided.expand(idx.shape[0], 1).reshape(-1) & ct & cf
    idx = idx[undecided]                  # one synchronisation (the count of survivors)
    if idx.numel() == 0:
        return None, None
    nodes = _tile_nodes(atoms)

    def tile(part):
        ev = evaluator(part)
        return {n: ev.bool_(n) for n in nodes}
    return idx, tile


def _refine_chunk(formula, atoms, kcuts, qlo, qhi, klo, khi, b_t, h_t, env, inputs, device,
                  tile_pairs):
    """Classes of the tiles (boxes ``[P, 1]``) from their cells; ``tile_pairs``: the
    tile-level pair of each atom of :func:`_tile_nodes`."""
    P = qlo.shape[0]
    ranges = {"q": (qlo, qhi), "k": (klo, khi), "d": (qlo - khi, qhi - klo)}
    point_env = {"h": h_t, "b": b_t, "Lq": env["Lq"], "Lk": env["Lk"], "H": env["H"]}
    cuts = {"q": [], "k": [], "d": []}        # tensors [P or 1, c]
    fixed = {"q": [], "k": [], "d": []}       # the same for every tile: Python ints
    exact = {}
    done: set = set()
    for a in atoms:
        if a.kind == "lin":
            _lin_cuts(a, evaluate(a.uniform, point_env), P, device,
                      fixed[a.direction], cuts[a.direction])
        elif a.kind == "floor":
            ok = True
            for term in a.floors:
                u, coef, e_node, m_node = term
                first = term not in done
                done.add(term)
                good, c = _floor_cuts(term, kcuts[term], evaluate(e_node, point_env),
                                      evaluate(m_node, point_env), ranges[u], P, device, first)
                ok = ok & good
                if c is not None:
                    cuts[u].append(c)
            exact[a.node] = ok
    # segments per direction: [P, S]
    segs = {}
    host = torch.device(device).type == "cpu"
    allfixed = [sorted(set(fixed[u])) for u in ("q", "k", "d")]
    if any(allfixed):                         # one upload for the Python cuts
        flat = torch.tensor([c for f in allfixed for c in f], dtype=I64, device=device)
    at = 0
    for u, fx in zip(("q", "k", "d"), allfixed):
        ulo, uhi = ranges[u]
        parts = [c.expand(P, c.shape[1]) for c in cuts[u]]
        if fx:
            parts.append(flat[at:at + len(fx)].expand(P, len(fx)))
            at += len(fx)
        if parts:
            cs = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            end = uhi + 1
            cs = torch.clamp(cs, ulo, end)
            if cuts[u] and cs.shape[1] > 1:   # Python cuts alone are sorted, and stay so
                cs = torch.sort(cs, dim=1).values
            if host and cs.shape[1] > 1:
                cs = _distinct_cuts(cs, ulo, end)
            bounds = torch.cat([ulo, cs, end], dim=1)   # segment s is bounds[s] .. bounds[s+1]-1
            segs[u] = (bounds[:, :-1], bounds[:, 1:] - 1)
        else:
            segs[u] = (ulo, uhi)
    Sq, Sk, Sd = segs["q"][0].shape[1], segs["k"][0].shape[1], segs["d"][0].shape[1]
    Qlo = segs["q"][0].view(P, Sq, 1, 1)
    Qhi = segs["q"][1].view(P, Sq, 1, 1)
    Klo = segs["k"][0].view(P, 1, Sk, 1)
    Khi = segs["k"][1].view(P, 1, Sk, 1)
    Dlo = segs["d"][0].view(P, 1, 1, Sd)
    Dhi = segs["d"][1].view(P, 1, 1, Sd)
    lo = torch.maximum(Dlo, Qlo - Khi)
    hi = torch.minimum(Dhi, Qhi - Klo)
    # a cell is its q- and k-segments with q - k in [lo, hi] (which implies Dlo <= Dhi);
    # without cuts a direction's one segment is the tile's range, never empty
    feas = lo <= hi
    if Sq > 1:
        feas = feas & (Qlo <= Qhi)
    if Sk > 1:
        feas = feas & (Klo <= Khi)
    dstar = lo
    qstar = torch.maximum(Qlo, dstar + Klo)
    kstar = qstar - dstar
    feas = feas.expand(P, Sq, Sk, Sd).reshape(P, -1)
    # infeasible cells get some point too: the cellable atoms are arithmetic in q and k
    # (no input or list reads them), and every result below is masked by feas
    cell_env = dict(point_env, q=qstar.expand(P, Sq, Sk, Sd).reshape(P, -1),
                    k=kstar.expand(P, Sq, Sk, Sd).reshape(P, -1))
    leaf = {}
    memo: dict = {}
    for a in atoms:
        if a.kind == "opaque":
            leaf[a.node] = tile_pairs[a.node]
            continue
        v = evaluate(a.node, cell_env, inputs, memo)
        if not isinstance(v, torch.Tensor):       # a uniform atom of Python values
            leaf[a.node] = (bool(v), not v)
        elif a.node in exact and exact[a.node] is not True:
            ct, cf = tile_pairs[a.node]
            ok = exact[a.node]
            if ok is False:
                leaf[a.node] = (ct, cf)
            else:
                leaf[a.node] = (torch.where(ok, v, ct), torch.where(ok, ~v, cf))
        else:
            leaf[a.node] = (v, ~v)
    ct, cf = combine(formula, leaf)
    ct = torch.as_tensor(ct, device=device)
    cf = torch.as_tensor(cf, device=device)
    any_t = (feas & ct).any(dim=1)
    any_f = (feas & cf).any(dim=1)
    # EMPTY where no feasible cell can be true, else FULL where none can be false
    return torch.where(any_t, torch.where(any_f, PARTIAL, FULL), EMPTY).to(torch.int8)


def _distinct_cuts(cs: torch.Tensor, ulo: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Sorted cuts ``[P, c]`` clamped to ``[ulo, end]`` without the columns that only start
    empty segments: a cut equal to ``ulo``, to ``end`` or to the previous one starts an
    empty segment; those become ``end`` (sorted last) and the columns that are ``end`` in
    every row are dropped. The tiles' non-empty segments are the same, each tile keeps
    at most as many empty ones as the most cut tile's distinct cuts leave it (every range
    atom of the formula cuts every tile, most of them at the tile's ends: 110 key ranges
    made 221 segments of a 64-key tile, of which a handful are not empty). One host read
    (the largest count): the CPU's refinement only."""
    empty = (cs == ulo) | (cs == end)
    empty[:, 1:] |= cs[:, 1:] == cs[:, :-1]
    keep = int((~empty).sum(dim=1).max())
    return torch.where(empty, end, cs).sort(dim=1).values[:, :keep]


def _lin_cuts(a: _Atom, U, P: int, device, fixed: list, cuts: list) -> None:
    """The (at most two) values of ``a.direction`` where the atom ``lo <= coeff*u + U <= hi``
    starts and stops holding: Python ints when ``U`` is one, else ``[P, 1]`` tensors."""
    coef, r = a.coeff, a.node
    if coef > 0:
        lo_b, hi_b = r.lo, r.hi
    else:
        lo_b, hi_b = r.hi, r.lo
    if not isinstance(U, torch.Tensor):
        if lo_b is not None:
            fixed.append(-((U - lo_b) // coef))
        if hi_b is not None:
            fixed.append((hi_b - U) // coef + 1)
        return
    U = U.expand(P, 1)
    if lo_b is not None:
        cuts.append(_cdiv(lo_b - U, coef))
    if hi_b is not None:
        cuts.append(_fdiv(hi_b - U, coef) + 1)


def _floor_cuts(term, K: int, e, m, rng, P: int, device, want_cuts: bool = True):
    """``(good, cuts)`` of a floor term ``(coef*u + e) // m``: ``good`` (bool or ``[P, 1]``)
    where ``m > 0`` and the chunk index changes at most ``K`` times in the tile; ``cuts``
    ``[P, K]`` (None for ``K = 0`` or without ``want_cuts``): the values of ``u`` where it changes (``ulo``, an
    empty cut, past the changes and where not good)."""
    u, coef, _, _ = term
    ulo, uhi = rng
    if isinstance(m, torch.Tensor):
        m = m.expand(P, 1)
        good = m > 0
        msafe = torch.where(good, m, torch.ones_like(m))
    else:
        good = m > 0
        msafe = m if good else 1
    f0 = _fdiv(coef * ulo + e, msafe)
    count = _fdiv(coef * uhi + e, msafe) - f0
    good = good & (count <= K)
    if K == 0 or not want_cuts:
        return good, None
    j = torch.arange(1, K + 1, dtype=I64, device=device).view(1, K)
    c = (f0 + j) * msafe - e
    if coef != 1:
        c = _cdiv(c, coef)
    return good, torch.where(good & (j <= count), c, ulo)
