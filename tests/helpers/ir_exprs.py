"""Hypothesis strategies of random IR expressions (built with ir.build, no parser needed).

``int_exprs()`` / ``bool_exprs()`` cover every node kind of the IR: affine sums, products,
``//`` and ``%`` by uniform divisors (constants of both signs, ``h + 1``, lists indexed by
``h``, ``Lk``), ``abs``, ``min``/``max``, ``if``, lists indexed by ``h`` or by ``x % n``,
comparisons, ``is_pow2``, ``& | ~``. Every generated expression evaluates without error for
any q, k, h < 3, b, so the reference mask is always defined. ``affine_bool_exprs()`` stays
inside the fragment for which tile classes are exact.

``consts=`` draws the constants (leaves, scale factors, list entries, constant divisors):
``small`` (-12..12) by default; :data:`wide` mixes in values up to ``+-2**62`` and some
beyond int64, for the exact-integer tests.
"""
from __future__ import annotations

from hypothesis import strategies as st

from spattn.ir import build as B

Q, K, Hv, Bv = B.var("q"), B.var("k"), B.var("h"), B.var("b")
LQ, LK, HH = B.var("Lq"), B.var("Lk"), B.var("H")

small = st.integers(-12, 12)
#: constants of the exact-integer tests: mostly small, often up to +-2**62, some beyond int64
wide = st.one_of(small, st.integers(2**31, 2**62), st.integers(-2**62, -2**31),
                 st.sampled_from([2**62, -2**62, 2**63 - 1, -2**63, 2**63, -2**63 - 1,
                                  2**64 + 1, -2**64, 10**30]))


@st.composite
def divisors(draw, consts=small):
    kind = draw(st.sampled_from(["const", "const", "neg", "h1", "table", "Lk"]))
    if kind == "const":
        return B.const(draw(st.integers(1, 9) if consts is small else
                            consts.filter(lambda v: v > 0)))
    if kind == "neg":
        return B.const(draw(st.integers(-6, -1) if consts is small else
                            consts.filter(lambda v: v < 0)))
    if kind == "h1":
        return B.add(Hv, B.const(draw(st.integers(1, 4))))
    if kind == "table":
        vals = draw(st.lists(st.integers(1, 9) | st.integers(-5, -1), min_size=3, max_size=3))
        return B.table(vals, Hv)
    return LK


@st.composite
def leaves(draw, consts=small):
    kind = draw(st.sampled_from(["q", "q", "k", "k", "h", "b", "Lq", "Lk", "H", "c"]))
    return {"q": Q, "k": K, "h": Hv, "b": Bv, "Lq": LQ, "Lk": LK, "H": HH}.get(
        kind) or B.const(draw(consts))


@st.composite
def int_exprs(draw, depth=3, consts=small):
    if depth <= 0:
        return draw(leaves(consts))
    sub = int_exprs(depth=depth - 1, consts=consts)
    kind = draw(st.sampled_from(["leaf", "add", "add", "sub", "scale", "mul", "div", "mod",
                                 "abs", "min", "max", "select", "table", "table_mod"]))
    if kind == "leaf":
        return draw(leaves(consts))
    if kind == "add":
        return B.add(draw(sub), draw(sub))
    if kind == "sub":
        return B.sub(draw(sub), draw(sub))
    if kind == "scale":
        return B.mul(B.const(draw(st.integers(-3, 3) if consts is small else consts)), draw(sub))
    if kind == "mul":
        return B.mul(draw(int_exprs(depth=0, consts=consts)), draw(int_exprs(depth=0, consts=consts)))
    if kind == "div":
        return B.floordiv(draw(sub), draw(divisors(consts)))
    if kind == "mod":
        return B.mod(draw(sub), draw(divisors(consts)))
    if kind == "abs":
        return B.abs_(draw(sub))
    if kind == "min":
        return B.min_(draw(sub), draw(sub))
    if kind == "max":
        return B.max_(draw(sub), draw(sub))
    if kind == "select":
        return B.select(draw(bool_exprs(depth=depth - 1, consts=consts)), draw(sub), draw(sub))
    if kind == "table":
        vals = draw(st.lists(consts, min_size=3, max_size=3))
        return B.table(vals, Hv)
    n = draw(st.integers(2, 5))
    vals = draw(st.lists(consts, min_size=n, max_size=n))
    return B.table(vals, B.mod(draw(sub), B.const(n)))


_OPS = ["<", "<=", ">", ">=", "==", "!="]


@st.composite
def bool_exprs(draw, depth=3, consts=small):
    kind = draw(st.sampled_from(["cmp", "cmp", "cmp", "and", "or", "not", "pow2", "const"]
                                if depth > 0 else ["cmp", "cmp", "const"]))
    if kind == "cmp":
        return B.cmp(draw(st.sampled_from(_OPS)),
                     draw(int_exprs(depth=max(depth - 1, 1), consts=consts)),
                     draw(int_exprs(depth=max(depth - 1, 0), consts=consts)))
    if kind == "const":
        return B.boolean(draw(st.booleans()))
    if kind == "pow2":
        return B.is_pow2(draw(int_exprs(depth=depth - 1, consts=consts)))
    sub = bool_exprs(depth=depth - 1, consts=consts)
    if kind == "not":
        return B.not_(draw(sub))
    if kind == "and":
        return B.and_(draw(sub), draw(sub))
    return B.or_(draw(sub), draw(sub))


# ------------------------------------------------------------------ affine fragment

def _uniform_part(draw):
    u = draw(st.sampled_from(["none", "h", "Lk", "Lq", "table"]))
    if u == "h":
        return B.mul(B.const(draw(st.integers(-3, 3))), Hv)
    if u in ("Lk", "Lq"):
        return B.neg(B.var(u))
    if u == "table":
        return B.table(draw(st.lists(small, min_size=3, max_size=3)), Hv)
    return B.const(0)


@st.composite
def directional(draw, d=None, coeffs=(1, 1, 1, 2, -1, 3)):
    """An affine form of one direction (q, k or q - k) plus uniform terms."""
    d = d or draw(st.sampled_from(["q", "k", "d"]))
    a = draw(st.sampled_from(coeffs))
    base = {"q": Q, "k": K, "d": B.sub(Q, K)}[d]
    return B.add(B.mul(B.const(a), base), _uniform_part(draw), B.const(draw(small)))


@st.composite
def affine_ints(draw, depth=2, d=None):
    """A piecewise-affine int of ONE direction (abs/min/max/clamp of affine forms)."""
    if depth <= 0:
        return draw(directional(d))
    kind = draw(st.sampled_from(["lin", "lin", "abs", "min", "max", "clamp"]))
    sub = affine_ints(depth=depth - 1, d=d)
    if kind == "lin":
        return draw(directional(d))
    if kind == "abs":
        return B.abs_(draw(sub))
    if kind == "min":
        return B.min_(draw(sub), draw(sub))
    if kind == "max":
        return B.max_(draw(sub), draw(sub))
    return B.clamp(draw(sub), B.const(draw(small)), B.const(draw(st.integers(0, 30))))


@st.composite
def mixed_ints(draw, depth=2):
    """min/max/clamp of ``q + u`` and ``k + u`` forms (their case splits compare q - k)."""
    if depth <= 0:
        return draw(directional(draw(st.sampled_from(["q", "k"])), coeffs=(1,)))
    kind = draw(st.sampled_from(["lin", "min", "max", "clamp"]))
    sub = mixed_ints(depth=depth - 1)
    if kind == "lin":
        return draw(directional(draw(st.sampled_from(["q", "k"])), coeffs=(1,)))
    if kind == "min":
        return B.min_(draw(sub), draw(sub))
    if kind == "max":
        return B.max_(draw(sub), draw(sub))
    return B.clamp(draw(sub), B.const(draw(small)), B.const(draw(st.integers(0, 30))))


@st.composite
def affine_bool_exprs(draw, depth=3):
    """Bool formulas inside the fragment for which tile classes are exact."""
    kind = draw(st.sampled_from(["cmp", "cmp", "mixed", "chunk", "and", "or", "not", "sel"]
                                if depth > 0 else ["cmp", "mixed", "chunk"]))
    if kind == "cmp":
        d = draw(st.sampled_from(["q", "k", "d"]))
        return B.cmp(draw(st.sampled_from(_OPS)), draw(affine_ints(d=d)), B.const(draw(small)))
    if kind == "mixed":
        return B.cmp(draw(st.sampled_from(_OPS)), draw(mixed_ints()), B.const(draw(small)))
    if kind == "chunk":
        c = B.const(draw(st.integers(1, 12)))
        e = draw(st.integers(0, 5))
        return B.cmp(draw(st.sampled_from(_OPS)), B.floordiv(B.add(Q, B.const(e)), c),
                     B.floordiv(K, c))
    sub = affine_bool_exprs(depth=depth - 1)
    if kind == "not":
        return B.not_(draw(sub))
    if kind == "and":
        return B.and_(draw(sub), draw(sub))
    if kind == "sel":
        d = draw(st.sampled_from(["q", "k", "d"]))
        return B.cmp("<=", B.select(draw(sub), draw(directional(d)), draw(directional(d))),
                     B.const(draw(small)))
    return B.or_(draw(sub), draw(sub))


@st.composite
def score_exprs(draw, depth=3):
    """Random scores (float IR): ``s``, float constants, ints converted, ``+ - * /``,
    ``tanh exp abs min max``, ``if`` and float list params indexed by ``h``; smooth enough
    that every value is finite for ``|s| <= 4`` (``/`` divides by ``1 + s*s`` or a
    constant, ``exp`` takes a tanh)."""
    s = B.SCORE
    if depth <= 0:
        kind = draw(st.sampled_from(["s", "s", "c", "int", "table"]))
        if kind == "s":
            return s
        if kind == "c":
            return B.fconst(draw(st.sampled_from([0.5, -1.25, 2.0, 3.0, -0.75])))
        if kind == "int":
            return B.to_float(B.sub(Q, K) if draw(st.booleans()) else Hv)
        return B.ftable(draw(st.lists(st.sampled_from([0.5, 0.25, -1.0, 2.0]), min_size=3,
                                      max_size=3)), Hv)
    sub = score_exprs(depth=depth - 1)
    kind = draw(st.sampled_from(["leaf", "add", "sub", "mul", "div", "tanh", "exp", "abs",
                                 "min", "max", "select", "neg"]))
    if kind == "leaf":
        return draw(score_exprs(depth=0))
    a = draw(sub)
    if kind in ("add", "sub", "mul", "min", "max"):
        b = draw(sub)
        fn = {"add": B.fadd, "sub": B.fsub, "mul": B.fmul}.get(kind)
        return fn(a, b) if fn else B.fcall(kind, a, b)
    if kind == "div":
        return B.fdiv(a, B.fadd(B.fconst(1.0), B.fmul(s, s)))
    if kind == "tanh":
        return B.fcall("tanh", a)
    if kind == "exp":
        return B.fcall("exp", B.fcall("tanh", a))
    if kind == "abs":
        return B.fcall("abs", a)
    if kind == "neg":
        return B.fneg(a)
    return B.fselect(draw(bool_exprs(depth=1)), a, draw(sub))
