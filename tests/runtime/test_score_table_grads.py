"""Table gradients of 16-bit calls on the Triton backward (docs/backends.md, Scores): the
row correction ``delta`` is read from an fp32 copy of the output whenever a table needs a
gradient, so a learnable slope times the distance (``w[h] * float(q - k)``, learnable
ALiBi) gets the gradient the float32 torch path gets, not one carrying the 16-bit output's
rounding multiplied by up to L; q, k, v gradients against the float64 reference too.
Deterministic table gradients (``deterministic=True``): the partial buffers of tables read
per (batch, head) or along ``q - k`` give bit-identical gradients whatever order the dQ
programs run in; other tables, and buffers over the bound, take the torch backward."""
import math

import pytest
import torch

import spattn
from spattn.runtime import scores as S
from spattn.runtime.reference import pattern_reference

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


# ------------------------------------------------------------ deterministic table gradients

DET_SCORE = "s * temp[h] + w[b, h] * float(q - k) * 0.1 + w[0, 0]"


def _reverse_dq_order(plan):
    """Reverse the dQ kernel's work order (the interpreter runs programs in launch order):
    atomic adds then accumulate in another order."""
    for stage in plan._bwd.values():
        order = stage.static_q[-8]
        assert order.dtype in (torch.int32, torch.int64) and order.dim() == 1
        order.copy_(order.flip(0))


ORDER_CASES = [
    ("per-head-and-batch", DET_SCORE, {"temp": (2,), "w": (2, 2)}),
    ("rel-bias", "s + rel[h, clamp(q - k, 0, 19)]", {"rel": (2, 20)}),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("score,tables", [c[1:] for c in ORDER_CASES],
                         ids=[c[0] for c in ORDER_CASES])
def test_triton_deterministic_table_gradients_ignore_the_program_order(monkeypatch, score,
                                                                      tables):
    """Tables read per (batch, head) (a temperature, a [B, H] slope read twice) or along
    q - k (a relative bias): with deterministic=True the Triton backward writes per-tile
    sums to partial buffers (the torch backward never runs), so reversing the order in
    which the dQ programs run leaves every table gradient bit-identical, while the atomic
    adds' gradients change in their last bits; both match the float64 reference."""
    from spattn.runtime.reference import pattern_reference
    calls = []
    monkeypatch.setattr(S, "bwd", lambda *a, **kw: calls.append(1))
    monkeypatch.setattr(S, "_reduce_partials", _spy(S._reduce_partials, calls, "partials"))
    pat = spattn.compile("causal & window(20)", score=score, backend="triton")
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(2, 2, 40, 16, generator=g) for _ in range(4))
    tabs = {n: torch.rand(shape, generator=g) + 0.5 for n, shape in tables.items()}
    plan = pat.plan(q, k, v, **tabs)

    def grads(det):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, *tabs.values())]
        o = pat(*leaves[:3], plan=plan, deterministic=det, **dict(zip(tabs, leaves[3:])))
        return torch.autograd.grad(o, leaves, do)
    runs = {}
    for det in (True, False):
        first = grads(det)
        _reverse_dq_order(plan)
        runs[det] = (first, grads(det))
        _reverse_dq_order(plan)
    assert calls == ["partials", "partials"]         # no torch backward, two Triton ones
    (a, b), (c, d) = runs[True], runs[False]
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not all(torch.equal(x, y) for x, y in zip(c[3:], d[3:]))
    ref = [t.double().requires_grad_() for t in (q, k, v, *tabs.values())]
    ro, _ = pattern_reference(pat, *ref[:3], **dict(zip(tabs, ref[3:])))
    want = torch.autograd.grad(ro, ref, do.double())
    for what, x, y in zip(["dq", "dk", "dv", *tabs], a, want):
        torch.testing.assert_close(x.double(), y, atol=1e-5, rtol=1e-5, msg=what)


def _spy(fn, calls, tag):
    def wrapped(*a, **kw):
        calls.append(tag)
        return fn(*a, **kw)
    return wrapped


@pytest.mark.interpreter
@pytest.mark.parametrize("score,table,why", [
    ("s + rel[h, q % 8]", (2, 8), "entry-of-q"),
    ("s * rel[h, 0] + rel[h, clamp(q - k, 0, 7)]", (2, 8), "mixed-kinds"),
    ("s + rel[h, clamp(q - k, 0, 7)]", (2, 8), "too-large"),
], ids=["rel-q-mod-8", "per-head-and-diagonal-loads", "partials-over-the-bound"])
def test_deterministic_falls_back_to_the_torch_backward(monkeypatch, score, table, why):
    """A table with a load whose entry varies within a tile other than along q - k, a
    table read both per head and along q - k, or partial buffers over
    DETERMINISTIC_PARTIAL_BYTES: deterministic=True runs the torch backward (which matches
    the reference), the Triton forward still."""
    from spattn.runtime.reference import pattern_reference
    calls = []
    monkeypatch.setattr(S, "bwd", _spy(S.bwd, calls, "torch"))
    if why == "too-large":
        monkeypatch.setattr(S, "DETERMINISTIC_PARTIAL_BYTES", 0)
    pat = spattn.compile("causal", score=score, backend="triton")
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(1, 2, 24, 16, generator=g) for _ in range(4))
    rel = torch.randn(table, generator=g).requires_grad_()
    qq = q.clone().requires_grad_()
    o = pat(qq, k, v, rel=rel, deterministic=True)
    got = torch.autograd.grad(o, (qq, rel), do)
    assert calls == ["torch"]
    ref = [t.double().requires_grad_() for t in (q, k, v, rel.detach())]
    ro, _ = pattern_reference(pat, *ref[:3], rel=ref[3])
    want = torch.autograd.grad(ro, (ref[0], ref[3]), do.double())
    for x, y in zip(got, want):
        torch.testing.assert_close(x.double(), y, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("score,tables", [
    (DET_SCORE, {"temp": (4,), "w": (2, 4)}),
    ("s + rel[h, clamp(q - k, 0, 255)]", {"rel": (4, 256)})], ids=["per-head", "rel-bias"])
def test_gpu_deterministic_table_gradients_bit_identical(score, tables):
    """On the GPU, where atomic adds really race: two deterministic backwards give
    bit-identical table gradients, which match the float64 reference."""
    from spattn.runtime.reference import pattern_reference
    pat = spattn.compile("causal", score=score, backend="triton")
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(2, 4, 2048, 64, generator=g).cuda() for _ in range(4))
    tabs = {n: (torch.rand(shape, generator=g) + 0.5).cuda() for n, shape in tables.items()}

    def grads():
        leaves = [t.clone().requires_grad_() for t in (q, k, v, *tabs.values())]
        o = pat(*leaves[:3], deterministic=True, **dict(zip(tabs, leaves[3:])))
        return torch.autograd.grad(o, leaves, do)[3:]
    a, b = grads(), grads()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    ref = [t.double().requires_grad_() for t in (q, k, v, *tabs.values())]
    ro, _ = pattern_reference(pat, *ref[:3], **dict(zip(tabs, ref[3:])))
    want = torch.autograd.grad(ro, ref, do.double())[3:]
    for what, x, y in zip(tabs, a, want):
        torch.testing.assert_close(x.double(), y, atol=1e-3, rtol=1e-3, msg=what)


@pytest.mark.interpreter
@pytest.mark.parametrize("Hk,Lq,Lk,dtype", [
    (1, 20, 40, torch.float32), (2, 24, 24, torch.bfloat16)],
    ids=["B2-H2-Hk1-Lq20-Lk40-fp32", "B2-H2-Hk2-L24-bf16"])
def test_triton_deterministic_gqa_offset_and_16_bit(Hk, Lq, Lk, dtype):
    """Partial buffers with grouped key heads, queries at the end of the keys (q_offset)
    and bf16 inputs (whose delta reads the fp32 output): every gradient against the
    float64 reference."""
    from spattn.runtime.reference import pattern_reference
    pat = spattn.compile("causal & window(12)", score=DET_SCORE, backend="triton")
    g = torch.Generator().manual_seed(11)
    B, H, D = 2, 2, 16
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hk, Lk, D, generator=g).to(dtype) for _ in range(2))
    do = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    temp, w = torch.rand(H, generator=g) + 0.5, 0.3 * torch.randn(B, H, generator=g)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, temp, w)]
    o = pat(*leaves[:3], temp=leaves[3], w=leaves[4], q_offset=Lk - Lq, deterministic=True)
    got = torch.autograd.grad(o, leaves, do)
    ref = [t.double().requires_grad_() for t in (q, k, v, temp, w)]
    ro, _ = pattern_reference(pat, *ref[:3], temp=ref[3], w=ref[4], q_offset=Lk - Lq)
    want = torch.autograd.grad(ro, ref, do.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for what, x, y in zip(("dq", "dk", "dv", "dtemp", "dw"), got, want):
        torch.testing.assert_close(x.double(), y, atol=tol, rtol=tol, msg=what)


@pytest.mark.interpreter
@pytest.mark.parametrize("temp_shape,w_shape", [((2, 2), (2, 3)), ((2, 2, 2), (1, 1, 3))],
                         ids=["temp-B-H_w-B-3", "temp-B-H-H_w-1-1-3"])
def test_triton_deterministic_tables_with_leading_dims(temp_shape, w_shape):
    """Tables with leading [B] / [B, H] dims (1: broadcast) before the indexed ones: the
    host scatter of the partial sums puts each (batch, head)'s sum where the kernel's
    loads read."""
    from spattn.runtime.reference import pattern_reference
    pat = spattn.compile("causal", score="s * temp[h] + w[0] * float(q - k) * 0.1",
                         backend="triton")
    g = torch.Generator().manual_seed(4)
    q, k, v, do = (torch.randn(2, 2, 24, 16, generator=g) for _ in range(4))
    temp, w = torch.rand(temp_shape, generator=g) + 0.5, torch.randn(w_shape, generator=g)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, temp, w)]
    o = pat(*leaves[:3], temp=leaves[3], w=leaves[4], deterministic=True)
    got = torch.autograd.grad(o, leaves, do)
    ref = [t.double().requires_grad_() for t in (q, k, v, temp, w)]
    ro, _ = pattern_reference(pat, *ref[:3], temp=ref[3], w=ref[4])
    want = torch.autograd.grad(ro, ref, do.double())
    for what, x, y in zip(("dq", "dk", "dv", "dtemp", "dw"), got, want):
        torch.testing.assert_close(x.double(), y, atol=1e-5, rtol=1e-5, msg=what)


@pytest.mark.interpreter
def test_no_fp32_output_when_the_torch_backward_runs():
    """deterministic=True with a table the Triton backward cannot sum in a fixed order
    (``rel[h, q % 8]``): its backward is the torch one, so the forward keeps no fp32
    output (the torch backward reads none)."""
    pat = spattn.compile("causal", score="s + rel[h, q % 8]", backend="triton")
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 16, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    rel = torch.randn(2, 8, generator=g).requires_grad_()
    saved = {det: pat(q, k, v, rel=rel, deterministic=det).grad_fn.saved_tensors[3].dtype
             for det in (False, True)}
    assert saved == {False: torch.float32, True: torch.bfloat16}


FORMS = [
    ("learned-alibi", "causal & window(10)", "alibi(w[h])", {"w": (4,)}, 0),
    ("learned-softcap", "causal & window(10)", "softcap(cap[h])", {"cap": (4,)}, 0),
    ("head-arithmetic", "causal & window(10)", "s * w[h % 2] + w[H - 1 - h] * float(k) * 0.1",
     {"w": (4,)}, 0),
    ("two-tables", "causal & window(10)", "s * (1.0 + w[h]) + t[0] * t[1]",
     {"w": (4,), "t": (2,)}, 0),
    ("rel-bias-window", "causal & window(10)", "s + rel[h, clamp(q - k, 0, 9)]",
     {"rel": (4, 10)}, 0),
    ("rel-bias-offset", "causal & window(10)", "s + rel[h, clamp(q - k, 0, 9)]",
     {"rel": (4, 10)}, 16),
    ("rel-bias-per-batch", "causal", "s + rel[clamp(q - k, 0, 9)]", {"rel": (2, 1, 10)}, 0),
    ("t5-buckets", "full", "s + bias[h, t5_bucket(16, 40)]", {"bias": (4, 16)}, 0),
    ("shared-rel-softcap", "causal", "softcap(3.0) + rel[clamp(q - k, 0, 47)]", {"rel": (48,)},
     0),
    ("two-diagonal-loads", "full",
     "s + rel[h, clamp(q - k + 20, 0, 40)] + rel[h, clamp(k - q + 20, 0, 40)] * 0.5",
     {"rel": (4, 41)}, 0),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("mask,score,tables,off", [f[1:] for f in FORMS],
                         ids=[f[0] for f in FORMS])
def test_triton_deterministic_score_forms(monkeypatch, mask, score, tables, off):
    """Scores whose learnable tables are read at per-head or constant entries (a learned
    ALiBi slope, a learned softcap, entries computed from h and H, two tables in one
    product), or along ``q - k`` (relative biases, clamped, shared by the heads, read
    twice; T5's buckets), with queries at the end of the keys too: the partial buffers
    (the torch backward never runs), every gradient against the float64 reference."""
    from spattn.runtime.reference import pattern_reference
    monkeypatch.setattr(S, "bwd", lambda *a, **kw: pytest.fail("the torch backward ran"))
    pat = spattn.compile(mask, score=score, backend="triton")
    assert S.deterministic_on_triton(pat, tuple(tables))
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 40 - off, 16, generator=g)
    k, v = (torch.randn(2, 4, 40, 16, generator=g) for _ in range(2))
    do = torch.randn(q.shape, generator=g)
    tabs = {n: torch.rand(shape, generator=g) + 0.5 for n, shape in tables.items()}
    leaves = [t.clone().requires_grad_() for t in (q, k, v, *tabs.values())]
    o = pat(*leaves[:3], deterministic=True, q_offset=off, **dict(zip(tabs, leaves[3:])))
    got = torch.autograd.grad(o, leaves, do)
    ref = [t.double().requires_grad_() for t in (q, k, v, *tabs.values())]
    ro, _ = pattern_reference(pat, *ref[:3], q_offset=off, **dict(zip(tabs, ref[3:])))
    want = torch.autograd.grad(ro, ref, do.double())
    for what, x, y in zip(["dq", "dk", "dv", *tabs], got, want):
        torch.testing.assert_close(x.double(), y, atol=1e-4, rtol=1e-5, msg=what)


@pytest.mark.interpreter
@pytest.mark.parametrize("Hq,Hk,Lq,Lk,q_offset,bshd", [
    (4, 2, 9, 37, None, False), (3, 1, 37, 20, None, True), (2, 2, 20, 45, 7, True)],
    ids=["B2-Hq4-Hk2-Lq9-Lk37-fp32", "B2-Hq3-Hk1-Lq37-Lk20-fp32-bshd",
         "B2-Hq2-Hk2-Lq20-Lk45-off7-fp32-bshd"])
def test_diagonal_sums_at_any_shape(Hq, Hk, Lq, Lk, q_offset, bshd, monkeypatch):
    """A table along ``q - k`` with deterministic sums (``_diagonal_sums``: per-diagonal
    partial sums scattered by ``q - k``): its buffer and diagonals follow the query heads,
    ``Lq``, ``Lk`` and the resolved query offset, also with grouped key heads, more queries
    than keys (a negative offset) and ``[B, L, H, D]`` tensors."""
    from spattn.runtime import scores
    from spattn.runtime.reference import pattern_reference
    seen = []
    real = scores._diagonal_sums
    monkeypatch.setattr(scores, "_diagonal_sums",
                        lambda c, q, k, *a: seen.append(q.shape) or real(c, q, k, *a))
    pat = spattn.compile("causal", score="s + rel[h, clamp(q - k, 0, 7)]", backend="triton")
    g = torch.Generator().manual_seed(Lq + Lk)
    B, D = 2, 16
    q = torch.randn(B, Lq, Hq, D, generator=g)
    k, v = (torch.randn(B, Lk, Hk, D, generator=g) for _ in range(2))
    if not bshd:
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    rel = torch.randn(Hq, 8, generator=g)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, rel)]
    o = pat(*leaves[:3], rel=leaves[3], q_offset=q_offset, deterministic=True,
            layout="bshd" if bshd else None)
    do = torch.randn(o.shape, generator=g)
    got = torch.autograd.grad(o, leaves, do)
    ref = [t.double().requires_grad_() for t in (q, k, v, rel)]
    view = (lambda t: t.transpose(1, 2)) if bshd else (lambda t: t)
    ro, _ = pattern_reference(pat, *(view(t) for t in ref[:3]), rel=ref[3], q_offset=q_offset)
    want = torch.autograd.grad(view(ro), ref, do.double())
    for what, x, y in zip(("dq", "dk", "dv", "drel"), got, want):
        torch.testing.assert_close(x.double(), y, atol=1e-4, rtol=1e-4, msg=what)
    assert seen == [(B, Hq, Lq, D)]         # the path under test, on [B, H, L, D] views


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fp32_output_of_a_scored_forward(dtype):
    """The fp32 output the backward of a learned table reads (``out_dtype=torch.float32``;
    from 16-bit q the kernel adds P's rounding back as a second product, ``EXACT_PV``)
    equals the float64 reference, and its 16-bit cast is the ordinary forward's output."""
    from spattn.runtime import triton_backend as tb
    from spattn.runtime.reference import pattern_reference
    inputs, _ = _slope_case(97)
    q, k, v, _, w0 = inputs
    q, k, v = (t.to(dtype) for t in (q, k, v))
    pat = spattn.compile("causal & window(40)", score=SLOPE, backend="triton")
    plan = pat.plan(q, k, v, w=w0)
    o32, _ = tb.run_fwd(plan.forward_stage, q, k, v, tables={"w": w0}, out_dtype=torch.float32)
    o, _ = tb.run_fwd(plan.forward_stage, q, k, v, tables={"w": w0})
    assert o32.dtype == torch.float32 and o.dtype == dtype
    ref, _ = pattern_reference(pat, q.double(), k.double(), v.double(), w=w0.double())
    torch.testing.assert_close(o32.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o32.to(dtype), o, atol=0, rtol=0) if dtype == torch.float32 \
        else torch.testing.assert_close(o.double(), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("score,bad", [
    ("s + rel[h, q - k + 69]", float("nan")), ("s + rel[h, q - k + 69]", float("inf")),
    ("s * exp(rel[h, q - k + 69])", 1e30), ("s + rel[h, (q - k + 69) % 139] * float(k % 2)",
                                             float("nan"))],
    ids=["diag-nan", "diag-inf", "exp-huge", "mod-nan"])
@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
def test_table_entries_outside_the_pattern_get_zero_gradient(backend, score, bad, det):
    """A table whose entries at distances the pattern never allows (q - k >= 50 under
    window(50)) are inf or NaN: outputs and every gradient are the float64 reference's,
    those entries' gradient 0. At L = 70 the last query tile has padding rows, whose p is
    NaN there in the kernel (lse +inf); it must add nothing to the table's gradient."""
    L, H, D = 70, 2, 16
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, H, L, D, generator=g) for _ in range(3))
    rel = torch.randn(H, 2 * L - 1, generator=g)
    rel[:, L - 1 + 50:] = bad
    pat = spattn.compile("causal & window(50)", score=score, backend=backend)
    qs, ks, vs, rels = (t.clone().requires_grad_() for t in (q, k, v, rel))
    o = pat(qs, ks, vs, rel=rels, deterministic=det)
    do = torch.randn(o.shape, generator=g)
    got = torch.autograd.grad(o, (qs, ks, vs, rels), do)
    q64, k64, v64, rel64 = (t.double().requires_grad_() for t in (q, k, v, rel))
    ro = pattern_reference(pat, q64, k64, v64, rel=rel64)[0]
    want = torch.autograd.grad(ro, (q64, k64, v64, rel64), do.double())
    torch.testing.assert_close(o.double(), ro, rtol=1e-4, atol=1e-5)
    for name, a, b in zip("q k v rel".split(), got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=name)
    assert torch.all(got[3][:, L - 1 + 50:] == 0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_a_nan_entry_the_pattern_reads_stays_nan_in_the_gradient(backend):
    """A NaN table entry at a distance the pattern allows (q - k = 3 under window(50)) makes
    the rows that read it NaN, and the table's gradient NaN where the float64 reference's
    is: the padding rows' guard of the kernels does not hide it."""
    L, H, D = 70, 2, 16
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, H, L, D, generator=g) for _ in range(3))
    rel = torch.randn(H, 2 * L - 1, generator=g)
    rel[0, L - 1 + 3] = float("nan")
    pat = spattn.compile("causal & window(50)", score=f"s + rel[h, q - k + {L - 1}]",
                         backend=backend)
    rels = rel.clone().requires_grad_()
    o = pat(q, k, v, rel=rels)
    do = torch.randn(o.shape, generator=g)
    (got,) = torch.autograd.grad(o, (rels,), do)
    rel64 = rel.double().requires_grad_()
    ro = pattern_reference(pat, q.double(), k.double(), v.double(), rel=rel64)[0]
    (want,) = torch.autograd.grad(ro, (rel64,), do.double())
    assert torch.equal(torch.isnan(o), torch.isnan(ro)) and torch.isnan(o).any()
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got).any()
