"""Reference semantics: evaluate IR on tensors of positions with torch.

This is the meaning of a pattern, against which every analysis and kernel is
checked. ``evaluate`` is generic over broadcastable integer tensors, so the
same code computes the dense mask ``[B, H, Lq, Lk]`` and the predicate at
chosen points (the exact refinement of tile classes evaluates it at one
representative point per cell).

Integers are exact (Python integers). Values that are Python ints (constants,
lengths, arithmetic of them) are computed exactly on the host; tensors hold
int64, on which this module computes exactly what the language means wherever
:func:`spattn.ir.bounds.check_call` accepts the call (``mask`` calls it; the
other entry points of the analysis do too): sums and products wrap modulo
``2**64`` (constants beyond int64 are wrapped first: exact modulo ``2**64``), an
equality of a sum is exact under that wrap, a comparison bound beyond int64
folds (the compared value is in int64), a constant divisor beyond int64 gives
quotient 0 or -1, and a constant beyond int64 inside ``min``/``max`` saturates.

Runtime inputs: an input used with ``n`` index dimensions is given as a tensor
of ``n`` dimensions (shared by the batch and heads), ``n + 1`` (``[B, ...]``)
or ``n + 2`` (``[B, H, ...]``) dimensions; a size-1 batch or head dimension
broadcasts. Integer and bool dtypes are accepted; elements are integers.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..dsl.errors import SpattnInputError, SpattnValueError
from .bounds import INT64, check_call, wrap
from .inputs import check_lengths, query_offset
from .nodes import (Abs, And, BoolConst, Const, FAdd, FCall, FConst, FDiv, FLoad, FloorDiv,
                    FMul, FSelect, FTable, IsPow2, Load, Max, Min, Mod, Node, Not, Or, Prod,
                    Range, Score, Select, Sum, Table, ToFloat, Var)
from .visitor import Visitor, rule

_LO, _HI = INT64


def _as_full(t: torch.Tensor, nd: int) -> torch.Tensor:
    """View an input as ``[B', H', *index dims]`` with B', H' in {1, B, H}."""
    if t.dim() == nd + 1:       # [B, ...]: heads broadcast
        return t.unsqueeze(1)
    if t.dim() == nd:           # shared by the batch and heads
        return t.reshape(1, 1, *t.shape)
    return t


def gather(name: str, t: torch.Tensor, index: list, b, h) -> torch.Tensor:
    """``t[b, h, *index]`` with broadcasting, checking every index is in range."""
    nd = len(index)
    full = _as_full(t, nd)
    idx = []
    for axis, i in enumerate(index):
        i = torch.as_tensor(i)
        size = full.shape[2 + axis]
        lo, hi = int(i.min()), int(i.max())
        if lo < 0 or hi >= size:
            raise SpattnInputError(
                f"runtime input {name!r} (shape {tuple(t.shape)}) is indexed out of range: "
                f"index dimension {axis} takes values {lo}..{hi} but has size {size}")
        idx.append(i)
    bi = b if full.shape[0] > 1 else torch.zeros((), dtype=torch.int64)
    hi_ = h if full.shape[1] > 1 else torch.zeros((), dtype=torch.int64)
    return full[(torch.as_tensor(bi), torch.as_tensor(hi_), *idx)]


def evaluate(node: Node, env: Mapping[str, object], inputs: Mapping[str, torch.Tensor] | None = None,
             memo: dict | None = None, *, fdtype: torch.dtype = torch.float64):
    """Value of ``node`` with variables bound by ``env`` (ints or broadcastable int64 tensors).

    Bool nodes give bool tensors (or Python bools when nothing is a tensor).
    Common sub-expressions are computed once: a caller's ``memo`` keeps every value (for
    calls that share sub-expressions); without one, only the values of sub-expressions that
    more than one parent reads are kept, so a junction of a thousand terms holds one
    term's tensor at a time. Float nodes (a score) compute in ``fdtype``; ``env["s"]`` is
    the scaled score tensor and float runtime inputs are gathered as they are given (so
    autograd reaches them).
    """
    if memo is None:
        return _Evaluator(env, inputs or {}, {}, fdtype, _shared(node)).ev(node)
    return _Evaluator(env, inputs or {}, memo, fdtype).ev(node)


def _shared(root: Node) -> frozenset:
    """The sub-expressions of ``root`` read by more than one parent (structurally equal
    nodes are one node); each distinct node is visited once."""
    seen, shared, stack = {root}, set(), [root]
    while stack:
        for c in stack.pop().children():
            if c in seen:
                shared.add(c)
            else:
                seen.add(c)
                stack.append(c)
    return frozenset(shared)


def _fit(v: int) -> int:
    """A Python int as the int64 a tensor holds: wrapped modulo ``2**64`` (exact for + - *)."""
    return v if _LO <= v <= _HI else wrap(v)


def _sat(v: int) -> int:
    """A Python int saturated to int64: exact for ``min``/``max`` with an int64 tensor."""
    return _LO if v < _LO else _HI if v > _HI else v


class _Evaluator(Visitor):
    """The rules of :func:`evaluate`: Python values stay exact Python ints and bools, tensor
    values are int64 / bool tensors (see the module docstring for what is exact)."""

    complete = True

    def __init__(self, env, inputs, memo, fdtype=torch.float64, keep=None):
        self.env = env
        self.inputs = inputs
        self.memo = memo
        self.fdtype = fdtype
        self.keep = keep                   # the nodes whose values the memo keeps (None: all)

    def ev(self, n: Node):
        memo = self.memo
        if n in memo:
            return memo[n]
        v = self(n)
        if self.keep is None or n in self.keep:
            memo[n] = v
        return v

    @rule(Const, BoolConst)
    def const(self, n):
        return n.value

    @rule(Var)
    def var(self, n):
        return self.env[n.name]

    @rule(Sum)
    def sum(self, n):
        py = n.const                       # the Python-valued terms, exactly
        acc = None                         # no products by 1 or -1 (device ops on tensors)
        for a, c in n.terms:
            v = self.ev(a)
            if not isinstance(v, torch.Tensor):
                py += c * v
                continue
            if not _LO <= c <= _HI:
                c = wrap(c)
            if acc is None:
                acc = v if c == 1 else -v if c == -1 else c * v
            else:
                acc = acc + v if c == 1 else acc - v if c == -1 else acc + c * v
        if acc is None:
            return py
        return acc + _fit(py) if py else acc

    @rule(Prod)
    def prod(self, n):
        py, acc = 1, None
        for f in n.factors:
            v = self.ev(f)
            if isinstance(v, torch.Tensor):
                acc = v if acc is None else acc * v
            else:
                py *= v
        if acc is None:
            return py
        return acc if py == 1 else acc * _fit(py)

    @rule(FloorDiv, Mod)
    def division(self, n):
        a, d = self.ev(n.a), self.ev(n.b)
        if _any_zero(d):
            raise SpattnValueError(f"the divisor {n.b} evaluates to 0")
        floor = isinstance(n, FloorDiv)
        if not _is_t(a, d):
            return a // d if floor else a % d
        if not isinstance(d, torch.Tensor) and not _LO <= d <= _HI:
            # |d| exceeds every int64 value a takes: the quotient is 0 or -1
            neg = (a < 0) if d > 0 else (a > 0)
            if floor:
                return -neg.to(torch.int64)
            return torch.where(neg, a + wrap(d), a)
        if not isinstance(a, torch.Tensor):
            a = _fit(a)
        return torch.div(a, d, rounding_mode="floor") if floor else torch.remainder(a, d)

    @rule(Abs)
    def abs(self, n):
        a = self.ev(n.a)
        return a.abs() if isinstance(a, torch.Tensor) else abs(a)

    @rule(Min, Max)
    def minmax(self, n):
        is_min = isinstance(n, Min)
        vals = [self.ev(a) for a in n.args]
        acc = vals[0]
        for v in vals[1:]:
            if _is_t(acc, v):
                acc = (torch.minimum if is_min else torch.maximum)(
                    _tensor(acc, _sat), _tensor(v, _sat))
            else:
                acc = min(acc, v) if is_min else max(acc, v)
        return acc

    @rule(Select)
    def select(self, n):
        c, a, b = self.ev(n.cond), self.ev(n.a), self.ev(n.b)
        if _is_t(c, a, b):
            return torch.where(torch.as_tensor(c), _tensor(a, _fit), _tensor(b, _fit))
        return a if c else b

    def _list_index(self, n):
        """The index of a list entry (``Table``, ``FTable``), checked against its length."""
        i = self.ev(n.index)
        lo, hi = (int(i.min()), int(i.max())) if isinstance(i, torch.Tensor) else (i, i)
        if lo < 0 or hi >= len(n.values):
            raise SpattnValueError(
                f"list {list(n.values)} has {len(n.values)} entries but is indexed with "
                f"{n.index} taking values {lo}..{hi}")
        return i

    @rule(Table)
    def table(self, n):
        i = self._list_index(n)
        if isinstance(i, torch.Tensor):
            vals = torch.tensor([_fit(v) for v in n.values], dtype=torch.int64)
            return vals.to(i.device)[i]
        return n.values[i]

    @rule(Load)
    def load(self, n):
        if n.name not in self.inputs:
            raise SpattnInputError(f"missing runtime input {n.name!r}")
        t = self.inputs[n.name]
        idx = []
        for axis, i in enumerate(n.index):
            v = self.ev(i)
            if not isinstance(v, torch.Tensor):
                size = t.shape[t.dim() - len(n.index) + axis]
                if not 0 <= v < size:           # before it meets a tensor (it may be huge)
                    raise SpattnInputError(
                        f"runtime input {n.name!r} (shape {tuple(t.shape)}) is indexed out of "
                        f"range: index dimension {axis} takes the value {v} but has size {size}")
            idx.append(torch.as_tensor(v, dtype=torch.int64))
        return gather(n.name, t, idx, self.env.get("b", 0), self.env.get("h", 0))

    @rule(Range)
    def range(self, n):
        x = self.ev(n.x)
        lo, hi = n.lo, n.hi
        if isinstance(x, torch.Tensor):
            # x is in int64 (bounds.check_call): a bound beyond it folds, never wraps
            if (lo is not None and lo > _HI) or (hi is not None and hi < _LO):
                return torch.zeros_like(x, dtype=torch.bool)
            lo = None if lo is not None and lo <= _LO else lo
            hi = None if hi is not None and hi >= _HI else hi
            if lo is None and hi is None:
                return torch.ones_like(x, dtype=torch.bool)
        if lo is not None and lo == hi:
            return x == lo
        out = True
        if lo is not None:
            out = x >= lo
        if hi is not None:
            out = (x <= hi) if out is True else (out & (x <= hi))
        return out

    @rule(IsPow2)
    def is_pow2(self, n):
        x = self.ev(n.a)
        if isinstance(x, torch.Tensor):
            return (x > 0) & ((x & (x - 1)) == 0)
        return x > 0 and x & (x - 1) == 0

    @rule(Not)
    def not_(self, n):
        a = self.ev(n.a)
        return ~a if isinstance(a, torch.Tensor) else not a

    @rule(And, Or)
    def junction(self, n):
        conj = isinstance(n, And)
        acc = None
        for a in n.args:
            v = self.ev(a)
            if acc is None:
                acc = v
            elif conj:
                acc = acc & v
            else:
                acc = acc | v
        return acc

    # ---------------------------------------------------------------- floats
    def _f(self, v):
        """A float value: a tensor in ``fdtype`` (or a Python float)."""
        if isinstance(v, torch.Tensor):
            return v if v.dtype == self.fdtype else v.to(self.fdtype)
        return float(v)

    @rule(FConst)
    def fconst(self, n):
        return n.value

    @rule(Score)
    def score(self, n):
        return self._f(self.env["s"])

    @rule(ToFloat)
    def to_float(self, n):
        return self._f(self.ev(n.a))

    @rule(FAdd, FMul)
    def farith(self, n):
        add = isinstance(n, FAdd)
        acc = None
        for a in n.args:
            v = self._f(self.ev(a))
            acc = v if acc is None else (acc + v if add else acc * v)
        return acc

    @rule(FDiv)
    def fdiv(self, n):
        return self._f(self.ev(n.a)) / self._f(self.ev(n.b))

    @rule(FCall)
    def fcall(self, n):
        vals = [self._f(self.ev(a)) for a in n.args]
        if not any(isinstance(v, torch.Tensor) for v in vals):
            vals[0] = torch.tensor(vals[0], dtype=self.fdtype)
        vals = [v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=self.fdtype)
                for v in vals]
        fn = n.fn
        if fn in ("min", "max"):
            acc = vals[0]
            for v in vals[1:]:
                acc = (torch.minimum if fn == "min" else torch.maximum)(acc, v)
            return acc
        x = vals[0]
        if fn == "step":
            return torch.where(x > 0, 1.0, torch.where(x < 0, 0.0, 0.5)).to(self.fdtype)
        return {"tanh": torch.tanh, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt,
                "abs": torch.abs, "sign": torch.sign}[fn](x)

    @rule(FSelect)
    def fselect(self, n):
        c, a, b = self.ev(n.cond), self._f(self.ev(n.a)), self._f(self.ev(n.b))
        if not _is_t(c, a, b):
            return a if c else b
        return torch.where(torch.as_tensor(c), _ftensor(a, self.fdtype),
                           _ftensor(b, self.fdtype))

    @rule(FTable)
    def ftable(self, n):
        i = self._list_index(n)
        if isinstance(i, torch.Tensor):
            return torch.tensor(n.values, dtype=self.fdtype, device=i.device)[i]
        return n.values[i]

    @rule(FLoad)
    def fload(self, n):
        return self._f(self.load(n))


def _ftensor(v, dtype) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=dtype)


def _tensor(v, fit) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.as_tensor(fit(v) if type(v) is int else v)


def _is_t(*xs) -> bool:
    return any(isinstance(x, torch.Tensor) for x in xs)


def _any_zero(d) -> bool:
    if isinstance(d, torch.Tensor):
        return bool((d == 0).any())
    return d == 0


def mask(node: Node, Lq: int, Lk: int, *, num_heads: int = 1, batch: int = 1,
         q_offset: int | None = None, inputs: Mapping[str, torch.Tensor] | None = None,
         device=None) -> torch.Tensor:
    """Dense mask ``[batch, num_heads, Lq, Lk]``: True where query row i may see key j.

    Exact for every call :func:`spattn.ir.bounds.check_call` accepts; the others raise its
    :class:`SpattnValueError` (a value the pattern needs exactly is beyond int64).
    """
    check_lengths(Lq, Lk, num_heads=num_heads, batch=batch)
    off = query_offset(Lq, Lk, q_offset)
    check_call(node, Lq, Lk, num_heads=num_heads, batch=batch, q_offset=off, inputs=inputs)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    env = {
        "q": (torch.arange(Lq, device=dev, dtype=torch.int64) + off).view(1, 1, Lq, 1),
        "k": torch.arange(Lk, device=dev, dtype=torch.int64).view(1, 1, 1, Lk),
        "h": torch.arange(num_heads, device=dev, dtype=torch.int64).view(1, num_heads, 1, 1),
        "b": torch.arange(batch, device=dev, dtype=torch.int64).view(batch, 1, 1, 1),
        "Lq": Lq, "Lk": Lk, "H": num_heads,
    }
    out = evaluate(node, env, inputs or {})
    out = torch.as_tensor(out, device=dev)
    return out.to(torch.bool).expand(batch, num_heads, Lq, Lk).contiguous()
