"""One dispatch mechanism for every pass over the IR: rules keyed by node type.

A pass is a subclass of :class:`Visitor` whose methods are marked with :func:`rule`, each
naming the node types it handles::

    class Printer(Visitor):
        complete = True                  # every node type must have a rule (checked at import)

        @rule(Const)
        def const(self, n, need): ...

        @rule(FloorDiv, Mod)             # one rule may serve several node types
        def division(self, n, need): ...

``printer(node, need)`` calls the rule of ``type(node)``. The table is built once, when the
class is defined, from the rules of the class and its bases (a subclass may override a rule
or add rules for more types). A pass that declares ``complete = True`` must handle every type
of :data:`spattn.ir.nodes.NODE_TYPES`: adding a node type then fails at import, naming each
pass that needs a rule for it, so a new node type is added in one place per pass. Passes
that only look at some nodes set a ``default`` rule (``@rule(default=True)``) or leave the
others unhandled (a clear :class:`TypeError` names the pass and the node type). A pass over
masks derives from :class:`MaskPass`, which refuses the float nodes of a score.
"""
from __future__ import annotations

from typing import Callable

from .nodes import FLOAT_TYPES, NODE_TYPES

__all__ = ["MaskPass", "Visitor", "rule"]


def rule(*types: type, default: bool = False) -> Callable:
    """Mark a method as the rule of ``types`` (IR node classes), or as the fallback rule for
    the node types that have none (``default=True``)."""
    def mark(fn):
        fn._rule_types = tuple(types)
        fn._rule_default = default
        return fn
    return mark


class Visitor:
    """Base of IR passes: ``self(node, *args)`` dispatches to the rule of ``type(node)``."""

    #: When True, every node type of :data:`NODE_TYPES` must have a rule (checked at class
    #: creation).
    complete = False
    _rules: dict = {}      # node type -> rule function; None -> the default rule, if any

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        rules: dict = {}
        default = None
        for klass in reversed(cls.__mro__):
            for name, fn in vars(klass).items():
                types = getattr(fn, "_rule_types", None)
                if types is None:
                    continue
                for t in types:
                    rules[t] = fn
                if fn._rule_default:
                    default = fn
        if default is not None:
            rules[None] = default
        cls._rules = rules
        if cls.complete and default is None:
            missing = [t.__name__ for t in NODE_TYPES if t not in rules]
            if missing:
                raise TypeError(f"IR pass {cls.__name__} has no rule for {', '.join(missing)}")

    def __call__(self, node, *args, **kwargs):
        fn = self._rules.get(type(node))
        if fn is None:
            fn = self._rules.get(None)
            if fn is None:
                raise TypeError(f"IR pass {type(self).__name__} has no rule for "
                                f"{type(node).__name__}")
        return fn(self, node, *args, **kwargs)


class MaskPass(Visitor):
    """Base of the passes over masks (bool and int nodes): a float node belongs to a score,
    which these passes never see, so meeting one is a bug that names the pass."""

    @rule(*FLOAT_TYPES)
    def float_node(self, n, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is a pass over masks: a float node "
                        f"({type(n).__name__}) belongs to a score")
