"""Syntax tree of the pattern language.

Frozen dataclasses. Every node carries the ``line`` and ``column`` (1-based) of
its first character; positions do not take part in ``==`` or ``hash``, so two
trees written differently but with the same structure compare equal.

The parser (:mod:`spattn.dsl.parser`) produces the *surface* nodes; name
resolution (:mod:`spattn.dsl.resolve`) rewrites names into the *resolved*
nodes at the end of this module (``VarRef``, ``InputRef``, ``ListValue``,
``Builtin``, ``Free``), inlining every macro call, so that the lowering to IR
sees no names at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


def _pos():
    return field(default=0, compare=False, repr=False)


class Expr:
    """Base of every expression node."""
    __slots__ = ()
    line: int
    column: int


# ------------------------------------------------------------ surface nodes

@dataclass(frozen=True)
class Int(Expr):
    value: int
    line: int = _pos()
    column: int = _pos()


@dataclass(frozen=True)
class Float(Expr):
    """A float literal (scores only)."""
    value: float
    line: int = _pos()
    column: int = _pos()


@dataclass(frozen=True)
class Scored(Expr):
    """A bare pattern with its score: ``mask score score``."""
    mask: Expr
    score: Expr
    line: int = _pos()
    column: int = _pos()


@dataclass(frozen=True)
class Bool(Expr):
    value: bool
    line: int = _pos()
    column: int = _pos()


@dataclass(frozen=True)
class Name(Expr):
    id: str
    line: int = _pos()
    column: int = _pos()


@dataclass(frozen=True)
class ListLit(Expr):
    """``[a, b, ...]``: usable only when indexed (``[8, 16][h]``)."""
    items: tuple[Expr, ...]
    line: int = _pos()
    column: int = _pos()


@dataclass(frozen=True)
class Index(Expr):
    """``base[i, j, ...]``."""
    base: Expr
    indices: tuple[Expr, ...]
    line: int = _pos()
    column: int = _pos()


@dataclass(frozen=True)
class Call(Expr):
    """``func(args)``; ``func`` is a name (macro, prelude entry or builtin)."""
    func: str
    args: tuple[Expr, ...]
    line: int = _pos()
    column: int = _pos()


@dataclass(frozen=True)
class Unary(Expr):
    """``-x`` (op ``'-'``) or ``~x`` / ``not x`` (op ``'~'``)."""
    op: str
    operand: Expr
    line: int = _pos()
    column: int = _pos()


@dataclass(frozen=True)
class Binary(Expr):
    """``left op right`` with op in ``+ - * // % & |`` (``and``/``or`` become ``&``/``|``)."""
    op: str
    left: Expr
    right: Expr
    line: int = _pos()
    column: int = _pos()
    op_line: int = _pos()
    op_column: int = _pos()


@dataclass(frozen=True)
class Compare(Expr):
    """A (possibly chained) comparison: ``operands[0] ops[0] operands[1] ops[1] ...``."""
    ops: tuple[str, ...]
    operands: tuple[Expr, ...]
    line: int = _pos()
    column: int = _pos()


@dataclass(frozen=True)
class If(Expr):
    """``if cond then then else else_``."""
    cond: Expr
    then: Expr
    else_: Expr
    line: int = _pos()
    column: int = _pos()


# --------------------------------------------------------------- statements

class Stmt:
    __slots__ = ()
    name: str
    line: int
    column: int


@dataclass(frozen=True)
class ParamDecl(Stmt):
    """``param NAME [= NUMBER | [NUMBER, ...]]``; ``default`` is None when there is none
    (numbers are ints, or floats for a score's params)."""
    name: str
    default: Union[int, float, tuple, None]
    line: int = _pos()
    column: int = _pos()


@dataclass(frozen=True)
class InputDecl(Stmt):
    """``input NAME``: a runtime tensor passed at call time."""
    name: str
    line: int = _pos()
    column: int = _pos()


@dataclass(frozen=True)
class Def(Stmt):
    """``def NAME(params) = body`` or zero-argument ``def NAME = body``: an inlined macro."""
    name: str
    params: tuple[str, ...]
    body: Expr
    line: int = _pos()
    column: int = _pos()


@dataclass(frozen=True)
class PatternDef(Stmt):
    """``pattern NAME = expr [score expr]``."""
    name: str
    expr: Expr
    line: int = _pos()
    column: int = _pos()
    score: Optional[Expr] = None


@dataclass(frozen=True)
class GridAxis:
    """One axis of a grid declaration: its name (or None) and its size (a constant
    expression: an int, a param, arithmetic of them)."""
    name: Optional[str]
    size: Expr
    line: int = _pos()
    column: int = _pos()


@dataclass(frozen=True)
class GridDecl(Stmt):
    """``grid (y: 48, x: 80)``: the token layout of every pattern of the program (or of a
    bare pattern), 1-4 axes row-major; each named axis is a coordinate function."""
    axes: tuple[GridAxis, ...]
    name: str = "grid"
    line: int = _pos()
    column: int = _pos()
    extra: Optional[Expr] = None       # ``after T``: tokens before the grid
    tail: Optional[Expr] = None        # ``before U``: tokens after the grid


@dataclass(frozen=True)
class Gridded(Expr):
    """A bare pattern with its grid declaration: ``grid (...) expr``."""
    grid: GridDecl
    expr: Expr
    line: int = _pos()
    column: int = _pos()


@dataclass(frozen=True)
class Program:
    statements: tuple[Stmt, ...]
    source: str = field(default="", compare=False, repr=False)
    filename: Optional[str] = field(default=None, compare=False, repr=False)


# ------------------------------------------------------------ resolved nodes
# Produced by name resolution; they never come out of the parser.

@dataclass(frozen=True)
class VarRef(Expr):
    """A built-in variable: q, k, h, b, Lq, Lk, H."""
    name: str
    line: int = _pos()
    column: int = _pos()


@dataclass(frozen=True)
class InputRef(Expr):
    """A runtime input (only meaningful as the base of an :class:`Index`)."""
    name: str
    line: int = _pos()
    column: int = _pos()


@dataclass(frozen=True)
class ListValue(Expr):
    """A bound list param (only meaningful as the base of an :class:`Index`)."""
    values: tuple[int, ...]
    name: str
    line: int = _pos()
    column: int = _pos()


@dataclass(frozen=True)
class Builtin(Expr):
    """A call of a builtin: abs, min, max, clamp, is_pow2."""
    func: str
    args: tuple[Expr, ...]
    line: int = _pos()
    column: int = _pos()


@dataclass(frozen=True)
class ScoreRef(Expr):
    """The score variable ``s`` (meaningful in a score only)."""
    line: int = _pos()
    column: int = _pos()


@dataclass(frozen=True)
class Free(Expr):
    """A free name of a bare expression, not yet known to be an input (resolution-internal)."""
    name: str
    line: int = _pos()
    column: int = _pos()


def children(node: Expr) -> tuple[Expr, ...]:
    """The direct sub-expressions of ``node``."""
    if isinstance(node, ListLit):
        return node.items
    if isinstance(node, Index):
        return (node.base,) + node.indices
    if isinstance(node, (Call, Builtin)):
        return node.args
    if isinstance(node, Unary):
        return (node.operand,)
    if isinstance(node, Binary):
        return (node.left, node.right)
    if isinstance(node, Compare):
        return node.operands
    if isinstance(node, If):
        return (node.cond, node.then, node.else_)
    if isinstance(node, Scored):
        return (node.mask, node.score)
    return ()


def walk(node: Expr):
    """Every node of the tree, parents first."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(reversed(children(n)))
