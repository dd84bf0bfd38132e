"""Type checking and lowering: resolved syntax tree -> canonical IR.

The entry point is :func:`compile_source` (source text + keyword params ->
:class:`Lowered`). Types are int and bool. Where a bool is expected, an element
of a runtime input (``blocks[q // 64, k // 64]``) means ``!= 0``; any other int
there is a type error (``q - k`` is not a pattern). Every IR node is built
through :mod:`spattn.ir.build`; its errors (division by zero, a divisor that
depends on q or k, an index out of range) are located at the offending node.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..dsl import ast as A
from ..dsl.errors import (SpattnError, SpattnParamError, SpattnSyntaxError, SpattnTypeError,
                          SpattnValueError)
from ..dsl.parser import newlines, parse_expression, parse_source
from ..dsl.resolve import at_call_site, resolve_expression, resolve_program, suggest
from . import build
from .neighborhood import MAX_TOKENS
from .nodes import BOOL, FLOAT, INT, BoolConst, Const, FConst, FTable, Node, depth, walk


@dataclass(frozen=True)
class Lowered:
    ir: Node                 # canonical bool IR
    name: str                # pattern name ('pattern' for a bare expression)
    params: dict             # every bound param: name -> int | float | tuple
    inputs: dict             # runtime input name -> number of index dims (int)
    score: Optional[Node] = None      # canonical float IR of the score, or None
    score_inputs: dict = None         # float runtime input name -> number of index dims
    grid: Optional[tuple] = None      # the token grid a call's lengths must fill, or None
    grid_offset: int = 0              # extra tokens before the grid (``after T``)
    grid_suffix: int = 0              # extra tokens after the grid (``before U``)


def _tname(t: str) -> str:
    return {INT: "an int", BOOL: "a bool", FLOAT: "a float"}[t]


class _Lowerer:
    def __init__(self, source: str, filename: Optional[str], float_inputs=()):
        self.source = source
        self.filename = filename
        self.score_mode = False
        self.float_inputs = set(float_inputs)
        self.shapes: list = []        # (shape, node) of each neighborhood(...) lowered
        self.inlined: dict = {}       # dsl.resolve.Resolved.inlined

    def err(self, cls, msg: str, node: A.Expr, line=None, column=None) -> SpattnError:
        return self.at_call(cls(msg, source=self.source, line=(line or node.line) or None,
                                column=(column or node.column) or None,
                                filename=self.filename), node)

    def build(self, fn, *args, at: A.Expr, line=None, column=None):
        """``fn(*args)``, its errors located at ``at`` (or at line/column)."""
        try:
            return fn(*args)
        except SpattnError as e:
            raise self.at_call(e.with_position(self.source, (line or at.line) or None,
                                               (column or at.column) or None, self.filename),
                               at) from None

    def at_call(self, e: SpattnError, node: A.Expr) -> SpattnError:
        """A domain error (a value or a param out of what an operation takes) at ``node`` of
        a user macro's body, located at the macro's call in the pattern instead
        (:func:`~spattn.dsl.resolve.at_call_site`): the arguments come from there. Other
        errors (types, names) are about the body as written and stay in it."""
        entry = self.inlined.get(id(node))
        if entry is None or entry[0] is not node or \
                not isinstance(e, (SpattnValueError, SpattnParamError)):
            return e
        return at_call_site(e, entry[1])

    # ------------------------------------------------------------- typing
    def int_(self, node: A.Expr, what: str) -> Node:
        ir = self.lower(node)
        if ir.type != INT:
            raise self.err(SpattnTypeError, f"{what} must be an int, got {_tname(ir.type)}",
                           node)
        return ir

    def num_(self, node: A.Expr, what: str) -> Node:
        """An int or a float (a bool is an error)."""
        ir = self.lower(node)
        if ir.type == BOOL:
            want = "a number" if self.score_mode else "an int"
            raise self.err(SpattnTypeError, f"{what} must be {want}, got a bool", node)
        return ir

    @staticmethod
    def is_load(node: A.Expr) -> bool:
        return isinstance(node, A.Index) and isinstance(node.base, (A.InputRef, A.Free))

    def bool_(self, node: A.Expr, what: str, ir: Optional[Node] = None) -> Node:
        ir = self.lower(node) if ir is None else ir
        if ir.type == BOOL:
            return ir
        if self.is_load(node) and ir.type == INT:
            return build.truthy(ir)
        raise self.err(SpattnTypeError, f"{what} must be a bool, got {_tname(ir.type)}", node)

    # ------------------------------------------------------------ lowering
    def lower(self, node: A.Expr) -> Node:
        if isinstance(node, A.Int):
            return build.const(node.value)
        if isinstance(node, A.Float):
            return self.build(build.fconst, node.value, at=node)
        if isinstance(node, A.ScoreRef):
            if not self.score_mode:
                raise self.err(SpattnTypeError, "the score variable s can only be used in a "
                               "score (`MASK score EXPR`, or compile(..., score=...)), not in "
                               "a mask", node)
            return build.SCORE
        if isinstance(node, A.Bool):
            return build.boolean(node.value)
        if isinstance(node, A.VarRef):
            return build.var(node.name)
        if isinstance(node, A.Unary):
            if node.op == "-":
                x = self.num_(node.operand, "the operand of unary -")
                return self.build(build.fneg if x.type == FLOAT else build.neg, x, at=node)
            return self.build(build.not_, self.bool_(node.operand, "the operand of ~ (not)"),
                              at=node)
        if isinstance(node, A.Binary):
            return self.binary(node)
        if isinstance(node, A.Compare):
            vals = [self.int_(x, f"an operand of {node.ops[min(i, len(node.ops) - 1)]}"
                              " (comparisons take ints)")
                    for i, x in enumerate(node.operands)]
            parts = [self.build(build.cmp, op, vals[i], vals[i + 1], at=node.operands[i])
                     for i, op in enumerate(node.ops)]
            return self.build(build.and_, *parts, at=node) if len(parts) > 1 else parts[0]
        if isinstance(node, A.If):
            cond = self.bool_(node.cond, "the condition of if")
            a, b = self.lower(node.then), self.lower(node.else_)
            if FLOAT in (a.type, b.type) and BOOL not in (a.type, b.type):
                return self.build(build.fselect, cond, a, b, at=node)
            if a.type != b.type:
                if a.type == INT and self.is_load(node.then):
                    a = build.truthy(a)
                elif b.type == INT and self.is_load(node.else_):
                    b = build.truthy(b)
                else:
                    raise self.err(SpattnTypeError, "the branches of if-then-else must have "
                                   f"the same type: then is {_tname(a.type)}, else is "
                                   f"{_tname(b.type)}", node)
            return self.build(build.select, cond, a, b, at=node)
        if isinstance(node, A.Index):
            return self.index(node)
        if isinstance(node, A.Builtin) and node.func in ("coord", "neighborhood"):
            return self.grid_builtin(node)
        if isinstance(node, A.Builtin):
            what = f"an argument of {node.func}"
            f = node.func
            if f == "float":
                return build.to_float(self.int_(node.args[0], what))
            if f in ("is_pow2", "log_bucket"):
                args = [self.int_(x, what) for x in node.args]
                fn = build.is_pow2 if f == "is_pow2" else build.log_bucket
                return self.build(fn, *args, at=node)
            args = [self.num_(x, what) for x in node.args]
            if f in ("abs", "min", "max", "clamp") and all(a.type == INT for a in args):
                fn = {"abs": build.abs_, "min": build.min_, "max": build.max_,
                      "clamp": build.clamp}[f]
                return self.build(fn, *args, at=node)
            if f == "clamp":
                return self.build(lambda x, lo, hi: build.fcall(
                    "min", build.fcall("max", x, lo), hi), *args, at=node)
            return self.build(build.fcall, f, *args, at=node)
        if isinstance(node, (A.InputRef, A.Free)):
            raise self.err(SpattnTypeError, f"runtime input {node.name!r} must be indexed, "
                           f"e.g. {node.name}[q]", node)
        if isinstance(node, (A.ListValue, A.ListLit)):
            raise self.err(SpattnTypeError, "a list must be indexed, e.g. spans[h]", node)
        raise self.err(SpattnTypeError, f"cannot lower {type(node).__name__}", node)

    def binary(self, node: A.Binary) -> Node:
        op = node.op
        if op in ("&", "|"):
            what = f"an operand of {op}"
            a = self.bool_(node.left, what)
            b = self.bool_(node.right, what)
            return self.build(build.and_ if op == "&" else build.or_, a, b, at=node)
        # a long chain's `-` may stand as `+` after regrouping (dsl.parser._chain)
        what = "an operand of + or -" if op in ("+", "-") else f"an operand of {op}"
        if op == "/" and not self.score_mode:
            raise self.err(SpattnSyntaxError, "/ is float division, for scores; integer "
                           "division is written //", node, line=node.op_line,
                           column=node.op_column)
        if op in ("+", "-", "*", "/"):
            a = self.num_(node.left, what)
            b = self.num_(node.right, what)
            if FLOAT in (a.type, b.type) or op == "/":
                fn = {"+": build.fadd, "-": build.fsub, "*": build.fmul, "/": build.fdiv}[op]
                return self.build(fn, a, b, at=node, line=node.op_line, column=node.op_column)
        else:
            a = self.int_(node.left, what)
            b = self.int_(node.right, what)
        if op in ("//", "%"):
            fn = build.floordiv if op == "//" else build.mod
            return self.build(fn, a, b, at=node.right)
        fn = {"+": build.add, "-": build.sub, "*": build.mul}[op]
        return self.build(fn, a, b, at=node, line=node.op_line, column=node.op_column)

    def constant(self, node: A.Expr, what: str):
        """A constant argument of a grid builtin: an int, a bool, or a tuple of them (a list
        literal or a list param)."""
        if isinstance(node, A.ListValue):
            return tuple(node.values)
        if isinstance(node, A.ListLit):
            return tuple(self.constant(x, what) for x in node.items)
        ir = self.lower(node)
        if isinstance(ir, Const):
            return ir.value
        if isinstance(ir, BoolConst):
            return ir.value
        if isinstance(ir, FConst):
            raise self.err(SpattnTypeError, f"{what} must be an int (or true / false, or a "
                           f"list of them), got the float {ir.value!r}", node)
        raise self.err(SpattnTypeError, f"{what} must be a constant (an int, true / false, or "
                       "a list of them), not an expression of q, k, h or inputs", node)

    def grid_builtin(self, node: A.Builtin) -> Node:
        """``coord(x, shape, axis)`` and ``neighborhood(shape, kernel_size[, stride[,
        dilation[, is_causal]]])`` (:mod:`spattn.ir.neighborhood`)."""
        from .neighborhood import check_shape, coordinate, neighborhood_ir
        if node.func == "coord":
            x = self.int_(node.args[0], "the position of coord")
            shape = self.constant(node.args[1], "the shape of coord")
            axis = self.constant(node.args[2], "the axis of coord")
            return self.build(lambda: coordinate(x, check_shape(shape), axis), at=node)
        names = ("shape", "kernel_size", "stride", "dilation", "is_causal")
        args = [self.constant(a, f"{n} of neighborhood") for n, a in zip(names, node.args)]
        ir = self.build(neighborhood_ir, *args, at=node)    # (is_causal: bools, as in Python)
        self.shapes.append((check_shape(args[0]), node))
        return ir

    def grid_shape(self, grid) -> tuple:
        """The shape of a resolved grid declaration (:class:`~spattn.dsl.resolve.
        ResolvedGrid`): positive constant ints, 1 to 4 axes; located errors."""
        from .neighborhood import MAX_AXES
        if len(grid.axes) > MAX_AXES:
            raise SpattnValueError(f"a grid has 1 to {MAX_AXES} axes, this one has "
                                   f"{len(grid.axes)}", source=self.source, line=grid.line,
                                   column=grid.column, filename=self.filename)
        shape = []
        for name, tree, line, column in grid.axes:
            what = f"the size of grid axis {name!r}" if name else \
                f"the size of grid axis {len(shape)}"
            v = self.constant(tree, what)
            if isinstance(v, (bool, tuple)) or v < 1:
                raise SpattnValueError(f"{what} must be a positive int, got {v!r}",
                                       source=self.source, line=line, column=column,
                                       filename=self.filename)
            shape.append(v)
            if math.prod(shape) > MAX_TOKENS:
                what = "grid" if len(shape) == len(grid.axes) else \
                    f"grid's first {len(shape)} axes"
                raise SpattnValueError(_too_many(what, tuple(shape), math.prod(shape)),
                                       source=self.source, line=line, column=column,
                                       filename=self.filename)
        return tuple(shape)

    def grid_offset(self, grid, shape: tuple, tail: bool = False, before: int = 0) -> int:
        """``T`` of ``after T`` (``tail``: ``U`` of ``before U``; 0 without): a constant int
        >= 0 that leaves the token count (``T`` and ``U`` plus the cells of ``shape``;
        ``before``: the other count, already read) within :data:`MAX_TOKENS`; located
        errors."""
        tree = grid.tail if tail else grid.extra
        if tree is None:
            return 0
        what = "the extra tokens after a grid (before U)" if tail else \
            "the extra tokens of a grid (after T)"
        v = self.constant(tree, what)
        if isinstance(v, (bool, tuple)) or v < 0:
            raise self.err(SpattnValueError, f"{what} must be an int >= 0, got {v!r}", tree)
        if math.prod(shape) + v + before > MAX_TOKENS:
            raise self.err(SpattnValueError, _too_many(
                "grid", shape, math.prod(shape) + v + before, after=before if tail else v,
                before=v if tail else 0), tree)
        return v

    def pattern_grid(self, declared, offset: int = 0) -> Optional[tuple]:
        """The grid of the pattern just lowered: the declared one, else the shape of its
        ``neighborhood(...)`` builtins; a builtin over another cell count than the grid
        (declared or of an earlier builtin) is a located SpattnValueError."""
        grid, first = declared, None
        for shape, node in self.shapes:
            if grid is None:
                grid, first = shape, node
                continue
            count = math.prod(grid) + (offset if first is None else 0)
            if math.prod(shape) != count:
                where = "the program's grid" if first is None else \
                    f"the neighborhood at line {first.line}, column {first.column}"
                if first is None and offset and math.prod(shape) == math.prod(grid):
                    raise self.err(SpattnValueError, f"neighborhood over the grid {shape} "
                                   f"under a grid with {offset} extra token"
                                   f"{'s' if offset != 1 else ''} ({count} tokens): the "
                                   "builtin's positions are the cells alone, not shifted "
                                   "past extra tokens; write the neighbourhood with the "
                                   "grid's axes (abs(y(q) - y(k)) <= 1 & ...), or in Python "
                                   "spattn.neighborhood(..., extra_before=T, extra_after=U)",
                                   node)
                raise self.err(SpattnValueError, f"neighborhood over the grid {shape} "
                               f"({math.prod(shape)} tokens), but {where} has "
                               f"{count} tokens {grid}: a call has one length",
                               node)
            if declared is None and shape != grid:
                grid = (math.prod(grid),)
        return grid

    def index(self, node: A.Index) -> Node:
        base = node.base
        if isinstance(base, (A.InputRef, A.Free)):
            idx = [self.int_(i, f"an index of input {base.name!r}") for i in node.indices]
            if base.name in self.float_inputs:
                return self.build(build.fload, base.name, idx, at=node)
            return self.build(build.load, base.name, idx, at=node)
        if isinstance(base, A.ListValue):
            values, name = base.values, base.name
        elif isinstance(base, A.ListLit):
            values = []
            for item in base.items:
                v = self.num_(item, "a list element")
                if not isinstance(v, (Const, FConst)):
                    raise self.err(SpattnTypeError, "list elements must be constant numbers",
                                   item)
                values.append(v.value)
            name = "the list"
        else:  # pragma: no cover - resolution rejects these
            raise self.err(SpattnTypeError, "only runtime inputs and lists can be indexed", node)
        if len(node.indices) != 1:
            raise self.err(SpattnTypeError, f"{name} takes exactly one index, got "
                           f"{len(node.indices)}", node)
        i = self.int_(node.indices[0], f"the index of {name}")
        if any(isinstance(v, float) for v in values):
            return self.build(build.ftable, values, i, name, at=node.indices[0])
        return self.build(build.table, values, i, name, at=node.indices[0])

    def pattern(self, node: A.Expr) -> Node:
        self.score_mode = False
        ir = self.lower(node)
        return self.bool_(node, "a pattern", ir)

    def score(self, node: A.Expr) -> Node:
        """A score: a float expression (of ``s``, usually)."""
        self.score_mode = True
        try:
            ir = self.lower(node)
        finally:
            self.score_mode = False
        if ir.type != FLOAT:
            raise self.err(SpattnTypeError, f"a score must be a float expression of s (the "
                           f"scaled score), got {_tname(ir.type)}", node)
        wide = _beyond_float32(ir)
        if wide is not None:
            what = "above" if abs(wide) > 1 else "nonzero below"
            raise self.err(SpattnValueError, f"the score holds the constant {wide!r} (from its "
                           f"literals or params), {what} what float32 holds in the kernels "
                           f"(magnitudes {FLOAT32_TINY:.3g} to {SCORE_CONST_MAX:.3g}: they "
                           "compute scores in float32, in log2 units, the constants times "
                           "log2(e)), where it would be infinite or 0", node)
        return ir


#: The largest finite float32, and the smallest normal one (GPUs flush smaller values to 0).
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38
#: The largest score constant the kernels hold: they carry the score in log2 units, every
#: constant multiplied by log2(e) (codegen.kernels).
SCORE_CONST_MAX = FLOAT32_MAX / 1.4426950408889634


def _beyond_float32(ir: Node) -> Optional[float]:
    """A finite float constant of ``ir`` (a literal, a folded one, an entry of a float list
    param) that the kernels' float32 cannot hold, or None: above
    :data:`SCORE_CONST_MAX` in magnitude (infinite there) or nonzero below
    :data:`FLOAT32_TINY` (0 there: ``s / 1e-50`` would divide by 0). An infinite one is
    infinite in float32 too; an overflow of runtime values is not a constant's."""
    for n in walk(ir):
        values = (n.value,) if isinstance(n, FConst) else \
            n.values if isinstance(n, FTable) else ()
        for v in values:
            if math.isfinite(v) and (abs(v) > SCORE_CONST_MAX or 0 < abs(v) < FLOAT32_TINY):
                return v
    return None


#: The deepest pattern and score (nodes from the root down to a leaf, :func:`nodes.depth`)
#: that compile. The passes recurse over the IR (printing, interval analysis, code
#: generation, sympy's derivative of a score), a few Python frames per level: at these
#: depths every stage runs with hundreds of frames to spare (a caller's own stack,
#: ``torch.compile``'s); past about 200 (a mask) or 130 (a score's backward) they would
#: exceed Python's recursion limit. A chain of 62 ``if h == i then ... else`` is 127 deep.
MAX_DEPTH = 128
MAX_SCORE_DEPTH = 48


#: What a too-deep error suggests: the flat forms of a choice per head.
_FLAT = ("; a choice per head is flat as a list param (window(spans[h]), s * t[h]) or as a "
         "junction, (h == 0 & A) | (h == 1 & B) | ..., or in a score a sum of selects")


def _too_deep(src: str | None, filename, what: str = "pattern", levels: int | None = None,
              limit: int | None = None, line: int | None = 1,
              column: int | None = 1) -> SpattnValueError:
    detail = "" if levels is None else f" ({levels} levels; at most {limit}{_FLAT})"
    return SpattnValueError(f"{what} nested too deeply{detail}", source=src, line=line,
                            column=column, filename=filename)


def check_depth(mask: Node, score: Node | None, src: str | None = None,
                filename=None, at: tuple = ((None, None), (None, None))) -> None:
    """Refuse a mask deeper than :data:`MAX_DEPTH` or a score deeper than
    :data:`MAX_SCORE_DEPTH` (``SpattnValueError``; with ``src``, a compiled source, located
    at the mask's or the score's ``(line, column)`` in ``at``; patterns composed with ``&``,
    ``|``, ``~`` are checked too)."""
    for what, node, limit, (line, column) in (("pattern", mask, MAX_DEPTH, at[0]),
                                               ("score", score, MAX_SCORE_DEPTH, at[1])):
        if node is not None and (d := depth(node)) > limit:
            raise _too_deep(src, filename, what, d, limit, line, column)


def compile_source(src: str, params: dict | None = None, *, pattern: str | None = None,
                   filename: str | None = None, score: str | None = None) -> Lowered:
    """Parse, resolve, type-check and lower ``src`` (a bare expression or a program).

    Keyword ``params`` bind ``param`` declarations of a program, or the free
    names of a bare expression. In a program every pattern is checked; the one
    named ``pattern`` (or the only one) is returned. ``score``: the score of a bare
    expression, given apart (the same as writing ``src score SCORE``).
    """
    src = newlines(src)
    if score is None:
        return _compile_source(src, params, pattern, filename)
    first = src.count("\n") + 3         # the score's first line in the program below
    try:
        return _compile_source(_with_score(src, score), params, pattern, filename)
    except SpattnError as e:
        if e.line is None or e.line < first or not isinstance(score, str):
            raise
        raise _in_score(e, newlines(score), e.line - first + 1) from None


def _in_score(e: SpattnError, score: str, line: int | None) -> SpattnError:
    """``e`` as an error of the score given apart: located at ``line`` of its own text, and
    saying it is the score's."""
    err = type(e).__new__(type(e))
    SpattnError.__init__(err, f"in the score: {e.message}", source=score, line=line,
                         column=e.column)
    return err


def _compile_source(src: str, params, pattern, filename) -> Lowered:
    try:
        tree = parse_source(src, filename)
        if isinstance(tree, A.Program):
            if pattern is not None and not isinstance(pattern, str):
                raise SpattnParamError(f"pattern= must be a pattern name (str), got "
                                       f"{type(pattern).__name__}")
            names = [s.name for s in tree.statements if isinstance(s, A.PatternDef)]
            res = resolve_program(tree, params)
            if not names:
                raise SpattnValueError("the program defines no pattern (add a "
                                       "`pattern NAME = ...` statement)", source=src, line=1,
                                       column=1, filename=filename)
            if pattern is not None and pattern not in names:
                hint = suggest(pattern, names).lstrip("; ")
                raise SpattnParamError(f"no pattern named {pattern!r}"
                                       + (f" ({hint})" if hint else "")
                                       + f"; the program defines {', '.join(map(repr, names))}")
            if pattern is None and len(names) > 1:
                raise SpattnParamError("the program defines several patterns ("
                                       + ", ".join(map(repr, names))
                                       + "); pick one with pattern=\"...\"")
            chosen = pattern or names[0]
        else:
            if pattern is not None:
                raise SpattnParamError(f"pattern={pattern!r} was given, but the source is a "
                                       "single expression, not a program")
            res = resolve_expression(tree, src, params, filename=filename)
            chosen = "pattern"
        floats = set().union(*res.float_inputs.values()) if res.float_inputs else set()
        lo = _Lowerer(src, filename, floats)
        lo.inlined = res.inlined
        declared = None if res.grid is None else lo.grid_shape(res.grid)
        offset = 0 if res.grid is None else lo.grid_offset(res.grid, declared)
        suffix = 0 if res.grid is None else lo.grid_offset(res.grid, declared, tail=True,
                                                           before=offset)
        irs, grids = {}, {}
        for n, t in res.patterns.items():
            lo.shapes = []
            irs[n] = lo.pattern(t)
            grids[n] = lo.pattern_grid(declared, offset + suffix)
        scores = {n: None if t is None else lo.score(t) for n, t in res.scores.items()}
    except RecursionError:
        raise _too_deep(src, filename) from None
    for n in irs:
        where = [(getattr(t, "line", 1) or 1, getattr(t, "column", 1) or 1)
                 for t in (res.patterns[n], res.scores.get(n))]
        check_depth(irs[n], scores.get(n), src, filename, tuple(where))
    return Lowered(irs[chosen], chosen, dict(res.params), dict(res.inputs[chosen]),
                   scores.get(chosen), dict(res.float_inputs.get(chosen, {})),
                   grids[chosen], offset if grids[chosen] == declared else 0,
                   suffix if grids[chosen] == declared else 0)


def _too_many(what: str, shape: tuple, count: int, after: int = 0, before: int = 0) -> str:
    extra = (f" after {after}" if after else "") + (f" before {before}" if before else "")
    return (f"the {what} {shape}{extra}: {count} tokens, more than a call can have "
            f"({MAX_TOKENS} = 2**63 - 1: lengths and positions are 64-bit integers)")


def _with_score(src: str, score: str) -> str:
    """``src`` (a bare expression) with ``score`` as its score clause, on lines of its own
    (so that an error in the score shows the score's own line)."""
    from ..dsl import ast as A
    if not isinstance(score, str):
        raise SpattnParamError(f"score= takes the score as a str (an expression of s), got "
                               f"{type(score).__name__}")
    if not isinstance(src, str):
        return src
    tree = parse_source(src)
    if isinstance(tree, A.Program):
        raise SpattnParamError("score= is for a bare expression; in a program, write the "
                               "score beside its pattern: `pattern p = MASK score EXPR`")
    if isinstance(tree, A.Gridded):
        tree = tree.expr
    if isinstance(tree, A.Scored):
        raise SpattnParamError("the pattern already has a score clause; score= gives it "
                               "a second one")
    try:
        parse_expression(score)      # its syntax errors located in its own text
    except SpattnError as e:
        raise _in_score(e, e.source, e.line) from None
    return f"{src}\nscore\n{score}"


def parse_ir(text: str) -> Node:
    """Parse canonical IR text (``to_source`` output) back into IR.

    A bare expression with no params; every indexed name is a runtime input.
    The result may be an int or a bool.
    """
    try:
        tree = parse_expression(text)
        res = resolve_expression(tree, text, None, inputs_first=True)
        return _Lowerer(text, None).lower(res.patterns["pattern"])
    except RecursionError:
        raise _too_deep(text, None) from None


def parse_score_ir(text: str, float_inputs=()) -> Node:
    """Parse canonical score text (``to_source`` of a score) back into IR; indexed names
    are runtime inputs, float ones when named in ``float_inputs``."""
    try:
        tree = parse_expression(text)
        res = resolve_expression(tree, text, None, inputs_first=True, score_mode=True)
        lo = _Lowerer(text, None, float_inputs)
        return lo.score(res.patterns["pattern"])
    except RecursionError:
        raise _too_deep(text, None) from None
