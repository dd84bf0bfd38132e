"""Exact bounds of every IR node over the domain of a call, and the integer-width checks.

The language's integers are Python integers: exact and unbounded. Tensors hold 64-bit
integers (kernels may use 32), whose ``+ - *`` wrap modulo ``2**64``. This pass decides,
before anything is computed, whether the tensor computation of a pattern over one call gives
the exact result, from a sound ``[lo, hi]`` (Python ints) of every node over the whole call
domain: ``q`` in ``[q_offset, q_offset + Lq - 1]``, ``k`` in ``[0, Lk - 1]``, ``h`` in
``[0, H - 1]``, ``b`` in ``[0, B - 1]``, ``Lq``, ``Lk``, ``H`` exact, runtime inputs in
``[min, max]`` (their dtype's range, or measured on the tensor).

The rules are those of :class:`spattn.ir.intervals.IntervalEval` (inclusion-isotone), so the
interval that pass computes for any tile box lies inside the node's bounds, and so does every
value the evaluator computes at a point.

**What must be representable** (``bits`` = 64 for the analysis and the reference
evaluator, 32 for a kernel that wants 32-bit arithmetic; ``N = 2**bits``):

* every node but a ``Sum`` and a ``Const`` (variables, inputs, ``//``, ``%``, ``abs``,
  ``min``, ``max``, ``if``, lists, products including their partial products), and every
  operand of those: their rules compare or divide values, which wrapping would corrupt (a
  constant that only feeds sums may be anything: it is wrapped, see below);
* a ``Sum`` read by anything but an equality: ``+``, ``-`` and ``*`` by constants are exact
  modulo ``N``, so a sum is exact when its true value is representable, whatever its
  intermediates;
* an **equality** ``x == c`` (a ``Range`` with ``lo == hi``, and its negation ``x != c``)
  of a sum ``x`` is decided exactly from ``x mod N`` whenever no other value congruent to
  ``c`` lies in ``x``'s bounds and ``c`` itself is representable: ``doc[q] - doc[k] == 0``
  with any int64 document ids. Such ranges are listed in :attr:`Checked.wrapped`; the
  interval pass tests them modulo ``N`` (:meth:`IntervalEval._wrapped_equality`).
* a comparison bound beyond the representable range is never wrapped: the compared value is
  representable, so the bound folds (``q - k > 2**63 - 1`` is false everywhere);
* a divisor that is a constant (or arithmetic of ``Lq``, ``Lk``, ``H``: a Python int) may be
  anything nonzero: with a representable dividend ``a``, ``a // d`` is ``0`` or ``-1`` when
  ``|d|`` exceeds every representable value, and ``a % d`` follows;
* a constant argument of ``min``/``max`` may be anything: saturated to the representable
  range it gives the same result whenever that result is representable.

Constants, list entries, coefficients and offsets of sums that are not representable are
wrapped modulo ``N`` before they meet a tensor (:func:`wrap`): exact for the ring
operations. Everything else that cannot be represented raises :class:`SpattnValueError`
(:func:`check_call`) naming the expression and its range for the call.

Entry points: :func:`check_call` (the analysis and the reference evaluator: 64 bits; called
by ``classify``, ``mask``, ``check_input_bounds``), :func:`kernel_int64` (whether a kernel
needs 64-bit arithmetic), :func:`node_bounds` (the bounds themselves).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping, Optional

import torch

from ..dsl.errors import SpattnValueError
from .inputs import query_offset
from .nodes import (INT, Abs, And, BoolConst, Const, FloorDiv, IsPow2, Load, Max, Min, Mod, Node,
                    Not, Or, Prod, Range, Select, Sum, Table, Var, walk)
from .visitor import MaskPass, rule

__all__ = ["Domain", "Checked", "call_domain", "node_bounds", "bounds_of", "analyse",
           "check_call", "require", "kernel_int64", "score_int_roots", "closed_form_exact", "input_ranges", "static_names", "wrap",
           "representable", "INT64", "INT32"]

INT64 = (-(1 << 63), (1 << 63) - 1)
INT32 = (-(1 << 31), (1 << 31) - 1)

#: the values a runtime input of each dtype can hold (bool: 0 and 1)
DTYPE_RANGES = {
    torch.bool: (0, 1), torch.uint8: (0, 255), torch.int8: (-128, 127),
    torch.int16: (-(1 << 15), (1 << 15) - 1), torch.int32: INT32, torch.int64: INT64,
}


def wrap(v: int, bits: int = 64) -> int:
    """``v`` modulo ``2**bits`` as a signed two's-complement value (what a tensor holds)."""
    half = 1 << (bits - 1)
    return ((v + half) % (half << 1)) - half


def representable(lo: int, hi: int, bits: int = 64) -> bool:
    half = 1 << (bits - 1)
    return -half <= lo and hi < half


# ------------------------------------------------------------------ the domain

@dataclass(frozen=True)
class Domain:
    """The values of every variable and runtime input over one call (hashable).

    ``variables``: ``(name, lo, hi)`` for ``q``, ``k``, ``h``, ``b``, ``Lq``, ``Lk``, ``H``
    (and any extra variable, such as the closed forms' ``qs``, ``qe``); ``inputs``: ``(name,
    lo, hi)`` of each input's elements. ``q_offset``, ``Lq``, ``Lk``, ``H``, ``B``: the call,
    for messages.
    """
    variables: tuple
    inputs: tuple
    Lq: int
    Lk: int
    H: int
    B: int
    q_offset: int

    def describe(self) -> str:
        return (f"Lq={self.Lq}, Lk={self.Lk}, q_offset={self.q_offset}"
                + (f", H={self.H}" if self.H != 1 else "")
                + (f", B={self.B}" if self.B != 1 else ""))


def call_domain(Lq: int, Lk: int, *, num_heads: int = 1, batch: int = 1, q_offset=None,
                input_ranges: Optional[Mapping[str, tuple]] = None,
                block_m: Optional[int] = None, block_n: Optional[int] = None,
                extra: Optional[Mapping[str, tuple]] = None) -> Domain:
    """The :class:`Domain` of a call. ``block_m``/``block_n``: widen ``q``/``k`` to whole
    tiles (a kernel evaluates the padded rows and columns of the last tiles too)."""
    off = query_offset(Lq, Lk, q_offset)
    q_hi = off + (Lq if block_m is None else -(-Lq // block_m) * block_m) - 1
    k_hi = (Lk if block_n is None else -(-Lk // block_n) * block_n) - 1
    v = {"q": (off, q_hi), "k": (0, k_hi), "h": (0, num_heads - 1), "b": (0, batch - 1),
         "Lq": (Lq, Lq), "Lk": (Lk, Lk), "H": (num_heads, num_heads)}
    v.update(extra or {})
    ins = tuple(sorted((n, int(lo), int(hi)) for n, (lo, hi) in (input_ranges or {}).items()))
    return Domain(tuple(sorted((n, lo, hi) for n, (lo, hi) in v.items())), ins, Lq, Lk,
                  num_heads, batch, off)


# ------------------------------------------------------------------ bounds

_MISSING = object()


class _Bounds(MaskPass):
    """``[lo, hi]`` of every int node over a :class:`Domain` (bool nodes: None; their
    operands are visited). Memoised per node. ``partial[n]``: the hull of a product's
    partial products, which the interval pass computes too."""

    complete = True

    def __init__(self, domain: Domain):
        self.vars = {n: (lo, hi) for n, lo, hi in domain.variables}
        self.inputs = {n: (lo, hi) for n, lo, hi in domain.inputs}
        self.memo: dict = {}
        self.partial: dict = {}

    def of(self, n: Node):
        v = self.memo.get(n, _MISSING)
        if v is _MISSING:
            v = self.memo[n] = self(n)
        return v

    @rule(Const)
    def const(self, n):
        return n.value, n.value

    @rule(Var)
    def var(self, n):
        return self.vars[n.name]

    @rule(Sum)
    def sum(self, n):
        lo = hi = n.const
        for a, c in n.terms:
            alo, ahi = self.of(a)
            if c > 0:
                lo, hi = lo + c * alo, hi + c * ahi
            else:
                lo, hi = lo + c * ahi, hi + c * alo
        return lo, hi

    @rule(Prod)
    def prod(self, n):
        lo, hi = self.of(n.factors[0])
        wlo, whi = lo, hi
        for f in n.factors[1:]:
            flo, fhi = self.of(f)
            c = (lo * flo, lo * fhi, hi * flo, hi * fhi)
            lo, hi = min(c), max(c)
            wlo, whi = min(wlo, lo), max(whi, hi)
        self.partial[n] = (wlo, whi)
        return lo, hi

    @rule(FloorDiv)
    def floordiv(self, n):
        alo, ahi = self.of(n.a)
        ds = _divisors(self.of(n.b), n)
        vals = [a // d for a in (alo, ahi) for d in ds]
        return min(vals), max(vals)

    @rule(Mod)
    def mod(self, n):
        alo, ahi = self.of(n.a)
        dlo, dhi = self.of(n.b)
        _divisors((dlo, dhi), n)
        if dlo == dhi and alo // dlo == ahi // dlo:
            return alo % dlo, ahi % dlo
        return min(dlo + 1, 0), max(dhi - 1, 0)

    @rule(Abs)
    def abs(self, n):
        lo, hi = self.of(n.a)
        if lo >= 0:
            return lo, hi
        if hi <= 0:
            return -hi, -lo
        return 0, max(-lo, hi)

    @rule(Min, Max)
    def minmax(self, n):
        vals = [self.of(a) for a in n.args]
        f = min if isinstance(n, Min) else max
        return f(v[0] for v in vals), f(v[1] for v in vals)

    @rule(Select)
    def select(self, n):
        self.of(n.cond)
        alo, ahi = self.of(n.a)
        blo, bhi = self.of(n.b)
        return min(alo, blo), max(ahi, bhi)

    @rule(Table)
    def table(self, n):
        ilo, ihi = self.of(n.index)
        vals = n.values[max(ilo, 0): min(ihi, len(n.values) - 1) + 1] or n.values
        return min(vals), max(vals)

    @rule(Load)
    def load(self, n):
        for i in n.index:
            self.of(i)
        return self.inputs.get(n.name, INT64)

    @rule(BoolConst)
    def bool_const(self, n):
        return None

    @rule(Range, IsPow2, Not, And, Or)
    def boolean(self, n):
        for c in n.children():
            self.of(c)
        return None


def _divisors(bounds, n: Node) -> list:
    """The nonzero ends of each sign of a divisor's range ``[dlo, dhi]`` (where ``a // d``
    takes its extremes for ``a`` at the ends of its range); raises when it is 0 alone."""
    dlo, dhi = bounds
    ds = [d for d in {dlo, dhi, -1 if dlo <= -1 <= dhi else 0, 1 if dlo <= 1 <= dhi else 0}
          if d != 0]
    if not ds:
        from .printer import to_source
        raise SpattnValueError(f"the divisor {to_source(n.b)} evaluates to 0")
    return ds


def bounds_of(domain: Domain):
    """``of(node) -> (lo, hi)`` over ``domain``, memoised across the nodes asked for."""
    return _Bounds(domain).of


def node_bounds(ir: Node, domain: Domain) -> dict:
    """``{node: (lo, hi)}`` for every int node of ``ir`` over ``domain`` (exact Python ints)."""
    b = _Bounds(domain)
    b.of(ir)
    return {n: v for n, v in b.memo.items() if v is not None}


# ------------------------------------------------------------------ representability

@dataclass(frozen=True)
class Problem:
    """A node the tensor computation cannot get exactly: ``what`` it is, its bounds."""
    node: Node
    bounds: tuple
    what: str


@dataclass(frozen=True)
class Checked:
    """The result of :func:`analyse`: ``wrapped`` (equality ranges decided modulo
    ``2**bits``), ``problems`` (empty when the call is exact in ``bits``), ``bounds``."""
    domain: Domain
    bits: int
    bounds: dict = field(repr=False, compare=False)
    wrapped: frozenset = frozenset()
    problems: tuple = ()


_STATIC_NODES = (Const, Var, Sum, Prod, FloorDiv, Mod, Abs, Min, Max)


@lru_cache(maxsize=512)
def static_names(n: Node):
    """The length variables of an int node built from them and constants by arithmetic
    (no q, k, h, b, list or input), or None: such a value is one Python int per call, which
    the evaluators compute exactly on the host."""
    names = set()
    for m in walk(n):
        if not isinstance(m, _STATIC_NODES):
            return None
        if isinstance(m, Var):
            if m.name not in ("Lq", "Lk", "H"):
                return None
            names.add(m.name)
    return frozenset(names)


def _postorder(ir: Node) -> list:
    """The distinct nodes of ``ir``, children before parents."""
    out: dict = {}
    stack = [(ir, False)]
    while stack:
        n, done = stack.pop()
        if done:
            out.setdefault(n, None)
            continue
        if n in out:
            continue
        stack.append((n, True))
        stack.extend((c, False) for c in reversed(n.children()))
    return list(out)


class _Requirements(MaskPass):
    """Collects, for one node at a time, the values that must be representable in ``bits``
    (the rules of the module docstring), and the equalities decided modulo ``2**bits``."""

    complete = True

    def __init__(self, b: _Bounds, bits: int):
        self.bounds = b.memo
        self.partial = b.partial
        self.bits = bits
        self.problems: list = []
        self.wrapped: set = set()

    def ok(self, lo_hi) -> bool:
        return representable(lo_hi[0], lo_hi[1], self.bits)

    def need(self, node: Node, what: str, bnd=None) -> None:
        bnd = self.bounds[node] if bnd is None else bnd
        if not self.ok(bnd):
            self.problems.append(Problem(node, bnd, what))

    @rule(Sum, Const, BoolConst, Not, And, Or)
    def free(self, n):
        """Exact modulo 2**bits (sums, constants), or no integer at all."""

    @rule(Var)
    def var(self, n):
        self.need(n, "value")

    @rule(Prod)
    def prod(self, n):
        self.need(n, "product", self.partial.get(n, self.bounds[n]))

    @rule(FloorDiv, Mod)
    def division(self, n):
        self.need(n, "value")
        self.need(n.a, "dividend")
        if static_names(n.b) is None:       # a Python int may be anything nonzero
            self.need(n.b, "divisor")
        elif isinstance(n.b, Const) and self.bits < 64:
            # a literal divisor is a literal of the kernel (beyond int64 the emitter folds
            # the quotient; in a 32-bit kernel 2**31 and more is no int32 literal)
            self.need(n.b, "divisor")

    @rule(Abs)
    def abs(self, n):
        self.need(n, "value")
        self.need(n.a, "argument")

    @rule(Min, Max)
    def minmax(self, n):
        self.need(n, "value")
        for a in n.args:
            if not isinstance(a, Const):    # a constant saturates: exact in min/max
                self.need(a, "argument")

    @rule(Select)
    def select(self, n):
        self.need(n, "value")
        self.need(n.a, "branch")
        self.need(n.b, "branch")

    @rule(Table)
    def table(self, n):
        self.need(n, "value")
        self.need(n.index, "index")
        if self.bits < 64:          # every entry is a literal of the kernel, reached or not
            self.need(n, "list entry", (min(n.values), max(n.values)))

    @rule(Load)
    def load(self, n):
        self.need(n, "input value")
        for i in n.index:
            self.need(i, "index")

    @rule(Range)
    def range(self, n):
        if n.lo is not None and n.lo == n.hi and isinstance(n.x, Sum) \
                and not self.ok(self.bounds[n.x]):
            lo, hi = self.bounds[n.x]
            c, N = n.lo, 1 << self.bits
            if self.ok((c, c)) and c - N < lo and c + N > hi:
                self.wrapped.add(n)
                return
        self.need(n.x, "compared value")

    @rule(IsPow2)
    def is_pow2(self, n):
        self.need(n.a, "argument of is_pow2")


@lru_cache(maxsize=256)
def analyse(ir: Node, domain: Domain, bits: int = 64) -> Checked:
    """Which nodes of ``ir`` the ``bits``-bit tensor computation over ``domain`` cannot get
    exactly (see the module docstring for the rules); cached per (ir, domain, bits)."""
    b = _Bounds(domain)
    b.of(ir)
    req = _Requirements(b, bits)
    for n in _postorder(ir):
        req(n)
    if ir.type == INT:              # an int root (a closed-form bound) is read exactly
        req.need(ir, "value")
    problems = tuple(dict.fromkeys(req.problems))
    return Checked(domain, bits, b.memo, frozenset(req.wrapped), problems)


# ------------------------------------------------------------------ inputs

#: (id, version, data pointer) of a tensor -> (tensor, (min, max)): measured ranges
_MEASURED: dict = {}
_MEASURED_SIZE = 8


def input_ranges(inputs: Mapping[str, torch.Tensor], *, measure: bool) -> dict:
    """``{name: (lo, hi)}``: each input's dtype range, or (``measure``) its values' min and
    max, read from the device in one synchronisation for all inputs (cached per tensor
    while it is unchanged)."""
    out: dict = {}
    todo = []
    for name, t in inputs.items():
        if not measure or torch.compiler.is_compiling():
            out[name] = DTYPE_RANGES.get(t.dtype, INT64)
            continue
        if t.is_inference():        # no version counter: measured at every call
            todo.append((name, t, None))
            continue
        key = (id(t), t._version, t.data_ptr())
        hit = _MEASURED.get(key)
        if hit is not None and hit[0] is t:
            out[name] = hit[1]
        else:
            todo.append((name, t, key))
    if todo:
        ext = torch.stack([torch.stack([t.min(), t.max()]).to(torch.int64) for _, t, _ in todo])
        for (name, t, key), (lo, hi) in zip(todo, ext.cpu().tolist()):
            out[name] = (lo, hi)
            if key is None:
                continue
            if len(_MEASURED) >= _MEASURED_SIZE:
                _MEASURED.pop(next(iter(_MEASURED), None), None)
            _MEASURED[key] = (t, (lo, hi))
    return out


# ------------------------------------------------------------------ entry points

def score_int_roots(score: Node) -> tuple:
    """The maximal int and bool subexpressions of a score (what ``float(..)`` converts, list
    and table indices, ``if`` conditions): the integer arithmetic a scored call computes
    besides its mask's, checked by the same rules."""
    from .nodes import FLOAT
    out: dict = {}
    stack = [score]
    while stack:
        n = stack.pop()
        for c in n.children():
            if c.type == FLOAT:
                stack.append(c)
            else:
                out.setdefault(c, None)
    return tuple(out)


def _score_roots(pattern) -> tuple:
    score = getattr(pattern, "score", None)
    return score_int_roots(score) if score is not None else ()


def check_call(pattern, Lq: int, Lk: int, *, num_heads: int = 1, batch: int = 1, q_offset=None,
               inputs: Optional[Mapping[str, torch.Tensor]] = None) -> Checked:
    """The 64-bit analysis of a call, raising :class:`SpattnValueError` where the tensor
    computation could not be exact (see the module docstring).

    ``inputs`` (validated tensors) enter with their dtype's range; only when that is not
    enough are their values measured (one device synchronisation, cached per tensor).
    """
    ir = pattern.ir if hasattr(pattern, "ir") else pattern
    inputs = inputs or {}
    kw = dict(num_heads=num_heads, batch=batch, q_offset=q_offset)
    for root in _score_roots(pattern):       # a score's integers: exact as the mask's
        check_call(root, Lq, Lk, inputs=inputs, **kw)
    res = analyse(ir, call_domain(Lq, Lk, input_ranges=input_ranges(inputs, measure=False), **kw))
    if inputs and any(isinstance(m, Load) for p in res.problems for m in walk(p.node)):
        res = analyse(ir, call_domain(Lq, Lk, input_ranges=input_ranges(inputs, measure=True),
                                      **kw))
    return require(res, measured=bool(inputs))


def require(checked: Checked, *, measured: bool = False) -> Checked:
    """``checked``, or :class:`SpattnValueError` for its first problem (``measured``: the
    input ranges in it were measured on the tensors)."""
    if checked.problems:
        raise _error(checked.problems[0], checked.domain, measured)
    return checked


def _error(p: Problem, domain: Domain, measured: bool) -> SpattnValueError:
    from .printer import to_source
    lo, hi = p.bounds
    ins = sorted({ld.name for ld in walk(p.node) if isinstance(ld, Load)})
    text = to_source(p.node)
    if len(text) > 120:
        text = text[:117] + "..."
    if ins:
        ranges = dict((n, (a, z)) for n, a, z in domain.inputs)
        told = ", ".join(f"{n!r} in {ranges[n][0]}..{ranges[n][1]}" for n in ins if n in ranges)
        hint = (f"with input values {told}{' (measured)' if measured else ''}; "
                "pass inputs with values in a smaller range")
    elif any(isinstance(v, Var) and v.name == "q" for v in walk(p.node)):
        hint = "use smaller constants or a query offset nearer 0"
    else:
        hint = "use smaller constants"
    return SpattnValueError(
        f"the {p.what} `{text}` takes values in {lo}..{hi} for {domain.describe()}, beyond "
        f"the 64-bit integers (-2**63..2**63 - 1) the computation uses: it cannot be "
        f"computed exactly; {hint}")


def kernel_int64(pattern, Lq: int, Lk: int, *, num_heads: int = 1, batch: int = 1,
                 q_offset=None, inputs: Optional[Mapping[str, torch.Tensor]] = None,
                 closed_form=None, block_m: Optional[int] = None,
                 block_n: Optional[int] = None) -> bool:
    """True when a kernel for this call must compute its integers in 64 bits; False when
    32-bit arithmetic is exact for the pattern's predicate and closed-form bounds.

    The 32-bit rules are the 64-bit ones with ``2**32`` (module docstring): every compared,
    divided, indexed... value within int32; equalities of sums exact modulo ``2**32`` when no
    other value congruent to the constant lies in the sum's bounds (an input truncated to
    int32 is its value modulo ``2**32``, so ``doc[q] == doc[k]`` needs int64 only when the
    ids span ``2**32`` or more). Positions over the padded tiles (``block_m``, ``block_n``)
    and the value 0 that masked loads give are included. ``closed_form``
    (:class:`spattn.ir.ranges.ClosedForm`): its rows' and columns' bounds over the tiles'
    first and last positions, and those bounds shifted by the query offset, must be
    representable too. Input values are measured (one synchronisation per new tensor):
    an int64 input of small ids then runs in 32 bits. Does not raise for the 64-bit rules
    (:func:`check_call` does). A pattern's score counts: its ints (:func:`score_int_roots`)
    are computed in the same kernels.
    """
    ir = pattern.ir if hasattr(pattern, "ir") else pattern
    ranges = {n: (min(lo, 0), max(hi, 0))
              for n, (lo, hi) in input_ranges(inputs or {}, measure=True).items()}
    dom = call_domain(Lq, Lk, num_heads=num_heads, batch=batch, q_offset=q_offset,
                      input_ranges=ranges, block_m=block_m, block_n=block_n)
    if any(analyse(r, dom, 32).problems for r in (ir, *_score_roots(pattern))):
        return True
    if closed_form is None:
        return False
    return not closed_form_exact(closed_form, Lq, Lk, num_heads=num_heads, batch=batch,
                                 q_offset=q_offset, input_ranges=ranges, bits=32)


def closed_form_exact(closed_form, Lq: int, Lk: int, *, num_heads: int = 1, batch: int = 1,
                      q_offset=None, input_ranges=None, bits: int = 64) -> bool:
    """True when every bound of ``closed_form`` (:class:`spattn.ir.ranges.ClosedForm`), over
    the call's first and last tile positions, and those bounds shifted by the query offset,
    is computed exactly in ``bits``-bit integers (a kernel computing it would not wrap)."""
    dom = call_domain(Lq, Lk, num_heads=num_heads, batch=batch, q_offset=q_offset,
                      input_ranges=input_ranges)
    off = dom.q_offset
    q_ends = (off, off + Lq - 1)
    k_ends = (0, Lk - 1)
    for ivs, names, ends, shift in ((closed_form.rows, ("qs", "qe"), q_ends, 0),
                                    (closed_form.cols, ("ks", "ke"), k_ends, off)):
        extra = {names[0]: ends, names[1]: ends}
        cdom = call_domain(Lq, Lk, num_heads=num_heads, batch=batch, q_offset=q_offset,
                           input_ranges=input_ranges, extra=extra)
        for iv in ivs:
            for root in (iv.lo, iv.hi, iv.flo, iv.fhi):
                if root is None:
                    continue
                res = analyse(root, cdom, bits)
                lo, hi = res.bounds[root]
                if res.problems or not representable(lo - shift, hi - shift, bits):
                    return False
    return True
