"""Int and bool IR as Python closures over named integers: the host's fast evaluator.

:func:`host_function` turns nodes without runtime inputs into one function of Python ints
that returns their values, computed exactly as :func:`spattn.ir.evaluate.evaluate` computes
them on Python ints (exact integer arithmetic, floor division, eager evaluation of both
branches of ``if``), with a :class:`~spattn.dsl.errors.SpattnValueError` where the
evaluator raises one (a divisor 0, a list indexed out of range). The decode path evaluates
the closed-form key ranges of each step's rows with it: the evaluator builds a pass and
walks the IR per call, which costs tens of microseconds per step; a closure costs a few.

Nodes it does not cover (runtime inputs, floats) make :func:`host_function` return None:
the caller keeps the evaluator.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from ..dsl.errors import SpattnValueError
from .nodes import (Abs, And, BoolConst, Const, FloorDiv, IsPow2, Max, Min, Mod, Node, Not, Or,
                    Prod, Range, Select, Sum, Table, Var)
from .visitor import Visitor, rule

__all__ = ["host_function"]


class _Unsupported(Exception):
    pass


def _div(a: int, d: int, floor: bool, node) -> int:
    if d == 0:
        raise SpattnValueError(f"the divisor {node.b} evaluates to 0")
    return a // d if floor else a % d


class _Closures(Visitor):
    """Each node as a closure ``env -> value`` (``env``: a tuple of ints, indexed by the
    position of each variable name in ``names``); shared sub-expressions share a closure."""

    def __init__(self, names: Sequence[str]):
        self.slot = {n: i for i, n in enumerate(names)}
        self.memo: dict = {}

    def of(self, n: Node):
        fn = self.memo.get(n)
        if fn is None:
            fn = self.memo[n] = self(n)
        return fn

    @rule(default=True)
    def unsupported(self, n):
        raise _Unsupported(type(n).__name__)

    @rule(Const, BoolConst)
    def const(self, n):
        v = n.value
        return lambda env: v

    @rule(Var)
    def var(self, n):
        if n.name not in self.slot:
            raise _Unsupported(n.name)
        i = self.slot[n.name]
        return lambda env: env[i]

    @rule(Sum)
    def sum(self, n):
        c0 = n.const
        terms = tuple((self.of(a), c) for a, c in n.terms)
        if len(terms) == 1:
            (f, c), = terms
            return lambda env: c0 + c * f(env)
        return lambda env: c0 + sum(c * f(env) for f, c in terms)

    @rule(Prod)
    def prod(self, n):
        fs = tuple(self.of(f) for f in n.factors)

        def prod(env):
            out = 1
            for f in fs:
                out *= f(env)
            return out
        return prod

    @rule(FloorDiv, Mod)
    def division(self, n):
        fa, fd, floor = self.of(n.a), self.of(n.b), isinstance(n, FloorDiv)
        return lambda env: _div(fa(env), fd(env), floor, n)

    @rule(Abs)
    def abs(self, n):
        f = self.of(n.a)
        return lambda env: abs(f(env))

    @rule(Min, Max)
    def minmax(self, n):
        fs, pick = tuple(self.of(a) for a in n.args), (min if isinstance(n, Min) else max)
        return lambda env: pick([f(env) for f in fs])

    @rule(Select)
    def select(self, n):
        fc, fa, fb = self.of(n.cond), self.of(n.a), self.of(n.b)

        def select(env):
            c, a, b = fc(env), fa(env), fb(env)      # both branches, as the evaluator does
            return a if c else b
        return select

    @rule(Table)
    def table(self, n):
        values, fi = n.values, self.of(n.index)

        def table(env):
            i = fi(env)
            if not 0 <= i < len(values):
                raise SpattnValueError(f"list {list(values)} has {len(values)} entries but is "
                                       f"indexed with {n.index} taking values {i}..{i}")
            return values[i]
        return table

    @rule(Range)
    def range(self, n):
        f, lo, hi = self.of(n.x), n.lo, n.hi
        if lo is not None and lo == hi:
            return lambda env: f(env) == lo
        if lo is None and hi is None:
            return lambda env: (f(env), True)[1]
        if lo is None:
            return lambda env: f(env) <= hi
        if hi is None:
            return lambda env: f(env) >= lo
        return lambda env: lo <= f(env) <= hi

    @rule(IsPow2)
    def is_pow2(self, n):
        f = self.of(n.a)

        def is_pow2(env):
            x = f(env)
            return x > 0 and x & (x - 1) == 0
        return is_pow2

    @rule(Not)
    def not_(self, n):
        f = self.of(n.a)
        return lambda env: not f(env)

    @rule(And, Or)
    def junction(self, n):
        fs, conj = tuple(self.of(a) for a in n.args), isinstance(n, And)

        def junction(env):
            vals = [f(env) for f in fs]             # every operand, as the evaluator does
            return all(vals) if conj else any(vals)
        return junction


def host_function(nodes: Sequence[Optional[Node]], names: Sequence[str]
                  ) -> Optional[Callable[..., tuple]]:
    """``f(*values)`` -> the tuple of the values of ``nodes`` (None for a None node) with
    the variables ``names`` bound to ``values`` (Python ints), or None when some node is
    outside the int and bool IR without runtime inputs or names another variable."""
    c = _Closures(names)
    try:
        fns = tuple(None if n is None else c.of(n) for n in nodes)
    except _Unsupported:
        return None

    def run(*values):
        return tuple(None if f is None else f(values) for f in fns)
    return run
