"""Canonicalising constructors: the only way to build IR.

Each function returns a canonical node, folding constants and normalising
operand order, so structurally equal results mean equal patterns:
``and_(causal, window) == and_(window, causal)``. Affine arithmetic is kept as
a linear form (:class:`Sum`); products of non-constant terms are expanded into
sums of sorted monomials (:class:`Prod`), so ``(q + 1) * (k + 1)`` and
``q*k + q + k + 1`` agree.

Errors raised here (division by zero, a divisor that depends on q) carry no
position; the lowering in :mod:`spattn.ir.lower` attaches one.
"""
from __future__ import annotations

import math
from functools import reduce
from typing import Iterable, Optional

from ..dsl.errors import SpattnTypeError, SpattnValueError
from .nodes import (BOOL, FLOAT, FLOAT_FUNCS, INT, Abs, And, BoolConst, Const, FAdd, FCall,
                    FConst, FDiv, FLoad, FloorDiv, FMul, FSelect, FTable, IsPow2, Load, Max,
                    Min, Mod, Node, Not, Or, Prod, Range, Score, Select, Sum, Table, ToFloat,
                    Var, sort_key, walk)

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
        names = {INT: "an int", BOOL: "a bool", FLOAT: "a float"}
        raise SpattnTypeError(f"{what} must be {names[ty]}, got {names[node.type]}")


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


#: The most monomials a product of non-constant factors may expand to. Each one is a
#: term the analysis bounds and the kernel evaluates; a product of n binomials has 2**n.
MAX_PRODUCT_TERMS = 256


def mul(a: Node, b: Node) -> Node:
    _need(a, INT, "an operand of *")
    _need(b, INT, "an operand of *")
    if isinstance(a, Const):
        return scale(b, a.value)
    if isinstance(b, Const):
        return scale(a, b.value)
    # Two non-constant factors: the product of two polynomials in the atoms, each monomial
    # a sorted Prod, so (q + 1) * (k + 1) and q*k + q + k + 1 build the same Sum.
    ta, ca = linear(a)
    tb, cb = linear(b)
    mono_a = list(ta.items()) + ([(None, ca)] if ca else [])
    mono_b = list(tb.items()) + ([(None, cb)] if cb else [])
    if len(mono_a) * len(mono_b) > MAX_PRODUCT_TERMS:
        raise SpattnValueError(
            f"this product expands to up to {len(mono_a) * len(mono_b)} terms (a sum of "
            f"{len(mono_a)} times a sum of {len(mono_b)}), more than {MAX_PRODUCT_TERMS}: "
            f"every term is bounded by the analysis and computed by the kernel; compare "
            f"fewer factors, or compare each factor's sign instead of the product's")
    terms: dict[Node, int] = {}
    c = 0
    for x, u in mono_a:
        for y, v in mono_b:
            if x is None and y is None:
                c += u * v
                continue
            atom = _prod_of([f for f in (x, y) if f is not None])
            terms[atom] = terms.get(atom, 0) + u * v
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


def _list_index(vals: tuple, index: Node, name: str) -> None:
    """Check a list literal and its index (an int; a constant index within the list)."""
    _need(index, INT, f"the index of {name}")
    if not vals:
        raise SpattnValueError(f"{name} is empty and cannot be indexed")
    if isinstance(index, Const) and not 0 <= index.value < len(vals):
        raise SpattnValueError(f"index {index.value} is out of range for {name} "
                               f"of {len(vals)} entries")


def _within(index: Node, n: int) -> bool:
    """Whether ``index`` lies in ``[0, n)`` for every q, k, h, ...: only then does a list of
    equal entries fold to its entry (``spans[h]`` keeps its check against the heads)."""
    lo, hi = _static_bounds(index)
    return lo is not None and hi is not None and 0 <= lo and hi < n


def table(values: Iterable[int], index: Node, name: str = "list") -> Node:
    vals = tuple(int(v) for v in values)
    _list_index(vals, index, name)
    if isinstance(index, Const):
        return Const(vals[index.value])
    if len(set(vals)) == 1 and _within(index, len(vals)):
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


# ------------------------------------------------------------------ floats
# The score language (docs/language.md §13): constructors of the float nodes. Ints are
# promoted where a float is expected (``to_float``); bools never are.

def _tname(t: str) -> str:
    return {INT: "an int", BOOL: "a bool", FLOAT: "a float"}[t]


def fconst(value: float) -> FConst:
    v = float(value)
    if not math.isfinite(v):
        raise SpattnValueError(f"float constants must be finite, got {value!r}")
    return FConst(v + 0.0)          # -0.0 -> 0.0: one constant per value


SCORE = Score()


def to_float(x: Node) -> Node:
    """``x`` as a float (an int is converted; a float is returned as it is)."""
    if x.type == FLOAT:
        return x
    if x.type != INT:
        raise SpattnTypeError(f"expected a number (int or float), got {_tname(x.type)}")
    if isinstance(x, Const):
        return fconst(x.value)
    return ToFloat(x)


def _fops(xs, what: str) -> list[Node]:
    return [to_float(x) if x.type == INT else _fneed(x, what) for x in xs]


def _fneed(x: Node, what: str) -> Node:
    if x.type != FLOAT:
        raise SpattnTypeError(f"{what} must be a number, got {_tname(x.type)}")
    return x


def _fassoc(kind, xs, what: str, fold, neutral: float) -> Node:
    flat: list[Node] = []
    for x in _fops(xs, what):
        flat.extend(x.args if isinstance(x, kind) else (x,))
    c = neutral
    rest = []
    ints = []
    for x in flat:
        if isinstance(x, FConst):
            c = fold(c, x.value)
        elif isinstance(x, ToFloat):
            ints.append(x.a)
        else:
            rest.append(x)
    if ints:
        # int operands combine exactly as ints: one ToFloat per sum or product
        whole = add(*ints) if kind is FAdd else reduce(mul, ints)
        if kind is FMul and c != neutral and c == int(c) and abs(c) < 2 ** 53:
            whole, c = scale(whole, int(c)), neutral
        rest.append(to_float(whole))
        if isinstance(rest[-1], FConst):
            c = fold(c, rest.pop().value)
    rest.sort(key=sort_key)
    if c != neutral or not rest:
        rest.append(fconst(c))
    if len(rest) == 1:
        return rest[0]
    return kind(tuple(rest))


def fadd(*xs: Node) -> Node:
    return _fassoc(FAdd, xs, "an operand of +", lambda a, b: a + b, 0.0)


def fmul(*xs: Node) -> Node:
    return _fassoc(FMul, xs, "an operand of *", lambda a, b: a * b, 1.0)


def fneg(x: Node) -> Node:
    return fmul(x, fconst(-1.0))


def fsub(a: Node, b: Node) -> Node:
    return fadd(a, fneg(to_float(b) if b.type == INT else _fneed(b, "an operand of -")))


def fdiv(a: Node, b: Node) -> Node:
    a, b = _fops((a, b), "an operand of /")
    if isinstance(b, FConst):
        if b.value == 0.0:
            raise SpattnValueError("float division by zero")
        if b.value == 1.0:
            return a
        if isinstance(a, FConst):
            return fconst(a.value / b.value)
    return FDiv(a, b)


_FOLD = {"tanh": math.tanh, "exp": math.exp, "abs": abs,
         "sign": lambda v: float((v > 0) - (v < 0)),
         "step": lambda v: 1.0 if v > 0 else 0.0 if v < 0 else 0.5}


def fcall(fn: str, *xs: Node) -> Node:
    """``fn(*xs)`` for ``fn`` in :data:`~spattn.ir.nodes.FLOAT_FUNCS`."""
    if fn not in FLOAT_FUNCS:
        raise SpattnTypeError(f"unknown float function {fn!r}")
    args = _fops(xs, f"an argument of {fn}")
    want = FLOAT_FUNCS[fn]
    if want is None:
        if len(args) < 2:
            raise SpattnTypeError(f"{fn} takes at least 2 arguments, got {len(args)}")
        flat: list[Node] = []
        for x in args:
            flat.extend(x.args if isinstance(x, FCall) and x.fn == fn else (x,))
        consts = [x.value for x in flat if isinstance(x, FConst)]
        rest = sorted(set(x for x in flat if not isinstance(x, FConst)), key=sort_key)
        if not consts and all(isinstance(x, ToFloat) for x in rest):
            # the min/max of ints is an int: exact, converted once
            return to_float((min_ if fn == "min" else max_)(*(x.a for x in rest)))
        if consts:
            rest.append(fconst((min if fn == "min" else max)(consts)))
        return rest[0] if len(rest) == 1 else FCall(fn, tuple(rest))
    if len(args) != want:
        raise SpattnTypeError(f"{fn} takes {want} argument, got {len(args)}")
    (a,) = args
    if isinstance(a, FConst):
        v = a.value
        if fn in _FOLD:
            try:
                return fconst(_FOLD[fn](v))
            except OverflowError:
                raise SpattnValueError(f"{fn}({v!r}) overflows a float") from None
        if fn == "log" and v > 0:
            return fconst(math.log(v))
        if fn == "sqrt" and v >= 0:
            return fconst(math.sqrt(v))
        raise SpattnValueError(f"{fn}({v!r}) is not a number")
    if fn == "abs" and isinstance(a, FCall) and a.fn == "abs":
        return a
    if fn == "abs" and isinstance(a, ToFloat):
        return to_float(abs_(a.a))
    return FCall(fn, (a,))


def fselect(cond: Node, a: Node, b: Node) -> Node:
    _need(cond, BOOL, "the condition of if")
    a, b = _fops((a, b), "a branch of if-then-else")
    if isinstance(cond, BoolConst):
        return a if cond.value else b
    if a == b:
        return a
    if isinstance(a, ToFloat) and isinstance(b, ToFloat):
        return to_float(select(cond, a.a, b.a))        # an int if, converted once
    return FSelect(cond, a, b)


def ftable(values: Iterable[float], index: Node, name: str = "list") -> Node:
    vals = tuple(float(v) + 0.0 for v in values)
    _list_index(vals, index, name)
    if not all(math.isfinite(v) for v in vals):
        raise SpattnValueError(f"{name} holds a value that is not finite")
    if isinstance(index, Const):
        return fconst(vals[index.value])
    if len(set(vals)) == 1 and _within(index, len(vals)):
        return fconst(vals[0])
    return FTable(vals, index)


def fload(name: str, index: Iterable[Node]) -> FLoad:
    idx = tuple(index)
    for i in idx:
        _need(i, INT, f"an index of input {name!r}")
    return FLoad(name, idx)


# -------------------------------------------------------- T5 log buckets

def log_bucket_thresholds(exact: int, max_distance: int, buckets: int) -> tuple[int, ...]:
    """The distances at which :func:`log_bucket` steps up beyond ``exact``.

    T5's bucket of a distance ``n >= exact`` is ``exact + floor(log(n / exact) /
    log(max_distance / exact) * (buckets - exact))``, at most ``buckets - 1`` (Raffel et
    al. 2020, as in Mesh TensorFlow and transformers). It is a step function of ``n``:
    threshold ``j`` is the least ``n`` whose bucket (computed in float64) is
    ``>= exact + j``, for ``j = 1 .. buckets - exact - 1``. Integers from here on, so the
    reference and every kernel agree exactly.
    """
    span = buckets - exact
    denom = math.log(max_distance / exact)

    def bucket(n: int) -> int:
        return exact + int(math.log(n / exact) / denom * span)

    out = []
    for j in range(1, span):
        # the least n with bucket(n) >= exact + j, by bisection around the float guess
        # (bucket is monotone; a float guess of a huge threshold is off by its ulp, too many
        # integers to step through one by one)
        guess = max(exact + 1, math.ceil(exact * (max_distance / exact) ** (j / span)))
        lo, hi = exact, guess                   # bucket(lo) < exact + j <= bucket(hi)
        while bucket(hi) < exact + j:
            lo, hi = hi, 2 * hi
        if bucket(hi - 1) >= exact + j:         # the guess is high: bisect below it
            step = 1
            while hi - step > lo and bucket(hi - step) >= exact + j:
                hi, step = hi - step, 2 * step
            lo = max(lo, hi - step)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if bucket(mid) >= exact + j:
                hi = mid
            else:
                lo = mid
        out.append(hi)
    return tuple(out)


def log_bucket(n: Node, exact: Node, max_distance: Node, buckets: Node) -> Node:
    """T5's logarithmic bucket of a distance ``n`` (an int expression) as integer IR:
    ``min(max(n, 0), exact) + sum(n >= t for t in thresholds)``, the thresholds of
    :func:`log_bucket_thresholds`. Values ``0 .. buckets - 1``."""
    _need(n, INT, "the distance of log_bucket")
    consts = []
    for x, what in ((exact, "exact"), (max_distance, "max_distance"), (buckets, "buckets")):
        if not isinstance(x, Const):
            raise SpattnTypeError(f"the {what} argument of log_bucket must be a constant int")
        consts.append(x.value)
    e, md, nb = consts
    if not (1 <= e < nb and md > e) or nb > 4096:
        raise SpattnValueError(f"log_bucket(n, exact={e}, max_distance={md}, buckets={nb}) "
                               "needs 1 <= exact < buckets <= 4096 and max_distance > exact")
    parts = [min_(max_(n, const(0)), const(e))]
    for t in log_bucket_thresholds(e, md, nb):
        parts.append(select(range_(n, t, None), const(1), const(0)))
    return add(*parts)
