"""Per-head key orders at run time (``HeadOrderedPlan``): head-stripe patterns run with each
head's class of keys first and agree with the float64 reference in the caller's order,
forward and backward, on the torch backend and the generated Triton kernels
(interpreter), with GQA and two batch elements; other patterns that read ``h`` stay in
sequence order; ``SPATTN_LAYOUT`` is respected; the per-head gather kernel."""
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import spattn
from spattn.runtime.plan import HeadOrderedPlan, gather_heads
from spattn.runtime.reference import pattern_reference
from tests.helpers.headorder import class_source
from tests.runtime.test_torch_backend import check_with_reference


def _run(pat, *, B=1, Hq=4, Hk=4, N, Lq=None, q_offset=None, D=16, seed=0, grads=True):
    """A call of ``pat`` (``Lq`` queries, default ``N``, against ``N`` keys) through its
    plan, checked against the float64 reference; returns the plan."""
    Lq = N if Lq is None else Lq
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g).requires_grad_(grads)
    k = torch.randn(B, Hk, N, D, generator=g).requires_grad_(grads)
    v = torch.randn(B, Hk, N, D, generator=g).requires_grad_(grads)
    plan = pat.plan(q, k, v, q_offset=q_offset)
    o, lse = pat(q, k, v, plan=plan, return_lse=True)
    check_with_reference(o, lse, q, k, v, pat.mask(Lq, N, num_heads=Hq, q_offset=q_offset),
                         g, grads)
    return plan


CASES = [
    ("causal & (q - k < 16 | k % 4 == h)", 2, 4, 2, 70),
    ("causal & (q - k < 12 | (k // 4) % 4 == h)", 1, 4, 4, 96),
    ("q - k < 9 & k - q < 9 | (k - 1) % 8 == (2 * h) % 8", 2, 4, 1, 64),
    ("k % 8 == h", 1, 8, 2, 33),                       # the class alone: no q
]
IDS = ["B2-Hq4-Hk2-L70-D16-fp32-causal-m4", "B1-Hq4-Hk4-L96-D16-fp32-stripes4",
       "B2-Hq4-Hk1-L64-D16-fp32-band-m8", "B1-Hq8-Hk2-L33-D16-fp32-class-alone"]


@pytest.mark.parametrize("src,B,Hq,Hk,N", CASES, ids=IDS)
def test_torch_backend_head_order(src, B, Hq, Hk, N, monkeypatch):
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    plan = _run(spattn.compile(src, backend="torch"), B=B, Hq=Hq, Hk=Hk, N=N)
    assert isinstance(plan, HeadOrderedPlan)
    assert plan.order.shape == (Hq, N)
    assert "per-head key order" in repr(plan)


@pytest.mark.parametrize("src,Hq,Hk", [("causal & (q - k < 16 | k % H == h)", 4, 1),
                                       ("(k + h) % 3 != 0", 3, 1)],
                         ids=["B1-Hq4-Hk1-L96-D16-fp64-stripes", "B1-Hq3-Hk1-L96-D16-fp64-classes"])
def test_torch_backend_head_order_float64(src, Hq, Hk, monkeypatch):
    """Float64 stays float64 through a per-head key order with GQA: the group's query heads'
    dK and dV were summed in float32 (errors of 3e-7 where a float64 call is within 1e-12
    of the reference)."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.compile(src, backend="torch")
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, Hq, 96, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, Hk, 96, 16, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    assert isinstance(pat.plan(q, k, v), HeadOrderedPlan)
    o = pat(q, k, v)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(o, (q, k, v), do)
    ro, _ = pattern_reference(pat, q, k, v)
    want = torch.autograd.grad(ro, (q, k, v), do)
    for a, b in zip((o, *got), (ro, *want)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.interpreter
@pytest.mark.parametrize("src,B,Hq,Hk,N", CASES[:2], ids=IDS[:2])
def test_triton_head_order(src, B, Hq, Hk, N, monkeypatch):
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    plan = _run(spattn.compile(src, backend="triton"), B=B, Hq=Hq, Hk=Hk, N=N)
    assert isinstance(plan, HeadOrderedPlan)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("Lq,q_offset", [(24, None), (40, 7)],
                         ids=["Lq24-bottom-right", "Lq40-offset7"])
def test_head_order_fewer_queries(Lq, q_offset, backend, monkeypatch):
    """Queries keep their positions: chunked prefill (``Lq < Lk``, any ``q_offset``)."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    plan = _run(spattn.compile("causal & (q - k < 10 | k % 4 == h)", backend=backend),
                B=2, Hq=4, Hk=2, N=72, Lq=Lq, q_offset=q_offset)
    assert isinstance(plan, HeadOrderedPlan)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_head_order_with_documents(backend, monkeypatch):
    """A runtime input indexed by k is read through the order (``doc[kpos[k]]``); one
    named like the order's own input pushes its names aside."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.compile("input doc\ninput kpos\npattern p = same(doc) & causal & "
                         "(q - k < 10 | k % 4 == h) & kpos[q] >= 0", backend=backend)
    B, Hq, Hk, N, D = 2, 4, 2, 64, 16
    g = torch.Generator().manual_seed(5)
    doc = (torch.rand(B, N, generator=g) < 0.08).cumsum(-1)
    kpos = torch.zeros(N, dtype=torch.int64)
    q = torch.randn(B, Hq, N, D, generator=g).requires_grad_()
    k, v = (torch.randn(B, Hk, N, D, generator=g).requires_grad_() for _ in range(2))
    plan = pat.plan(q, k, v, doc=doc, kpos=kpos)
    assert isinstance(plan, HeadOrderedPlan) and plan.head.names == ("_kpos", "_kclass")
    o, lse = pat(q, k, v, plan=plan, return_lse=True)
    check_with_reference(o, lse, q, k, v, pat.mask(N, N, num_heads=Hq, batch=B, doc=doc,
                                                   kpos=kpos), g)


@pytest.mark.interpreter
def test_triton_head_order_row_tables_copy(monkeypatch):
    """``SPATTN_LAYOUT_GATHER=kernel`` has no per-head row tables: the plan copies."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    monkeypatch.setenv("SPATTN_LAYOUT_GATHER", "kernel")
    plan = _run(spattn.compile(CASES[0][0], backend="triton"), B=1, Hq=4, Hk=2, N=64,
                grads=False)
    assert isinstance(plan, HeadOrderedPlan) and plan.inner.rows is None


def test_lse_gradient_and_plan_cache(monkeypatch):
    """A loss on the lse (the torch backward of the inner plan), through calls without a
    plan (the plan cache)."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    from spattn.runtime.reference import attention_reference
    pat = spattn.compile("causal & (q - k < 8 | k % 4 == h)", backend="torch")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 40, 16, generator=g).requires_grad_() for _ in range(3))
    o, lse = pat(q, k, v, return_lse=True)
    (o.square().sum() + lse.sum()).backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = attention_reference(q64, k64, v64, pat.mask(40, 40, num_heads=4))
    (ro.square().sum() + rl.sum()).backward()
    for a, b in ((o, ro), (lse, rl), (q.grad, q64.grad), (k.grad, k64.grad),
                 (v.grad, v64.grad)):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("src,layout,H", [
    ("causal & q - k < 8 + 4 * h", "on", 4),
    ("causal & (q - k < 8 | q % 4 == h)", "on", 4),
    ("causal & (q - k < 8 | k % 4 == h)", "off", 4),
    ("causal & (q - k < 8 | k % 4 == h)", "auto", 4),      # too short for auto
], ids=["window-per-head-on", "query-class-on", "stripes-off", "stripes-auto-short"])
def test_sequence_order_kept(src, layout, H, monkeypatch):
    monkeypatch.setenv("SPATTN_LAYOUT", layout)
    plan = _run(spattn.compile(src, backend="torch"), Hq=H, Hk=H, N=48, grads=False)
    assert not isinstance(plan, HeadOrderedPlan)


def test_auto_uses_head_order_when_it_pays(monkeypatch):
    monkeypatch.setenv("SPATTN_LAYOUT", "auto")
    pat = spattn.compile("causal & (q - k < 128 | k % 16 == h)", backend="torch")
    plan = _run(pat, Hq=16, Hk=2, N=1024, grads=False)
    assert isinstance(plan, HeadOrderedPlan)
    assert plan.head.pays and plan.head.computed_order < 0.6 * plan.head.computed_sequence


def test_explain_reports_head_order():
    pat = spattn.compile("causal & (q - k < 256 | k % 16 == h)")
    r = pat.explain(2048, num_heads=16)
    ho = r.head_order
    assert ho is not None and ho["class"] == "h == k % 16"
    assert ho["computed_order"] < ho["computed_sequence"]
    assert ho["gathered"] == ["k", "v"] and ho["used"]
    assert "head order" in str(r) and "k % 16" in str(r)
    assert spattn.compile("causal & q - k < 8 + h").explain(2048, num_heads=4).head_order \
        is None


def test_explain_reports_head_order_with_runtime_inputs(monkeypatch):
    """A pattern with runtime inputs gets the head order its calls run in: explain reads the
    inputs through the order as the plan does, and the plan it describes is the one a
    call builds."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.compile("causal & (same(doc) | k % H == h)", backend="torch")
    doc = torch.arange(512) // 100
    ho = pat.explain(512, num_heads=4, doc=doc).head_order
    assert ho is not None and ho["class"] == "h == k % H"
    assert ho["computed_order"] < ho["computed_sequence"]
    q, k, v = (torch.randn(1, 4, 512, 16) for _ in range(3))
    assert isinstance(pat.plan(q, k, v, doc=doc), HeadOrderedPlan)


@pytest.mark.interpreter
@pytest.mark.parametrize("B,Hk,group,N,D,dtype", [
    (2, 2, 2, 37, 16, torch.float32), (1, 1, 4, 50, None, torch.float32),
    (2, 3, 1, 65, 24, torch.bfloat16)],
    ids=["B2-Hk2-g2-N37-D16-fp32", "B1-Hk1-g4-N50-lse-fp32", "B2-Hk3-g1-N65-D24-bf16"])
def test_gather_rows_per_head(B, Hk, group, N, D, dtype):
    from spattn.runtime.gather_kernel import gather_rows
    shape = (B, Hk, N) if D is None else (B, Hk, N, D)
    t = torch.randn(shape).to(dtype).transpose(0, 1).contiguous().transpose(0, 1)
    index = torch.stack([torch.randperm(N) for _ in range(Hk * group)])
    got = gather_rows(t, index, per_head=True, group=group)
    want = gather_heads(t, index, group)
    for h in range(Hk * group):
        assert torch.equal(want[:, h], t[:, h // group].index_select(1, index[h]))
    assert got.is_contiguous() and torch.equal(got, want)


@settings(max_examples=12, deadline=None)
@given(st.integers(2, 6), st.integers(0, 4), st.integers(1, 12), st.integers(1, 3),
       st.integers(20, 70), st.sampled_from([(2, 1), (2, 2), (4, 2), (3, 1)]),
       st.booleans(), st.integers(1, 8), st.integers(0, 2**31))
@example(4, 0, 8, 1, 61, (4, 2), True, 1, 0)
def test_torch_backend_head_order_property(m, c, w, b, N, heads, causal, form, seed):
    """Random class patterns (``tests.ir.test_headorder.class_source``) forced into a head
    order on the torch backend: outputs and gradients against the float64 reference."""
    import os
    Hq, Hk = heads
    src = f"(q - k < {w} & k - q < {w} | {class_source(m, c, b, Hq, form)})" \
        + (" & causal" if causal else "")
    old = os.environ.get("SPATTN_LAYOUT")
    os.environ["SPATTN_LAYOUT"] = "on"
    try:
        _run(spattn.compile(src, backend="torch"), B=2, Hq=Hq, Hk=Hk, N=N, seed=seed)
    finally:
        if old is None:
            os.environ.pop("SPATTN_LAYOUT")
        else:
            os.environ["SPATTN_LAYOUT"] = old
