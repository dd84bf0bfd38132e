"""IR -> Triton expression code, with common sub-expressions computed once.

The emitter turns one or more IR roots (the pattern predicate, or the int
expressions of a closed-form key range) into straight-line Triton code:

* the IR is a DAG of sub-expressions (``networkx.DiGraph``); every node used
  more than once, every runtime-input load and every root gets a named
  temporary, computed once, in topological order; nodes used once are inlined
  into their parent;
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

Naming follows the fla convention: ``i_`` ids, ``o_`` offsets, ``m_`` masks,
``p_`` pointers, ``b_`` tiles; temporaries are ``t_<n>`` (outer: ``u_<n>``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import networkx as nx

from ..ir.nodes import (Abs, And, BoolConst, Const, FloorDiv, IsPow2, Load, Max, Min, Mod, Node,
                        Not, Or, Prod, Range, Select, Sum, Table, Var)

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

#: Variables that are never negative in a kernel (positions ``q`` can be: q_offset).
NONNEG_VARS = frozenset({"k", "h", "b", "Lq", "Lk", "H", "ks", "ke"})
POSITIVE_VARS = frozenset({"Lq", "Lk", "H"})


# ------------------------------------------------------------ sign analysis

def nonneg(n: Node, nonneg_vars=NONNEG_VARS, positive_vars=POSITIVE_VARS) -> bool:
    """True if ``n`` is provably ``>= 0`` for every value of the variables."""
    rec = lambda x: nonneg(x, nonneg_vars, positive_vars)  # noqa: E731
    if isinstance(n, Const):
        return n.value >= 0
    if isinstance(n, Var):
        return n.name in nonneg_vars or n.name in positive_vars
    if isinstance(n, Sum):
        return n.const >= 0 and all(c > 0 and rec(a) for a, c in n.terms)
    if isinstance(n, Prod):
        return all(rec(f) for f in n.factors)
    if isinstance(n, Mod):
        return positive(n.b, nonneg_vars, positive_vars)
    if isinstance(n, FloorDiv):
        return rec(n.a) and positive(n.b, nonneg_vars, positive_vars)
    if isinstance(n, Abs):
        return True
    if isinstance(n, Min):
        return all(rec(a) for a in n.args)
    if isinstance(n, Max):
        return any(rec(a) for a in n.args)
    if isinstance(n, Select):
        return rec(n.a) and rec(n.b)
    if isinstance(n, Table):
        return min(n.values) >= 0
    return False


def positive(n: Node, nonneg_vars=NONNEG_VARS, positive_vars=POSITIVE_VARS) -> bool:
    """True if ``n`` is provably ``> 0``."""
    if isinstance(n, Const):
        return n.value > 0
    if isinstance(n, Var):
        return n.name in positive_vars
    if isinstance(n, Table):
        return min(n.values) > 0
    if isinstance(n, Sum):
        return (n.const > 0 and nonneg(n, nonneg_vars, positive_vars)) or (
            n.const >= 0 and all(c > 0 and positive(a, nonneg_vars, positive_vars)
                                 for a, c in n.terms))
    if isinstance(n, Prod):
        return all(positive(f, nonneg_vars, positive_vars) for f in n.factors)
    if isinstance(n, (Min,)):
        return all(positive(a, nonneg_vars, positive_vars) for a in n.args)
    if isinstance(n, (Max,)):
        return any(positive(a, nonneg_vars, positive_vars) for a in n.args)
    return False


# ----------------------------------------------------------------- emitter

@dataclass
class Emitted:
    """Code for a set of roots.

    ``outer``: lines computed once per program (before the tile loop);
    ``inner``: lines computed per tile; ``results``: one expression per root
    (a temporary name or a literal); ``outer_names``: temporaries defined in
    ``outer`` that ``inner`` or ``results`` use (to pass to an inner function);
    ``uses_helpers``: whether ``_floordiv``/``_mod`` are referenced.
    """
    outer: list[str] = field(default_factory=list)
    inner: list[str] = field(default_factory=list)
    results: list[str] = field(default_factory=list)
    outer_names: list[str] = field(default_factory=list)
    uses_helpers: bool = False


def _children(n: Node) -> tuple[Node, ...]:
    return n.children()


def _is_leaf(n: Node) -> bool:
    return isinstance(n, (Const, Var, BoolConst))


def _atomic(code: str) -> bool:
    """True if ``code`` needs no parentheses as an operand."""
    if code.isidentifier():
        return True
    if code.lstrip("-").isdigit():
        return not code.startswith("-")
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


def emit(roots: Iterable[Node], env: Mapping[str, str], *, loop_vars: Iterable[str] = (),
         load_ref: Callable[[str, int], tuple[str, str, str]] | None = None,
         nonneg_vars=NONNEG_VARS, positive_vars=POSITIVE_VARS,
         prefix: str = "", result_names: Iterable[str] | None = None) -> Emitted:
    """Emit Triton code computing ``roots``.

    ``env`` maps IR variable names to code (``{"q": "o_q", "k": "o_k", "h": "i_h"}``).
    ``loop_vars``: variable names that change inside the tile loop; nodes depending on
    them (or on loads indexed by them) are ``inner``.
    ``load_ref(name, dim) -> (base_pointer, stride, size)`` names the kernel arguments of a
    runtime input (its base pointer already offset to the program's batch and head).
    ``result_names``: optional names to bind each root to (``None`` entries: no name).
    """
    roots = list(roots)
    loop_vars = frozenset(loop_vars)
    load_ref = load_ref or (lambda name, d: (f"p_{name}", f"stride_{name}_{d}", f"size_{name}_{d}"))
    res_names = list(result_names) if result_names is not None else [None] * len(roots)

    g = nx.DiGraph()
    stack = list(roots)
    seen = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        g.add_node(n)
        for c in _children(n):
            g.add_edge(n, c)
            stack.append(c)

    # level: does the node vary inside the loop?
    inner: dict[Node, bool] = {}
    for n in reversed(list(nx.topological_sort(g))):  # children first
        if isinstance(n, Var):
            inner[n] = n.name in loop_vars
        else:
            inner[n] = any(inner[c] for c in g.successors(n))

    uses = {n: g.in_degree(n) for n in g.nodes}
    need_name: set[Node] = set()
    for n in g.nodes:
        if _is_leaf(n):
            continue
        if uses[n] > 1 or isinstance(n, Load):
            need_name.add(n)
        if not inner[n] and any(inner[p] for p in g.predecessors(n)):
            need_name.add(n)          # hoisted out of the tile loop
        if isinstance(n, IsPow2) and not _is_leaf(n.a):
            need_name.add(n.a)
        if isinstance(n, Table) and not _is_leaf(n.index):
            need_name.add(n.index)
        if isinstance(n, Range) and n.lo is not None and n.hi is not None and n.lo != n.hi \
                and not _is_leaf(n.x):
            need_name.add(n.x)        # both bounds read x: compute it once
    for r in roots:
        if not _is_leaf(r):
            need_name.add(r)

    out = Emitted()
    code: dict[Node, str] = {}
    counter = {"u": 0, "t": 0, "load": 0}
    named_root = {}
    for r, nm in zip(roots, res_names):
        if nm is not None and r not in named_root and not _is_leaf(r):
            named_root[r] = nm

    def fresh(n: Node) -> str:
        if n in named_root:
            return named_root[n]
        kind = "t" if inner[n] else "u"
        counter[kind] += 1
        return f"{prefix}{kind}_{counter[kind]}"

    def expr(n: Node) -> str:
        c = [code[x] for x in _children(n)]
        if isinstance(n, Const):
            return str(n.value)
        if isinstance(n, BoolConst):
            return "True" if n.value else "False"
        if isinstance(n, Var):
            return env[n.name]
        if isinstance(n, Sum):
            parts = []
            for (a, coeff), ca in zip(n.terms, c):
                mag = abs(coeff)
                t = ca if mag == 1 else f"{mag} * {_par(ca)}"
                if mag == 1 and not _atomic(ca) and parts:
                    t = _par(ca)
                parts.append(("-" if coeff < 0 else "+", t))
            if n.const:
                parts.append(("-" if n.const < 0 else "+", str(abs(n.const))))
            s0, t0 = parts[0]
            text = (f"-{_par(t0)}" if s0 == "-" else t0)
            for s, t in parts[1:]:
                text += f" {s} {_par(t) if s == '-' and not _atomic(t) else t}"
            return text
        if isinstance(n, Prod):
            return " * ".join(_par(x) for x in c)
        if isinstance(n, (FloorDiv, Mod)):
            simple = nonneg(n.a, nonneg_vars, positive_vars) and positive(n.b, nonneg_vars,
                                                                           positive_vars)
            if simple:
                op = "//" if isinstance(n, FloorDiv) else "%"
                return f"{_par(c[0])} {op} {_par(c[1])}"
            out.uses_helpers = True
            fn = "_floordiv" if isinstance(n, FloorDiv) else "_mod"
            return f"{fn}({c[0]}, {c[1]})"
        if isinstance(n, Abs):
            return f"tl.abs({c[0]})"
        if isinstance(n, (Min, Max)):
            fn = "tl.minimum" if isinstance(n, Min) else "tl.maximum"
            acc = c[0]
            for x in c[1:]:
                acc = f"{fn}({acc}, {x})"
            return acc
        if isinstance(n, Select):
            return f"tl.where({c[0]}, {c[1]}, {c[2]})"
        if isinstance(n, Table):
            idx = _par(c[0])
            vals = list(n.values)
            acc = str(vals[-1])
            for i in range(len(vals) - 2, -1, -1):
                acc = f"tl.where({idx} == {i}, {vals[i]}, {acc})"
            return acc
        if isinstance(n, Range):
            x = _par(c[0])
            if n.lo is not None and n.hi is not None and n.lo == n.hi:
                return f"{x} == {n.lo}"
            parts = []
            if n.lo is not None:
                parts.append(f"{x} >= {n.lo}")
            if n.hi is not None:
                parts.append(f"{x} <= {n.hi}")
            return parts[0] if len(parts) == 1 else f"({parts[0]}) & ({parts[1]})"
        if isinstance(n, IsPow2):
            x = _par(c[0])
            return f"({x} > 0) & (({x} & ({x} - 1)) == 0)"
        if isinstance(n, Not):
            return f"~{_par(c[0])}"
        if isinstance(n, (And, Or)):
            op = " & " if isinstance(n, And) else " | "
            return op.join(_par(x) for x in c)
        raise TypeError(f"cannot emit {n!r}")

    order = list(reversed(list(nx.topological_sort(g))))
    # deterministic order among independent nodes: stable topological sort by first use
    order = _stable_postorder(roots)
    for n in order:
        if isinstance(n, Load):
            lines = out.inner if inner[n] else out.outer
            counter["load"] += 1
            nm = named_root.get(n) or f"{prefix}b_{n.name}_{counter['load']}"
            idx = [code[i] for i in n.index]
            ptr_terms, masks = [], []
            for d, ic in enumerate(idx):
                base, stride, size = load_ref(n.name, d)
                ptr_terms.append(f"{_par(ic)} * {stride}")
                masks.append(f"({_par(ic)} >= 0) & ({_par(ic)} < {size})")
            base = load_ref(n.name, 0)[0]
            mname = f"{prefix}m_{n.name}_{counter['load']}"
            lines.append(f"{mname} = " + " & ".join(masks))
            lines.append(f"{nm} = tl.load({base} + " + " + ".join(ptr_terms)
                         + f", mask={mname}, other=0)")
            code[n] = nm
            continue
        text = expr(n)
        if n in need_name:
            nm = fresh(n)
            (out.inner if inner[n] else out.outer).append(f"{nm} = {text}")
            code[n] = nm
        else:
            code[n] = text

    out.results = [code[r] for r in roots]
    inner_text = "\n".join(out.inner) + "\n" + "\n".join(
        r for r, root in zip(out.results, roots) if inner.get(root, False))
    defined_outer = []
    for line in out.outer:
        nm = line.split(" = ", 1)[0]
        defined_outer.append(nm)
    out.outer_names = [nm for nm in defined_outer if _mentions(inner_text, nm)]
    return out


def _mentions(text: str, name: str) -> bool:
    import re
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", text) is not None


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
