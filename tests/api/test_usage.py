"""How a call is written: ``layout="bshd"``, keywords of other attention APIs, the warnings
about calls that run but are likely not meant (``runtime/usage.py``)."""
import warnings

import numpy
import pytest
import torch

import spattn
from spattn.dsl.errors import (SpattnEmptyPatternWarning, SpattnInputError,
                               SpattnLayoutWarning, SpattnParamError, SpattnTypeError,
                               SpattnValueError)
from spattn.nn import SparseAttention
from spattn.runtime.plan import PLANS
from spattn.runtime.reference import attention_reference


def _bshd(g, B, L, H, D):
    return torch.randn(B, L, H, D, generator=g).requires_grad_()


def _reference(pat, q, k, v, **inputs):
    """Output ``[B, Lq, Hq, D]`` and gradients of ``(o * do).sum()`` in float64, for bshd
    tensors (the reference itself is bhsd)."""
    q64, k64, v64 = (t.detach().double().transpose(1, 2).requires_grad_() for t in (q, k, v))
    B, Hq, Lq, _ = q64.shape
    mask = pat.mask(Lq, k64.shape[2], num_heads=Hq, batch=B, **inputs)
    o, _ = attention_reference(q64, k64, v64, mask)
    return o.transpose(1, 2), (q64, k64, v64)


def _check_grads(tensors, refs):
    for t, r in zip(tensors, refs):
        g = r.grad.transpose(1, 2)
        assert t.grad.shape == t.shape
        torch.testing.assert_close(t.grad.double(), g, rtol=1e-3,
                                   atol=1e-3 * float(g.abs().max()))


LAYOUT_CASES = [
    pytest.param("causal & window(9)", 2, 37, 4, 2, 16, "torch", id="window9-B2-L37-H4-Hk2-D16-torch"),
    pytest.param("causal & same(doc)", 1, 45, 2, 2, 32, "torch", id="same-doc-B1-L45-H2-D32-torch"),
    pytest.param("causal & window(9)", 1, 40, 2, 1, 16, "triton", marks=pytest.mark.interpreter,
                 id="window9-B1-L40-H2-Hk1-D16-triton"),
]


@pytest.mark.parametrize("src, B, L, H, HK, D, backend", LAYOUT_CASES)
def test_bshd_forward_and_backward_match_the_reference(src, B, L, H, HK, D, backend):
    g = torch.Generator().manual_seed(len(src) + L)
    pat = spattn.compile(src, backend=backend)
    q, k, v = _bshd(g, B, L, H, D), _bshd(g, B, L, HK, D), _bshd(g, B, L, HK, D)
    inputs = {"doc": torch.arange(L) // 11} if pat.inputs else {}
    o = pat(q, k, v, layout="bshd", **inputs)
    assert o.shape == (B, L, H, D)
    ref, refs = _reference(pat, q, k, v, **inputs)
    torch.testing.assert_close(o.double(), ref, rtol=1e-4, atol=1e-4)
    do = torch.randn(o.shape, generator=g)
    (o * do).sum().backward()
    (ref * do.double()).sum().backward()
    _check_grads((q, k, v), refs)


def test_bshd_through_attention_module_and_plan():
    """spattn.attention, nn.SparseAttention and a plan made with layout="bshd" (which the
    plan remembers) give what the bhsd call gives on the transposed tensors."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 33, 4, 16, generator=g) for _ in range(3))
    pat = spattn.compile("causal & window(W)", W=7, backend="torch")
    want = pat(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    got = {
        "attention": spattn.attention(q, k, v, pattern="causal & window(W)", W=7,
                                      backend="torch", layout="bshd"),
        "module": SparseAttention("causal & window(W)", W=7, backend="torch",
                                  layout="bshd")(q, k, v),
        "plan": pat(q, k, v, plan=pat.plan(q, k, v, layout="bshd")),
        "plan-explicit": pat(q, k, v, plan=pat.plan(q, k, v, layout="bshd"), layout="bshd"),
    }
    for name, o in got.items():
        assert o.shape == (2, 33, 4, 16), name
        assert torch.equal(o, want), name
    o, lse = pat(q, k, v, layout="bshd", return_lse=True)
    assert lse.shape == (2, 4, 33)
    assert "layout='bshd'" in repr(SparseAttention("causal", layout="bshd"))


def test_plan_made_for_bshd_refuses_bhsd_tensors():
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 24, 2, 16, generator=g)
    pat = spattn.compile("causal", backend="torch")
    plan = pat.plan(q, q, q, layout="bshd")
    with pytest.raises(SpattnInputError, match="the plan was built for"):
        pat(q, q, q, plan=plan, layout="bhsd")


@pytest.mark.parametrize("layout", ["BSHD", "nhd", 3, ""], ids=["upper", "nhd", "int", "empty"])
def test_unknown_layout_is_an_error(layout):
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(SpattnValueError, match="layout must be 'bhsd'.*or 'bshd'"):
        spattn.compile("causal")(q, q, q, layout=layout)
    with pytest.raises(SpattnValueError, match="layout must be"):
        SparseAttention("causal", layout=layout)


def test_bshd_rank_error_names_the_layout():
    q = torch.randn(8, 2, 16)
    with pytest.raises(SpattnInputError, match=r"\[B, L, H, D\] \(layout='bshd'\).*3-D"):
        spattn.compile("causal")(q, q, q, layout="bshd")


# ------------------------------------------------------------------ the layout warning

def test_transposed_looking_tensors_warn():
    """300 "heads" of length 4 is a [B, L, H, D] tensor read as [B, H, L, D]."""
    q = torch.randn(1, 300, 4, 16)
    pat = spattn.compile("causal", backend="torch")
    with pytest.warns(SpattnLayoutWarning, match=r"300 heads of length 4.*layout='bshd'"):
        pat(q, q, q)


@pytest.mark.parametrize("shape, layout", [
    pytest.param((1, 300, 4, 16), "bhsd", id="explicit-bhsd-silences"),
    pytest.param((1, 32, 1, 16), None, id="decode-32-heads-1-query"),
    pytest.param((1, 256, 8, 16), None, id="256-heads-not-above-limit"),
    pytest.param((1, 300, 400, 16), None, id="more-positions-than-heads"),
])
def test_plausible_tensors_do_not_warn(shape, layout):
    q = torch.randn(shape)
    pat = spattn.compile("causal", backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpattnLayoutWarning)
        pat(q, q, q, layout=layout)


# ------------------------------------------------------------------ SDPA keywords

SDPA = [
    pytest.param("is_causal", True, r"is_causal=True: .*write causality into it", id="is_causal"),
    pytest.param("attn_mask", torch.ones(8, 8, dtype=torch.bool),
                 r"attn_mask=<a tensor of shape \(8, 8\)>: .*runtime input.*spattn",
                 id="attn_mask"),
    pytest.param("enable_gqa", True, r"grouped-query attention is automatic", id="enable_gqa"),
    pytest.param("dropout_p", 0.0, r"no attention dropout", id="dropout_p"),
    pytest.param("key_padding_mask", torch.ones(1, 8, dtype=torch.bool), r"keep\[k\]",
                 id="key_padding_mask"),
    pytest.param("block_mask", object(), r"pat.plan\(q, k, v\)", id="block_mask"),
]


@pytest.mark.parametrize("name, value, match", SDPA)
def test_sdpa_keywords_say_what_to_write(name, value, match):
    q = torch.randn(1, 2, 8, 16)
    pat = spattn.compile("causal", backend="torch")
    calls = {
        "call": lambda: pat(q, q, q, **{name: value}),
        "plan": lambda: pat.plan(q, q, q, **{name: value}),
        "module": lambda: SparseAttention("causal")(q, q, q, **{name: value}),
        "functional-source": lambda: spattn.attention(q, q, q, pattern="causal",
                                                      **{name: value}),
        "functional-pattern": lambda: spattn.attention(q, q, q, pattern=pat, **{name: value}),
    }
    for where, fn in calls.items():
        with pytest.raises(SpattnParamError, match=match):
            fn()


@pytest.mark.parametrize("name, value", [("return_lse", "yes"), ("return_lse", 1),
                                         ("deterministic", "no"), ("deterministic", None)],
                         ids=["return_lse-str", "return_lse-int", "deterministic-str",
                              "deterministic-None"])
def test_flags_that_are_not_bools_are_refused(name, value):
    """``deterministic="no"`` would be true by Python's truth: a flag must be a bool."""
    q = torch.randn(1, 2, 8, 16)
    pat = spattn.compile("causal", backend="torch")
    calls = {
        "call": lambda: pat(q, q, q, **{name: value}),
        "module": lambda: SparseAttention("causal")(q, q, q, **{name: value}),
        "functional": lambda: spattn.attention(q, q, q, pattern=pat, **{name: value}),
    }
    for where, fn in calls.items():
        with pytest.raises(SpattnTypeError, match=rf"{name} must be True or False, got"):
            fn()
    if name == "return_lse":
        with pytest.raises(SpattnTypeError, match="return_lse must be True or False"):
            pat.decode(q[:, :, :1], q, q, return_lse=value)
    with pytest.raises(SpattnTypeError, match="check must be True or False"):
        pat.decode(q[:, :, :1], q, q, check="no")
    o, lse = pat(q, q, q, return_lse=numpy.bool_(True))     # numpy's bools are bools
    assert lse.shape == (1, 2, 8)


def test_an_input_named_like_an_sdpa_keyword_is_an_input():
    q = torch.randn(1, 2, 8, 16)
    pat = spattn.compile("input attn_mask\npattern p = attn_mask[q, k] != 0",
                         backend="torch")
    mask = torch.tril(torch.ones(8, 8, dtype=torch.int64))
    o = pat(q, q, q, attn_mask=mask)
    assert torch.equal(o, spattn.compile("causal", backend="torch")(q, q, q))


# ------------------------------------------------------------------ patterns that allow nothing

@pytest.mark.parametrize("src", ["window(0)", "causal & k > q", "q < k & k < q"])
def test_pattern_false_at_every_shape_warns_at_compile(src):
    with pytest.warns(SpattnEmptyPatternWarning, match="allows no .* at any shape"):
        pat = spattn.compile(src)
    assert pat.source == "false"


def test_pattern_empty_at_a_call_warns_at_its_first_call():
    """``q < 0`` allows pairs only for negative query positions: the call at the default
    (bottom-right) offset warns at its plan; a call with rows at -4..3 does not."""
    pat = spattn.compile("q < 0", backend="torch")
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 8, 16, generator=g)
    PLANS.clear()
    with pytest.warns(SpattnEmptyPatternWarning, match=r"\(q <= -1\).*Lq=8, Lk=8"):
        o = pat(q, q, q)
    assert torch.equal(o, torch.zeros_like(o))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpattnEmptyPatternWarning)
        pat(q, q, q)                      # the plan is cached: no second warning
        o = pat(q, q, q, q_offset=-4)
    assert o[:, :, :4].abs().sum() > 0


@pytest.mark.interpreter
def test_pattern_empty_with_inputs_warns_from_the_tables():
    """With runtime inputs the proof is the plan's tile table (the Triton backend's table
    strategy); the torch backend builds none, so it does not warn (never a false warning)."""
    q = torch.randn(1, 1, 8, 16)
    doc = torch.arange(8)
    with pytest.warns(SpattnEmptyPatternWarning, match=r"Lq=8, Lk=8"):
        spattn.compile("same(doc) & doc[q] < 0", backend="triton").plan(q, q, q, doc=doc)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpattnEmptyPatternWarning)
        spattn.compile("same(doc) & doc[q] < 0", backend="torch").plan(q, q, q, doc=doc)
        spattn.compile("same(doc) & doc[q] < 9", backend="triton").plan(q, q, q, doc=doc)


@pytest.mark.parametrize("src", ["causal & window(1)", "h == 1 & causal", "q - k >= 7"],
                         ids=["window1", "head1-only", "last-rows"])
def test_patterns_that_allow_something_do_not_warn(src):
    pat = spattn.compile(src, backend="torch")
    q = torch.randn(1, 2, 8, 16)
    PLANS.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpattnEmptyPatternWarning)
        pat(q, q, q)


# ------------------------------------------------------------------ kernel_source(q, k, v)

@pytest.mark.interpreter
@pytest.mark.parametrize("kind, D, dtype", [("fwd", 32, torch.float32), ("bwd", 16, torch.float16)],
                         ids=["fwd-D32-fp32", "bwd-D16-fp16"])
def test_kernel_source_of_tensors_is_the_kernel_they_run(kind, D, dtype):
    pat = spattn.compile("causal & window(9)", backend="triton")
    q = torch.randn(1, 2, 40, D, dtype=dtype)
    text = pat.kernel_source(q, q, q, kind=kind)
    plan = pat.plan(q, q, q, backward=kind == "bwd")
    if kind == "fwd":
        stage, kernel = plan.forward_stage, plan.forward_stage.kernel
    else:
        stage = next(iter(plan._bwd.values()))
        kernel = stage.dq_kernel
    c = stage.config
    assert f"def {kernel.fn.__name__}(" in text
    assert f"BLOCK_D = {D}\n" in text and f"dtype={c.dtype}" in text
    assert text == pat.kernel_source(kind, head_dim=D, dtype=dtype, strategy=c.strategy,
                                     block_m=c.block_m, block_n=c.block_n,
                                     num_warps=c.num_warps, num_stages=c.num_stages,
                                     loop=c.loop, tma=c.tma, **(
                                         {"block_m2": c.block_m2, "block_n2": c.block_n2}
                                         if kind == "bwd" else {}))
    assert text != pat.kernel_source(kind)          # not the default bf16 D=128 kernel


@pytest.mark.interpreter
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_kernel_source_of_few_queries_is_the_decode_kernel_they_run(layout, monkeypatch):
    """A call of few queries against many keys takes the decode route (docs/decode.md):
    kernel_source(q, k, v) shows the decode module whose kernels that call launches; with
    grad required it takes the normal path, and shows the forward kernel."""
    import triton.runtime.interpreter as interp
    ran = []
    get = interp.InterpretedFunction.__getitem__
    monkeypatch.setattr(interp.InterpretedFunction, "__getitem__",
                        lambda f, grid: (ran.append(f.fn.__name__), get(f, grid))[1])
    pat = spattn.compile("causal & window(64)", backend="triton")
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, L, 32, generator=g) for L in (2, 512, 512))
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    text = pat.kernel_source(q, k, v, layout=layout)
    pat(q, k, v, layout=layout)
    assert ran and all(name.startswith("attn_decode") for name in ran)
    assert all(f"def {name}(" in text for name in ran)
    ran.clear()
    qg = q.clone().requires_grad_()
    text = pat.kernel_source(qg, k, v, layout=layout)
    pat(qg, k, v, layout=layout)
    assert ran and all(f"def {name}(" in text for name in ran)
    assert not any(name.startswith("attn_decode") for name in ran)


@pytest.mark.parametrize("kw", ["return_lse", "deterministic", "order"])
def test_kernel_source_names_a_call_keyword_it_does_not_take(kw):
    """Not "unexpected runtime input": the keyword is the call's, and kernel_source says
    which ones it takes."""
    q = torch.randn(1, 2, 40, 16)
    with pytest.raises(SpattnParamError, match=rf"takes kind, scale, q_offset, layout and "
                                               rf"the runtime inputs of a call; '{kw}'"):
        spattn.compile("causal", backend="triton").kernel_source(q, q, q, **{kw: True})


def test_kernel_source_of_tensors_on_the_torch_backend_says_so():
    q = torch.randn(1, 2, 16, 16)
    with pytest.raises(spattn.SpattnBackendError, match="torch backend.*head_dim"):
        spattn.compile("causal", backend="torch").kernel_source(q, q, q)
    with pytest.raises(SpattnParamError, match="three tensors"):
        spattn.compile("causal").kernel_source(q, q)


def test_invalid_tensors_that_would_be_valid_as_bshd_get_a_hint():
    """Decoding with [B, L, H, D] tensors: one query, 8 cached keys, 4 query and 2 key heads
    read as 1 query head and 8 key heads."""
    q, k = torch.randn(1, 1, 4, 16), torch.randn(1, 8, 2, 16)
    pat = spattn.compile("causal", backend="torch")
    with pytest.raises(SpattnInputError, match=r"multiple.*pass layout='bshd'\)$"):
        pat(q, k, k)
    assert pat(q, k, k, layout="bshd").shape == (1, 1, 4, 16)
    with pytest.raises(SpattnInputError, match=r"same head dim.*layout='bshd' transposed"):
        pat(q, torch.randn(1, 8, 2, 32), k, layout="bshd")
    with pytest.raises(SpattnInputError) as e:        # invalid either way: no hint
        pat(q, torch.randn(1, 8, 3, 16), k)
    assert "layout" not in str(e.value)


@pytest.mark.parametrize("case", ["missing-input", "unexpected-input", "scored-plan-table"])
def test_no_layout_hint_where_bshd_would_fail_too(case):
    """Tensors that read as valid either way, and an error that reading them as [B, L, H, D]
    would not cure (an input missing or unexpected, a table's dtype): no layout hint."""
    q = torch.randn(1, 4, 4, 16)
    if case == "scored-plan-table":
        pat = spattn.compile("causal", score="s + rel[h, clamp(q - k, 0, 3)]", backend="torch")
        call, match = (lambda: pat.plan(q, q, q, rel=torch.ones(4, 4, dtype=torch.int64)),
                       "float table")
    elif case == "missing-input":
        pat = spattn.compile("input doc\npattern p = causal & same(doc)", backend="torch")
        call, match = (lambda: pat.plan(q, q, q)), "missing runtime input 'doc'"
    else:
        pat = spattn.compile("causal", backend="torch")
        call, match = (lambda: pat(q, q, q, doc=torch.zeros(4))), "unexpected runtime input"
    with pytest.raises(SpattnInputError, match=match) as e:
        call()
    assert "layout" not in str(e.value)
