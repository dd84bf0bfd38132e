"""Argument validation, backend selection, the functional form and the module."""
import re

import pytest
import torch

import spattn
from spattn.dsl.errors import (SpattnBackendError, SpattnInputError, SpattnParamError,
                               SpattnValueError)
from spattn.nn import SparseAttention
from spattn import functional
from spattn.runtime import api
from spattn.runtime.reference import attention_reference

PAT = spattn.compile("causal & window(16)", backend="torch")


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def good():
    return t(2, 4, 10, 16), t(2, 2, 12, 16), t(2, 2, 12, 16)


q0, k0, v0 = good()
BAD = [
    ("q-3d", "q", (2, 4, 10), (t(2, 4, 10), k0, v0)),
    ("k-5d", "k", (2, 2, 12, 16, 1), (q0, t(2, 2, 12, 16, 1), v0)),
    ("v-2d", "v", (12, 16), (q0, k0, t(12, 16))),
    ("k-batch", "k", (3, 2, 12, 16), (q0, t(3, 2, 12, 16), t(3, 2, 12, 16))),
    ("v-batch", "v", (1, 2, 12, 16), (q0, k0, t(1, 2, 12, 16))),
    ("kv-heads", "v", (2, 1, 12, 16), (q0, k0, t(2, 1, 12, 16))),
    ("kv-length", "v", (2, 2, 11, 16), (q0, k0, t(2, 2, 11, 16))),
    ("gqa-not-multiple", "k", (2, 3, 12, 16), (q0, t(2, 3, 12, 16), t(2, 3, 12, 16))),
    ("k-headdim", "k", (2, 2, 12, 32), (q0, t(2, 2, 12, 32), v0)),
    ("v-headdim", "v", (2, 2, 12, 0), (q0, k0, t(2, 2, 12, 0))),
    ("v-headdim-dtype", "v", (2, 2, 12, 32), (q0, k0, t(2, 2, 12, 32, dtype=torch.float16))),
    ("k-batch-v-headdim", "k", (3, 2, 12, 16), (q0, t(3, 2, 12, 16), t(3, 2, 12, 32))),
    ("headdim-zero", "q", (2, 4, 10, 0), (t(2, 4, 10, 0), t(2, 2, 12, 0), t(2, 2, 12, 0))),
    ("k-heads-empty", "k", (2, 0, 12, 16), (q0, t(2, 0, 12, 16), t(2, 0, 12, 16))),
    ("q-dtype-fp64-k-fp32", "k", (2, 2, 12, 16),
     (t(2, 4, 10, 16, dtype=torch.float64), t(2, 2, 12, 16), t(2, 2, 12, 16))),
    ("k-dtype-mismatch", "k", (2, 2, 12, 16), (q0, t(2, 2, 12, 16, dtype=torch.float16), v0)),
    ("v-dtype-mismatch", "v", (2, 2, 12, 16), (q0, k0, t(2, 2, 12, 16, dtype=torch.bfloat16))),
    ("q-int", "q", (2, 4, 10, 16), (torch.zeros(2, 4, 10, 16, dtype=torch.int32), k0, v0)),
    ("k-meta-device", "k", (2, 2, 12, 16), (q0, torch.empty(2, 2, 12, 16, device="meta"), v0)),
]


@pytest.mark.parametrize("arg,shape,qkv", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_tensor_names_argument_and_shape(arg, shape, qkv):
    with pytest.raises(SpattnInputError) as ei:
        PAT(*qkv)
    msg = str(ei.value)
    assert re.search(rf"\b{arg}\b", msg), msg
    assert str(shape) in msg, msg


def test_not_a_tensor():
    with pytest.raises(SpattnInputError, match=r"\bk\b.*torch.Tensor.*list"):
        PAT(q0, [1, 2], v0)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan"), "0.5", True],
                         ids=["zero", "negative", "inf", "nan", "str", "bool"])
def test_bad_scale(scale):
    with pytest.raises(SpattnValueError, match="scale"):
        PAT(q0, k0, v0, scale=scale)


@pytest.mark.parametrize("q_offset", [1.5, "3", True], ids=["float", "str", "bool"])
def test_bad_q_offset(q_offset):
    with pytest.raises(SpattnValueError, match="q_offset"):
        PAT(q0, k0, v0, q_offset=q_offset)


def test_scale_and_q_offset_accept_plain_numbers():
    import numpy as np
    o1 = PAT(q0, k0, v0, scale=1, q_offset=np.int64(2))
    o2 = PAT(q0, k0, v0, scale=1.0, q_offset=2)
    torch.testing.assert_close(o1, o2)


DOC = spattn.compile("causal & same(doc)", backend="torch")


def test_runtime_input_missing():
    with pytest.raises(SpattnInputError, match="missing runtime input 'doc'"):
        DOC(q0, k0, v0)


def test_runtime_input_extra():
    with pytest.raises(SpattnInputError, match="unexpected runtime input 'seg'"):
        DOC(q0, k0, v0, doc=torch.zeros(12, dtype=torch.long), seg=torch.zeros(12))


def test_runtime_input_wrong_dtype():
    with pytest.raises(SpattnInputError, match=r"'doc'.*float32.*\(12,\)"):
        DOC(q0, k0, v0, doc=torch.zeros(12))


def test_runtime_input_wrong_rank():
    with pytest.raises(SpattnInputError, match=r"'doc' has shape \(1, 1, 1, 12\)"):
        DOC(q0, k0, v0, doc=torch.zeros(1, 1, 1, 12, dtype=torch.long))


def test_runtime_input_wrong_batch():
    with pytest.raises(SpattnInputError, match=r"'doc' has shape \(3, 12\)"):
        DOC(q0, k0, v0, doc=torch.zeros(3, 12, dtype=torch.long))


def test_runtime_input_too_short():
    with pytest.raises(SpattnInputError, match=r"'doc' \(shape \(7,\)\)"):
        DOC(q0, k0, v0, doc=torch.zeros(7, dtype=torch.long))


def test_runtime_input_not_a_tensor():
    with pytest.raises(SpattnInputError, match="'doc' must be a torch.Tensor"):
        DOC(q0, k0, v0, doc=[0] * 12)


# ------------------------------------------------------------ backends

def test_backend_choice(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert api.choose_backend("auto", "cpu") == "torch"
    assert api.choose_backend("auto", "cuda") == "triton"
    assert api.choose_backend("torch", "cpu") == "torch"
    assert api.choose_backend("torch", "cuda") == "torch"
    assert api.choose_backend("triton", "cuda") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert api.choose_backend("auto", "cpu") == "triton"
    assert api.choose_backend("triton", "cpu") == "triton"
    assert api.choose_backend("torch", "cpu") == "torch"


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pat = spattn.compile("causal", backend="triton")
    with pytest.raises(SpattnBackendError, match=r"TRITON_INTERPRET=1.*backend='torch'"):
        pat(q0, k0, v0)


def test_auto_runs_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pat = spattn.compile("causal & window(5)")
    assert pat.plan(q0, k0, v0).backend == "torch"


def test_auto_runs_triton_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pat = spattn.compile("causal & window(6)")
    plan = pat.plan(q0, k0, v0)
    assert plan.backend == "triton" and "attn_fwd" in repr(plan)


# ------------------------------------------------------------ functional form

def test_functional_attention_matches_pattern_call():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 30, 16, generator=g) for _ in range(3))
    doc = torch.arange(30) // 7
    o = spattn.attention(q, k, v, pattern="causal & window(W) & same(doc)", W=9, doc=doc,
                         backend="torch")
    pat = spattn.compile("causal & window(9) & same(doc)", backend="torch")
    torch.testing.assert_close(o, pat(q, k, v, doc=doc))
    mask = pat.mask(30, 30, num_heads=2, doc=doc)
    ro, _ = attention_reference(q, k, v, mask)
    torch.testing.assert_close(o.double(), ro, rtol=1e-4, atol=1e-5)


def test_functional_attention_caches_compiled_patterns():
    functional._compiled.clear()
    a = functional.compile_cached("causal & window(W)", "torch", W=5)
    b = functional.compile_cached("causal & window(W)", "torch", W=5)
    c = functional.compile_cached("causal & window(W)", "torch", W=6)
    assert a is b and a is not c
    d = functional.compile_cached("q - k < S[h]", "torch", S=[1, 2])
    e = functional.compile_cached("q - k < S[h]", "torch", S=(1, 2))
    assert d is e
    # equal in Python, not to the compiler: each refused on every call, not only the first
    functional.compile_cached("causal & window(W)", "torch", W=1)
    for bad in (True, 1.0):
        with pytest.raises(spattn.SpattnParamError):
            functional.compile_cached("causal & window(W)", "torch", W=bad)


def test_functional_attention_with_pattern_object():
    o1 = spattn.attention(q0, k0, v0, pattern=PAT)
    torch.testing.assert_close(o1, PAT(q0, k0, v0))
    with pytest.raises(SpattnParamError, match="'W'"):
        spattn.attention(q0, k0, v0, pattern=PAT, W=3)
    with pytest.raises(SpattnParamError, match="str or a spattn.Pattern"):
        spattn.attention(q0, k0, v0, pattern=42)


def test_functional_attention_return_lse_and_q_offset():
    o, lse = spattn.attention(q0, k0, v0, pattern="causal", backend="torch", return_lse=True,
                              q_offset=-3)
    assert lse.shape == (2, 4, 10) and lse.dtype == torch.float32
    assert torch.isneginf(lse[:, :, :3]).all()
    assert torch.equal(o[:, :, :3], torch.zeros_like(o[:, :, :3]))


def test_functional_attention_takes_a_plan():
    """``spattn.attention(..., plan=)`` runs the plan as ``pat(q, k, v, plan=)`` does, and
    refuses the same mismatches: another pattern, other shapes, inputs beside the plan."""
    src = "causal & window(W) & same(doc)"
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 30, 16, generator=g) for _ in range(3))
    doc = torch.arange(30) // 7
    pat = spattn.compile(src, W=9, backend="torch")
    plan = pat.plan(q, k, v, doc=doc)
    want = pat(q, k, v, doc=doc)
    for given in (src, pat):
        params = {"W": 9} if given is src else {}
        o, lse = spattn.attention(q, k, v, pattern=given, plan=plan, return_lse=True, **params)
        torch.testing.assert_close(o, want)
        ro, rlse = attention_reference(q.double(), k.double(), v.double(),
                                       pat.mask(30, 30, num_heads=2, doc=doc))
        torch.testing.assert_close(o.double(), ro, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lse.double(), rlse, rtol=1e-4, atol=1e-5)
    with pytest.raises(SpattnParamError, match="the plan is for the pattern"):
        spattn.attention(q, k, v, pattern=src, W=5, plan=plan)
    with pytest.raises(SpattnInputError, match=r"the plan was built for .*\(1, 2, 24, 16\)"):
        spattn.attention(q[:, :, :24], k[:, :, :24], v[:, :, :24], pattern=pat, plan=plan)
    with pytest.raises(SpattnParamError, match="plan holds its inputs"):
        spattn.attention(q, k, v, pattern=pat, plan=plan, doc=doc)
    with pytest.raises(SpattnParamError, match="plan= takes a plan"):
        spattn.attention(q, k, v, pattern=pat, plan="plan")


# ------------------------------------------------------------ module

def test_sparse_attention_module():
    m = SparseAttention("causal & (window(W) | sink(2))", W=8, backend="torch")
    assert m.pattern.source in repr(m) and "backend='torch'" in repr(m)
    assert list(m.parameters()) == []
    torch.testing.assert_close(m(q0, k0, v0),
                               spattn.compile("causal & (window(8) | sink(2))",
                                              backend="torch")(q0, k0, v0))


def test_sparse_attention_module_inputs_and_errors():
    m = SparseAttention(DOC, backend="torch", scale=0.3)
    doc = torch.arange(12) // 5
    torch.testing.assert_close(m(q0, k0, v0, doc=doc), DOC(q0, k0, v0, doc=doc, scale=0.3))
    assert "scale=0.3" in repr(m) and "inputs=['doc']" in repr(m)
    with pytest.raises(SpattnParamError):
        SparseAttention(DOC, W=3)
    with pytest.raises(SpattnParamError):
        SparseAttention(3)
    with pytest.raises(SpattnInputError, match="missing runtime input"):
        m(q0, k0, v0)


def test_sparse_attention_module_return_lse_and_deterministic(monkeypatch):
    """``forward`` takes ``return_lse`` and ``deterministic`` as the pattern call does."""
    m = SparseAttention("causal & window(W)", W=4, backend="torch")
    o, lse = m(q0, k0, v0, return_lse=True)
    mask = m.pattern.mask(10, 12, num_heads=4)
    ro, rlse = attention_reference(q0.double(), k0.double(), v0.double(), mask)
    torch.testing.assert_close(o.double(), ro, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), rlse, rtol=1e-4, atol=1e-5)
    assert torch.equal(m(q0, k0, v0), o)
    seen = []
    real = api.call
    monkeypatch.setattr(api, "call", lambda *a, **kw: (seen.append(kw["deterministic"]),
                                                       real(*a, **kw))[1])
    scored = SparseAttention("causal score s + bias[q - k + 16]", backend="torch")
    bias = torch.randn(40, requires_grad=True)
    q = q0.clone().requires_grad_()
    scored(q, k0, v0, deterministic=True, bias=bias).sum().backward()
    assert seen == [True] and bias.grad is not None and q.grad is not None


def test_sparse_attention_module_takes_a_plan():
    """``forward`` takes ``plan=`` as the pattern call and ``spattn.attention`` do (the
    same refusals), and says that ``scale`` and ``layout`` are the module's."""
    m = SparseAttention("causal & window(W) & same(doc)", W=4, backend="torch")
    doc = torch.arange(12) // 5
    plan = m.pattern.plan(q0, k0, v0, doc=doc)
    o, lse = m(q0, k0, v0, plan=plan, return_lse=True)
    ro, rlse = attention_reference(q0.double(), k0.double(), v0.double(),
                                   m.pattern.mask(10, 12, num_heads=4, doc=doc))
    torch.testing.assert_close(o.double(), ro, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), rlse, rtol=1e-4, atol=1e-5)
    other = SparseAttention("causal & window(W) & same(doc)", W=5, backend="torch")
    with pytest.raises(SpattnParamError, match="the plan is for the pattern"):
        other(q0, k0, v0, plan=plan)
    with pytest.raises(SpattnParamError, match="plan holds its inputs"):
        m(q0, k0, v0, plan=plan, doc=doc)
    scaled = SparseAttention("causal & window(W) & same(doc)", W=4, backend="torch", scale=0.5)
    with pytest.raises(SpattnParamError, match="differs from the plan's"):
        scaled(q0, k0, v0, plan=plan)
    for name, value in (("scale", 0.5), ("layout", "bshd")):
        with pytest.raises(SpattnParamError, match=f"{name}= is fixed when the module is made"):
            m(q0, k0, v0, doc=doc, **{name: value})


def test_bounds_checked_once_per_plan_and_still_enforced(monkeypatch):
    """The input-bounds check runs when a plan is built: a call reusing the plan (the same
    input tensor, cached) checks nothing; a new input is checked, a short one refused."""
    from spattn.ir import intervals
    calls = []
    real = intervals.check_input_bounds
    monkeypatch.setattr(intervals, "check_input_bounds",
                        lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    pat = spattn.compile("causal & same(doc)", backend="torch")
    q = torch.randn(1, 2, 40, 16)
    doc = torch.arange(40) // 7
    for _ in range(3):
        pat(q, q, q, doc=doc)
    assert len(calls) == 1
    pat(q, q, q, doc=torch.arange(40) // 9)
    assert len(calls) == 2
    with pytest.raises(SpattnInputError, match="doc"):
        pat(q, q, q, doc=torch.arange(30))
    nested = spattn.compile("doc[doc[q]] == doc[k]", backend="torch")
    with pytest.raises(SpattnInputError, match="doc"):
        nested(q, q, q, doc=torch.full((40,), 45))


def test_import_spattn_gives_the_module_namespace():
    """``import spattn`` alone makes ``spattn.nn.SparseAttention`` available, as the docs
    write it (a fresh interpreter: this one imported ``spattn.nn`` already)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "import spattn; print(spattn.nn.SparseAttention"
                          "('causal', backend='torch').pattern.source)"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "q >= k", out.stderr


EMPTY = [("B0", (0, 4, 10, 16), (0, 2, 12, 16)), ("Hq0", (2, 0, 10, 16), (2, 0, 12, 16)),
         ("Lq0", (2, 4, 0, 16), (2, 2, 12, 16)), ("Lk0", (2, 4, 10, 16), (2, 2, 0, 16)),
         ("all0", (0, 0, 0, 16), (0, 0, 0, 16))]


@pytest.mark.parametrize("qs, ks", [e[1:] for e in EMPTY], ids=[e[0] for e in EMPTY])
@pytest.mark.parametrize("src, score", [("causal & window(4)", None),
                                        ("causal & same(doc)", None),
                                        ("causal", "s + rel[h, clamp(q - k, 0, 7)]")],
                         ids=["window", "documents", "table-score"])
def test_empty_calls_return_what_sdpa_returns(qs, ks, src, score):
    """A batch, head count or length of 0 returns what SDPA returns: outputs of the
    call's shape, 0 where a query row has no key (and lse -inf), gradients of zeros for
    q, k, v and a score's table; the arguments are checked as far as they mean anything
    (a missing runtime input is still an error)."""
    import torch.nn.functional as F
    pat = spattn.compile(src, score=score, backend="torch")
    q, k, v = t(*qs).requires_grad_(), t(*ks).requires_grad_(), t(*ks).requires_grad_()
    kw = {}
    if "doc" in src:
        kw["doc"] = torch.zeros(max(qs[2], ks[2]), dtype=torch.long)
    if score:
        kw["rel"] = t(qs[1], 8).requires_grad_()
    o, lse = pat(q, k, v, return_lse=True, **kw)
    assert o.shape == q.shape and o.dtype == q.dtype and lse.shape == q.shape[:3]
    assert torch.equal(o, torch.zeros_like(o)) and bool(torch.isneginf(lse).all())
    if q.shape[1] == k.shape[1]:
        torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v).detach()
                                   .nan_to_num(0.0))
    (o.sum() + lse.clamp(min=0).sum()).backward()
    for x in (q, k, v, *(kw.values() if score else ())):
        assert x.grad is not None and x.grad.shape == x.shape and not x.grad.any()
    if kw and "doc" in kw:
        with pytest.raises(SpattnInputError, match="missing runtime input 'doc'"):
            pat(q, k, v)
    bshd = pat(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="bshd", **kw)
    assert bshd.shape == q.transpose(1, 2).shape


@pytest.mark.parametrize("dtype, D", [(torch.float64, 16), (torch.float32, 300),
                                      (torch.float32, 3)], ids=["f64-D16", "f32-D300", "f32-D3"])
def test_empty_calls_take_what_the_torch_backend_takes(dtype, D):
    """float64 and head dims outside the kernels' 16..256 run on the torch backend; empty
    calls of them are empty as the others are, not refused with a pointer to that same
    backend."""
    pat = spattn.compile("causal", backend="torch")
    x = torch.randn(1, 2, 5, D, dtype=dtype)
    assert pat(x, x, x).dtype == dtype
    e = torch.randn(0, 2, 5, D, dtype=dtype)
    o, lse = pat(e, e, e, return_lse=True)
    assert o.shape == e.shape and o.dtype == dtype and not o.any()
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if dtype == torch.float64:      # the Triton backend still points there
        with pytest.raises(SpattnInputError, match="float64 on the torch backend"):
            spattn.compile("causal", backend="triton")(e, e, e)


def test_a_scale_that_requires_grad_is_refused():
    """A scale tensor that requires grad (a learnable temperature) would get no gradient:
    a SpattnValueError points at a score with a learnable table; without grad mode, or
    as a plain tensor, the scale is its value."""
    s = torch.tensor(0.3, requires_grad=True)
    with pytest.raises(SpattnValueError, match="requires grad.*score="):
        PAT(q0, k0, v0, scale=s)
    with torch.no_grad():
        torch.testing.assert_close(PAT(q0, k0, v0, scale=s), PAT(q0, k0, v0, scale=0.3))
    torch.testing.assert_close(PAT(q0, k0, v0, scale=torch.tensor(0.3)),
                               PAT(q0, k0, v0, scale=0.3))


@pytest.mark.parametrize("D", [3, 8, 300])
def test_head_dims_the_kernels_refuse_point_to_the_torch_backend(D):
    """Below 16 as above 256, the Triton refusal says the torch backend takes the head
    dim, and how to pick it (under the interpreter 'auto' runs the kernels on the CPU
    too, so only backend='torch' is named there)."""
    from spattn.runtime.api import _interpret
    x = torch.randn(1, 1, 4, D)
    with pytest.raises(SpattnInputError, match=r"16\.\.256, got .*torch backend takes any head "
                                                r"dim \(backend='torch'"):
        spattn.compile("causal", backend="triton")(x, x, x)
    try:
        spattn.compile("causal", backend="triton")(x, x, x)
    except SpattnInputError as e:
        assert ("'auto' on the CPU" in str(e)) == (not _interpret())
    assert spattn.compile("causal", backend="torch")(x, x, x).shape == x.shape


def test_functional_tensor_where_the_pattern_reads_a_param():
    """``spattn.attention`` passes tensors as runtime inputs; a 0-d tensor for a name the
    pattern reads unindexed (a param) was refused as an unknown name 'W' although W= was
    given: the error now says what the call did with it and what to pass."""
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(spattn.SpattnParamError, match=r"'W' is given as a tensor \(shape \[\]\)"
                                                      r".*W=W.tolist\(\)") as info:
        spattn.attention(q, q, q, pattern="causal & q - k <= W", W=torch.tensor(3))
    assert (info.value.line, info.value.column) == (1, 19)
    with pytest.raises(spattn.SpattnNameError, match="unknown name 'Wx'"):
        spattn.attention(q, q, q, pattern="causal & q - k <= Wx", W=torch.tensor(3))
    want = spattn.attention(q, q, q, pattern="causal & q - k <= W", W=3)
    torch.testing.assert_close(
        spattn.attention(q, q, q, pattern="causal & q - k <= W[h]", W=torch.tensor([3])), want)


def test_decode_plan_and_kernel_source_name_keywords_they_do_not_take():
    """SDPA keywords get the same advice from ``decode`` and ``plan`` as from a call (they
    were 'unexpected runtime input'), and a configuration option given to the tensor form
    of ``kernel_source`` names the form that takes it."""
    p = spattn.compile("causal", backend="torch")
    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 4, 64, 16)
    with pytest.raises(SpattnParamError, match="is_causal=True: spattn takes no is_causal"):
        p.decode(q, k, k, is_causal=True)
    with pytest.raises(SpattnParamError, match="attn_mask=None: spattn takes no dense"):
        p.plan(k, k, k, attn_mask=None)
    with pytest.raises(SpattnParamError, match=r"'head_dim' is an option of "
                                               r"kernel_source\(kind, \*\*options\)"):
        spattn.compile("causal").kernel_source(k, k, k, head_dim=32)


def test_numpy_integers_are_lengths_as_they_are_offsets():
    """``mask``, ``tiles`` and ``explain`` take numpy integers as ``q_offset`` always did (a
    length or tile side from a numpy array was refused); a numpy bool is still refused."""
    import numpy as np
    p = spattn.compile("causal & window(3)")
    n = np.int64(12)
    assert torch.equal(p.mask(n, n, num_heads=np.int32(2)), p.mask(12, 12, num_heads=2))
    assert torch.equal(p.tiles(n, n, np.int64(4), np.int64(4)), p.tiles(12, 12, 4, 4))
    assert str(p.explain(n, block_m=np.int64(16), block_n=16)) == \
        str(p.explain(12, block_m=16, block_n=16))
    with pytest.raises(spattn.SpattnValueError, match="Lq must be a positive integer"):
        p.mask(np.bool_(True), 4)


def test_numpy_bools_are_bools_and_not_ints():
    """numpy's bool (``numpy.bool``, named ``bool_`` before numpy 2) is a bool where a
    check takes a flag (``is_causal`` of a neighbourhood, per axis too) and is no integer
    where one takes an int (``q_offset``); numpy integers are ints."""
    import numpy
    want = spattn.neighborhood((8, 8), (3, 3), is_causal=(True, False), backend="torch")
    got = spattn.neighborhood((8, 8), (3, 3), is_causal=(numpy.True_, numpy.False_),
                              backend="torch")
    assert got.source == want.source
    with pytest.raises(SpattnParamError, match="is_causal takes bools"):
        spattn.neighborhood((8, 8), (3, 3), is_causal=(numpy.int64(1), False))
    p = spattn.compile("causal", backend="torch")
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(SpattnValueError, match="q_offset must be an int"):
        p(q, q, q, q_offset=numpy.True_)
    torch.testing.assert_close(p(q, q, q, q_offset=numpy.int64(3)), p(q, q, q, q_offset=3))
