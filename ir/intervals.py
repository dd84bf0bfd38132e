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
from .evaluate import evaluate
from .inputs import query_offset
from .nodes import (Abs, And, BoolConst, Const, FloorDiv, IsPow2, Load, Max, Min, Mod, Node,
                    Not, Or, Prod, Range, Select, Sum, Table, Var, walk)

#: n-D inputs are summarised by gathering the covered entries when every tile covers at most
#: this many of them; above it the whole input's min/max is used.
NARROW_GATHER = 256
#: A 1-D input whose index provably spans at most this many positions per box (``env``'s
#: ``widths``: the tile sizes) is summarised by gathering those positions: a few device ops,
#: where a sparse table costs ~6 per level of log2(length) (the setup of a new shape).
GATHER_WIDTH = 512
#: ... as long as the gather holds at most this many elements.
GATHER_ELEMS = 1 << 24


def static_width(n: Node, widths, origins=None) -> int | None:
    """A bound on ``hi - lo + 1`` of ``n``'s interval over any box of the environment whose
    variables span at most ``widths[name]`` values (points: 1); None when not affine in them
    (or ``//`` of such by a positive constant). ``origins``: ``{name: o}`` when every box of
    that variable starts at ``o`` plus a multiple of its width (the tile grid), which makes
    ``q // m`` exact: a tile of ``W`` rows covers ``W // m`` chunks when ``m | W``."""
    if widths is None:
        return None
    if isinstance(n, Const):
        return 1
    if isinstance(n, Var):
        return widths.get(n.name)
    if isinstance(n, Sum):
        total = 1
        for t, c in n.terms:
            w = static_width(t, widths, origins)
            if w is None:
                return None
            total += abs(c) * (w - 1)
        return total
    if isinstance(n, FloorDiv) and isinstance(n.b, Const) and n.b.value > 0:
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
        w = static_width(n.a, widths, origins)
        return None if w is None else (w + m - 2) // m + 1
    return None

I64 = torch.int64


def _t(v, device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, bool):
        return torch.tensor(v, dtype=torch.bool, device=device)
    return torch.tensor(int(v), dtype=I64, device=device)


def _floordiv(a, d):
    return torch.div(a, d, rounding_mode="floor")


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


from .evaluate import _as_full  # noqa: E402  (one definition of the [B', H', ...] view)


# ------------------------------------------------------------ the evaluator

def junction3(conj: bool, vals):
    """Three-valued ``&`` (``conj``) or ``|`` of ``(can_be_true, can_be_false)`` pairs."""
    ct, cf = vals[0]
    for a_ct, a_cf in vals[1:]:
        ct, cf = (ct & a_ct, cf | a_cf) if conj else (ct | a_ct, cf & a_cf)
    return ct, cf


class IntervalEval:
    """Interval / three-valued evaluation of IR nodes over a box environment.

    ``env``: ``q``, ``k`` -> ``(lo, hi)`` tensors; ``h``, ``b`` -> point tensors;
    ``Lq``, ``Lk``, ``H`` -> ints; optionally ``widths``: ``{name: most values a box spans}``
    (the tile sizes; lets narrow 1-D loads gather instead of building a sparse table).
    ``inputs``: validated int64 tensors.
    ``on_load(load, index_intervals, tensor)`` is called before each load is summarised
    (used to check bounds). ``summaries`` caches sparse tables between evaluators.
    """

    def __init__(self, env: Mapping[str, object], inputs: Mapping[str, torch.Tensor] | None = None,
                 *, device=None, on_load=None, summaries: dict | None = None):
        self.env = env
        self.inputs = inputs or {}
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.on_load = on_load
        self.summaries = {} if summaries is None else summaries
        self.memo: dict = {}
        #: set when an n-D input was summarised by its whole-input min/max (the one summary
        #: that depends on the other boxes evaluated together, not on a box alone)
        self.coarse = False

    # -- public -----------------------------------------------------------
    def int_(self, n: Node):
        key = ("i", n)
        if key not in self.memo:
            self.memo[key] = self._int(n)
        return self.memo[key]

    def bool_(self, n: Node):
        key = ("b", n)
        if key not in self.memo:
            self.memo[key] = self._bool(n)
        return self.memo[key]

    def _static_int(self, n: Node):
        """``n``'s value as a Python int when it is one for the whole environment: a constant,
        or arithmetic of ``Lq``, ``Lk``, ``H`` bound to ints (``k % H``); else None."""
        if isinstance(n, Const):
            return n.value
        names = _static_names(n)
        if names is None or not all(type(self.env.get(x)) is int for x in names):
            return None
        v = evaluate(n, {x: self.env[x] for x in names})
        return v if type(v) is int else None

    def point(self, n: Node) -> torch.Tensor:
        """Exact value of a uniform node (no q, k, inputs)."""
        lo, hi = self.int_(n)
        return lo

    # -- int ---------------------------------------------------------------
    def _int(self, n: Node):
        dev = self.device
        if isinstance(n, Const):
            v = _t(n.value, dev)
            return v, v
        if isinstance(n, Var):
            v = self.env[n.name]
            if isinstance(v, tuple):
                return _t(v[0], dev), _t(v[1], dev)
            v = _t(v, dev)
            return v, v
        if isinstance(n, Sum):
            lo = hi = None
            neg = []     # coefficient -1 terms are subtracted (no negation, no product)
            for a, c in n.terms:
                alo, ahi = self.int_(a)
                if c == -1 and lo is not None:
                    neg.append((alo, ahi))
                    continue
                if c == 1:
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
            if n.const:
                if lo is hi:
                    lo = hi = lo + n.const
                else:
                    lo, hi = lo + n.const, hi + n.const
            return lo, hi
        if isinstance(n, Prod):
            lo, hi = self.int_(n.factors[0])
            for f in n.factors[1:]:
                flo, fhi = self.int_(f)
                c = (lo * flo, lo * fhi, hi * flo, hi * fhi)
                lo = torch.minimum(torch.minimum(c[0], c[1]), torch.minimum(c[2], c[3]))
                hi = torch.maximum(torch.maximum(c[0], c[1]), torch.maximum(c[2], c[3]))
            return lo, hi
        if isinstance(n, (FloorDiv, Mod)):
            alo, ahi = self.int_(n.a)
            d = self._static_int(n.b)
            if d is not None:               # the common case: no device check, no sync
                if d == 0:
                    raise SpattnValueError(f"the divisor {n.b} evaluates to 0")
                if alo is ahi and isinstance(n, FloorDiv):
                    v = _floordiv(alo, d)
                    return v, v
                qlo, qhi = _floordiv(alo, d), _floordiv(ahi, d)
                if isinstance(n, FloorDiv):
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
            if isinstance(n, FloorDiv):
                pos = d > 0
                return torch.where(pos, qlo, qhi), torch.where(pos, qhi, qlo)
            same = qlo == qhi
            mlo, mhi = torch.remainder(alo, d), torch.remainder(ahi, d)
            glo = torch.minimum(d + 1, torch.zeros_like(d))
            ghi = torch.maximum(d - 1, torch.zeros_like(d))
            return torch.where(same, mlo, glo), torch.where(same, mhi, ghi)
        if isinstance(n, Abs):
            lo, hi = self.int_(n.a)
            if lo is hi:
                v = lo.abs()
                return v, v
            alo = torch.where(lo >= 0, lo, torch.where(hi <= 0, -hi, torch.zeros_like(lo)))
            ahi = torch.maximum(lo.abs(), hi.abs())
            return alo, ahi
        if isinstance(n, (Min, Max)):
            f = torch.minimum if isinstance(n, Min) else torch.maximum
            lo, hi = self.int_(n.args[0])
            for a in n.args[1:]:
                alo, ahi = self.int_(a)
                lo, hi = f(lo, alo), f(hi, ahi)
            return lo, hi
        if isinstance(n, Select):
            ct, cf = self.bool_(n.cond)
            alo, ahi = self.int_(n.a)
            blo, bhi = self.int_(n.b)
            both = ct & cf
            lo = torch.where(both, torch.minimum(alo, blo), torch.where(ct, alo, blo))
            hi = torch.where(both, torch.maximum(ahi, bhi), torch.where(ct, ahi, bhi))
            return lo, hi
        if isinstance(n, Table):
            ilo, ihi = self.int_(n.index)
            nvals = len(n.values)
            if bool((ihi < 0).any()) or bool((ilo >= nvals).any()):
                raise SpattnValueError(
                    f"list {list(n.values)} has {nvals} entries but is indexed with {n.index} "
                    f"taking values out of 0..{nvals - 1}")
            key = ("table", n.values)
            if key not in self.summaries:
                vals = torch.tensor(n.values, dtype=I64, device=self.device).view(1, 1, -1)
                self.summaries[key] = RangeMinMax(vals)
            return self.summaries[key].query(ilo, ihi, 0, 0)
        if isinstance(n, Load):
            return self._load(n)
        raise TypeError(f"no interval rule for {type(n).__name__}")

    def _load(self, n: Load):
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
    def _bool(self, n: Node):
        dev = self.device
        if isinstance(n, BoolConst):
            return _t(n.value, dev), _t(not n.value, dev)
        if isinstance(n, Range):
            lo, hi = self.int_(n.x)
            ct = cf = None
            if n.lo is not None:
                ct = hi >= n.lo
                cf = lo < n.lo
            if n.hi is not None:
                a, b = lo <= n.hi, hi > n.hi
                ct = a if ct is None else ct & a
                cf = b if cf is None else cf | b
            return ct, cf
        if isinstance(n, IsPow2):
            lo, hi = self.int_(n.a)
            m = lo.clamp(min=1)
            hp = _highest_pow2_le(hi.clamp(min=1))
            ct = (hi >= 1) & (hp >= m)
            point_pow2 = (lo == hi) & (lo > 0) & ((lo & (lo - 1)) == 0)
            cf = ~(point_pow2 | ((lo == 1) & (hi == 2)))
            return ct, cf
        if isinstance(n, Not):
            ct, cf = self.bool_(n.a)
            return cf, ct
        if isinstance(n, (And, Or)):
            return junction3(isinstance(n, And), [self.bool_(a) for a in n.args])
        raise TypeError(f"no three-valued rule for {type(n).__name__}")


_STATIC_NODES = (Const, Var, Sum, Prod, FloorDiv, Mod, Abs, Min, Max)


@lru_cache(maxsize=512)
def _static_names(n: Node):
    """The length variables of an int node built from them and constants by arithmetic
    (no q, k, h, b, list or input), or None."""
    names = set()
    for m in walk(n):
        if not isinstance(m, _STATIC_NODES):
            return None
        if isinstance(m, Var):
            if m.name not in ("Lq", "Lk", "H"):
                return None
            names.add(m.name)
    return frozenset(names)


def _highest_pow2_le(x: torch.Tensor) -> torch.Tensor:
    """2**floor(log2(x)) for x >= 1 (exact for int64)."""
    e = torch.floor(torch.log2(x.to(torch.float64))).to(I64).clamp(0, 62)
    e = e - ((torch.ones_like(e) << e) > x).to(I64)
    e = e + (((torch.ones_like(e) << (e + 1)) <= x) & (e < 62)).to(I64)
    return torch.ones_like(e) << e


def three_valued(node: Node, env, inputs=None, *, device=None):
    """``(can_be_true, can_be_false)`` of a bool node over the box ``env``."""
    return IntervalEval(env, inputs, device=device).bool_(node)


def interval(node: Node, env, inputs=None, *, device=None):
    """``(lo, hi)`` of an int node over the box ``env``."""
    return IntervalEval(env, inputs, device=device).int_(node)


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
    index of another load need ``inputs``.
    """
    hull: dict = {}

    def on_load(load, idx, t):
        hull[load] = [(int(lo.min()), int(hi.max())) for lo, hi in idx]

    env = domain_env(Lq, Lk, num_heads=num_heads, batch=batch, q_offset=q_offset, device=device)
    ev = IntervalEval(env, _dummy_inputs(ir, inputs, device), device=device, on_load=on_load)
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


def _loads_postorder(ir: Node) -> list:
    seen: dict = {}

    def rec(n):
        for c in n.children():
            rec(c)
        if isinstance(n, Load):
            seen.setdefault(n, None)
    rec(ir)
    return list(seen)


def static_interval(n: Node, box: Mapping[str, object]):
    """``n``'s interval as Python ints over ``box`` (``q``, ``k`` -> ``(lo, hi)``; ``Lq``,
    ``Lk``, ``H`` -> ints), by the rules of :class:`IntervalEval`, for constants, those
    variables, sums and ``//`` by a constant; None for anything else."""
    if isinstance(n, Const):
        return n.value, n.value
    if isinstance(n, Var):
        v = box.get(n.name)
        if v is None:
            return None
        return v if isinstance(v, tuple) else (v, v)
    if isinstance(n, Sum):
        lo = hi = n.const
        for a, c in n.terms:
            iv = static_interval(a, box)
            if iv is None:
                return None
            lo, hi = (lo + iv[0] * c, hi + iv[1] * c) if c > 0 else (lo + iv[1] * c, hi + iv[0] * c)
        return lo, hi
    if isinstance(n, FloorDiv) and isinstance(n.b, Const) and n.b.value != 0:
        iv = static_interval(n.a, box)
        if iv is None:
            return None
        d = n.b.value
        return (iv[0] // d, iv[1] // d) if d > 0 else (iv[1] // d, iv[0] // d)
    return None


def check_input_bounds(pattern, inputs: Mapping[str, torch.Tensor], Lq: int, Lk: int, *,
                       num_heads: int = 1, batch: int = 1, q_offset=None) -> None:
    """Raise :class:`SpattnInputError` when an input is too short for the positions it is indexed with.

    ``inputs`` are validated tensors (``evaluate.validate_inputs``). The index ranges are the
    interval hull of each index over the valid domain (exact for affine indices).
    """
    ir = pattern.ir if hasattr(pattern, "ir") else pattern
    off = query_offset(Lq, Lk, q_offset)

    # (load, axis, size, shape, index, [lo, hi]): affine indices of q and k are bounded on the
    # host (no device op); the others by the interval pass, read at once (one sync)
    box = {"q": (off, off + Lq - 1), "k": (0, Lk - 1), "Lq": Lq, "Lk": Lk, "H": num_heads}
    pending = []
    for ld in _loads_postorder(ir):
        t = inputs[ld.name]
        sizes = tuple(t.shape[t.dim() - len(ld.index):])
        for axis, (ix, size) in enumerate(zip(ld.index, sizes)):
            pending.append((ld, axis, size, tuple(t.shape), ix, static_interval(ix, box)))
    if any(p[5] is None for p in pending):
        dev = None
        for t in inputs.values():
            dev = t.device
            break
        env = domain_env(Lq, Lk, num_heads=num_heads, batch=batch, q_offset=q_offset, device=dev)
        # only the index intervals are checked: a load is summarised (a sparse table) only
        # when it sits inside another load's index
        ev = IntervalEval(env, inputs, device=dev)
        hulls = [(lambda lo, hi: (lo.min(), hi.max()))(*ev.int_(p[4]))
                 for p in pending if p[5] is None]
        read = iter(torch.stack([v for h in hulls for v in h]).tolist())
        pending = [p if p[5] is not None else p[:5] + ((next(read), next(read)),)
                   for p in pending]
    for load, axis, size, shape, _, (lo_v, hi_v) in pending:
        if lo_v < 0 or hi_v >= size:
            from .printer import to_source
            need = (f"needs indices {lo_v}..{hi_v}" if lo_v < 0 else
                    f"needs size >= {hi_v + 1}")
            raise SpattnInputError(
                f"runtime input {load.name!r} (shape {shape}) is too short: "
                f"index dimension {axis} ({to_source(load.index[axis])}) takes values "
                f"{lo_v}..{hi_v} for Lq={Lq}, Lk={Lk}, q_offset={off}, but has size {size}; "
                f"it {need}")


# ------------------------------------------------------------------ lifting

_SPLIT = (Abs, Min, Max, Select)


def rebuild(n: Node, kids: list) -> Node:
    """``n`` with its children replaced by ``kids``, through the canonicalising constructors."""
    if isinstance(n, Sum):
        return B.add(*(B.scale(c, v) for c, (_, v) in zip(kids, n.terms)), B.const(n.const))
    if isinstance(n, Prod):
        acc = kids[0]
        for f in kids[1:]:
            acc = B.mul(acc, f)
        return acc
    if isinstance(n, FloorDiv):
        return B.floordiv(*kids)
    if isinstance(n, Mod):
        return B.mod(*kids)
    if isinstance(n, Abs):
        return B.abs_(kids[0])
    if isinstance(n, Min):
        return B.min_(*kids)
    if isinstance(n, Max):
        return B.max_(*kids)
    if isinstance(n, Select):
        return B.select(*kids)
    if isinstance(n, Table):
        return B.table(n.values, kids[0])
    if isinstance(n, Load):
        return B.load(n.name, kids)
    if isinstance(n, Range):
        return B.range_(kids[0], n.lo, n.hi)
    if isinstance(n, IsPow2):
        return B.is_pow2(kids[0])
    if isinstance(n, Not):
        return B.not_(kids[0])
    if isinstance(n, And):
        return B.and_(*kids)
    if isinstance(n, Or):
        return B.or_(*kids)
    return n


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


@lru_cache(maxsize=256)
def lift(node: Node, max_atoms: int = 64):
    """An equivalent bool formula whose comparisons contain no non-uniform abs/min/max/if.

    ``Range(.. abs(a) ..)`` becomes ``(a >= 0 & Range(.. a ..)) | (a < 0 & Range(.. -a ..))``;
    ``min``/``max`` of n values split n ways (``min(a, b) <= c`` directly into
    ``a <= c | b <= c``); ``if`` splits on its condition. Returns None when the result would
    have more than ``max_atoms`` distinct atoms.
    """
    atoms: set = set()
    memo: dict = {}

    def cases(n: Node, s: Node):
        """[(condition, replacement)] covering every point exactly once."""
        if isinstance(s, Abs):
            return [(B.range_(s.a, 0, None), s.a), (B.range_(s.a, None, -1), B.neg(s.a))]
        if isinstance(s, (Min, Max)):
            op_lt, op_le = ("<", "<=") if isinstance(s, Min) else (">", ">=")
            out = []
            for i, a in enumerate(s.args):
                conds = [B.cmp(op_lt if j < i else op_le, a, b)
                         for j, b in enumerate(s.args) if j != i]
                out.append((B.and_(*conds), a))
            return out
        return [(s.cond, s.a), (B.not_(s.cond), s.b)]

    def rec(n: Node) -> Node:
        if n in memo:
            return memo[n]
        out = _rec(n)
        memo[n] = out
        return out

    def _rec(n: Node) -> Node:
        if isinstance(n, (And, Or)):
            return rebuild(n, [rec(a) for a in n.args])
        if isinstance(n, Not):
            return B.not_(rec(n.a))
        if isinstance(n, (Range, IsPow2)):
            s = _find_split(n)
            if s is None:
                atoms.add(n)
                if len(atoms) > max_atoms:
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
                return rec(B.and_(*parts))
            return B.or_(*(B.and_(rec(c), rec(replace(n, s, r))) for c, r in cases(n, s)))
        return n

    try:
        return rec(node)
    except _TooBig:
        return None


def bool_atoms(node: Node) -> list:
    """The leaves of the ``& | ~`` structure of a bool formula, deduplicated, in order."""
    out: dict = {}

    def rec(n):
        if isinstance(n, (And, Or)):
            for a in n.args:
                rec(a)
        elif isinstance(n, Not):
            rec(n.a)
        elif not isinstance(n, BoolConst):
            out.setdefault(n, None)
    rec(node)
    return list(out)


def combine(node: Node, leaf_values: Mapping[Node, tuple], memo: dict | None = None):
    """Three-valued value of the ``& | ~`` structure given ``(ct, cf)`` of each leaf."""
    memo = {} if memo is None else memo
    if node in memo:
        return memo[node]
    out = _combine(node, leaf_values, memo)
    memo[node] = out
    return out


def _combine(node, leaf_values, memo):
    if isinstance(node, BoolConst):
        return node.value, not node.value
    if isinstance(node, Not):
        ct, cf = combine(node.a, leaf_values, memo)
        return cf, ct
    if isinstance(node, (And, Or)):
        return junction3(isinstance(node, And), [combine(a, leaf_values, memo) for a in node.args])
    return leaf_values[node]


# ------------------------------------------------------------ static exactness of pass 1

_QK = frozenset(("q", "k"))


def _consecutive(n: Node):
    """The set of q/k variables ``n`` depends on when its interval over any tile box is exact
    *and* every integer of it is attained (for each b, h); None when that is not provable.

    Uniform nodes are points (frozenset()). ``q``, ``k``; ``Sum`` of such terms with
    coefficients +-1 over pairwise disjoint variable sets (independent over a box: the box is
    a product of a q-range and a k-range), plus uniform terms with any coefficient;
    ``x // m`` and ``abs(x)`` of such an ``x`` (unit steps stay unit steps).
    """
    if B.is_uniform(n):
        return frozenset()
    if isinstance(n, Var):
        return frozenset((n.name,)) if n.name in _QK else None
    if isinstance(n, Sum):
        used: frozenset = frozenset()
        for a, c in n.terms:
            va = _consecutive(a)
            if va is None:
                return None
            if va and (abs(c) != 1 or va & used):
                return None
            used |= va
        return used
    if isinstance(n, FloorDiv):
        return _consecutive(n.a) if B.is_uniform(n.b) else None
    if isinstance(n, Abs):
        return _consecutive(n.a)
    return None


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
    counts: dict = {}

    def rec(n) -> bool:
        if isinstance(n, (And, Or)):
            return all(rec(a) for a in n.args)
        if isinstance(n, Not):
            return rec(n.a)
        if isinstance(n, BoolConst) or B.is_uniform(n):
            return True
        if not isinstance(n, Range):
            return False
        counts[n] = counts.get(n, 0) + 1
        return True

    if not rec(node):
        return False
    used: frozenset = frozenset()
    for leaf, c in counts.items():
        v = _consecutive(leaf.x)
        if c != 1 or v is None or v & used:
            return False
        used |= v
    return True
