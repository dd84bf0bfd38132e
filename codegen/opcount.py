"""The operations a score costs per pair: a count of the ``[BM, BN]``-shaped operations in
the emitted lines of a score.

A kernel's forward is bound by its tensor cores and by the per-element work of the softmax;
a score adds per-element work, and that (not the work on scalars or on the ``[BM, 1]`` and
``[1, BN]`` vectors of a tile) is what it costs. :func:`tile_ops` reads the emitted lines
(Python source, as Triton parses them), infers each value's shape from the tile axes of its
operands (``o_q`` varies along the rows, ``o_k`` along the columns, the q·k tile along both)
and counts the operations whose result varies along both axes. A multiply whose only use is
an add (``a * b + c`` in one expression) is one fused multiply-add, as the GPU compiler
contracts it. :func:`score_cost` is that count for a pattern's forward score, the number
``tests/codegen/test_score_cost.py`` pins.
"""
from __future__ import annotations

import ast
from typing import Iterable

__all__ = ["score_cost", "tile_ops"]

#: The tile axes of the names a score's lines read (the kernels' positions and tiles).
AXES = {"o_q": frozenset("q"), "o_k": frozenset("k"), "b_x": frozenset("qk")}

#: Calls that make a value without an operation on it per element.
_FREE = {"zeros_like", "full", "zeros", "arange", "broadcast_to"}
#: Calls that reduce a tile (``tl.min(o_q)``): a scalar out.
_REDUCE = {"min", "max", "sum"}


class _Counter(ast.NodeVisitor):
    def __init__(self, axes: dict):
        self.axes = dict(axes)
        self.ops = 0

    def shape(self, node) -> frozenset:
        """The axes of ``node``'s value, counting every pairwise operation on the way."""
        if isinstance(node, ast.Name):
            return self.axes.get(node.id, frozenset())
        if isinstance(node, ast.Constant):
            return frozenset()
        if isinstance(node, ast.BinOp):
            fused = isinstance(node.op, (ast.Add, ast.Sub)) and any(
                isinstance(x, ast.BinOp) and isinstance(x.op, ast.Mult)
                and len(self._peek(x)) == 2 for x in (node.left, node.right))
            ax = self.shape(node.left) | self.shape(node.right)
            if len(ax) == 2 and not fused:
                self.ops += 1
            return ax
        if isinstance(node, ast.UnaryOp):
            ax = self.shape(node.operand)
            self.ops += len(ax) == 2 and not isinstance(node.op, ast.UAdd)
            return ax
        if isinstance(node, ast.Compare):
            ax = self.shape(node.left)
            for c in node.comparators:
                ax |= self.shape(c)
            self.ops += (len(ax) == 2) * len(node.comparators)
            return ax
        if isinstance(node, ast.Subscript):        # x[None, :], x[:, None]: a view
            return self.shape(node.value)
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if isinstance(fn, ast.Attribute) and not (isinstance(fn.value, ast.Name)
                                                      and fn.value.id == "tl"):
                ax = self.shape(fn.value)            # x.to(tl.float32): a conversion
            else:
                ax = frozenset()
            args = list(node.args) + [k.value for k in node.keywords]
            if name in _REDUCE and len(node.args) == 1:
                self.shape(node.args[0])
                return frozenset()
            if name == "gather":
                for a in args:
                    self.shape(a)
                ax = frozenset("qk")
            else:
                for a in args:
                    ax |= self.shape(a)
            if len(ax) == 2 and name not in _FREE:
                self.ops += 1
            return ax
        for child in ast.iter_child_nodes(node):
            self.shape(child)
        return frozenset()

    def _peek(self, node) -> frozenset:
        """The axes of ``node`` without counting."""
        saved = self.ops
        ax = self.shape(node)
        self.ops = saved
        return ax


def tile_ops(lines: Iterable[str], value: str, raw: str = "b_s",
             axes: dict | None = None) -> int:
    """The ``[BM, BN]``-shaped operations of ``lines`` (``name = expr``, in order) and of the
    expression ``value``; ``raw`` names the q·k tile, ``axes`` adds names' tile axes."""
    c = _Counter(dict(AXES, **{raw: frozenset("qk")}, **(axes or {})))
    for line in list(lines):
        name, _, expr = line.partition(" = ")
        c.axes[name.strip()] = c.shape(ast.parse(expr.strip(), mode="eval").body)
    c.shape(ast.parse(value, mode="eval").body)
    return c.ops


def score_cost(pattern, config=None) -> int:
    """The ``[BM, BN]`` operations a pattern's score adds to the forward per tile beyond
    the mask alone: those of its lines and value (the softmax's own multiply-add takes the
    score in either unit: ``b * log2(e) - m`` or ``b - m``, one operation, as the mask
    alone's ``s * scale * log2(e) - m``); a ``b_x = q·k * scale`` the score reads counts
    one more."""
    from .kernels import _score_code
    sc = _score_code(pattern, "fwd", False, config)
    if sc is None:
        return 0
    value = sc.value + (" + tl.zeros_like(b_s)" if not sc.tiled else "")
    return tile_ops(sc.lines, value, raw=sc.raw) + sc.scaled
