"""Scores: their values over a call and their derivatives, generated with sympy.

A score (``docs/language.md`` §13) is a float IR expression of ``s``, the scaled score
``q·k * scale`` of a (query, key) pair, and of the pair's positions, params and float
runtime inputs. Attention applies it before the mask and the softmax; the backward needs

* ``d score / d s`` (the gradient to q and k is ``dS' * f'(s)``), and
* ``d score / d x`` for every load ``x`` of a float runtime input that requires grad (a
  learnable bias: its table's gradient is the sum of ``dS' * d score / d x`` over the pairs
  that read each entry).

:func:`derivative` builds them: the score is translated into a sympy expression (``s``
and the load are symbols; every other leaf, int sub-expression, table or condition is an
opaque symbol, so sympy never rounds a constant or reasons about integers), sympy
differentiates it, and the result is translated back into canonical IR through
:mod:`spattn.ir.build`. Both backends evaluate or emit those IR derivatives; nothing is
differentiated by hand.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

import sympy
import torch

from . import build
from .evaluate import evaluate
from .inputs import query_offset
from .nodes import (FAdd, FCall, FConst, FDiv, FMul, FSelect, FTable, Node, Score, Sum,
                    ToFloat, float_loads, free_vars, walk)
from .visitor import Visitor, rule

__all__ = ["LOG2E", "TILE_QUERY", "Additive", "Capped", "FloatRebuild", "ScoreGrads",
           "additive", "capped", "derivative", "emitted_form",
           "grads", "outer_factor", "reciprocal", "row_terms", "score_values", "score_env",
           "split_tile_query"]

#: ``log2(e)``: a score in log2 units is the natural one times this.
LOG2E = 1.4426950408889634
#: The variable of a kernel tile's first query position (:func:`split_tile_query`); only
#: the emitted forms of a score use it, never a pattern.
TILE_QUERY = "qr"

class _Sqrt(sympy.Function):
    """The score's ``sqrt``: real (a NaN below 0, never complex), so that sympy does not
    differentiate ``abs(sqrt(..))`` through complex parts it cannot translate back."""

    is_extended_real = True

    def fdiff(self, argindex=1):
        return sympy.Rational(1, 2) / self


class _Log(sympy.Function):
    """The score's ``log``: real, as :class:`_Sqrt`."""

    is_extended_real = True

    def fdiff(self, argindex=1):
        return 1 / self.args[0]


class _Tanh(sympy.Function):
    """The score's ``tanh``: real, as :class:`_Sqrt` (sympy rewrote the real part of
    ``tanh(x / c)`` in ``abs(tanh(x / c) / d)`` through ``sinh`` and ``cos``)."""

    is_extended_real = True

    def fdiff(self, argindex=1):
        return 1 - self ** 2


class _Flat(sympy.Function):
    """A piecewise constant function of the score (``sign``, ``step``): real, its
    derivative 0 (as torch's); sympy's ``sign`` and ``Heaviside`` differentiate to a
    ``DiracDelta``, which has no IR. Subclassed once per function, never instantiated:
    translating back to IR tells them apart by class."""

    is_extended_real = True

    def fdiff(self, argindex=1):
        return sympy.Integer(0)


class _Sign(_Flat):
    """The score's ``sign`` (:class:`_Flat`)."""


class _Step(_Flat):
    """The score's ``step`` (:class:`_Flat`)."""


class _Abs(sympy.Function):
    """The score's ``abs``: real, its derivative ``sign(x) x'``. sympy's ``Abs``
    differentiates an argument it cannot prove real (a division by a value that may be 0)
    through ``re`` and ``im`` parts, which came back as ``x' (1 / x) x``: NaN where ``x``
    is 0 (``abs(if c then s else float(q % 4))`` at ``q % 4 == 0``)."""

    is_extended_real = True

    def fdiff(self, argindex=1):
        return _Sign(self.args[0])


class _Min2(sympy.Function):
    """``min(a, b)`` kept binary: an n-ary ``min`` is ``min(min(a, b), c)``, as both backends
    evaluate it, so that at ties the derivative splits as torch's does (half to each side)
    rather than sympy's ``Min`` derivative, whose weights add past 1 at a three-way tie.
    Its derivative is ``w a' + (1 - w) b'`` with one ``w = step(b - a)``: a weight per side
    (``step(b - a)``, ``step(a - b)``) is two differences rounded apart, both 0 or both 1
    at a near-tie in float32."""

    is_extended_real = True

    def fdiff(self, argindex=1):
        a, b = self.args
        w = sympy.Heaviside(b - a)
        return w if argindex == 1 else 1 - w


class _Max2(sympy.Function):
    """``max(a, b)`` kept binary, as :class:`_Min2`."""

    is_extended_real = True

    def fdiff(self, argindex=1):
        a, b = self.args
        w = sympy.Heaviside(a - b)
        return w if argindex == 1 else 1 - w


_UNARY = {"tanh": _Tanh, "exp": sympy.exp, "log": _Log, "sqrt": _Sqrt,
          "abs": _Abs, "sign": _Sign, "step": _Step}


class _ToSympy:
    """IR -> sympy, with opaque symbols for the leaves that are not differentiated."""

    def __init__(self, wrt: Node):
        self.wrt = wrt
        self.x = sympy.Symbol("x", real=True)
        self.leaves: dict[Node, sympy.Symbol] = {}
        self.conds: dict[Node, sympy.Symbol] = {}

    def leaf(self, n: Node) -> sympy.Symbol:
        sym = self.leaves.get(n)
        if sym is None:
            sym = self.leaves[n] = sympy.Symbol(f"c{len(self.leaves)}", real=True)
        return sym

    def __call__(self, n: Node):
        if n == self.wrt:
            return self.x
        if isinstance(n, FAdd):
            return sympy.Add(*(self(a) for a in n.args))
        if isinstance(n, FMul):
            return sympy.Mul(*(self(a) for a in n.args))
        if isinstance(n, FDiv):
            return self(n.a) / self(n.b)
        if isinstance(n, FCall):
            args = [self(a) for a in n.args]
            if n.fn in ("min", "max"):
                acc = args[0]
                for a in args[1:]:
                    acc = (_Min2 if n.fn == "min" else _Max2)(acc, a)
                return acc
            return _UNARY[n.fn](*args)
        if isinstance(n, FSelect):
            c = self.conds.get(n.cond)
            if c is None:
                c = self.conds[n.cond] = sympy.Symbol(f"b{len(self.conds)}", integer=True)
            return sympy.Piecewise((self(n.a), sympy.Eq(c, 1)), (self(n.b), True))
        return self.leaf(n)      # FConst, Score (when not wrt), ToFloat, FTable, FLoad


class _FromSympy:
    """sympy -> canonical IR (through ir.build)."""

    def __init__(self, t: _ToSympy):
        self.back = {sym: n for n, sym in t.leaves.items()}
        self.back[t.x] = t.wrt
        self.cond = {sym: n for n, sym in t.conds.items()}

    def __call__(self, e):
        if e in self.back:
            return self.back[e]
        if e.is_Number:
            return build.fconst(float(e))
        if isinstance(e, sympy.Add):
            return build.fadd(*(self(a) for a in e.args))
        if isinstance(e, sympy.Mul):
            # x * c**-1 is x / c again (the forward's own division, and its rounding)
            num, den = [], []
            for a in e.args:
                if isinstance(a, sympy.Pow) and a.args[1].is_Integer and int(a.args[1]) < 0:
                    den.append(self(a.args[0] ** -a.args[1]))
                else:
                    num.append(self(a))
            top = build.fmul(*num) if len(num) > 1 else (num[0] if num else build.fconst(1.0))
            if not den:
                return top
            return build.fdiv(top, build.fmul(*den) if len(den) > 1 else den[0])
        if isinstance(e, sympy.Pow):
            base, ex = e.args
            b = self(base)
            if ex.is_Integer:
                n = int(ex)
                prod = build.fmul(*([b] * abs(n))) if n else build.fconst(1.0)
                return build.fdiv(build.fconst(1.0), prod) if n < 0 else prod
            if ex == sympy.Rational(1, 2):
                return build.fcall("sqrt", b)
            if ex == sympy.Rational(-1, 2):
                return build.fdiv(build.fconst(1.0), build.fcall("sqrt", b))
            return build.fcall("exp", build.fmul(self(ex), build.fcall("log", b)))
        if isinstance(e, (sympy.Min, _Min2)):
            return build.fcall("min", *(self(a) for a in e.args))
        if isinstance(e, (sympy.Max, _Max2)):
            return build.fcall("max", *(self(a) for a in e.args))
        if isinstance(e, sympy.Heaviside):
            return build.fcall("step", self(e.args[0]))
        if isinstance(e, sympy.Piecewise):
            out = self(e.args[-1][0])
            for value, cond in reversed(e.args[:-1]):
                if not (isinstance(cond, sympy.Eq) and cond.args[0] in self.cond):
                    raise NotImplementedError(f"condition {cond}")
                out = build.fselect(self.cond[cond.args[0]], self(value), out)
            return out
        for name, fn in _UNARY.items():
            if isinstance(e, fn):
                return build.fcall(name, self(e.args[0]))
        raise NotImplementedError(f"cannot translate {e!r} ({type(e).__name__}) back to IR")


@lru_cache(maxsize=256)
def derivative(score: Node, wrt: Node) -> Node:
    """``d score / d wrt`` as canonical float IR (``wrt``: :class:`Score` or an
    :class:`FLoad` of the score)."""
    t = _ToSympy(wrt)
    d = sympy.diff(t(score), t.x)
    # every value is real: where sympy cannot prove a sub-expression real (a division that
    # might be by 0) it writes re() and im() parts, which are the value and 0
    d = d.replace(lambda e: isinstance(e, sympy.im), lambda e: sympy.Integer(0))
    d = d.replace(lambda e: isinstance(e, sympy.re), lambda e: e.args[0])
    return build.to_float(_FromSympy(t)(d))


@dataclass(frozen=True)
class ScoreGrads:
    """A score with its derivatives: ``ds`` (``d score / d s``) and ``dloads`` (load ->
    ``d score / d load``, for every float-input load)."""

    score: Node
    ds: Node
    dloads: tuple

    def of(self, name: str) -> tuple:
        """``(load, derivative)`` pairs of input ``name``."""
        return tuple((ld, d) for ld, d in self.dloads if ld.name == name)


@lru_cache(maxsize=256)
def grads(score: Node) -> ScoreGrads:
    """The derivatives the backward needs (:class:`ScoreGrads`)."""
    return ScoreGrads(score, derivative(score, Score()),
                      tuple((ld, derivative(score, ld)) for ld in float_loads(score)))


def score_env(Lq: int, Lk: int, *, num_heads: int, batch: int, q_offset: int | None,
              device=None, rows: tuple[int, int] | None = None,
              cols: tuple[int, int] | None = None) -> dict:
    """The variables of a score over ``[batch, heads, rows, cols]`` (``rows``, ``cols``: a
    slice of the query rows and of the keys, default all)."""
    off = query_offset(Lq, Lk, q_offset)
    r0, r1 = rows or (0, Lq)
    c0, c1 = cols or (0, Lk)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return {
        "q": (torch.arange(r0, r1, device=dev, dtype=torch.int64) + off).view(1, 1, -1, 1),
        "k": torch.arange(c0, c1, device=dev, dtype=torch.int64).view(1, 1, 1, -1),
        "h": torch.arange(num_heads, device=dev, dtype=torch.int64).view(1, num_heads, 1, 1),
        "b": torch.arange(batch, device=dev, dtype=torch.int64).view(batch, 1, 1, 1),
        "Lq": Lq, "Lk": Lk, "H": num_heads,
    }


def score_values(node: Node, s: torch.Tensor, env: dict, inputs: Mapping[str, torch.Tensor],
                 memo: dict | None = None) -> torch.Tensor:
    """``node`` (a score or a derivative) over the pairs of ``env`` with the scaled scores
    ``s`` ``[B, H, rows, Lk]``, in ``s.dtype``, broadcast to ``s``'s shape."""
    env = dict(env, s=s)
    v = evaluate(node, env, inputs, memo, fdtype=s.dtype)
    if not isinstance(v, torch.Tensor):
        v = torch.tensor(float(v), dtype=s.dtype, device=s.device)
    # a score of constants alone (``log(1.5 + tanh(float(Lq)))``) evaluates to a 0-d tensor
    # on the CPU whatever the device of ``s``
    return v.to(device=s.device, dtype=s.dtype).expand(s.shape)


# ------------------------------------------------------------ forms for the kernels

class FloatRebuild(Visitor):
    """A score's float nodes rebuilt through ``ir.build`` from their rebuilt operands; every
    other node (leaves, int and bool sub-trees: indices, conditions) kept. A pass that
    rewrites some float nodes subclasses it and overrides their rules."""

    @rule(FDiv)
    def fdiv(self, n):
        return build.fdiv(self(n.a), self(n.b))

    @rule(FAdd)
    def fadd(self, n):
        return build.fadd(*(self(a) for a in n.args))

    @rule(FMul)
    def fmul(self, n):
        return build.fmul(*(self(a) for a in n.args))

    @rule(FCall)
    def fcall(self, n):
        return build.fcall(n.fn, *(self(a) for a in n.args))

    @rule(FSelect)
    def fselect(self, n):
        return build.fselect(n.cond, self(n.a), self(n.b))

    @rule(default=True)
    def keep(self, n):
        return n


class _Reciprocal(FloatRebuild):
    """:func:`reciprocal`'s rules: ``x / c`` by a constant is ``x * (1 / c)``."""

    @rule(FDiv)
    def fdiv(self, n):
        a, b = self(n.a), self(n.b)
        if isinstance(b, FConst):
            return build.fmul(a, build.fconst(1.0 / b.value))
        return build.fdiv(a, b)


_RECIPROCAL = _Reciprocal()


@lru_cache(maxsize=256)
def reciprocal(node: Node) -> Node:
    """``node`` with every division by a constant a multiplication by its reciprocal (a
    multiply is cheaper than a division on every device; the two differ by at most an ulp),
    so that the constant also folds into the other factors of its product."""
    return _RECIPROCAL(node)


#: The largest coefficient of q that :func:`split_tile_query` moves to a row vector:
#: ``|a| * (BLOCK_M - 1)`` then stays far inside int32.
_SPLIT_COEFF = 1 << 16

#: The largest known magnitude of a split difference's float factor times its coefficient
#: of q (an ALiBi slope in log2 units): each float part is rounded at a magnitude up to that
#: times ``BLOCK_M``, an error of ``|m| * BLOCK_M`` ulps at every distance, the diagonal's
#: included, where the direct form rounds ``|m| * |k - q|``. At 4 the split's error stays
#: below about 6e-5 of a logit (BLOCK_M 128), near float32's own rounding of the score; a
#: larger slope (``alibi(100)``) is computed per pair, exactly as written.
SPLIT_FACTOR = 4.0


def magnitude(f: Node) -> float | None:
    """The largest ``|f|`` can be, bounded from its constants and float list params
    (:func:`interval`); None where ``f`` reads anything else (a runtime table, a position,
    the head through an int expression)."""
    iv = interval(f)
    return None if iv is None else max(abs(iv[0]), abs(iv[1]))


_MONOTONE = {"exp": math.exp, "tanh": math.tanh}


def interval(f: Node) -> tuple[float, float] | None:
    """``(lo, hi)`` bounding a float expression of constants and float list params (sums,
    products, divisions by what excludes 0, selects, ``exp``, ``tanh``, ``abs``, ``min``,
    ``max``); None for anything else."""
    if isinstance(f, FConst):
        return f.value, f.value
    if isinstance(f, FTable):
        return min(f.values), max(f.values)
    if isinstance(f, FSelect):
        a, b = interval(f.a), interval(f.b)
        return None if a is None or b is None else (min(a[0], b[0]), max(a[1], b[1]))
    if not isinstance(f, (FAdd, FMul, FDiv, FCall)):
        return None
    args = [interval(a) for a in f.children()]
    if not args or any(a is None for a in args):
        return None
    try:
        if isinstance(f, FAdd):
            return sum(a[0] for a in args), sum(a[1] for a in args)
        if isinstance(f, (FMul, FDiv)):
            lo, hi = args[0]
            for a0, a1 in args[1:]:
                if isinstance(f, FDiv):
                    if a0 <= 0 <= a1:
                        return None
                    a0, a1 = 1 / a1, 1 / a0
                ends = (lo * a0, lo * a1, hi * a0, hi * a1)
                lo, hi = min(ends), max(ends)
            return lo, hi
        if f.fn in _MONOTONE:
            return _MONOTONE[f.fn](args[0][0]), _MONOTONE[f.fn](args[0][1])
        if f.fn == "abs":
            lo, hi = args[0]
            return (0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))), max(abs(lo), abs(hi))
        if f.fn in ("min", "max"):
            pick = min if f.fn == "min" else max
            return pick(a[0] for a in args), pick(a[1] for a in args)
    except (OverflowError, ValueError, ZeroDivisionError):
        return None
    return None


def split_tile_query(x: Node, factor: Node | None = None) -> tuple[Node, Node] | None:
    """An int sum ``x = a*q + K(k, ...)`` (q in one term, linear; k in another) as
    ``(x[q := r], a*(q - r))`` with ``r`` the tile's first query (:data:`TILE_QUERY`): the
    first depends on the key and not the query (a ``[1, BN]`` vector of the tile), the second
    on the query alone (``[BM, 1]``), and their sum is ``x`` exactly, in ints. Their float
    conversions then add on the tile in one operation instead of an int ``[BM, BN]`` sum and a
    conversion. ``x[q := r]`` is a value of ``x`` over the call's domain (``r`` is a query of
    it), so its integer bounds are ``x``'s; ``|a*(q - r)| < |a| * BLOCK_M``. None when ``x``
    is not of that form, or where the float ``factor`` the difference is multiplied by is
    bounded (:func:`magnitude`) by no less than :data:`SPLIT_FACTOR` (times ``a``): the
    rounding of the two parts would show. A factor no bound reads (a runtime table, a
    function of the head such as ``alibi_slope``) keeps the split."""
    if not isinstance(x, Sum):
        return None
    q = build.var("q")
    with_q = [(t, c) for t, c in x.terms if "q" in free_vars(t)]
    if len(with_q) != 1 or with_q[0][0] != q or abs(with_q[0][1]) > _SPLIT_COEFF:
        return None
    m = None if factor is None else magnitude(factor)
    if m is not None and not m * abs(with_q[0][1]) <= SPLIT_FACTOR:
        return None
    if not any("k" in free_vars(t) for t, _ in x.terms):
        return None
    a = with_q[0][1]
    r = build.var(TILE_QUERY)
    rest = build.from_linear({t: c for t, c in x.terms if t != q}, x.const)
    return build.add(rest, build.scale(r, a)), build.scale(build.sub(q, r), a)


def _axes(n: Node) -> frozenset:
    """The tile axes ``n`` varies along (``"q"``, ``"k"``; ``s`` along both)."""
    if any(isinstance(x, Score) for x in walk(n)):
        return frozenset("qk")
    return free_vars(n) & frozenset("qk")


def _expand(n: Node, f: Node) -> list[Node]:
    """``f * n`` as a list of terms to add, ``f`` distributed over ``n``'s sums where ``n``
    is linear in them (a sum, a product of one sum and factors that are not pairwise, a
    conversion of an int sum split by :func:`split_tile_query`)."""
    if isinstance(n, FAdd):
        return [t for a in n.args for t in _expand(a, f)]
    if isinstance(n, ToFloat):
        parts = split_tile_query(n.a, f)
        if parts is not None:
            return [build.fmul(f, build.to_float(p)) for p in parts]
    if isinstance(n, FMul):
        sums = [a for a in n.args if isinstance(a, FAdd) or (
            isinstance(a, ToFloat) and split_tile_query(
                a.a, build.fmul(f, *(b for b in n.args if b is not a))) is not None)]
        if len(sums) == 1:
            others = [a for a in n.args if a is not sums[0]]
            if all(len(_axes(a)) < 2 for a in others):
                return _expand(sums[0], build.fmul(f, *others))
    return [build.fmul(f, n)]


@lru_cache(maxsize=256)
def emitted_form(score: Node, log2: bool) -> Node:
    """The score as a kernel computes it (``docs/backends.md`` "Scores"): divisions by
    constants as multiplications (:func:`reciprocal`), in log2 units when ``log2`` (the
    score times :data:`LOG2E`, the constant folded into each term's factors), and the
    factors of each term distributed over sums so that the terms of the query alone and of
    the key alone are vectors of the tile, int differences of q and k split at the tile's
    first query (:func:`split_tile_query`). The same value as ``score`` (times ``log2(e)``)
    up to float rounding."""
    return build.fadd(*_expand(reciprocal(score), build.fconst(LOG2E if log2 else 1.0)))


def _of_row(n: Node) -> bool:
    """``n`` is constant along a row of the tile: it reads neither ``s`` nor the key."""
    return "k" not in free_vars(n) and not any(isinstance(x, Score) for x in walk(n))


@lru_cache(maxsize=256)
def row_terms(form: Node) -> tuple[Node, Node | None]:
    """``(rest, rows)``: an emitted score (:func:`emitted_form`) split into the terms that
    vary with the key or ``s`` and the sum of those that do not (ALiBi's ``-m * (q - r)``
    after the split at the tile's first query ``r``, a bias of the query or the head alone);
    ``rows`` is None when the score is not such a sum or has no such term.

    The softmax of a row is unchanged by a term constant along it, so the kernels leave
    ``rows`` out of every pair and add it to the row's log-sum-exp instead, one value per
    row (``docs/backends.md``, "Scores"): ALiBi then costs one multiply-add per pair instead
    of two. A row whose ``rows`` is ``-inf`` allows nothing (its output is 0, as when the
    whole row's score is ``-inf``); ``+inf`` or NaN there makes the row NaN, as it would
    have."""
    if not isinstance(form, FAdd):
        return form, None
    rows = [t for t in form.args if _of_row(t)]
    rest = [t for t in form.args if not _of_row(t)]
    if not rows or not rest:
        return form, None
    return build.fadd(*rest), build.fadd(*rows)


@lru_cache(maxsize=256)
def outer_factor(form: Node) -> tuple[Node, float | None]:
    """``(rest, c)``: an emitted score that is a product with one positive finite constant
    factor ``c`` (softcap's ``30 * tanh(s / 30)``), as ``rest * c``; ``(form, None)``
    otherwise. The kernels' softmax multiplies every score by a scale anyway (``exp2(b *
    scale - m)``, one multiply-add, and the row max by it): ``c`` joins that scale, one
    operation per pair fewer. Exact up to rounding: ``max(c * x) = c * max(x)`` for ``c > 0``,
    and ``-inf`` stays ``-inf``."""
    if not isinstance(form, FMul):
        return form, None
    consts = [a for a in form.args if isinstance(a, FConst)]
    if len(consts) != 1:
        return form, None
    c = float(consts[0].value)
    if not (0.0 < c < float("inf")):
        return form, None
    rest = [a for a in form.args if a is not consts[0]]
    return (build.fmul(*rest) if len(rest) > 1 else rest[0]), c


@dataclass(frozen=True)
class Additive:
    """A score that adds to ``c * s`` terms of the pair's offset, the key and the query
    alone (:func:`additive`), in log2 units: ``c * s * log2(e) + slope * float(k - q) +
    cols + rows``. ``slope`` reads neither q nor k (ALiBi's per-head slope times log2(e));
    ``cols`` reads the key and not the query (a bias per key); ``rows`` the query and not
    the key (its value at ``q``). Each of the three is None where the score has none."""

    c: float
    slope: Node | None
    cols: Node | None
    rows: Node | None


def _offset_factor(t: Node):
    """``(F, ck, c0)`` where a term of an emitted score is ``F * float(ck * (k - x) + c0)``
    with ``x`` the tile's first query (the split of a pair's offset, :func:`split_tile_query`)
    or the query itself (an offset the split leaves whole: a factor too large for it) and
    ``F`` a float of neither position, else None."""
    if not isinstance(t, FMul):
        return None
    conv = [a for a in t.args if isinstance(a, ToFloat) and "k" in free_vars(a)]
    if len(conv) != 1 or not isinstance(conv[0].a, Sum):
        return None
    x = conv[0].a
    terms = dict(x.terms)
    k = build.var("k")
    qs = [v for v in terms if v != k]
    if (k not in terms or len(qs) != 1 or qs[0] not in (build.var(TILE_QUERY), build.var("q"))
            or terms[k] != -terms[qs[0]]):
        return None
    others = [a for a in t.args if a is not conv[0]]
    if any(free_vars(a) & {"q", "k", TILE_QUERY} or _has_score(a) for a in others):
        return None
    return build.fmul(*others) if others else build.fconst(1.0), terms[k], x.const


def _has_score(n: Node) -> bool:
    return any(isinstance(x, Score) for x in walk(n))


@lru_cache(maxsize=256)
def additive(score: Node) -> Additive | None:
    """The score as :class:`Additive`, or None where it is not one: ``c * s`` (the sum of
    its terms of ``s`` times constants, positive) plus terms each of which reads the
    key alone, the query alone, or the pair's offset ``k - q`` times a factor of neither
    (ALiBi's ``slope * (k - q)``). The warp-specialised kernels apply such a score with
    one vector of the tile's keys (``runtime.ws_fwd``); the offset's factor, not its
    product with the key, keeps long rows exact: ``slope * float(k - r)`` against the tile's
    first query ``r``, never ``slope * k`` minus ``slope * q``. Scores that read float
    runtime inputs are not additive here (their tables' gradients are the generated
    kernels')."""
    if float_loads(score):
        return None
    form = emitted_form(score, True)
    terms = form.args if isinstance(form, FAdd) else (form,)
    c, slopes, cols, rows = 0.0, [], [], []
    for t in terms:
        if _has_score(t):
            if isinstance(t, Score):        # (a factor of exactly 1 in log2 units)
                c += 1.0 / LOG2E
                continue
            if not (isinstance(t, FMul) and len(t.args) == 2):
                return None
            a, b = t.args
            f = b if isinstance(a, Score) else a if isinstance(b, Score) else None
            if not isinstance(f, FConst):
                return None
            c += float(f.value) / LOG2E
        elif _of_row(t):
            rows.append(t)
        elif free_vars(t) & {TILE_QUERY, "q"}:
            got = _offset_factor(t)
            if got is None:
                return None
            f, ck, c0 = got
            slopes.append(build.fmul(f, build.fconst(float(ck))))
            if c0:
                rows.append(build.fmul(f, build.fconst(float(c0))))
        else:
            cols.append(t)
    if not 0.0 < c < math.inf:
        return None
    return Additive(c, build.fadd(*slopes) if slopes else None,
                    build.fadd(*cols) if cols else None,
                    build.fadd(*rows) if rows else None)


@dataclass(frozen=True)
class Capped:
    """A score that is ``cap * tanh(f * s)`` and nothing else (:func:`capped`): logit
    softcapping (Gemma 2's ``softcap(50)``, Grok's ``softcap(30)``), ``cap`` in log2 units
    (the natural cap times ``log2(e)``). The warp-specialised forward applies it as ``tanh``
    of the pair's q·k times ``f`` and the call's scale, its softmax scale ``cap`` (the
    softmax's one multiply-add per pair, as :func:`outer_factor` folds it)."""

    cap: float
    f: float


@lru_cache(maxsize=256)
def capped(score: Node) -> Capped | None:
    """The score as :class:`Capped`, or None where it is not ``c * tanh(f * s)`` with
    constants ``c > 0`` and ``f`` finite (any other term, a position, a param list or a
    runtime table makes it None)."""
    if float_loads(score):
        return None
    form = emitted_form(score, True)
    rest, cap = outer_factor(form)
    if cap is None and isinstance(form, FCall):
        rest, cap = form, 1.0           # (a cap of exactly 1 in log2 units)
    if cap is None or not (isinstance(rest, FCall) and rest.fn == "tanh"):
        return None
    (x,) = rest.args
    if isinstance(x, Score):
        return Capped(cap, 1.0)
    if isinstance(x, FMul) and len(x.args) == 2:
        a, b = x.args
        f = b if isinstance(a, Score) else a if isinstance(b, Score) else None
        if isinstance(f, FConst) and math.isfinite(f.value):
            return Capped(cap, float(f.value))
    return None
