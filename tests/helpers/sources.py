"""Hypothesis strategies producing random, well-formed pattern source text.

``bool_exprs()`` draws a bool pattern over q, k, h: small integer constants,
``+ - * // %`` (divisors are nonzero constants, negative ones included, to
exercise floor semantics), ``abs min max clamp``, comparisons (chained too),
``& | ~`` and their word synonyms, ``if-then-else``, prelude calls with small
positive arguments, and list literals indexed by ``h % n`` (always in range for
any number of heads). Every drawn text compiles without error; sizes are kept
small. ``int_exprs()`` draws the int sub-language; ``programs()`` draws whole
``.spattn`` programs (param, input, def, pattern statements). ``consts=`` (for
``bool_exprs``/``int_exprs``) draws the literals and list entries instead, e.g.
:data:`WIDE` (values up to ``+-2**62`` and beyond int64, and around ``+-2**31 .. 2**32``,
where a 32-bit kernel's literals need care).

    from tests.helpers.sources import bool_exprs
"""
from __future__ import annotations

from hypothesis import strategies as st

VARS = ("q", "k", "h")
DIVISORS = (-3, -2, -1, 1, 2, 3, 4, 5, 8)
#: literals of the exact-integer tests: mostly small, often up to +-2**62, some beyond int64
WIDE = st.one_of(st.integers(-9, 20), st.integers(2**31, 2**62), st.integers(-2**62, -2**31),
                 st.integers(2**31 - 4, 2**32 + 4), st.integers(-2**32 - 4, -2**31 + 4),
                 st.sampled_from([2**63 - 1, -2**63, 2**63, 2**64 + 1, -2**64, 10**30]))


def _paren(s: str) -> str:
    return f"({s})"


def _lit(v: int) -> str:
    return str(v) if v >= 0 else f"({v})"


@st.composite
def _list_index(draw, index_expr: str = "h", consts=None) -> str:
    n = draw(st.integers(1, 4))
    vals = draw(st.lists(st.integers(-8, 16) if consts is None else consts, min_size=n,
                         max_size=n))
    return "[" + ", ".join(map(str, vals)) + f"][{index_expr} % {n}]"


def _int_leaf(consts=None):
    return st.one_of(
        st.sampled_from(VARS),
        st.sampled_from(VARS),          # variables more often than constants
        (st.integers(-9, 20) if consts is None else consts).map(_lit),
        _list_index(consts=consts),
    )


def _int_node(children, consts=None):
    c = children
    binop = st.tuples(c, st.sampled_from(["+", "-"]), c).map(
        lambda t: _paren(f"{t[0]} {t[1]} {t[2]}"))
    scaled = st.tuples(st.integers(-4, 4) if consts is None else consts, c).map(
        lambda t: _paren(f"{_lit(t[0])} * {t[1]}"))
    product = st.tuples(c, c).map(lambda t: _paren(f"{t[0]} * {t[1]}"))
    divmod_ = st.tuples(c, st.sampled_from(["//", "%"]), st.sampled_from(DIVISORS)).map(
        lambda t: _paren(f"{t[0]} {t[1]} {t[2] if t[2] > 0 else _paren(str(t[2]))}"))
    neg = c.map(lambda a: _paren(f"-{a}"))
    fn1 = c.map(lambda a: f"abs({a})")
    fnn = st.tuples(st.sampled_from(["min", "max"]), st.lists(c, min_size=2, max_size=3)).map(
        lambda t: f"{t[0]}({', '.join(t[1])})")
    clamp = st.tuples(c, st.integers(-5, 5), st.integers(0, 10)).map(
        lambda t: f"clamp({t[0]}, {t[1]}, {t[1] + t[2]})")
    select = st.tuples(_cmp_of(c), c, c).map(
        lambda t: _paren(f"if {t[0]} then {t[1]} else {t[2]}"))
    return st.one_of(binop, binop, scaled, divmod_, neg, fn1, fnn, clamp, select, product)


def int_exprs(max_leaves: int = 6, consts=None):
    """Random int expressions over q, k, h (source text, fully parenthesised)."""
    return st.recursive(_int_leaf(consts), lambda c: _int_node(c, consts), max_leaves=max_leaves)


_CMP = ("<", "<=", ">", ">=", "==", "!=")


def _cmp_of(ints):
    single = st.tuples(ints, st.sampled_from(_CMP), ints).map(lambda t: f"{t[0]} {t[1]} {t[2]}")
    chained = st.tuples(ints, st.sampled_from(["<", "<="]), ints, st.sampled_from(["<", "<="]),
                        ints).map(lambda t: " ".join(t))
    return st.one_of(single, single, chained)


_small = st.integers(1, 9).map(str)
_any = st.integers(-3, 9).map(lambda v: str(v) if v >= 0 else f"({v})")


def _prelude_call():
    return st.one_of(
        st.just("full"),
        st.just("causal"),
        st.builds(lambda w: f"window({w})", _small),
        st.builds(lambda a, b: f"local({a}, {b})", _any, _any),
        st.builds(lambda n: f"sink({n})", _any),
        st.builds(lambda n: f"global_tokens({n})", _any),
        st.builds(lambda n: f"prefix_lm({n})", _any),
        st.builds(lambda w, d: f"dilated({w}, {d})", _small, _small),
        st.builds(lambda s: f"strided({s})", _small),
        st.builds(lambda s, c: f"fixed({s}, {c})", _small, _any),
        st.builds(lambda c: f"chunked({c})", _small),
        st.builds(lambda w: f"power2({w})", _small),
        st.builds(lambda x: f"is_pow2({x})", int_exprs(3)),
    )


def _bool_leaf(consts=None):
    return st.one_of(_cmp_of(int_exprs(4, consts)), _cmp_of(int_exprs(4, consts)),
                     _prelude_call(), st.sampled_from(["true", "false"]))


def _bool_node(children):
    c = children
    and_ = st.tuples(c, st.sampled_from(["&", "and"]), c).map(
        lambda t: _paren(f"{t[0]} {t[1]} {t[2]}"))
    or_ = st.tuples(c, st.sampled_from(["|", "or"]), c).map(
        lambda t: _paren(f"{t[0]} {t[1]} {t[2]}"))
    not_ = st.tuples(st.sampled_from(["~", "not "]), c).map(lambda t: f"{t[0]}{_paren(t[1])}")
    if_ = st.tuples(c, c, c).map(lambda t: _paren(f"if {t[0]} then {t[1]} else {t[2]}"))
    return st.one_of(and_, and_, or_, or_, not_, if_)


def bool_exprs(max_leaves: int = 5, consts=None):
    """Random bool pattern expressions over q, k, h (source text that always compiles)."""
    return st.recursive(_bool_leaf(consts), _bool_node, max_leaves=max_leaves)


@st.composite
def programs(draw) -> str:
    """A random well-formed program: params, an input, a macro and one or two patterns."""
    w = draw(st.integers(1, 64))
    spans = draw(st.lists(st.integers(1, 32), min_size=1, max_size=4))
    lines = [
        "# a generated program",
        f"param W = {w}",
        f"param spans = [{', '.join(map(str, spans))}]",
        "input doc",
        "def band(lo, hi) = lo <= q - k & q - k < hi",
        f"def extra = {draw(bool_exprs(3))}",
        f"pattern main = causal & (q - k < W | k < {draw(st.integers(0, 8))}) & extra",
    ]
    second = draw(st.sampled_from([
        "causal & same(doc)",
        "band(0, spans[h % " + str(len(spans)) + "])",
        "doc[q] == doc[k] & band(-W, W)",
        "window(W) | sink(4)",
    ]))
    lines.append(f"pattern other = {second}")
    return "\n".join(lines) + "\n"
