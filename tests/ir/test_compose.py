"""Composed tables (``ir.compose``): which score loads are composed with their index
function, and the function found equals the index it replaces at every pair."""
import pytest
import torch

import spattn
from spattn.ir.compose import COMPOSE_MIN_OPS, compose, index_ops
from spattn.ir.evaluate import evaluate
from spattn.ir.nodes import FLoad, float_loads
from spattn.ir.printer import to_source

# (id, score, the tables composed)
CASES = [
    ("t5-causal", "s + rel[h, t5_bucket_causal(32, 128)]", ["rel"]),
    ("t5-bidirectional", "s + rel[h, t5_bucket(32, 128)]", ["rel"]),
    ("t5-1d-table", "s * 0.5 + rel[t5_bucket(8, 20)]", ["rel"]),
    ("log-bucket-of-abs", "s + rel[h, log_bucket(abs(k - q), 2, 20, 6)]", ["rel"]),
    ("two-loads-one-composed", "s + rel[h, t5_bucket(16, 40)] * rel[h, 2] + w[q // 4]", ["rel"]),
    ("affine", "s + rel[h, q - k + 7]", []),
    ("clamp-is-cheap", "s + rel[h, clamp(q - k, 0, 63)]", []),
    ("reads-the-head", "s + rel[h, t5_bucket(16, 40) + h]", []),
    ("not-a-distance", "s + rel[h, min(q // 8 - k // 8, 5) + 5]", []),
    ("two-dims-read-qk", "s + rpb[clamp(q // 8 - k // 8, -2, 2) + 2, clamp(q % 8 - k % 8, -2, 2) + 2]", []),
    ("query-only", "s + w[(q // 3) % 5]", []),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_which_loads_are_composed(case):
    _, score, want = case
    p = spattn.compile("full", score=score)
    comp = compose(p.score, p.score_inputs)
    if not want:
        assert comp is None
        return
    assert sorted(c.source for c in comp.composed) == want
    names = dict(comp.score_inputs)
    for c in comp.composed:
        assert names[c.name] == p.score_inputs[c.source]
        assert c.name not in p.score_inputs
        assert index_ops(c.fn) >= COMPOSE_MIN_OPS
    # the rewritten score reads every composed table at q - k + Lk - 1 and nothing else of them
    reads = {ld.name for ld in float_loads(comp.score)}
    assert reads == set(names)
    axes = {c.name: c.axis for c in comp.composed}
    for ld in float_loads(comp.score):
        if ld.name in axes:
            assert to_source(ld.index[axes[ld.name]]) == "q - k + Lk - 1"


@pytest.mark.parametrize("case", [c for c in CASES if c[2]], ids=[c[0] for c in CASES if c[2]])
def test_function_equals_the_index_at_every_pair(case):
    """``fn(q - k)`` equals the replaced index at random pairs, negative distances and
    distances past the buckets' range included."""
    _, score, _ = case
    p = spattn.compile("full", score=score)
    comp = compose(p.score, p.score_inputs)
    g = torch.Generator().manual_seed(7)
    q = torch.randint(-500, 5000, (4000,), generator=g)
    k = torch.randint(0, 5000, (4000,), generator=g)
    env = {"q": q, "k": k, "h": torch.zeros_like(q), "b": 0, "Lq": 5000, "Lk": 5000, "H": 1}
    for c in comp.composed:
        loads = [ld for ld in float_loads(p.score) if ld.name == c.source
                 and index_ops(ld.index[c.axis]) >= COMPOSE_MIN_OPS]
        assert loads
        for ld in loads:
            want = evaluate(ld.index[c.axis], env)
            got = evaluate(c.fn, {"u": q - k})
            assert torch.equal(torch.as_tensor(got).expand_as(q), torch.as_tensor(want).expand_as(q))


def test_min_ops_composes_cheap_indices_too():
    p = spattn.compile("full", score="s + rel[h, clamp(q - k, 0, 63)]")
    assert compose(p.score, p.score_inputs) is None
    comp = compose(p.score, p.score_inputs, min_ops=1)
    assert [c.source for c in comp.composed] == ["rel"]


def test_fresh_names_avoid_the_patterns_inputs():
    p = spattn.compile("full", score="s + rel[h, t5_bucket(16, 40)] + rel_by_distance[h]")
    comp = compose(p.score, p.score_inputs)
    (c,) = comp.composed
    assert c.name not in p.score_inputs and c.name.startswith("rel_by_distance")
    assert isinstance(comp.score, type(p.score))
    assert any(isinstance(ld, FLoad) and ld.name == "rel_by_distance"
               for ld in float_loads(comp.score))


def test_explain_shows_the_score_a_call_runs(monkeypatch):
    p = spattn.compile("causal", score="s + rel[h, t5_bucket_causal(32, 128)]")
    text = str(p.explain(256))
    assert "runs as rel_by_distance[h, q - k + Lk - 1] + s" in text
    assert p.explain(256).score_run == "rel_by_distance[h, q - k + Lk - 1] + s"
    assert p.explain(256, 128, q_offset=-5).score_run is None        # runs as written
    assert spattn.compile("causal", score="softcap(3.0)").explain(256).score_run is None
    clamp = spattn.compile("causal", score="s + rel[h, clamp(q - k, 0, 7)]")
    assert clamp.explain(64).score_run is None
    monkeypatch.setenv("SPATTN_SCORE_COMPOSE", "1")
    assert clamp.explain(64).score_run == "rel_by_distance[h, q - k + Lk - 1] + s"
    monkeypatch.setenv("SPATTN_SCORE_COMPOSE", "0")
    assert p.explain(256).score_run is None


def test_composed_names_avoid_the_masks_inputs():
    p = spattn.compile("causal & rel_by_distance[q] == rel_by_distance[k]",
                       score="s + rel[h, t5_bucket(16, 40)]")
    from spattn.runtime.compose import composition
    from spattn.runtime.settings import current
    (c,) = composition(p, current()).composed
    assert c.name == "rel_by_distance1"
