"""Additive and capped scores in the warp-specialised kernels (``runtime/ws_fwd.py``,
``runtime/ws_bwd.py``).

On the CPU: which scores are additive (:func:`spattn.ir.score.additive`), the vectors the
kernels read (:func:`spattn.runtime.ws_fwd.score_vectors`: slope, keys' and queries'
terms) recombined into every pair's score against the score evaluated densely in float64,
the refusals, and the backward's lse less the rows' terms; which scores are capped
(:func:`spattn.ir.score.capped`, the forward's softcapping) and their kernel arguments. On
an sm_90 GPU (marker ``gpu``): outputs, lse and gradients of calls both Gluon kernels run,
and of capped scores through the Gluon forward, against the float64 reference.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spattn
from spattn.ir.score import LOG2E, Capped, additive, capped, score_env, score_values
from spattn.runtime import settings as S
from spattn.runtime import ws_bwd, ws_fwd
from spattn.runtime.plan import Call
from tests.runtime.test_ws_bwd import _ws_stages
from tests.runtime.test_ws_fwd import _check, _rand, checked_plan, hopper

SLOPES = [2.0 ** -(i + 1) for i in range(4)]

ADDITIVE = [  # id, score, params
    ("alibi-prelude", "alibi(alibi_slope)", {}),
    ("alibi-param", "alibi(m[h])", {"m": SLOPES}),
    ("offset-written-q-minus-k", "s - 0.25 * float(q - k + 3)", {}),
    ("scaled-s-and-offset", "2.0 * s + 0.1 * float(k - q)", {}),
    ("key-terms", "s + 0.3 * float(k % 7) - 0.5 * float(k // 100)", {}),
    ("query-terms", "s + 0.2 * float(q % 5) + exp(-float(h))", {}),
    ("all-three", "alibi(m[h]) + 0.3 * float((k + h) % 7) - 0.01 * float(q * b)",
     {"m": SLOPES}),
    ("plain-s", "s", {}),
    ("several-s-terms", "2.0 * s + alibi(m[h]) - s", {"m": SLOPES}),
    ("s-times-ln2", "s * 0.6931471805599453 + s", {}),
    ("s-over-log2e", "s / 1.4426950408889634 - 0.1 * float(q - k)", {}),
    ("large-constant-slope", "s + 3.0 * float(k - q + 2)", {}),
]
NOT_ADDITIVE = [  # id, score
    ("softcap", "softcap(30.0)"),
    ("square", "s * s"),
    ("pair-product", "s + float(q * k) * 0.001"),
    ("pair-modulo", "s + float((q - k) % 5)"),
    ("negative-factor", "-1.0 * s"),
    ("offset-times-key", "s + float(k - q) * float(k) * 0.001"),
    ("table", "s + rel[h, clamp(q - k, 0, 7)]"),
    ("s-cancelled", "s - s + 0.1 * float(k)"),
]


def _call(pat, B, H, Lq, Lk, q_offset=None, inputs=None):
    q, k = torch.empty(B, H, Lq, 64), torch.empty(B, H, Lk, 64)
    return Call.of(pat, q, k, scale=0.125, q_offset=q_offset, inputs=inputs or {},
                   settings=S.current(), backend="torch")


@pytest.mark.parametrize("src,params", [c[1:] for c in ADDITIVE], ids=[c[0] for c in ADDITIVE])
@pytest.mark.parametrize("B,H,Lq,Lk,q_offset", [(2, 4, 50, 300, None), (1, 4, 260, 130, 7)],
                         ids=["B2-H4-Lq50-Lk300", "B1-H4-Lq260-Lk130-offset7"])
def test_vectors_recombine_to_the_score(src, params, B, H, Lq, Lk, q_offset):
    """``c * s + slope * (k - q) + cols[k] + rows[q]`` (log2 units) from the vectors is the
    score at every pair, on random ``s``; past ``Lk`` the keys' terms are 0."""
    pat = spattn.compile("causal", score=src, **params)
    assert additive(pat.score) is not None
    call = _call(pat, B, H, Lq, Lk, q_offset)
    sv = ws_fwd.score_vectors(call, "cpu")
    off = call.positions.q_offset
    s = torch.randn(B, H, Lq, Lk, dtype=torch.float64)
    want = score_values(pat.score, s, score_env(Lq, Lk, num_heads=H, batch=B, q_offset=off),
                        {}) * LOG2E
    dk = (torch.arange(Lk)[None, :] - torch.arange(Lq)[:, None] - off).double()
    got = (sv.c * LOG2E * s + sv.slopes.double()[:, :, None, None] * dk
           + sv.cols.double()[..., None, :Lk] + sv.rows.double()[..., None])
    torch.testing.assert_close(got, want, atol=1e-4 * (1 + float(want.abs().max())), rtol=0)
    assert sv.cols.shape[-1] % 128 == 0 and not sv.cols[..., Lk:].any()
    assert sv.keys == bool(sv.cols.any())
    sb, sh, rb, rh = sv.strides()
    assert (sb == 0) == (sv.cols.shape[0] == 1) and (rh == 0) == (sv.rows.shape[1] == 1)


def test_vectors_read_int_inputs():
    """Terms of an int runtime input (the documents' ids of the key and of the query) are
    evaluated at the call's values."""
    pat = spattn.compile("causal & same(doc)",
                         score="s + 0.1 * float(doc[k]) - 0.5 * float(doc[q])")
    doc = torch.sort(torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(0)
                                   )).values
    sv = ws_fwd.score_vectors(_call(pat, 1, 2, 300, 300, inputs={"doc": doc}), "cpu")
    torch.testing.assert_close(sv.cols[0, 0, :300], (0.1 * LOG2E * doc).float())
    torch.testing.assert_close(sv.rows[0, 0], (-0.5 * LOG2E * doc).float())
    assert sv.keys and not sv.slopes.any()


def test_vectors_of_per_batch_inputs():
    """A runtime input with a batch axis (``[B, L]``) makes the terms vary with the batch
    element though they do not name ``b``."""
    pat = spattn.compile("causal & same(doc)",
                         score="s + 0.1 * float(doc[k]) - 0.5 * float(doc[q])")
    doc = torch.sort(torch.randint(0, 5, (3, 300), generator=torch.Generator().manual_seed(1)),
                     dim=-1).values
    sv = ws_fwd.score_vectors(_call(pat, 3, 2, 300, 300, inputs={"doc": doc}), "cpu")
    assert sv.cols.shape[0] == 3 and sv.rows.shape[0] == 3
    torch.testing.assert_close(sv.cols[:, 0, :300], (0.1 * LOG2E * doc).float())
    torch.testing.assert_close(sv.rows[:, 0], (-0.5 * LOG2E * doc).float())


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_additive_is_sound_on_random_scores(seed):
    """Whatever random score ``additive`` accepts (random scores of the interpreter
    searches, and random additive ones), its vectors recombine to the score at every pair:
    a score is never taken for additive when it is not."""
    import random
    from tests.helpers.adversarial import rand_score, score_params
    from tests.helpers.gpu_fuzz import rand_additive
    r = random.Random(seed)
    src = rand_additive(r) if r.random() < 0.3 else rand_score(r, r.randint(1, 3))
    try:
        pat = spattn.compile("causal", score=src, **score_params(src, 3))
    except spattn.SpattnError:
        return
    if additive(pat.score) is None:
        return
    B, H, Lq, Lk = 2, 3, 21, 37
    call = _call(pat, B, H, Lq, Lk, r.choice([None, 0, 9]))
    sv = ws_fwd.score_vectors(call, "cpu")
    if isinstance(sv, str):
        return
    off = call.positions.q_offset
    s = torch.randn(B, H, Lq, Lk, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed))
    want = score_values(pat.score, s, score_env(Lq, Lk, num_heads=H, batch=B, q_offset=off),
                        {}) * LOG2E
    dk = (torch.arange(Lk)[None, :] - torch.arange(Lq)[:, None] - off).double()
    got = (sv.c * LOG2E * s + sv.slopes.double()[:, :, None, None] * dk
           + sv.cols.double()[..., None, :Lk] + sv.rows.double()[..., None])
    torch.testing.assert_close(got, want, atol=1e-4 * (1 + float(want.abs().max())), rtol=0,
                               msg=src)


@pytest.mark.parametrize("src", [c[1] for c in NOT_ADDITIVE], ids=[c[0] for c in NOT_ADDITIVE])
def test_other_scores_are_not_additive(src):
    pat = spattn.compile("causal", score=src)
    assert additive(pat.score) is None
    why = ws_fwd.score_why_not(_call(pat, 1, 2, 256, 256), None)
    assert why is not None and "not additive" in why


def test_terms_that_are_not_finite_stay_with_the_generated_kernels():
    pat = spattn.compile("causal", score="s + log(float(q))")     # -inf at q = 0
    assert additive(pat.score) is not None
    assert "not finite" in ws_fwd.score_vectors(_call(pat, 1, 2, 256, 256), "cpu")


def test_call_rules_take_additive_scores():
    from spattn.runtime.triton_backend import BoxRows
    pat = spattn.compile("causal", score="alibi(alibi_slope)")
    call = _call(pat, 1, 2, 256, 256)
    assert ws_fwd.score_why_not(call, None) is None
    assert "layout" in ws_fwd.score_why_not(call, BoxRows((1, 16, 16), (1, 8, 16), False))
    assert ws_fwd.score_why_not(_call(spattn.compile("causal"), 1, 2, 256, 256), None) is None


def test_backward_rows_leave_out_the_row_terms():
    """The dK/dV kernel's lse rows: the lse less the slope times ``r - q`` (``r`` the first
    query of the row's tile of 64) and the queries' terms; a row at +inf stays there."""
    pat = spattn.compile("causal", score="alibi(m[h]) + 0.2 * float(q % 5)", m=SLOPES)
    B, H, Lq = 1, 4, 300
    call = _call(pat, B, H, Lq, 300)
    sv = ws_fwd.score_vectors(call, "cpu")
    q = torch.empty(B, H, Lq, 64, dtype=torch.bfloat16)
    lists = ws_bwd.QueryLists(*(torch.zeros(1, dtype=torch.int32) for _ in range(4)),
                              torch.zeros(1, 64, 128, dtype=torch.uint8), (0, 0), 1)
    ws = ws_bwd.WsBwd(call, q, q, lists, sv)
    lse2, delta = torch.randn(2, B, H, Lq).unbind(0)
    lse2[0, 1, 17] = float("inf")
    got, _ = ws.rows(lse2, delta)
    got = got.view(B, H, ws.lq_rows)[..., :Lq]
    rq = torch.arange(Lq)
    want = lse2 - (sv.slopes[:, :, None] * ((rq // 64) * 64 - rq) + sv.rows)
    assert torch.equal(got, want) and got[0, 1, 17] == float("inf")
    assert ws.static[12] == pytest.approx(0.125 * LOG2E * sv.c)


CAPPED = [  # id, score, natural cap, f
    ("softcap-prelude", "softcap(30.0)", 30.0, 1 / 30),
    ("softcap-times-two", "30 * tanh(s / 30) * 2", 60.0, 1 / 30),
    ("plain-tanh", "tanh(s)", 1.0, 1.0),
    ("negative-factor-inside", "3.0 * tanh(-0.5 * s)", 3.0, -0.5),
    ("over-log2e", "tanh(2.0 * s) / 1.4426950408889634", 1 / LOG2E, 2.0),
]
NOT_CAPPED = [  # id, score
    ("plus-s", "softcap(30.0) + s"),
    ("plus-alibi", "softcap(30.0) + alibi(alibi_slope)"),
    ("negative-cap", "-30.0 * tanh(s / 30.0)"),
    ("position-inside", "tanh(s * float(q))"),
    ("param-list-cap", "c[h] * tanh(s)"),
    ("tanh-squared", "tanh(s) * tanh(s)"),
    ("plain-s", "s"),
    ("table", "tanh(s + rel[h, clamp(q - k, 0, 7)])"),
]


@pytest.mark.parametrize("src,cap,f", [c[1:] for c in CAPPED], ids=[c[0] for c in CAPPED])
def test_capped_forms(src, cap, f):
    """The form's cap (log2 units) and inner factor, and ``cap * tanh(f * s)`` against the
    score evaluated in float64 at random scores (log2 units)."""
    pat = spattn.compile("causal", score=src)
    got = capped(pat.score)
    assert got == Capped(pytest.approx(cap * LOG2E, rel=1e-12), pytest.approx(f, rel=1e-12))
    s = torch.randn(2, 3, 40, 50, dtype=torch.float64) * 20
    env = score_env(40, 50, num_heads=3, batch=2, q_offset=None)
    want = score_values(pat.score, s, env, {}) * LOG2E
    torch.testing.assert_close(got.cap * torch.tanh(got.f * s), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("src", [c[1] for c in NOT_CAPPED], ids=[c[0] for c in NOT_CAPPED])
def test_other_scores_are_not_capped(src):
    pat = spattn.compile("causal", score=src, **({"c": [1.0, 2.0]} if "c[h]" in src else {}))
    assert capped(pat.score) is None


def test_capped_scores_run_in_the_forward_alone():
    """The forward takes a capped score (in sequence order and in a layout's boxes); the
    dK/dV and dQ kernels do not (the generated backward runs)."""
    from spattn.runtime.triton_backend import BoxRows
    call = _call(spattn.compile("causal", score="softcap(30.0)"), 1, 2, 256, 256)
    assert ws_fwd.score_why_not(call, None, capped_ok=True) is None
    assert ws_fwd.score_why_not(call, BoxRows((1, 16, 16), (1, 8, 16), False),
                                capped_ok=True) is None
    assert "not additive" in ws_fwd.score_why_not(call, None)
    assert ws_fwd.fwd_score(call, "cpu") == capped(call.pattern.score)


def test_capped_stage_arguments():
    """A capped score's launch: ``SCORED`` 3, the cap as the softmax's scale, the factor of
    q·k inside tanh (the call's scale times ``f``), no score tables."""
    from tests.helpers.compile_ws import diagonal_lists
    pat = spattn.compile("causal", score="softcap(50.0)")
    q = torch.empty(1, 2, 512, 64, dtype=torch.bfloat16)
    call = Call.of(pat, q, q, scale=0.1, q_offset=None, inputs={}, settings=S.current(),
                   backend="triton", v=q)
    cap = ws_fwd.fwd_score(call, "cpu")
    stage = ws_fwd.WsFwdStage(call, q, q, q, None, diagonal_lists(512, "full"), cap)
    assert stage.meta["SCORED"] == 3 and "capped" in repr(stage)
    sm_scale_log2, *sc = stage.static[19:]
    assert sm_scale_log2 == pytest.approx(50.0 * LOG2E)
    assert sc[-1] == pytest.approx(0.1 / 50.0) and sc[3:8] == [0] * 5


# ---------------------------------------------------------------- on the GPU

GPU_CASES = [  # mask, score, params, B, H, Hk, Lq, Lk, D, dtype
    ("causal", "alibi(alibi_slope)", {}, 1, 4, 2, 2048, 2048, 128, torch.bfloat16),
    ("causal", "alibi(m[h])", {"m": SLOPES}, 2, 4, 4, 1000, 1000, 64, torch.float16),
    ("causal", "alibi(alibi_slope)", {}, 1, 2, 2, 333, 1500, 128, torch.bfloat16),
    ("causal & same(doc)", "2.0 * s + 0.3 * float(k % 7) - 0.02 * float(q % 5)", {},
     2, 2, 1, 1900, 1900, 128, torch.bfloat16),
    ("full", "s - 0.01 * float(q - k) + 0.5 * float((k + h) % 3)", {}, 1, 2, 2, 1024, 1024,
     64, torch.bfloat16),
]
GPU_IDS = [f"B{c[3]}-H{c[4]}-Hk{c[5]}-Lq{c[6]}-Lk{c[7]}-D{c[8]}-{str(c[9])[6:]}"
           f"-{c[0].split(' ')[0]}-{c[1].split('(')[0].split(' ')[0]}" for c in GPU_CASES]


@pytest.mark.parametrize("mask,score,params,B,H,Hk,Lq,Lk,D,dtype", GPU_CASES, ids=GPU_IDS)
@hopper
def test_scored_gluon_kernels_gpu(mask, score, params, B, H, Hk, Lq, Lk, D, dtype,
                                  monkeypatch):
    """An additive score through the warp-specialised forward and dK/dV kernel: o, lse
    and the gradients to q, k, v of a fresh dO against the float64 reference."""
    monkeypatch.setenv("SPATTN_WS_FWD", "1")
    monkeypatch.setenv("SPATTN_WS_BWD", "1")
    plan = checked_plan(mask, score, params, B, H, Hk, Lq, Lk, D, dtype, Lq + Lk + B + H + D,
                        lse_tol=2e-3)
    assert plan.forward_stage.gluon, plan.forward_stage
    assert _ws_stages(plan), plan._bwd


CAPPED_GPU = [  # mask, score, B, H, Hk, Lq, Lk, D, dtype
    ("causal", "softcap(30.0)", 1, 4, 2, 2048, 2048, 128, torch.bfloat16),
    ("causal & same(doc)", "softcap(50.0)", 2, 2, 1, 1900, 1900, 64, torch.float16),
    ("full", "3.0 * tanh(-0.5 * s)", 1, 2, 2, 333, 1500, 128, torch.bfloat16),
    ("k + 100 < q", "softcap(5.0)", 1, 2, 2, 1024, 1024, 64, torch.bfloat16),
]


@pytest.mark.parametrize("mask,score,B,H,Hk,Lq,Lk,D,dtype", CAPPED_GPU,
                         ids=[f"B{c[2]}-H{c[3]}-Hk{c[4]}-Lq{c[5]}-Lk{c[6]}-D{c[7]}-"
                              f"{str(c[8])[6:]}-{c[0].split(' ')[0]}" for c in CAPPED_GPU])
@hopper
def test_capped_gluon_forward_gpu(mask, score, B, H, Hk, Lq, Lk, D, dtype, monkeypatch):
    """A capped score through the warp-specialised forward (the generated backward on its
    lse): o, lse and the gradients of a fresh dO against the float64 reference; rows
    without keys (``k + 100 < q``) give o 0 and lse -inf."""
    monkeypatch.setenv("SPATTN_WS_FWD", "1")
    plan = checked_plan(mask, score, {}, B, H, Hk, Lq, Lk, D, dtype, Lq + Lk + B + H + D + 1,
                        lse_tol=2e-3)
    assert plan.forward_stage.gluon and plan.forward_stage.meta["SCORED"] == 3, plan
    assert not _ws_stages(plan), plan._bwd


@hopper
def test_capped_gluon_forward_on_a_neighbourhood_gpu(monkeypatch):
    """A capped score on a 2-D neighbourhood: through a plan (rows in sequence order, the
    Gluon forward reading the mask's PARTIAL tiles) and through the pattern's call (a
    scored call runs in its layout's slot order, ``runtime.scores.LayoutRun``)."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    monkeypatch.setenv("SPATTN_WS_FWD", "1")
    g = torch.Generator(device="cuda").manual_seed(2048)
    q, k, v = (_rand((1, 2, 2048, 128), torch.bfloat16, g) for _ in range(3))
    pat = (spattn.neighborhood((32, 64), (16, 16), stride=(16, 16))
           & spattn.compile("true", score="softcap(20.0)"))
    plan = pat.plan(q, k, v)
    assert plan.forward_stage.gluon and plan.forward_stage.meta["SCORED"] == 3, plan
    _check(pat, q, k, v, {}, plan=plan, lse_tol=2e-3)
    for t in (q, k, v):
        t.grad = None
    _check(pat, q, k, v, {}, lse_tol=2e-3)
