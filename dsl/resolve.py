"""Name resolution: surface syntax tree -> resolved tree with no names left.

Every name becomes a built-in variable (:class:`VarRef`), a bound param (an
:class:`Int` or a :class:`ListValue`), a runtime input (:class:`InputRef`), or
the inlined body of a macro (user ``def``, another ``pattern``, or a prelude
entry); calls of builtins become :class:`Builtin` nodes.

Scoping. Macro bodies see their own parameters and the scope they were defined
in: a user macro sees the program's names and the prelude, a prelude macro sees
only the prelude (so a user definition never changes what ``causal`` means
inside ``fixed``). Arguments are resolved where the call is written, so no name
is ever captured. User definitions may shadow prelude names, never variables or
builtins. Nodes inlined from the prelude take the position of the call site.

Bare expressions declare nothing: a free name that is indexed (``doc[q]``), or
bound to a macro parameter that the macro indexes (``same(doc)``), is a runtime
input; any other free name must be bound by a keyword param.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import operator
from dataclasses import dataclass, field
from typing import Optional, Union

from . import ast as A
from .errors import MAX_LITERAL, SpattnError, SpattnNameError, SpattnParamError, SpattnTypeError, \
    SpattnValueError, short_repr
from .prelude import BUILTINS, LIST_BUILTINS, prelude

#: Built-in variables (the same as ``spattn.ir.nodes.VARIABLES``).
VARIABLES = ("q", "k", "h", "b", "Lq", "Lk", "H")

#: The most nodes a pattern may have once every macro is inlined.
MAX_EXPANDED_NODES = 200_000

ParamValue = Union[int, float, tuple]


def _is_float(v) -> bool:
    return isinstance(v, float) or (isinstance(v, tuple) and any(isinstance(x, float) for x in v))


@dataclass(frozen=True)
class Resolved:
    """The result of resolution.

    ``patterns``: pattern name -> resolved expression (source order; a bare
    expression is named ``'pattern'``). ``params``: every bound param.
    ``inputs``: pattern name -> {input name: number of index dimensions}.
    ``positions``: pattern name -> (line, column) of its definition.
    """
    patterns: dict
    params: dict
    inputs: dict
    source: str = ""
    filename: Optional[str] = None
    positions: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)          # pattern name -> score tree or None
    float_inputs: dict = field(default_factory=dict)    # pattern name -> {input: dims}
    grid: Optional["ResolvedGrid"] = None               # the grid declaration, if any
    # id(node) -> (node, calls) for nodes written in a user macro's body: the macro calls
    # that inlined it, ((name, line, column), ...) outermost first (:func:`at_call_site`)
    inlined: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ResolvedGrid:
    """A grid declaration with its axis sizes resolved (constant expressions, lowered and
    checked by ``ir.lower``): ``axes`` is ``((name or None, size tree, line, column), ...)``,
    ``extra`` the tree of ``after T`` (tokens before the grid) or None, ``tail`` the tree
    of ``before U`` (tokens after the grid) or None."""
    axes: tuple
    line: int
    column: int
    extra: Optional[A.Expr] = None
    tail: Optional[A.Expr] = None


#: The parameter of an axis's coordinate function (``y(x)`` of ``grid (y: 48, x: 80)``).
_AXIS_PARAM = "position"


def _axis_macros(decl: A.GridDecl) -> dict:
    """The coordinate function of each named axis of ``decl``: ``y(x)`` is
    ``coord(x, [sizes], axis)`` (``coord(x - T, ...)`` after ``T`` extra tokens), located at
    the axis's name."""
    sizes = A.ListLit(tuple(a.size for a in decl.axes), line=decl.line, column=decl.column)
    # the sizes and T sit inside each function's body: its parameter must not capture a
    # name they use (`param position = 3`, `after position`)
    used = set()
    for tree in (sizes,) + (() if decl.extra is None else (decl.extra,)):
        for n in A.walk(tree):
            used.add(n.id if isinstance(n, A.Name) else getattr(n, "func", None))
    param = _AXIS_PARAM
    while param in used:
        param += "_"
    out = {}
    for i, ax in enumerate(decl.axes):
        if ax.name is None:
            continue
        p = {"line": ax.line, "column": ax.column}
        x = A.Name(param, **p)
        if decl.extra is not None:
            x = A.Binary("-", x, decl.extra, op_line=ax.line, op_column=ax.column, **p)
        body = A.Call("coord", (x, sizes, A.Int(i, **p)), **p)
        out[ax.name] = A.Def(ax.name, (param,), body, **p)
    return out


def _check_axis_names(decl: A.GridDecl, err, taken=None) -> None:
    """SpattnNameError for an axis named like a variable, a builtin, another axis or (in a
    program) another statement (``taken``: name -> statement)."""
    seen: dict = {}
    for ax in decl.axes:
        n = ax.name
        if n is None:
            continue
        if n in VARIABLES or n in BUILTINS:
            kind = "variable" if n in VARIABLES else "builtin function"
            raise err(SpattnNameError, f"grid axis {n!r} would hide the {kind} {n!r}: name "
                      "the axis otherwise", ax)
        if n in seen:
            raise err(SpattnNameError, f"the grid has two axes named {n!r}", ax)
        if taken and n in taken:
            first = taken[n]
            raise err(SpattnNameError, f"grid axis {n!r} is already defined at line "
                      f"{first.line}, column {first.column}", ax)
        seen[n] = ax


def at_call_site(e: SpattnError, calls: tuple) -> SpattnError:
    """``e``, located in the body of a user macro that ``calls`` inlined (``((name, line,
    column), ...)``, outermost first), located instead at the outermost call (the place in
    the pattern whose arguments reach the body), its message naming the macro and the place
    in its body (and the chain of calls between). ``e`` itself without calls."""
    if not calls or e.line is None:
        return e
    where = f"inside macro {calls[-1][0]!r} at line {e.line}, column {e.column}"
    for (caller, _, _), (_, line, column) in reversed(list(zip(calls, calls[1:]))):
        where += f", called by {caller!r} at line {line}, column {column}"
    out = type(e).__new__(type(e))
    SpattnError.__init__(out, f"{e.message} ({where})", source=e.source, line=calls[0][1],
                         column=calls[0][2], filename=e.filename)
    return out


def _hides_score(what: str, score_at) -> str:
    """The message of a name ``s`` that a pattern with a score would read instead of the
    score variable (``score_at``: the score's node, for its position)."""
    return (f"{what} named 's' would hide the score variable s in the score at line "
            f"{score_at.line}, column {score_at.column} (there s is the scaled score q·k * "
            "scale); rename it")


# ------------------------------------------------------------------ helpers


#: Keywords every call takes, so no runtime input can be passed under these names.
CALL_KEYWORDS = {
    "scale": "the softmax scale",
    "return_lse": "whether the log-sum-exp is returned",
    "q_offset": "the position of query row 0",
    "plan": "a plan made by pat.plan",
    "layout": "the layout of q, k, v",
    "order": "the token order of a call",
    "deterministic": "a score's table gradients without atomic adds",
    "pattern": "the pattern of spattn.attention",
    "backend": "the backend of spattn.attention",
}


def suggest(name: str, candidates) -> str:
    """``"; did you mean 'x'?"`` for the closest candidate, or ``""``."""
    cands = sorted(set(c for c in candidates if c != name))
    lower = {c.lower(): c for c in cands}
    hit = difflib.get_close_matches(name, cands, n=1, cutoff=0.6) or \
        [lower[m] for m in difflib.get_close_matches(name.lower(), list(lower), n=1, cutoff=0.6)]
    return f"; did you mean {hit[0]!r}?" if hit else ""


def bind_value(name: str, value) -> ParamValue:
    """A keyword param value as an int or a tuple of ints (SpattnParamError otherwise).
    A tensor that requires grad is refused: a param is a constant of the compiled pattern,
    so a gradient meant for it (a learnable slope or temperature) would be dropped."""
    if getattr(value, "requires_grad", False):
        raise SpattnParamError(
            f"param {name!r} is a tensor that requires grad, but params are constants "
            "compiled into the pattern and no gradient would reach it: leave it out of "
            f"compile(...) and pass it at each call ({name}=...), where a score reads it as "
            "a learnable table")
    def one(v):
        if isinstance(v, bool) or (hasattr(v, "dtype") and "bool" in str(getattr(v, "dtype"))):
            raise SpattnParamError(f"param {name!r} must be an int or a list of ints, got a bool")
        if isinstance(v, float) or (hasattr(v, "dtype") and "float" in str(getattr(v, "dtype"))
                                    and getattr(v, "ndim", 0) == 0):
            f = float(v)
            if not math.isfinite(f):
                raise SpattnParamError(f"float param {name!r} must be finite, got {f!r}")
            return f
        try:
            i = operator.index(v)
        except TypeError:
            raise SpattnParamError(f"param {name!r} must be an int or a list of ints, "
                                   f"got {type(v).__name__} {short_repr(v)}") from None
        if abs(i) > MAX_LITERAL:
            raise SpattnParamError(f"param {name!r} is {short_repr(i)}: integer params must be "
                                   "at most 2**256 in magnitude")
        return i
    if isinstance(value, (list, tuple)):
        vals = tuple(one(v) for v in value)
        if not vals:
            raise SpattnParamError(f"list param {name!r} is empty")
        if any(isinstance(v, float) for v in vals):
            vals = tuple(float(v) for v in vals)
        return vals
    if hasattr(value, "tolist") and getattr(value, "ndim", 0) == 1:
        return bind_value(name, value.tolist())
    return one(value)


def _kind(v: ParamValue) -> str:
    return "a list" if isinstance(v, tuple) else "a float" if isinstance(v, float) else "an int"


class _Scope:
    """Global names of a program (or of the prelude)."""

    def __init__(self, *, params=None, inputs=(), macros=None, prelude_scope=False,
                 bare=False, inputs_first=False):
        self.params: dict[str, ParamValue] = params or {}
        self.inputs = set(inputs)
        self.macros: dict[str, A.Def] = macros or {}
        self.prelude_scope = prelude_scope
        self.bare = bare
        self.inputs_first = inputs_first
        self.used_params: set[str] = set()

    def macro(self, name: str) -> Optional[tuple[A.Def, bool]]:
        """(definition, is_prelude) of the macro ``name`` visible here."""
        if not self.prelude_scope and name in self.macros:
            return self.macros[name], False
        pre = prelude()
        if name in pre:
            return pre[name], True
        return None

    def names(self) -> set[str]:
        out = set(VARIABLES) | set(BUILTINS) | set(prelude())
        if not self.prelude_scope:
            out |= set(self.params) | self.inputs | set(self.macros)
        return out


_PRELUDE_SCOPE = _Scope(prelude_scope=True)


class _Resolver:
    def __init__(self, source: str, filename: Optional[str], scope: _Scope):
        self.source = source
        self.filename = filename
        self.scope = scope
        self.stack: list[str] = []
        self.count = 0
        self.in_mask = True          # resolving a mask (float params refused) or a score
        self.calls: list[tuple[str, int, int]] = []   # user macro calls being inlined
        self.inlined: dict = {}      # see Resolved.inlined

    # -------------------------------------------------------------- errors
    def err(self, cls, msg: str, node, origin=None) -> SpattnError:
        line, column = origin[:2] if origin else (node.line, node.column)
        if origin and len(origin) > 2:
            msg += f" (inside the prelude's {origin[2]})"
        return cls(msg, source=self.source, line=line or None, column=column or None,
                   filename=self.filename)

    def pos(self, node, origin) -> dict:
        line, column = origin[:2] if origin else (node.line, node.column)
        return {"line": line, "column": column}

    # ---------------------------------------------------------- expressions
    def expr(self, node: A.Expr, env: dict, origin, scope: _Scope) -> A.Expr:
        out = self._expr(node, env, origin, scope)
        if self.calls and origin is None and not (isinstance(node, A.Name) and node.id in env):
            # written in a user macro's body (an argument keeps the calls it was written in)
            self.inlined.setdefault(id(out), (out, tuple(self.calls)))
        return out

    def _expr(self, node: A.Expr, env: dict, origin, scope: _Scope) -> A.Expr:
        self.count += 1
        if self.count > MAX_EXPANDED_NODES:
            raise self.err(SpattnValueError, "pattern too large once macros are inlined "
                           f"(more than {MAX_EXPANDED_NODES} nodes)", node, origin)
        p = self.pos(node, origin)
        if isinstance(node, A.Int):
            return A.Int(node.value, **p)
        if isinstance(node, A.Float):
            return A.Float(node.value, **p)
        if isinstance(node, A.Bool):
            return A.Bool(node.value, **p)
        if isinstance(node, A.Name):
            return self.name(node, env, origin, scope)
        if isinstance(node, A.ListLit):
            return A.ListLit(tuple(self.expr(x, env, origin, scope) for x in node.items), **p)
        if isinstance(node, A.Index):
            return self.index(node, env, origin, scope)
        if isinstance(node, A.Call):
            return self.call(node, env, origin, scope)
        if isinstance(node, A.Unary):
            return A.Unary(node.op, self.expr(node.operand, env, origin, scope), **p)
        if isinstance(node, A.Binary):
            oline, ocol = origin[:2] if origin else (node.op_line, node.op_column)
            return A.Binary(node.op, self.expr(node.left, env, origin, scope),
                            self.expr(node.right, env, origin, scope), op_line=oline,
                            op_column=ocol, **p)
        if isinstance(node, A.Compare):
            return A.Compare(node.ops, tuple(self.expr(x, env, origin, scope)
                                             for x in node.operands), **p)
        if isinstance(node, A.If):
            return A.If(self.expr(node.cond, env, origin, scope),
                        self.expr(node.then, env, origin, scope),
                        self.expr(node.else_, env, origin, scope), **p)
        raise AssertionError(node)  # pragma: no cover

    def unknown(self, node: A.Expr, name: str, scope: _Scope, origin, extra: str = "",
                env=()) -> SpattnError:
        cands = scope.names() | set(env)
        msg = f"unknown name {name!r}{suggest(name, cands)}"
        return self.err(SpattnNameError, msg + extra, node, origin)

    def name(self, node: A.Name, env: dict, origin, scope: _Scope) -> A.Expr:
        n = node.id
        p = self.pos(node, origin)
        if n in env:
            return env[n]
        if n in VARIABLES:
            return A.VarRef(n, **p)
        if n in BUILTINS:
            raise self.err(SpattnTypeError, f"{n!r} is a builtin function; call it: {n}(...)",
                           node, origin)
        if not scope.prelude_scope:
            if n in scope.params:
                scope.used_params.add(n)
                v = self.param(n, scope, node, origin)
                if isinstance(v, tuple):
                    return A.ListValue(v, n, **p)
                return A.Float(v, **p) if isinstance(v, float) else A.Int(v, **p)
            if n in scope.inputs:
                return A.InputRef(n, **p)
        found = scope.macro(n)
        if found is not None:
            return self.expand(found, (), node, origin, scope)
        if n == "s":
            return A.ScoreRef(**p)
        if scope.bare:
            return A.Free(n, **p)
        raise self.unknown(node, n, scope, origin, env=env)

    def param(self, n: str, scope: _Scope, node, origin):
        """The value of param ``n``; a float one only in a score."""
        v = scope.params[n]
        if self.in_mask and _is_float(v):
            raise self.err(SpattnParamError, f"param {n!r} is a float ({short_repr(v)}), but "
                           "a mask takes ints only: float params are for scores", node, origin)
        return v

    def index(self, node: A.Index, env: dict, origin, scope: _Scope) -> A.Expr:
        p = self.pos(node, origin)
        indices = tuple(self.expr(i, env, origin, scope) for i in node.indices)
        base = node.base
        if isinstance(base, A.Name):
            n = base.id
            bp = self.pos(base, origin)
            if n in env:
                b = env[n]
            elif n in VARIABLES:
                raise self.err(SpattnTypeError, f"the variable {n!r} cannot be indexed",
                               base, origin)
            elif n in BUILTINS:
                raise self.err(SpattnTypeError, f"{n!r} is a builtin function; call it with "
                               f"parentheses: {n}(...)", base, origin)
            elif not scope.prelude_scope and n in scope.params:
                scope.used_params.add(n)
                v = self.param(n, scope, base, origin)
                if not isinstance(v, tuple):
                    raise self.err(SpattnTypeError, f"param {n!r} is an int and cannot be "
                                   "indexed", base, origin)
                b = A.ListValue(v, n, **bp)
            elif not scope.prelude_scope and (n in scope.inputs or scope.inputs_first):
                b = A.InputRef(n, **bp)
            elif scope.macro(n) is not None:
                raise self.err(SpattnTypeError, f"{n!r} is a macro and cannot be indexed; "
                               f"call it with parentheses: {n}(...)", base, origin)
            elif scope.bare:
                b = A.Free(n, **bp)
            else:
                raise self.unknown(base, n, scope, origin, env=env,
                                   extra=f" (declare a runtime input with `input {n}`)"
                                   if not suggest(n, scope.names()) else "")
        else:
            b = self.expr(base, env, origin, scope)
        if not isinstance(b, (A.InputRef, A.ListValue, A.ListLit, A.Free)):
            raise self.err(SpattnTypeError, "only runtime inputs and lists can be indexed",
                           base, origin)
        return A.Index(b, indices, **p)

    def call(self, node: A.Call, env: dict, origin, scope: _Scope) -> A.Expr:
        n = node.func
        p = self.pos(node, origin)
        if n in env:
            raise self.err(SpattnTypeError, f"{n!r} is a macro parameter, not a function",
                           node, origin)
        if n in VARIABLES:
            raise self.err(SpattnTypeError, f"the variable {n!r} is not a function",
                           node, origin)
        if n in BUILTINS:
            lo, hi = BUILTINS[n]
            got = len(node.args)
            if got < lo or (hi is not None and got > hi):
                want = (f"{lo} argument{'s' if lo != 1 else ''}" if lo == hi
                        else f"at least {lo} arguments" if hi is None
                        else f"{lo} to {hi} arguments")
                raise self.err(SpattnTypeError, f"{n} takes {want}, got {got}", node, origin)
            return A.Builtin(n, tuple(self.expr(a, env, origin, scope) for a in node.args), **p)
        if not scope.prelude_scope and (n in scope.params or n in scope.inputs):
            what = "param" if n in scope.params else "runtime input"
            hint = f"; index it: {n}[...]" if n in scope.inputs or \
                isinstance(scope.params.get(n), tuple) else ""
            raise self.err(SpattnTypeError, f"{n!r} is a {what}, not a function{hint}",
                           node, origin)
        found = scope.macro(n)
        if found is None:
            if scope.bare and not scope.prelude_scope:
                raise self.unknown(node, n, scope, origin, env=env,
                                   extra=" (no macro or builtin has this name)"
                                   if not suggest(n, scope.names()) else "")
            raise self.unknown(node, n, scope, origin, env=env)
        return self.expand(found, node.args, node, origin, scope, env)

    def expand(self, found, args, node, origin, scope: _Scope, env=None) -> A.Expr:
        defn, is_prelude = found
        if len(args) != len(defn.params):
            want = len(defn.params)
            sig = f"{defn.name}({', '.join(defn.params)})"
            if isinstance(node, A.Name):
                msg = f"{defn.name} takes {want} argument{'s' if want != 1 else ''}; " \
                      f"call it as {sig}"
            else:
                msg = f"{defn.name} takes {want} argument{'s' if want != 1 else ''} " \
                      f"({sig}), got {len(args)}"
            raise self.err(SpattnTypeError, msg, node, origin)
        key = ("prelude:" if is_prelude else "") + defn.name
        if key in self.stack:
            chain = " -> ".join(s.split(":")[-1] for s in self.stack[self.stack.index(key):])
            raise self.err(SpattnNameError, f"recursive definition: {chain} -> {defn.name} "
                           "(macros are inlined, so recursion is not allowed)", node, origin)
        values = tuple(self.expr(a, env or {}, origin, scope) for a in args)
        new_env = dict(zip(defn.params, values))
        if is_prelude and defn.name in PRELUDE_DOMAINS:
            self.check_domain(defn, values, node, origin)
        if is_prelude:
            body_scope = _PRELUDE_SCOPE
            body_origin = origin or (node.line, node.column, defn.name)
        else:
            body_scope = scope
            body_origin = origin
        self.stack.append(key)
        inside = not is_prelude and origin is None
        if inside:
            self.calls.append((defn.name, node.line, node.column))
        try:
            return self.expr(defn.body, new_env, body_origin, body_scope)
        finally:
            self.stack.pop()
            if inside:
                self.calls.pop()


    def check_domain(self, defn, values, node, origin) -> None:
        """A located SpattnValueError when the constant arguments of a prelude macro are
        outside what it is defined for (:data:`PRELUDE_DOMAINS`); arguments that are not
        constant here are not checked (a table's values: docs/language.md §13)."""
        consts = [_literal(v) for v in values]
        need, ok = PRELUDE_DOMAINS[defn.name]
        if all(c is not None for c in consts) and not ok(*consts):
            got = ", ".join(map(repr, consts))
            e = self.err(SpattnValueError, f"{defn.name}({', '.join(defn.params)}) needs "
                         f"{need}, got {defn.name}({got})", node, origin)
            raise at_call_site(e, tuple(self.calls)) if origin is None else e


#: What the prelude's macros need of their arguments when those are constants: the
#: requirement in words and its test. (``log_bucket``'s own check says the same in terms of
#: its arguments; this says it in the macro's.)
PRELUDE_DOMAINS = {
    "softcap": ("c > 0 (the bound of the capped scores; c * tanh(s / c) divides by c)",
                lambda c: c > 0),
    "t5_bucket": ("integers 4 <= buckets <= 8193 and max_distance > buckets // 4",
                  lambda b, m: isinstance(b, int) and isinstance(m, int)
                  and 4 <= b <= 8193 and m > b // 4),
    "t5_bucket_causal": ("integers 2 <= buckets <= 4096 and max_distance > buckets // 2",
                         lambda b, m: isinstance(b, int) and isinstance(m, int)
                         and 2 <= b <= 4096 and m > b // 2),
}


def _literal(node):
    """The value of a constant argument (a literal, a bound param, or arithmetic of those),
    else None."""
    if isinstance(node, (A.Int, A.Float)):
        return node.value
    if isinstance(node, A.Unary) and node.op == "-":
        v = _literal(node.operand)
        return None if v is None else -v
    if isinstance(node, A.Binary) and node.op in ("+", "-", "*", "/", "//"):
        a, b = _literal(node.left), _literal(node.right)
        if a is None or b is None or (node.op in ("/", "//") and b == 0):
            return None
        if node.op == "//" and not (isinstance(a, int) and isinstance(b, int)):
            return None
        return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b,
                "/": lambda: a / b, "//": lambda: a // b}[node.op]()
    return None


# ------------------------------------------------------------- post-checks

def _rebuild(node: A.Expr, fn) -> A.Expr:
    """``node`` with ``fn`` applied bottom-up to every sub-expression."""
    if isinstance(node, A.Index):
        node = dataclasses.replace(node, base=_rebuild(node.base, fn),
                                   indices=tuple(_rebuild(i, fn) for i in node.indices))
    elif isinstance(node, A.ListLit):
        node = dataclasses.replace(node, items=tuple(_rebuild(i, fn) for i in node.items))
    elif isinstance(node, A.Builtin):
        node = dataclasses.replace(node, args=tuple(_rebuild(i, fn) for i in node.args))
    elif isinstance(node, A.Unary):
        node = dataclasses.replace(node, operand=_rebuild(node.operand, fn))
    elif isinstance(node, A.Binary):
        node = dataclasses.replace(node, left=_rebuild(node.left, fn),
                                   right=_rebuild(node.right, fn))
    elif isinstance(node, A.Compare):
        node = dataclasses.replace(node, operands=tuple(_rebuild(i, fn) for i in node.operands))
    elif isinstance(node, A.If):
        node = dataclasses.replace(node, cond=_rebuild(node.cond, fn),
                                   then=_rebuild(node.then, fn), else_=_rebuild(node.else_, fn))
    return fn(node)


def _check_uses(r: _Resolver, tree: A.Expr, dims: dict) -> dict:
    """Check indexing; infer each input's number of dimensions (into ``dims``).

    ``dims`` maps input name -> (ndim, first Index node); returns the inputs of ``tree``.
    """
    mine: dict[str, int] = {}
    indexed_bases = set()
    for n in A.walk(tree):
        if isinstance(n, A.Index):
            indexed_bases.add(id(n.base))
            b = n.base
            if isinstance(b, (A.InputRef, A.Free)):
                nd = len(n.indices)
                if nd == 0:
                    raise r.err(SpattnTypeError, f"input {b.name!r} needs at least one index",
                                n)
                if b.name in dims and dims[b.name][0] != nd:
                    first = dims[b.name][1]
                    raise r.err(SpattnTypeError,
                                f"input {b.name!r} is indexed with {nd} "
                                f"ind{'ex' if nd == 1 else 'ices'} here but with "
                                f"{dims[b.name][0]} at line {first.line}, column "
                                f"{first.column}", n)
                dims.setdefault(b.name, (nd, n))
                mine[b.name] = nd
            elif len(n.indices) != 1:
                what = f"list param {b.name!r}" if isinstance(b, A.ListValue) else "a list"
                raise r.err(SpattnTypeError, f"{what} takes exactly one index, "
                            f"got {len(n.indices)}", n)
    for n in A.walk(tree):
        if isinstance(n, A.Builtin) and n.func in LIST_BUILTINS:
            indexed_bases.update(id(a) for a in n.args
                                 if isinstance(a, (A.ListValue, A.ListLit)))
    for n in A.walk(tree):
        if id(n) in indexed_bases:
            continue
        if isinstance(n, A.InputRef):
            raise r.err(SpattnTypeError, f"runtime input {n.name!r} must be indexed, "
                        f"e.g. {n.name}[q]", n)
        if isinstance(n, A.ListValue):
            raise r.err(SpattnTypeError, f"list param {n.name!r} must be indexed, "
                        f"e.g. {n.name}[h]", n)
        if isinstance(n, A.ListLit):
            raise r.err(SpattnTypeError, "a list must be indexed, e.g. [8, 16][h]", n)
    return mine


# ------------------------------------------------------------------- entry

def resolve_expression(expr: A.Expr, source: str, params: Optional[dict] = None, *,
                       filename: Optional[str] = None, inputs_first: bool = False,
                       score_mode: bool = False) -> Resolved:
    """Resolve a bare expression (with its score, an :class:`~spattn.dsl.ast.Scored`);
    keyword ``params`` bind its free names.

    ``score_mode``: the expression itself is a score (for parsing printed score IR).

    ``inputs_first``: every indexed name that is not a variable or a param is a
    runtime input, even one spelled like a prelude macro (for parsing printed IR).
    """
    bound: dict[str, ParamValue] = {}
    for name, value in (params or {}).items():
        if name in VARIABLES:
            raise SpattnParamError(f"{name!r} is a built-in variable and cannot be bound "
                                   "as a param")
        bound[name] = bind_value(name, value)
    scope = _Scope(params=bound, bare=True, inputs_first=inputs_first)
    r = _Resolver(source, filename, scope)
    decl = None
    if isinstance(expr, A.Gridded):
        decl, expr = expr.grid, expr.expr

        def err(cls, msg, node):
            return r.err(cls, msg, node)
        _check_axis_names(decl, err)
        scope.macros = _axis_macros(decl)
    score_expr = None
    if isinstance(expr, A.Scored):
        expr, score_expr = expr.mask, expr.score
        _check_score_name_bare(r, decl, expr, score_expr, bound)
    r.in_mask = not score_mode
    tree = r.expr(expr, {}, None, scope)
    trees = [tree]
    if score_expr is not None:
        r.in_mask = False
        trees.append(r.expr(score_expr, {}, None, scope))
    sizes = []
    if decl is not None:
        r.in_mask = True
        sizes = [r.expr(ax.size, {}, None, scope) for ax in decl.axes]
        ends = [e for e in (decl.extra, decl.tail) if e is not None]
        sizes += [r.expr(e, {}, None, scope) for e in ends]
        trees += sizes
    indexed = {n.base.name for t in trees for n in A.walk(t)
               if isinstance(n, A.Index) and isinstance(n.base, A.Free)}
    for t in trees:
        for n in A.walk(t):
            if isinstance(n, A.Free) and n.name in indexed and n.name in CALL_KEYWORDS:
                raise r.err(SpattnNameError, f"a runtime input named {n.name!r} could not be "
                            f"passed: {n.name}= is a keyword of every call "
                            f"({CALL_KEYWORDS[n.name]}); rename the input", n)
            if isinstance(n, A.Free) and n.name not in indexed:
                cands = scope.names() | set(bound)
                hint = suggest(n.name, cands) or \
                    f" (bind it with a keyword param: compile(..., {n.name}=...))"
                raise r.err(SpattnNameError, f"unknown name {n.name!r}{hint}", n)
    trees = [_rebuild(t, lambda n: A.InputRef(n.name, line=n.line, column=n.column)
                      if isinstance(n, A.Free) else n) for t in trees]
    tree = trees[0]
    score_tree = trees[1] if score_expr is not None else None
    grid = None
    if decl is not None:
        axes = len(decl.axes)
        extra = iter(sizes[axes:])
        grid = ResolvedGrid(tuple((ax.name, t, ax.line, ax.column)
                                  for ax, t in zip(decl.axes, sizes[:axes])),
                            decl.line, decl.column,
                            None if decl.extra is None else next(extra),
                            None if decl.tail is None else next(extra))
    unused = sorted(set(bound) - scope.used_params)
    if unused:
        free = {n.id for n in A.walk(expr) if isinstance(n, A.Name)}
        raise SpattnParamError(
            "unknown keyword param" + ("s " if len(unused) > 1 else " ")
            + ", ".join(repr(u) for u in unused) + " (the pattern has no such free name)"
            + suggest(unused[0], free - set(VARIABLES)))
    dims: dict = {}
    mine = _check_uses(r, tree, dims)
    floats = {}
    if score_tree is not None:
        floats = {n: nd for n, nd in _check_uses(r, score_tree, dims).items() if n not in mine}
    return Resolved({"pattern": tree}, dict(bound), {"pattern": mine}, source, filename,
                    {"pattern": (expr.line, expr.column)}, {"pattern": score_tree},
                    {"pattern": floats}, grid)


def _check_score_name_bare(r, decl, mask: A.Expr, score: A.Expr, bound: dict) -> None:
    """In a bare pattern with a score, ``s`` is the score variable only: a grid axis, a
    keyword param (at its first use) or a runtime input (``s[...]``) named ``s`` is a
    SpattnNameError."""
    if decl is not None:
        for ax in decl.axes:
            if ax.name == "s":
                raise r.err(SpattnNameError, _hides_score("a grid axis", score), ax)
    written = [] if decl is None else sorted(
        [ax.size for ax in decl.axes] + [e for e in (decl.extra, decl.tail) if e is not None],
        key=lambda e: (e.line, e.column))
    uses = [n for t in (*written, mask, score) for n in A.walk(t)]
    for n in uses:
        if "s" in bound and isinstance(n, A.Name) and n.id == "s":
            raise r.err(SpattnNameError, _hides_score("the keyword param", score), n)
        if isinstance(n, A.Index) and isinstance(n.base, A.Name) and n.base.id == "s":
            raise r.err(SpattnNameError, _hides_score("a runtime input", score), n.base)


def _def_refs(body: A.Expr, params: tuple[str, ...]) -> list[A.Expr]:
    """Name and Call nodes of ``body`` that refer to globals (not to macro params)."""
    out = []
    for n in A.walk(body):
        if isinstance(n, A.Name) and n.id not in params:
            out.append(n)
        elif isinstance(n, A.Call) and n.func not in params:
            out.append(n)
    return out


def resolve_program(program: A.Program, params: Optional[dict] = None) -> Resolved:
    """Resolve every pattern of ``program``; keyword ``params`` bind its ``param`` declarations."""
    src, fname = program.source, program.filename

    def err(cls, msg, node):
        return cls(msg, source=src, line=node.line or None, column=node.column or None,
                   filename=fname)

    seen: dict[str, A.Stmt] = {}
    decls: dict[str, A.ParamDecl] = {}
    inputs: dict[str, A.InputDecl] = {}
    macros: dict[str, A.Def] = {}
    patterns: dict[str, A.PatternDef] = {}
    decl: Optional[A.GridDecl] = None
    for s in program.statements:
        if isinstance(s, A.GridDecl):
            if decl is not None:
                raise err(SpattnNameError, f"the program declares a second grid (the first is "
                          f"at line {decl.line}, column {decl.column}): a program has one "
                          "token layout", s)
            decl = s
            continue
        n = s.name
        if n in VARIABLES:
            raise err(SpattnNameError, f"{n!r} is a built-in variable and cannot be redefined", s)
        if n in BUILTINS:
            raise err(SpattnNameError, f"{n!r} is a builtin function and cannot be redefined", s)
        if n in seen:
            first = seen[n]
            raise err(SpattnNameError, f"{n!r} is already defined at line {first.line}, "
                      f"column {first.column}", s)
        seen[n] = s
        if isinstance(s, A.ParamDecl):
            decls[n] = s
        elif isinstance(s, A.InputDecl):
            if n in CALL_KEYWORDS:
                raise err(SpattnNameError, f"an input named {n!r} could not be passed: "
                          f"{n}= is a keyword of every call ({CALL_KEYWORDS[n]}); rename the "
                          "input", s)
            inputs[n] = s
        elif isinstance(s, A.Def):
            ps: set[str] = set()
            for pn in s.params:
                if pn in VARIABLES or pn in BUILTINS:
                    raise err(SpattnNameError, f"macro parameter {pn!r} of {n!r} would hide "
                              f"the {'variable' if pn in VARIABLES else 'builtin'} {pn!r}", s)
                if pn in ps:
                    raise err(SpattnNameError, f"macro {n!r} has two parameters named {pn!r}", s)
                ps.add(pn)
            macros[n] = s
        else:
            patterns[n] = s
            macros[n] = A.Def(n, (), s.expr, line=s.line, column=s.column)

    scored = next((p.score for p in patterns.values() if p.score is not None), None)
    if scored is not None:
        kinds = {A.ParamDecl: "a param", A.InputDecl: "an input", A.Def: "a macro",
                 A.PatternDef: "a pattern"}
        if "s" in seen:
            raise err(SpattnNameError, _hides_score(kinds.get(type(seen["s"]), "a name"),
                                                    scored), seen["s"])
        for ax in decl.axes if decl is not None else ():
            if ax.name == "s":
                raise err(SpattnNameError, _hides_score("a grid axis", scored), ax)
    if decl is not None:
        _check_axis_names(decl, err, seen)
        axis_macros = _axis_macros(decl)
        macros.update(axis_macros)

    # keyword params
    bound: dict[str, ParamValue] = {}
    for name, value in (params or {}).items():
        if name not in decls:
            extra = suggest(name, decls)
            if not extra:
                extra = (f"; the program declares {', '.join(map(repr, decls))}" if decls
                         else "; the program declares no params")
            raise SpattnParamError(f"unknown param {name!r}{extra}")
        v = bind_value(name, value)
        d = decls[name].default
        if d is not None and isinstance(d, tuple) != isinstance(v, tuple):
            raise SpattnParamError(f"param {name!r} is declared as {_kind(d)} (default {d!r} "
                                   f"at line {decls[name].line}), got {_kind(v)}: {value!r}")
        bound[name] = v
    for name, d in decls.items():
        if name not in bound:
            if d.default is None:
                raise err(SpattnParamError, f"param {name!r} has no default and was not given; "
                          f"pass it as a keyword: compile(..., {name}=...)", d)
            bound[name] = d.default
    scope = _Scope(params=bound, inputs=inputs, macros=macros)

    # static checks of every macro body: unknown names, recursion
    graph: dict[str, list[tuple[str, A.Expr]]] = {}
    r = _Resolver(src, fname, scope)
    known = scope.names() | {"s"}          # the score variable (a score's macros use it)
    for n, d in macros.items():
        edges = []
        bases = {id(x.base) for x in A.walk(d.body) if isinstance(x, A.Index)}
        for ref in _def_refs(d.body, d.params):
            rn = ref.id if isinstance(ref, A.Name) else ref.func
            if rn not in known:
                hint = ""
                if id(ref) in bases and not suggest(rn, known | set(d.params)):
                    hint = f" (declare a runtime input with `input {rn}`)"
                raise r.unknown(ref, rn, scope, None, env=d.params, extra=hint)
            if rn in macros:
                edges.append((rn, ref))
        graph[n] = edges
    _check_cycles(graph, macros, err)

    trees: dict[str, A.Expr] = {}
    per: dict[str, dict[str, int]] = {}
    scores: dict = {}
    floats: dict = {}
    dims: dict = {}
    for n, s in patterns.items():
        r.in_mask = True
        tree = r.expr(s.expr, {}, None, scope)
        trees[n] = tree
        per[n] = _check_uses(r, tree, dims)
    for n, s in patterns.items():
        scores[n] = None
        floats[n] = {}
        if s.score is not None:
            r.in_mask = False
            scores[n] = r.expr(s.score, {}, None, scope)
            used = _check_uses(r, scores[n], dims)
            masks = set().union(*per.values())
            floats[n] = {i: nd for i, nd in used.items() if i not in masks}
    grid = None
    if decl is not None:
        r.in_mask = True
        grid = ResolvedGrid(tuple((ax.name, r.expr(ax.size, {}, None, scope), ax.line,
                                   ax.column) for ax in decl.axes), decl.line, decl.column,
                            None if decl.extra is None else r.expr(decl.extra, {}, None, scope),
                            None if decl.tail is None else r.expr(decl.tail, {}, None, scope))
    return Resolved(trees, bound, per, src, fname,
                    {n: (s.expr.line, s.expr.column) for n, s in patterns.items()},
                    scores, floats, grid, r.inlined)


def _check_cycles(graph, macros, err) -> None:
    WHITE, GREY, BLACK = 0, 1, 2
    color = {n: WHITE for n in graph}
    path: list[str] = []

    def visit(n):
        color[n] = GREY
        path.append(n)
        for m, ref in graph[n]:
            if color[m] == GREY:
                chain = path[path.index(m):] + [m]
                raise err(SpattnNameError, f"recursive definition: {' -> '.join(chain)} (macros are "
                          "inlined, so recursion is not allowed)", ref)
            if color[m] == WHITE:
                visit(m)
        path.pop()
        color[n] = BLACK

    for n in graph:
        if color[n] == WHITE:
            visit(n)
