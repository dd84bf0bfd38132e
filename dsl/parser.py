"""Source text -> syntax tree (:mod:`spattn.dsl.ast`).

``parse_program`` reads a file of statements, ``parse_expression`` a bare
pattern; ``parse_source`` tells them apart (a source is a program when one of
the statement keywords ``param input def pattern`` appears in it outside
comments). Every syntax error becomes a :class:`SpattnSyntaxError` with the
line, the column, the source line, a caret and the tokens that were expected;
no lark exception ever escapes.
"""
from __future__ import annotations

import dataclasses
import re
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

from lark import Lark, Token, Tree
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, \
    UnexpectedToken

from . import ast as A
from .errors import MAX_LITERAL, SpattnError, SpattnSyntaxError, SpattnValueError

GRAMMAR_PATH = Path(__file__).with_name("grammar.lark")

# Readable names of the terminals, for "expected one of: ..." messages.
_TOKEN_NAMES = {
    "NAME": "a name", "INT": "an integer", "$END": "end of input",
    "IF": "'if'", "THEN": "'then'", "ELSE": "'else'", "TRUE": "'true'", "FALSE": "'false'",
    "OR": "'or'", "AND": "'and'", "NOT": "'not'", "VBAR": "'|'", "AMP": "'&'", "TILDE": "'~'",
    "LT": "'<'", "LE": "'<='", "GT": "'>'", "GE": "'>='", "EQ": "'=='", "NE": "'!='",
    "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'", "DSLASH": "'//'", "PERCENT": "'%'",
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "COMMA": "','", "EQUAL": "'='",
    "PARAM": "'param'", "INPUT": "'input'", "DEF": "'def'", "PATTERN": "'pattern'",
    "SCORE": "'score'", "SLASH": "'/'", "FLOAT": "a float", "GRID": "'grid'", "AFTER": "'after'",
    "BEFORE": "'before'",
    "COLON": "':'",
}
# Tokens that can start an expression, and binary operators: collapsed in messages.
_EXPR_START = {"NAME", "INT", "FLOAT", "LPAR", "LSQB", "MINUS", "TILDE", "NOT", "IF", "TRUE",
               "FALSE"}
_OPERATORS = {"OR", "AND", "VBAR", "AMP", "LT", "LE", "GT", "GE", "EQ", "NE", "PLUS", "MINUS",
              "STAR", "DSLASH", "SLASH", "PERCENT", "LSQB", "SCORE"}
_ORDER = ["RPAR", "RSQB", "COMMA", "THEN", "ELSE", "EQUAL", "LPAR", "NAME", "INT"]


@lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark(GRAMMAR_PATH.read_text(), parser="lalr", start=["program", "expression"],
                propagate_positions=True, maybe_placeholders=True)


# ------------------------------------------------------------------ public

def parse_program(src: str, filename: Optional[str] = None) -> A.Program:
    """Parse a file of statements (``param``, ``input``, ``def``, ``pattern``)."""
    src = newlines(src)
    tree = _parse(src, "program", filename)
    try:
        stmts = tuple(_stmt(t) for t in tree.children)
    except RecursionError:
        raise _too_deep(src, filename) from None
    except _LiteralError as e:
        raise e.located(src, filename) from None
    return A.Program(stmts, source=src, filename=filename)


def parse_expression(src: str, filename: Optional[str] = None) -> A.Expr:
    """Parse a bare expression such as ``"causal & window(1024)"``."""
    src = newlines(src)
    if _blank(src):
        raise SpattnSyntaxError("empty pattern: expected an expression", source=src, line=1,
                                column=1, filename=filename)
    tree = _parse(src, "expression", filename)
    try:
        grid, mask, _kw, score = tree.children
        out = _expr(mask)
        if score is not None:
            out = A.Scored(out, _expr(score), line=out.line, column=out.column)
        if grid is not None:
            decl = _stmt(grid)
            out = A.Gridded(decl, out, line=decl.line, column=decl.column)
        return out
    except RecursionError:
        raise _too_deep(src, filename) from None
    except _LiteralError as e:
        raise e.located(src, filename) from None


def is_program(src: str) -> bool:
    """True if ``src`` contains statements (a statement keyword outside comments)."""
    code = re.sub(r"#[^\n]*", "", src)
    return re.search(r"(?<![A-Za-z0-9_])(param|input|def|pattern)(?![A-Za-z0-9_])", code) \
        is not None


def parse_source(src: str, filename: Optional[str] = None) -> Union[A.Program, A.Expr]:
    """A :class:`~spattn.dsl.ast.Program` if ``src`` has statements, else an expression."""
    if not isinstance(src, str):
        raise SpattnSyntaxError(f"a pattern must be given as a str, got {type(src).__name__}")
    src = newlines(src)
    if is_program(src):
        return parse_program(src, filename)
    return parse_expression(src, filename)


# ---------------------------------------------------------------- internals

def newlines(src):
    """``src`` with Windows (``\\r\\n``) and classic Mac (``\\r``) line ends as ``\\n``: a
    comment ends at the line's end whichever the file uses."""
    if isinstance(src, str) and "\r" in src:
        return src.replace("\r\n", "\n").replace("\r", "\n")
    return src


def _blank(src: str) -> bool:
    return not re.sub(r"#[^\n]*", "", src).strip()


def _parse(src: str, start: str, filename: Optional[str]) -> Tree:
    try:
        return _lark().parse(src, start=start)
    except UnexpectedInput as e:
        raise _syntax_error(e, src, filename, start) from None
    except LarkError as e:  # pragma: no cover - defensive: never let lark escape
        raise SpattnSyntaxError(f"cannot parse: {e}", source=src, line=1, column=1,
                                filename=filename) from None
    except RecursionError:
        raise _too_deep(src, filename) from None


def _too_deep(src: str, filename) -> SpattnSyntaxError:
    return SpattnSyntaxError("expression nested too deeply", source=src, line=1, column=1,
                             filename=filename)


def _expected_text(names) -> str:
    names = {n for n in names if not n.startswith("__") or n in _TOKEN_NAMES}
    parts: list[str] = []
    if {"NAME", "INT", "LPAR"} <= names:
        names = names - _EXPR_START
        parts.append("an expression")
    if len(names & _OPERATORS) >= 4:
        names = names - _OPERATORS
        parts.append("an operator")
    order = {n: i for i, n in enumerate(_ORDER)}
    rest = sorted(names, key=lambda n: (order.get(n, len(order)), n == "$END",
                                        _TOKEN_NAMES.get(n, n)))
    parts = [_TOKEN_NAMES.get(n, n.lower()) for n in rest if n != "$END"] + parts
    if "$END" in names:
        parts.append("end of input")
    if not parts:
        return ""
    if len(parts) == 1:
        return f"; expected {parts[0]}"
    return "; expected one of: " + ", ".join(parts)


def _end_position(src: str) -> tuple[int, int]:
    """(line, column) just after the last non-blank character outside comments."""
    code = re.sub(r"#[^\n]*", lambda m: " " * len(m.group()), src).rstrip()
    if not code:
        return 1, 1
    lines = code.split("\n")
    return len(lines), len(lines[-1]) + 1


def _accepts_at(src: str, pos: int, start: str):
    """Terminals the parser accepts after ``src[:pos]`` (None if unknown)."""
    try:
        ip = _lark().parse_interactive(src[:pos], start=start)
        ip.exhaust_lexer()
        return ip.accepts()
    except Exception:  # noqa: BLE001 - best effort, only for the message
        return None


def _syntax_error(e: UnexpectedInput, src: str, filename, start: str) -> SpattnSyntaxError:
    hint = ""
    if isinstance(e, UnexpectedCharacters):
        ch = src[e.pos_in_stream] if 0 <= e.pos_in_stream < len(src) else e.char
        what = f"unexpected character {ch!r}"
        accepts = _accepts_at(src, e.pos_in_stream, start)
        expected = _expected_text(accepts if accepts is not None else (e.allowed or ()))
        line, column = e.line, e.column
        if ch == "!":
            hint = " (not-equal is written !=; negation is ~ or not)"
        elif ch == "^":
            hint = " (there is no xor or power operator)"
    elif isinstance(e, UnexpectedToken):
        tok = e.token
        if tok.type == "$END":
            what = "unexpected end of input"
            line, column = _end_position(src)
        else:
            what = f"unexpected {_describe(tok)}"
            line, column = tok.line, tok.column
            if tok.type == "EQUAL":
                hint = " (comparison is written ==)"
            elif tok.type in ("PARAM", "INPUT", "DEF", "PATTERN"):
                hint = f" ('{tok}' starts a statement and is a reserved word)"
            elif tok.type != "LPAR" and re.search(r"(^|\s)grid\s*$",
                                                  src[:getattr(tok, "start_pos", 0) or 0]):
                hint = (" ('grid' where a statement or a bare pattern starts declares the "
                        "grid: grid (y: 8, x: 8) ..." + ("; for a name grid there, "
                        "parenthesise: (grid[q] == grid[k]))" if start == "expression"
                                                         else ")"))
            elif start == "program" and (m := re.search(
                    r"(?<![A-Za-z0-9_])(param|input|def|pattern)\s*$",
                    re.sub(r"#[^\n]*", "", src[:getattr(tok, "start_pos", 0) or 0]))):
                hint = (f" ('{m.group(1)}' starts a statement, but here it was read as a "
                        "name: what comes before it is incomplete)")
            elif start == "expression" and _after_bare_count(src, getattr(tok, "start_pos",
                                                                          0)):
                hint = (" (after a bare pattern's grid, whose mask follows directly, the T of "
                        "after T and the U of before U are a number, a param or a "
                        "parenthesised expression: after (max(A, B)); a program's grid "
                        "statement takes any constant int expression)")
        try:
            accepts = e.accepts
        except Exception:  # noqa: BLE001 - best effort, only for the message
            accepts = None
        expected = _expected_text(accepts if accepts else (e.expected or ()))
    elif isinstance(e, UnexpectedEOF):  # pragma: no cover - Earley only
        what = "unexpected end of input"
        line, column = _end_position(src)
        expected = _expected_text(e.expected or ())
    else:  # pragma: no cover
        what = "syntax error"
        line, column = getattr(e, "line", 1), getattr(e, "column", 1)
        expected = ""
    if not isinstance(line, int) or line < 1:
        line, column = _end_position(src)
    return SpattnSyntaxError(what + expected + hint, source=src, line=line, column=column,
                             filename=filename)


def _after_bare_count(src: str, pos: int) -> bool:
    """True if ``pos`` of the bare pattern ``src`` directly follows a count of its grid
    (``after T`` / ``before U``: the keyword, or the atom T, or the atom and an open
    parenthesis, as in ``after max(2, 3)``), where an expression was likely meant as the
    count; an error further on in the mask is not about the count. One pass over the
    tokens (linear in the source)."""
    code = re.sub(r"#[^\n]*", lambda m: " " * len(m.group()), src[:pos or 0])
    m = re.match(r"\s*grid\s*\(", code)
    if m is None:
        return False
    depth, i = 1, m.end()
    while i < len(code) and depth:
        depth += {"(": 1, ")": -1}.get(code[i], 0)
        i += 1
    toks = re.findall(r"[\w.]+|\S", code[i:])
    j = 0
    while not depth and j < len(toks) and toks[j] in ("after", "before"):
        j += 1
        if j == len(toks):
            return True                          # right after the keyword
        if toks[j] == "(":                       # a parenthesised count
            while j < len(toks):
                depth += {"(": 1, ")": -1}.get(toks[j], 0)
                j += 1
                if not depth:
                    break
            if depth:
                return False                     # an error inside it
        else:
            j += 1                               # a number or a name
        if j == len(toks):
            return True                          # right after the count
        if toks[j] == "(" and not {"(", ")"} & set(toks[j + 1:]):
            return True                          # a call written as the count
    return False


def _describe(tok: Token) -> str:
    if tok.type == "NAME":
        return f"name {str(tok)!r}"
    if tok.type == "INT":
        return f"integer {str(tok)}"
    return f"{str(tok)!r}"


# ------------------------------------------------------- tree -> syntax tree

def _pos(node) -> dict:
    if isinstance(node, Token):
        return {"line": node.line, "column": node.column}
    meta = node.meta
    return {"line": getattr(meta, "line", 0), "column": getattr(meta, "column", 0)}


class _LiteralError(Exception):
    """An integer literal out of range (or, with ``syntax``, another error of the tree's
    shape), raised while the tree is converted (where the source text is not at hand) and
    reported located by the ``parse_*`` functions."""

    def __init__(self, tok: Token, digits: str, syntax: Optional[str] = None):
        super().__init__(digits)
        self.tok, self.digits, self.syntax = tok, digits, syntax

    def located(self, src: str, filename) -> SpattnError:
        if self.syntax is not None:
            return SpattnSyntaxError(self.syntax, source=src, line=self.tok.line,
                                     column=self.tok.column, filename=filename)
        d = self.digits
        if self.tok.type == "FLOAT":
            return SpattnValueError(
                f"float literal {d} is too large: it overflows a float (at most about "
                "1.8e308; the kernels compute scores in float32, at most about 3.4e38)",
                source=src, line=self.tok.line, column=self.tok.column, filename=filename)
        shown = d if len(d) <= 24 else f"{d[:10]}...{d[-10:]} ({len(d)} digits)"
        return SpattnValueError(
            f"integer literal {shown} is too large: integer literals must be at most 2**256 "
            "in magnitude",
            source=src, line=self.tok.line, column=self.tok.column, filename=filename)


def _int(tok: Token) -> int:
    digits = str(tok).replace("_", "").lstrip("0") or "0"
    # checked by length first: Python refuses to convert strings of over 4300 digits
    if len(digits) > len(str(MAX_LITERAL)) or int(digits) > MAX_LITERAL:
        raise _LiteralError(tok, digits)
    return int(digits)


def _float(tok: Token) -> float:
    v = float(str(tok).replace("_", ""))
    if v == float("inf"):
        raise _LiteralError(tok, str(tok))
    return v


def _signed(tree: Tree):
    minus, value = tree.children
    v = _float(value) if value.type == "FLOAT" else _int(value)
    return -v if minus is not None else v


def _stmt(t: Tree) -> A.Stmt:
    kind = t.data
    if kind == "param_stmt":
        name, value = t.children
        default = None
        if value is not None:
            if value.data == "int_list":
                default = tuple(_signed(c) for c in value.children if c is not None)
            else:
                default = _signed(value)
        return A.ParamDecl(str(name), default, **_pos(name))
    if kind == "input_stmt":
        (name,) = t.children
        return A.InputDecl(str(name), **_pos(name))
    if kind == "def_stmt":
        name, params, body = t.children
        names: tuple[str, ...] = ()
        if params is not None:
            names = tuple(str(c) for c in params.children if c is not None)
        return A.Def(str(name), names, _expr(body), **_pos(name))
    if kind in ("grid_stmt", "grid_bare"):
        kw, _lpar, *axes = [c for c in t.children if c is not None]
        ends = {}
        for word, value in [e.children for e in axes
                            if isinstance(e, Tree) and e.data in ("grid_end", "grid_end_bare")]:
            if word.type in ends:
                raise _LiteralError(word, str(word), f"the grid's '{word}' count is given "
                                    "twice (a grid is 'after T', 'before U', or both)")
            ends[str(word.type)] = _expr(value)
        out = []
        for ax in axes:
            if not isinstance(ax, Tree) or ax.data != "grid_axis":
                continue
            name, _colon, size = ax.children
            e = _expr(size)
            where = _pos(name) if name is not None else {"line": e.line, "column": e.column}
            out.append(A.GridAxis(None if name is None else str(name), e, **where))
        return A.GridDecl(tuple(out), **_pos(kw), extra=ends.get("AFTER"),
                          tail=ends.get("BEFORE"))
    if kind == "pattern_stmt":
        name, body, _kw, score = t.children
        return A.PatternDef(str(name), _expr(body), **_pos(name),
                            score=None if score is None else _expr(score))
    raise AssertionError(kind)  # pragma: no cover


def _args(t: Optional[Tree]) -> tuple[A.Expr, ...]:
    if t is None:
        return ()
    return tuple(_expr(c) for c in t.children)


_OPNAME = {"and": "&", "or": "|", "not": "~"}


def _junction(t: Tree) -> A.Expr:
    """A chain ``a | b | c ...`` (or of ``&``), which the grammar reads as nested pairs
    ``((a | b) | c) ...``, regrouped as a balanced tree of pairs (:func:`_balanced`): its
    depth grows with the logarithm of its length, so the passes that recurse over the syntax
    tree take chains of thousands of terms; the IR flattens the chain either way."""
    operands, ops = _spine(t, lambda n: n.data == t.data)
    return _balanced([_expr(x) for x in operands], ops, signed=False)


_CHAINS = {"+": "+-", "-": "+-", "*": "*"}
_REGROUP = 32     # chains of this many terms or more are regrouped


def _chain(t: Tree) -> A.Expr:
    """A chain of ``+`` and ``-`` (or of ``*``), which the grammar reads as nested pairs
    ``((a + b) - c) ...``. From :data:`_REGROUP` terms on it is regrouped as a balanced tree
    of pairs, as :func:`_junction` does: ``a - b + c - d`` becomes ``(a - b) + (c - d)``,
    and ``a + b - c + d`` becomes ``(a + b) - (c - d)`` (the signs of a right half that
    follows a ``-`` flip). Integer sums and products are exact and the IR collects them into
    one linear form either way; a float chain folds its constants in the regrouped order.
    Shorter chains keep the grouping as written."""
    family = _CHAINS[str(t.children[1])]
    operands, ops = _spine(t, lambda n: n.data == "binop" and str(n.children[1]) in family)
    if len(ops) < _REGROUP - 1:
        left, op, right = t.children
        return A.Binary(str(op), _expr(left), _expr(right), op_line=op.line,
                        op_column=op.column, **_pos(t))
    return _balanced([_expr(x) for x in operands], ops, signed=family != "*")


def _spine(t: Tree, same) -> tuple[list, list]:
    """The operands and operators of the left-nested chain ``t`` (its nodes for which
    ``same`` holds), in written order."""
    operands, ops = [], []
    node = t
    while isinstance(node, Tree) and same(node):
        left, op, right = node.children
        operands.append(right)
        ops.append(op)
        node = left
    operands.append(node)
    return operands[::-1], ops[::-1]


def _balanced(terms: list, ops: list, *, signed: bool) -> A.Expr:
    """``terms`` joined by ``ops`` as a balanced tree of pairs (three terms: ``((a op b) op
    c)``, as written). Every pair keeps the position of its first operand and of the
    operator between its halves. ``signed``: the ops are ``+`` and ``-``, and a half after a
    ``-`` has its signs flipped."""
    signs = [1] + [-1 if signed and str(op) == "-" else 1 for op in ops]

    def pair(i: int, j: int, g: int) -> A.Expr:
        """terms[i:j] with signs ``g * signs[t]`` (``g * signs[i]`` is 1)."""
        if j - i == 1:
            return terms[i]
        m = (i + j + 1) // 2
        op = ops[m - 1]
        name = ("+" if g * signs[m] > 0 else "-") if signed else _OPNAME.get(str(op), str(op))
        return A.Binary(name, pair(i, m, g), pair(m, j, signs[m]), op_line=op.line,
                        op_column=op.column, line=terms[i].line, column=terms[i].column)
    return pair(0, len(terms), 1)


def _expr(t) -> A.Expr:
    if isinstance(t, Token):  # pragma: no cover - every token is wrapped by a rule
        raise AssertionError(t)
    d = t.data
    c = t.children
    p = _pos(t)
    if d == "int_":
        return A.Int(_int(c[0]), **p)
    if d == "float_":
        return A.Float(_float(c[0]), **p)
    if d == "true_":
        return A.Bool(True, **p)
    if d == "false_":
        return A.Bool(False, **p)
    if d == "name":
        return A.Name(str(c[0]), **p)
    if d == "paren":  # a parenthesised expression is located at its '('
        return dataclasses.replace(_expr(c[1]), **p)
    if d == "list_":
        return A.ListLit(_args(c[1]), **p)
    if d == "index":
        return A.Index(_expr(c[0]), _args(c[2]), **p)
    if d == "call":
        return A.Call(str(c[0]), _args(c[2]), **p)
    if d == "neg":
        return A.Unary("-", _expr(c[1]), **p)
    if d == "not_":
        return A.Unary("~", _expr(c[1]), **p)
    if d in ("and_", "or_"):
        return _junction(t)
    if d == "binop" and str(c[1]) in _CHAINS and isinstance(c[0], Tree) \
            and c[0].data == "binop" and str(c[0].children[1]) in _CHAINS[str(c[1])]:
        return _chain(t)
    if d == "binop":
        left, op, right = c
        opname = _OPNAME.get(str(op), str(op))
        return A.Binary(opname, _expr(left), _expr(right), op_line=op.line,
                        op_column=op.column, **p)
    if d == "compare":
        operands = tuple(_expr(x) for x in c[0::2])
        ops = tuple(str(x) for x in c[1::2])
        return A.Compare(ops, operands, **p)
    if d == "if_":
        return A.If(_expr(c[1]), _expr(c[3]), _expr(c[5]), **p)
    if d == "expression":
        return _expr(c[0])
    raise AssertionError(d)  # pragma: no cover

