"""Tables composed with their index on the host: ``rel[h, g(q - k)]`` as ``rel_g[h, q - k + Lk - 1]``.

A score that reads a float table at an index computed from the distance ``q - k`` alone
(T5's buckets: ``rel[h, t5_bucket_causal(32, 128)]``) pays for the index function on every
computed pair: the bucket is a ladder of comparisons before its load. The same values come
from a table gathered once per call along the distances: ``rel_g = rel.index_select(dim,
g(d))`` over every distance ``d`` of the call, read at ``d + Lk - 1``. The kernels then
load one entry per pair with no index arithmetic beyond a subtraction, as they do for a
learned ``rel[h, q - k]``; the caller's table gets its gradient back from the composed
table's, summed per entry (:meth:`spattn.runtime.compose.Recipe.grads`).

:func:`compose` finds those loads and rewrites the score; it is a pure function of the
score (the runtime applies it: :mod:`spattn.runtime.compose`). A load qualifies when exactly
one of its index expressions reads q or k, that one is a function of ``q - k`` alone
(:func:`distance_form`) that reads nothing else (no head, batch, length or runtime
input), and it is not affine (an affine index is a load of its own already: one
non-affine operation at least is always required). ``min_ops``: the least number of
non-affine operations (comparisons, selects, min/max, abs, division, modulo, constant
lists; :func:`index_ops`) an index must cost to be composed; a clamp (2) stays in the
kernel, T5's buckets (26 for ``t5_bucket(32, 128)``, 47 for ``t5_bucket_causal(32,
128)``) are composed. ``reserved``: names a composed table must
not take (the mask's inputs; the score's are never taken).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from . import build as B
from .intervals import replace
from .nodes import (Abs, And, FloorDiv, FLoad, IsPow2, Load, Max, Min, Mod, Node, Not, Or,
                    Range, Select, Table, Var, float_loads, free_vars, walk)
from .score import FloatRebuild
from .visitor import rule

__all__ = ["COMPOSE_MIN_OPS", "Composed", "Composition", "compose", "distance_form",
           "index_ops", "pattern_composition"]

#: The default of :func:`compose`'s ``min_ops``: an index function composed on the host
#: costs at least this many operations per pair in the kernel.
COMPOSE_MIN_OPS = 4


@dataclass(frozen=True)
class Composed:
    """One composed table: ``name`` is read at ``q - k + Lk - 1`` along index dim ``axis``
    where ``source`` was read at ``fn`` of the distance; ``fn`` is an int expression of
    ``Var("u")`` standing for the distance ``q - k`` (:func:`distance_form`). ``nd``: the
    source's index dims."""
    name: str
    source: str
    axis: int
    nd: int
    fn: Node


@dataclass(frozen=True)
class Composition:
    """The rewritten score, its float inputs (``name -> index dims``, the composed tables
    in place of sources no longer read directly) and the tables to build."""
    score: Node
    score_inputs: tuple[tuple[str, int], ...]
    composed: tuple[Composed, ...]


#: The node types an index pays for per pair beyond additions and constant factors.
_COSTLY = (Select, Range, Min, Max, Abs, FloorDiv, Mod, Table, IsPow2, Not, And, Or)


def index_ops(index: Node) -> int:
    """Non-affine operations of an int index expression (each node counted once per
    occurrence; a kernel evaluates common sub-expressions once, so this is an upper
    bound)."""
    return sum(isinstance(n, _COSTLY) for n in walk(index))


def distance_form(index: Node, var: str = "u") -> Node | None:
    """``index`` as a function of ``Var(var)`` standing for ``q - k`` (``q`` replaced by
    ``var + k``, canonicalised), where it is one: it reads q and k only through their
    difference and no runtime input; else None. Other variables (``h``) may remain."""
    if any(isinstance(n, (Load, FLoad)) for n in walk(index)):
        return None
    g = replace(index, Var("q"), B.add(Var(var), Var("k")))
    used = free_vars(g)
    return g if var in used and not used & {"q", "k"} else None


class _ReplaceLoads(FloatRebuild):
    """The score with some of its float loads replaced (``self.map``)."""

    def __init__(self, mapping: dict):
        self.map = mapping

    @rule(FLoad)
    def fload(self, n):
        return self.map.get(n, n)


def _fresh(base: str, taken: set) -> str:
    i = 0
    while f"{base}_by_distance{i or ''}" in taken:
        i += 1
    name = f"{base}_by_distance{i or ''}"
    taken.add(name)
    return name


@lru_cache(maxsize=256)
def _compose(score: Node, score_inputs: tuple, min_ops: int, reserved: tuple
             ) -> Composition | None:
    inputs = dict(score_inputs)
    taken = set(inputs) | set(reserved)
    mapping, composed = {}, []
    for ld in float_loads(score):
        reads = [i for i, c in enumerate(ld.index) if free_vars(c) & {"q", "k"}]
        if len(reads) != 1:
            continue
        axis = reads[0]
        g = distance_form(ld.index[axis])
        if g is None or free_vars(g) != {"u"} or index_ops(g) < min_ops:
            continue
        name = _fresh(ld.name, taken)
        at = B.add(Var("q"), B.neg(Var("k")), Var("Lk"), B.const(-1))
        mapping[ld] = B.fload(name, ld.index[:axis] + (at,) + ld.index[axis + 1:])
        composed.append(Composed(name, ld.name, axis, inputs[ld.name], g))
    if not composed:
        return None
    new = _ReplaceLoads(mapping)(score)
    read = {n.name for n in float_loads(new)}
    out = {n: nd for n, nd in inputs.items() if n in read}
    out.update((c.name, c.nd) for c in composed)
    return Composition(new, tuple(out.items()), tuple(composed))


def compose(score: Node, score_inputs: dict, *, min_ops: int = COMPOSE_MIN_OPS,
            reserved: tuple = ()) -> Composition | None:
    """The score with its loads at a costly function of ``q - k`` read from composed
    tables (module docstring), or None when no load qualifies."""
    return _compose(score, tuple(score_inputs.items()), max(1, int(min_ops)),
                    tuple(sorted(reserved)))


def pattern_composition(pattern, min_ops: int | None) -> Composition | None:
    """:func:`compose` of a pattern's score, its mask's inputs reserved; None without a
    score or when ``min_ops`` is None (nothing composed: ``SPATTN_SCORE_COMPOSE=0``)."""
    if getattr(pattern, "score", None) is None or min_ops is None:
        return None
    return compose(pattern.score, pattern.score_inputs, min_ops=min_ops,
                   reserved=tuple(pattern.inputs))
