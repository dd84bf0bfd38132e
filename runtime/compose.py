"""Composed score tables at run time: the gathers of :mod:`spattn.ir.compose` for one call.

A :class:`Recipe` belongs to one call shape (``Lq``, ``Lk``, ``q_offset``, the tables'
shapes): for every composed table it holds the index of the source entry each distance
reads (``lut``, int64 on the call's device, computed once from the index function with the
IR evaluator) and the sort of those indices that the backward sums by. Per call it gathers
the composed tables from the caller's tables (one ``index_select`` each) and, in the
backward, sums each composed table's gradient back into its source: sorted by source
entry, a float64 cumulative sum, and the differences at the ends of each entry's run. That
sum has a fixed order on every device, so a composed table's gradient is as deterministic
as the kernels' gradient of the composed table.

The composed table ``name`` covers the distances ``d = q - k`` from ``-(Lk - 1)`` to the
last query's ``q_offset + Lq - 1`` and is read at ``d + Lk - 1`` (its size grows with
``q_offset``: ``2 Lk - 1`` distances for a decode step's bottom-right rows); a call whose
``q_offset`` is negative or not an int (traced), or whose composed table would pass
:data:`MAX_ELEMENTS`, runs the score as written.
"""
from __future__ import annotations

import torch

from ..ir.compose import COMPOSE_MIN_OPS, Composition, pattern_composition
from ..ir.evaluate import evaluate

__all__ = ["MAX_ELEMENTS", "Recipe", "composition", "min_ops", "recipe"]

#: The most elements of one composed table (256 MiB in float32): beyond that (a query
#: offset far past the keys, millions of tokens with many heads) the score runs as written.
MAX_ELEMENTS = 1 << 26


def min_ops(settings) -> int | None:
    """The composition's threshold under ``settings.score_compose`` (None, ``auto``:
    :data:`~spattn.ir.compose.COMPOSE_MIN_OPS`; True: 1, every non-affine distance index;
    False: None, nothing composed)."""
    mode = settings.score_compose
    return None if mode is False else 1 if mode else COMPOSE_MIN_OPS


def composition(pattern, settings) -> Composition | None:
    """The composition of ``pattern``'s score under ``settings`` (:func:`min_ops`), or
    None."""
    return pattern_composition(pattern, min_ops(settings))


def _dim(c, t) -> int:
    """The dim of table ``t`` (leading ``[B]`` / ``[B, H]`` dims included) that composed
    table ``c`` replaces."""
    return t.dim() - c.nd + c.axis


class Recipe:
    """The composed tables of one call shape (module docstring). ``pattern``: the pattern
    whose score reads them (:func:`recipe`); ``layout``: each source table's shape and
    dtype as the recipe was built for."""

    def __init__(self, comp: Composition, pattern, luts: dict, layout: dict):
        self.comp, self.pattern, self.luts, self.layout = comp, pattern, luts, layout
        self.names = tuple(n for n, _ in comp.score_inputs)

    def __repr__(self) -> str:
        parts = ", ".join(f"{c.name} = {c.source} along {len(self.luts[c.name][0])} distances"
                          for c in self.comp.composed)
        return f"Recipe({parts})"

    def check(self, floats: dict, plan) -> None:
        """SpattnInputError unless the caller's tables are shaped, typed and placed as
        this recipe's and ``plan``'s (a plan's call passes its own tables): the sources
        against the recipe (the composed tables' shapes follow from theirs), the tables
        read as they are against the plan."""
        from .plan import check_table_layout
        check_table_layout(self.layout, floats, plan.device)
        plan.check_tables(floats, skip=tuple(c.name for c in self.comp.composed))

    def inputs(self, ins: dict) -> dict:
        """The run pattern's tables from the caller's (``ins``: by name; int inputs pass
        through): each composed table gathered from its source along the distances."""
        out = {n: t for n, t in ins.items() if n in self.names or n not in self.layout}
        for c in self.comp.composed:
            t = ins[c.source]
            out[c.name] = t.index_select(_dim(c, t), self.luts[c.name][0])
        return out

    def wanted(self, table_grads) -> tuple:
        """The run pattern's tables that need a gradient for the caller's ``table_grads``."""
        want = set(table_grads)
        return tuple(n for n in self.names if n in want or any(
            c.name == n and c.source in want for c in self.comp.composed))

    def grads(self, bufs: dict, ins: dict, table_grads) -> dict:
        """The caller's tables' gradients from those of the run pattern's tables (``bufs``,
        in their dtype), each composed table's summed into its source in a fixed order."""
        out = {n: bufs[n] for n in table_grads if n in bufs}
        for c in self.comp.composed:
            if c.source not in table_grads or c.name not in bufs:
                continue
            _, order, ends = self.luts[c.name]
            g = bufs[c.name]
            dim = _dim(c, ins[c.source])
            cs = g.index_select(dim, order).double().cumsum(dim)
            cs = torch.cat([torch.zeros_like(cs.narrow(dim, 0, 1)), cs], dim)
            starts = torch.cat([ends.new_zeros(1), ends[:-1]])
            s = (cs.index_select(dim, ends) - cs.index_select(dim, starts)).to(g.dtype)
            out[c.source] = s if c.source not in out else out[c.source] + s
        return out


def recipe(pattern, run_pattern, comp: Composition, floats: dict, Lq: int, Lk: int,
           q_offset: int, device) -> Recipe | None:
    """The :class:`Recipe` of a call of ``pattern`` (its score's tables ``floats``, checked
    in range), or None where a composed table would not cover the call (module
    docstring)."""
    if not isinstance(q_offset, int) or q_offset < 0:
        return None
    n = q_offset + Lq + Lk - 1
    for c in comp.composed:
        t = floats[c.source]
        if t.numel() // t.shape[_dim(c, t)] * n > MAX_ELEMENTS:
            return None
    d = torch.arange(-(Lk - 1), q_offset + Lq, dtype=torch.int64)
    luts, layout = {}, {}
    for c in comp.composed:
        t = floats[c.source]
        size = t.shape[_dim(c, t)]
        # (the call's distances start at q_offset - (Lk - 1): the entries below it are
        #  never read, and their indices are clamped into the table)
        lut = torch.as_tensor(evaluate(c.fn, {"u": d}), dtype=torch.int64).expand(n)
        lut = lut.clamp(0, size - 1)
        order = torch.sort(lut, stable=True).indices
        ends = torch.bincount(lut, minlength=size).cumsum(0)
        luts[c.name] = tuple(x.to(device) for x in (lut, order, ends))
        layout[c.source] = (tuple(t.shape), t.dtype)
    return Recipe(comp, run_pattern, luts, layout)
