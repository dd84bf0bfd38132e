"""``torch.compile(fullgraph=True)`` of a model using spattn: no graph breaks, same numbers."""
import re

import pytest
import torch
from torch import nn

import spattn
from spattn.nn import SparseAttention


class TinyBlock(nn.Module):
    def __init__(self, dim=32, heads=2, kv_heads=1):
        super().__init__()
        self.h, self.hk, self.d = heads, kv_heads, dim // heads
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.d)
        self.out = nn.Linear(dim, dim)
        self.attn = SparseAttention("causal & (window(W) | sink(2)) & same(doc)", W=12,
                                    backend="torch")

    def forward(self, x, doc):
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, self.h + 2 * self.hk, self.d).transpose(1, 2)
        q, k, v = qkv.split([self.h, self.hk, self.hk], dim=1)     # strided views, GQA
        o = self.attn(q, k, v, doc=doc)
        return self.out(o.transpose(1, 2).reshape(B, L, -1))


@pytest.mark.parametrize("doc_dtype", [torch.int64, torch.int32], ids=["doc-int64", "doc-int32"])
def test_compile_fullgraph_forward_backward_matches_eager(doc_dtype):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyBlock()
    x = torch.randn(2, 40, 32)
    doc = (torch.rand(2, 40) < 0.1).cumsum(-1).to(doc_dtype)    # int32: converted while traced

    y_eager = model(x, doc)
    y_eager.square().mean().backward()
    g_eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x, doc)
    y.square().mean().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_eager[n], rtol=1e-4, atol=1e-6, msg=n)

    # the attention is one opaque op in the graph, not a graph break
    explanation = torch._dynamo.explain(model)(x, doc)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_compile_functional_attention_without_graph_breaks():
    """``spattn.attention(pattern="...")`` inside a compiled function: parsing stays out of
    the graph (the compiled pattern enters as constants)."""
    torch._dynamo.reset()

    def f(q, k, v, doc):
        o = spattn.attention(q, k, v, pattern="causal & window(W) & same(doc)", W=8,
                             backend="torch", doc=doc)
        return (o * o).sum()

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=g, requires_grad=True) for _ in range(3))
    doc = torch.arange(20) // 6
    explanation = torch._dynamo.explain(f)(q, k, v, doc)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = compiled(q, k, v, doc)
    ga = torch.autograd.grad(a, (q, k, v))
    b = f(q, k, v, doc)
    gb = torch.autograd.grad(b, (q, k, v))
    torch.testing.assert_close(a, b)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("dynamic", [None, True], ids=["dynamic-default", "dynamic"])
@pytest.mark.parametrize("score", [None, "s * 0.5"], ids=["mask", "score"])
def test_compile_a_scale_that_varies(dynamic, score):
    """A Python float scale that changes between calls is a symbol while dynamo traces
    (at the second value by default, at once with ``dynamic=True``): it traces with
    ``fullgraph=True``, the custom op checks its value, and every call matches eager."""
    import math
    pat = spattn.compile("causal & window(5)", score=score, backend="torch")
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 16, 16, generator=g) for _ in range(3))
    torch._dynamo.reset()
    f = torch.compile(lambda q, s: pat(q, k, v, scale=s), backend="eager", fullgraph=True,
                      dynamic=dynamic)
    for s in (0.25, 0.5, 1 / math.sqrt(7)):
        torch.testing.assert_close(f(q, s), pat(q, k, v, scale=s), atol=1e-6, rtol=1e-5)
    for bad in (-1.0, 0.0, float("nan")):
        with pytest.raises(spattn.SpattnValueError, match="scale"):
            f(q, bad)
    torch._dynamo.reset()
    h = torch.compile(lambda q: pat(q, k, v, scale=1.0 / math.sqrt(q.shape[-1])),
                      backend="eager", fullgraph=True, dynamic=True)
    torch.testing.assert_close(h(q), pat(q, k, v), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("score", [None, "softcap(4.0) + w[h]"], ids=["mask", "score"])
def test_compile_a_scale_that_varies_inside_a_checkpoint(score):
    """Inductor, a ``torch.utils.checkpoint`` region and a scale that varies: a custom op's
    symbolic float argument arrives there as an earlier call's value (torch 2.13), so the
    ops read the scale from a 0-d tensor (``autograd.op_scale``); every call's output and
    gradients (a learnable table's too) match eager."""
    import torch.utils.checkpoint as cp
    pat = spattn.compile("causal & window(33)", score=score, backend="torch")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 2, 4, 64, 16, generator=g)
    w = torch.randn(4, generator=g)
    kw = {} if score is None else {"w": w}

    def f(q, k, v, s, **tables):
        return cp.checkpoint(lambda a, b, c: pat(a, b, c, scale=s, **tables), q, k, v,
                             use_reentrant=False)
    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True)
    for s in (0.25, 0.3, 0.35, 0.5):
        got = [t.clone().requires_grad_() for t in (x, *kw.values())]
        want = [t.clone().requires_grad_() for t in (x, *kw.values())]
        tables = lambda ts: dict(zip(kw, ts[1:]))
        o = cf(*got[0].unbind(0), s, **tables(got))
        r = pat(*want[0].unbind(0), scale=s, **tables(want))
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5, msg=lambda m: f"scale {s}: {m}")
        (o * r.detach()).sum().backward()
        (r * r.detach()).sum().backward()
        for a, b in zip(got, want):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"scale {s}: {m}")


def test_compiled_empty_call_with_a_scale_that_varies():
    """An empty call traces with a symbolic scale under ``fullgraph=True`` (its value cannot
    be compared while tracing, and no output of an empty call depends on it)."""
    pat = spattn.compile("causal", backend="torch")
    torch._dynamo.reset()
    cf = torch.compile(lambda q, s: pat(q, q, q, scale=s), fullgraph=True, backend="eager")
    for B, s in ((1, 0.25), (1, 0.3), (0, 0.35)):
        q = torch.randn(B, 2, 16, 8)
        torch.testing.assert_close(cf(q, s), pat(q, q, q, scale=s))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compile_fullgraph_on_cuda(backend):
    """On CUDA: the Triton kernels (or the torch backend) inside a fullgraph-compiled model."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyBlock(dim=128, heads=4, kv_heads=2).cuda()
    model.attn = SparseAttention("causal & (window(W) | sink(2)) & same(doc)", W=100,
                                 backend=backend)
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
        torch.testing.assert_close(p.grad, g_eager[n], rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize("form", ["module", "functional"])
def test_compile_fullgraph_bshd_layout(form):
    """``layout="bshd"`` inside ``torch.compile(fullgraph=True)``: the transposes are traced
    around the op, no graph break, the eager numbers."""
    torch._dynamo.reset()
    attn = SparseAttention("causal & window(W)", W=6, backend="torch", layout="bshd")

    def f(q, k, v):
        if form == "module":
            o = attn(q, k, v)
        else:
            o = spattn.attention(q, k, v, pattern="causal & window(W)", W=6, backend="torch",
                                 layout="bshd")
        return (o * o).sum()

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 18, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = compiled(q, k, v)
    ga = torch.autograd.grad(a, (q, k, v))
    b = f(q, k, v)
    gb = torch.autograd.grad(b, (q, k, v))
    torch.testing.assert_close(a, b)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


def test_compile_fullgraph_grid_with_extra_tokens_around_it():
    """A pattern with text before and after its grid (``spattn.neighborhood(...,
    extra_before=, extra_after=)``, and a source string with ``after T before U``) traced
    with ``fullgraph=True``: the op's key carries both counts, the numbers are the float64
    reference's, and another length is the grid's error under the trace too."""
    from spattn.runtime.reference import attention_reference
    torch._dynamo.reset()
    nb = spattn.neighborhood((4, 5), 3, extra_before=3, extra_after=4, backend="torch")
    src = "grid (4, 5) after 3 before 4 k < 3 | q >= 23 | abs(q - k) <= 2"
    assert nb.op_key.startswith("grid (4, 5) after 3 before 4 ")

    def f(q, k, v):
        return nb(q, k, v) + spattn.attention(q, k, v, pattern=src, backend="torch")

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 27, 16, generator=g, requires_grad=True) for _ in range(3))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    qd, kd, vd = (x.detach().double() for x in (q, k, v))
    want = sum(attention_reference(qd, kd, vd, p.mask(27, 27))[0]
               for p in (nb, spattn.compile(src)))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    ga = torch.autograd.grad(out.square().sum(), (q, k, v))
    gb = torch.autograd.grad(f(q, k, v).square().sum(), (q, k, v))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)
    short = torch.randn(1, 2, 26, 16)
    with pytest.raises(spattn.SpattnInputError, match="after 3 and before 4 extra tokens"):
        compiled(short, short, short)


@pytest.mark.parametrize("score", [None, "softcap(5.0)"], ids=["mask", "score"])
def test_compiled_empty_self_attention(score):
    """``torch.compile(fullgraph=True)`` of a call with an empty batch, q, k and v one tensor
    (self-attention): the empty call's zeros and zero gradients trace (the autograd
    function takes each tensor once), and a non-empty call in the same function traces the
    input checks (the torch.func check is skipped while compiling)."""
    pat = spattn.compile("causal & window(4)", score=score, backend="torch")
    f = torch.compile(lambda x: pat(x, x, x), fullgraph=True)
    x0 = torch.randn(0, 2, 8, 16, requires_grad=True)
    o = f(x0)
    o.sum().backward()
    assert o.shape == x0.shape and x0.grad.shape == x0.shape
    x = torch.randn(1, 2, 8, 16, requires_grad=True)
    o = f(x)
    o.sum().backward()
    ref = x.detach().requires_grad_()
    pat(ref, ref, ref).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)


@pytest.mark.interpreter
def test_equal_patterns_that_declare_other_inputs_are_two_op_keys():
    """``causal & (same(doc) | true)`` is ``causal`` and takes ``doc``: a traced call carries
    its pattern's key, and each pattern finds itself (the Triton plan reads the inputs its
    pattern declares), in either order of first use."""
    from spattn.runtime.reference import pattern_reference
    torch._dynamo.reset()
    a = spattn.compile("causal & (same(doc) | true)", backend="triton")
    b = spattn.compile("causal", backend="triton")
    assert a == b and a.op_key != b.op_key
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=g) for _ in range(3))
    doc = torch.zeros(32, dtype=torch.long)
    a(q, k, v, doc=doc)
    want = pattern_reference(b, q.double(), k.double(), v.double())[0]
    for f in (torch.compile(lambda q: b(q, k, v), fullgraph=True),
              torch.compile(lambda q: a(q, k, v, doc=doc), fullgraph=True)):
        torch.testing.assert_close(f(q).double(), want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("case", ["missing-input", "unknown-input", "float-input",
                                  "sdpa-keyword", "tensor-q_offset"])
def test_compile_fullgraph_bad_call_shows_spattn_message(case):
    """A bad call in a fullgraph region: dynamo traces the failing check and reports the
    exception it raises (`Unsupported`, "Observed exception") with the SpattnError's
    message in it, the message an eager call gives; without fullgraph the call falls back
    to eager and raises the SpattnError itself."""
    torch._dynamo.reset()
    pat = spattn.compile("causal & same(doc)", backend="torch")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=g) for _ in range(3))
    doc = torch.arange(20) // 5
    kw = {"missing-input": {}, "unknown-input": {"doc": doc, "foo": doc},
          "float-input": {"doc": doc.float()}, "sdpa-keyword": {"doc": doc, "is_causal": True},
          "tensor-q_offset": {"doc": doc, "q_offset": torch.tensor(3)}}[case]

    def f(a, b, c):
        return pat(a, b, c, **kw)
    with pytest.raises(spattn.SpattnError) as eager:
        f(q, k, v)
    want = str(eager.value).splitlines()[0]
    with pytest.raises(Exception) as compiled:
        torch.compile(f, fullgraph=True, backend="eager")(q, k, v)
    assert want in str(compiled.value), str(compiled.value)
    with pytest.raises(type(eager.value), match="^" + re.escape(want)):
        torch.compile(f, backend="eager")(q, k, v)
