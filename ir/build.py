"""Canonicalising constructors: the only way to build IR.

Each function returns a canonical node, folding constants and normalising
operand order, so structurally equal results mean equal patterns:
``and_(causal, window) == and_(window, causal)``. Affine arithmetic is kept as
a linear form (:class:`Sum`); products of non-constant terms are expanded by
sympy, so ``(q + 1) * (k + 1)`` and ``q*k + q + k + 1`` agree.

Errors raised here (division by zero, a divisor that depends on q) carry no
position; the lowering in :mod:`spattn.ir.lower` attaches one.
"""
from __future__ import annotations

import math
from functools import reduce
from typing import Iterable, Optional

import sympy

from ..dsl.errors import SpattnTypeError, SpattnValueError
from .nodes import (BOOL, INT, Abs, And, BoolConst, Const, FloorDiv, IsPow2, Load, Max, Min,
                    Mod, Node, Not, Or, Prod, Range, Select, Sum, Table, Var, sort_key, walk)

TRUE = BoolConst(True)
FALSE = BoolConst(False)


# ------------------------------------------------------------------ leaves

def const(value: int) -> Const:
    return Const(int(value))


def boolean(value: bool) -> BoolConst:
    return TRUE if value else FALSE


def var(name: str) -> Var:
    return Var(name)


def _need(node: Node, ty: str, what: str) -> None:
    if node.type != ty:
        raise SpattnTypeError(f"{what} must be {'an int' if ty == INT else 'a bool'}, "
                              f"got {'an int' if node.type == INT else 'a bool'}")


# ------------------------------------------------------------ linear forms

def linear(node: Node) -> tuple[dict[Node, int], int]:
    """``node`` as ``({atom: coeff}, const)``."""
    if isinstance(node, Const):
        return {}, node.value
    if isinstance(node, Sum):
        return dict(node.terms), node.const
    return {node: 1}, 0


def from_linear(terms: dict[Node, int], c: int = 0) -> Node:
    items = sorted(((a, v) for a, v in terms.items() if v != 0), key=lambda t: sort_key(t[0]))
    if not items:
        return Const(c)
    if len(items) == 1 and items[0][1] == 1 and c == 0:
        return items[0][0]
    return Sum(tuple(items), c)


def add(*xs: Node) -> Node:
    terms: dict[Node, int] = {}
    c = 0
    for x in xs:
        _need(x, INT, "an operand of + or -")
        t, k = linear(x)
        c += k
        for a, v in t.items():
            terms[a] = terms.get(a, 0) + v
    return from_linear(terms, c)


def scale(x: Node, factor: int) -> Node:
    t, c = linear(x)
    return from_linear({a: v * factor for a, v in t.items()}, c * factor)


def neg(x: Node) -> Node:
    _need(x, INT, "the operand of unary -")
    return scale(x, -1)


def sub(a: Node, b: Node) -> Node:
    return add(a, neg(b))


def _prod_of(factors: list[Node]) -> Node:
    flat: list[Node] = []
    for f in factors:
        flat.extend(f.factors if isinstance(f, Prod) else (f,))
    if len(flat) == 1:
        return flat[0]
    return Prod(tuple(sorted(flat, key=sort_key)))


def mul(a: Node, b: Node) -> Node:
    _need(a, INT, "an operand of *")
    _need(b, INT, "an operand of *")
    if isinstance(a, Const):
        return scale(b, a.value)
    if isinstance(b, Const):
        return scale(a, b.value)
    # Two non-constant factors: expand the polynomial in the atoms with sympy.
    atoms: dict[Node, sympy.Symbol] = {}

    def to_sym(x: Node):
        t, c = linear(x)
        expr = sympy.Integer(c)
        for atom, v in t.items():
            parts = atom.factors if isinstance(atom, Prod) else (atom,)
            mono = sympy.Integer(v)
            for p in parts:
                mono *= atoms.setdefault(p, sympy.Symbol(f"a{len(atoms)}"))
            expr += mono
        return expr

    expr = sympy.expand(to_sym(a) * to_sym(b))
    back = {s: n for n, s in atoms.items()}
    terms: dict[Node, int] = {}
    c = 0
    for mono, coeff in expr.as_coefficients_dict().items():
        if mono == 1:
            c += int(coeff)
            continue
        factors: list[Node] = []
        for base, exp in mono.as_powers_dict().items():
            factors.extend([back[base]] * int(exp))
        atom = _prod_of(factors)
        terms[atom] = terms.get(atom, 0) + int(coeff)
    return from_linear(terms, c)


def is_uniform(node: Node) -> bool:
    """True if ``node`` depends on neither q, k nor runtime inputs (one value per program)."""
    return not any(isinstance(n, Load) or (isinstance(n, Var) and n.name in ("q", "k"))
                   for n in walk(node))


def _check_divisor(b: Node, op: str) -> None:
    _need(b, INT, f"the divisor of {op}")
    if isinstance(b, Const) and b.value == 0:
        raise SpattnValueError(f"{op} by zero")
    if not is_uniform(b):
        raise SpattnTypeError(f"the divisor of {op} must not depend on q, k or runtime inputs")


def floordiv(a: Node, b: Node) -> Node:
    _need(a, INT, "the dividend of //")
    _check_divisor(b, "//")
    if isinstance(b, Const):
        if isinstance(a, Const):
            return Const(a.value // b.value)
        if b.value == 1:
            return a
        if b.value == -1:
            return neg(a)
    return FloorDiv(a, b)


def mod(a: Node, b: Node) -> Node:
    _need(a, INT, "the dividend of %")
    _check_divisor(b, "%")
    if isinstance(b, Const):
        if isinstance(a, Const):
            return Const(a.value % b.value)
        if abs(b.value) == 1:
            return Const(0)
    return Mod(a, b)


def _first_coeff_negative(x: Node) -> bool:
    t, _ = linear(x)
    if not t:
        return False
    first = min(t, key=sort_key)
    return t[first] < 0


def abs_(a: Node) -> Node:
    _need(a, INT, "the argument of abs")
    if isinstance(a, Const):
        return Const(abs(a.value))
    if _first_coeff_negative(a):
        a = neg(a)
    if isinstance(a, Abs):
        return a
    return Abs(a)


def _minmax(kind, xs: Iterable[Node], pick) -> Node:
    flat: list[Node] = []
    for x in xs:
        _need(x, INT, f"an argument of {kind.__name__.lower()}")
        flat.extend(x.args if isinstance(x, kind) else (x,))
    consts = [x.value for x in flat if isinstance(x, Const)]
    rest = sorted(set(x for x in flat if not isinstance(x, Const)), key=sort_key)
    if consts:
        rest.append(Const(pick(consts)))
    if len(rest) == 1:
        return rest[0]
    return kind(tuple(rest))


def min_(*xs: Node) -> Node:
    return _minmax(Min, xs, min)


def max_(*xs: Node) -> Node:
    return _minmax(Max, xs, max)


def clamp(x: Node, lo: Node, hi: Node) -> Node:
    return min_(max_(x, lo), hi)


def select(cond: Node, a: Node, b: Node) -> Node:
    _need(cond, BOOL, "the condition of if")
    if a.type != b.type:
        raise SpattnTypeError("the two branches of if-then-else must have the same type")
    if isinstance(cond, BoolConst):
        return a if cond.value else b
    if a == b:
        return a
    if a.type == BOOL:
        return or_(and_(cond, a), and_(not_(cond), b))
    return Select(cond, a, b)


def table(values: Iterable[int], index: Node, name: str = "list") -> Node:
    vals = tuple(int(v) for v in values)
    _need(index, INT, f"the index of {name}")
    if not vals:
        raise SpattnValueError(f"{name} is empty and cannot be indexed")
    if isinstance(index, Const):
        if not 0 <= index.value < len(vals):
            raise SpattnValueError(f"index {index.value} is out of range for {name} "
                                   f"of {len(vals)} entries")
        return Const(vals[index.value])
    if len(set(vals)) == 1:
        return Const(vals[0])
    return Table(vals, index)


def load(name: str, index: Iterable[Node]) -> Load:
    idx = tuple(index)
    for i in idx:
        _need(i, INT, f"an index of input {name!r}")
    return Load(name, idx)


# ------------------------------------------------------------------- bools

def _static_bounds(x: Node) -> tuple[Optional[int], Optional[int]]:
    """Bounds of ``x`` that hold for every q, k, h, ... (cheap, for folding)."""
    if isinstance(x, Mod) and isinstance(x.b, Const):
        c = x.b.value
        return (0, c - 1) if c > 0 else (c + 1, 0)
    if isinstance(x, Table):
        return min(x.values), max(x.values)
    if isinstance(x, Abs):
        return 0, None
    return None, None


def range_(x: Node, lo: Optional[int], hi: Optional[int]) -> Node:
    """``lo <= x <= hi`` in canonical form."""
    _need(x, INT, "a compared value")
    t, c = linear(x)
    lo = None if lo is None else lo - c
    hi = None if hi is None else hi - c
    if not t:
        return boolean((lo is None or lo <= 0) and (hi is None or 0 <= hi))
    first = min(t, key=sort_key)
    if t[first] < 0:
        t = {a: -v for a, v in t.items()}
        lo, hi = (None if hi is None else -hi), (None if lo is None else -lo)
    g = reduce(math.gcd, (abs(v) for v in t.values()))
    if g > 1:
        t = {a: v // g for a, v in t.items()}
        lo = None if lo is None else -((-lo) // g)
        hi = None if hi is None else hi // g
    x = from_linear(t, 0)
    smin, smax = _static_bounds(x)
    if smin is not None and lo is not None and lo <= smin:
        lo = None
    if smax is not None and hi is not None and hi >= smax:
        hi = None
    if (smin is not None and hi is not None and hi < smin) or \
       (smax is not None and lo is not None and lo > smax):
        return FALSE
    if lo is None and hi is None:
        return TRUE
    if lo is not None and hi is not None and lo > hi:
        return FALSE
    return Range(x, lo, hi)


_OPS = ("<", "<=", ">", ">=", "==", "!=")


def cmp(op: str, a: Node, b: Node) -> Node:
    """``a op b`` for ints; every comparison becomes a :class:`Range`."""
    if op not in _OPS:
        raise ValueError(op)
    _need(a, INT, f"an operand of {op}")
    _need(b, INT, f"an operand of {op}")
    d = sub(a, b)
    t, c = linear(d)
    x = from_linear(t, 0)
    if op == "<":
        return range_(x, None, -c - 1)
    if op == "<=":
        return range_(x, None, -c)
    if op == ">":
        return range_(x, -c + 1, None)
    if op == ">=":
        return range_(x, -c, None)
    if op == "==":
        return range_(x, -c, -c)
    return not_(range_(x, -c, -c))


def truthy(x: Node) -> Node:
    """An int used as a bool: ``x != 0``."""
    if x.type == BOOL:
        return x
    return not_(range_(x, 0, 0))


def is_pow2(x: Node) -> Node:
    _need(x, INT, "the argument of is_pow2")
    if isinstance(x, Const):
        v = x.value
        return boolean(v > 0 and v & (v - 1) == 0)
    return IsPow2(x)


def not_(a: Node) -> Node:
    _need(a, BOOL, "the operand of ~")
    if isinstance(a, BoolConst):
        return boolean(not a.value)
    if isinstance(a, Not):
        return a.a
    if isinstance(a, Range):
        if a.lo is None:
            return range_(a.x, a.hi + 1, None)
        if a.hi is None:
            return range_(a.x, None, a.lo - 1)
    return Not(a)


def _flatten(kind, xs: Iterable[Node]) -> list[Node]:
    out: list[Node] = []
    for x in xs:
        _need(x, BOOL, f"an operand of {'&' if kind is And else '|'}")
        out.extend(x.args if isinstance(x, kind) else (x,))
    return out


def _merge_ranges(args: list[Node], conj: bool) -> list[Node]:
    by_x: dict[Node, list[Range]] = {}
    rest: list[Node] = []
    for a in args:
        if isinstance(a, Range):
            by_x.setdefault(a.x, []).append(a)
        else:
            rest.append(a)
    out = rest
    for x, rs in by_x.items():
        if conj:
            los = [r.lo for r in rs if r.lo is not None]
            his = [r.hi for r in rs if r.hi is not None]
            out.append(range_(x, max(los) if los else None, min(his) if his else None))
            continue
        inf = float("inf")
        spans = sorted(((-inf if r.lo is None else r.lo), (inf if r.hi is None else r.hi))
                       for r in rs)
        merged = [list(spans[0])]
        for lo, hi in spans[1:]:
            if lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        for lo, hi in merged:
            out.append(range_(x, None if lo == -inf else int(lo), None if hi == inf else int(hi)))
    return out


def _junction(kind, xs: Iterable[Node]) -> Node:
    conj = kind is And
    absorbing, neutral = (FALSE, TRUE) if conj else (TRUE, FALSE)
    args = _flatten(kind, xs)
    args = _merge_ranges(args, conj)
    args = _flatten(kind, args)   # merged ranges may fold into constants
    if absorbing in args:
        return absorbing
    uniq = sorted(set(a for a in args if a != neutral), key=sort_key)
    members = set(uniq)
    if any(isinstance(a, Not) and a.a in members for a in uniq):
        return absorbing
    if not uniq:
        return neutral
    if len(uniq) == 1:
        return uniq[0]
    return kind(tuple(uniq))


def and_(*xs: Node) -> Node:
    return _junction(And, xs)


def or_(*xs: Node) -> Node:
    return _junction(Or, xs)
