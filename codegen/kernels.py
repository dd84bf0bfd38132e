"""Kernel rendering: a pattern -> the text of a Triton module, from Jinja2 templates.

``render(pattern, kind, config, key, closed_form=None) -> str`` produces a complete,
importable Python file, readable like hand-written code:

* a module docstring with the pattern's canonical source, the strategy, the
  tile sizes, the launch settings, the kernels, the codegen version and the cache key;
* ``kind="fwd"``: ``attn_fwd_<name>_<key6>`` (online softmax, output + lse);
* ``kind="bwd"``: ``attn_bwd_dq_<name>_<key6>`` (one program per query tile, like
  the forward; it also writes each row's delta = rowsum(dO * O) and log2-unit lse),
  launched first, then ``attn_bwd_dkdv_<name>_<key6>`` (one program per key tile
  and key head, looping over the query heads of its GQA group: deterministic, no
  atomics; scores in the transposed orientation, Q^T loaded through strides), each
  with its own tile shape (``BLOCK_M2 x BLOCK_N2`` and ``BLOCK_M1 x BLOCK_N1``).

Each kernel has one template in ``codegen/templates/`` (``fwd.py.j2``, ``bwd_dkdv.py.j2``,
``bwd_dq.py.j2``; ``bwd.py.j2`` puts the backward pair in one module, ``_head.j2`` is the
module top, ``_blocks.j2`` the macros the kernels share: schedules, input bases, hoisted
terms).  Variants are flags of the :class:`~spattn.codegen.config.KernelConfig`
(``loop``, ``strategy``, ``tma``, ``int64``) read by the templates; the per-tile block
(scores, predicate, online softmax or gradients) is one macro per kernel, used by every
loop variant.  This module computes only what the templates cannot: the emitted
predicate and closed-form lines (:mod:`spattn.codegen.emit`) and the interval schedule
(:func:`_ranges_plan`), passed to the templates as data.

Each tile loop lives in a small ``@triton.jit`` function (``_fwd_range`` ...)
called once per sub-range with ``MASKED`` as a constexpr: FULL tiles
(``MASKED=False``) never evaluate the predicate nor any bounds mask; PARTIAL
tiles evaluate the predicate.  The fused variants (``_fwd_fused`` ...) run a whole
interval piece or span in one loop with a per-tile branch around the predicate.

Strategies (``config.strategy``):

``ranges``
    loop bounds come from the closed form of :func:`spattn.ir.ranges.closed_form`,
    computed in the kernel from the tile index (no metadata in memory).  Every
    interval ``[lo, hi]`` of keys becomes a span of key tiles, minus the spans of
    the earlier intervals (no tile is visited twice), split by its FULL part
    ``[flo, fhi]`` into masked / unmasked / masked sub-ranges.
``table``
    tables built by the vectorised analysis at call time (per query tile; the
    transposed ones for dK/dV), in one of three forms chosen at launch by the
    constexprs ``SPANS`` and ``RUNS``: CSR lists (int32 row pointers + column
    indices) of the PARTIAL and of the FULL tiles, run as two loops with one index
    load per tile; the same with the FULL tiles as runs where every row's are
    (``RUNS``: a record of 8 int32 per row, each FULL tile computed from the loop
    counter: a token layout's key boxes in a 2-D or 3-D window); or, where every
    row's tiles are one contiguous span with one contiguous FULL run
    (``causal & same(doc)`` with sorted ids), the span and its FULL run (4 int32 per
    row), run like a ranges interval piece.

Kernel arguments are runtime values wherever they can be: lengths, batch, heads,
``q_offset`` and strides never regenerate a file.
"""
from __future__ import annotations

import functools
import pathlib
import re
from dataclasses import dataclass

import jinja2

from ..ir.nodes import BoolConst
from .emit import HELPERS, NONNEG_VARS, TANH_HELPER, _mentions, emit
from .config import next_pow2

#: Version of the generated code: part of every cache key (bump when output changes).
CODEGEN_VERSION = "40"

#: Unions of up to this many intervals run their pieces in one forward loop (fused): each
#: step picks its piece's tile and FULL range with three scalar selects per further piece.
MERGE_INTERVALS = 3

#: IR variables -> kernel names (query / key positions, head, batch, lengths, heads).
ENV = {"q": "o_q", "k": "o_k", "h": "i_h", "b": "i_b", "Lq": "Lq", "Lk": "Lk", "H": "H"}

STRATEGY_DOC = {
    "ranges": "closed-form key ranges computed in the kernel from the tile index",
    "table": "tile spans or CSR lists of PARTIAL and FULL tiles, built by the analysis "
             "at call time",
}

TEMPLATE_DIR = pathlib.Path(__file__).resolve().parent / "templates"


# ------------------------------------------------------------------ helpers

def ident(name: str) -> str:
    """A safe Python identifier fragment from a pattern name."""
    s = re.sub(r"\W+", "_", name).strip("_") or "pattern"
    if s[0].isdigit():
        s = "p_" + s
    return s.lower()


def _names(pattern, key6: str) -> dict:
    base = f"{ident(pattern.name)}_{key6}"
    return {
        "fwd": f"attn_fwd_{base}",
        "dkdv": f"attn_bwd_dkdv_{base}",
        "dq": f"attn_bwd_dq_{base}",
        "rowstats": f"attn_bwd_rowstats_{base}",
        "fwd_range": f"_fwd_range_{key6}",
        "fwd_fused": f"_fwd_fused_{key6}",
        "dkdv_range": f"_dkdv_range_{key6}",
        "dkdv_fused": f"_dkdv_fused_{key6}",
        "dq_range": f"_dq_range_{key6}",
        "dq_fused": f"_dq_fused_{key6}",
    }


def _arglist(*parts) -> str:
    """Call arguments: the non-empty parts (strings, or lists of strings) joined by commas."""
    out = []
    for p in parts:
        if isinstance(p, str):
            if p:
                out.append(p)
        else:
            out.extend(x for x in p if x)
    return ", ".join(out)


def _slots(n: int) -> list[str]:
    """The merged loop's piece arguments: tiles [pa, pz), FULL [pf, pg) of each piece."""
    return [f"pa{p}, pz{p}, pf{p}, pg{p}" for p in range(n)]


def _wide(int64: bool, index: str) -> str:
    """A tile index where an int64 kernel forms positions from it: cast to 64 bits (a loop
    counter's type follows its bounds, a table entry is int32)."""
    return f"tl.cast({index}, tl.int64)" if int64 else index


def _tma_at(int64: bool, *offsets: str) -> str:
    """A TMA descriptor's offsets ``[b, h, row, 0]``: int32, as descriptors take them (an
    int64 kernel narrows its ids; rows and heads are far below 2**31)."""
    if int64:
        offsets = tuple(f"tl.cast({o}, tl.int32)" for o in offsets)
    return ", ".join(offsets + ("0",))


_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), undefined=jinja2.StrictUndefined,
    trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
_TEMPLATES.globals.update(arglist=_arglist, slots=_slots, tma_at=_tma_at, wide=_wide)
_TEMPLATES.filters["pyrepr"] = repr


# ---------------------------------------------------------- template data

@dataclass(frozen=True)
class Predicate:
    """The pattern's predicate as code, for a tile loop over ``loop_var``.

    ``inner``: per-tile lines that define ``m_pattern``; ``hoisted``: lines computed once
    per program (or per head in dK/dV) before the loop, terms that do not depend on
    ``loop_var``; ``args``: the hoisted names the tile loop reads (``m_pattern`` itself
    when the whole predicate is hoisted: a pattern of q alone in the forward).
    """
    loop_var: str
    inner: tuple[str, ...]
    hoisted: tuple[str, ...]
    args: tuple[str, ...]
    helpers: bool


def _predicate(pattern, loop_var: str, int64: bool = False) -> Predicate:
    ir = pattern.ir
    if isinstance(ir, BoolConst):
        return Predicate(loop_var, (f"m_pattern = {ir.value}",), (), (), False)
    em = emit([ir], ENV, loop_vars=[loop_var], result_names=["m_pattern"], int64=int64)
    return Predicate(loop_var, tuple(em.inner), tuple(em.outer), tuple(em.outer_names),
                     em.uses_helpers)


@dataclass(frozen=True)
class Piece:
    """One piece of an interval's tiles: ``[start, end)`` (code), ``tag`` for comments,
    ``slot`` its parameters in a merged loop."""
    tag: str
    start: str
    end: str
    slot: int


@dataclass(frozen=True)
class IntervalPlan:
    """Interval ``index`` of a closed form: its bounds as code (``lo``, ``hi``, and the
    FULL part ``flo``, ``fhi`` where ``full``) and the pieces left after removing the
    earlier intervals' tiles."""
    index: int
    lo: str
    hi: str
    full: bool
    flo: str
    fhi: str
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class RangesPlan:
    """A ranges schedule: the closed-form ``bounds`` lines, then each interval's tiles
    (``unit`` of the other axis, ``length`` and ``block`` of its tiles); ``merged``: the
    number of pieces run by one merged loop, 0 for one loop (or three) per piece."""
    bounds: tuple[str, ...]
    intervals: tuple[IntervalPlan, ...]
    unit: str
    length: str
    block: str
    merged: int
    helpers: bool


def merged_pieces(intervals) -> int:
    """Pieces a ranges schedule visits in one merged loop: interval ``c`` minus the ``c``
    before it is ``2**c`` pieces; 0 where the schedule keeps one loop per piece (a single
    interval, or more than :data:`MERGE_INTERVALS`)."""
    n = len(intervals)
    return 2 ** n - 1 if 1 < n <= MERGE_INTERVALS else 0


def _closed_form_code(intervals, env: dict, prefix: str, int64: bool):
    """lo/hi/flo/fhi of every interval as scalar code: (lines, uses floor helpers)."""
    roots, names = [], []
    for c, iv in enumerate(intervals):
        for fld in ("lo", "hi", "flo", "fhi"):
            node = getattr(iv, fld, None)
            if node is None:
                continue
            roots.append(node)
            names.append(f"{prefix}{c}_{fld}")
    em = emit(roots, env, loop_vars=(), result_names=names, prefix=f"{prefix}_",
              nonneg_vars=NONNEG_VARS, int64=int64)
    lines = list(em.outer)
    for r, nm in zip(em.results, names):
        if r != nm:
            lines.append(f"{nm} = {r}")
    return lines, em.uses_helpers


def _ranges_plan(intervals, *, prefix: str, env: dict, length: str, block: str, shift: str,
                 unit: str, merge: bool, int64: bool) -> RangesPlan:
    """The schedule visiting the tiles of a union of intervals, each tile once.

    ``shift`` converts positions to row indices (``q_offset`` for queries, ``0`` for
    keys).  Interval ``c`` minus the tile spans ``[s, e)`` of the intervals before it
    (``[x, y) \\ [a, b) = [x, min(y, a)) + [max(x, b), y)``) is ``2**c`` pieces.  With
    ``merge`` a union of 2 to :data:`MERGE_INTERVALS` intervals runs in one loop.
    """
    bounds, helpers = _closed_form_code(intervals, env, prefix, int64)
    sub = "" if shift == "0" else f" - {shift}"
    merged = merged_pieces(intervals) if merge else 0
    plans, spans, slot = [], [], 0
    for c, iv in enumerate(intervals):
        pieces = [(f"s{c}", f"e{c}")]
        for s, e in spans:
            pieces = [x for a, z in pieces
                      for x in ((a, f"tl.minimum({z}, {s})"), (f"tl.maximum({a}, {e})", z))]
        out = []
        for p, (a, z) in enumerate(pieces):
            tag = f"{c}{chr(ord('a') + p)}" if len(pieces) > 1 else f"{c}"
            out.append(Piece(tag, a, z, slot))
            slot += 1
        full = iv.flo is not None and iv.fhi is not None
        plans.append(IntervalPlan(
            c, f"{prefix}{c}_lo{sub}" if iv.lo is not None else "0",
            f"{prefix}{c}_hi{sub}" if iv.hi is not None else f"{length} - 1", full,
            f"{prefix}{c}_flo{sub}" if full else "", f"{prefix}{c}_fhi{sub}" if full else "",
            tuple(out)))
        spans.append((f"s{c}", f"e{c}"))
    return RangesPlan(tuple(bounds), tuple(plans), unit, length, block, merged, helpers)


@dataclass(frozen=True)
class TableGrad:
    """The gradient of one load of a learnable table (dQ kernel): the code of each index
    and of ``d score / d load``; ``reduce``: how the tile's contributions are summed before
    the atomic add — ``"all"`` (the index depends on neither q nor k: one add per tile),
    ``"rows"`` (on q only: one per query row), ``"cols"`` (on k only: one per key), or
    ``""`` (on both: one per pair). ``partial``: the load's kind in a table whose
    gradients can be summed in a fixed order (:func:`partial_slots`; ``""`` otherwise):
    with the dQ kernel's constexpr ``DETERMINISTIC`` its per-tile sums go to the program's
    own slots of a partial buffer, not to the table's gradient (deterministic table
    gradients, ``docs/backends.md``, Scores): ``"all"`` one sum per tile, ``"diag"`` (its
    last index a function of ``q - k``, the others of neither) one per diagonal of the
    tile, ``diags`` of them (a power of two, at least ``BLOCK_M2 + BLOCK_N2 - 1``).
    ``slot`` is the load's place among the table's ``slots`` such loads, ``width`` the
    floats per key tile of the table's partial buffer."""
    name: str
    index: tuple[str, ...]
    value: str
    reduce: str = ""
    partial: str = ""
    slot: int = -1
    slots: int = 0
    diags: int = 0

    @property
    def width(self) -> int:
        return self.slots * (self.diags if self.partial == "diag" else 1)


def _reduction(load) -> str:
    """:attr:`TableGrad.reduce` of a load: which of q and k its indices depend on."""
    from ..ir.nodes import free_vars
    used = set()
    for ix in load.index:
        used |= free_vars(ix) & {"q", "k"}
    return {frozenset(): "all", frozenset({"q"}): "rows",
            frozenset({"k"}): "cols"}.get(frozenset(used), "")


def partial_slots(pattern) -> dict:
    """``{table: (kind, its loads)}`` of the tables whose gradients the dQ kernel can sum
    in a fixed order (``runtime.scores``, deterministic table gradients), the loads in the
    order of ``ir.score.grads(score).dloads``: kind ``"all"`` where every load's index
    depends on neither q nor k (one entry per tile: the tile's ``tl.sum``), ``"diag"``
    where every load's last index is a function of ``q - k`` and the others of neither
    (``emit.gather_form``: one entry per diagonal of the tile, summed over the diagonal).
    Such a table's per-tile sums go to a partial buffer ``[programs, key tiles, width]``
    of its own (:attr:`TableGrad.width`). Cached per score (read at every backward
    launch)."""
    return _partial_slots(pattern.score)


def _partial_kind(load) -> str:
    from .emit import gather_form
    red = _reduction(load)
    if red == "all":
        return "all"
    return "diag" if red == "" and gather_form(load) is not None else ""


@functools.lru_cache(maxsize=256)
def _partial_slots(score) -> dict:
    from ..ir.score import grads as score_grads
    loads: dict = {}
    for load, _ in score_grads(score).dloads:
        loads.setdefault(load.name, []).append(load)
    out = {}
    for name, lds in loads.items():
        kinds = {_partial_kind(ld) for ld in lds}
        if len(kinds) == 1 and "" not in kinds:
            out[name] = (kinds.pop(), tuple(lds))
    return out


def diagonals(block_m2: int, block_n2: int) -> int:
    """The diagonals ``q - k`` of a dQ tile, rounded up to a power of two (a tile's
    ``"diag"`` partial sums: :class:`TableGrad`)."""
    return next_pow2(block_m2 + block_n2 - 1)


@dataclass(frozen=True)
class ScoreCode:
    """A pattern's score as code for one kernel: per-tile ``lines`` computing ``value``
    (the modified score from ``raw``, the kernel's unscaled q·k tile, and ``sm_scale``; in
    log2 units when ``log2``, else natural ones; ``scaled``: the code reads
    ``b_x = raw * sm_scale``, which the template then defines) and, in the
    backward kernels, ``deriv`` (``d score / d s``); ``params``: the kernel parameters of
    the float tables (at the head of the kernel's arguments: they may change every call);
    ``grads``: the table gradients (dQ kernel), ``grad_params`` their parameters;
    ``tiled``: ``value`` has the tile's shape (it reads ``s``, or both q and k); a score of
    one position, heads
    or constants alone is a row, a column or a scalar, broadcast to the tile by the template
    (the softmax and the dots need the whole tile).
    ``early``: with ``score_load="early"``, the lines that do not read ``s`` (indices,
    table loads: their addresses depend on positions only), which the templates place
    before the q·k dot; ``late`` the others (all the lines otherwise); ``fast_tanh``: the
    code calls ``_tanh_approx``. ``row_lines`` and ``row_value``: the score's terms of the
    query alone (in log2 units), which ``value`` leaves out and the kernels add to each
    row's log-sum-exp (None: no such terms); ``factor``: a positive constant that
    ``value`` leaves out and the softmax's multiply-add applies (:attr:`mult`).
    ``score_load="ahead"``: ``first``, the early lines of a tile loop's first tile, every
    load also requiring ``m_first`` (the loop may run no step), placed before the loop;
    ``ahead``, the early lines of the next tile (positions ``o_kx``, or ``o_qx`` in
    dK/dV, every name prefixed ``nx_``), placed at the top of each step, so that the
    loads' latency overlaps a whole step; ``carried``, the early names the late lines or
    the results (value, derivative, table gradients' indices) read, which each step hands
    to the next (``name = nx_name``)."""
    lines: tuple[str, ...]
    value: str
    deriv: str | None
    inputs: tuple[str, ...]
    params: tuple[str, ...]
    grads: tuple[TableGrad, ...]
    grad_params: tuple[str, ...]
    helpers: bool
    tiled: bool = True
    early: tuple[str, ...] = ()
    late: tuple[str, ...] = ()
    fast_tanh: bool = False
    log2: bool = False
    scaled: bool = True
    raw: str = "b_s"
    row_lines: tuple[str, ...] = ()
    row_value: str | None = None
    factor: str | None = None
    first: tuple[str, ...] = ()
    ahead: tuple[str, ...] = ()
    carried: tuple[str, ...] = ()

    @property
    def mult(self) -> str:
        """What the softmax multiplies ``value`` by (`` * x``, or nothing): the natural
        units' ``log2(e)`` (the argument ``sm_scale_log2``) and the score's constant
        ``factor``."""
        if self.factor is None:
            return "" if self.log2 else " * sm_scale_log2"
        return f" * {self.factor}" if self.log2 else f" * (sm_scale_log2 * {self.factor})"

    @property
    def unit_deriv(self) -> bool:
        """``d score / d s`` is 1 (an additive bias): the gradients need no factor."""
        return self.deriv == "1.0"

    @property
    def const_deriv(self) -> bool:
        """``d score / d s`` is a finite constant (no guard against masked pairs)."""
        return self.deriv is not None and re.fullmatch(r"-?[0-9.e+-]+", self.deriv) is not None


def _split_early(lines: tuple[str, ...], score_vars=("b_x",)) -> tuple[tuple, tuple]:
    """``(early, late)``: the lines (``name = expr``, in dependency order) that read neither
    one of ``score_vars`` nor a name defined by a late line, and the others."""
    late_names = set(score_vars)
    early, late = [], []
    for line in lines:
        name, _, expr = line.partition(" = ")
        if any(_mentions(expr, x) for x in late_names):
            late_names.add(name)
            late.append(line)
        else:
            early.append(line)
    return tuple(early), tuple(late)


def _live(lines: tuple[str, ...], results: list[str]) -> tuple[str, ...]:
    """``lines`` (``name = expr``) without those whose name no later line nor result reads."""
    used = "\n".join(results)
    keep = []
    for line in reversed(lines):
        name, _, expr = line.partition(" = ")
        if _mentions(used, name):
            keep.append(line)
            used += "\n" + expr
    return tuple(reversed(keep))


#: The unscaled q·k tile each kernel holds when its score is applied.
_RAW = {"fwd": "b_s", "dq": "b_s", "dkdv": "b_qkt"}


def _emit_score(pattern, kind: str, int64: bool, config, log2: bool, guard: str | None = None):
    """One emission of the score's roots for the ``kind`` kernel, its value in log2 units or
    natural ones: ``(Emitted, the ScoreGrads or None (forward), the table loads (dQ))``;
    ``guard``: a condition every load also requires (:func:`~spattn.codegen.emit.emit`)."""
    from ..ir.score import grads as score_grads, reciprocal
    roots, names = [_kept(pattern.score, log2)[0]], ["b_f"]
    g = None
    if kind != "fwd":
        g = score_grads(pattern.score)
        roots.append(reciprocal(g.ds))
        names.append("b_fd")
    loads = g.dloads if kind == "dq" else ()
    for i, (load, d) in enumerate(loads):
        roots.append(reciprocal(d))
        names.append(f"b_fg{i}")
        for j, ix in enumerate(load.index):
            roots.append(ix)
            names.append(f"i_g{i}_{j}")
    gather = None
    if getattr(config, "score_load", "pair") == "gather":   # the tile: [rows, columns]
        rows, cols = {"fwd": (config.block_m, config.block_n),
                      "dq": (config.block_m2, config.block_n2),
                      "dkdv": (config.block_n, config.block_m)}[kind]
        gather = (rows, next_pow2(rows + cols - 1))
    em = _emit_roots(roots, names, _RAW[kind], int64, config, "sc_", gather, guard)
    return em, g, loads


def _emit_roots(roots, names, raw: str, int64: bool, config, prefix: str, gather=None,
                guard=None):
    """One emission of score roots in a kernel's tile (``raw``: its unscaled q·k tile; the
    positions of the kernel's environment and the tile's first query ``o_r``)."""
    from ..ir.score import TILE_QUERY
    env = dict(ENV, s="b_x", s_raw=raw, s_scale="sm_scale", **{TILE_QUERY: "o_r"})
    return emit(roots, env, loop_vars=tuple(ENV) + (TILE_QUERY,), result_names=names,
                prefix=prefix, int64=int64, table_index=getattr(config, "score_index", "mask"),
                fast_tanh=getattr(config, "fast_tanh", False), gather=gather, guard=guard)


def _kept(score, log2: bool):
    """``(value, factor)``: what the kernels compute per pair of the emitted score
    (:func:`spattn.ir.score.emitted_form`): without its terms of the query alone
    (:func:`~spattn.ir.score.row_terms`, added to the row's lse) and without a positive
    constant factor (:func:`~spattn.ir.score.outer_factor`, ``factor``: applied by the
    softmax's own multiply-add; None without one)."""
    from ..ir.score import emitted_form, outer_factor, row_terms
    return outer_factor(row_terms(emitted_form(score, log2))[0])


def _row_code(pattern, int64: bool, config, log2: bool):
    """``(lines, value, Emitted)``: the score's terms constant along a row
    (:func:`spattn.ir.score.row_terms`), in log2 units whatever the score's, as code of the
    query positions ``o_q`` and the tile's first query ``o_r``; ``((), None, None)`` when
    there are none. The kernels add them to the row's log-sum-exp instead of to every pair."""
    from ..ir import build
    from ..ir.score import LOG2E, emitted_form, row_terms
    rows = row_terms(emitted_form(pattern.score, log2))[1]
    if rows is None:
        return (), None, None
    if not log2:
        rows = build.fmul(rows, build.fconst(LOG2E))
    em = _emit_roots([rows], ["b_rw"], _RAW["fwd"], int64, config, "sr_")
    return _score_lines(em, None), em.results[0], em


def _score_code(pattern, kind: str, int64: bool, config=None) -> ScoreCode | None:
    """The score of ``pattern`` as code for the ``kind`` kernel ("fwd", "dq", "dkdv"): the
    modified score (in log2 units or natural ones, whichever takes fewer operations on the
    tile: :func:`spattn.codegen.opcount.tile_ops`), its derivative (backward), and in dQ
    the table gradients, emitted together (common sub-expressions shared) with every
    variable per tile."""
    if getattr(pattern, "score", None) is None:
        return None
    from .opcount import tile_ops
    raw = _RAW[kind]
    forms = {}
    for log2 in (True, False):
        em, _, _ = _emit_score(pattern, "fwd", int64, config, log2)
        forms[log2] = tile_ops(_score_lines(em, config), em.results[0], raw="b_s")
    log2 = forms[True] <= forms[False]        # same count: log2 (no scale in the softmax)
    em, g, loads = _emit_score(pattern, kind, int64, config, log2)
    lines = _score_lines(em, config)
    res = list(em.results)
    inputs = tuple(pattern.score_inputs)
    tg, pos = [], 2
    slots = partial_slots(pattern) if kind == "dq" else {}
    diags = diagonals(config.block_m2, config.block_n2) if slots and config is not None else 0
    for i, (load, _) in enumerate(loads):
        nd = len(load.index)
        pk, lds = slots.get(load.name, ("", ()))
        tg.append(TableGrad(load.name, tuple(res[pos + 1:pos + 1 + nd]), res[pos],
                            _reduction(load), pk, lds.index(load) if pk else -1, len(lds),
                            diags if pk == "diag" else 0))
        pos += 1 + nd
    grad_params = tuple(x for n in inputs for x in (f"D{n.upper()}_ptr", f"grad_{n}")
                        + ((f"P{n.upper()}_ptr",) if n in slots else ())) \
        if kind == "dq" else ()
    from ..ir.nodes import Score, free_vars, walk
    kept, factor = _kept(pattern.score, log2)
    tiled = any(isinstance(n, Score) for n in walk(kept)) or {"q", "k"} <= free_vars(kept)
    row_lines, row_value, rem = _row_code(pattern, int64, config, log2)
    early, late = ((), lines)
    load = getattr(config, "score_load", "pair")
    if load == "ahead" and getattr(config, "rows", "seq") != "seq":
        load = "pair"                       # (the next tile's rows would need loads too)
    if load in ("early", "gather", "ahead"):
        early, late = _split_early(lines, (raw, "b_x"))
    first = ahead = carried = ()
    if load == "ahead" and early:
        carried = tuple(n for n in (x.partition(" = ")[0] for x in early)
                        if any(_mentions(x, n) for x in late + tuple(res)))
        guarded, _, _ = _emit_score(pattern, kind, int64, config, log2, guard="m_first")
        first = _split_early(_score_lines(guarded, config), (raw, "b_x"))[0]
        ahead = _next_tile(early, _STEP[kind])
    scaled = any(_mentions(x, "b_x") for x in lines + tuple(res))
    return ScoreCode(lines, res[0], res[1] if g is not None else None, inputs,
                     tuple(_input_params(dict(pattern.score_inputs))), tuple(tg), grad_params,
                     em.uses_helpers or bool(rem and rem.uses_helpers), tiled, early, late,
                     em.uses_tanh or bool(rem and rem.uses_tanh), log2, scaled, raw,
                     row_lines, row_value, None if factor is None else repr(factor),
                     first, ahead, carried)


#: The positions a kernel's tile loop steps over: keys (forward, dQ) or queries (dK/dV).
_STEP = {"fwd": "o_k", "dq": "o_k", "dkdv": "o_q"}


def _next_tile(lines: tuple[str, ...], step: str) -> tuple[str, ...]:
    """``lines`` (``name = expr``) for the loop's next tile: its positions ``<step>x`` for
    ``step`` (``o_k`` or ``o_q``) and every name they define prefixed ``nx_``."""
    names = [step] + [x.partition(" = ")[0] for x in lines]
    pat = re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, names)) + r")(?!\w)")
    return tuple(pat.sub(lambda m: step + "x" if m.group(1) == step else "nx_" + m.group(1),
                         x) for x in lines)


def _score_lines(em, config) -> tuple[str, ...]:
    """The lines of one score emission, in the tile: every variable is per tile; what
    depends on none (a table read at a constant index, w[0]) is computed in the tile too,
    first (its lines only read the loop's arguments); the tile's first query ``o_r`` first
    of all where a split difference reads it."""
    lines = tuple(em.outer) + tuple(em.inner)
    if getattr(config, "score_load", "pair") == "gather":
        lines = _live(lines, list(em.results))   # the indices a gathered load replaced
    if any(_mentions(x, "o_r") for x in lines + tuple(em.results)):
        lines = ("o_r = tl.min(o_q)",) + lines
    return lines


@dataclass(frozen=True)
class KernelData:
    """What one kernel's template reads beside the config: its predicate, its ranges
    plan (None for the table strategy), the runtime inputs' names, the kernel parameters
    of the inputs, the extra arguments of its tile loops (inputs, hoisted names), and the
    score's code (None for a pattern without a score)."""
    pred: Predicate
    plan: RangesPlan | None
    inputs: tuple[str, ...]
    input_params: tuple[str, ...]
    loop_args: tuple[str, ...]
    score: ScoreCode | None = None

    @property
    def helpers(self) -> bool:
        return self.pred.helpers or (self.plan is not None and self.plan.helpers) or \
            (self.score is not None and self.score.helpers)

    @property
    def fast_tanh(self) -> bool:
        return self.score is not None and self.score.fast_tanh

    @property
    def mult(self) -> str:
        """The softmax's multiplier of the score tile (:attr:`ScoreCode.mult`; the scale in
        log2 units, ``sm_scale_log2``, for a pattern without a score)."""
        return " * sm_scale_log2" if self.score is None else self.score.mult


def _helpers(*data: KernelData) -> str:
    """The helper functions the kernels of ``data`` call."""
    out = HELPERS if any(d.helpers for d in data) else ""
    return out + (TANH_HELPER if any(d.fast_tanh for d in data) else "")


def _input_params(inputs: dict[str, int]) -> list[str]:
    """Kernel parameters of the runtime inputs: pointer, batch/head strides, index strides, sizes."""
    out = []
    for name, nd in inputs.items():
        out.append(f"{name.upper()}_ptr")
        out.append(f"stride_{name}_b")
        out.append(f"stride_{name}_h")
        out += [f"stride_{name}_{d}" for d in range(nd)]
        out += [f"size_{name}_{d}" for d in range(nd)]
    return out


def _input_loop_args(inputs: dict[str, int]) -> list[str]:
    """What a tile loop needs of the inputs: the offset base pointer, strides, sizes."""
    out = []
    for name, nd in inputs.items():
        out.append(f"p_{name}")
        out += [f"stride_{name}_{d}" for d in range(nd)]
        out += [f"size_{name}_{d}" for d in range(nd)]
    return out


def _kernel_data(pattern, config, loop_var: str, plan: RangesPlan | None,
                 kind: str = "fwd") -> KernelData:
    inputs = dict(pattern.inputs)
    pred = _predicate(pattern, loop_var, config.int64)
    score = _score_code(pattern, kind, config.int64, config)
    if score is None:
        return KernelData(pred, plan, tuple(inputs), tuple(_input_params(inputs)),
                          tuple(_input_loop_args(inputs)) + pred.args)
    floats = dict(pattern.score_inputs)
    extra = tuple(_input_loop_args(floats)) + ("sm_scale",)
    if kind == "dq":
        slots = partial_slots(pattern)
        extra += tuple(x for n in floats for x in (f"p_d{n}", f"grad_{n}")
                       + ((f"p_p{n}",) if n in slots else ()))
    return KernelData(pred, plan, tuple(inputs) + tuple(floats), tuple(_input_params(inputs)),
                      tuple(_input_loop_args(inputs)) + pred.args + extra, score)


def _rows_plan(closed_form, config, block: str, merge: bool) -> RangesPlan | None:
    """Key tiles per query tile (forward, dQ) from the closed form's rows."""
    if config.strategy != "ranges":
        return None
    return _ranges_plan(closed_form.rows, prefix="r", env=dict(ENV, qs="qs", qe="qe"),
                        length="Lk", block=block, shift="0", unit="keys", merge=merge,
                        int64=config.int64)


def _cols_plan(closed_form, config) -> RangesPlan | None:
    """Query tiles per key tile (dK/dV) from the closed form's columns."""
    if config.strategy != "ranges":
        return None
    return _ranges_plan(closed_form.cols, prefix="c", env=dict(ENV, ks="ks", ke="ke"),
                        length="Lq", block="BLOCK_M1", shift="q_offset",
                        unit="query positions", merge=False, int64=config.int64)


def _render(template: str, **context) -> str:
    return _tidy(_TEMPLATES.get_template(template).render(
        version=CODEGEN_VERSION, strategy_doc=STRATEGY_DOC, **context))


# ---------------------------------------------------------------- renderers

def render_fwd(pattern, config, key: str, closed_form=None) -> str:
    """The forward module (``codegen/templates/fwd.py.j2``)."""
    fused = config.loop in ("fused", "persistent")
    fwd = _kernel_data(pattern, config, "k", _rows_plan(closed_form, config, "BLOCK_N", fused),
                       "fwd")
    return _render("fwd.py.j2", kind="fwd", pattern=pattern, config=config, key=key,
                   names=_names(pattern, key[:6]), fwd=fwd,
                   merged=fwd.plan.merged if fwd.plan else 0,
                   floor_helpers=_helpers(fwd))


def render_bwd(pattern, config, key: str, closed_form=None) -> str:
    """The backward module (``codegen/templates/bwd.py.j2``): the dK/dV kernel, then the
    dQ kernel.

    dQ reads the forward's natural-log LSE and writes, per query row, the LSE in log2
    units (``lse * log2(e)``, fully masked rows ``+inf`` so that ``p = 0``) and
    ``delta = rowsum(dO * O)``, which dK/dV reads: no pre-pass launch.  dK/dV is
    rendered with its own tile shape (``BLOCK_M1`` queries per step, ``BLOCK_N1`` keys
    per program) and dQ with its own (``BLOCK_M2``, ``BLOCK_N2``): the ranges schedules
    use each kernel's constants, the tables are built per shape.
    """
    dkdv = _kernel_data(pattern, config, "q", _cols_plan(closed_form, config), "dkdv")
    dq = _kernel_data(pattern, config, "k", _rows_plan(closed_form, config, "BLOCK_N2", False),
                      "dq")
    return _render("bwd.py.j2", kind="bwd", pattern=pattern, config=config, key=key,
                   names=_names(pattern, key[:6]), dkdv=dkdv, dq=dq, merged=0,
                   floor_helpers=_helpers(dkdv, dq))


def render_decode(pattern, config, key: str, closed_form=None) -> str:
    """The decode module (``codegen/templates/decode.py.j2``): the split-K kernel over the
    key tiles of a few query rows and the kernel that combines the splits.

    ``config``: a :class:`spattn.runtime.decode.DecodeConfig` (``strategy`` "ranges" with
    the closed form's row intervals, or "scan"). Every piece of every interval becomes one
    slot of a single loop (the tiles are numbered across pieces, so a split is a range of
    that numbering).
    """
    plan = None
    if config.strategy == "ranges":
        if closed_form is None:
            raise ValueError("the ranges strategy needs the pattern's closed form")
        plan = _ranges_plan(closed_form.rows, prefix="r", env=dict(ENV, qs="qs", qe="qe"),
                            length="Lk", block="BLOCK_N", shift="0", unit="keys", merge=True,
                            int64=False)
    data = _kernel_data(pattern, config, "k", plan)
    pieces = sum(len(iv.pieces) for iv in plan.intervals) if plan else 1
    key6 = key[:6]
    names = {"split": f"attn_decode_{ident(pattern.name)}_{key6}",
             "combine": f"attn_decode_combine_{ident(pattern.name)}_{key6}"}
    return _render("decode.py.j2", pattern=pattern, config=config, key=key, names=names,
                   data=data, plan=plan, pieces=pieces,
                   floor_helpers=_helpers(data))


def render(pattern, kind: str, config, key: str, closed_form=None) -> str:
    """Source text of the ``kind`` ("fwd" or "bwd") module of ``pattern``."""
    if config.strategy == "ranges" and closed_form is None:
        raise ValueError("the ranges strategy needs the pattern's closed form")
    if kind == "fwd":
        return render_fwd(pattern, config, key, closed_form)
    if kind == "bwd":
        return render_bwd(pattern, config, key, closed_form)
    raise ValueError(f"unknown kernel kind {kind!r} (expected 'fwd' or 'bwd')")


# ------------------------------------------------------------------ layout

def _wrap_call(line: str, width: int = 100) -> list[str]:
    """Break a long ``lhs = f(a, b, ...)`` line after commas, aligned under the paren."""
    if len(line) <= width or "(" not in line or not line.rstrip().endswith(")"):
        return [line]
    indent = len(line) - len(line.lstrip())
    open_at = line.index("(")
    head, args = line[:open_at + 1], line[open_at + 1:-1]
    parts, depth, cur = [], 0, ""
    for ch in args:
        if ch == "," and depth == 0:
            parts.append(cur.strip() + ",")
            cur = ""
            continue
        depth += ch in "([{"
        depth -= ch in ")]}"
        cur += ch
    if cur.strip():
        parts.append(cur.strip())
    pad = " " * (indent + 4)
    out, cur = [head], pad
    for p in parts:
        if len(cur) + len(p) + 1 > width and cur.strip():
            out.append(cur.rstrip())
            cur = pad
        cur += p + " "
    out.append(cur.rstrip())
    out[-1] += ")"
    return out


def _tidy(text: str) -> str:
    """Long calls wrapped; at most two blank lines between top-level definitions and one
    inside a function; no trailing spaces."""
    lines = []
    for line in text.splitlines():
        lines += _wrap_call(line.rstrip())
    out = []
    for i, line in enumerate(lines):
        if line == "" and out and out[-1] == "":
            nxt = next((x for x in lines[i:] if x), "")
            # two blank lines between top-level definitions, one inside a function
            if nxt[:1] in (" ", ")") or (len(out) >= 2 and out[-2] == ""):
                continue
        out.append(line)
    return "\n".join(out).strip("\n") + "\n"
