"""Attention with scores on the torch backend (and the Triton kernels under the
interpreter): outputs and gradients to q, k, v and to learnable tables against the float64
reference; gradcheck; the errors of score inputs."""
import pytest
import torch

import spattn
from spattn.dsl.errors import SpattnInputError
from spattn.runtime.reference import pattern_reference
from spattn.runtime import scores as S

H = 4
SLOPES = [2.0 ** -(i + 1) for i in range(H)]

# (id, mask, score, params, tables {name: shape}, needs doc)
CASES = [
    ("alibi", "causal", "alibi(m[h])", {"m": SLOPES}, {}, False),
    ("alibi-slope", "causal", "alibi(alibi_slope)", {}, {}, False),
    ("softcap", "causal", "softcap(2.0)", {}, {}, False),
    ("t5-bidirectional", "full", "s + bias[h, t5_bucket(16, 40)]", {}, {"bias": (H, 16)}, False),
    ("t5-causal", "causal", "s + bias[t5_bucket_causal(8, 40)]", {}, {"bias": (2, H, 8)}, False),
    ("window-rel1d", "window(W)", "s + rel[h, clamp(q - k, 0, W - 1)]", {"W": 9},
     {"rel": (H, 9)}, False),
    ("documents-softcap-rel", "causal & same(doc)",
     "softcap(3.0) + rel[clamp(q - k, 0, 47)]", {}, {"rel": (48,)}, True),
    ("neighbourhood-rpb2d", "abs(q // 8 - k // 8) <= 2 & abs(q % 8 - k % 8) <= 2",
     "s + rpb[h, clamp(q // 8 - k // 8, -2, 2) + 2, clamp(q % 8 - k % 8, -2, 2) + 2]", {},
     {"rpb": (H, 5, 5)}, False),
    ("learned-temperature", "causal & window(20)", "s * temp[h] + 0.5 * abs(s)", {},
     {"temp": (H,)}, False),
    ("query-and-key-biases", "causal & window(30)", "s + qb[h, q % 5] * kb[k % 7]", {},
     {"qb": (H, 5), "kb": (7,)}, False),
]


def _inputs(case, L, B, dtype, seed=1):
    _, _, _, _, tables, doc = case
    g = torch.Generator().manual_seed(seed)
    ins = {n: torch.randn(shape, generator=g, dtype=dtype) for n, shape in tables.items()}
    if doc:
        ins["doc"] = torch.tensor([0] * (L // 3) + [1] * (L // 3) + [2] * (L - 2 * (L // 3)))
    return ins


def check(case, backend, *, B=2, Lq=48, Lk=48, D=16, Hk=H, dtype=torch.float32,
          atol=2e-4, q_offset=None):
    """Outputs and gradients (q, k, v, every table) of ``backend`` vs the float64
    reference, on fresh random inputs; every element compared."""
    name, mask, score, params, tables, _ = case
    p = spattn.compile(mask, score=score, backend=backend, **params)
    g = torch.Generator().manual_seed(hash(name) % 1000)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=dtype).requires_grad_(True)
    k = torch.randn(B, Hk, Lk, D, generator=g, dtype=dtype).requires_grad_(True)
    v = torch.randn(B, Hk, Lk, D, generator=g, dtype=dtype).requires_grad_(True)
    ins = _inputs(case, Lk, B, dtype)
    for n in tables:
        ins[n].requires_grad_(True)
    o = p(q, k, v, q_offset=q_offset, **ins)
    do = torch.randn(o.shape, generator=g, dtype=dtype)
    leaves = [q, k, v] + [ins[n] for n in tables]
    got = torch.autograd.grad(o, leaves, do)
    ref_ins = {n: (t.detach().double().requires_grad_(True) if n in tables else t)
               for n, t in ins.items()}
    ref_leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v)] + \
        [ref_ins[n] for n in tables]
    ro, _ = pattern_reference(p, *ref_leaves[:3], q_offset=q_offset, **ref_ins)
    want = torch.autograd.grad(ro, ref_leaves, do.double())
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o.double(), ro, atol=atol, rtol=1e-3)
    for what, a, b in zip(["dq", "dk", "dv"] + [f"d{n}" for n in tables], got, want):
        torch.testing.assert_close(a.double(), b, atol=atol * 5, rtol=2e-3, msg=what)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_torch_backend_matches_reference(case):
    check(case, "torch")


@pytest.mark.parametrize("case", [CASES[i] for i in (4, 5, 6, 7)],
                         ids=[CASES[i][0] for i in (4, 5, 6, 7)])
def test_torch_backend_key_spans(case, monkeypatch):
    """Row chunks of 8 rows meeting only the key tiles (of 8) that are not EMPTY."""
    monkeypatch.setattr(S, "CHUNK_SCORES", 2 * H * 48 * 8)
    monkeypatch.setattr(S, "SPAN_BLOCK", 8)
    spans = S._chunks(spattn.compile(case[1], **case[3]), 2, H, 48, 48, 0,
                      _inputs(case, 48, 2, torch.float32), "cpu")
    assert len(spans) == 6
    if case[0] == "window-rel1d":
        assert all(c1 - c0 <= 24 for _, _, c0, c1 in spans)
    check(case, "torch")


def test_torch_backend_gqa_and_decode_offset():
    check(CASES[6], "torch", Hk=2, Lq=20, Lk=48)
    check(CASES[0], "torch", Lq=5, Lk=48, q_offset=40)


def test_gradcheck_float64():
    """torch.autograd.gradcheck of the torch backend's ScoreFunction in float64: q, k, v and
    a learnable bias table, through the compiler's derivatives."""
    p = spattn.compile("causal & window(6)", score="softcap(2.0) + rel[h, clamp(q - k, 0, 5)]")
    g = torch.Generator().manual_seed(3)
    B, Hh, L, D = 1, 2, 9, 4
    q, k, v = (torch.randn(B, Hh, L, D, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    rel = torch.randn(Hh, 6, generator=g, dtype=torch.float64, requires_grad=True)
    c = S.Ctx(p, "torch", 0.5, 0, {}, ("rel",))
    assert torch.autograd.gradcheck(lambda q, k, v, rel: S.ScoreFunction.apply(c, q, k, v, rel)[0],
                                    (q, k, v, rel))


def test_fully_masked_rows_give_zero_with_a_score():
    p = spattn.compile("k < q & q >= 4", score="softcap(1.0)", backend="torch")
    q, k, v = (torch.randn(1, 2, 8, 16, requires_grad=True) for _ in range(3))
    o = p(q, k, v, q_offset=0)
    assert torch.equal(o[:, :, :4], torch.zeros_like(o[:, :, :4]))
    o.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:, :, :4],
                                                        torch.zeros_like(q.grad[:, :, :4]))


def test_tables_without_grad_and_no_grad_calls():
    case = CASES[5]
    p = spattn.compile(case[1], score=case[2], backend="torch", **case[3])
    q, k, v = (torch.randn(1, H, 16, 16) for _ in range(3))
    rel = torch.randn(H, 9)
    o = p(q, k, v, rel=rel)
    ro, _ = pattern_reference(p, q.double(), k.double(), v.double(), rel=rel.double())
    torch.testing.assert_close(o.double(), ro, atol=2e-4, rtol=1e-3)


def test_score_input_errors():
    p = spattn.compile("window(4)", score="s + rel[h, clamp(q - k, 0, 3)]", backend="torch")
    q, k, v = (torch.randn(1, H, 8, 16) for _ in range(3))
    with pytest.raises(SpattnInputError, match=r"'rel' \(shape \(4, 3\)\) is too short"):
        p(q, k, v, rel=torch.randn(H, 3))
    with pytest.raises(SpattnInputError, match="float table"):
        p(q, k, v, rel=torch.ones(H, 4, dtype=torch.int64))
    with pytest.raises(SpattnInputError, match="missing runtime input 'rel'"):
        p(q, k, v)
    with pytest.raises(SpattnInputError, match="unexpected runtime input 'bias'"):
        p(q, k, v, rel=torch.randn(H, 4), bias=torch.randn(3))
    with pytest.raises(SpattnInputError, match="index dimension"):
        p(q, k, v, rel=torch.randn(4))
    with pytest.raises(SpattnInputError, match="is on cpu, but q is on meta"):
        S.validate_score_inputs({"rel": 2}, {"rel": torch.randn(H, 4)}, batch=1, num_heads=H,
                                device=torch.device("meta"))


# ------------------------------------------------------------------ Triton (interpreter)

@pytest.mark.interpreter
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_kernels_match_reference(case):
    """The generated kernels (score in the forward, dQ and dK/dV; table gradients by
    atomic adds in dQ) against the float64 reference; tiny shapes, ragged tiles."""
    from spattn.runtime.plan import PLANS
    PLANS.clear()
    check(case, "triton", Lq=40, Lk=40)
    assert any(p.backend == "triton" and p.pattern.score is not None
               for p, _ in PLANS._plans.values())      # the kernels ran, not a fallback


@pytest.mark.interpreter
def test_triton_gqa_decode_and_deterministic_tables():
    check(CASES[6], "triton", Hk=2, Lq=20, Lk=40)
    check(CASES[0], "triton", Lq=5, Lk=40, q_offset=35)
    check(CASES[2], "triton", B=1, Lq=32, Lk=32, dtype=torch.bfloat16, atol=3e-2)
    case = CASES[5]
    p = spattn.compile(case[1], score=case[2], backend="triton", **case[3])
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, H, 24, 16, generator=g) for _ in range(3))
    grads = []
    for det in (False, True):
        rel = torch.randn(H, 9, generator=torch.Generator().manual_seed(6), requires_grad=True)
        p(q, k, v, rel=rel, deterministic=det).sum().backward()
        grads.append(rel.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


def test_kernels_show_the_score():
    p = spattn.compile("causal & window(64)", score="softcap(30.0) + rel[h, clamp(q - k, 0, 63)]")
    fwd, bwd = p.kernel_source("fwd"), p.kernel_source("bwd")
    assert "score rel[h, min(max(q - k, 0), 63)] + tanh(s / 30.0) * 30.0" in fwd
    assert "tl.sigmoid(b_s * (sm_scale * 0.06666666666666667))" in fwd   # 2 * s / 30: folded
    assert "b_ds = tl.where(b_p != 0.0, b_ds * b_fd, 0.0)" in bwd
    # the relative bias's gradient: one atomic add per diagonal of the tile, at its entry
    assert "tl.atomic_add(p_drel + i_h * stride_rel_0 + i_e * stride_rel_1, b_g, mask=m_e)" in bwd
    plain = spattn.compile("causal & window(64)")
    for kind in ("fwd", "bwd"):
        text = plain.kernel_source(kind)
        assert "sm_scale, H" not in text and "b_x" not in text and "atomic" not in text


@pytest.mark.parametrize("backend", ["torch",
                                     pytest.param("triton", marks=pytest.mark.interpreter)])
def test_lse_and_its_gradient(backend):
    """return_lse: the natural log-sum-exp of the modified scores, and its gradient."""
    p = spattn.compile("causal & window(12)", score="softcap(2.0) + rel[h, clamp(q - k, 0, 11)]",
                       backend=backend)
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=g, requires_grad=True) for _ in range(3))
    rel = torch.randn(2, 12, generator=g, requires_grad=True)
    o, lse = p(q, k, v, rel=rel, return_lse=True)
    w = torch.randn(lse.shape, generator=g)
    got = torch.autograd.grad((o.sum() + (lse * w).sum()), (q, k, v, rel))
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v, rel)]
    ro, rl = pattern_reference(p, *leaves[:3], rel=leaves[3])
    torch.testing.assert_close(lse.double(), rl, atol=1e-4, rtol=1e-4)
    want = torch.autograd.grad(ro.sum() + (rl * w.double()).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-3, rtol=1e-3)


@pytest.mark.interpreter
def test_triton_far_positions_int64():
    """Positions near 2**40 (64-bit kernels, the table strategy): the score reads q and k."""
    case = ("far", "k < 20 | q % 3 == k % 3",
            "s + rel[h, clamp(q - k - 1099511627776, 0, 7)] - float(q % 7) * 0.25",
            {}, {"rel": (H, 8)}, False)
    check(case, "triton", B=1, Lq=24, Lk=24, q_offset=2 ** 40)
    check(case, "torch", B=1, Lq=24, Lk=24, q_offset=2 ** 40)


def test_bf16_table_gradient_with_a_positional_factor_on_torch():
    """A learned slope times the distance (``w[h] * float(q - k)``, learnable ALiBi): the
    torch backward's row correction is ``sum_j P dP`` in float32, not ``dO . O`` from the
    16-bit output, whose rounding the factor q - k multiplies (up to L): the slope's
    gradient from bf16 inputs stays within 1e-3 of the float64 reference (it was 20% off
    with the 16-bit output at L = 1024)."""
    import math
    g = torch.Generator().manual_seed(7)
    B, H, L, D = 1, 2, 1024, 32
    q, k, v, do = (torch.randn(B, H, L, D, generator=g).to(torch.bfloat16) for _ in range(4))
    w0 = 0.1 * torch.randn(H, generator=g)
    qq, kk, vv = (t.double().requires_grad_() for t in (q, k, v))
    w_ref = w0.double().requires_grad_()
    pos = torch.arange(L, dtype=torch.float64)
    s = qq @ kk.transpose(-1, -2) / math.sqrt(D) \
        + w_ref[None, :, None, None] * (pos[:, None] - pos[None, :])
    s = s.masked_fill(pos[:, None] < pos[None, :], -math.inf)
    (torch.softmax(s, -1) @ vv).backward(do.double())
    pat = spattn.compile("causal", score="s + w[h] * float(q - k)", backend="torch")
    w = w0.clone().requires_grad_()
    pat(q.requires_grad_(), k, v, w=w).backward(do)
    err = (w.grad.double() - w_ref.grad).abs().max() / w_ref.grad.abs().max()
    assert err < 1e-3, err
    assert torch.allclose(q.grad.double(), qq.grad, rtol=0.05, atol=0.05)


DIAG_CASES = [
    ("per-head", "causal", "s + rel[h, q - k + 47]", {}, {"rel": (H, 95)}, False),
    ("per-batch-and-head", "causal & window(20)", "s + rel[b, h, q - k + 47]", {},
     {"rel": (2, H, 95)}, False),
    ("shared-both-sides", "k <= q + 5", "s + rel[q - k + 47] * 0.5", {}, {"rel": (95,)}, False),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", DIAG_CASES, ids=[c[0] for c in DIAG_CASES])
@pytest.mark.parametrize("Hk,Lq", [(2, 48), (H, 20)], ids=["Hk2-L48", "Hk4-Lq20-Lk48"])
def test_triton_table_along_the_diagonals(case, Hk, Lq):
    """Tables read along ``q - k``: the dQ kernel sums each tile's diagonals and adds one
    sum per diagonal at its entry (no ``deterministic``); every gradient against the
    float64 reference, GQA and bottom-right aligned queries included."""
    check(case, "triton", Hk=Hk, Lq=Lq, Lk=48)
