"""Token layouts at run time: patterns over grids run in box order (``RemappedPlan``) and
agree with the float64 reference in the caller's order, forward and backward, on the torch
backend and on the generated Triton kernels (interpreter), GQA, grids the boxes do not
divide, residue classes (dilation)."""
import math

import pytest
import torch

import spattn
from spattn.runtime.plan import RemappedPlan
from tests.runtime.test_torch_backend import check_with_reference


def _run(pat, *, B=1, Hq=2, Hk=1, N, D=16, seed=0, grads=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, N, D, generator=g).requires_grad_(grads)
    k = torch.randn(B, Hk, N, D, generator=g).requires_grad_(grads)
    v = torch.randn(B, Hk, N, D, generator=g).requires_grad_(grads)
    plan = pat.plan(q, k, v)
    o, lse = pat(q, k, v, plan=plan, return_lse=True)
    check_with_reference(o, lse, q, k, v, pat.mask(N, N), g, grads)
    return plan


# id, neighborhood args (shape, kernel_size, stride, dilation, is_causal)
CASES = [
    ("2d-12x10-k5x4-d2x1-s1x2", ((12, 10), (5, 4), (1, 2), (2, 1), False)),
    ("2d-9x14-k3-causal-rows", ((9, 14), 3, 1, 1, (True, False))),
    ("3d-4x6x5-k3x4x2-s3x2x1", ((4, 6, 5), (3, 4, 2), (3, 2, 1), 1, False)),
    ("1d-50-k4-d3-causal", ((50,), 4, 2, 3, True)),
]


@pytest.mark.parametrize("args", [c[1] for c in CASES], ids=[f"B1-Hq2-Hk1-D16-fp32-{c[0]}"
                                                           for c in CASES])
def test_torch_backend_remapped(args, monkeypatch):
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.neighborhood(*args, backend="torch")
    N = math.prod(pat.grid)
    plan = _run(pat, N=N)
    assert isinstance(plan, RemappedPlan)
    assert plan.order.numel() >= N


@pytest.mark.interpreter
@pytest.mark.parametrize("args", [c[1] for c in CASES[:2]],
                         ids=[f"B1-Hq2-Hk1-D16-fp32-{c[0]}" for c in CASES[:2]])
def test_triton_remapped(args, monkeypatch):
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.neighborhood(*args, backend="triton")
    plan = _run(pat, N=math.prod(pat.grid), Hq=2, Hk=2)
    assert isinstance(plan, RemappedPlan)


@pytest.mark.parametrize("src,params,N", [
    ("abs(q // W - k // W) <= 2 & abs(q % W - k % W) <= 1", {"W": 12}, 120),
    ("dilated(6, 4)", {}, 96),
], ids=["B2-Hq2-Hk1-L120-D16-fp32-flat2d", "B2-Hq2-Hk1-L96-D16-fp32-dilated"])
def test_flattened_patterns_remapped(src, params, N, monkeypatch):
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.compile(src, backend="torch", **params)
    plan = _run(pat, B=2, N=N)
    assert isinstance(plan, RemappedPlan)


def test_layout_off_runs_in_sequence_order(monkeypatch):
    monkeypatch.setenv("SPATTN_LAYOUT", "off")
    pat = spattn.neighborhood((8, 8), 3, backend="torch")
    plan = _run(pat, N=64, grads=False)
    assert not isinstance(plan, RemappedPlan)


def test_auto_uses_a_layout_only_when_it_pays(monkeypatch):
    monkeypatch.setenv("SPATTN_LAYOUT", "auto")
    plan = _run(spattn.compile("dilated(64, 4)", backend="torch"), N=2048, Hq=1, grads=False)
    assert isinstance(plan, RemappedPlan)
    assert plan.remap.layout.box == (128, 1) or plan.remap.layout.box_by_axis()[-1] == 1
    assert plan.remap.computed_layout <= 0.8 * plan.remap.computed_sequence
    assert "layout: grid" in repr(plan)
    plain = spattn.compile("chunked(128)", backend="torch")     # a grid, nothing to gain
    assert not isinstance(_run(plain, N=1024, Hq=1, grads=False), RemappedPlan)


@pytest.mark.parametrize("src,N,layout", [
    ("causal & (window(64) | k % 64 == 0)", 1024, False),
    ("strided(64)", 2048, False),
    ("(q - k) % 8 == 0", 4096, True)], ids=["columns-1024", "strided-2048", "dilation-4096"])
def test_cpu_plan_prices_the_layout_against_sequence_order(monkeypatch, src, N, layout):
    """On the CPU the torch backend runs a layout the chooser picked (on whole tiles) only
    where its own plan does not price sequence order at most ``CPU_SEQUENCE_MARGIN`` of it
    (its ``keys`` strategy computes fewer pairs in sequence order than whole tiles count);
    ``SPATTN_LAYOUT=on`` keeps the layout. Either way the reference's numbers."""
    from spattn.runtime import plan as P, settings as S
    monkeypatch.setenv("SPATTN_LAYOUT", "auto")
    pat = spattn.compile(src, backend="torch")
    q = torch.empty(1, 2, N, 16)
    remap, _, _ = P.choose_layout(pat, q, q, None, {}, S.current(), "copy")
    assert remap is not None and remap.pays          # the chooser's pick
    plan = _run(pat, Hq=2, Hk=2, N=N, grads=N <= 2048)
    assert isinstance(plan, RemappedPlan) == layout
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    assert isinstance(_run(pat, Hq=2, Hk=2, N=N, grads=False, seed=1), RemappedPlan)


def test_q_offset_and_cross_attention_run_in_sequence_order(monkeypatch):
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.compile("dilated(8, 4)", backend="torch")
    q = torch.randn(1, 1, 64, 16)
    kv = torch.randn(1, 1, 96, 16)
    assert not isinstance(pat.plan(q, kv, kv), RemappedPlan)
    assert not isinstance(pat.plan(kv, kv, kv, q_offset=3), RemappedPlan)
    assert isinstance(pat.plan(kv, kv, kv), RemappedPlan)


def test_compiled_function_runs_the_remapped_plan(monkeypatch):
    """Under ``torch.compile(fullgraph=True)`` the custom op builds the remapped plan: same
    output and gradients as eager."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    torch._dynamo.reset()
    pat = spattn.neighborhood((6, 8), (3, 4), dilation=(2, 1), backend="torch")

    def f(q, k, v):
        return pat(q, k, v)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 48, 16, generator=g, requires_grad=True) for _ in range(3))
    o = torch.compile(f, fullgraph=True)(q, k, v)
    o.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = f(q, k, v)
    ref.sum().backward()
    torch.testing.assert_close(o, ref)
    for a, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(a, t.grad)
    with pytest.raises(spattn.SpattnInputError, match="grid"):
        torch.compile(f, fullgraph=True)(q[:, :, :40], k[:, :, :40], v[:, :, :40])
