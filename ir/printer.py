"""IR -> source text in the pattern language.

The printed form of a canonical IR is its canonical source: the cache key, and
what ``Pattern.source`` shows. It parses back to the same IR
(``parse(to_source(ir)) == ir``), using only the language of DESIGN.md §3 plus
list literals (``[8, 16][h]``) for bound list params.
"""
from __future__ import annotations

from .nodes import (Abs, And, BoolConst, Const, FloorDiv, IsPow2, Load, Max, Min, Mod, Node,
                    Not, Or, Prod, Range, Select, Sum, Table, Var)

# Precedence levels of DESIGN.md §3 (higher binds tighter).
IF, OR, AND, NOT, CMP, ADD, MUL, NEG, ATOM = range(1, 10)


def to_source(node: Node) -> str:
    """Canonical source text of ``node``."""
    return _p(node, 0)


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


def _p(node: Node, need: int) -> str:
    if isinstance(node, Const):
        return _wrap(str(node.value), NEG if node.value < 0 else ATOM, need)
    if isinstance(node, BoolConst):
        return "true" if node.value else "false"
    if isinstance(node, Var):
        return node.name
    if isinstance(node, Sum):
        return _wrap(_sum_text(node.terms, node.const), ADD, need)
    if isinstance(node, Prod):
        return _wrap(" * ".join(_p(f, MUL + 1) for f in node.factors), MUL, need)
    if isinstance(node, FloorDiv):
        return _wrap(f"{_p(node.a, MUL)} // {_p(node.b, MUL + 1)}", MUL, need)
    if isinstance(node, Mod):
        return _wrap(f"{_p(node.a, MUL)} % {_p(node.b, MUL + 1)}", MUL, need)
    if isinstance(node, Abs):
        return f"abs({_p(node.a, 0)})"
    if isinstance(node, Min):
        return "min(" + ", ".join(_p(a, 0) for a in node.args) + ")"
    if isinstance(node, Max):
        return "max(" + ", ".join(_p(a, 0) for a in node.args) + ")"
    if isinstance(node, Select):
        text = f"if {_p(node.cond, OR)} then {_p(node.a, OR)} else {_p(node.b, IF)}"
        return _wrap(text, IF, need)
    if isinstance(node, Table):
        return "[" + ", ".join(str(v) for v in node.values) + f"][{_p(node.index, 0)}]"
    if isinstance(node, Load):
        return f"{node.name}[" + ", ".join(_p(i, 0) for i in node.index) + "]"
    if isinstance(node, Range):
        return _wrap(_range_text(node), CMP, need)
    if isinstance(node, IsPow2):
        return f"is_pow2({_p(node.a, 0)})"
    if isinstance(node, Not):
        inner = node.a
        if isinstance(inner, Range) and inner.lo is not None and inner.lo == inner.hi:
            return _wrap(_range_text(inner, negate=True), CMP, need)
        return _wrap(f"~{_p(inner, NOT)}", NOT, need)
    if isinstance(node, And):
        return _wrap(" & ".join(_p(a, AND + 1) for a in node.args), AND, need)
    if isinstance(node, Or):
        return _wrap(" | ".join(_p(a, OR + 1) for a in node.args), OR, need)
    raise TypeError(f"cannot print {node!r}")
