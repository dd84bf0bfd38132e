"""The test oracle for integer semantics: IR evaluated one (q, k) pair at a time on Python ints.

Written independently of the library's evaluators (no tensors, no visitor, no wrapping):
what the language means. ``scalar_mask`` gives the dense mask of a small call, and
``scalar_tiles`` the true tile classes; a pattern that is undefined somewhere (a divisor 0,
a list or input index out of range) raises :class:`Undefined`.
"""
from __future__ import annotations

import torch

from spattn.ir.nodes import (Abs, And, BoolConst, Const, FloorDiv, IsPow2, Load, Max, Min, Mod,
                             Not, Or, Prod, Range, Select, Sum, Table, Var)


class Undefined(Exception):
    """The pattern has no value at some point of the call."""


def scalar(n, env: dict, inputs: dict):
    """Value of node ``n`` at the point ``env`` (``q``, ``k``, ``h``, ``b``, ``Lq``, ``Lk``,
    ``H`` as ints); ``inputs``: name -> (nested list, number of leading [B, H] dims)."""
    if isinstance(n, (Const, BoolConst)):
        return n.value
    if isinstance(n, Var):
        return env[n.name]
    if isinstance(n, Sum):
        return n.const + sum(c * scalar(a, env, inputs) for a, c in n.terms)
    if isinstance(n, Prod):
        out = 1
        for f in n.factors:
            out *= scalar(f, env, inputs)
        return out
    if isinstance(n, (FloorDiv, Mod)):
        a, d = scalar(n.a, env, inputs), scalar(n.b, env, inputs)
        if d == 0:
            raise Undefined("division by zero")
        return a // d if isinstance(n, FloorDiv) else a % d
    if isinstance(n, Abs):
        return abs(scalar(n.a, env, inputs))
    if isinstance(n, (Min, Max)):
        vals = [scalar(a, env, inputs) for a in n.args]
        return min(vals) if isinstance(n, Min) else max(vals)
    if isinstance(n, Select):
        return scalar(n.a if scalar(n.cond, env, inputs) else n.b, env, inputs)
    if isinstance(n, Table):
        i = scalar(n.index, env, inputs)
        if not 0 <= i < len(n.values):
            raise Undefined("list index out of range")
        return n.values[i]
    if isinstance(n, Load):
        data, lead = inputs[n.name]
        if lead >= 1:
            data = data[env["b"] if len(data) > 1 else 0]
        if lead >= 2:
            data = data[env["h"] if len(data) > 1 else 0]
        for ix in n.index:
            i = scalar(ix, env, inputs)
            if not 0 <= i < len(data):
                raise Undefined("input index out of range")
            data = data[i]
        return data
    if isinstance(n, Range):
        x = scalar(n.x, env, inputs)
        return (n.lo is None or x >= n.lo) and (n.hi is None or x <= n.hi)
    if isinstance(n, IsPow2):
        x = scalar(n.a, env, inputs)
        return x > 0 and x & (x - 1) == 0
    if isinstance(n, Not):
        return not scalar(n.a, env, inputs)
    if isinstance(n, And):
        return all(scalar(a, env, inputs) for a in n.args)
    if isinstance(n, Or):
        return any(scalar(a, env, inputs) for a in n.args)
    raise TypeError(type(n).__name__)


def _lists(ir, inputs):
    from spattn.ir.nodes import loads
    dims = {ld.name: len(ld.index) for ld in loads(ir)}
    return {name: (t.tolist(), t.dim() - dims[name]) for name, t in (inputs or {}).items()
            if name in dims}


def scalar_mask(ir, Lq: int, Lk: int, *, H: int = 1, batch: int = 1, q_offset=None,
                inputs=None) -> torch.Tensor:
    """The exact dense mask ``bool [batch, H, Lq, Lk]``; raises :class:`Undefined`."""
    off = Lk - Lq if q_offset is None else q_offset
    ins = _lists(ir, inputs)
    out = torch.zeros(batch, H, Lq, Lk, dtype=torch.bool)
    for b in range(batch):
        for h in range(H):
            for i in range(Lq):
                for j in range(Lk):
                    env = {"q": i + off, "k": j, "h": h, "b": b, "Lq": Lq, "Lk": Lk, "H": H}
                    out[b, h, i, j] = bool(scalar(ir, env, ins))
    return out


def tiles_of(m: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    """True tile classes (0 EMPTY, 1 PARTIAL, 2 FULL) of a dense mask ``[B, H, Lq, Lk]``."""
    B, H, Lq, Lk = m.shape
    nq, nk = -(-Lq // bm), -(-Lk // bn)
    pad = torch.zeros(B, H, nq * bm, nk * bn, dtype=torch.int32)
    valid = torch.zeros_like(pad)
    pad[..., :Lq, :Lk] = m.to(torch.int32)
    valid[..., :Lq, :Lk] = 1
    t = pad.view(B, H, nq, bm, nk, bn).sum((3, 5))
    v = valid.view(B, H, nq, bm, nk, bn).sum((3, 5))
    return torch.where(t == 0, 0, torch.where(t == v, 2, 1)).to(torch.int8)


def scalar_tiles(ir, Lq, Lk, bm, bn, **kw) -> torch.Tensor:
    """True tile classes of the call, from :func:`scalar_mask`."""
    return tiles_of(scalar_mask(ir, Lq, Lk, **kw), bm, bn)


def unsound(got: torch.Tensor, want: torch.Tensor) -> int:
    """Tiles called EMPTY or FULL that are not."""
    return int(((got != want) & (got != 1)).sum())
