"""IR -> source text in the pattern language.

The printed form of a canonical IR is its canonical source: the cache key, and
what ``Pattern.source`` shows. It parses back to the same IR
(``parse(to_source(ir)) == ir``), using only the language of DESIGN.md §3 plus
list literals (``[8, 16][h]``) for bound list params.
"""
from __future__ import annotations

import re

from .nodes import (Abs, And, BoolConst, Const, FAdd, FCall, FConst, FDiv, FLoad, FloorDiv,
                    FMul, FSelect, FTable, IsPow2, Load, Max, Min, Mod, Node, Not, Or, Prod,
                    Range, Score, Select, Sum, Table, ToFloat, Var)
from .visitor import Visitor, rule

# Precedence levels of DESIGN.md §3 (higher binds tighter).
IF, OR, AND, NOT, CMP, ADD, MUL, NEG, ATOM = range(1, 10)


def to_source(node: Node) -> str:
    """Canonical source text of ``node``. A text that would start with a name ``grid``
    (an input: ``grid[k] == grid[q]``) is parenthesised: there ``grid`` would start a
    bare pattern's grid declaration."""
    text = _p(node, 0)
    return f"({text})" if re.match(r"grid(?![A-Za-z0-9_])", text) else text


def _wrap(text: str, level: int, need: int) -> str:
    return f"({text})" if level < need else text


def _term(atom: Node, coeff: int) -> tuple[str, str]:
    """(sign, text) of ``coeff * atom`` inside a sum."""
    sign = "-" if coeff < 0 else "+"
    c = abs(coeff)
    if c == 1:
        return sign, _p(atom, ADD + 1)
    return sign, f"{c} * {_p(atom, MUL + 1)}"


def _sum_text(terms, const: int) -> str:
    parts = [_term(a, v) for a, v in terms]
    if const:
        parts.append(("-" if const < 0 else "+", str(abs(const))))
    if not parts:
        return "0"
    first_sign, text = parts[0]
    if first_sign == "-":
        # unary minus binds tighter than * // %: a lone negated atom is printed at that level
        lone_atom = bool(terms) and abs(terms[0][1]) == 1
        text = "-" + (_p(terms[0][0], NEG + 1) if lone_atom else text)
    for sign, t in parts[1:]:
        text += f" {sign} {t}"
    return text


def _range_text(r: Range, negate: bool = False) -> str:
    x = r.x
    # ``p == n`` reads better than ``p - n == 0`` for a difference of terms.
    if isinstance(x, Sum) and x.const == 0 and any(v < 0 for _, v in x.terms) and \
            (r.lo == 0 or r.lo is None) and (r.hi == 0 or r.hi is None):
        pos = Sum(tuple((a, v) for a, v in x.terms if v > 0), 0)
        negs = Sum(tuple((a, -v) for a, v in x.terms if v < 0), 0)
        lhs = _sum_text(pos.terms, 0)
        rhs = _sum_text(negs.terms, 0)
        op = ("!=" if negate else "==") if r.lo == r.hi else ("<=" if r.lo is None else ">=")
        return f"{lhs} {op} {rhs}"
    xs = _p(x, CMP + 1)
    if r.lo is not None and r.hi is not None:
        if r.lo == r.hi:
            return f"{xs} {'!=' if negate else '=='} {r.lo}"
        return f"{r.lo} <= {xs} <= {r.hi}"
    if r.lo is not None:
        return f"{xs} >= {r.lo}"
    return f"{xs} <= {r.hi}"


class _Printer(Visitor):
    """Source text of a node at a context precedence ``need`` (parenthesised below it)."""

    complete = True

    @rule(Const)
    def const(self, n, need):
        return _wrap(str(n.value), NEG if n.value < 0 else ATOM, need)

    @rule(BoolConst)
    def bool_const(self, n, need):
        return "true" if n.value else "false"

    @rule(Var)
    def var(self, n, need):
        return n.name

    @rule(Sum)
    def sum(self, n, need):
        return _wrap(_sum_text(n.terms, n.const), ADD, need)

    @rule(Prod)
    def prod(self, n, need):
        return _wrap(" * ".join(self(f, MUL + 1) for f in n.factors), MUL, need)

    @rule(FloorDiv, Mod)
    def division(self, n, need):
        op = "//" if isinstance(n, FloorDiv) else "%"
        return _wrap(f"{self(n.a, MUL)} {op} {self(n.b, MUL + 1)}", MUL, need)

    @rule(Abs)
    def abs(self, n, need):
        return f"abs({self(n.a, 0)})"

    @rule(Min, Max)
    def minmax(self, n, need):
        name = "min" if isinstance(n, Min) else "max"
        return f"{name}(" + ", ".join(self(a, 0) for a in n.args) + ")"

    @rule(Select, FSelect)
    def select(self, n, need):
        text = f"if {self(n.cond, OR)} then {self(n.a, OR)} else {self(n.b, IF)}"
        return _wrap(text, IF, need)

    @rule(Table)
    def table(self, n, need):
        return "[" + ", ".join(str(v) for v in n.values) + f"][{self(n.index, 0)}]"

    @rule(Load, FLoad)
    def load(self, n, need):
        return f"{n.name}[" + ", ".join(self(i, 0) for i in n.index) + "]"

    @rule(Range)
    def range(self, n, need):
        return _wrap(_range_text(n), CMP, need)

    @rule(IsPow2)
    def is_pow2(self, n, need):
        return f"is_pow2({self(n.a, 0)})"

    @rule(Not)
    def not_(self, n, need):
        inner = n.a
        if isinstance(inner, Range) and inner.lo is not None and inner.lo == inner.hi:
            return _wrap(_range_text(inner, negate=True), CMP, need)
        return _wrap(f"~{self(inner, NOT)}", NOT, need)

    @rule(And, Or)
    def junction(self, n, need):
        if isinstance(n, And):
            return _wrap(" & ".join(self(a, AND + 1) for a in n.args), AND, need)
        return _wrap(" | ".join(self(a, OR + 1) for a in n.args), OR, need)



    # ---------------------------------------------------------------- floats
    @rule(FConst)
    def fconst(self, n, need):
        return _wrap(_float_text(n.value), NEG if n.value < 0 else ATOM, need)

    @rule(Score)
    def score(self, n, need):
        return "s"

    @rule(ToFloat)
    def to_float(self, n, need):
        # an operand of a float operator is promoted again when parsed; alone (a whole
        # score, a function's argument) the conversion is written out
        if need == 0:
            return f"float({self(n.a, 0)})"
        return self(n.a, need)

    @rule(FAdd)
    def fadd(self, n, need):
        parts = [self(n.args[0], ADD)]
        for a in n.args[1:]:
            neg = _negated(a)
            if isinstance(a, FConst) and a.value < 0:
                parts.append(f"- {_float_text(-a.value)}")
            elif neg is not None:
                parts.append(f"- {self(neg, ADD + 1)}")
            else:
                parts.append(f"+ {self(a, ADD + 1)}")
        return _wrap(" ".join(parts), ADD, need)

    @rule(FMul)
    def fmul(self, n, need):
        neg = _negated(n)
        if neg is not None:
            return _wrap(f"-{self(neg, NEG)}", NEG, need)
        return _wrap(" * ".join(self(a, MUL + 1) if i else self(a, MUL)
                                for i, a in enumerate(n.args)), MUL, need)

    @rule(FDiv)
    def fdiv(self, n, need):
        return _wrap(f"{self(n.a, MUL)} / {self(n.b, MUL + 1)}", MUL, need)

    @rule(FCall)
    def fcall(self, n, need):
        return f"{n.fn}(" + ", ".join(self(a, 0) for a in n.args) + ")"

    @rule(FTable)
    def ftable(self, n, need):
        return "[" + ", ".join(_float_text(v) for v in n.values) + f"][{self(n.index, 0)}]"


def _float_text(v: float) -> str:
    """A float literal that reads back as the same float (always with a point or exponent)."""
    text = repr(float(v))
    if text.startswith("-"):
        return "-" + _float_text(-v)
    return text if any(c in text for c in ".e") else text + ".0"


def _negated(n: Node):
    """``x`` when ``n`` is ``x * -1.0`` (printed as ``-x``), else None."""
    if isinstance(n, FMul) and isinstance(n.args[-1], FConst) and n.args[-1].value == -1.0:
        rest = n.args[:-1]
        return rest[0] if len(rest) == 1 else FMul(rest)
    return None


_p = _Printer()
