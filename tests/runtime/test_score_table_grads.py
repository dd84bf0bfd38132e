"""Table gradients of 16-bit calls on the Triton backward (docs/backends.md, Scores): the
row correction ``delta`` is read from an fp32 copy of the output whenever a table needs a
gradient, so a learnable slope times the distance (``w[h] * float(q - k)``, learnable
ALiBi) gets the gradient the float32 torch path gets, not one carrying the 16-bit output's
rounding multiplied by up to L; q, k, v gradients against the float64 reference too."""
import math

import pytest
import torch

import spattn
from spattn.runtime import scores as S

SLOPE = "s + w[h] * float(q - k)"


def _slope_case(L, *, B=1, H=2, D=16, device="cpu", seed=7):
    """bf16 q, k, v, dO, a slope per head (about 0.2), and the float64 reference gradients
    of q, k, v and the slopes (from the same bf16-rounded inputs)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, L, D, generator=g, device=device).to(torch.bfloat16)
                   for _ in range(4))
    w0 = 0.2 * torch.randn(H, generator=g, device=device)
    ref = [t.double().requires_grad_() for t in (q, k, v, w0)]
    qq, kk, vv, ww = ref
    pos = torch.arange(L, dtype=torch.float64, device=device)
    s = qq @ kk.transpose(-1, -2) / math.sqrt(D) \
        + ww[None, :, None, None] * (pos[:, None] - pos[None, :])
    s = s.masked_fill(pos[:, None] < pos[None, :], -math.inf)
    (torch.softmax(s, -1) @ vv).backward(do.double())
    return (q, k, v, do, w0), [t.grad for t in ref]


def _rel(a, b) -> float:
    return float((a.double() - b).abs().max() / b.abs().max())


def _check(got, want, *, slope_tol):
    """The slope's gradient within ``slope_tol`` (relative to its largest entry) of the
    reference; dq, dk, dv within bf16's rounding of theirs."""
    dq, dk, dv, dw = got
    assert _rel(dw, want[3]) < slope_tol, (_rel(dw, want[3]), dw, want[3])
    for what, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), want[:3]):
        torch.testing.assert_close(a.double(), b, atol=2e-2, rtol=2e-2, msg=what)


def _grads(pat, inputs, **kw):
    q, k, v, do, w0 = inputs
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + [w0.clone().requires_grad_()]
    o = pat(*leaves[:3], w=leaves[3], **kw)
    return o, torch.autograd.grad(o, leaves, do)


@pytest.mark.interpreter
@pytest.mark.parametrize("L", [256], ids=["B1-H2-L256-D16-bf16"])
def test_triton_bf16_slope_gradient_as_exact_as_torch(L):
    """Both backends' slope gradients within 1e-5 of the float64 reference (the torch path's
    own accuracy here is ~2e-6; from the 16-bit output's delta the Triton one was 6e-3 off),
    and the Triton one within 1e-5 of the torch one."""
    inputs, want = _slope_case(L)
    _, tri = _grads(spattn.compile("causal", score=SLOPE, backend="triton"), inputs)
    _, tor = _grads(spattn.compile("causal", score=SLOPE, backend="torch"), inputs)
    _check(tri, want, slope_tol=1e-5)
    _check(tor, want, slope_tol=1e-5)
    assert _rel(tri[3], tor[3].double()) < 1e-5


@pytest.mark.interpreter
def test_fp32_output_kept_only_when_a_table_needs_a_gradient():
    """The Triton forward of a 16-bit call keeps the fp32 output for the backward (saved by
    the autograd function, its 16-bit cast returned) only when a table requires grad; the
    returned output is the fp32 one rounded."""
    inputs, _ = _slope_case(32)
    pat = spattn.compile("causal", score=SLOPE, backend="triton")
    q, k, v, do, w0 = inputs
    qg = q.clone().requires_grad_()
    o_plain = pat(qg, k, v, w=w0)
    assert o_plain.dtype == torch.bfloat16
    assert o_plain.grad_fn.saved_tensors[3].dtype == torch.bfloat16
    o = pat(qg, k, v, w=w0.clone().requires_grad_())
    saved = o.grad_fn.saved_tensors[3]
    assert o.dtype == torch.bfloat16 and saved.dtype == torch.float32
    assert torch.equal(saved.to(torch.bfloat16), o) and torch.equal(o, o_plain)
    assert not torch.equal(saved, o.float())        # the fp32 copy is not the rounded one


@pytest.mark.interpreter
def test_backward_from_a_16_bit_output_recomputes_it_in_fp32():
    """The custom op's backward receives only the 16-bit output: ``scores.run_bwd``
    recomputes the fp32 output with the forward kernel, and the slope's gradient is as
    exact as from the saved copy."""
    inputs, want = _slope_case(128)
    q, k, v, do, w0 = inputs
    pat = spattn.compile("causal", score=SLOPE, backend="triton")
    plan = pat.plan(q, k, v, w=w0)
    c = S.Ctx(pat, "triton", 1 / math.sqrt(16), 0, {}, ("w",), plan=plan)
    o, lse = S.run_fwd(c, q, k, v, {"w": w0})
    assert o.dtype == torch.bfloat16
    dq, dk, dv, tg = S.run_bwd(c, q, k, v, o, lse, do, {"w": w0}, None, ("w",))
    _check((dq, dk, dv, tg["w"]), want, slope_tol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("L", [1024, 4096], ids=["B1-H2-L1024-D16-bf16", "B1-H2-L4096-D16-bf16"])
def test_gpu_bf16_slope_gradient(L):
    """On the GPU (bf16 MMAs): the slope's gradient within 1e-4 of the float64 reference."""
    inputs, want = _slope_case(L, device="cuda")
    _, got = _grads(spattn.compile("causal", score=SLOPE, backend="triton"), inputs)
    dq, dk, dv, dw = got
    assert _rel(dw, want[3]) < 1e-4, (_rel(dw, want[3]), dw, want[3])
    for what, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), want[:3]):
        torch.testing.assert_close(a.double(), b, atol=3e-2, rtol=3e-2, msg=what)
