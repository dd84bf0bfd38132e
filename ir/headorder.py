"""Per-head key orders: a pattern whose keys split into a class chosen per head, run with
each head's class keys first.

S2-Attention's head stripes (``causal & (q - k < 1024 | k % 16 == h)``: each head sees a
local window and its own residue class of keys) have, in sequence order, a few allowed keys
in every key tile, so every causal tile is computed. A per-head key order puts, for head
``h``, the keys of its class first (in sequence order) and every other key after them (in
sequence order); queries keep their positions. The class is then a contiguous run of key
slots and a window over the other keys stays a contiguous run: nearly every tile is FULL
or EMPTY.

What is found (:func:`class_atoms`): a condition of the pattern (an atom: ``k % m == h``,
``(k - c) % m == h % m``, ``(k // b) % m == h``, any ``Range`` or ``is_pow2``; or a ``|``,
``&`` or ``!`` of atoms, also as part of a wider junction) that reads ``k`` and ``h`` and
nothing else of the call but ``H`` and ``Lk``: its truth for key ``k`` and head ``h`` is
the class, evaluated densely per head at plan time (so any such expression works, not
only residue classes).

The pattern over slots (:func:`head_order`): with ``kclass[h]`` the size of head ``h``'s
class and ``kpos[k]`` the key in slot ``k`` of the current head (int runtime inputs of the
inner pattern, ``[H]`` and ``[1, H, N]``: inputs rather than constants, so that its kernel
file is the same at every length), the pattern is the union of two cases, each with the
atom decided::

    (k < kclass[h] & P[atom := true,  k := kpos[k]])
  | (k >= kclass[h] & P[atom := false, k := kpos[k]])

It equals the original pattern read through the order, for every pair (each case holds
exactly on the slots where the atom has the value substituted). The tile analysis bounds
``kpos[k]`` over a key tile by its min/max (as for any runtime input, per head): a run of
class keys spaced ``m`` apart or of the other keys (``m - 1`` of every ``m``) spans about
its length in positions, and the case conditions on ``k`` decide which case a tile is in.
Loading positions rather than coordinates suffices because the atom no longer appears in
either case.

The choice (:func:`choose_head_order`) compares computed pairs of the two orders per head
on sampled query-tile rows, and prices them with ``ir.layout.layout_cost`` plus the
gathers of k and v (2 of the 5 tensors a layout gathers: q, o and the lse keep their
order).
"""
from __future__ import annotations

from dataclasses import dataclass, replace as _dc_replace
from typing import Optional

import torch

from . import build as B
from .nodes import And, IsPow2, Load, Node, Not, Or, Range, free_vars, walk
from .visitor import MaskPass, rule

__all__ = ["HeadOrder", "class_atoms", "decide", "head_order", "choose_head_order", "KPOS",
           "KCLASS",
           "MAX_ATOMS", "GATHERED_TENSORS"]

#: The names of the inner pattern's runtime inputs: the key position of each slot, per
#: head (``[1, H, N]``), and the class size of each head (``[H]``, indexed by ``h``).
KPOS = "kpos"
KCLASS = "kclass"
#: Class atoms tried at most (in the pattern's canonical order).
MAX_ATOMS = 4
#: Tensors a head order gathers per call, of the 5 a layout's ``gather_token`` prices
#: (k and v into slot order; the backward scatters dk and dv back: priced with the forward
#: as a layout's is).
GATHERED_TENSORS = 2
#: The variables a class atom may read besides ``k`` and ``h``.
_ALLOWED = {"k", "h", "H", "Lk"}


@dataclass(frozen=True)
class HeadOrder:
    """A pattern run in per-head key orders: ``atom`` (the class condition of ``k`` and
    ``h``), ``counts`` (per head, its class size), ``ir`` (the pattern over key slots, which
    reads the input :data:`KPOS`), the computed pairs and predicted costs (per head, summed
    over heads) of sequence order and the head order."""

    atom: Node
    counts: tuple[int, ...]
    ir: Node
    #: the names of the inputs ``kpos`` and ``kclass`` (prefixed past the pattern's own)
    names: tuple[str, str] = (KPOS, KCLASS)
    #: the pattern's own runtime inputs and their index dimensions
    inputs: tuple[tuple[str, int], ...] = ()
    computed_sequence: int = 0
    computed_order: int = 0
    cost_sequence: float = 0.0
    cost_order: float = 0.0

    @property
    def pays(self) -> bool:
        """Computed pairs and predicted cost each at most ``ir.layout.MARGIN`` of sequence
        order's."""
        from .layout import MARGIN
        return (self.computed_order <= MARGIN * self.computed_sequence
                and self.cost_order <= MARGIN * self.cost_sequence)

    def order(self, N: int, device=None) -> torch.Tensor:
        """int64 ``[H, N]``: the key in each slot of each head (the class first, then the
        rest, each in sequence order)."""
        member = class_mask(self.atom, N, len(self.counts), device)
        return torch.argsort((~member).to(torch.int8), dim=-1, stable=True)

    def __str__(self) -> str:
        return (f"per-head key order of the class {self.atom} "
                f"({min(self.counts)}-{max(self.counts)} keys per head first)")


def class_mask(atom: Node, N: int, H: int, device=None) -> torch.Tensor:
    """bool ``[H, N]``: whether key ``k`` is in head ``h``'s class (``atom`` is true)."""
    from .evaluate import mask
    return mask(atom, 1, N, num_heads=H, device=device)[0, :, 0, :]


def _class_like(n: Node) -> bool:
    names = free_vars(n)
    return {"k", "h"} <= names <= _ALLOWED and not any(isinstance(m, Load) for m in walk(n))


def class_atoms(ir: Node) -> list[Node]:
    """Class conditions of ``ir``: its comparisons (and ``&``, ``|``, ``!`` of them) that
    read ``k`` and ``h`` and else only ``H``, ``Lk`` and constants (no q, no batch, no
    runtime input), and, of a ``|`` or ``&`` that also reads more, the junction of its
    arguments that do not (``k % 8 == h | k % 8 == h + 4`` beside a window: one class of
    two residues); the largest first, at most :data:`MAX_ATOMS`."""
    out = []
    for n in walk(ir):
        if isinstance(n, (Range, IsPow2, Not, And, Or)) and _class_like(n):
            out.append(n)
        elif isinstance(n, (And, Or)):
            part = [a for a in n.args if _class_like(a)]
            if len(part) > 1:
                out.append((B.or_ if isinstance(n, Or) else B.and_)(*part))
    seen = []
    for n in sorted(out, key=lambda n: -sum(1 for _ in walk(n))):
        if n not in seen:
            seen.append(n)
    return seen[:MAX_ATOMS]


class _Decide(MaskPass):
    """:func:`decide`'s rules: the class condition ``atom`` replaced by ``value`` where it
    occurs, or, as a junction of some arguments of a wider ``|`` or ``&``, in place of
    those arguments; every other node rebuilt from its children (shared subtrees once)."""

    def __call__(self, n, atom, value, memo):
        got = memo.get(n)
        if got is None:
            got = memo[n] = B.boolean(value) if n == atom else super().__call__(n, atom,
                                                                                  value, memo)
        return got

    @rule(And, Or)
    def junction(self, n, atom, value, memo):
        if type(atom) is type(n) and set(atom.args) <= set(n.args):
            rest = [self(a, atom, value, memo) for a in n.args if a not in atom.args]
            return (B.or_ if isinstance(n, Or) else B.and_)(*rest, B.boolean(value))
        return self.node(n, atom, value, memo)

    @rule(default=True)
    def node(self, n, atom, value, memo):
        from .intervals import rebuild
        kids = n.children()
        new = [self(c, atom, value, memo) for c in kids]
        return n if all(a is b for a, b in zip(new, kids)) else rebuild(n, new)


_decide = _Decide()


def decide(ir: Node, atom: Node, value: bool) -> Node:
    """``ir`` with the class condition ``atom`` replaced by ``value``: where it occurs, and,
    for a junction of arguments of a wider ``|`` or ``&`` (:func:`class_atoms`), in place
    of those arguments."""
    return _decide(ir, atom, value, {})


def head_order(ir: Node, atom: Node, N: int, H: int, inputs: Optional[dict] = None
               ) -> HeadOrder:
    """``ir`` read through the per-head key order of ``atom``'s classes at ``N`` keys and
    ``H`` heads (module docstring): the pattern over slots, without its costs.
    ``inputs``: the pattern's runtime inputs and their index dimensions (an input indexed
    by ``k`` is then indexed by ``kpos[k]``; the order's inputs take names past theirs)."""
    from .layout import _simplify
    counts = tuple(int(c) for c in class_mask(atom, N, H).sum(-1).tolist())
    k = B.var("k")
    inputs = dict(inputs or {})
    prefix = ""
    while any(prefix + n in inputs for n in (KPOS, KCLASS)):
        prefix += "_"
    names = (prefix + KPOS, prefix + KCLASS)
    pos = B.load(names[0], (k,))
    cases = []
    n = B.load(names[1], (B.var("h"),))
    for value, side in ((True, B.cmp("<", k, n)), (False, B.cmp(">=", k, n))):
        body = _simplify(decide(ir, atom, value), {}, {"k": pos})
        cases.append(B.and_(side, body))
    return HeadOrder(atom, counts, B.or_(*cases), names, tuple(sorted(inputs.items())))


def tables(h: HeadOrder, N: int, device=None, order: Optional[torch.Tensor] = None
           ) -> dict[str, torch.Tensor]:
    """The order's inputs of the inner pattern: ``{kpos: int64 [1, H, N], kclass: int64
    [H]}`` (named ``h.names``; ``order``: :meth:`HeadOrder.order`, when already
    computed)."""
    order = h.order(N, device) if order is None else order
    return {h.names[0]: order[None],
            h.names[1]: torch.tensor(h.counts, dtype=torch.int64, device=order.device)}


def pattern_of(h: HeadOrder, name: str = "pattern"):
    """A :class:`~spattn.ir.pattern.CompiledPattern` of the pattern over slots."""
    from .pattern import CompiledPattern
    return CompiledPattern(h.ir, name=name, inputs=declared_inputs(h))


def declared_inputs(h: HeadOrder) -> dict[str, int]:
    """The inner pattern's runtime inputs and their index dimensions: the pattern's own,
    then the order's."""
    return {**dict(h.inputs), h.names[0]: 1, h.names[1]: 1}


def per_head_pairs(pattern, Lq: int, Lk: int, H: int, block_m: int, block_n: int, *,
                   q_offset: int = 0, inputs=None, rows=None, batch: int = 1) -> int:
    """Computed pairs summed over ``H`` heads (every non-EMPTY tile counted whole) on the
    query-tile ``rows`` (every row when None), scaled up to all rows; averaged over
    ``batch`` elements (inputs with a batch dimension)."""
    from .tiles import EMPTY, classify
    nq = -(-Lq // block_m)
    t = classify(pattern, Lq, Lk, block_m, block_n, num_heads=H, q_offset=q_offset,
                 inputs=inputs, rows=rows, batch=batch)
    live = int((t != EMPTY).sum())
    return live * block_m * block_n * nq // (len(rows) if rows is not None else nq) // batch


def choose_head_order(ir: Node, Lq: int, H: int, *, Lk: Optional[int] = None,
                      q_offset: int = 0, block_m: int = 128, block_n: int = 64,
                      force: bool = False, target: str = "cuda",
                      sequence: Optional[int] = None, inputs: Optional[dict] = None,
                      declared: Optional[dict] = None, batch: int = 1
                      ) -> Optional[HeadOrder]:
    """The per-head key order of ``ir`` for a call of ``Lq`` queries (the first at position
    ``q_offset``) against ``Lk`` keys (default ``Lq``) and ``H`` query heads, or None (no
    class atom; every class empty or every key in its class; or, unless ``force``, not
    paying by ``ir.layout.MARGIN``). Each candidate atom is priced by computed pairs per
    head on sampled query-tile rows (``ir.layout.sampled_rows``), the best against
    sequence order's pairs with :func:`~spattn.ir.layout.layout_cost` (the order's tiles
    run the table strategy) plus ``gather_token`` per key for k and v
    (:data:`GATHERED_TENSORS` of 5). ``sequence``: sequence order's computed pairs summed
    over the heads when known (else sampled). Queries keep their positions, so any
    ``Lq``, ``Lk`` and ``q_offset`` work. ``inputs``: the pattern's runtime inputs
    (int64 tensors, ``batch`` elements where they have a batch dimension), ``declared``
    their index dimensions."""
    from .cost import COSTS, pick_strategy
    from .layout import SAMPLED_ROWS, layout_cost, sampled_rows
    from .pattern import CompiledPattern
    Lk = Lq if Lk is None else Lk
    inputs, declared = dict(inputs or {}), dict(declared or {})
    dev = next(iter(inputs.values())).device if inputs else None
    if H < 2 or "h" not in free_vars(ir):
        return None
    nq = -(-Lq // block_m)
    rows = sampled_rows(nq) if nq > SAMPLED_ROWS else None
    best = None
    for atom in class_atoms(ir):
        ho = head_order(ir, atom, Lk, H, declared)
        if all(c in (0, Lk) for c in ho.counts):
            continue            # no head splits its keys: the order is sequence order
        pairs = per_head_pairs(pattern_of(ho), Lq, Lk, H, block_m, block_n,
                               q_offset=q_offset, inputs={**inputs, **tables(ho, Lk, dev)},
                               rows=rows, batch=batch)
        if best is None or pairs < best[0]:
            best = (pairs, ho)
    if best is None:
        return None
    pairs, ho = best
    seq = sequence if sequence is not None else per_head_pairs(
        CompiledPattern(ir, inputs=declared), Lq, Lk, H, block_m, block_n,
        q_offset=q_offset, inputs=inputs, rows=rows, batch=batch)
    strategy = pick_strategy(ir) == "table"
    cost_seq = H * layout_cost(seq / H, Lq, block_m, block_n, table=strategy, gathers=False,
                               target=target)
    cost_ord = H * (layout_cost(pairs / H, Lq, block_m, block_n,
                                table=pick_strategy(ho.ir) == "table", gathers=False,
                                target=target)
                    + Lk * COSTS[target].get("gather_token", 0.0) * GATHERED_TENSORS / 5)
    ho = _dc_replace(ho, computed_sequence=seq, computed_order=pairs,
                     cost_sequence=cost_seq, cost_order=cost_ord)
    return ho if force or ho.pays else None
