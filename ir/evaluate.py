"""Reference semantics: evaluate IR on tensors of positions with torch.

This is the meaning of a pattern, against which every analysis and kernel is
checked. ``evaluate`` is generic over broadcastable integer tensors, so the
same code computes the dense mask ``[B, H, Lq, Lk]`` and the predicate at
chosen points (the exact refinement of tile classes evaluates it at one
representative point per cell).

Runtime inputs: an input used with ``n`` index dimensions is given as a tensor
of ``n`` dimensions (shared by the batch and heads), ``n + 1`` (``[B, ...]``)
or ``n + 2`` (``[B, H, ...]``) dimensions; a size-1 batch or head dimension
broadcasts. Integer and bool dtypes are accepted; elements are integers.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..dsl.errors import SpattnInputError, SpattnValueError
from .inputs import check_lengths, query_offset
from .nodes import (Abs, And, BoolConst, Const, FloorDiv, IsPow2, Load, Max, Min, Mod, Node,
                    Not, Or, Prod, Range, Select, Sum, Table, Var)


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
             memo: dict | None = None):
    """Value of ``node`` with variables bound by ``env`` (ints or broadcastable int64 tensors).

    Bool nodes give bool tensors (or Python bools when nothing is a tensor).
    Common sub-expressions are computed once (``memo``).
    """
    memo = {} if memo is None else memo
    inputs = inputs or {}

    def ev(n: Node):
        if n in memo:
            return memo[n]
        v = _ev(n)
        memo[n] = v
        return v

    def _ev(n: Node):
        if isinstance(n, Const):
            return n.value
        if isinstance(n, BoolConst):
            return n.value
        if isinstance(n, Var):
            return env[n.name]
        if isinstance(n, Sum):              # no products by 1 or -1 (device ops on tensors)
            acc = None
            for a, c in n.terms:
                v = ev(a)
                if acc is None:
                    acc = v if c == 1 else -v if c == -1 else c * v
                else:
                    acc = acc + v if c == 1 else acc - v if c == -1 else acc + c * v
            return acc + n.const if n.const else acc
        if isinstance(n, Prod):
            acc = 1
            for f in n.factors:
                acc = acc * ev(f)
            return acc
        if isinstance(n, (FloorDiv, Mod)):
            a, d = ev(n.a), ev(n.b)
            if _any_zero(d):
                raise SpattnValueError(f"the divisor {n.b} evaluates to 0")
            if isinstance(n, FloorDiv):
                return torch.div(a, d, rounding_mode="floor") if _is_t(a, d) else a // d
            return torch.remainder(a, d) if _is_t(a, d) else a % d
        if isinstance(n, Abs):
            a = ev(n.a)
            return a.abs() if isinstance(a, torch.Tensor) else abs(a)
        if isinstance(n, (Min, Max)):
            vals = [ev(a) for a in n.args]
            acc = vals[0]
            for v in vals[1:]:
                if _is_t(acc, v):
                    acc = (torch.minimum if isinstance(n, Min) else torch.maximum)(
                        torch.as_tensor(acc), torch.as_tensor(v))
                else:
                    acc = min(acc, v) if isinstance(n, Min) else max(acc, v)
            return acc
        if isinstance(n, Select):
            c, a, b = ev(n.cond), ev(n.a), ev(n.b)
            if _is_t(c, a, b):
                return torch.where(torch.as_tensor(c), torch.as_tensor(a), torch.as_tensor(b))
            return a if c else b
        if isinstance(n, Table):
            i = ev(n.index)
            vals = torch.tensor(n.values, dtype=torch.int64)
            lo, hi = (int(i.min()), int(i.max())) if isinstance(i, torch.Tensor) else (i, i)
            if lo < 0 or hi >= len(n.values):
                raise SpattnValueError(
                    f"list {list(n.values)} has {len(n.values)} entries but is indexed with "
                    f"{n.index} taking values {lo}..{hi}")
            if isinstance(i, torch.Tensor):
                return vals.to(i.device)[i]
            return n.values[i]
        if isinstance(n, Load):
            if n.name not in inputs:
                raise SpattnInputError(f"missing runtime input {n.name!r}")
            idx = [torch.as_tensor(ev(i), dtype=torch.int64) for i in n.index]
            return gather(n.name, inputs[n.name], idx, env.get("b", 0), env.get("h", 0))
        if isinstance(n, Range):
            x = ev(n.x)
            out = True
            if n.lo is not None:
                out = x >= n.lo
            if n.hi is not None:
                out = (x <= n.hi) if out is True else (out & (x <= n.hi))
            return out
        if isinstance(n, IsPow2):
            x = ev(n.a)
            if isinstance(x, torch.Tensor):
                return (x > 0) & ((x & (x - 1)) == 0)
            return x > 0 and x & (x - 1) == 0
        if isinstance(n, Not):
            a = ev(n.a)
            return ~a if isinstance(a, torch.Tensor) else not a
        if isinstance(n, (And, Or)):
            acc = None
            for a in n.args:
                v = ev(a)
                if acc is None:
                    acc = v
                elif isinstance(n, And):
                    acc = acc & v
                else:
                    acc = acc | v
            return acc
        raise TypeError(f"cannot evaluate {n!r}")

    return ev(node)


def _is_t(*xs) -> bool:
    return any(isinstance(x, torch.Tensor) for x in xs)


def _any_zero(d) -> bool:
    if isinstance(d, torch.Tensor):
        return bool((d == 0).any())
    return d == 0


def mask(node: Node, Lq: int, Lk: int, *, num_heads: int = 1, batch: int = 1,
         q_offset: int | None = None, inputs: Mapping[str, torch.Tensor] | None = None,
         device=None) -> torch.Tensor:
    """Dense mask ``[batch, num_heads, Lq, Lk]``: True where query row i may see key j."""
    check_lengths(Lq, Lk, num_heads=num_heads, batch=batch)
    off = query_offset(Lq, Lk, q_offset)
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
