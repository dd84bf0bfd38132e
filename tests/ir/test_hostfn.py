"""``ir.hostfn.host_function``: int and bool IR as Python closures, the decode step's fast
evaluator of closed-form key ranges. Its values must be the evaluator's on Python ints
(and the independent scalar oracle's), its errors the evaluator's errors; nodes it does not
cover give None (the caller keeps the evaluator)."""
from __future__ import annotations

import warnings

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

import spattn
from spattn.codegen.config import get_closed_form
from spattn.dsl.errors import SpattnValueError
from spattn.ir import build as B
from spattn.ir.evaluate import evaluate
from spattn.ir.hostfn import host_function

from tests.helpers.ir_exprs import bool_exprs, int_exprs, wide
from tests.helpers.sources import bool_exprs as source_exprs
from tests.ir.scalar import scalar

NAMES = ("q", "k", "h", "b", "Lq", "Lk", "H")

envs = st.fixed_dictionaries({
    "q": st.integers(-2**40, 2**40) | st.integers(-50, 50),
    "k": st.integers(-2**40, 2**40) | st.integers(-50, 50),
    "h": st.integers(0, 2), "b": st.integers(0, 5), "Lq": st.integers(1, 2**20),
    "Lk": st.integers(1, 2**20), "H": st.integers(1, 64)})


def _host(node, env):
    fn = host_function([node], NAMES)
    assert fn is not None, f"host_function refused {node}"
    return fn(*(env[n] for n in NAMES))[0]


@given(e=int_exprs(consts=wide), env=envs)
@example(e=B.floordiv(B.var("q"), B.const(-7)), env=dict(q=-2**40, k=0, h=0, b=0, Lq=1, Lk=1,
                                                         H=1))
def test_int_values_match_the_evaluator(e, env):
    want = evaluate(e, env)
    assert _host(e, env) == want == scalar(e, env, {})


@given(e=bool_exprs(consts=wide), env=envs)
def test_bool_values_match_the_evaluator(e, env):
    want = bool(evaluate(e, env))
    assert bool(_host(e, env)) == want == bool(scalar(e, env, {}))


def test_errors_are_the_evaluators():
    env = dict(q=5, k=1, h=7, b=0, Lq=1, Lk=0, H=1)
    for node in (B.floordiv(B.var("q"), B.var("Lk")), B.mod(B.var("q"), B.var("Lk")),
                 B.table([1, 2, 3], B.var("h")),
                 # both branches of an if are evaluated, as the evaluator does
                 B.select(B.cmp("<", B.var("q"), B.const(0)), B.floordiv(B.var("q"), B.var("Lk")),
                          B.var("k"))):
        with pytest.raises(SpattnValueError) as want:
            evaluate(node, env)
        with pytest.raises(SpattnValueError) as got:
            _host(node, env)
        assert str(got.value) == str(want.value)


def test_uncovered_nodes_give_none():
    assert host_function([B.load("doc", [B.var("q")])], NAMES) is None
    assert host_function([B.var("zz")], NAMES) is None
    fn = host_function([None, B.add(B.var("q"), B.const(3))], NAMES)
    assert fn(*range(7)) == (None, 3)


@given(src=source_exprs(), qs=st.integers(0, 5000), lq=st.integers(1, 16),
       lk=st.integers(1, 6000), H=st.integers(1, 8), b=st.integers(0, 3))
@example(src="causal & (window(64) | sink(4))", qs=4000, lq=1, lk=4001, H=8, b=0)
@example(src="causal & window(100) | prefix_lm(7)", qs=30, lq=5, lk=35, H=8, b=1)
@example(src="chunked(64) & causal", qs=130, lq=16, lk=146, H=2, b=0)
def test_closed_form_rows_match_the_evaluator(src, qs, lq, lk, H, b):
    """What the CPU decode step evaluates: every bound of a pattern's closed form."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", spattn.SpattnWarning)
            cf = get_closed_form(spattn.compile(src, backend="torch"))
    except spattn.SpattnError:
        return
    if cf is None:
        event("no closed form")
        return
    nodes = [x for iv in cf.rows for x in (iv.lo, iv.hi, iv.flo, iv.fhi)]
    names = ("qs", "qe", "Lq", "Lk", "H", "b")
    fn = host_function(nodes, names)
    if fn is None:
        event("not covered")
        return
    event("checked")
    env = {"qs": qs, "qe": qs + lq - 1, "Lq": lq, "Lk": lk, "H": H, "b": b}
    try:
        want = tuple(None if n is None else evaluate(n, env) for n in nodes)
    except (SpattnValueError, KeyError):
        with pytest.raises((SpattnValueError, KeyError)):
            fn(*(env[n] for n in names))
        return
    assert fn(*(env[n] for n in names)) == want
