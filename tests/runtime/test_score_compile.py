"""``torch.compile(fullgraph=True)`` of patterns with a score: the custom op
``spattn::score_attention`` (and its backward op) in the graph, no graph break, the eager
numbers forward and backward, learnable tables included; bad tables still raise
SpattnInputError from the compiled call."""
import pytest
import torch
from torch import nn

import spattn
from spattn.dsl.errors import SpattnInputError
from spattn.nn import SparseAttention
from spattn.runtime.reference import pattern_reference

MASK = "causal & window(W) & same(doc)"
SCORE = "softcap(5.0) + rel[h, clamp(q - k, 0, W - 1)]"


class ScoredBlock(nn.Module):
    """Projections into strided q, k, v views (2 query heads on 1 key head), a learnable
    relative bias table, documents as the mask's int input."""

    def __init__(self, backend, dim=32, heads=2):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.qkv = nn.Linear(dim, (heads + 2) * self.d)
        self.rel = nn.Parameter(torch.randn(heads, 12) * 0.5)
        self.attn = SparseAttention(spattn.compile(MASK, score=SCORE, W=12, backend=backend))

    def forward(self, x, doc):
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, self.h + 2, self.d).transpose(1, 2)
        q, k, v = qkv.split([self.h, 1, 1], dim=1)
        o = self.attn(q, k, v, doc=doc, rel=self.rel)
        return o.transpose(1, 2).reshape(B, L, -1)


def _compare_with_eager(model, x, doc):
    y_eager = model(x, doc)
    y_eager.square().mean().backward()
    g_eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    explanation = torch._dynamo.explain(model)(x, doc)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    y = torch.compile(model, fullgraph=True, backend="aot_eager")(x, doc)
    y.square().mean().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), n
        torch.testing.assert_close(p.grad, g_eager[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("backend", ["torch",
                                     pytest.param("triton", marks=pytest.mark.interpreter)])
def test_compiled_module_with_learnable_table_matches_eager(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ScoredBlock(backend)
    L = 40 if backend == "torch" else 24
    x = torch.randn(2, L, 32)
    doc = torch.arange(L).repeat(2, 1) // 15
    _compare_with_eager(model, x, doc)


def test_compiled_module_with_a_composed_table_matches_eager(monkeypatch):
    """The traced op with the module's relative bias composed on the host
    (``SPATTN_SCORE_COMPOSE=1`` composes its clamp): eager numbers, the table's gradient
    summed back through the recipe."""
    monkeypatch.setenv("SPATTN_SCORE_COMPOSE", "1")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ScoredBlock("torch")
    x = torch.randn(2, 40, 32)
    doc = torch.arange(40).repeat(2, 1) // 15
    _compare_with_eager(model, x, doc)
    assert any(r is not None for _, r in model.attn.pattern._runs.values())


def test_compiled_functional_lse_gradient_and_frozen_table():
    """``spattn.attention(pattern=..., score=...)`` compiled: outputs, lse and its gradient
    against the float64 reference; a table that needs no gradient gets none, q, k, v do;
    deterministic=True through the traced path of a Pattern."""
    torch._dynamo.reset()

    def f(q, k, v, rel):
        o, lse = spattn.attention(q, k, v, pattern="causal & window(W)", W=8,
                                  score="s * 0.5 + rel[h, clamp(q - k, 0, 7)]",
                                  backend="torch", rel=rel, return_lse=True)
        return o, lse

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=g, requires_grad=True) for _ in range(3))
    rel = torch.randn(2, 8, generator=g)
    explanation = torch._dynamo.explain(f)(q, k, v, rel)
    assert explanation.graph_break_count == 0
    o, lse = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, rel)
    w = torch.randn(lse.shape, generator=g)
    got = torch.autograd.grad(o.sum() + (lse * w).sum(), (q, k, v))
    p = spattn.compile("causal & window(8)", score="s * 0.5 + rel[h, clamp(q - k, 0, 7)]")
    rl = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro, rlse = pattern_reference(p, *rl, rel=rel.double())
    torch.testing.assert_close(o.double(), ro, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(lse.double(), rlse, atol=2e-4, rtol=1e-3)
    want = torch.autograd.grad(ro.sum() + (rlse * w.double()).sum(), rl)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-3, rtol=2e-3)

    pat = spattn.compile("causal & window(8)", score="s + rel[h, clamp(q - k, 0, 7)]",
                         backend="torch")
    rel = torch.randn(2, 8, generator=g, requires_grad=True)
    h = torch.compile(lambda q, k, v, rel: pat(q, k, v, rel=rel, deterministic=True).sum(),
                      fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(h(q, k, v, rel), (q, rel))
    want = torch.autograd.grad(pat(q, k, v, rel=rel).sum(), (q, rel))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_compiled_call_with_a_bad_table_raises():
    torch._dynamo.reset()
    pat = spattn.compile("causal & window(8)", score="s + rel[h, clamp(q - k, 0, 7)]",
                         backend="torch")
    f = torch.compile(lambda q, rel: pat(q, q, q, rel=rel), fullgraph=True, backend="aot_eager")
    q = torch.randn(1, 2, 16, 16)
    with pytest.raises(SpattnInputError, match=r"'rel' \(shape \(2, 7\)\) is too short"):
        f(q, torch.randn(2, 7))
    with pytest.raises(SpattnInputError, match="float table"):
        f(q, torch.ones(2, 8, dtype=torch.int64))
    g = torch.compile(lambda q, rel: pat(q, q, q, rel=rel, bias=rel), fullgraph=True,
                      backend="aot_eager")
    with pytest.raises(SpattnInputError, match="unexpected runtime input 'bias'"):
        g(q, torch.randn(2, 8))
    h = torch.compile(lambda q: pat(q, q, q), fullgraph=True, backend="aot_eager")
    with pytest.raises(SpattnInputError, match="missing runtime input 'rel'"):
        h(q)


@pytest.mark.parametrize("table", [1.0, [1.0, 2.0]], ids=["float", "list"])
def test_compiled_call_with_a_table_that_is_no_tensor_raises(table):
    """A table that is not a tensor is refused while tracing (the op's schema takes only
    tensors): the graph breaks and the eager call says what is wrong."""
    torch._dynamo.reset()
    pat = spattn.compile("causal", score="s + rel[h, clamp(q - k, 0, 7)]", backend="torch")
    f = torch.compile(lambda q: pat(q, q, q, rel=table), backend="aot_eager")
    with pytest.raises(SpattnInputError, match="'rel' must be a torch.Tensor"):
        f(torch.randn(1, 2, 8, 16))


def test_traced_path_without_compiling(monkeypatch):
    """The traced path (``scores.call_op`` and the custom op) run eagerly: the numbers of the
    eager path, gradients to q, k, v and the table."""
    p = spattn.compile("causal & window(6)", score="softcap(2.0) + rel[h, clamp(q - k, 0, 5)]",
                       backend="torch")
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 12, 16, generator=g, requires_grad=True) for _ in range(3))
    rel = torch.randn(2, 6, generator=g, requires_grad=True)
    o = p(q, k, v, rel=rel)
    want = [o, *torch.autograd.grad(o.sum(), (q, k, v, rel))]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    o = p(q, k, v, rel=rel)
    got = [o, *torch.autograd.grad(o.sum(), (q, k, v, rel))]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compiled_scored_module_on_cuda(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ScoredBlock(backend, dim=128, heads=4).cuda()
    x = torch.randn(2, 512, 128, device="cuda")
    doc = (torch.rand(2, 512, device="cuda") < 0.01).cumsum(-1)
    y_eager = model(x, doc)
    y_eager.square().mean().backward()
    g_eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    y = torch.compile(model, fullgraph=True)(x, doc)
    y.square().mean().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_eager[n], rtol=1e-3, atol=1e-4, msg=n)


def test_compiled_scored_grid_pattern_keeps_its_grid():
    """The op finds the pattern with its grid declaration (not one compiled again from the
    mask's source): the compiled call matches eager and refuses another length."""
    pat = spattn.compile("grid (y: 4, x: 4) abs(y(q) - y(k)) <= 1 & abs(x(q) - x(k)) <= 1",
                         score="softcap(5.0)", backend="torch")
    f = torch.compile(lambda a: pat(a, a, a), backend="aot_eager", fullgraph=True)
    q = torch.randn(1, 2, 16, 16)
    torch.testing.assert_close(f(q), pat(q, q, q))
    with pytest.raises(SpattnInputError, match="grid"):
        f(torch.randn(1, 2, 12, 16))
