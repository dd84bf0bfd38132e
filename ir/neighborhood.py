"""Neighbourhood attention over a grid of tokens, as IR: NATTEN's semantics per axis.

The tokens are the cells of ``shape`` (1 to 4 axes) flattened row-major: position ``x``
sits at coordinate ``(x // stride_a) % shape[a]`` on axis ``a`` (:func:`coordinate`). Per
axis, with kernel size ``K``, stride ``s``, dilation ``d`` and causality:

* **dilation**: a query attends only within its residue class ``c % d``; within the class,
  coordinates are member numbers ``m = c // d`` and the class has
  ``n // d + (c % d < n % d)`` members;
* **stride**: the queries of a stride group (``m // s``) share the window of the group's
  leader: the centre member ``(m // s) * s + s // 2`` (the right one of the two centres when
  ``s`` is even), or the last member of the group when causal; a leader past the axis is
  its last member;
* **window**, not causal: ``K // 2`` members left of the leader and ``K // 2`` right of it
  (``K // 2 - 1`` right when ``K`` is even), shifted, not cut, at the borders: always ``K``
  members;
* **window**, causal: the keys ``k <= m`` with ``leader - k < K`` (cut at the start).

A query attends to a key when every axis allows it. Used by ``spattn.neighborhood`` and by
the language's builtins ``neighborhood(...)`` and ``coord(x, shape, axis)``.
"""
from __future__ import annotations

import math
import numbers

from ..dsl.errors import SpattnParamError, SpattnValueError, is_bool, short_repr
from . import build as B
from .nodes import Node

__all__ = ["neighborhood_ir", "coordinate", "check_shape", "check_extra", "MAX_AXES",
           "MAX_TOKENS"]

MAX_AXES = 4
#: The most tokens a grid may have (its cells, plus the extra tokens before and after it): a
#: call's length and its positions ``0 .. L - 1`` are 64-bit integers (torch sizes are
#: int64), so a larger grid could never be called.
MAX_TOKENS = 2 ** 63 - 1


def _is_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Integral)


def check_shape(shape) -> tuple[int, ...]:
    """``shape`` as a tuple of 1 to :data:`MAX_AXES` positive ints (SpattnParamError)."""
    if _is_int(shape):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or not 1 <= len(shape) <= MAX_AXES or any(
            not _is_int(n) or n < 1 for n in shape):
        raise SpattnParamError(f"shape must be 1 to {MAX_AXES} positive ints (the grid, "
                               f"row-major), got {short_repr(shape)}")
    if math.prod(int(n) for n in shape) > MAX_TOKENS:
        raise SpattnParamError(f"shape {tuple(int(n) for n in shape)} has "
                               f"{math.prod(int(n) for n in shape)} cells, more than a call "
                               f"can have ({MAX_TOKENS} = 2**63 - 1: lengths and positions "
                               "are 64-bit integers)")
    return tuple(int(n) for n in shape)


def check_extra(name: str, value) -> int:
    """A count of extra tokens beside the grid: an int >= 0 (SpattnParamError naming
    ``name``)."""
    if not _is_int(value) or value < 0:
        raise SpattnParamError(f"{name} takes an int >= 0 (extra tokens beside the grid), "
                               f"got {short_repr(value)}")
    return int(value)


def _per_axis(name: str, value, d: int, kind) -> tuple:
    vals = tuple(value) if isinstance(value, (tuple, list)) else (value,) * d
    if len(vals) != d:
        raise SpattnParamError(f"{name} has {len(vals)} entries {short_repr(value)} but shape "
                               f"has {d} axes: give one value, or one per axis")
    for v in vals:
        if kind is bool:
            if not is_bool(v):
                raise SpattnParamError(f"{name} takes bools (one, or one per axis), got "
                                       f"{short_repr(value)}")
        elif not _is_int(v):
            raise SpattnParamError(f"{name} takes positive ints (one, or one per axis), got "
                                   f"{short_repr(value)}")
    return tuple(bool(v) if kind is bool else int(v) for v in vals)


def coordinate(x: Node, shape: tuple[int, ...], axis: int) -> Node:
    """IR of the coordinate of position ``x`` on ``axis`` of ``shape`` (row-major)."""
    if not _is_int(axis) or not 0 <= axis < len(shape):
        raise SpattnValueError(f"axis {short_repr(axis)} is not an axis of the grid "
                               f"{shape} (0..{len(shape) - 1})")
    c = B.floordiv(x, B.const(math.prod(shape[axis + 1:])))
    return c if axis == 0 else B.mod(c, B.const(shape[axis]))


def _axis(q: Node, k: Node, n: int, K: int, s: int, d: int, causal: bool) -> Node:
    """The condition of one axis on coordinates ``q``, ``k`` (module docstring)."""
    qm, km = B.floordiv(q, B.const(d)), B.floordiv(k, B.const(d))
    conds = []
    if d > 1:
        conds.append(B.cmp("==", B.mod(q, B.const(d)), B.mod(k, B.const(d))))
    members = B.const(n // d)
    if n % d:
        members = B.add(members, B.select(B.cmp("<", B.mod(q, B.const(d)), B.const(n % d)),
                                          B.const(1), B.const(0)))
    last = B.sub(members, B.const(1))
    group = B.scale(B.floordiv(qm, B.const(s)), s)
    if causal:
        leader = qm if s == 1 else B.min_(B.add(group, B.const(s - 1)), last)
        conds += [B.cmp("<=", km, qm), B.cmp("<", B.sub(leader, km), B.const(K))]
    else:
        leader = qm if s == 1 else B.min_(B.add(group, B.const(s // 2)), last)
        start = B.clamp(B.sub(leader, B.const(K // 2)), B.const(0), B.sub(members, B.const(K)))
        conds += [B.cmp("<=", start, km), B.cmp("<", km, B.add(start, B.const(K)))]
    return B.and_(*conds)


def neighborhood_ir(shape, kernel_size, stride=1, dilation=1, is_causal=False, *,
                    extra_before: int = 0, extra_after: int = 0) -> Node:
    """The pattern (module docstring); each argument one value or one per axis. Raises
    :class:`~spattn.SpattnParamError` / :class:`~spattn.SpattnValueError` naming the
    argument (and axis) that does not fit. ``extra_before`` / ``extra_after``: tokens
    before and after the grid's cells (text beside an image): every cell also attends to
    them (NATTEN's additional keys), and they attend to every token."""
    T = check_extra("extra_before", extra_before)
    U = check_extra("extra_after", extra_after)
    shape = check_shape(shape)
    if T + math.prod(shape) + U > MAX_TOKENS:
        raise SpattnParamError(f"extra_before={T} and extra_after={U} around the grid {shape} "
                               f"make {T + math.prod(shape) + U} tokens, more than a call can "
                               f"have ({MAX_TOKENS} = 2**63 - 1: lengths and positions are "
                               "64-bit integers)")
    d = len(shape)
    ks = _per_axis("kernel_size", kernel_size, d, int)
    st = _per_axis("stride", stride, d, int)
    di = _per_axis("dilation", dilation, d, int)
    ca = _per_axis("is_causal", is_causal, d, bool)
    for a, (n, K, s, dl) in enumerate(zip(shape, ks, st, di)):
        if K < 1:
            raise SpattnValueError(f"kernel_size[{a}] is {K}: it must be >= 1")
        if dl < 1:
            raise SpattnValueError(f"dilation[{a}] is {dl}: it must be >= 1")
        if K * dl > n:
            raise SpattnValueError(f"kernel_size[{a}] * dilation[{a}] = {K} * {dl} = {K * dl} "
                                   f"exceeds axis {a} of shape {shape} ({n} cells): the kernel "
                                   "does not fit its axis")
        if not 1 <= s <= K:
            raise SpattnValueError(f"stride[{a}] is {s}: it must be in 1..kernel_size[{a}] "
                                   f"= {K}")
    q, k = B.var("q"), B.var("k")
    if T:
        q, k = B.sub(q, B.const(T)), B.sub(k, B.const(T))
    cells = B.and_(*(_axis(coordinate(q, shape, a), coordinate(k, shape, a), n, K, s, dl, c)
                     for a, (n, K, s, dl, c) in enumerate(zip(shape, ks, st, di, ca))))
    if not T and not U:
        return cells
    end = T + math.prod(shape)
    extra = []
    for x in (B.var("q"), B.var("k")):
        if T:
            extra.append(B.cmp("<", x, B.const(T)))
        if U:
            extra.append(B.cmp(">=", x, B.const(end)))
    return B.or_(cells, *extra)
