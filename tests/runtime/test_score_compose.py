"""Composed score tables at run time (``runtime.compose``): a call whose table is read at a
costly function of ``q - k`` runs the composed score, with outputs and every gradient (q, k,
v, the caller's tables) equal to the float64 reference and to the call as written, on the
torch backend and on the Triton kernels under the interpreter."""
import pytest
import torch

import spattn
from spattn.dsl.errors import SpattnConfigError, SpattnInputError
from spattn.runtime import scores as S
from spattn.runtime.reference import pattern_reference

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]

# (id, mask, score, table shape, Lq, Lk, q_offset)
CASES = [
    ("causal-t5", "causal", "s + bias[h, t5_bucket_causal(8, 20)]", (3, 8), 40, 40, None),
    ("full-t5", "full", "s + bias[h, t5_bucket(16, 40)]", (3, 16), 37, 37, None),
    ("batched-table-read-twice", "window(9)",
     "s + bias[b, h, t5_bucket(16, 40)] * 2.0 + bias[b, h, 3]", (2, 3, 16), 33, 40, 5),
    ("decode-rows", "causal", "softcap(4.0) + bias[t5_bucket_causal(8, 20)]", (8,), 3, 40, None),
]


def _run(p, q, k, v, bias, do, q_offset, **kw):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, bias)]
    o = p(*leaves[:3], bias=leaves[3], q_offset=q_offset, **kw)
    return (o,) + torch.autograd.grad(o, leaves, do)


def _composed(p) -> bool:
    """Whether the pattern's calls ran a composed score (the recipes it keeps)."""
    return any(recipe is not None for _, recipe in p._runs.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_composed_call_matches_reference_and_written_call(case, backend, monkeypatch):
    _, mask, score, shape, Lq, Lk, off = case
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 3, Lq, 16, generator=g)
    k, v = (torch.randn(2, 3, Lk, 16, generator=g) for _ in range(2))
    bias = torch.randn(*shape, generator=g)
    p = spattn.compile(mask, score=score, backend=backend)
    o = p(q, k, v, bias=bias, q_offset=off)
    do = torch.randn(o.shape, generator=g)
    got = _run(p, q, k, v, bias, do, off)
    assert _composed(p)

    ref = [x.double().requires_grad_(True) for x in (q, k, v, bias)]
    ro, _ = pattern_reference(p, *ref[:3], bias=ref[3], q_offset=off)
    want = (ro,) + torch.autograd.grad(ro, ref, do.double())
    for what, a, b in zip(["o", "dq", "dk", "dv", "dbias"], got, want):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4, msg=what)

    monkeypatch.setenv("SPATTN_SCORE_COMPOSE", "0")
    p2 = spattn.compile(mask, score=score, backend=backend)
    written = _run(p2, q, k, v, bias, do, off)
    assert not _composed(p2)
    for what, a, b in zip(["o", "dq", "dk", "dv", "dbias"], got, written):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_table_gradient_is_bit_identical(backend):
    p = spattn.compile("causal", score="s + bias[h, t5_bucket_causal(8, 20)]", backend=backend)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 48, 16, generator=g) for _ in range(3))
    bias = torch.randn(2, 8, generator=g)
    do = torch.randn(1, 2, 48, 16, generator=g)
    a = _run(p, q, k, v, bias, do, None, deterministic=True)
    b = _run(p, q, k, v, bias, do, None, deterministic=True)
    assert _composed(p)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    ref = [x.double().requires_grad_(True) for x in (q, k, v, bias)]
    ro, _ = pattern_reference(p, *ref[:3], bias=ref[3])
    dbias = torch.autograd.grad(ro, ref[3], do.double())[0]
    torch.testing.assert_close(a[4].double(), dbias, atol=2e-5, rtol=1e-4)


def test_negative_query_offset_runs_as_written():
    """Queries before the keys' start (q_offset < 0) are not covered by a composed table:
    the call runs the score as written, and is right."""
    p = spattn.compile("full", score="s + bias[h, t5_bucket(16, 40)]", backend="torch")
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 30, 16, generator=g)
    k, v = (torch.randn(1, 2, 20, 16, generator=g) for _ in range(2))
    bias = torch.randn(2, 16, generator=g)
    o = p(q, k, v, bias=bias, q_offset=-10)
    assert not _composed(p)
    ro, _ = pattern_reference(p, q.double(), k.double(), v.double(), bias=bias.double(),
                              q_offset=-10)
    torch.testing.assert_close(o.double(), ro, atol=2e-5, rtol=1e-4)
    # the same pattern's next call, covered, runs composed
    o = p(q[:, :, :20], k, v, bias=bias)
    assert _composed(p)
    ro, _ = pattern_reference(p, q[:, :, :20].double(), k.double(), v.double(),
                              bias=bias.double())
    torch.testing.assert_close(o.double(), ro, atol=2e-5, rtol=1e-4)


def test_gradcheck_float64_through_the_composition():
    """torch.autograd.gradcheck of the torch backend's ScoreFunction in float64 on a
    composed call: the gradient reaches the caller's table through the recipe's sum."""
    p = spattn.compile("causal & window(12)", score="softcap(2.0) + rel[h, t5_bucket_causal(4, 8)]",
                       backend="torch")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 11, 4, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    rel = torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    run, recipe = S.composed(p, {"rel": rel}, 11, 11, 0, "cpu")
    assert recipe is not None and "_by_distance" in run.source
    c = S.Ctx(run, "torch", 0.5, 0, {}, ("rel",), recipe=recipe)
    assert torch.autograd.gradcheck(lambda q, k, v, rel: S.ScoreFunction.apply(c, q, k, v, rel)[0],
                                    (q, k, v, rel))


def test_table_errors_are_the_written_scores():
    """The caller's table is checked as written: too short for its buckets is an error
    naming it, whatever is composed."""
    p = spattn.compile("causal", score="s + bias[h, t5_bucket_causal(8, 20)]", backend="torch")
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    with pytest.raises(SpattnInputError, match="'bias'.*too short"):
        p(q, k, v, bias=torch.randn(2, 7))
    with pytest.raises(SpattnInputError, match="missing runtime input 'bias'"):
        p(q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_with_a_composed_table(backend):
    p = spattn.compile("causal", score="s + bias[h, t5_bucket_causal(8, 20)]", backend=backend)
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=g) for _ in range(3))
    bias = torch.randn(2, 8, generator=g)
    plan = p.plan(q, k, v, bias=bias)
    assert "_by_distance" in plan.pattern.source
    bias2 = torch.randn(2, 8, generator=g)
    o = p(q, k, v, plan=plan, bias=bias2)
    ro, _ = pattern_reference(p, q.double(), k.double(), v.double(), bias=bias2.double())
    torch.testing.assert_close(o.double(), ro, atol=2e-5, rtol=1e-4)
    with pytest.raises(SpattnInputError, match="the plan was built for 'bias'"):
        p(q, k, v, plan=plan, bias=torch.randn(2, 9))


def test_setting_switches_composition(monkeypatch):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=g) for _ in range(3))
    rel = torch.randn(2, 8, generator=g)
    for value, composed in (("1", True), ("auto", False), ("0", False)):
        monkeypatch.setenv("SPATTN_SCORE_COMPOSE", value)
        p = spattn.compile("causal", score="s + rel[h, clamp(q - k, 0, 7)]", backend="torch")
        o = p(q, k, v, rel=rel)
        assert _composed(p) == composed, value
        ro, _ = pattern_reference(p, q.double(), k.double(), v.double(), rel=rel.double())
        torch.testing.assert_close(o.double(), ro, atol=2e-5, rtol=1e-4)
    monkeypatch.setenv("SPATTN_SCORE_COMPOSE", "sometimes")
    with pytest.raises(SpattnConfigError, match="SPATTN_SCORE_COMPOSE"):
        p(q, k, v, rel=rel)


def test_recipe_sums_a_gradient_into_its_source():
    """The recipe's fixed-order sum equals ``index_add_`` along the composed dim."""
    p = spattn.compile("full", score="s + bias[b, h, t5_bucket(16, 40)]")
    from spattn.runtime import compose as C
    from spattn.runtime.settings import current
    comp = C.composition(p, current())
    bias = torch.randn(2, 3, 16)
    run, r = S.composed(p, {"bias": bias}, 30, 50, 0, "cpu")
    (c,) = comp.composed
    lut = r.luts[c.name][0]
    assert lut.shape == (0 + 30 + 50 - 1,)
    gbuf = torch.randn(2, 3, lut.numel(), dtype=torch.float64)
    got = r.grads({c.name: gbuf}, {"bias": bias}, ("bias",))["bias"]
    want = torch.zeros(2, 3, 16, dtype=torch.float64).index_add_(2, lut, gbuf)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert S.composed(p, {"bias": bias}, 30, 50, 0, "cpu")[1] is r     # kept per call shape


@pytest.mark.gpu
@pytest.mark.parametrize("mask,score", [
    ("causal", "s + bias[h, t5_bucket_causal(32, 128)]"),
    ("full", "s + bias[h, t5_bucket(32, 128)]")], ids=["causal-t5", "full-t5"])
def test_gpu_composed_t5_bf16(mask, score, monkeypatch):
    """On the GPU at bf16 (B2-H4-L1024-D64): outputs and gradients of a composed T5 call
    against the float64 reference, and the table's gradient against the call as written."""
    p = spattn.compile(mask, score=score, backend="triton")
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(2, 4, 1024, 64, generator=g).cuda().bfloat16() for _ in range(4))
    bias = torch.randn(4, 32, generator=g).cuda()
    got = _run(p, q, k, v, bias, do, None)
    assert _composed(p)
    ref = [x.double().requires_grad_(True) for x in (q, k, v, bias)]
    ro, _ = pattern_reference(p, *ref[:3], bias=ref[3])
    want = (ro,) + torch.autograd.grad(ro, ref, do.double())
    for what, a, b in zip(["o", "dq", "dk", "dv"], got[:4], want[:4]):
        torch.testing.assert_close(a.double(), b, atol=3e-2, rtol=3e-2, msg=what)
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()   # noqa: E731
    assert rel(got[4], want[4]) < 1e-2
    monkeypatch.setenv("SPATTN_SCORE_COMPOSE", "0")
    p2 = spattn.compile(mask, score=score, backend="triton")
    written = _run(p2, q, k, v, bias, do, None)
    assert not _composed(p2)
    assert rel(got[4], written[4].double()) < 1e-2


def test_a_composed_table_past_the_bound_runs_as_written(monkeypatch):
    from spattn.runtime import compose as C
    monkeypatch.setattr(C, "MAX_ELEMENTS", 2 * 63)      # 2 heads x 63 distances fit at L=32
    p = spattn.compile("causal", score="s + bias[h, t5_bucket_causal(8, 20)]", backend="torch")
    g = torch.Generator().manual_seed(8)
    bias = torch.randn(2, 8, generator=g)
    for L, composed in ((32, True), (33, False)):
        q, k, v = (torch.randn(1, 2, L, 16, generator=g) for _ in range(3))
        assert (S.composed(p, {"bias": bias}, L, L, 0, "cpu")[1] is not None) == composed
        o = p(q, k, v, bias=bias)
        ro, _ = pattern_reference(p, q.double(), k.double(), v.double(), bias=bias.double())
        torch.testing.assert_close(o.double(), ro, atol=2e-5, rtol=1e-4)


def test_a_mask_input_named_like_a_composed_table():
    """A mask input named ``rel_by_distance`` keeps its name: the composed table takes
    another, and the call is right."""
    p = spattn.compile("causal & rel_by_distance[q] == rel_by_distance[k]",
                       score="s + rel[h, t5_bucket(16, 40)]", backend="torch")
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 2, 30, 16, generator=g) for _ in range(3))
    rel = torch.randn(2, 16, generator=g)
    doc = torch.arange(30) // 7
    o = p(q, k, v, rel=rel, rel_by_distance=doc)
    assert _composed(p)
    ro, _ = pattern_reference(p, q.double(), k.double(), v.double(), rel=rel.double(),
                              rel_by_distance=doc)
    torch.testing.assert_close(o.double(), ro, atol=2e-5, rtol=1e-4)
