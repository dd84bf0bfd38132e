"""Autograd plumbing: the autograd.Function, the custom ops, lse gradients."""
import pytest
import torch

import spattn
from spattn.runtime import autograd as ag
from spattn.runtime.reference import attention_reference


def _rand(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g, dtype=dtype)


def _ref(pat, q, k, v, q_offset=None, **inputs):
    B, Hq, Lq, _ = q.shape
    mask = pat.mask(Lq, k.shape[2], num_heads=Hq, batch=B, q_offset=q_offset, **inputs)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o, lse = attention_reference(q64, k64, v64, mask)
    return (q64, k64, v64), o, lse


def _finite(x):
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def test_gradient_of_lse_and_output():
    pat = spattn.compile("causal & window(20)", backend="torch")
    g = torch.Generator().manual_seed(1)
    q = _rand(g, 1, 2, 70, 16).requires_grad_()
    k = _rand(g, 1, 2, 90, 16).requires_grad_()
    v = _rand(g, 1, 2, 90, 16).requires_grad_()
    o, lse = pat(q, k, v, return_lse=True, q_offset=-5)   # rows 0..4 fully masked
    assert torch.isneginf(lse[:, :, :5]).all()
    do, dl = _rand(g, *o.shape), _rand(g, *lse.shape)
    ((o * do).sum() + (_finite(lse) * dl).sum()).backward()
    (q64, k64, v64), ro, rl = _ref(pat, q, k, v, q_offset=-5)
    ((ro * do.double()).sum() + (_finite(rl) * dl.double()).sum()).backward()
    for a, b in ((q, q64), (k, k64), (v, v64)):
        assert torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-3,
                                   atol=1e-3 * float(b.grad.abs().max()))


def test_gradient_of_lse_only():
    pat = spattn.compile("local(8, 8)", backend="torch")
    g = torch.Generator().manual_seed(2)
    q, k, v = (_rand(g, 1, 2, 50, 16).requires_grad_() for _ in range(3))
    _, lse = pat(q, k, v, return_lse=True)
    lse.sum().backward()
    (q64, k64, v64), _, rl = _ref(pat, q, k, v)
    rl.sum().backward()
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(k.grad.double(), k64.grad, rtol=1e-3, atol=1e-5)
    assert torch.equal(v.grad, torch.zeros_like(v.grad))


def test_grad_only_for_some_arguments():
    pat = spattn.compile("causal", backend="torch")
    g = torch.Generator().manual_seed(3)
    q = _rand(g, 1, 2, 40, 16).requires_grad_()
    k, v = _rand(g, 1, 2, 40, 16), _rand(g, 1, 2, 40, 16)
    pat(q, k, v).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    assert k.grad is None and v.grad is None


def test_no_grad_mode_and_integer_inputs_get_no_grad():
    pat = spattn.compile("causal & same(doc)", backend="torch")
    g = torch.Generator().manual_seed(4)
    q, k, v = (_rand(g, 1, 2, 40, 16).requires_grad_() for _ in range(3))
    doc = torch.arange(40) // 13
    with torch.no_grad():
        o = pat(q, k, v, doc=doc)
    assert not o.requires_grad
    o = pat(q, k, v, doc=doc)
    assert o.requires_grad and o.grad_fn is not None
    o.sum().backward()
    assert doc.grad is None


def test_registry_lookup():
    pat = spattn.compile("causal & window(7)", backend="torch")
    key = ag.register(pat)
    assert key == pat.source and ag.lookup(key) == pat
    # a canonical source never seen in this process (a saved graph) compiles again
    other = spattn.compile("chunked(5) & k >= 3")
    ag._REGISTRY.pop(other.source, None)
    assert ag.lookup(other.source) == other
    with pytest.raises(spattn.SpattnError, match="no pattern is registered"):
        ag.lookup("this is ] not a pattern")


def test_custom_op_eager_matches_function_path():
    pat = spattn.compile("causal & (window(9) | sink(2)) & same(doc)", backend="torch")
    key = ag.register(pat)
    g = torch.Generator().manual_seed(5)
    B, H, L, D = 2, 2, 70, 16
    q, k, v = (_rand(g, B, H, L, D).requires_grad_() for _ in range(3))
    doc = (torch.rand(L, generator=g) < 0.1).cumsum(0)
    o1, l1 = pat(q, k, v, return_lse=True, doc=doc)
    do = _rand(g, *o1.shape)
    g1 = torch.autograd.grad((o1 * do).sum(), (q, k, v))
    o2, l2 = torch.ops.spattn.attention(q, k, v, [doc], key, D ** -0.5, 0, "torch", [])
    g2 = torch.autograd.grad((o2 * do).sum(), (q, k, v))
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(l1, l2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_custom_op_opcheck():
    pat = spattn.compile("causal & same(doc)", backend="torch")
    key = ag.register(pat)
    g = torch.Generator().manual_seed(6)
    q, k, v = (_rand(g, 1, 2, 33, 16).requires_grad_() for _ in range(3))
    doc = torch.arange(33) // 10
    torch.library.opcheck(torch.ops.spattn.attention.default,
                          (q, k, v, [doc], key, 0.25, 0, "torch", []))
    scale_t = [torch.tensor(0.25, dtype=torch.float64)]     # the traced form (op_scale)
    torch.library.opcheck(torch.ops.spattn.attention.default,
                          (q, k, v, [doc], key, 1.0, 0, "torch", scale_t))
    o, lse = torch.ops.spattn.attention(q, k, v, [doc], key, 0.25, 0, "torch", [])
    do = _rand(g, *o.shape)
    for scale, st in ((0.25, []), (1.0, scale_t)):
        torch.library.opcheck(torch.ops.spattn.attention_bwd.default,
                              (q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), do,
                               None, [doc], key, scale, 0, "torch", st))


def _lse_loss_grads(pat, q, k, v, do, dl, **kw):
    """Gradients of q, k, v of ``sum(o * do) + sum(lse * dl)`` (fully masked rows' lse,
    -inf, left out), and the output, for a call of ``pat`` and for the float64 reference."""
    from spattn.runtime.reference import pattern_reference
    ins = {n: t for n, t in kw.items() if n != "order"}
    out = []
    for leaves, fn in (([t.clone().requires_grad_() for t in (q, k, v)],
                        lambda a, b, c: pat(a, b, c, return_lse=True, **kw)),
                       ([t.double().requires_grad_() for t in (q, k, v)],
                        lambda a, b, c: pattern_reference(pat, a, b, c, **ins))):
        o, lse = fn(*leaves)
        fin = torch.isfinite(lse)
        loss = (o * do.to(o.dtype)).sum() + (lse.masked_fill(~fin, 0) * dl.to(lse.dtype)).sum()
        out.append((o, fin, torch.autograd.grad(loss, leaves)))
    return out


LSE_GRAD_CASES = [
    pytest.param("causal & window(20)", None, {}, {}, id="window-B2-Hq4-Hk2-L70"),
    pytest.param("causal & same(doc)", None, {"doc": True}, {}, id="documents-L70"),
    pytest.param("causal", "softcap(3.0)", {}, {}, id="softcap-score"),
    pytest.param("causal", "s + rel[h, q - k + 69]", {"rel": True}, {}, id="table-score"),
    pytest.param("causal & window(20)", None, {}, {"SPATTN_BWD_DQ": "atomic"},
                 id="window-atomic-dq"),
    pytest.param("causal & window(9)", None, {"order": True},
                 {"SPATTN_LAYOUT_GATHER": "kernel"}, id="order-row-tables"),
    pytest.param("causal & window(9)", None, {"order": True},
                 {"SPATTN_LAYOUT_GATHER": "copy"}, id="order-copies"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("src, score, inputs, env", LSE_GRAD_CASES)
def test_triton_backward_takes_the_lse_gradient(src, score, inputs, env, monkeypatch):
    """A loss on the returned lse: the Triton backward's kernels read its gradient (the
    ``lse_grad`` stage: delta - dlse in the row statistics), every gradient against
    float64, with no fall-back (a warning would fail the test)."""
    import warnings
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    pat = spattn.compile(src, score=score, backend="triton")
    g = torch.Generator().manual_seed(7)
    B, Hq, Hk, L, D = 2, 4, 2, 70, 32
    q, do = _rand(g, B, Hq, L, D), _rand(g, B, Hq, L, D)
    k, v = _rand(g, B, Hk, L, D), _rand(g, B, Hk, L, D)
    dl = _rand(g, B, Hq, L) * 3
    kw = {}
    if "doc" in inputs:
        kw["doc"] = (torch.rand(L, generator=g) < 0.1).cumsum(0)
    if "rel" in inputs:
        kw["rel"] = _rand(g, Hq, 2 * L - 1)
    if "order" in inputs:
        kw["order"] = torch.randperm(L, generator=g)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="spattn")
        (o, fin, grads), (ro, rfin, rgrads) = _lse_loss_grads(pat, q, k, v, do, dl, **kw)
    assert torch.equal(fin, rfin)
    torch.testing.assert_close(o.double(), ro, atol=2e-5, rtol=2e-5)
    for name, a, b in zip(("dq", "dk", "dv"), grads, rgrads):
        torch.testing.assert_close(a.double(), b, atol=5e-5, rtol=5e-5, msg=name)


@pytest.mark.interpreter
def test_lse_gradient_stage_is_its_own():
    """The plan keeps the lse-gradient stage beside the plain one: the kernel module with
    DLSE, and the plain stage's kernels unchanged (their key has no lse_grad)."""
    from spattn.runtime.plan import build_plan
    pat = spattn.compile("causal & window(12)", backend="triton")
    g = torch.Generator().manual_seed(8)
    q, k, v = (_rand(g, 1, 2, 40, 16) for _ in range(3))
    plan = build_plan(pat, "triton", q, k, v, scale=0.25, q_offset=0, inputs={})
    plan.prepare_backward(q, k, v, lse_grad=True)       # (what a CUDA graph capture needs)
    assert len(plan._bwd) == 1
    o = torch.empty_like(q)
    plain = plan.backward_stage(q, k, v, o, o)
    with_dlse = plan.backward_stage(q, k, v, o, o, lse_grad=True)
    assert len(plan._bwd) == 2
    assert plain is not with_dlse and plan.backward_stage(q, k, v, o, o) is plain
    assert not plain.config.lse_grad and with_dlse.config.lse_grad
    assert "lse_grad" not in plain.config.as_dict()
    assert "DLSE" in with_dlse.dq_kernel.arg_names and "DLSE" not in plain.dq_kernel.arg_names


TWICE_CASES = [
    pytest.param("torch", None, {}, id="torch-mask"),
    pytest.param("torch", "softcap(5.0)", {}, id="torch-score"),
    pytest.param("torch", "s + rel[h, q - k + 31]", {"rel": True}, id="torch-table-score"),
    pytest.param("triton", None, {}, marks=pytest.mark.interpreter, id="triton-mask"),
    pytest.param("triton", "softcap(5.0)", {}, marks=pytest.mark.interpreter,
                 id="triton-score"),
    pytest.param("triton", "s + rel[h, q - k + 31]", {"rel": True},
                 marks=pytest.mark.interpreter, id="triton-table-score"),
]


@pytest.mark.parametrize("backend, score, inputs", TWICE_CASES)
def test_a_gradient_differentiated_again_is_refused(backend, score, inputs):
    """The backward is differentiable once: a gradient taken with ``create_graph=True``
    and differentiated again (a gradient penalty in the loss, ``autograd.grad`` of it with
    respect to q, k, v or a table, even with ``allow_unused=True``) raises a
    SpattnBackendError, never a gradient without a graph (a penalty added to the loss
    would vanish from its backward) nor a None under ``allow_unused`` (read as 0). The
    first-order gradients through the same code stay those of float64."""
    from spattn.dsl.errors import SpattnBackendError
    from spattn.runtime.reference import pattern_reference
    pat = spattn.compile("causal & window(12)", score=score, backend=backend)
    g = torch.Generator().manual_seed(11)
    q, k, v = (_rand(g, 1, 2, 32, 16).requires_grad_() for _ in range(3))
    kw = {"rel": _rand(g, 2, 63).requires_grad_()} if "rel" in inputs else {}
    leaves = (q, k, v, *kw.values())
    o = pat(q, k, v, **kw)
    gq, = torch.autograd.grad((o * o).sum(), q, create_graph=True)
    assert gq.requires_grad
    for x in leaves:
        with pytest.raises(SpattnBackendError, match="differentiable once"):
            torch.autograd.grad(gq.sum(), x, allow_unused=True, retain_graph=True)
    with pytest.raises(SpattnBackendError, match="differentiable once"):
        (o.sum() + (gq.norm() - 1) ** 2).backward()
    # the same first-order gradients as float64 (create_graph or not)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    ro = pattern_reference(pat, *ref[:3], **dict(zip(kw, ref[3:])))[0]
    rq, = torch.autograd.grad((ro * ro).sum(), ref[0])
    torch.testing.assert_close(gq.detach().double(), rq, atol=2e-4, rtol=2e-4)


INPLACE_CASES = [
    pytest.param(backend, score, dt, det,
                 marks=[pytest.mark.interpreter] if backend == "triton" else [],
                 id=f"{backend}-{'score' if score else 'mask'}-{str(dt)[6:]}"
                    + ("-deterministic" if det else ""))
    for backend in ("torch", "triton")
    for score, det in ((None, False), ("s + rel[h, q - k + 47]", False),
                       ("s + rel[h, q - k + 47]", True))
    for dt in (torch.int32, torch.int64)
]


@pytest.mark.parametrize("backend, score, dtype, deterministic", INPLACE_CASES)
def test_inputs_written_in_place_after_the_forward(backend, score, dtype, deterministic):
    """A runtime input written in place between the forward and the backward: the
    gradients are those of the mask the forward computed, not of the mask the written
    values make, checked against float64 with the forward's values (the torch backend's
    scored backward evaluates the mask again, from the copies its forward kept)."""
    from spattn.runtime.reference import pattern_reference
    pat = spattn.compile("causal & same(doc)", score=score, backend=backend)
    g = torch.Generator().manual_seed(12)
    L = 48
    doc = torch.tensor([0] * 10 + [1] * 20 + [2] * 18, dtype=dtype)
    q, k, v = (_rand(g, 1, 2, L, 16).requires_grad_() for _ in range(3))
    kw = {"rel": _rand(g, 2, 2 * L - 1).requires_grad_()} if score else {}
    o = pat(q, k, v, doc=doc, deterministic=deterministic, **kw)
    do = _rand(g, *o.shape)
    before = doc.clone()
    doc[5:25] = 7
    o.backward(do)
    leaves = (q, k, v, *kw.values())
    ref = [t.detach().double().requires_grad_() for t in leaves]
    ro = pattern_reference(pat, *ref[:3], doc=before, **dict(zip(kw, ref[3:])))[0]
    ro.backward(do.double())
    for name, a, b in zip(("dq", "dk", "dv", "drel"), leaves, ref):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-5, rtol=2e-5, msg=name)


OUTPUT_CASES = [
    pytest.param(backend, src, score,
                 marks=[pytest.mark.interpreter] if backend == "triton" else [],
                 id=f"{backend}-{name}")
    for backend in ("torch", "triton")
    for name, src, score in (("causal", "causal", None), ("window", "causal & window(8)", None),
                             ("alibi", "causal", "s - 0.1 * float(q - k)"))
]


@pytest.mark.parametrize("backend, src, score", OUTPUT_CASES)
def test_outputs_written_in_place_as_sdpa_outputs(backend, src, score):
    """``o += x`` and ``lse.mul_(2)`` on outputs that require grad work as on SDPA's
    output (the torch backend's outputs are views of its buffers, which autograd refuses
    to write in place when a Function returns them); a backward that needs the written
    output then gets torch's own version error, and one taken before the write matches
    float64."""
    from spattn.runtime.reference import pattern_reference
    pat = spattn.compile(src, score=score, backend=backend)
    g = torch.Generator().manual_seed(5)
    q, k, v = (_rand(g, 1, 2, 40, 16).requires_grad_() for _ in range(3))
    o, lse = pat(q, k, v, return_lse=True)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = pattern_reference(pat, *ref)[0]
    torch.testing.assert_close(o.detach().double(), want.detach(), atol=2e-5, rtol=2e-5)
    do = _rand(g, *o.shape)
    o.backward(do, retain_graph=True)
    want.backward(do.double())
    for a, b in zip((q, k, v), ref):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-5, rtol=2e-5)
    want = want.detach()
    o += 1.0
    lse.mul_(2.0)
    torch.testing.assert_close(o.detach().double(), want + 1.0, atol=2e-5, rtol=2e-5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        o.backward(do)


F64_CASES = [
    pytest.param("causal & window(8)", None, {}, id="window"),
    pytest.param("causal & same(doc)", None, {"doc": True}, id="documents"),
    pytest.param("causal", "softcap(5.0)", {}, id="softcap"),
    pytest.param("causal & window(8)", "s + rel[h, q - k + 23]", {"rel": True},
                 id="learned-table"),
    pytest.param(None, None, {}, id="neighbourhood-layout"),
]


@pytest.mark.parametrize("src, score, inputs", F64_CASES)
def test_float64_calls_on_the_torch_backend_pass_gradcheck(src, score, inputs):
    """float64 q, k, v (and tables) through the public call on the torch backend: the
    output within 1e-12 of the float64 reference, and ``torch.autograd.gradcheck`` of the
    call with respect to q, k, v and a learnable table (issue #22's float64 check)."""
    from spattn.runtime.reference import pattern_reference
    pat = spattn.neighborhood((4, 6), (3, 3), backend="torch") if src is None else \
        spattn.compile(src, score=score, backend="torch")
    g = torch.Generator().manual_seed(13)
    q, k, v = (_rand(g, 1, 2, 24, 4, dtype=torch.float64).requires_grad_() for _ in range(3))
    kw = {}
    if "doc" in inputs:
        kw["doc"] = torch.tensor([0] * 9 + [1] * 15)
    if "rel" in inputs:
        kw["rel"] = _rand(g, 2, 47, dtype=torch.float64).requires_grad_()
    o, lse = pat(q, k, v, return_lse=True, **kw)
    assert o.dtype == torch.float64 and lse.dtype == torch.float64
    ref = pattern_reference(pat, *(t.detach() for t in (q, k, v)),
                            **{n: t.detach() for n, t in kw.items()})[0]
    torch.testing.assert_close(o.detach(), ref, atol=1e-12, rtol=1e-12)
    leaves = (q, k, v) + ((kw["rel"],) if "rel" in kw else ())
    ints = {n: t for n, t in kw.items() if n != "rel"}

    def f(*xs):
        tables = {"rel": xs[3]} if len(xs) > 3 else {}
        return pat(*xs[:3], **ints, **tables)
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)


def test_float64_elsewhere_says_where_it_runs():
    """float64 on the Triton backend: a SpattnInputError that points at the torch backend;
    decode (which takes no float64): a pointer to the pattern's call."""
    from spattn.dsl.errors import SpattnInputError
    x = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    if spattn.runtime.api._interpret():
        with pytest.raises(SpattnInputError, match="float64 on the torch backend"):
            spattn.compile("causal", backend="triton")(x, x, x)
    kc = torch.randn(1, 2, 300, 16, dtype=torch.float64)
    with pytest.raises(SpattnInputError, match=r"float32 for decode; call the pattern"):
        spattn.compile("causal", backend="torch").decode(x[:, :, :1], kc, kc)
