"""The block-sparse torch backend: outputs and gradients against the float64 reference.

Every case runs ``pattern(q, k, v)`` with ``backend="torch"`` on fresh random
float32 tensors, backpropagates a random upstream gradient, and compares o, lse,
dq, dk and dv element by element with float64 autograd through
``attention_reference`` on the pattern's dense mask (relative error < 1e-3); each of
the plan's strategies is also checked in float64 (to 1e-10).
"""
import pytest
import torch

import spattn
from spattn.runtime import torch_backend
from spattn.runtime.reference import attention_reference

RTOL = 1e-3


def _close(name, got, want, rtol=RTOL):
    got = got.detach().to(torch.float64)
    want = want.detach().to(torch.float64)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert not torch.isnan(got).any(), f"{name} has NaN"
    inf_w = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf_w), f"{name}: -inf in different places"
    assert torch.equal(got[inf_w], want[inf_w]), f"{name}: infinities differ"
    g, w = got[~inf_w], want[~inf_w]
    if w.numel() == 0:
        return
    scale = max(float(w.abs().max()), 1e-2)   # floor: exact zeros computed as ~1e-7
    torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


def check_with_reference(o, lse, q, k, v, mask, g, grads=True):
    """``o``, ``lse`` of a call on ``q, k, v`` against the float64 reference of ``mask``,
    and, with ``grads``, dq, dk, dv after a backward of a fresh random dO."""
    q64, k64, v64 = (t.detach().double().requires_grad_(grads) for t in (q, k, v))
    ro, rl = attention_reference(q64, k64, v64, mask)
    _close("o", o, ro)
    _close("lse", lse, rl)
    if grads:
        do = torch.randn(o.shape, generator=g)
        (o * do).sum().backward()
        (ro * do.double()).sum().backward()
        for name, a, b in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
            _close(name, a.grad, b.grad)


def make_inputs(kind, B, H, Lq, Lk, g):
    if kind is None:
        return {}
    if kind == "doc":
        # documents of random lengths, different per batch: doc[b, position]
        n = max(Lq, Lk)
        cuts = torch.rand(B, n, generator=g) < 0.04
        return {"doc": cuts.cumsum(-1)}
    if kind == "blocks":
        nb = (max(Lq, Lk) + 31) // 32 + 1
        return {"blocks": (torch.rand(nb, nb, generator=g) < 0.4).to(torch.int32)}
    if kind == "blocks-bh":
        nb = (max(Lq, Lk) + 31) // 32 + 1
        return {"blocks": (torch.rand(B, H, nb, nb, generator=g) < 0.5)}
    raise ValueError(kind)


def check(pattern, *, B=2, Hq=4, Hk=None, Lq=100, Lk=None, D=32, dtype=torch.float32,
          q_offset=None, inputs=None, seed=0, scale=None, rtol=RTOL, grads=True,
          layout="contiguous"):
    Hk = Hq if Hk is None else Hk
    Lk = Lq if Lk is None else Lk
    g = torch.Generator().manual_seed(seed)
    ins = make_inputs(inputs, B, Hq, Lq, Lk, g)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if layout == "transposed":      # [B, L, H, D] storage seen as [B, H, L, D]
        q = rnd(B, Lq, Hq, D).transpose(1, 2)
        k = rnd(B, Lk, Hk, D).transpose(1, 2)
        v = rnd(B, Lk, Hk, D).transpose(1, 2)
    else:
        q, k, v = rnd(B, Hq, Lq, D), rnd(B, Hk, Lk, D), rnd(B, Hk, Lk, D)
    q.requires_grad_(grads)
    k.requires_grad_(grads)
    v.requires_grad_(grads)
    o, lse = pattern(q, k, v, return_lse=True, q_offset=q_offset, scale=scale, **ins)
    assert o.dtype == dtype and lse.dtype == torch.float32
    mask = pattern.mask(Lq, Lk, num_heads=Hq, batch=B, q_offset=q_offset, **ins)
    q64, k64, v64 = (t.detach().to(torch.float64).requires_grad_(grads) for t in (q, k, v))
    ro, rl = attention_reference(q64, k64, v64, mask, scale=scale)
    _close("o", o, ro, rtol)
    _close("lse", lse, rl, rtol)
    if grads:
        do = torch.randn(o.shape, generator=g).to(dtype)
        (o * do).sum().backward()
        (ro * do.to(torch.float64)).sum().backward()
        for name, a, b in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
            _close(name, a.grad, b.grad, rtol)
    return mask


# (id, source, params, inputs kind)
PATTERNS = [
    ("full", "full", {}, None),
    ("causal", "causal", {}, None),
    ("window", "window(W)", {"W": 16}, None),
    ("local", "local(12, 5)", {}, None),
    ("sink", "sink(3)", {}, None),
    ("global", "global_tokens(5)", {}, None),
    ("prefix_lm", "prefix_lm(20)", {}, None),
    ("dilated", "dilated(8, 3)", {}, None),
    ("strided", "strided(16)", {}, None),
    ("fixed", "fixed(16, 4)", {}, None),
    ("chunked", "chunked(24)", {}, None),
    ("power2", "power2(8)", {}, None),
    ("streaming", "causal & (window(16) | sink(2))", {}, None),
    ("longformer", "local(10, 10) | global_tokens(4)", {}, None),
    ("documents", "causal & same(doc)", {}, "doc"),
    ("blocks", "blocks[q // 32, k // 32]", {}, "blocks"),
    ("blocks-per-bh", "causal & blocks[q // 32, k // 32]", {}, "blocks-bh"),
    ("per-head", "causal & q - k < W[h]", {"W": [4, 16, 40, 200]}, None),
    ("per-head-strided", "causal & (q - k) % S[h] == 0", {"S": [1, 2, 3, 7]}, None),
]


@pytest.mark.parametrize("src,params,inputs", [p[1:] for p in PATTERNS],
                         ids=[f"B2-H4-L150-D32-fp32-{p[0]}" for p in PATTERNS])
def test_prelude_patterns_fwd_bwd(src, params, inputs):
    pat = spattn.compile(src, backend="torch", **params)
    check(pat, B=2, Hq=4, Lq=150, D=32, inputs=inputs, seed=hash(src) % 1000)


SHAPES = [
    # id, pattern, kwargs for check
    ("B1-Hq4-Hk1-L130-D32-fp32-mqa-window", "window(20)", dict(B=1, Hq=4, Hk=1, Lq=130)),
    ("B2-Hq4-Hk2-L100-D16-fp32-gqa-causal", "causal", dict(B=2, Hq=4, Hk=2, Lq=100, D=16)),
    ("B1-H2-Lq70-Lk150-D32-fp32-causal", "causal", dict(B=1, Hq=2, Lq=70, Lk=150)),
    ("B1-H2-Lq150-Lk70-D32-fp32-causal-masked-rows", "causal", dict(B=1, Hq=2, Lq=150, Lk=70)),
    ("B1-H2-Lq1-Lk90-D32-fp32-decode-window", "window(30)", dict(B=1, Hq=2, Lq=1, Lk=90)),
    ("B1-H2-L100-D32-fp32-qoffset30-window", "window(40)",
     dict(B=1, Hq=2, Lq=100, Lk=100, q_offset=30)),
    ("B1-H2-Lq60-Lk100-D32-fp32-qoffset-neg-causal", "causal",
     dict(B=1, Hq=2, Lq=60, Lk=100, q_offset=-25)),
    ("B2-H2-L127-D32-fp32-odd-streaming", "causal & (window(9) | sink(3))", dict(B=2, Hq=2, Lq=127)),
    ("B1-H3-L65-Lk63-D32-fp32-odd-local", "local(7, 2)", dict(B=1, Hq=3, Lq=65, Lk=63)),
    ("B1-H1-L1-D32-fp32-single", "causal", dict(B=1, Hq=1, Lq=1)),
    ("B1-H2-L96-D80-fp32-d80-causal", "causal", dict(B=1, Hq=2, Lq=96, D=80)),
    ("B1-H2-L70-D32-fp32-scale", "window(10)", dict(B=1, Hq=2, Lq=70, scale=0.05)),
    ("B2-Hq4-Hk2-L90-D32-fp32-transposed-layout", "causal & window(33)",
     dict(B=2, Hq=4, Hk=2, Lq=90, layout="transposed")),
    ("B1-Hq4-Hk2-Lq80-Lk120-D32-fp32-gqa-docs", "causal & same(doc)",
     dict(B=1, Hq=4, Hk=2, Lq=80, Lk=120, inputs="doc")),
]


@pytest.mark.parametrize("src,kw", [s[1:] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_shapes_fwd_bwd(src, kw):
    pat = spattn.compile(src, backend="torch")
    check(pat, **kw)


def test_fully_masked_rows_zero_output_lse_minus_inf_zero_grads():
    # causal with q_offset=-20: query rows 0..19 sit before every key
    pat = spattn.compile("causal", backend="torch")
    mask = check(pat, B=1, Hq=2, Lq=80, Lk=80, q_offset=-20)
    assert not mask[0, 0, :20].any() and mask[0, 0, 20:].any(-1).all()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 80, 32, generator=g, requires_grad=True) for _ in range(3))
    o, lse = pat(q, k, v, return_lse=True, q_offset=-20)
    assert torch.equal(o[:, :, :20], torch.zeros_like(o[:, :, :20]))
    assert torch.isneginf(lse[:, :, :20]).all() and torch.isfinite(lse[:, :, 20:]).all()
    (o * torch.randn(o.shape, generator=g)).sum().backward()
    assert torch.equal(q.grad[:, :, :20], torch.zeros_like(q.grad[:, :, :20]))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


def test_pattern_that_masks_everything():
    pat = spattn.compile("causal & k >= 200", backend="torch")
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 70, 16, generator=g, requires_grad=True) for _ in range(3))
    o, lse = pat(q, k, v, return_lse=True)
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(lse).all()
    o.sum().backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t.grad))


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)],
                         ids=["fp16", "bf16"])
def test_half_precision(dtype, rtol):
    pat = spattn.compile("causal & (window(24) | sink(2))", backend="torch")
    check(pat, B=1, Hq=2, Lq=100, D=32, dtype=dtype, rtol=rtol)


STRATEGY_CASES = [
    # id, source, inputs kind, kwargs for the tensors
    ("B2-Hq4-Hk2-L111-D16-f64-docs-window", "causal & same(doc) & q - k < 50", "doc",
     dict(B=2, Hq=4, Hk=2, L=111)),
    ("B1-Hq4-Hk4-L300-D16-f64-window", "causal & window(70)", None, dict(B=1, Hq=4, Hk=4, L=300)),
    ("B2-Hq2-Hk1-L200-D16-f64-sink-window", "causal & (window(20) | sink(3))", None,
     dict(B=2, Hq=2, Hk=1, L=200)),
    ("B1-Hq2-Hk2-L333-D16-f64-docs", "causal & same(doc)", "doc", dict(B=1, Hq=2, Hk=2, L=333)),
    ("B1-Hq4-Hk2-L200-D16-f64-per-head-gqa", "causal & q - k < W[h]", None,
     dict(B=1, Hq=4, Hk=2, L=200, W=[5, 30, 90, 150])),
    ("B2-Hq4-Hk2-L150-D16-f64-per-head-docs", "causal & same(doc) & q - k < W[h]", "doc",
     dict(B=2, Hq=4, Hk=2, L=150, W=[5, 30, 90, 150])),
]


@pytest.mark.parametrize("strategy", ["band", "dense", "segments", "tiles"])
@pytest.mark.parametrize("src,inputs,kw", [c[1:] for c in STRATEGY_CASES],
                         ids=[c[0] for c in STRATEGY_CASES])
def test_every_strategy_matches_the_reference_in_float64(src, inputs, kw, strategy):
    """Each way of covering the tiles gives the same o, lse and gradients (lse gradient
    included) as the dense float64 reference, to 1e-10."""
    pat = spattn.compile(src, backend="torch", **({"W": kw["W"]} if "W" in kw else {}))
    g = torch.Generator().manual_seed(len(src) + len(strategy))
    B, Hq, Hk, L, D = kw["B"], kw["Hq"], kw["Hk"], kw["L"], 16
    q = torch.randn(B, Hq, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hk, L, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hk, L, D, generator=g, dtype=torch.float64)
    ins = make_inputs(inputs, B, Hq, L, L, g)
    try:
        plan = torch_backend.make_plan(pat, q, k, q_offset=None, inputs=ins, strategy=strategy)
    except ValueError:
        assert strategy == "segments" and inputs is None       # no documents: no segments
        return
    assert plan.strategy == strategy or (strategy == "band" and plan.strategy == "dense")
    scale = D ** -0.5
    o, lse = torch_backend.fwd_planned(plan, q, k, v, scale=scale)
    mask = pat.mask(L, L, num_heads=Hq, batch=B, **ins)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ro, rl = attention_reference(qr, kr, vr, mask, scale=scale)
    torch.testing.assert_close(o, ro.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, rl.detach(), rtol=1e-10, atol=1e-10)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64)
    dl = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    ((ro * do).sum() + (torch.where(torch.isfinite(rl), rl, 0) * dl).sum()).backward()
    grads = torch_backend.bwd_planned(plan, q, k, v, o, lse, do, scale=scale, dlse=dl)
    for name, a, b in zip(("dq", "dk", "dv"), grads, (qr.grad, kr.grad, vr.grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_work_follows_the_pattern(monkeypatch):
    """A window pattern computes O(L x window) scores, in one kernel call, not O(L^2)."""
    seen = []
    orig = torch_backend._attend

    def spy(q, k, v, mask, scale, is_causal):
        seen.append((q.shape[0] * q.shape[2], k.shape[2]))
        return orig(q, k, v, mask, scale, is_causal)

    monkeypatch.setattr(torch_backend, "_attend", spy)
    pat = spattn.compile("window(32)", backend="torch")
    L = 2048
    q, k, v = (torch.randn(1, 1, L, 16) for _ in range(3))
    q.requires_grad_()
    pat(q, k, v).sum().backward()
    assert len(seen) == 1
    rows, keys = seen[0]
    assert rows == L and keys <= 3 * torch_backend.BLOCK


# ------------------------------------------------------------ on the GPU

GPU_CASES = [
    ("window", "causal & window(256)", None),
    ("documents", "causal & same(doc)", "doc"),
    ("per-head", "causal & q - k < W[h]", {"W": [64, 512]}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,src,extra", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_torch_backend_on_cuda(name, src, extra, dtype):
    """The torch backend on CUDA tensors (N=4096, GQA 2:1): fwd and grads vs float64."""
    N, Hq, Hk, D = 4096, 2, 1, 64
    params = extra if isinstance(extra, dict) else {}
    pat = spattn.compile(src, backend="torch", **params)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, Hq, N, D, device="cuda", generator=g).to(dtype).requires_grad_()
    k = torch.randn(1, Hk, N, D, device="cuda", generator=g).to(dtype).requires_grad_()
    v = torch.randn(1, Hk, N, D, device="cuda", generator=g).to(dtype).requires_grad_()
    ins = {}
    if extra == "doc":
        ins = {"doc": torch.sort(torch.randint(0, 9, (N,), device="cuda", generator=g)).values}
    o, lse = pat(q, k, v, return_lse=True, **ins)
    assert o.device.type == "cuda" and o.dtype == dtype
    do = torch.randn(o.shape, device="cuda", generator=g).to(dtype)
    (o * do).sum().backward()
    mask = pat.mask(N, N, num_heads=Hq, device="cuda", **ins)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = attention_reference(q64, k64, v64, mask)
    (ro * do.double()).sum().backward()
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    for what, a, b in (("o", o, ro), ("lse", lse, rl), ("dq", q.grad, q64.grad),
                       ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        a, b = a.detach().double(), b.detach()
        assert torch.isfinite(a).all(), what
        err = float((a - b).norm() / b.norm())
        assert err < tol, f"{what}: rel. error {err:.2e}"
        if dtype == torch.float32:
            _close(what, a, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("scale", [1e-30, 1e-45, 1e-300])
def test_scales_below_float32_normals(backend, scale):
    """A scale below float32's smallest normal number is 0 (or a flushed subnormal) in
    float32, and a masked score's ``-inf * 0`` NaN: both backends compute with the scale
    floored at ``2**-126`` (the softmax is the same to float32 precision: each row averages
    what it sees), forward and backward, as the float64 reference does with the scale given."""
    from spattn.runtime.reference import pattern_reference
    p = spattn.compile("causal & window(5) & doc[q] == doc[k]", backend=backend)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=g).requires_grad_() for _ in range(3))
    doc = torch.arange(24) // 7
    o, lse = p(q, k, v, scale=scale, doc=doc, return_lse=True)
    grads = torch.autograd.grad(o.square().sum(), (q, k, v))
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro, rl = pattern_reference(p, *ref, scale=scale, doc=doc)
    want = torch.autograd.grad(ro.square().sum(), ref)
    torch.testing.assert_close(o.double(), ro, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), rl, atol=1e-5, rtol=1e-4)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)
