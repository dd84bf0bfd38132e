"""Closed-form key ranges of affine patterns: the kernel's own loop bounds, no metadata.

For a pattern whose comparisons are affine in q and k (after lifting ``abs``/``min``/``max``/
``if`` into case splits, :func:`spattn.ir.intervals.lift`), the formula is put in disjunctive
normal form over its comparisons; each conjunct (at most :data:`MAX_INTERVALS`) gives one
:class:`Interval` per query tile: an int IR expression of the tile's first and last query
position ``qs``, ``qe`` and the uniform variables (h, b, Lq, Lk, H, params, lists[h]).

Each comparison ``lo <= a*q + c*k + u <= hi`` of a conjunct is solved for the other axis
with sympy (``k`` for rows, ``q`` for columns):

* ``c = +-1``: a bound on k, linear in q (slope ``-a/c``); over a tile its minimum is at
  ``qs`` or ``qe`` depending on the slope's sign;
* ``c = 0``: a constraint on q alone: it narrows the tile's effective query range
  ``[max(qs, ..), min(qe, ..)]`` (floor/ceil of the division by ``a``); an empty effective
  range makes the interval empty; a tile not entirely inside makes the FULL range empty;
* ``a = 0``: a bound on k alone (floor/ceil by ``c``, any ``c``);
* ``|c| > 1`` with ``a != 0``: not handled (None), nor are loads, ``%``, ``is_pow2``.

Chunks (:func:`_chunk_bounds`, comparisons with a ``//`` of q or k): the form must be
``s*T + G(q) + u`` with ``T = (k + e) // c`` (or ``T = k``), ``c > 0`` a constant, ``e`` and
``u`` uniform, and ``G(q) = l*q + sum_i v_i*((a_i*q + e_i) // m_i)`` (``m_i > 0`` constants)
monotone: every term non-decreasing, or every term non-increasing. Then
``lo <= s*T + G(q) <= hi`` is ``T`` in the integer interval
``[ceil((lo - G(q))/s), floor((hi - G(q))/s)]`` (for ``s > 0``; bounds swapped for
``s < 0``), i.e. ``k`` in ``[c*A(q) - e, c*B(q) + c - 1 - e]``: an exact lower and upper
bound on k for each q, monotone in q (opposite to G for ``s > 0``), emitted as IR
(``//``, ``*``, ``min``/``max``). A comparison of q alone must be a single ``v*((q + e)//m)``
term (it narrows the effective range like a linear one). Columns: the same with q and k
swapped. Anything else (``(q - k) // c``, two chunk terms of the solved axis, ``2*k // c``,
non-constant or negative divisors, ``q - q // c``) gives None.

``lo``/``hi`` of a conjunct: the max over its lower bounds of their minimum over the tile's
effective rows (each bound is monotone in the row, so at ``qs`` or ``qe``), the min over
its upper bounds of their maximum: a sound superset of the keys the rows see, exact when
the conjunct has at most one lower and one upper bound of different shape (every prelude
pattern) and the rows' key sets join up (``chunked``, ``chunked & causal``,
``chunked & window``; not when some rows inside the tile see no key, as for
``(q + 7) // 20 == k // 20 & causal``). ``flo``/``fhi``: the keys allowed for every row
of the tile (max of the lower bounds' maxima, min of the upper bounds' minima): exact for
the rows that pass the tile-axis constraints, empty for a tile spanning two chunks of
``q // c == k // c``.

Intervals of different conjuncts may overlap (``prefix_lm``: ``k <= q`` and ``k < n``): a
kernel iterating over several must skip the tiles it has already visited. Unbounded ends are
``0`` / ``Lk - 1`` for keys and ``-Q`` / ``Q`` for queries, ``Q = Q_UNBOUNDED = 2**30`` in
:func:`closed_form` (valid while every query position is within ``+-2**30``);
:func:`exact_intervals` rebuilds the columns with a ``Q`` beyond the call's positions (the least
power of two, up to ``2**62``) and checks that every bound is computed exactly in int64.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

import sympy
import torch

from ..dsl.errors import SpattnValueError
from . import build as B
from .bounds import analyse, call_domain, require
from .evaluate import evaluate
from .inputs import check_lengths, query_offset, uniform_loads
from .intervals import lift, replace
from .nodes import And, BoolConst, Const, FloorDiv, Node, Not, Or, Range, Var
from .visitor import Visitor, rule

MAX_INTERVALS = 4
Q_UNBOUNDED = 1 << 30


@dataclass(frozen=True)
class Interval:
    lo: Node
    hi: Node     # int IR: allowed positions of the OTHER axis lie in [lo, hi] (unclamped)
    flo: Node
    fhi: Node    # every position in [flo, fhi] is allowed for EVERY position of this tile's axis


@dataclass(frozen=True)
class ClosedForm:
    rows: tuple   # per query tile: Interval over qs, qe (+ uniform vars)
    cols: tuple   # per key tile: Interval over ks, ke, giving query positions
    #: the pattern it was derived from (rebuilds the columns for far query positions)
    ir: Optional[Node] = field(default=None, compare=False, repr=False)

    def __str__(self):
        from .printer import to_source
        out = []
        for name, ivs in (("rows (keys of query tile [qs, qe])", self.rows),
                          ("cols (queries of key tile [ks, ke])", self.cols)):
            out.append(name + ":")
            for iv in ivs:
                out.append(f"  [{to_source(iv.lo)}, {to_source(iv.hi)}]  "
                           f"full [{to_source(iv.flo)}, {to_source(iv.fhi)}]")
        return "\n".join(out)


class _NotAffine(Exception):
    pass


# ------------------------------------------------------------------ DNF

class _DNF(Visitor):
    """DNF of a bool formula (negated when ``neg``) as a list of conjuncts (lists of Range
    atoms); :class:`_NotAffine` for any other leaf or more than 256 conjuncts."""

    @rule(default=True)
    def other(self, n, neg):
        raise _NotAffine

    @rule(BoolConst)
    def const(self, n, neg):
        return [[]] if (n.value != neg) else []

    @rule(Not)
    def not_(self, n, neg):
        return self(n.a, not neg)

    @rule(Range)
    def range(self, n, neg):
        if not neg:
            return [[n]]
        out = []
        if n.lo is not None:
            out.append([B.range_(n.x, None, n.lo - 1)])
        if n.hi is not None:
            out.append([B.range_(n.x, n.hi + 1, None)])
        return out

    @rule(And, Or)
    def junction(self, n, neg):
        conj = isinstance(n, And) != neg
        parts = [self(a, neg) for a in n.args]
        if not conj:
            out = [c for p in parts for c in p]
            if len(out) > 256:
                raise _NotAffine
            return out
        acc = [[]]
        for p in parts:
            acc = [a + b for a in acc for b in p]
            if len(acc) > 256:
                raise _NotAffine
        return acc


_dnf = _DNF()


def _nnf_dnf(n: Node, neg: bool = False) -> list:
    """DNF as a list of conjuncts (lists of Range atoms)."""
    return _dnf(n, neg)


def _simplify(conjuncts: list) -> list:
    out = []
    seen = set()
    for c in conjuncts:
        node = B.and_(*[r for r in c if not isinstance(r, BoolConst)]) if c else B.TRUE
        if node == B.FALSE or node in seen:
            continue
        seen.add(node)
        out.append(node)
    if B.TRUE in seen:
        return [B.TRUE]
    return out


# ------------------------------------------------------------------ solving (sympy)

class _Sym:
    """IR <-> sympy for linear forms over q, k and uniform atoms."""

    def __init__(self):
        self.to_sym: dict = {}
        self.from_sym: dict = {}

    def sym(self, atom: Node):
        if atom not in self.to_sym:
            s = sympy.Symbol(atom.name if isinstance(atom, Var) else f"u{len(self.to_sym)}",
                             integer=True)
            self.to_sym[atom] = s
            self.from_sym[s] = atom
        return self.to_sym[atom]

    def expr(self, terms: dict, c: int = 0):
        return sympy.Integer(c) + sum((v * self.sym(a) for a, v in terms.items()), sympy.Integer(0))

    def ir(self, e, rounding: str) -> Node:
        """IR of a sympy linear expression with rational coefficients, rounded floor/ceil."""
        e = sympy.together(sympy.expand(e))
        num, den = sympy.fraction(e)
        num = sympy.expand(num)
        den = int(den)
        if den < 0:
            num, den = -num, -den
        terms: dict = {}
        c = 0
        for mono, coeff in num.as_coefficients_dict().items():
            if mono == 1:
                c += int(coeff)
            else:
                terms[self.from_sym[mono]] = terms.get(self.from_sym[mono], 0) + int(coeff)
        node = B.from_linear(terms, c)
        if den == 1:
            return node
        if rounding == "floor":
            return B.floordiv(node, B.const(den))
        return B.neg(B.floordiv(B.neg(node), B.const(den)))


def _bounds(r: Range, axis: str, other: str, S: _Sym):
    """Bounds of one comparison: ('guard', r) | ('axis', lo_node, hi_node) |
    ('other', [(slope, base_sym_expr, 'lo'|'hi')])."""
    terms, c = B.linear(r.x)
    va, vo = Var(axis), Var(other)
    ca, co = terms.get(va, 0), terms.get(vo, 0)
    rest = {a: v for a, v in terms.items() if a not in (va, vo)}
    if not all(B.is_uniform(a) for a in rest):
        raise _NotAffine
    if not ca and not co:
        return ("guard", r)
    asym, osym = S.sym(va), S.sym(vo)
    form = S.expr(terms, c)
    out = []
    for bound, side in ((r.lo, "lo"), (r.hi, "hi")):
        if bound is None:
            continue
        target = osym if co else asym
        coeff = co if co else ca
        sol = sympy.solve(sympy.Eq(form, bound), target)[0]   # target = sol at the boundary
        # side of the solution: form >= lo means target >= sol iff coeff > 0
        is_lower = (side == "lo") == (coeff > 0)
        out.append((sol, "lo" if is_lower else "hi"))
    if not co:
        lo = [S.ir(s, "ceil") for s, k in out if k == "lo"]
        hi = [S.ir(s, "floor") for s, k in out if k == "hi"]
        return ("axis", lo, hi)
    if abs(co) != 1 and ca:
        raise _NotAffine
    res = []
    for sol, kind in out:
        slope = sol.coeff(asym) if ca else 0
        base = sympy.expand(sol - slope * asym)
        res.append((int(slope) if ca else 0, base, kind, "ceil" if kind == "lo" else "floor"))
    return ("other", res)


def _has_floor(r: Range) -> bool:
    """True when the compared form has a non-uniform ``//`` term (the chunk path)."""
    terms, _ = B.linear(r.x)
    return any(isinstance(a, FloorDiv) and not B.is_uniform(a) for a in terms)


def _ceil_div(x: Node, d: int) -> Node:
    return B.neg(B.floordiv(B.neg(x), B.const(d)))


def _chunk_bounds(r: Range, axis: str, other: str):
    """Bounds of a comparison with chunk terms (see the module docstring, "chunks").

    ``r.x = s*((o + e_o) // c) + G(a) + u`` where ``o`` is the other axis (or ``s*o``:
    ``c = 1``), ``G(a) = l*a + sum_i v_i*((t_i*a + e_i) // m_i)`` with every term monotone in
    the same direction, ``u``/``e`` uniform, ``c, m_i > 0`` constants. Returns
    ``('axis', lo_nodes, hi_nodes)`` (no other-axis term: a single ``(a + e) // m`` term) or
    ``('other', [(direction, fn, 'lo'|'hi')])`` where ``fn(pos)`` is the bound on the other
    axis for the axis position ``pos`` and ``direction`` its monotonicity in ``pos``.
    """
    terms, const = B.linear(r.x)
    va, vo = Var(axis), Var(other)
    uni: dict = {}
    lin = 0
    floors = []          # (coeff, t, e_node, m): coeff * ((t*a + e) // m)
    T = None             # (s, e_node, c): s * ((o + e) // c)
    for atom, v in terms.items():
        if B.is_uniform(atom):
            uni[atom] = v
        elif atom == va:
            lin += v
        elif atom == vo:
            if T is not None:
                raise _NotAffine
            T = (v, B.const(0), 1)
        elif isinstance(atom, FloorDiv) and isinstance(atom.b, Const) and atom.b.value > 0:
            m = atom.b.value
            t, e = B.linear(atom.a)
            ta, to = t.get(va, 0), t.get(vo, 0)
            rest = {x: w for x, w in t.items() if x not in (va, vo)}
            if not all(B.is_uniform(x) for x in rest):
                raise _NotAffine
            e_node = B.from_linear(rest, e)
            if to == 1 and not ta and T is None:
                T = (v, e_node, m)
            elif ta and not to:
                floors.append((v, ta, e_node, m))
            else:
                raise _NotAffine
        else:
            raise _NotAffine
    dirs = {(lin > 0) - (lin < 0)} | {(v * t > 0) - (v * t < 0) for v, t, _, _ in floors}
    dirs.discard(0)
    if len(dirs) > 1:
        raise _NotAffine          # not monotone (terms of both directions)
    g_dir = dirs.pop() if dirs else 0
    u = B.from_linear(uni, const)

    def G(pos):
        parts = [B.scale(pos, lin), u]
        parts += [B.scale(B.floordiv(B.add(B.scale(pos, t), e), B.const(m)), v)
                  for v, t, e, m in floors]
        return B.add(*parts)

    if T is None:
        # the tile axis alone: v * ((a + e) // m) + u in [lo, hi]
        if lin or len(floors) != 1 or floors[0][1] != 1:
            raise _NotAffine
        v, _, e, m = floors[0]
        lo_n, hi_n = [], []
        for bound, side in ((r.lo, "lo"), (r.hi, "hi")):
            if bound is None:
                continue
            x = B.sub(B.const(bound), u)
            if (side == "lo") == (v > 0):      # chunk index >= ceil(x / v)
                A = _ceil_div(x if v > 0 else B.neg(x), abs(v))
                lo_n.append(B.sub(B.scale(A, m), e))
            else:                              # chunk index <= floor(x / v)
                Z = B.floordiv(x if v > 0 else B.neg(x), B.const(abs(v)))
                hi_n.append(B.sub(B.add(B.scale(Z, m), B.const(m - 1)), e))
        return ("axis", lo_n, hi_n)

    s, e_o, c = T
    sp = abs(s)
    out = []
    for bound, side in ((r.lo, "lo"), (r.hi, "hi")):
        if bound is None:
            continue
        if s > 0:
            # s*T >= lo - G  ->  T >= ceil((lo - G) / s) ; s*T <= hi - G -> T <= floor(..)
            x = (lambda pos, b=bound: B.sub(B.const(b), G(pos)))
            d = -g_dir
        else:
            # -sp*T >= lo - G  ->  T <= floor((G - lo) / sp) ; <= hi - G -> T >= ceil(..)
            x = (lambda pos, b=bound: B.sub(G(pos), B.const(b)))
            d = g_dir
        is_lower = (side == "lo") == (s > 0)
        if is_lower:     # (o + e) // c >= A  <->  o >= c*A - e
            fn = (lambda pos, x=x: B.sub(B.scale(_ceil_div(x(pos), sp), c), e_o))
        else:            # (o + e) // c <= Z  <->  o <= c*Z + c - 1 - e
            fn = (lambda pos, x=x: B.sub(B.add(B.scale(B.floordiv(x(pos), B.const(sp)), c),
                                               B.const(c - 1)), e_o))
        out.append((d, fn, "lo" if is_lower else "hi"))
    return ("other", out)


def _interval(conj: Node, axis: str, other: str, s_name: str, e_name: str,
              dom_lo: Node, dom_hi: Node) -> Interval:
    S = _Sym()
    ranges = list(conj.args) if isinstance(conj, And) else ([] if conj == B.TRUE else [conj])
    s, e = Var(s_name), Var(e_name)
    guards, a_lo, a_hi, lows, highs = [], [], [], [], []
    for r in ranges:
        if not isinstance(r, Range):
            raise _NotAffine
        if _has_floor(r):
            kind = _chunk_bounds(r, axis, other)
        else:
            kind = _bounds(r, axis, other, S)
        if kind[0] == "guard":
            guards.append(kind[1])
        elif kind[0] == "axis":
            a_lo += kind[1]
            a_hi += kind[2]
        elif _has_floor(r):
            for d, fn, side in kind[1]:
                (lows if side == "lo" else highs).append((d, fn))
        else:
            for slope, base, side, rounding in kind[1]:
                base_ir = S.ir(base, rounding)
                fn = (lambda pos, m=slope, b=base_ir: B.add(B.scale(pos, m), b))
                (lows if side == "lo" else highs).append(((slope > 0) - (slope < 0), fn))
    eff_s = B.max_(s, *a_lo) if a_lo else s
    eff_e = B.min_(e, *a_hi) if a_hi else e

    # each bound is monotone in the tile position (direction d): its minimum over [x, y] is
    # at x when d >= 0, else at y (and the maximum at the other end)
    lo = B.max_(*[f(eff_s if d >= 0 else eff_e) for d, f in lows]) if lows else dom_lo
    hi = B.min_(*[f(eff_e if d >= 0 else eff_s) for d, f in highs]) if highs else dom_hi
    flo = B.max_(*[f(e if d >= 0 else s) for d, f in lows]) if lows else dom_lo
    fhi = B.min_(*[f(s if d >= 0 else e) for d, f in highs]) if highs else dom_hi
    nonempty = B.and_(*([B.cmp("<=", eff_s, eff_e)] if (a_lo or a_hi) else []), *guards)
    every = B.and_(*[B.cmp(">=", s, x) for x in a_lo], *[B.cmp("<=", e, x) for x in a_hi], *guards)
    one, zero = B.const(1), B.const(0)
    return Interval(B.select(nonempty, lo, one), B.select(nonempty, hi, zero),
                    B.select(every, flo, one), B.select(every, fhi, zero))


@lru_cache(maxsize=256)
def _closed_form(ir: Node, unbounded: int = Q_UNBOUNDED) -> Optional[ClosedForm]:
    lifted = lift(ir)
    if lifted is None:
        return None
    try:
        conj = _simplify(_nnf_dnf(lifted))
        if len(conj) > MAX_INTERVALS:
            return None
        big = B.const(unbounded)
        rows = tuple(_interval(c, "q", "k", "qs", "qe", B.const(0), B.sub(Var("Lk"), B.const(1)))
                     for c in conj)
        cols = tuple(_interval(c, "k", "q", "ks", "ke", B.neg(big), big) for c in conj)
    except _NotAffine:
        return None
    return ClosedForm(rows, cols, ir)


def closed_form(ir) -> Optional[ClosedForm]:
    """The closed-form key ranges of ``ir`` (a Pattern or IR), or None when not affine.

    The expressions are in positions (``qs``, ``qe``; ``ks``, ``ke``), valid for every tile
    size; :func:`tile_ranges` evaluates them for given tile sizes.
    """
    ir = ir.ir if hasattr(ir, "ir") else ir
    return _closed_form(ir)


def closed_form_with_loads(ir) -> Optional[ClosedForm]:
    """The closed form of ``ir`` (a Pattern or IR) whose loads of runtime inputs at uniform
    indices (``first[b]``, ``lim[h]``: one value per program) count as uniform values, like
    ``b`` or a list entry; None when it loads nothing so, loads at other indices, or is not
    affine. The bounds then hold those loads: a kernel that computes them reads one element
    per load (the decode kernel's ranges); the host evaluates them with the inputs.

    Each such load stands in as a fresh variable through the solving, and is put back in
    the bounds (the variable's name cannot be written in a pattern)."""
    ir = ir.ir if hasattr(ir, "ir") else ir
    loads = uniform_loads(ir)
    if not loads:
        return None
    stand = [(ld, Var(f"$load{i}")) for i, ld in enumerate(loads)]
    spec = ir
    for ld, var in stand:
        spec = replace(spec, ld, var)
    cf = _closed_form(spec)
    if cf is None:
        return None

    def back(n):
        if n is None:
            return None
        for ld, var in stand:
            n = replace(n, var, ld)
        return n

    def ivs(group):
        return tuple(Interval(back(iv.lo), back(iv.hi), back(iv.flo), back(iv.fhi))
                     for iv in group)
    return ClosedForm(ivs(cf.rows), ivs(cf.cols), ir)


# ------------------------------------------------------------------ evaluation per tile

def exact_intervals(cf: ClosedForm, Lq: int, Lk: int, *, num_heads: int = 1, batch: int = 1,
                    q_offset=None, transpose: bool = False) -> tuple:
    """The intervals of ``cf`` to evaluate for a call (``cf.rows``, or ``cf.cols`` with
    unbounded ends beyond every query position of the call), after checking that each bound
    is computed exactly in int64 over the call's tiles (:func:`spattn.ir.bounds.analyse`);
    raises :class:`SpattnValueError` otherwise."""
    off = query_offset(Lq, Lk, q_offset)
    if not transpose:
        ivs, names, ends = cf.rows, ("qs", "qe"), (off, off + Lq - 1)
    else:
        far = max(abs(off), abs(off + Lq - 1))
        ivs = cf.cols
        if far > Q_UNBOUNDED:
            if far > 1 << 62 or cf.ir is None:
                raise SpattnValueError(
                    f"query positions {off}..{off + Lq - 1} (Lq={Lq}, q_offset={off}) are "
                    f"beyond +-{Q_UNBOUNDED if cf.ir is None else 1 << 62}, the query "
                    f"positions the closed-form column ranges cover")
            ivs = _closed_form(cf.ir, 1 << (far - 1).bit_length()).cols
        names, ends = ("ks", "ke"), (0, Lk - 1)
    dom = call_domain(Lq, Lk, num_heads=num_heads, batch=batch, q_offset=off,
                      extra={names[0]: ends, names[1]: ends})
    for iv in ivs:
        for root in (iv.lo, iv.hi, iv.flo, iv.fhi):
            require(analyse(root, dom))
    return ivs


def tile_ranges(cf: ClosedForm, Lq: int, Lk: int, block_m: int, block_n: int, *,
                num_heads: int = 1, batch: int = 1, q_offset=None, transpose: bool = False,
                device=None) -> list:
    """Per interval: ``(lo_tile, hi_tile, flo_tile, fhi_tile)`` int64 ``[B, H, n_tiles]``.

    Rows (default): per query tile, the key tiles ``lo_tile..hi_tile`` that may hold allowed
    pairs and the key tiles ``flo_tile..fhi_tile`` that are FULL. ``transpose=True``: per key
    tile, the query tiles. Empty ranges are ``(0, -1)``. Clamped to the domain. Raises
    :class:`SpattnValueError` where a bound cannot be computed exactly
    (:func:`exact_intervals`).
    """
    check_lengths(Lq, Lk, num_heads=num_heads, batch=batch)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    off = query_offset(Lq, Lk, q_offset)
    ivs = exact_intervals(cf, Lq, Lk, num_heads=num_heads, batch=batch, q_offset=off,
                          transpose=transpose)
    if not transpose:
        L_axis, b_axis, a_off, L_oth, b_oth, o_off, names = \
            Lq, block_m, off, Lk, block_n, 0, ("qs", "qe")
    else:
        L_axis, b_axis, a_off, L_oth, b_oth, o_off, names = \
            Lk, block_n, 0, Lq, block_m, off, ("ks", "ke")
    nt = -(-L_axis // b_axis)
    n_oth = -(-L_oth // b_oth)
    start = torch.arange(nt, dtype=torch.int64, device=dev) * b_axis
    env = {
        names[0]: (start + a_off).view(1, 1, nt),
        names[1]: (torch.clamp(start + b_axis, max=L_axis) - 1 + a_off).view(1, 1, nt),
        "h": torch.arange(num_heads, dtype=torch.int64, device=dev).view(1, num_heads, 1),
        "b": torch.arange(batch, dtype=torch.int64, device=dev).view(batch, 1, 1),
        "Lq": Lq, "Lk": Lk, "H": num_heads,
    }
    shape = (batch, num_heads, nt)
    out = []
    for iv in ivs:
        vals = [torch.as_tensor(evaluate(x, env), dtype=torch.int64, device=dev).expand(shape)
                for x in (iv.lo, iv.hi, iv.flo, iv.fhi)]
        # clamped into the other axis's positions (+-1) before the shift: no overflow, and
        # an empty interval stays empty
        lo, flo = [v.clamp(o_off, o_off + L_oth) - o_off for v in vals[::2]]
        hi, fhi = [v.clamp(o_off - 1, o_off + L_oth - 1) - o_off for v in vals[1::2]]
        lo, hi = lo.clamp(min=0), hi.clamp(max=L_oth - 1)
        empty = lo > hi
        lo_t = torch.where(empty, 0, lo.clamp(max=L_oth - 1) // b_oth)
        hi_t = torch.where(empty, -1, hi.clamp(min=0) // b_oth)
        flo, fhi = flo.clamp(min=0), fhi.clamp(max=L_oth - 1)
        fempty = flo > fhi
        flo_t = -torch.div(-flo, b_oth, rounding_mode="floor")
        fhi_t = torch.where(fhi >= L_oth - 1, n_oth - 1, (fhi + 1) // b_oth - 1)
        fempty = fempty | (flo_t > fhi_t)
        flo_t = torch.where(fempty, 0, flo_t)
        fhi_t = torch.where(fempty, -1, fhi_t)
        out.append((lo_t.contiguous(), hi_t.contiguous(), flo_t.contiguous(), fhi_t.contiguous()))
    return out
