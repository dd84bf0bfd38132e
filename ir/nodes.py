"""IR node types.

Frozen, slotted dataclasses (:func:`node`) with structural equality and a structural hash
computed once per node. Nodes are *data*: a pattern is a tree of these, never a closure.
Build them only through the canonicalising constructors of :mod:`spattn.ir.build`, so that
equal patterns are equal trees (and hash equal) however they were written.

Types: every node is ``int``, ``bool`` or ``float`` (:attr:`Node.type`). Float nodes only
occur in a pattern's *score* (the score modification, ``docs/language.md`` §13): a mask is
a bool expression of int nodes, and every analysis pass refuses float nodes.

Canonical invariants (kept by ``ir.build``):

* ``Sum`` has at least one term, no zero coefficient, terms sorted by
  :func:`sort_key`, and is never a lone atom with coefficient 1 and const 0.
* ``Range(x, lo, hi)`` means ``lo <= x <= hi`` (``None`` = unbounded); ``x`` has
  no constant part, its first coefficient is positive and its coefficients are
  coprime; at least one bound is set; a constant ``x`` is folded away.
* ``And``/``Or`` are flat, deduplicated, sorted, have >= 2 operands and merge
  ``Range`` atoms over the same ``x``.
* bool ``if``-``then``-``else`` is desugared into ``&``/``|``; ``Select`` is int.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

INT = "int"
BOOL = "bool"
FLOAT = "float"

#: Built-in variables, in their canonical order.
VARIABLES = ("q", "k", "h", "b", "Lq", "Lk", "H")


class Node:
    """Base of every IR node.

    A node's structural hash is computed once, when it is built (its children's are
    already known), and kept in the ``_hash`` slot: a pass keys dicts and sets by whole
    subtrees, and a hash recomputed per lookup walked the subtree every time. Its ``repr``
    (the canonical order's key, :func:`sort_key`: the constructors sort operands at every
    rebuild of a parent) is kept in ``_repr`` once asked for, built from the children's
    kept ones. The slots are not dataclass fields: they are outside equality, ``repr``,
    ``dataclasses.fields`` and the pickled state (string hashes differ between processes:
    an unpickled node hashes again).
    """

    __slots__ = ("_hash", "_repr")
    type: str = INT

    def __post_init__(self):
        object.__setattr__(self, "_hash", self._fields_hash())

    def _fields_hash(self) -> int:   # replaced by each node class's dataclass hash
        raise NotImplementedError

    def __hash__(self) -> int:
        return self._hash

    def children(self) -> tuple["Node", ...]:
        return ()

    def __str__(self) -> str:  # pragma: no cover - convenience
        from .printer import to_source
        return to_source(self)


def node(cls):
    """Make ``cls`` an IR node type: a frozen, slotted dataclass whose hash (of its fields,
    as the dataclass computes it) is cached in ``_hash`` and its ``repr`` in ``_repr``
    (:class:`Node`); equality compares the cached hashes before the fields, and pickling
    and copying carry the fields only."""
    if "__post_init__" in vars(cls):
        raise TypeError(f"IR node {cls.__name__} must not define __post_init__ (Node's "
                        "fills the cached hash)")
    cls = dataclass(frozen=True, slots=True)(cls)
    names = tuple(f.name for f in fields(cls))
    fields_eq = cls.__eq__
    fields_repr = cls.__repr__
    cls._fields_hash = cls.__hash__
    cls.__hash__ = Node.__hash__

    def __repr__(self):
        try:
            return self._repr
        except AttributeError:
            text = fields_repr(self)
            object.__setattr__(self, "_repr", text)
            return text

    def __eq__(self, other):
        if self is other:
            return True
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._hash == other._hash and fields_eq(self, other)

    def __getstate__(self):
        return tuple(getattr(self, n) for n in names)

    def __setstate__(self, state):
        for n, v in zip(names, state):
            object.__setattr__(self, n, v)
        Node.__post_init__(self)

    def __reduce__(self):
        # rebuilt by the constructor (hash filled), whatever the protocol; a node without
        # fields has an empty state, for which pickle would not call __setstate__
        return cls, self.__getstate__()

    for f in (__eq__, __repr__, __getstate__, __setstate__, __reduce__):
        f.__qualname__ = f"{cls.__qualname__}.{f.__name__}"
        setattr(cls, f.__name__, f)
    return cls


# ---------------------------------------------------------------- int nodes

@node
class Const(Node):
    """An integer literal."""
    value: int
    type = INT


@node
class Var(Node):
    """A built-in variable: one of :data:`VARIABLES`."""
    name: str
    type = INT


@node
class Sum(Node):
    """``const + sum(coeff * atom)``: an affine combination of atoms."""
    terms: tuple[tuple[Node, int], ...]
    const: int = 0
    type = INT

    def children(self):
        return tuple(t for t, _ in self.terms)


@node
class Prod(Node):
    """Product of two or more non-constant atoms (sorted)."""
    factors: tuple[Node, ...]
    type = INT

    def children(self):
        return self.factors


@node
class FloorDiv(Node):
    """``a // b`` with Python floor semantics; ``b`` never depends on q, k or inputs."""
    a: Node
    b: Node
    type = INT

    def children(self):
        return (self.a, self.b)


@node
class Mod(Node):
    """``a % b`` with Python semantics (sign of ``b``); ``b`` never depends on q, k or inputs."""
    a: Node
    b: Node
    type = INT

    def children(self):
        return (self.a, self.b)


@node
class Abs(Node):
    a: Node
    type = INT

    def children(self):
        return (self.a,)


@node
class Min(Node):
    args: tuple[Node, ...]
    type = INT

    def children(self):
        return self.args


@node
class Max(Node):
    args: tuple[Node, ...]
    type = INT

    def children(self):
        return self.args


@node
class Select(Node):
    """Integer ``if cond then a else b``."""
    cond: Node
    a: Node
    b: Node
    type = INT

    def children(self):
        return (self.cond, self.a, self.b)


@node
class Table(Node):
    """A constant list (a list param) indexed by an int expression: ``[8, 16][h]``."""
    values: tuple[int, ...]
    index: Node
    type = INT

    def children(self):
        return (self.index,)


@node
class Load(Node):
    """An element of a runtime input tensor: ``doc[q]``, ``blocks[q // 64, k // 64]``."""
    name: str
    index: tuple[Node, ...]
    type = INT

    def children(self):
        return self.index


# --------------------------------------------------------------- bool nodes

@node
class BoolConst(Node):
    value: bool
    type = BOOL


@node
class Range(Node):
    """``lo <= x <= hi`` (either bound may be ``None``): every comparison becomes one."""
    x: Node
    lo: Optional[int]
    hi: Optional[int]
    type = BOOL

    def children(self):
        return (self.x,)


@node
class IsPow2(Node):
    """``x > 0`` and ``x`` is a power of two."""
    a: Node
    type = BOOL

    def children(self):
        return (self.a,)


@node
class Not(Node):
    a: Node
    type = BOOL

    def children(self):
        return (self.a,)


@node
class And(Node):
    args: tuple[Node, ...]
    type = BOOL

    def children(self):
        return self.args


@node
class Or(Node):
    args: tuple[Node, ...]
    type = BOOL

    def children(self):
        return self.args


# -------------------------------------------------------------- float nodes
# The score language (docs/language.md §13). Canonical invariants (kept by ``ir.build``):
# ``FAdd``/``FMul`` are flat, have >= 2 operands, sorted by :func:`sort_key` with at most
# one constant, last (never 0.0 in a sum, never 1.0 in a product; constants are folded
# in float64); ``FCall`` of min/max is flat, deduplicated and sorted; ``x / c`` stays a
# division (``1 / c`` is not exact); ``FSelect`` has a non-constant condition.


@node
class FConst(Node):
    """A float literal (or a float param)."""
    value: float
    type = FLOAT


@node
class Score(Node):
    """The score variable ``s``: the scaled score ``q·k * scale`` of the pair."""
    type = FLOAT


@node
class ToFloat(Node):
    """An int expression used as a float (``s - 0.5 * (q - k)``)."""
    a: Node
    type = FLOAT

    def children(self):
        return (self.a,)


@node
class FAdd(Node):
    """Sum of two or more float operands (sorted; a constant last)."""
    args: tuple[Node, ...]
    type = FLOAT

    def children(self):
        return self.args


@node
class FMul(Node):
    """Product of two or more float operands (sorted; a constant last)."""
    args: tuple[Node, ...]
    type = FLOAT

    def children(self):
        return self.args


@node
class FDiv(Node):
    """``a / b``."""
    a: Node
    b: Node
    type = FLOAT

    def children(self):
        return (self.a, self.b)


#: Functions of :class:`FCall`: name -> number of arguments (None: two or more).
FLOAT_FUNCS = {"tanh": 1, "exp": 1, "log": 1, "sqrt": 1, "abs": 1, "sign": 1, "step": 1,
               "min": None, "max": None}


@node
class FCall(Node):
    """A float function of :data:`FLOAT_FUNCS`. ``sign`` and ``step`` (0 below 0, 1/2 at
    0, 1 above) come from derivatives (of ``abs``, ``min``, ``max``)."""
    fn: str
    args: tuple[Node, ...]
    type = FLOAT

    def children(self):
        return self.args


@node
class FSelect(Node):
    """Float ``if cond then a else b`` (``cond`` a bool of ints)."""
    cond: Node
    a: Node
    b: Node
    type = FLOAT

    def children(self):
        return (self.cond, self.a, self.b)


@node
class FTable(Node):
    """A constant float list (a float list param) indexed by an int: ``slope[h]``."""
    values: tuple[float, ...]
    index: Node
    type = FLOAT

    def children(self):
        return (self.index,)


@node
class FLoad(Node):
    """An element of a float runtime input: ``rel[h, q - k + 255]`` (a learnable bias)."""
    name: str
    index: tuple[Node, ...]
    type = FLOAT

    def children(self):
        return self.index


#: The float node types (scores only).
FLOAT_TYPES = (FConst, Score, ToFloat, FAdd, FMul, FDiv, FCall, FSelect, FTable, FLoad)

#: Every IR node type, ints, bools, then floats (passes that must handle all of them are
#: checked against this tuple: :mod:`spattn.ir.visitor`).
NODE_TYPES = (Const, Var, Sum, Prod, FloorDiv, Mod, Abs, Min, Max, Select, Table, Load,
              BoolConst, Range, IsPow2, Not, And, Or) + FLOAT_TYPES


def sort_key(node: Node) -> tuple:
    """Total order used by canonicalisation: variables in :data:`VARIABLES` order first,
    then by type name and ``repr`` (kept by the node once computed: :func:`node`)."""
    if isinstance(node, Var):
        return (0, VARIABLES.index(node.name) if node.name in VARIABLES else 99, node.name)
    return (1, type(node).__name__, repr(node))


def walk(node: Node):
    """Every node of the tree, parents before children (duplicates included)."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(reversed(n.children()))


def distinct(node: Node):
    """Every node object of the tree once (a subtree shared by several parents, as
    remapped and expanded patterns share theirs, is visited once), parents first."""
    seen: set[int] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        yield n
        stack.extend(reversed(n.children()))


def depth(node: Node) -> int:
    """The number of nodes on the longest path from ``node`` down to a leaf (a leaf: 1);
    iterative, so any depth is measured."""
    memo: dict[int, int] = {}
    stack = [(node, False)]
    while stack:
        n, ready = stack.pop()
        if id(n) in memo:
            continue
        if ready:
            memo[id(n)] = 1 + max((memo[id(c)] for c in n.children()), default=0)
        else:
            stack.append((n, True))
            stack.extend((c, False) for c in n.children() if id(c) not in memo)
    return memo[id(node)]


def free_vars(node: Node) -> frozenset[str]:
    """Names of the built-in variables the expression mentions."""
    return frozenset(n.name for n in distinct(node) if isinstance(n, Var))


def float_loads(node: Node) -> tuple[FLoad, ...]:
    """The distinct float-input loads of a score, in first-seen order."""
    seen: dict[FLoad, None] = {}
    for n in walk(node):
        if isinstance(n, FLoad):
            seen.setdefault(n, None)
    return tuple(seen)


def loads(node: Node) -> tuple[Load, ...]:
    """The distinct runtime-input loads in the expression, in first-seen order."""
    seen: dict[Load, None] = {}
    for n in walk(node):
        if isinstance(n, Load):
            seen.setdefault(n, None)
    return tuple(seen)
