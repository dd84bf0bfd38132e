"""IR -> Triton expression code, with common sub-expressions computed once.

The emitter turns one or more IR roots (the pattern predicate, or the int
expressions of a closed-form key range) into straight-line Triton code:

* the IR is a DAG of sub-expressions (``networkx.DiGraph``); every node used
  more than once, every runtime-input load and every root gets a named
  temporary, computed once, children before parents in first-use order; nodes
  used once are inlined into their parent;
* nodes are split in two *levels*: ``outer`` nodes do not depend on the
  variables that change inside the kernel's tile loop (``loop_vars``; e.g. the
  key position ``k`` in the forward kernel) and are computed once per program
  (uniform scalars, or ``[BLOCK_M, 1]`` query-only vectors), ``inner`` nodes
  are computed per tile.  Shapes follow from broadcasting: query positions are a
  ``[BM, 1]`` tensor and key positions a ``[1, BN]`` tensor, so a query-only
  sub-expression stays ``[BM, 1]``;
* Triton's integer ``//`` and ``%`` truncate toward zero; the pattern language
  has Python floor semantics.  ``_floordiv``/``_mod`` helpers (see
  :data:`HELPERS`) are emitted unless a small sign analysis proves the dividend
  ``>= 0`` and the divisor ``> 0`` (``k``, ``h``, ``b``, lengths are
  non-negative; ``q`` may be negative: positions can start below 0 with
  ``q_offset``).

* a score's float sums and products order their operands by tile axes (scalars, rows,
  columns, then pairwise ones: only the last operations meet the ``[BM, BN]`` tile), and
  with ``s_raw``/``s_scale`` in ``env`` a product or sum that reads ``s`` once reads the
  unscaled q·k tile times the scale among its scalar factors (``docs/backends.md``, Scores).

The sign analysis (:func:`nonneg`, :func:`positive`) and the code of each node
(:class:`_Emitter`) are passes on :mod:`spattn.ir.visitor`: one rule per node
type, every type handled.

Naming follows the fla convention: ``i_`` ids, ``o_`` offsets, ``m_`` masks,
``p_`` pointers, ``b_`` tiles; temporaries are ``t_<n>`` (outer: ``u_<n>``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable, Mapping

import networkx as nx

from ..ir.nodes import (Abs, And, BoolConst, Const, FAdd, FCall, FConst, FDiv, FLoad, FloorDiv,
                        FMul, FSelect, FTable, IsPow2, Load, Max, Min, Mod, Node, Not, Or, Prod,
                        Range, Score, Select, Sum, Table, ToFloat, Var, free_vars, walk)
from ..ir.bounds import wrap
from ..ir.build import SCORE
from ..ir.visitor import MaskPass, Visitor, rule

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


def _fit(v: int, bits: int = 64) -> int:
    """A literal as the ``bits``-bit integer a kernel holds: wrapped modulo ``2**bits``
    beyond its range, exact for the ring operations (``ir.bounds`` refuses a call whose
    other values leave it). In a 32-bit kernel this matters beyond exactness: Triton types
    a Python int in ``2**31 .. 2**32 - 1`` as uint32, which makes the int32 operation it
    meets unsigned, and refuses a larger one beside an int32 tensor."""
    half = 1 << (bits - 1)
    return v if -half <= v < half else wrap(v, bits)


def _saturate(v: int, bits: int = 64) -> int:
    """A constant argument of ``min``/``max`` within the ``bits``-bit range: the same
    result wherever the result is representable (``ir.bounds``)."""
    half = 1 << (bits - 1)
    return min(max(v, -half), half - 1)

#: Floor-semantics integer helpers, emitted once per kernel file.  They are correct
#: whether the backend's ``//`` truncates (LLVM) or floors: the remainder is
#: recomputed and corrected when its sign differs from the divisor's.
HELPERS = '''
@triton.jit
def _floordiv(a, b):
    """Python ``a // b`` (floor) for signed ints; Triton's ``//`` truncates."""
    d = a // b
    r = a - d * b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), d - 1, d)


@triton.jit
def _mod(a, b):
    """Python ``a % b`` (sign of ``b``) for signed ints; Triton's ``%`` truncates."""
    r = a - (a // b) * b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)
'''

#: tanh as one MUFU instruction (``tanh.approx.f32``, what FlashAttention-2's soft-capping
#: uses): maximum relative error about 2**-10.7, so for 16-bit inputs only; NVIDIA GPUs
#: only (inline PTX: Triton's interpreter cannot run it).
TANH_HELPER = '''
@triton.jit
def _tanh_approx(x):
    """tanh(x) of fp32 ``x`` as one ``tanh.approx.f32`` (max relative error ~2**-10.7)."""
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x],
                                     dtype=tl.float32, is_pure=True, pack=1)
'''

#: Variables that are never negative in a kernel (positions ``q`` can be: q_offset).
NONNEG_VARS = frozenset({"k", "h", "b", "Lq", "Lk", "H", "ks", "ke"})
POSITIVE_VARS = frozenset({"Lq", "Lk", "H"})


# ------------------------------------------------------------ sign analysis

class _NonNeg(MaskPass):
    """True if a node is provably ``>= 0`` for every value of the variables."""

    complete = True

    def __init__(self, signs: "_Signs"):
        self.signs = signs

    @rule(Const)
    def const(self, n):
        return n.value >= 0

    @rule(Var)
    def var(self, n):
        return n.name in self.signs.nonneg_vars or n.name in self.signs.positive_vars

    @rule(Sum)
    def sum(self, n):
        return n.const >= 0 and all(c > 0 and self(a) for a, c in n.terms)

    @rule(Prod)
    def prod(self, n):
        return all(self(f) for f in n.factors)

    @rule(Mod)
    def mod(self, n):
        return self.signs.positive(n.b)

    @rule(FloorDiv)
    def floordiv(self, n):
        return self(n.a) and self.signs.positive(n.b)

    @rule(Abs)
    def abs(self, n):
        return True

    @rule(Min)
    def min(self, n):
        return all(self(a) for a in n.args)

    @rule(Max)
    def max(self, n):
        return any(self(a) for a in n.args)

    @rule(Select)
    def select(self, n):
        return self(n.a) and self(n.b)

    @rule(Table)
    def table(self, n):
        return min(n.values) >= 0

    @rule(Load, BoolConst, Range, IsPow2, Not, And, Or)
    def unknown(self, n):
        return False     # input elements can be anything; bools are not ints


class _Positive(MaskPass):
    """True if a node is provably ``> 0``."""

    complete = True

    def __init__(self, signs: "_Signs"):
        self.signs = signs

    @rule(Const)
    def const(self, n):
        return n.value > 0

    @rule(Var)
    def var(self, n):
        return n.name in self.signs.positive_vars

    @rule(Table)
    def table(self, n):
        return min(n.values) > 0

    @rule(Sum)
    def sum(self, n):
        return (n.const > 0 and self.signs.nonneg(n)) or (
            n.const >= 0 and all(c > 0 and self(a) for a, c in n.terms))

    @rule(Prod)
    def prod(self, n):
        return all(self(f) for f in n.factors)

    @rule(Min)
    def min(self, n):
        return all(self(a) for a in n.args)

    @rule(Max)
    def max(self, n):
        return any(self(a) for a in n.args)

    @rule(FloorDiv, Mod, Abs, Select, Load, BoolConst, Range, IsPow2, Not, And, Or)
    def unknown(self, n):
        return False


class _Signs:
    """The two sign passes over one set of variable facts."""

    def __init__(self, nonneg_vars: frozenset, positive_vars: frozenset):
        self.nonneg_vars, self.positive_vars = nonneg_vars, positive_vars
        self.nonneg = _NonNeg(self)
        self.positive = _Positive(self)


@lru_cache(maxsize=64)
def _signs(nonneg_vars: frozenset, positive_vars: frozenset) -> _Signs:
    return _Signs(frozenset(nonneg_vars), frozenset(positive_vars))


def nonneg(n: Node, nonneg_vars=NONNEG_VARS, positive_vars=POSITIVE_VARS) -> bool:
    """True if ``n`` is provably ``>= 0`` for every value of the variables."""
    return _signs(frozenset(nonneg_vars), frozenset(positive_vars)).nonneg(n)


def positive(n: Node, nonneg_vars=NONNEG_VARS, positive_vars=POSITIVE_VARS) -> bool:
    """True if ``n`` is provably ``> 0``."""
    return _signs(frozenset(nonneg_vars), frozenset(positive_vars)).positive(n)


# ----------------------------------------------------------------- emitter

@dataclass
class Emitted:
    """Code for a set of roots.

    ``outer``: lines computed once per program (before the tile loop);
    ``inner``: lines computed per tile; ``results``: one expression per root
    (a temporary name or a literal); ``outer_names``: temporaries defined in
    ``outer`` that ``inner`` or ``results`` use (to pass to an inner function: a
    root that does not depend on the loop variables is one of them);
    ``uses_helpers``: whether ``_floordiv``/``_mod`` are referenced;
    ``uses_tanh``: whether ``_tanh_approx`` is (:data:`TANH_HELPER`).
    """
    outer: list[str] = field(default_factory=list)
    inner: list[str] = field(default_factory=list)
    results: list[str] = field(default_factory=list)
    outer_names: list[str] = field(default_factory=list)
    uses_helpers: bool = False
    uses_tanh: bool = False


def _is_leaf(n: Node) -> bool:
    return isinstance(n, (Const, Var, BoolConst, FConst, Score))


def _atomic(code: str) -> bool:
    """True if ``code`` needs no parentheses as an operand."""
    if code.isidentifier():
        return True
    if code.lstrip("-").isdigit():
        return not code.startswith("-")
    if re.fullmatch(r"[0-9]+\.[0-9]*(e[-+]?[0-9]+)?", code):
        return True              # a non-negative float literal
    depth = 0
    # a single call like f(a, b) or name.attr(...) is atomic
    if code.endswith(")") and "(" in code and code[0] != "(":
        head = code[: code.index("(")]
        if head.replace(".", "").replace("_", "").isalnum():
            for i, ch in enumerate(code[len(head):]):
                depth += ch == "("
                depth -= ch == ")"
                if depth == 0 and i != len(code) - len(head) - 1:
                    return False
            return True
    if code.startswith("(") and code.endswith(")"):
        depth = 0
        for i, ch in enumerate(code):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0 and i != len(code) - 1:
                return False
        return True
    return False


def _par(code: str) -> str:
    return code if _atomic(code) else f"({code})"


#: Operands of one flat chain ``a + b + ...`` at most: Python parses a chain into a
#: left-nested tree, and Triton's code generator (and the interpreter's AST rewrite) visit it
#: recursively, one level per operand: a chain of some hundreds (T5 buckets of
#: ``log_bucket(n, 1, M, 4096)``, thousands of ranges or'ed) exceeded Python's recursion
#: limit. Longer chains are written as chains of parenthesised chunks (depth ~ 32 per level).
CHAIN = 32


def _chain(op: str, items: list) -> str:
    """``op.join(items)``, grouped into parenthesised chunks of :data:`CHAIN` when longer."""
    while len(items) > CHAIN:
        items = [_par(op.join(items[i:i + CHAIN])) for i in range(0, len(items), CHAIN)]
    return op.join(items)


def _fold(fn: str, items: list, extra: str = "") -> str:
    """``fn(fn(a, b), c)...`` (``tl.minimum``), folded per chunk of :data:`CHAIN` and the
    chunks folded again: Python refuses more than 200 nested parentheses."""
    while True:
        out = []
        for i in range(0, len(items), CHAIN):
            acc = items[i]
            for x in items[i + 1:i + CHAIN]:
                acc = f"{fn}({acc}, {x}{extra})"
            out.append(acc)
        if len(out) == 1:
            return out[0]
        items = out


def _pick(idx: str, vals: list, lo: int = 0, wide: bool = False) -> str:
    """Entry ``idx - lo`` of the literals ``vals``: a ``tl.where`` chain (the last entry
    where no other matches), split in halves by ``idx < mid`` beyond :data:`CHAIN` entries
    (a chain nests one parenthesis per entry; Python refuses more than 200)."""
    if len(vals) > CHAIN:
        h = len(vals) // 2
        return (f"tl.where({idx} < {lo + h}, {_pick(idx, vals[:h], lo, wide)}, "
                f"{_pick(idx, vals[h:], lo + h, wide)})")
    acc = vals[-1]
    for i in range(len(vals) - 2, -1, -1):
        acc = f"tl.where({idx} == {lo + i}, {vals[i]}, {acc})"
        if wide and i == len(vals) - 2:
            acc += ".to(tl.int64)"      # the chain's type: a later literal past int32 fits
    return acc


def emit(roots: Iterable[Node], env: Mapping[str, str], *, loop_vars: Iterable[str] = (),
         load_ref: Callable[[str, int], tuple[str, str, str]] | None = None,
         nonneg_vars=NONNEG_VARS, positive_vars=POSITIVE_VARS,
         prefix: str = "", result_names: Iterable[str] | None = None,
         int64: bool = False, table_index: str = "mask", fast_tanh: bool = False,
         gather: tuple[int, int] | None = None, guard: str | None = None) -> Emitted:
    """Emit Triton code computing ``roots``.

    ``env`` maps IR variable names to code (``{"q": "o_q", "k": "o_k", "h": "i_h"}``).
    ``loop_vars``: variable names that change inside the tile loop; nodes depending on
    them (or on loads indexed by them) are ``inner``.
    ``load_ref(name, dim) -> (base_pointer, stride, size)`` names the kernel arguments of a
    runtime input (its base pointer already offset to the program's batch and head).
    ``result_names``: optional names to bind each root to (``None`` entries: no name).
    ``int64``: the variables are 64-bit in the kernel; a value built from literals only
    (a list ``[8, 16][h]``, ``if c then 3 else 5``) is widened to 64 bits too.
    ``table_index``: how a float table's index is kept in range
    (:data:`spattn.codegen.config.SCORE_INDEX`: "mask", "clamp" or "free"; int inputs are
    always masked). ``fast_tanh``: tanh as :data:`TANH_HELPER` (else ``2 sigmoid(2x) - 1``).
    ``gather``: ``(rows, slice)`` -- a float table whose last index is a function of
    ``q - k`` alone (its other indices of neither) is read as one slice per tile, the
    ``slice`` (a power of two >= rows + columns - 1) entries of the tile's ``q - k`` range,
    and spread over the ``rows`` x columns tile with ``tl.gather`` (:func:`gather_form`).
    ``guard``: a scalar condition every load of the emission also requires (a load before
    a tile loop that may run no step reads nothing then).
    """
    roots = list(roots)
    names = list(result_names) if result_names is not None else [None] * len(roots)
    em = _Emitter(roots, names, env, loop_vars=frozenset(loop_vars),
                  load_ref=load_ref or _default_load_ref,
                  signs=_signs(frozenset(nonneg_vars), frozenset(positive_vars)),
                  prefix=prefix, int64=int64, table_index=table_index,
                  fast_tanh=fast_tanh, gather=gather, guard=guard)
    return em.run()


def gather_form(load: Node) -> Node | None:
    """The last index of a float table ``load`` as a function of ``u = q - k`` alone
    (:func:`spattn.ir.compose.distance_form`), where it is one and the other indices read
    neither ``q`` nor ``k`` (nor a runtime input); else None."""
    from ..ir.compose import distance_form
    from ..ir.nodes import free_vars
    if any(isinstance(x, (Load, FLoad)) for ix in load.index for x in walk(ix)):
        return None
    if any(free_vars(ix) & {"q", "k"} for ix in load.index[:-1]):
        return None
    return distance_form(load.index[-1], "u")


def _default_load_ref(name: str, d: int) -> tuple[str, str, str]:
    return f"p_{name}", f"stride_{name}_{d}", f"size_{name}_{d}"


def _graph(roots: list[Node]) -> nx.DiGraph:
    """The sub-expression DAG: an edge from every node to each of its children."""
    g = nx.DiGraph()
    stack = list(roots)
    seen = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        g.add_node(n)
        for c in n.children():
            g.add_edge(n, c)
            stack.append(c)
    return g


def _stable_postorder(roots: list[Node]) -> list[Node]:
    """Children before parents, each node once, in first-use order (deterministic)."""
    out: list[Node] = []
    done: set[Node] = set()

    def visit(n: Node):
        # iterative DFS to avoid recursion limits on deep expressions
        stack = [(n, False)]
        while stack:
            x, expanded = stack.pop()
            if x in done:
                continue
            if expanded:
                done.add(x)
                out.append(x)
                continue
            stack.append((x, True))
            for c in reversed(x.children()):
                if c not in done:
                    stack.append((c, False))

    for r in roots:
        visit(r)
    return out


def _levels(order: list[Node], g: nx.DiGraph, loop_vars: frozenset) -> dict[Node, bool]:
    """Per node: does it vary inside the tile loop (``inner``)?  ``order``: children first."""
    inner: dict[Node, bool] = {}
    for n in order:
        if isinstance(n, Var):
            inner[n] = n.name in loop_vars
        elif isinstance(n, Score):
            inner[n] = True          # the score of the pair: per tile
        else:
            inner[n] = any(inner[c] for c in g.successors(n))
    return inner


def _needs_name(g: nx.DiGraph, inner: dict[Node, bool], roots: list[Node]) -> set[Node]:
    """The nodes computed once into a temporary: shared ones, loads, hoisted ones, roots,
    and the operands an emitted form reads twice (``is_pow2``, list index, two-sided
    ranges)."""
    need: set[Node] = set()
    for n in g.nodes:
        if _is_leaf(n):
            continue
        if g.in_degree(n) > 1 or isinstance(n, (Load, FLoad)):
            need.add(n)
        if not inner[n] and any(inner[p] for p in g.predecessors(n)):
            need.add(n)          # hoisted out of the tile loop
        if isinstance(n, IsPow2) and not _is_leaf(n.a):
            need.add(n.a)
        if isinstance(n, Table) and not _is_leaf(n.index):
            need.add(n.index)
        if isinstance(n, FLoad):     # each index is read by the bounds mask and the pointer
            need.update(i for i in n.index if not _is_leaf(i))
        if isinstance(n, Range) and n.lo is not None and n.hi is not None and n.lo != n.hi \
                and not _is_leaf(n.x):
            need.add(n.x)        # both bounds read x: compute it once
    need.update(r for r in roots if not _is_leaf(r))
    return need


class _Emitter(Visitor):
    """One emission: the code of each node from its children's code (a rule per node type)
    and the lines that name the temporaries, split into outer and inner levels."""

    complete = True


    def __init__(self, roots, result_names, env, *, loop_vars, load_ref, signs, prefix, int64,
                 table_index="mask", fast_tanh=False, gather=None, guard=None):
        self.roots, self.env, self.load_ref = roots, env, load_ref
        self.guard = guard
        self.table_index, self.fast_tanh, self.gather = table_index, fast_tanh, gather
        self.signs, self.prefix, self.int64 = signs, prefix, int64
        self.bits = 64 if int64 else 32      # the width of the kernel's integers
        self.graph = _graph(roots)
        self.order = _stable_postorder(roots)
        self.inner = _levels(self.order, self.graph, loop_vars)
        self.need_name = _needs_name(self.graph, self.inner, roots)
        self.named_root: dict[Node, str] = {}
        for r, nm in zip(roots, result_names):
            if nm is not None and r not in self.named_root and not _is_leaf(r):
                self.named_root[r] = nm
        self.counter = {"u": 0, "t": 0, "load": 0}
        self.axes: dict[Node, frozenset] = {}
        self.out = Emitted()

    def run(self) -> Emitted:
        code = self.code = {}
        for n in self.order:
            text = self(n, [code[x] for x in n.children()])
            if n in self.need_name:
                nm = self._name(n)
                self._lines(n).append(f"{nm} = {text}")
                code[n] = nm
            else:
                code[n] = text
        out = self.out
        out.results = [code[r] for r in self.roots]
        used = "\n".join(out.inner + out.results)
        defined = [line.split(" = ", 1)[0] for line in out.outer]
        out.outer_names = [nm for nm in defined if _mentions(used, nm)]
        return out

    def _lines(self, n: Node) -> list[str]:
        return self.out.inner if self.inner[n] else self.out.outer

    def _name(self, n: Node) -> str:
        if n in self.named_root:
            return self.named_root[n]
        if isinstance(n, (Load, FLoad)):
            return f"{self.prefix}b_{n.name}_{self.counter['load']}"
        kind = "t" if self.inner[n] else "u"
        self.counter[kind] += 1
        return f"{self.prefix}{kind}_{self.counter[kind]}"

    def _wide(self, code: str) -> str:
        """A value made of literals only: 64-bit in an int64 kernel (a bare literal, such as
        a one-entry list's, through ``tl.cast``: ``4.to(...)`` is not Python)."""
        if not self.int64:
            return code
        if code.lstrip("-").isdigit():
            return f"tl.cast({code}, tl.int64)"
        return f"{code}.to(tl.int64)"

    # -- int nodes

    def _lit(self, v: int) -> str:
        """The literal ``v`` (already fitted): in a 64-bit kernel one in ``2**31 ..
        2**32 - 1`` typed int64 first, since Triton types it uint32, and a ``tl.where`` of
        it and a negative literal (a list's entries, an ``if``) is refused."""
        return f"tl.cast({v}, tl.int64)" if self.bits == 64 and 1 << 31 <= v < 1 << 32 \
            else str(v)

    @rule(Const)
    def const(self, n, c):
        return self._lit(_fit(n.value, self.bits))

    @rule(Var)
    def var(self, n, c):
        return self.env[n.name]

    @rule(Sum)
    def sum(self, n, c):
        parts = []
        low = -(1 << (self.bits - 1))   # its magnitude is no literal of the kernel's width
        for (a, coeff), ca in zip(n.terms, c):
            coeff = _fit(coeff, self.bits)
            mag = abs(coeff)
            t = ca if mag == 1 else f"{mag} * {_par(ca)}"
            if mag == 1 and not _atomic(ca) and parts:
                t = _par(ca)
            parts.append(("+", f"({low}) * {_par(ca)}") if coeff == low else
                         ("-" if coeff < 0 else "+", t))
        const = _fit(n.const, self.bits)
        if const:
            parts.append(("+", f"({low})") if const == low else
                         ("-" if const < 0 else "+", str(abs(const))))
        if len(parts) > CHAIN:      # chunks of signed terms, added (see _chain)
            return _chain(" + ", [_par(self._signed(parts[i:i + CHAIN]))
                                  for i in range(0, len(parts), CHAIN)])
        return self._signed(parts)

    @staticmethod
    def _signed(parts) -> str:
        s0, t0 = parts[0]
        text = (f"-{_par(t0)}" if s0 == "-" else t0)
        for s, t in parts[1:]:
            text += f" {s} {_par(t) if s == '-' and not _atomic(t) else t}"
        return text

    @rule(Prod)
    def prod(self, n, c):
        return _chain(" * ", [_par(x) for x in c])

    @rule(FloorDiv, Mod)
    def division(self, n, c):
        if isinstance(n.b, Const) and _fit(n.b.value) != n.b.value:
            # |d| exceeds every int64 value of the dividend: the quotient is 0 or -1
            a, d = _par(c[0]), n.b.value
            neg = f"({a} < 0)" if d > 0 else f"({a} > 0)"
            if isinstance(n, FloorDiv):
                return self._wide(f"tl.where({neg}, -1, 0)")
            return f"tl.where({neg}, {a} + {_fit(d)}, {a})"
        if self.signs.nonneg(n.a) and self.signs.positive(n.b):
            op = "//" if isinstance(n, FloorDiv) else "%"
            return f"{_par(c[0])} {op} {_par(c[1])}"
        self.out.uses_helpers = True
        fn = "_floordiv" if isinstance(n, FloorDiv) else "_mod"
        return f"{fn}({c[0]}, {c[1]})"

    @rule(Abs)
    def abs(self, n, c):
        return f"tl.abs({c[0]})"

    @rule(Min, Max)
    def minmax(self, n, c):
        fn = "tl.minimum" if isinstance(n, Min) else "tl.maximum"
        c = [str(_saturate(a.value, self.bits)) if isinstance(a, Const) else x
             for a, x in zip(n.args, c)]
        return _fold(fn, c)

    @rule(Select)
    def select(self, n, c):
        text = f"tl.where({c[0]}, {c[1]}, {c[2]})"
        return self._wide(text) if isinstance(n.a, Const) and isinstance(n.b, Const) else text

    @rule(Table)
    def table(self, n, c):
        return self._wide(_pick(_par(c[0]), [self._lit(_fit(v, self.bits)) for v in n.values],
                                wide=self.int64))

    @rule(Load)
    def load(self, n, c):
        """A masked load of an input element (out-of-range indices read 0); its mask is
        a line of its own."""
        self.counter["load"] += 1
        ptr_terms, masks = [], []
        for d, ic in enumerate(c):
            _, stride, size = self.load_ref(n.name, d)
            ptr_terms.append(f"{_par(ic)} * {stride}")
            masks.append(f"({_par(ic)} >= 0) & ({_par(ic)} < {size})")
        if self.guard:
            masks.append(self.guard)
        base = self.load_ref(n.name, 0)[0]
        mname = f"{self.prefix}m_{n.name}_{self.counter['load']}"
        self._lines(n).append(f"{mname} = " + " & ".join(masks))
        return f"tl.load({base} + " + " + ".join(ptr_terms) + f", mask={mname}, other=0)"

    # -- bool nodes

    @rule(BoolConst)
    def bool_const(self, n, c):
        return "True" if n.value else "False"

    @rule(Range)
    def range(self, n, c):
        x = _par(c[0])
        lo, hi = n.lo, n.hi
        # x is a kernel integer of the kernel's width (ir.bounds refuses a call, or asks
        # for 64 bits, where it is not exact): a bound beyond that range is always met or
        # never, and no literal of that width may hold it.
        half = 1 << (self.bits - 1)
        if (lo is not None and lo >= half) or (hi is not None and hi < -half):
            return f"{x} != {x}"
        lo = None if lo is not None and lo <= -half else lo
        hi = None if hi is not None and hi >= half - 1 else hi
        if lo is None and hi is None:
            return f"{x} == {x}"
        if lo is not None and hi is not None and lo == hi:
            return f"{x} == {lo}"
        if lo is not None and hi is not None and self._unsigned_range(n.x, lo, hi):
            # lo <= x <= hi as one unsigned comparison: (x - lo) mod 2**32 <= hi - lo
            return f"tl.cast({x} - {lo}, tl.uint32) <= {hi - lo}" if lo else \
                f"tl.cast({x}, tl.uint32) <= {hi}"
        parts = []
        if lo is not None:
            parts.append(f"{x} >= {lo}")
        if hi is not None:
            parts.append(f"{x} <= {hi}")
        return parts[0] if len(parts) == 1 else f"({parts[0]}) & ({parts[1]})"

    def _unsigned_range(self, x: Node, lo: int, hi: int) -> bool:
        """Whether ``lo <= x <= hi`` may be emitted as one unsigned 32-bit comparison: ``x`` a
        32-bit kernel integer of the tile (positions; no 64-bit kernel, no loaded value, which
        is int64), the bounds 32-bit and ``0 < hi - lo < 2**31``. Then ``(x - lo) mod 2**32 <=
        hi - lo`` exactly when ``lo <= x <= hi``, whatever ``x - lo`` wraps to: one comparison
        per pair instead of two and an ``&``."""
        if self.int64 or not (INT32_MIN <= lo < hi <= INT32_MAX) or hi - lo >= 1 << 31:
            return False
        if not free_vars(x) & {"q", "k"}:
            return False
        return not any(isinstance(t, Load) for t in walk(x))

    @rule(IsPow2)
    def is_pow2(self, n, c):
        x = _par(c[0])
        return f"({x} > 0) & (({x} & ({x} - 1)) == 0)"

    @rule(Not)
    def not_(self, n, c):
        return f"~{_par(c[0])}"

    @rule(And, Or)
    def junction(self, n, c):
        op = " & " if isinstance(n, And) else " | "
        return _chain(op, [_par(x) for x in c])

    # -- float nodes (a score and its derivatives; fp32 in the kernel)

    @rule(FConst)
    def fconst(self, n, c):
        return repr(float(n.value))

    @rule(Score)
    def score(self, n, c):
        return self.env["s"]

    @rule(ToFloat)
    def to_float(self, n, c):
        return f"tl.cast({c[0]}, tl.float32)"     # (a length of 1 arrives as a constexpr)

    def _tile_axes(self, n: Node) -> frozenset:
        """The tile axes a float operand varies along (``q`` rows, ``k`` columns)."""
        ax = self.axes.get(n)
        if ax is None:
            ax = self.axes[n] = frozenset("qk") if any(
                isinstance(x, Score) for x in walk(n)) else free_vars(n) & frozenset("qk")
        return ax

    def _grouped(self, op: str, items, lead: int = 0) -> tuple[list, str | None]:
        """``(pairwise, vector)`` of ``items`` (``(operand node or None for a scalar,
        code)``): the codes that vary along both tile axes, and the others combined with
        ``op`` into one expression: the scalars and rows first, then the columns as one
        parenthesised operand (so that every operation but the row-column one is on a
        scalar or a vector); None without such operands. ``lead``: operands the caller
        puts before the pairwise ones."""
        wide, rows, cols = [], [], []
        for a, x in items:
            ax = frozenset() if a is None else self._tile_axes(a)
            (wide if len(ax) == 2 else cols if "k" in ax else rows).append((ax, x))
        rows.sort(key=lambda t: len(t[0]))          # scalars before rows
        parts = [x for _, x in rows]
        if cols:
            col = _chain(op, [x for _, x in cols])
            parts.append(_par(col) if len(cols) > 1 and (parts or wide or lead) else col)
        small = _chain(op, parts) if parts else None
        if small is not None and len(parts) > 1 and (wide or lead):
            small = _par(small)
        return [x for _, x in wide], small

    def _raw_score(self, n: Node) -> bool:
        """Whether ``n`` holds ``s`` once as an operand and the kernel's unscaled q·k is in
        ``env`` (``s_raw``, ``s_scale``): ``s``'s scale then joins the operand's factors."""
        return "s_raw" in self.env and sum(isinstance(a, Score) for a in n.args) == 1

    @rule(FAdd)
    def fadd(self, n, c):
        items = list(zip(n.args, c))
        if self._raw_score(n) and self.graph.in_degree(SCORE) == 1:
            # s's only use: q·k * scale inline, which the add contracts into one FMA
            items = [(a, f"{self.env['s_raw']} * {self.env['s_scale']}" if a == SCORE else x)
                     for a, x in items]
        wide, small = self._grouped(" + ", items)
        return _chain(" + ", wide + ([small] if small is not None else []))

    @rule(FMul)
    def fmul(self, n, c):
        items = [(a, _par(x)) for a, x in zip(n.args, c)]
        raw = []
        if self._raw_score(n):      # q·k, then its scale among the scalar factors
            raw = [self.env["s_raw"]]
            items = [(None, self.env["s_scale"])] + [t for t in items if t[0] != SCORE]
        wide, small = self._grouped(" * ", items, lead=len(raw))
        return _chain(" * ", raw + wide + ([small] if small is not None else []))

    @rule(FDiv)
    def fdiv(self, n, c):
        return f"{_par(c[0])} / {_par(c[1])}"

    @rule(FCall)
    def fcall(self, n, c):
        fn = n.fn
        if fn in ("min", "max"):
            # NaN propagates, as in torch (the reference): on the GPU tl.minimum would
            # otherwise return the other operand
            return _fold(f"tl.{fn}imum", list(c), ", propagate_nan=tl.PropagateNan.ALL")
        x = c[0]
        if fn == "tanh" and self.fast_tanh:
            self.out.uses_tanh = True
            return f"_tanh_approx({x})"
        if fn == "tanh":          # tanh(x) = 2 sigmoid(2x) - 1 (no tl.tanh)
            return f"(2.0 * tl.sigmoid({self._doubled(n.args[0], x)}) - 1.0)"
        if fn == "sign":
            return f"tl.where({_par(x)} > 0, 1.0, tl.where({_par(x)} < 0, -1.0, 0.0))"
        if fn == "step":
            return f"tl.where({_par(x)} > 0, 1.0, tl.where({_par(x)} < 0, 0.0, 0.5))"
        return {"exp": "tl.exp", "log": "tl.log", "sqrt": "tl.sqrt", "abs": "tl.abs"}[fn] + \
            f"({x})"

    def _doubled(self, a: Node, code: str) -> str:
        """``2 * a``: a product with a constant factor (``s * (1/c)``, inlined) takes the 2
        into its constant, else ``2.0 * a``."""
        if isinstance(a, FMul) and a not in self.need_name and \
                any(isinstance(x, FConst) for x in a.args):
            from ..ir import build
            d = build.fmul(a, build.fconst(2.0))
            if isinstance(d, FMul) and all(x in self.code or isinstance(x, FConst)
                                           for x in d.args):
                return self.fmul(d, [self.code[x] if x in self.code else self.fconst(x, [])
                                     for x in d.args])
        return f"2.0 * {_par(code)}"

    @rule(FSelect)
    def fselect(self, n, c):
        return f"tl.where({c[0]}, {c[1]}, {c[2]})"

    @rule(FTable)
    def ftable(self, n, c):
        return _pick(_par(c[0]), [repr(float(v)) for v in n.values])

    @rule(FLoad)
    def fload(self, n, c):
        """A load of a float table element, as fp32: masked (out-of-range indices read 0),
        its index clamped into the table, or unchecked (proven in range), by
        ``table_index``."""
        g = gather_form(n) if self.gather else None
        if g is not None:
            return self._gather(n, c, g)
        if self.table_index == "mask":
            return self.load(n, c).replace(", other=0)", ", other=0.0).to(tl.float32)")
        self.counter["load"] += 1
        ptr_terms = []
        for d, ic in enumerate(c):
            _, stride, size = self.load_ref(n.name, d)
            if self.table_index == "clamp":
                ic = f"tl.minimum(tl.maximum({ic}, 0), {size} - 1)"
            ptr_terms.append(f"{_par(ic)} * {stride}")
        base = self.load_ref(n.name, 0)[0]
        guard = f", mask={self.guard}, other=0.0" if self.guard else ""
        return f"tl.load({base} + " + " + ".join(ptr_terms) + f"{guard}).to(tl.float32)"

    def _gather(self, n, c, g) -> str:
        """A table read as one slice per tile and a ``tl.gather`` (``gather`` of :func:`emit`):
        the slice's entries are ``g(u)`` for ``u`` from the tile's least ``q - k`` on; the
        slice's last entries (past the tile's range, as the slice is a power of two) may index
        beyond the table, so its indices are clamped."""
        self.counter["load"] += 1
        i, P = self.counter["load"], self.prefix
        rows, width = self.gather
        q, k = self.env["q"], self.env["k"]
        lines = self._lines(n)
        u0, ou, sl = f"{P}u0_{i}", f"{P}o_u_{i}", f"{P}s_{n.name}_{i}"
        lines.append(f"{u0} = tl.min({q}) - tl.max({k})")
        lines.append(f"{ou} = {u0} + tl.arange(0, {width})")
        em = emit([g], dict(self.env, u=ou), loop_vars=tuple(self.env) + ("u",),
                  load_ref=self.load_ref, prefix=f"{P}g{i}_", int64=self.int64)
        lines += em.outer + em.inner
        self.out.uses_helpers |= em.uses_helpers
        codes = list(c[:-1]) + [em.results[0]]
        terms = []
        for d, ic in enumerate(codes):
            _, stride, size = self.load_ref(n.name, d)
            terms.append(f"tl.minimum(tl.maximum({ic}, 0), {size} - 1) * {stride}")
        base = self.load_ref(n.name, 0)[0]
        lines.append(f"{sl} = tl.load({base} + " + " + ".join(terms) + ").to(tl.float32)")
        return (f"tl.gather(tl.broadcast_to({sl}[None, :], ({rows}, {width})), "
                f"{q} - {k} - {u0}, axis=1)")


def _mentions(text: str, name: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", text) is not None
