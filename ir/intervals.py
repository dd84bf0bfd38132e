"""Sound interval arithmetic over the IR, vectorised with torch.

Every int node gets an interval ``(lo, hi)`` of int64 tensors and every bool
node a three-valued pair ``(can_be_true, can_be_false)`` of bool tensors, all
broadcastable to ``[B, H, nq, nk]`` (one entry per tile and head). The
variables are bound by an environment:

* ``q``, ``k``: intervals (a tile's first and last position), typically
  shaped ``[1, 1, nq, 1]`` and ``[1, 1, 1, nk]``;
* ``h``, ``b``: points (one head / batch entry per element), ``[1, H, 1, 1]``
  and ``[B, 1, 1, 1]``;
* ``Lq``, ``Lk``, ``H``: Python ints.

Soundness: the true value of a node at every point of the box lies in its
interval; a bool node that is true somewhere has ``can_be_true`` set, false
somewhere ``can_be_false``. Precision: a ``Sum`` is exact for independent
atoms (q and k are independent over a tile box, so ``q - k`` is exact); the
comparison of a single exact affine form is exact; ``&``/``|`` of several atoms
are exact only per atom (the refinement in :mod:`spattn.ir.tiles` makes the
combination exact for affine patterns).

Integers: the tensors hold int64 and the rules are exact for every call that
:func:`spattn.ir.bounds.check_call` accepts (its bounds over the whole call
contain every interval computed here): sums wrap modulo ``2**64`` (exact: their
values are in int64, or they feed only equalities), comparison bounds beyond
int64 fold, a constant divisor beyond int64 gives quotient 0 or -1, and the
equalities the check lists as ``wrapped`` (a sum beyond int64, such as
``doc[q] - doc[k]`` with 64-bit ids) are tested modulo ``2**64``
(:meth:`IntervalEval._wrapped_equality`). Without ``wrapped`` entries there is
no extra device work.

Runtime inputs enter through per-tile summaries computed on the device: a 1-D
input by gathering the entries each tile covers when their count has a static
bound of at most ``GATHER_WIDTH`` (``doc[q]`` over a tile: the tile's width),
else through a sparse table (range min/max in O(1) per query after an
O(n log n) build); an n-D input by gathering the covered entries when every
tile's index box is small (at most ``NARROW_GATHER`` entries; widths bounded
statically where :func:`static_width` can, else read from the device),
otherwise the min/max of the whole input (per batch/head slice; this marks the
evaluator ``coarse``).

Also here: :func:`index_hull` / :func:`check_input_bounds` (no kernel ever
reads an input out of bounds) and :func:`lift` (pushes ``abs``/``min``/``max``/
``if`` out of comparisons, so that every comparison is over a plain affine
form; used by the exact refinement and by the closed-form key ranges).
"""
from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import Mapping

import torch

from ..dsl.errors import SpattnInputError, SpattnValueError
from . import build as B
from .bounds import INT64, check_call, static_names, wrap
from .evaluate import _as_full, evaluate
from .inputs import query_offset
from .nodes import (Abs, And, BoolConst, Const, FloorDiv, IsPow2, Load, Max, Min, Mod, Node,
                    Not, Or, Prod, Range, Select, Sum, Table, Var, free_vars, walk)
from .visitor import MaskPass, Visitor, rule

#: n-D inputs are summarised by gathering the covered entries when every tile covers at most
#: this many of them; above it the whole input's min/max is used.
NARROW_GATHER = 256
#: A 1-D input whose index provably spans at most this many positions per box (``env``'s
#: ``widths``: the tile sizes) is summarised by gathering those positions: a few device ops,
#: where a sparse table costs ~6 per level of log2(length) (the setup of a new shape).
GATHER_WIDTH = 512
#: ... as long as the gather holds at most this many elements.
GATHER_ELEMS = 1 << 24

I64 = torch.int64
_LO, _HI = INT64


# ------------------------------------------------------------ static widths and intervals

class _Width(Visitor):
    """:func:`static_width`'s rules (None for any node type without one)."""

    @rule(default=True)
    def other(self, n, widths, origins):
        return None

    @rule(Const)
    def const(self, n, widths, origins):
        return 1

    @rule(Var)
    def var(self, n, widths, origins):
        return widths.get(n.name)

    @rule(Sum)
    def sum(self, n, widths, origins):
        total = 1
        for t, c in n.terms:
            w = self(t, widths, origins)
            if w is None:
                return None
            total += abs(c) * (w - 1)
        return total

    @rule(FloorDiv)
    def floordiv(self, n, widths, origins):
        if not (isinstance(n.b, Const) and n.b.value > 0):
            return None
        m = n.b.value
        terms, c = B.linear(n.a)
        if origins and len(terms) == 1:
            ((v, coef),) = terms.items()
            W = widths.get(v.name) if isinstance(v, Var) else None
            if coef == 1 and W and v.name in origins:
                # x = v + c starts at phase p = (origin + c + i*W) % m, p = r mod gcd(W, m):
                # at most (p + W - 1) // m + 1 chunks, the largest p being m - g + r
                g = math.gcd(W, m)
                return (m - g + (origins[v.name] + c) % g + W - 1) // m + 1
        w = self(n.a, widths, origins)
        return None if w is None else (w + m - 2) // m + 1


_width = _Width()


def static_width(n: Node, widths, origins=None) -> int | None:
    """A bound on ``hi - lo + 1`` of ``n``'s interval over any box of the environment whose
    variables span at most ``widths[name]`` values (points: 1); None when not affine in them
    (or ``//`` of such by a positive constant). ``origins``: ``{name: o}`` when every box of
    that variable starts at ``o`` plus a multiple of its width (the tile grid), which makes
    ``q // m`` exact: a tile of ``W`` rows covers ``W // m`` chunks when ``m | W``."""
    if widths is None:
        return None
    return _width(n, widths, origins)


class _StaticInterval(Visitor):
    """:func:`static_interval`'s rules (None for any node type without one)."""

    @rule(default=True)
    def other(self, n, box):
        return None

    @rule(Const)
    def const(self, n, box):
        return n.value, n.value

    @rule(Var)
    def var(self, n, box):
        v = box.get(n.name)
        if v is None:
            return None
        return v if isinstance(v, tuple) else (v, v)

    @rule(Sum)
    def sum(self, n, box):
        lo = hi = n.const
        for a, c in n.terms:
            iv = self(a, box)
            if iv is None:
                return None
            lo, hi = (lo + iv[0] * c, hi + iv[1] * c) if c > 0 else (lo + iv[1] * c, hi + iv[0] * c)
        return lo, hi

    @rule(FloorDiv)
    def floordiv(self, n, box):
        if not (isinstance(n.b, Const) and n.b.value != 0):
            return None
        iv = self(n.a, box)
        if iv is None:
            return None
        d = n.b.value
        return (iv[0] // d, iv[1] // d) if d > 0 else (iv[1] // d, iv[0] // d)


_static_interval = _StaticInterval()


def static_interval(n: Node, box: Mapping[str, object]):
    """``n``'s interval as Python ints over ``box`` (``q``, ``k``, ``b``, ``h`` -> ``(lo,
    hi)``; ``Lq``, ``Lk``, ``H`` -> ints), by the rules of :class:`IntervalEval`, for
    constants, those variables, sums and ``//`` by a constant; None for anything else."""
    return _static_interval(n, box)


def _t(v, device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, bool):
        return torch.tensor(v, dtype=torch.bool, device=device)
    return torch.tensor(int(v), dtype=I64, device=device)


def _floordiv(a, d):
    return torch.div(a, d, rounding_mode="floor")


def _ule(a, b):
    """``a <= b`` for int64 tensors read as unsigned 64-bit integers."""
    return torch.bitwise_xor(a, _LO) <= torch.bitwise_xor(b, _LO)


# ------------------------------------------------------------ range min/max

class RangeMinMax:
    """Sparse tables over the last dim of a ``[B', H', n]`` tensor: min/max over ``[lo, hi]``."""

    def __init__(self, t: torch.Tensor):
        n = t.shape[-1]
        self.n = n
        levels_min = [t]
        levels_max = [t]
        j = 1
        while (1 << j) <= n:
            half = 1 << (j - 1)
            pm, px = levels_min[-1], levels_max[-1]
            m = torch.minimum(pm[..., :-half], pm[..., half:])
            x = torch.maximum(px[..., :-half], px[..., half:])
            pad = n - m.shape[-1]
            levels_min.append(torch.nn.functional.pad(m, (0, pad), value=0))
            levels_max.append(torch.nn.functional.pad(x, (0, pad), value=0))
            # keep levels the same length (padding is never read)
            levels_min[-1] = levels_min[-1][..., :n]
            levels_max[-1] = levels_max[-1][..., :n]
            j += 1
        self.mins = torch.stack(levels_min)   # [levels, B', H', n]
        self.maxs = torch.stack(levels_max)
        # floor(log2(len)) for len in 0..n
        lg = torch.zeros(n + 1, dtype=I64, device=t.device)
        if n >= 2:
            ar = torch.arange(2, n + 1, device=t.device)
            lg[2:] = torch.floor(torch.log2(ar.to(torch.float64))).to(I64)
            # correct float rounding
            lg[2:] -= ((1 << lg[2:]) > ar).to(I64)
            lg[2:] += ((1 << (lg[2:] + 1)) <= ar).to(I64)
        self.log = lg

    def query(self, lo, hi, bi, hi_):
        """min/max over ``[lo, hi]`` (clamped); ``bi``/``hi_``: index tensors or Python ints.

        Python ints select a view first: a 0-dim tensor used as an index is read on the host
        (a device synchronisation), so callers pass ints for broadcast (size-1) dims.
        """
        scalar = lo.dim() == 0 and hi.dim() == 0
        if scalar:          # a 0-dim index tensor would be read on the host: index with (1,)
            lo, hi = lo.reshape(1), hi.reshape(1)
        lo = lo.clamp(0, self.n - 1)
        hi = torch.maximum(hi.clamp(0, self.n - 1), lo)
        j = self.log[hi - lo + 1]
        other = hi - (1 << j) + 1
        mins, maxs = self.mins, self.maxs
        if isinstance(bi, int) and isinstance(hi_, int):
            mins, maxs = mins[:, bi, hi_], maxs[:, bi, hi_]
            ix, ox = (j, lo), (j, other)
        else:
            ix, ox = (j, bi, hi_, lo), (j, bi, hi_, other)
        mn = torch.minimum(mins[ix], mins[ox])
        mx = torch.maximum(maxs[ix], maxs[ox])
        if scalar and mn.dim() == 1:
            mn, mx = mn.reshape(()), mx.reshape(())
        return mn, mx



# ------------------------------------------------------------ the evaluator

def junction3(conj: bool, vals):
    """Three-valued ``&`` (``conj``) or ``|`` of ``(can_be_true, can_be_false)`` pairs."""
    ct, cf = vals[0]
    for a_ct, a_cf in vals[1:]:
        ct, cf = (ct & a_ct, cf | a_cf) if conj else (ct | a_ct, cf & a_cf)
    return ct, cf


_MISSING = object()


class IntervalEval(MaskPass):
    """Interval / three-valued evaluation of IR nodes over a box environment.

    ``env``: ``q``, ``k`` -> ``(lo, hi)`` tensors; ``h``, ``b`` -> point tensors;
    ``Lq``, ``Lk``, ``H`` -> ints; optionally ``widths``: ``{name: most values a box spans}``
    (the tile sizes; lets narrow 1-D loads gather instead of building a sparse table).
    ``inputs``: validated int64 tensors.
    ``on_load(load, index_intervals, tensor)`` is called before each load is summarised
    (used to check bounds). ``summaries`` caches sparse tables between evaluators.
    ``wrapped``: the equality ranges to test modulo ``2**64``
    (:attr:`spattn.ir.bounds.Checked.wrapped` of the call).
    """

    complete = True

    def __init__(self, env: Mapping[str, object], inputs: Mapping[str, torch.Tensor] | None = None,
                 *, device=None, on_load=None, summaries: dict | None = None,
                 wrapped: frozenset = frozenset()):
        self.env = env
        self.inputs = inputs or {}
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.on_load = on_load
        self.summaries = {} if summaries is None else summaries
        self.wrapped = wrapped
        self.memo: dict = {}
        #: set when an n-D input was summarised by its whole-input min/max (the one summary
        #: that depends on the other boxes evaluated together, not on a box alone)
        self.coarse = False

    # -- public -----------------------------------------------------------
    def int_(self, n: Node):
        """``(lo, hi)`` of an int node."""
        v = self.memo.get(n, _MISSING)
        if v is _MISSING:
            v = self.memo[n] = self(n)
        return v

    #: ``(can_be_true, can_be_false)`` of a bool node (one memo for both kinds of node)
    bool_ = int_

    def _static_int(self, n: Node):
        """``n``'s value as a Python int when it is one for the whole environment: a constant,
        or arithmetic of ``Lq``, ``Lk``, ``H`` bound to ints (``k % H``); else None."""
        if isinstance(n, Const):
            return n.value
        names = static_names(n)
        if names is None or not all(type(self.env.get(x)) is int for x in names):
            return None
        v = evaluate(n, {x: self.env[x] for x in names})
        return v if type(v) is int else None

    # -- int ---------------------------------------------------------------
    @rule(Const)
    def const(self, n):
        # a constant node is read by min/max, where saturating is exact, or must be in int64
        v = _t(min(max(n.value, _LO), _HI), self.device)
        return v, v

    @rule(Var)
    def var(self, n):
        v = self.env[n.name]
        if isinstance(v, tuple):
            return _t(v[0], self.device), _t(v[1], self.device)
        v = _t(v, self.device)
        return v, v

    @rule(Sum)
    def sum(self, n):
        lo = hi = None
        neg = []     # coefficient -1 terms are subtracted (no negation, no product)
        for a, c in n.terms:
            alo, ahi = self.int_(a)
            if c == -1 and lo is not None:
                neg.append((alo, ahi))
                continue
            if not _LO <= c <= _HI:       # exact modulo 2**64 (the endpoints keep their order)
                tl, th = (alo * wrap(c), ahi * wrap(c)) if c > 0 else (ahi * wrap(c), alo * wrap(c))
            elif c == 1:
                tl, th = alo, ahi
            elif alo is ahi:
                tl = th = alo * c
            elif c > 0:
                tl, th = alo * c, ahi * c
            else:
                tl, th = ahi * c, alo * c
            if lo is None:
                lo, hi = tl, th
            elif lo is hi and tl is th:
                lo = hi = lo + tl
            else:
                lo, hi = lo + tl, hi + th
        for alo, ahi in neg:
            if lo is hi and alo is ahi:
                lo = hi = lo - alo
            else:
                lo, hi = lo - ahi, hi - alo
        const = n.const if _LO <= n.const <= _HI else wrap(n.const)
        if const:
            if lo is hi:
                lo = hi = lo + const
            else:
                lo, hi = lo + const, hi + const
        return lo, hi

    @rule(Prod)
    def prod(self, n):
        lo, hi = self.int_(n.factors[0])
        for f in n.factors[1:]:
            flo, fhi = self.int_(f)
            c = (lo * flo, lo * fhi, hi * flo, hi * fhi)
            lo = torch.minimum(torch.minimum(c[0], c[1]), torch.minimum(c[2], c[3]))
            hi = torch.maximum(torch.maximum(c[0], c[1]), torch.maximum(c[2], c[3]))
        return lo, hi

    @rule(FloorDiv, Mod)
    def division(self, n):
        alo, ahi = self.int_(n.a)
        floor = isinstance(n, FloorDiv)
        d = self._static_int(n.b)
        if d is not None:               # the common case: no device check, no sync
            if d == 0:
                raise SpattnValueError(f"the divisor {n.b} evaluates to 0")
            if not _LO <= d <= _HI:
                return _huge_division(alo, ahi, d, floor)
            if alo is ahi and floor:
                v = _floordiv(alo, d)
                return v, v
            qlo, qhi = _floordiv(alo, d), _floordiv(ahi, d)
            if floor:
                return (qlo, qhi) if d > 0 else (qhi, qlo)
            same = qlo == qhi
            mlo, mhi = torch.remainder(alo, d), torch.remainder(ahi, d)
            return torch.where(same, mlo, min(d + 1, 0)), torch.where(same, mhi, max(d - 1, 0))
        dlo, dhi = self.int_(n.b)
        if bool((dlo != dhi).any()):   # cannot happen: divisors are uniform
            raise SpattnValueError(f"the divisor {n.b} is not uniform")
        d = dlo
        if bool((d == 0).any()):
            raise SpattnValueError(f"the divisor {n.b} evaluates to 0")
        qlo, qhi = _floordiv(alo, d), _floordiv(ahi, d)
        if floor:
            pos = d > 0
            return torch.where(pos, qlo, qhi), torch.where(pos, qhi, qlo)
        same = qlo == qhi
        mlo, mhi = torch.remainder(alo, d), torch.remainder(ahi, d)
        glo = torch.minimum(d + 1, torch.zeros_like(d))
        ghi = torch.maximum(d - 1, torch.zeros_like(d))
        return torch.where(same, mlo, glo), torch.where(same, mhi, ghi)

    @rule(Abs)
    def abs(self, n):
        lo, hi = self.int_(n.a)
        if lo is hi:
            v = lo.abs()
            return v, v
        alo = torch.where(lo >= 0, lo, torch.where(hi <= 0, -hi, torch.zeros_like(lo)))
        ahi = torch.maximum(lo.abs(), hi.abs())
        return alo, ahi

    @rule(Min, Max)
    def minmax(self, n):
        f = torch.minimum if isinstance(n, Min) else torch.maximum
        lo, hi = self.int_(n.args[0])
        for a in n.args[1:]:
            alo, ahi = self.int_(a)
            lo, hi = f(lo, alo), f(hi, ahi)
        return lo, hi

    @rule(Select)
    def select(self, n):
        ct, cf = self.bool_(n.cond)
        alo, ahi = self.int_(n.a)
        blo, bhi = self.int_(n.b)
        both = ct & cf
        lo = torch.where(both, torch.minimum(alo, blo), torch.where(ct, alo, blo))
        hi = torch.where(both, torch.maximum(ahi, bhi), torch.where(ct, ahi, bhi))
        return lo, hi

    @rule(Table)
    def table(self, n):
        ilo, ihi = self.int_(n.index)
        nvals = len(n.values)
        if bool((ihi < 0).any()) or bool((ilo >= nvals).any()):
            from .printer import to_source
            heads = ""
            if "h" in self.env and "h" in free_vars(n.index):
                heads = f" ({int(self.var(Var('h'))[1].max()) + 1} heads: give one entry " \
                        "per head, or guard the index)"
            raise SpattnValueError(
                f"list {list(n.values)} has {nvals} entries but is indexed with "
                f"{to_source(n.index)} taking values in {int(ilo.min())}..{int(ihi.max())}, "
                f"outside 0..{nvals - 1}{heads}")
        key = ("table", n.values)
        if key not in self.summaries:
            vals = torch.tensor([v if _LO <= v <= _HI else wrap(v) for v in n.values],
                                dtype=I64, device=self.device).view(1, 1, -1)
            self.summaries[key] = RangeMinMax(vals)
        return self.summaries[key].query(ilo, ihi, 0, 0)

    @rule(Load)
    def load(self, n: Load):
        idx = [self.int_(i) for i in n.index]
        t = self.inputs.get(n.name)
        if t is None:
            raise SpattnInputError(f"missing runtime input {n.name!r}")
        if self.on_load is not None:
            self.on_load(n, idx, t)
        nd = len(n.index)
        full = _as_full(t, nd)
        dev = full.device
        # Python 0 (not a 0-dim tensor: indexing with one reads it on the host) for size-1 dims
        bi = _t(self.env.get("b", 0), dev) if full.shape[0] > 1 else 0
        hi_ = _t(self.env.get("h", 0), dev) if full.shape[1] > 1 else 0
        sizes = full.shape[2:]
        clamped = []
        for (lo, hi), s in zip(idx, sizes):
            lo = lo.clamp(0, s - 1)
            clamped.append((lo, torch.maximum(hi.clamp(0, s - 1), lo)))
        idx = clamped
        origins = self.env.get("origins")
        if nd == 1:
            w = static_width(n.index[0], self.env.get("widths"), origins)
            lo, hi = idx[0]
            if w is not None and w <= GATHER_WIDTH and lo.numel() * w <= GATHER_ELEMS:
                pos = torch.minimum(lo.unsqueeze(-1) + torch.arange(w, dtype=I64, device=dev),
                                    hi.unsqueeze(-1))
                if isinstance(bi, int) and isinstance(hi_, int):
                    v = full[bi, hi_][pos]
                else:
                    bix = bi.unsqueeze(-1) if isinstance(bi, torch.Tensor) else bi
                    hix = hi_.unsqueeze(-1) if isinstance(hi_, torch.Tensor) else hi_
                    v = full[bix, hix, pos]
                return v.amin(-1), v.amax(-1)
            key = ("load", n.name, id(t))
            if key not in self.summaries:
                self.summaries[key] = RangeMinMax(full)
            lo, hi = idx[0]
            return self.summaries[key].query(lo, hi, bi, hi_)
        # static widths (no device read) when they keep the box summaries gathered: more
        # offsets than a box needs repeat its last entry, the same min/max
        widths = [static_width(i, self.env.get("widths"), origins) for i in n.index]
        if None in widths or math.prod(widths) > NARROW_GATHER:
            widths = [int((hi - lo).max()) + 1 for lo, hi in idx]
        if math.prod(widths) <= NARROW_GATHER:
            mn = mx = None
            at = [[lo] + [torch.minimum(lo + o, hi) for o in range(1, w)]   # lo <= hi
                  for (lo, hi), w in zip(idx, widths)]
            for offs in itertools.product(*(range(w) for w in widths)):
                v = full[(bi, hi_, *(a[o] for a, o in zip(at, offs)))]
                mn = v if mn is None else torch.minimum(mn, v)
                mx = v if mx is None else torch.maximum(mx, v)
            return mn, mx
        self.coarse = True
        flat = full.reshape(full.shape[0], full.shape[1], -1)
        mn = flat.min(dim=-1).values[bi, hi_]
        mx = flat.max(dim=-1).values[bi, hi_]
        return mn, mx

    # -- bool --------------------------------------------------------------
    @rule(BoolConst)
    def bool_const(self, n):
        return _t(n.value, self.device), _t(not n.value, self.device)

    @rule(Range)
    def range(self, n):
        if n in self.wrapped:
            return self._wrapped_equality(n)
        lo, hi = self.int_(n.x)
        blo, bhi = n.lo, n.hi
        # x is in int64 (bounds.check_call): a bound beyond it folds, never wraps
        if (blo is not None and blo > _HI) or (bhi is not None and bhi < _LO):
            return torch.zeros_like(lo, dtype=torch.bool), torch.ones_like(lo, dtype=torch.bool)
        blo = None if blo is not None and blo <= _LO else blo
        bhi = None if bhi is not None and bhi >= _HI else bhi
        if blo is None and bhi is None:
            return torch.ones_like(lo, dtype=torch.bool), torch.zeros_like(lo, dtype=torch.bool)
        ct = cf = None
        if blo is not None:
            ct = hi >= blo
            cf = lo < blo
        if bhi is not None:
            a, b = lo <= bhi, hi > bhi
            ct = a if ct is None else ct & a
            cf = b if cf is None else cf | b
        return ct, cf

    def _wrapped_equality(self, n: Range):
        """``x == c`` for a sum ``x`` whose values may leave int64, exactly: its interval
        ``[lo, lo + W]`` is computed modulo ``2**64`` (``lo`` wrapped, ``W`` as an unsigned
        64-bit width with per-element overflow). With ``W < 2**64``, some value of the
        interval is congruent to ``c`` iff ``(c - lo) mod 2**64 <= W``, and by the check
        (no other value congruent to ``c`` in ``x``'s bounds, which contain the interval)
        that value is ``c``; a width overflow leaves the tile undecided. ``a - b == 0``
        (``same(doc)``) needs no arithmetic at all: ``a``'s and ``b``'s ranges meet."""
        x, c = n.x, n.lo
        if len(x.terms) == 2 and x.const == c and {t[1] for t in x.terms} == {1, -1}:
            # a - b == 0 (same(doc)): some a equals some b iff the ranges meet; no arithmetic
            (a, _), (b, _) = x.terms
            alo, ahi = self.int_(a)
            blo, bhi = self.int_(b)
            ct = (alo <= bhi) & (blo <= ahi)
            cf = (alo != ahi) | (blo != bhi) | (alo != blo)
            return ct, cf
        lo, _ = self.int_(x)
        width = over = None
        for a, coef in x.terms:
            alo, ahi = self.int_(a)
            if alo is ahi:
                continue
            w = ahi - alo                  # the atom is in int64: its width fits unsigned
            m = abs(coef)
            if m != 1:
                limit = ((1 << 64) - 1) // m
                ov = ~_ule(w, _t(wrap(limit), self.device)) if limit else w != 0
                over = ov if over is None else over | ov
                w = w * wrap(m)
            if width is None:
                width = w
            else:
                s = width + w
                ov = ~_ule(width, s)           # unsigned carry
                over = ov if over is None else over | ov
                width = s
        if width is None:                  # a point
            ct = lo == c
            return ct, ~ct
        ct = _ule(c - lo, width)
        cf = (width != 0) | (lo != c)
        if over is not None:
            ct, cf = ct | over, cf | over
        return ct, cf

    @rule(IsPow2)
    def is_pow2(self, n):
        lo, hi = self.int_(n.a)
        m = lo.clamp(min=1)
        hp = _highest_pow2_le(hi.clamp(min=1))
        ct = (hi >= 1) & (hp >= m)
        point_pow2 = (lo == hi) & (lo > 0) & ((lo & (lo - 1)) == 0)
        cf = ~(point_pow2 | ((lo == 1) & (hi == 2)))
        return ct, cf

    @rule(Not)
    def not_(self, n):
        ct, cf = self.bool_(n.a)
        return cf, ct

    @rule(And, Or)
    def junction(self, n):
        return junction3(isinstance(n, And), [self.bool_(a) for a in n.args])


def _huge_division(alo, ahi, d: int, floor: bool):
    """``[alo, ahi] // d`` or ``% d`` for a constant ``|d|`` beyond int64: every int64 value
    ``a`` has ``a // d`` in ``{0, -1}`` (``-1`` for ``a < 0`` when ``d > 0``, for ``a > 0``
    when ``d < 0``), and ``a % d = a - d * (a // d)``."""
    def quotient(a):
        return -((a < 0) if d > 0 else (a > 0)).to(I64)
    qlo, qhi = quotient(alo), quotient(ahi)
    if floor:
        return (qlo, qhi) if d > 0 else (qhi, qlo)
    dw = wrap(d)
    same = qlo == qhi
    rlo = torch.where(qlo < 0, alo + dw, alo)
    rhi = torch.where(qhi < 0, ahi + dw, ahi)
    return (torch.where(same, rlo, _LO if d < 0 else 0),
            torch.where(same, rhi, 0 if d < 0 else _HI))


def _highest_pow2_le(x: torch.Tensor) -> torch.Tensor:
    """2**floor(log2(x)) for x >= 1 (exact for int64)."""
    e = torch.floor(torch.log2(x.to(torch.float64))).to(I64).clamp(0, 62)
    e = e - ((torch.ones_like(e) << e) > x).to(I64)
    e = e + (((torch.ones_like(e) << (e + 1)) <= x) & (e < 62)).to(I64)
    return torch.ones_like(e) << e


# ------------------------------------------------------------ index bounds

def domain_env(Lq: int, Lk: int, *, num_heads: int, batch: int, q_offset, device=None) -> dict:
    """The whole valid domain as one box per (b, h): shapes [B, H, 1, 1]."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    off = query_offset(Lq, Lk, q_offset)
    return {
        "q": (torch.tensor(off, dtype=I64, device=dev), torch.tensor(off + Lq - 1, dtype=I64, device=dev)),
        "k": (torch.tensor(0, dtype=I64, device=dev), torch.tensor(Lk - 1, dtype=I64, device=dev)),
        "h": torch.arange(num_heads, dtype=I64, device=dev).view(1, num_heads, 1, 1),
        "b": torch.arange(batch, dtype=I64, device=dev).view(batch, 1, 1, 1),
        "Lq": Lq, "Lk": Lk, "H": num_heads,
    }


def index_hull(ir: Node, Lq: int, Lk: int, *, num_heads: int = 1, batch: int = 1,
               q_offset=None, inputs=None, device=None) -> dict:
    """``{Load: [(lo, hi) per index dim]}``: a sound hull of every index over the valid domain.

    Exact for affine indices (``doc[q]``, ``blocks[q // 32, k // 32]``). Loads nested in the
    index of another load need ``inputs``. Raises :class:`SpattnValueError` where an index
    cannot be computed exactly (:func:`spattn.ir.bounds.check_call`).
    """
    hull: dict = {}

    def on_load(load, idx, t):
        hull[load] = [(int(lo.min()), int(hi.max())) for lo, hi in idx]

    ins = _dummy_inputs(ir, inputs, device)
    checked = check_call(ir, Lq, Lk, num_heads=num_heads, batch=batch, q_offset=q_offset,
                         inputs=ins)
    env = domain_env(Lq, Lk, num_heads=num_heads, batch=batch, q_offset=q_offset, device=device)
    ev = IntervalEval(env, ins, device=device, on_load=on_load, wrapped=checked.wrapped)
    for ld in _loads_postorder(ir):
        ev.int_(ld)
    return hull


def _dummy_inputs(ir, inputs, device):
    out = dict(inputs or {})
    for ld in _loads_postorder(ir):
        if ld.name not in out:
            out[ld.name] = torch.zeros((1,) * len(ld.index), dtype=I64,
                                       device=device or "cpu")
    return out


@lru_cache(maxsize=256)
def _loads_postorder(ir: Node) -> tuple:
    """The loads of ``ir`` in post-order, each once (IR nodes are immutable: cached)."""
    seen: dict = {}

    def rec(n):
        for c in n.children():
            rec(c)
        if isinstance(n, Load):
            seen.setdefault(n, None)
    rec(ir)
    return tuple(seen)


def _call_box(Lq: int, Lk: int, off: int, num_heads: int, batch: int) -> dict:
    """The :func:`static_interval` box of a call: every variable's range over its domain."""
    return {"q": (off, off + Lq - 1), "k": (0, Lk - 1), "b": (0, batch - 1),
            "h": (0, num_heads - 1), "Lq": Lq, "Lk": Lk, "H": num_heads}


def check_input_bounds(pattern, inputs: Mapping[str, torch.Tensor], Lq: int, Lk: int, *,
                       num_heads: int = 1, batch: int = 1, q_offset=None, checked=None,
                       where: str | None = None) -> None:
    """Raise :class:`SpattnInputError` when an input is too short for the positions it is indexed with.

    ``inputs`` are validated tensors (``ir.inputs.validate_inputs``). The index ranges are the
    interval hull of each index over the valid domain (exact for affine indices), in exact
    integers. ``checked``: the call's :func:`spattn.ir.bounds.check_call` result (computed
    here when not given; it raises :class:`SpattnValueError` for an index beyond int64).
    ``where``: what the error says the domain is (default its lengths and query offset:
    "for Lq=..., Lk=..., q_offset=...").
    """
    ir = pattern.ir if hasattr(pattern, "ir") else pattern
    off = query_offset(Lq, Lk, q_offset)

    # (load, axis, size, shape, index, [lo, hi]): affine indices of q, k, b, h are bounded on
    # the host (no device op); the others by the interval pass, read at once (one sync)
    box = _call_box(Lq, Lk, off, num_heads, batch)
    pending = []
    for ld in _loads_postorder(ir):
        t = inputs[ld.name]
        sizes = tuple(t.shape[t.dim() - len(ld.index):])
        for axis, (ix, size) in enumerate(zip(ld.index, sizes)):
            pending.append((ld, axis, size, tuple(t.shape), ix, static_interval(ix, box)))
    if any(p[5] is None for p in pending):
        if checked is None:
            checked = check_call(ir, Lq, Lk, num_heads=num_heads, batch=batch, q_offset=off,
                                 inputs=inputs)
        dev = None
        for t in inputs.values():
            dev = t.device
            break
        env = domain_env(Lq, Lk, num_heads=num_heads, batch=batch, q_offset=q_offset, device=dev)
        # only the index intervals are checked: a load is summarised (a sparse table) only
        # when it sits inside another load's index
        ev = IntervalEval(env, inputs, device=dev, wrapped=checked.wrapped)
        hulls = [(lambda lo, hi: (lo.min(), hi.max()))(*ev.int_(p[4]))
                 for p in pending if p[5] is None]
        read = iter(torch.stack([v for h in hulls for v in h]).tolist())
        pending = [p if p[5] is not None else p[:5] + ((next(read), next(read)),)
                   for p in pending]
    for load, axis, size, shape, _, (lo_v, hi_v) in pending:
        if lo_v < 0 or hi_v >= size:
            from .printer import to_source
            need = (f"is indexed below 0 (a query offset or a shift that places "
                    f"positions before the input's start)" if lo_v < 0 else
                    f"needs size >= {hi_v + 1}")
            what = "is indexed out of range" if lo_v < 0 else "is too short"
            raise SpattnInputError(
                f"runtime input {load.name!r} (shape {shape}) {what}: "
                f"index dimension {axis} ({to_source(load.index[axis])}) takes values "
                f"{lo_v}..{hi_v} {where or f'for Lq={Lq}, Lk={Lk}, q_offset={off}'}, "
                f"but has size {size}; "
                f"it {need}; every (q, k) pair of the call reads it, allowed by the mask "
                f"or not: clamp the index (clamp(i, 0, {size - 1})) or size the input for "
                f"every pair")


def check_list_bounds(pattern, Lq: int, Lk: int, *, num_heads: int = 1, batch: int = 1,
                      q_offset=None, inputs: Mapping[str, torch.Tensor] | None = None,
                      checked=None) -> None:
    """Raise :class:`SpattnValueError` when a list of the pattern (its mask's int lists, its
    score's float lists) may be indexed out of range over the call's domain: the interval hull of each list index (exact for affine indices
    and for indices of ``h`` and ``b`` alone), as :func:`check_input_bounds` bounds input
    indices. The kernels select list entries without a bounds check; the evaluator
    (``ir.evaluate``, the torch backend) refuses an index out of range where it reads it.
    """
    from .nodes import FTable
    ir = pattern.ir if hasattr(pattern, "ir") else pattern
    roots = [ir] + [x for x in [getattr(pattern, "score", None)] if x is not None]
    lists = list(dict.fromkeys(n for r in roots for n in walk(r)
                               if isinstance(n, (Table, FTable))))
    if not lists:
        return
    off = query_offset(Lq, Lk, q_offset)
    box = _call_box(Lq, Lk, off, num_heads, batch)
    hulls = [static_interval(n.index, box) for n in lists]
    if any(h is None for h in hulls):
        ins = _dummy_inputs(ir, inputs, None)
        if checked is None:
            checked = check_call(ir, Lq, Lk, num_heads=num_heads, batch=batch, q_offset=off,
                                 inputs=ins)
        dev = next((t.device for t in ins.values()), None)
        env = domain_env(Lq, Lk, num_heads=num_heads, batch=batch, q_offset=off, device=dev)
        ev = IntervalEval(env, ins, device=dev, wrapped=checked.wrapped)
        todo = [ev.int_(n.index) for n, h in zip(lists, hulls) if h is None]
        read = iter(torch.stack([v for lo, hi in todo for v in (lo.min(), hi.max())]).tolist())
        hulls = [h if h is not None else (next(read), next(read)) for h in hulls]
    for n, (lo, hi) in zip(lists, hulls):
        if lo < 0 or hi >= len(n.values):
            from .printer import to_source
            raise SpattnValueError(
                f"list {list(n.values)} has {len(n.values)} entries but is indexed with "
                f"{to_source(n.index)} taking values in {lo}..{hi} for Lq={Lq}, Lk={Lk}, "
                f"q_offset={off}, {num_heads} heads (give one entry per head, or guard the "
                "index)")


# ------------------------------------------------------------------ lifting

_SPLIT = (Abs, Min, Max, Select)


class _Rebuild(MaskPass):
    """:func:`rebuild`'s rules: each node type through its canonicalising constructor."""

    complete = True

    @rule(Const, Var, BoolConst)
    def leaf(self, n, kids):
        return n

    @rule(Sum)
    def sum(self, n, kids):
        return B.add(*(B.scale(c, v) for c, (_, v) in zip(kids, n.terms)), B.const(n.const))

    @rule(Prod)
    def prod(self, n, kids):
        acc = kids[0]
        for f in kids[1:]:
            acc = B.mul(acc, f)
        return acc

    @rule(FloorDiv)
    def floordiv(self, n, kids):
        return B.floordiv(*kids)

    @rule(Mod)
    def mod(self, n, kids):
        return B.mod(*kids)

    @rule(Abs)
    def abs(self, n, kids):
        return B.abs_(kids[0])

    @rule(Min)
    def min(self, n, kids):
        return B.min_(*kids)

    @rule(Max)
    def max(self, n, kids):
        return B.max_(*kids)

    @rule(Select)
    def select(self, n, kids):
        return B.select(*kids)

    @rule(Table)
    def table(self, n, kids):
        return B.table(n.values, kids[0])

    @rule(Load)
    def load(self, n, kids):
        return B.load(n.name, kids)

    @rule(Range)
    def range(self, n, kids):
        return B.range_(kids[0], n.lo, n.hi)

    @rule(IsPow2)
    def is_pow2(self, n, kids):
        return B.is_pow2(kids[0])

    @rule(Not)
    def not_(self, n, kids):
        return B.not_(kids[0])

    @rule(And)
    def and_(self, n, kids):
        return B.and_(*kids)

    @rule(Or)
    def or_(self, n, kids):
        return B.or_(*kids)


_rebuild = _Rebuild()


def rebuild(n: Node, kids: list) -> Node:
    """``n`` with its children replaced by ``kids``, through the canonicalising constructors."""
    return _rebuild(n, kids)


def replace(n: Node, old: Node, new: Node) -> Node:
    if n == old:
        return new
    kids = n.children()
    if not kids:
        return n
    new_kids = [replace(c, old, new) for c in kids]
    if all(a is b for a, b in zip(new_kids, kids)):
        return n
    return rebuild(n, new_kids)


def _find_split(x: Node):
    for m in walk(x):
        if isinstance(m, _SPLIT) and not B.is_uniform(m):
            return m
    return None


class _TooBig(Exception):
    pass


class _Cases(Visitor):
    """``[(condition, replacement)]`` of a split node, covering every point exactly once."""

    @rule(Abs)
    def abs(self, s):
        return [(B.range_(s.a, 0, None), s.a), (B.range_(s.a, None, -1), B.neg(s.a))]

    @rule(Min, Max)
    def minmax(self, s):
        op_lt, op_le = ("<", "<=") if isinstance(s, Min) else (">", ">=")
        out = []
        for i, a in enumerate(s.args):
            conds = [B.cmp(op_lt if j < i else op_le, a, b)
                     for j, b in enumerate(s.args) if j != i]
            out.append((B.and_(*conds), a))
        return out

    @rule(Select)
    def select(self, s):
        return [(s.cond, s.a), (B.not_(s.cond), s.b)]


_cases = _Cases()


class _Lift(Visitor):
    """:func:`lift`'s rules (memoised per node; other nodes are kept)."""

    def __init__(self, max_atoms: int):
        self.max_atoms = max_atoms
        self.atoms: set = set()
        self.memo: dict = {}

    def rec(self, n: Node) -> Node:
        out = self.memo.get(n)
        if out is None:
            out = self.memo[n] = self(n)
        return out

    @rule(default=True)
    def keep(self, n):
        return n

    @rule(And, Or)
    def junction(self, n):
        return rebuild(n, [self.rec(a) for a in n.args])

    @rule(Not)
    def not_(self, n):
        return B.not_(self.rec(n.a))

    @rule(Range, IsPow2)
    def atom(self, n):
        s = _find_split(n)
        if s is None:
            self.atoms.add(n)
            if len(self.atoms) > self.max_atoms:
                raise _TooBig
            return n
        if isinstance(n, Range) and n.x == s and isinstance(s, (Min, Max)):
            # min(..) >= lo: all; min(..) <= hi: any (and dually for max)
            parts = []
            for bound, lo, hi in ((n.lo, n.lo, None), (n.hi, None, n.hi)):
                if bound is None:
                    continue
                each = [B.range_(a, lo, hi) for a in s.args]
                every = (lo is not None) == isinstance(s, Min)
                parts.append(B.and_(*each) if every else B.or_(*each))
            return self.rec(B.and_(*parts))
        return B.or_(*(B.and_(self.rec(c), self.rec(replace(n, s, r))) for c, r in _cases(s)))


@lru_cache(maxsize=256)
def lift(node: Node, max_atoms: int = 64):
    """An equivalent bool formula whose comparisons contain no non-uniform abs/min/max/if.

    ``Range(.. abs(a) ..)`` becomes ``(a >= 0 & Range(.. a ..)) | (a < 0 & Range(.. -a ..))``;
    ``min``/``max`` of n values split n ways (``min(a, b) <= c`` directly into
    ``a <= c | b <= c``); ``if`` splits on its condition. Returns None when the result would
    have more than ``max_atoms`` distinct atoms.
    """
    try:
        return _Lift(max_atoms).rec(node)
    except _TooBig:
        return None


class _BoolAtoms(Visitor):
    """Collects the leaves of the ``& | ~`` structure into ``out``."""

    def __init__(self):
        self.out: dict = {}

    @rule(And, Or)
    def junction(self, n):
        for a in n.args:
            self(a)

    @rule(Not)
    def not_(self, n):
        self(n.a)

    @rule(BoolConst)
    def const(self, n):
        pass

    @rule(default=True)
    def leaf(self, n):
        self.out.setdefault(n, None)


def bool_atoms(node: Node) -> list:
    """The leaves of the ``& | ~`` structure of a bool formula, deduplicated, in order."""
    v = _BoolAtoms()
    v(node)
    return list(v.out)


class _Combine(Visitor):
    """:func:`combine`'s rules (memoised per node; leaves looked up)."""

    def __init__(self, leaf_values, memo):
        self.leaf_values = leaf_values
        self.memo = memo

    def rec(self, n):
        out = self.memo.get(n)
        if out is None:
            out = self.memo[n] = self(n)
        return out

    @rule(BoolConst)
    def const(self, n):
        return n.value, not n.value

    @rule(Not)
    def not_(self, n):
        ct, cf = self.rec(n.a)
        return cf, ct

    @rule(And, Or)
    def junction(self, n):
        return junction3(isinstance(n, And), [self.rec(a) for a in n.args])

    @rule(default=True)
    def leaf(self, n):
        return self.leaf_values[n]


def combine(node: Node, leaf_values: Mapping[Node, tuple], memo: dict | None = None):
    """Three-valued value of the ``& | ~`` structure given ``(ct, cf)`` of each leaf."""
    return _Combine(leaf_values, {} if memo is None else memo).rec(node)


# ------------------------------------------------------------ static exactness of pass 1

_QK = frozenset(("q", "k"))


class _Consecutive(Visitor):
    """:func:`_consecutive`'s rules for non-uniform nodes (None where not provable)."""

    def __call__(self, n):
        if B.is_uniform(n):
            return frozenset()
        return super().__call__(n)

    @rule(default=True)
    def other(self, n):
        return None

    @rule(Var)
    def var(self, n):
        return frozenset((n.name,)) if n.name in _QK else None

    @rule(Sum)
    def sum(self, n):
        used: frozenset = frozenset()
        for a, c in n.terms:
            va = self(a)
            if va is None:
                return None
            if va and (abs(c) != 1 or va & used):
                return None
            used |= va
        return used

    @rule(FloorDiv)
    def floordiv(self, n):
        return self(n.a) if B.is_uniform(n.b) else None

    @rule(Abs)
    def abs(self, n):
        return self(n.a)


_consecutive_rules = _Consecutive()


def _consecutive(n: Node):
    """The set of q/k variables ``n`` depends on when its interval over any tile box is exact
    *and* every integer of it is attained (for each b, h); None when that is not provable.

    Uniform nodes are points (frozenset()). ``q``, ``k``; ``Sum`` of such terms with
    coefficients +-1 over pairwise disjoint variable sets (independent over a box: the box is
    a product of a q-range and a k-range), plus uniform terms with any coefficient;
    ``x // m`` and ``abs(x)`` of such an ``x`` (unit steps stay unit steps).
    """
    return _consecutive_rules(n)


class _Leaves(Visitor):
    """:func:`interval_exact`'s walk: False at a leaf that is neither uniform nor a
    ``Range``; counts the ``Range`` leaves."""

    def __init__(self):
        self.counts: dict = {}

    def __call__(self, n):
        if isinstance(n, BoolConst) or B.is_uniform(n):
            return True
        return super().__call__(n)

    @rule(And, Or)
    def junction(self, n):
        return all(self(a) for a in n.args)

    @rule(Not)
    def not_(self, n):
        return self(n.a)

    @rule(Range)
    def range(self, n):
        self.counts[n] = self.counts.get(n, 0) + 1
        return True

    @rule(default=True)
    def other(self, n):
        return False


@lru_cache(maxsize=512)
def interval_exact(node: Node) -> bool:
    """True when the three-valued interval evaluation of the bool formula ``node`` is exact
    over every tile box: ``can_be_true`` iff some point of the box satisfies it, and
    ``can_be_false`` likewise. Decided statically from the IR (cached per node).

    Sufficient conditions: every leaf of the ``& | ~`` structure is uniform (a point per
    (b, h), hence decided) or a comparison ``Range`` of a value for which
    :func:`_consecutive` holds (its interval is exactly the set of values it takes, so the
    comparison's pair is exact); the non-uniform leaves occur once each (read-once) and
    depend on pairwise disjoint sets of ``q``/``k`` (a q-only and a k-only leaf, or a single
    leaf): over a box their joint values are the product of their individual values, and
    Kleene evaluation of a read-once formula over independent leaves is exact. So
    ``causal``, ``window``, ``sink``, ``chunked``, ``abs(q - k) <= w``, ``q < n | k < n`` are
    exact; ``causal & window``-style combinations of two ``q - k`` leaves, or of a ``q - k``
    and a ``q`` leaf, are not claimed.
    """
    leaves = _Leaves()
    if not leaves(node):
        return False
    used: frozenset = frozenset()
    for leaf, c in leaves.counts.items():
        v = _consecutive(leaf.x)
        if c != 1 or v is None or v & used:
            return False
        used |= v
    return True
