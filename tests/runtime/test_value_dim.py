"""Calls whose v has another head dim than q and k (multi-head latent attention: DeepSeek's
q·k over 192 dims, values of 128), as ``scaled_dot_product_attention`` takes them: outputs,
log-sum-exp and gradients against the float64 reference, on both backends."""
import pytest
import torch

import spattn
from spattn.dsl.errors import SpattnInputError
from spattn.runtime.reference import attention_reference

CASES = [  # (D of q and k, Dv)
    (48, 32),
    (32, 64),
    (192, 128),
    (32, 8),        # v narrower than the kernels' smallest head dim: padded to q's
]
PATTERNS = {
    "window": ("causal & window(7)", {}),
    "docs": ("causal & same(doc)", {"doc": lambda B, L: (torch.arange(L) // 6).expand(B, L)}),
}


def _ref(pat, q, k, v, scale=None, q_offset=None, **inputs):
    B, Hq, Lq, _ = q.shape
    mask = pat.mask(Lq, k.shape[2], num_heads=Hq, batch=B, q_offset=q_offset, **inputs)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o, lse = attention_reference(q64, k64, v64, mask, scale=scale)
    return (q64, k64, v64), o, lse


def _close(got, want, tol):
    got, want = got.detach().double(), want.detach()
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))
    assert err < tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("backend", [
    "torch", pytest.param("auto", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("D,Dv", CASES, ids=[f"D{d}-Dv{dv}" for d, dv in CASES])
def test_outputs_lse_and_gradients(D, Dv, name, backend):
    src, makers = PATTERNS[name]
    pat = spattn.compile(src, backend=backend)
    g = torch.Generator().manual_seed(D * 1000 + Dv)
    B, Hq, Hk, L = 2, 4, 2, 19
    q = torch.randn(B, Hq, L, D, generator=g).requires_grad_()
    k = torch.randn(B, Hk, L, D, generator=g).requires_grad_()
    v = torch.randn(B, Hk, L, Dv, generator=g).requires_grad_()
    inputs = {n: make(B, L) for n, make in makers.items()}
    o, lse = pat(q, k, v, return_lse=True, **inputs)
    assert o.shape == (B, Hq, L, Dv) and o.is_contiguous()
    (q64, k64, v64), ro, rl = _ref(pat, q, k, v, **inputs)
    _close(o, ro, 1e-5)
    _close(lse, rl, 1e-5)
    do = torch.randn(o.shape, generator=g)
    (o * do).sum().backward()
    (ro * do.double()).sum().backward()
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert got.shape == want.shape
        _close(got, want, 1e-4)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_scale_layout_and_a_decode_step(layout):
    """The default scale is q's ``1 / sqrt(D)``, a given scale is kept; ``[B, L, H, D]``
    tensors; one query over a long cache (the decode route)."""
    pat = spattn.compile("causal & window(100)", backend="torch")
    g = torch.Generator().manual_seed(7)
    for Lq, scale in ((1, None), (1, 0.3), (5, None)):
        q = torch.randn(1, 4, Lq, 96, generator=g)
        k = torch.randn(1, 2, 300, 96, generator=g)
        v = torch.randn(1, 2, 300, 64, generator=g)
        args = (q, k, v) if layout == "bhsd" else tuple(t.transpose(1, 2) for t in (q, k, v))
        o = pat(*args, scale=scale, layout=None if layout == "bhsd" else layout)
        if layout == "bshd":
            o = o.transpose(1, 2)
        _, ro, _ = _ref(pat, q, k, v, scale=scale)
        _close(o, ro, 1e-5)


def test_what_stays_one_head_dim():
    pat = spattn.compile("causal", backend="torch")
    q, k = torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32)
    v = torch.randn(1, 2, 8, 16)
    with pytest.raises(SpattnInputError, match="plan= takes tensors of one head dim"):
        pat(q, k, v, plan=pat.plan(q, k, k))
    with pytest.raises(SpattnInputError, match=r"head dim of v must be in 1 or more, got 0"):
        pat(q, k, torch.randn(1, 2, 8, 0))
    with pytest.raises(SpattnInputError, match="pads the narrower to the wider"):
        pat.decode(q[:, :, -1:], k, v)


def test_every_call_form():
    """``spattn.attention``, ``nn.SparseAttention``, a ``torch.compile``d call (one custom
    op on the padded tensors) and ``vmap`` agree with the pattern's call and the
    reference."""
    pat = spattn.compile("causal & window(5)", backend="torch")
    g = torch.Generator().manual_seed(11)
    q, k = torch.randn(2, 4, 9, 48, generator=g), torch.randn(2, 2, 9, 48, generator=g)
    v = torch.randn(2, 2, 9, 32, generator=g)
    want = pat(q, k, v)
    _close(want, _ref(pat, q, k, v)[1], 1e-5)
    compiled = torch.compile(lambda q, k, v: spattn.attention(
        q, k, v, pattern="causal & window(5)", backend="torch"), fullgraph=True)
    mapped = torch.func.vmap(lambda qq: pat(qq, k, v))(torch.stack([q, q]))
    assert torch.equal(mapped[0], mapped[1])
    for got in (spattn.attention(q, k, v, pattern="causal & window(5)", backend="torch"),
                spattn.nn.SparseAttention("causal & window(5)", backend="torch")(q, k, v),
                compiled(q, k, v), mapped[1]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("D,Dv", [(512, 512), (8, 8), (512, 256), (4, 24)],
                         ids=["D512", "D8", "D512-Dv256", "D4-Dv24"])
def test_the_torch_backend_takes_any_head_dim(D, Dv):
    """Head dims outside the kernels' 16..256 (Gemma 4's global layers have 512) run on
    the torch backend, float64 against the reference, gradients included; the Triton
    backend refuses them and names the torch backend."""
    pat = spattn.compile("causal & window(5)", backend="torch")
    g = torch.Generator().manual_seed(D + Dv)
    q = torch.randn(2, 4, 9, D, generator=g, dtype=torch.float64).requires_grad_()
    k = torch.randn(2, 2, 9, D, generator=g, dtype=torch.float64).requires_grad_()
    v = torch.randn(2, 2, 9, Dv, generator=g, dtype=torch.float64).requires_grad_()
    o = pat(q, k, v)
    (q64, k64, v64), ro, _ = _ref(pat, q, k, v)
    _close(o, ro, 1e-12)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64)
    (o * do).sum().backward()
    (ro * do).sum().backward()
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        _close(got, want, 1e-10)


@pytest.mark.interpreter
def test_the_kernels_refuse_wide_head_dims_by_name():
    pat = spattn.compile("causal", backend="triton")
    x = torch.randn(1, 2, 8, 512)
    with pytest.raises(SpattnInputError, match=r"must be in 16..256, got 512.*backend='torch'"):
        pat(x, x, x)
