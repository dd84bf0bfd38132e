"""Plans of patterns with a score (``pat.plan(q, k, v, table=...)``, then
``pat(q, k, v, plan=plan, table=...)``) on the torch backend and the Triton kernels (under
the interpreter; on CUDA the bound launches): one plan reused across calls with fresh q, k,
v and tables, outputs and gradients (q, k, v, learnable tables) against the float64
reference; the errors of a plan used with other tensors or tables."""
import pytest
import torch

import spattn
from spattn.dsl.errors import SpattnInputError, SpattnParamError
from spattn.runtime import scores as S
from spattn.runtime.reference import pattern_reference

H = 2
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
DOC_SCORE = ("causal & same(doc)", "softcap(3.0) + rel[h, clamp(q - k, 0, 15)]")


def _doc(L):
    return torch.tensor([0] * (L // 3) + [1] * (L // 4) + [2] * (L - L // 3 - L // 4))


def _qkv(B, Lq, Lk, g, dtype=torch.float32, Hk=H, D=16, grad=True):
    q = torch.randn(B, H, Lq, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, Hk, Lk, D, generator=g, dtype=dtype) for _ in range(2))
    return [t.requires_grad_(grad) for t in (q, k, v)]


def check_call(p, plan, q, k, v, tables, g, *, ints=None, q_offset=None, atol=2e-4, **kw):
    """One call through ``plan`` against the float64 reference: the output and the gradients
    of q, k, v and every table that requires grad, every element."""
    o = p(q, k, v, plan=plan, **tables, **kw)
    ro, _ = pattern_reference(p, *(t.detach().double() for t in (q, k, v)), q_offset=q_offset,
                              **(ints or {}), **{n: t.detach().double() for n, t in tables.items()})
    torch.testing.assert_close(o.double(), ro, atol=atol, rtol=1e-3)
    leaves = [t for t in (q, k, v, *tables.values()) if t.requires_grad]
    if not leaves:
        return
    do = torch.randn(o.shape, generator=g, dtype=o.dtype, device=o.device)
    got = torch.autograd.grad(o, leaves, do)
    rl = {n: t.detach().double().requires_grad_(t.requires_grad)
          for n, t in zip("qkv", (q, k, v))}
    rt = {n: t.detach().double().requires_grad_(t.requires_grad) for n, t in tables.items()}
    ro, _ = pattern_reference(p, rl["q"], rl["k"], rl["v"], q_offset=q_offset, **(ints or {}),
                              **rt)
    want = torch.autograd.grad(ro, [t for t in (*rl.values(), *rt.values()) if t.requires_grad],
                               do.double())
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, atol=atol * 5, rtol=2e-3, msg=f"grad {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_plan_many_calls_fresh_inputs_and_tables(backend):
    """A plan built once holds the mask's input (doc); three calls with fresh q, k, v and a
    fresh learnable table, one with a table that needs no gradient, one without autograd."""
    p = spattn.compile(DOC_SCORE[0], score=DOC_SCORE[1], backend=backend)
    g = torch.Generator().manual_seed(0)
    B, L = 2, 40
    doc = _doc(L)
    q, k, v = _qkv(B, L, L, g, grad=False)
    plan = p.plan(q, k, v, doc=doc, rel=torch.randn(H, 16, generator=g))
    assert "rel (2, 16) float32" in repr(plan)
    for step in range(3):
        q, k, v = _qkv(B, L, L, g)
        rel = torch.randn(H, 16, generator=g).requires_grad_(step != 1)
        check_call(p, plan, q, k, v, {"rel": rel}, g, ints={"doc": doc})
    with torch.no_grad():
        q, k, v = _qkv(B, L, L, g, grad=False)
        check_call(p, plan, q, k, v, {"rel": torch.randn(H, 16, generator=g)}, g,
                   ints={"doc": doc})


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_gqa_offset_layout_scale_and_deterministic(backend):
    """A plan of a decode-like call (Lq < Lk, q_offset), 2 query heads per key head, bshd
    tensors, an explicit scale, a [B, H, n] table; deterministic=True through the plan."""
    p = spattn.compile("causal & window(12)", score="s * 0.5 + bias[h, clamp(q - k, 0, 11)]",
                       backend=backend)
    g = torch.Generator().manual_seed(1)
    B, Lq, Lk = 2, 12, 30
    q, k, v = _qkv(B, Lq, Lk, g, Hk=1, grad=False)
    bias = torch.randn(B, H, 12, generator=g)
    t = lambda x: x.transpose(1, 2)      # noqa: E731
    plan = p.plan(t(q), t(k), t(v), layout="bshd", q_offset=15, scale=0.3, bias=bias)
    for det in (False, True):
        q, k, v = _qkv(B, Lq, Lk, g, Hk=1)
        bias = torch.randn(B, H, 12, generator=g, requires_grad=True)
        o = p(t(q), t(k), t(v), plan=plan, bias=bias, deterministic=det)
        do = torch.randn(o.shape, generator=g)
        got = torch.autograd.grad(o, (q, k, v, bias), do)
        rl = [x.detach().double().requires_grad_() for x in (q, k, v, bias)]
        ro, _ = pattern_reference(p, *rl[:3], q_offset=15, scale=0.3, bias=rl[3])
        torch.testing.assert_close(t(o).double(), ro, atol=2e-4, rtol=1e-3)
        want = torch.autograd.grad(ro, rl, t(do).double())
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, atol=1e-3, rtol=2e-3)


def test_torch_plan_runs_no_analysis(monkeypatch):
    """With a plan, the torch backend's row chunks come from the plan: the per-call
    analysis (S._chunks) is not run again, forward or backward."""
    p = spattn.compile(*DOC_SCORE[:1], score=DOC_SCORE[1], backend="torch")
    g = torch.Generator().manual_seed(2)
    doc = _doc(32)
    q, k, v = _qkv(1, 32, 32, g, grad=False)
    plan = p.plan(q, k, v, doc=doc, rel=torch.randn(H, 16, generator=g))
    assert isinstance(plan.forward_stage, S.TorchScoreStage)

    def refuse(*a, **kw):
        raise AssertionError("analysis run in a planned call")
    monkeypatch.setattr(S, "_chunks", refuse)
    q, k, v = _qkv(1, 32, 32, g)
    check_call(p, plan, q, k, v, {"rel": torch.randn(H, 16, generator=g, requires_grad=True)},
               g, ints={"doc": doc})


@pytest.mark.interpreter
def test_triton_plan_backward_built_at_plan_time():
    p = spattn.compile("causal & window(8)", score="softcap(2.0) + rel[h, clamp(q - k, 0, 7)]",
                       backend="triton")
    g = torch.Generator().manual_seed(3)
    q, k, v = _qkv(1, 24, 24, g)
    plan = p.plan(q, k, v, rel=torch.randn(H, 8, generator=g))      # q requires grad
    assert len(plan._bwd) == 1
    rel = torch.randn(H, 8, generator=g, requires_grad=True)
    check_call(p, plan, q, k, v, {"rel": rel}, g)
    assert len(plan._bwd) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_errors(backend):
    p = spattn.compile(DOC_SCORE[0], score=DOC_SCORE[1], backend=backend)
    g = torch.Generator().manual_seed(4)
    doc = _doc(24)
    q, k, v = _qkv(1, 24, 24, g, grad=False)
    rel = torch.randn(H, 16, generator=g)
    plan = p.plan(q, k, v, doc=doc, rel=rel)
    with pytest.raises(SpattnInputError, match=r"'rel' has shape \(2, 17\).*built for 'rel' of "
                                               r"shape \(2, 16\)"):
        p(q, k, v, plan=plan, rel=torch.randn(H, 17))
    with pytest.raises(SpattnInputError, match="torch.float64.*built for 'rel'.*float32"):
        p(q, k, v, plan=plan, rel=rel.double())
    with pytest.raises(SpattnInputError, match="missing runtime input 'rel'"):
        p(q, k, v, plan=plan)
    with pytest.raises(SpattnInputError, match="float table"):
        p(q, k, v, plan=plan, rel=rel.long())
    q2, k2, v2 = _qkv(1, 32, 32, g, grad=False)
    with pytest.raises(SpattnInputError, match="the plan was built for q"):
        p(q2, k2, v2, plan=plan, rel=rel)
    with pytest.raises(SpattnInputError, match="the plan was built for q"):
        p(q.half(), k.half(), v.half(), plan=plan, rel=rel)
    with pytest.raises(SpattnParamError, match="'doc' were given with plan="):
        p(q, k, v, plan=plan, rel=rel, doc=doc)
    with pytest.raises(SpattnInputError, match="unexpected runtime input 'bias'"):
        p(q, k, v, plan=plan, rel=rel, bias=rel)
    with pytest.raises(SpattnParamError, match="scale"):
        p(q, k, v, plan=plan, rel=rel, scale=0.5)
    other = spattn.compile(DOC_SCORE[0], score="softcap(4.0) + rel[h, clamp(q - k, 0, 15)]",
                           backend=backend)
    with pytest.raises(SpattnParamError, match="the plan is for the pattern"):
        other(q, k, v, plan=plan, rel=rel)
    with pytest.raises(SpattnInputError, match="too short"):
        p.plan(q, k, v, doc=doc, rel=torch.randn(H, 15))
    with pytest.raises(SpattnInputError, match="missing runtime input 'rel'"):
        p.plan(q, k, v, doc=doc)


@pytest.mark.gpu
def test_bound_launches_on_cuda_by_table_specialisation():
    """On CUDA a planned scored call launches through bound launches, one per
    specialisation of its table arguments: a table that needs a gradient or not (the flag 1
    is a constant of its kernel), a 16-byte aligned table or a view at a 4-byte offset; every
    call against the float64 reference, twice each (the second through the bound launch)."""
    p = spattn.compile("causal & window(100)",
                       score="softcap(20.0) + rel[h, clamp(q - k, 0, 99)]", backend="triton")
    g = torch.Generator(device="cuda").manual_seed(5)
    B, L, D = 1, 300, 64

    def fresh(grad):
        q, k, v = (torch.randn(B, H, L, D, device="cuda", generator=g, requires_grad=grad)
                   for _ in range(3))
        return q, k, v

    q, k, v = fresh(True)
    plan = p.plan(q, k, v, rel=torch.randn(H, 100, device="cuda", generator=g))
    for aligned in (True, False):
        for grad in (True, False, True, False):
            base = torch.randn(H * 100 + 1, device="cuda", generator=g)
            rel = (base[:-1] if aligned else base[1:]).view(H, 100).requires_grad_(grad)
            q, k, v = fresh(True)
            check_call(p, plan, q, k, v, {"rel": rel}, g, atol=1e-3)
    assert 1 <= len(plan.forward_stage.launches) <= 2
    assert 3 <= len(next(iter(plan._bwd.values())).launches) <= 4


@pytest.mark.interpreter
def test_triton_plan_backward_built_for_a_learnable_table():
    """q, k, v frozen, the table learnable: the plan builds the backward stage at once."""
    p = spattn.compile("causal & window(8)", score="s + rel[h, clamp(q - k, 0, 7)]",
                       backend="triton")
    g = torch.Generator().manual_seed(6)
    q, k, v = _qkv(1, 16, 16, g, grad=False)
    rel = torch.randn(H, 8, generator=g, requires_grad=True)
    plan = p.plan(q, k, v, rel=rel)
    assert len(plan._bwd) == 1
    check_call(p, plan, q, k, v, {"rel": rel}, g)
    assert len(plan._bwd) == 1


def test_launch_key_separates_what_triton_specialises_on():
    """The key of a scored stage's bound launches (computed on CUDA only; its logic here):
    equal for tables of one layout, dtype and alignment; different for a table at a 4-byte
    offset, another dtype, a gradient flag of 1 rather than 0, a size of 1, an unaligned q."""
    from spattn.runtime.triton_backend import _launch_key
    q = torch.randn(1, 2, 8, 16)
    a, b = torch.randn(2, 16), torch.randn(2, 16)
    base = torch.randn(33)
    odd = base[1:].view(2, 16)
    key = lambda t, flag=0, size=16, qq=q: _launch_key((t, 0, 16, 1, size, flag), qq, q, q)  # noqa
    assert key(a) == key(b) and key(a) is not None
    assert len({key(a), key(odd), key(a.double()), key(a, flag=1), key(a, size=1)}) == 5
    assert key(a) != key(a, qq=torch.randn(1 * 2 * 8 * 16 + 1)[1:].view(1, 2, 8, 16))


def test_backward_launch_key_covers_o_lse_and_do():
    """The scored backward's bound launches are keyed by the alignment of o, lse and dO as
    well as q, k, v (computed on CUDA only; its logic here): a launch specialised on an
    aligned dO is not reused for a dO at a 4-byte offset, nor for such an o or lse."""
    from spattn.runtime.triton_backend import _bwd_launch_key
    g = torch.Generator().manual_seed(3)

    def t(*shape, off=0):
        n = 1
        for s in shape:
            n *= s
        return torch.randn(n + off, generator=g)[off:].view(*shape)
    q, k, v, o, do = (t(1, 2, 8, 16) for _ in range(5))
    lse = t(1, 2, 8)
    tables = (t(2, 16), 0, 16, 1, 16, 0)
    key = lambda **kw: _bwd_launch_key(tables, **{**dict(q=q, k=k, v=v, o=o, lse=lse,  # noqa
                                                         do=do), **kw})
    base = key()
    assert base is not None
    assert key(q=t(1, 2, 8, 16), o=t(1, 2, 8, 16), do=t(1, 2, 8, 16)) == base
    odd = {name: key(**{name: t(*ref.shape, off=1)})
           for name, ref in dict(q=q, k=k, v=v, o=o, lse=lse, do=do).items()}
    assert all(other != base for other in odd.values())
    assert len(set(odd.values())) == len(odd)


@pytest.mark.parametrize("score", [None, "s + rel[h, clamp(q - k, 0, 3)]"],
                         ids=["mask", "scored"])
def test_plan_backward_must_be_a_bool_or_none(score):
    p = spattn.compile("causal", score=score, backend="torch")
    q = torch.randn(1, 2, 8, 16)
    tables = {"rel": torch.randn(2, 4)} if score else {}
    with pytest.raises(SpattnParamError, match="backward must be True, False or None, got str"):
        p.plan(q, q, q, backward="yes", **tables)
