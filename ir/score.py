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

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

import sympy
import torch

from . import build
from .evaluate import evaluate
from .inputs import query_offset
from .nodes import (FAdd, FCall, FConst, FDiv, FLoad, FMul, FSelect, Node, Score, float_loads)

__all__ = ["ScoreGrads", "derivative", "grads", "score_values", "score_env"]

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


class _Min2(sympy.Function):
    """``min(a, b)`` kept binary: an n-ary ``min`` is ``min(min(a, b), c)``, as both backends
    evaluate it, so that at ties the derivative splits as torch's does (half to each side)
    rather than sympy's ``Min`` derivative, whose weights add past 1 at a three-way tie."""

    is_extended_real = True

    def fdiff(self, argindex=1):
        a, b = self.args
        return sympy.Heaviside(b - a) if argindex == 1 else sympy.Heaviside(a - b)


class _Max2(sympy.Function):
    """``max(a, b)`` kept binary, as :class:`_Min2`."""

    is_extended_real = True

    def fdiff(self, argindex=1):
        a, b = self.args
        return sympy.Heaviside(a - b) if argindex == 1 else sympy.Heaviside(b - a)


_UNARY = {"tanh": _Tanh, "exp": sympy.exp, "log": _Log, "sqrt": _Sqrt,
          "abs": sympy.Abs, "sign": sympy.sign, "step": sympy.Heaviside}


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
    return v.to(s.dtype).expand(s.shape)
