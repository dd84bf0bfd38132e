"""The IR passes' dispatch (``ir.visitor``): rules by node type, completeness checked at class creation."""
import pytest

from spattn.ir import build as B
from spattn.ir.nodes import NODE_TYPES, Const, Sum, Var
from spattn.ir.visitor import Visitor, rule


def test_dispatch_by_type_and_shared_rules():
    class Kinds(Visitor):
        @rule(Const, Var)
        def leaf(self, n):
            return "leaf"

        @rule(Sum)
        def sum(self, n):
            return "sum(" + ",".join(self(a) for a, _ in n.terms) + ")"

    assert Kinds()(B.add(B.var("q"), B.var("k"), B.const(3))) == "sum(leaf,leaf)"
    with pytest.raises(TypeError, match="Kinds has no rule for Range"):
        Kinds()(B.cmp("<", B.var("q"), B.var("k")))


def test_default_rule_and_override():
    class Base(Visitor):
        @rule(default=True)
        def other(self, n):
            return "other"

        @rule(Var)
        def var(self, n):
            return "var"

    class Child(Base):
        @rule(Var)
        def var(self, n):
            return "child var"

    assert Base()(B.const(1)) == "other"
    assert Child()(B.var("q")) == "child var"
    assert Child()(B.const(1)) == "other"


def test_complete_pass_must_cover_every_node_type():
    with pytest.raises(TypeError, match="Incomplete has no rule for") as e:
        class Incomplete(Visitor):          # noqa: F841
            complete = True

            @rule(Const)
            def const(self, n):
                return n
    missing = str(e.value).split("rule for ", 1)[1].split(", ")
    assert missing == [t.__name__ for t in NODE_TYPES if t is not Const]
