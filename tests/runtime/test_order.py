"""Calls in a caller's token order (``order=``): the output and gradients, in the caller's
order, match the float64 reference of the mask over the original positions, forward and
backward, GQA, runtime inputs, per-head patterns, both backends; the plan holds the order
(cached like a runtime input); bad orders are SpattnInputErrors naming ``order``."""
import pytest
import torch

import spattn
from spattn.runtime.plan import PLANS, OrderedPlan, RemappedPlan
from spattn.runtime.reference import attention_reference
from tests.runtime.test_torch_backend import _close, check_with_reference


def _tensors(B, Hq, Hk, N, D, g, grads=True):
    return (torch.randn(B, Hq, N, D, generator=g).requires_grad_(grads),
            torch.randn(B, Hk, N, D, generator=g).requires_grad_(grads),
            torch.randn(B, Hk, N, D, generator=g).requires_grad_(grads))


def _run(pat, order, *, B=1, Hq=2, Hk=1, N, D=16, seed=0, inputs=None, use_plan=True):
    g = torch.Generator().manual_seed(seed)
    inputs = dict(inputs or {})
    q, k, v = _tensors(B, Hq, Hk, N, D, g)
    if use_plan:
        plan = pat.plan(q, k, v, order=order, **inputs)
        o, lse = pat(q, k, v, plan=plan, return_lse=True)
    else:
        plan = None
        o, lse = pat(q, k, v, order=order, return_lse=True, **inputs)
    check_with_reference(o, lse, q, k, v, pat.mask(N, N, num_heads=Hq, batch=B, **inputs), g)
    return plan


def _perm(N, seed=0):
    return torch.randperm(N, generator=torch.Generator().manual_seed(seed))


# id, pattern factory, N, B, Hq, Hk, inputs
CASES = [
    ("B1-Hq2-Hk1-L48-D16-fp32-nb2d", lambda be: spattn.neighborhood((8, 6), 3, backend=be),
     48, 1, 2, 1, None),
    ("B2-Hq2-Hk2-L60-D16-fp32-nb3d-stride",
     lambda be: spattn.neighborhood((3, 4, 5), (3, 2, 3), stride=(1, 2, 1), backend=be),
     60, 2, 2, 2, None),
    ("B1-Hq4-Hk2-L40-D16-fp32-doc",
     lambda be: spattn.compile("causal & same(doc)", backend=be), 40, 1, 4, 2, "doc"),
    ("B1-Hq2-Hk1-L36-D16-fp32-perhead",
     lambda be: spattn.compile("window([3, 7][h]) & (q - k) % 2 == 0", backend=be),
     36, 1, 2, 1, None),
]


def _inputs(kind, N):
    if kind == "doc":
        g = torch.Generator().manual_seed(5)
        return {"doc": torch.randint(0, 4, (N,), generator=g).sort().values}
    return {}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_torch_backend_in_a_callers_order(case):
    _, make, N, B, Hq, Hk, ins = case
    pat = make("torch")
    plan = _run(pat, _perm(N), B=B, Hq=Hq, Hk=Hk, N=N, inputs=_inputs(ins, N))
    assert isinstance(plan, OrderedPlan)
    assert "token order: the caller's" in repr(plan)


@pytest.mark.interpreter
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=[CASES[0][0], CASES[2][0]])
def test_triton_in_a_callers_order(case):
    _, make, N, B, Hq, Hk, ins = case
    pat = make("triton")
    assert isinstance(_run(pat, _perm(N, 1), B=B, Hq=Hq, Hk=Hk, N=N, inputs=_inputs(ins, N)),
                      OrderedPlan)


def test_call_without_a_plan_caches_it_like_an_input():
    """``pat(q, k, v, order=...)``: the plan is cached by the order's identity and version;
    an in-place change of the order is a new plan, and the answer follows it."""
    pat = spattn.compile("abs(q // 6 - k // 6) <= 1 & abs(q % 6 - k % 6) <= 1",
                         backend="torch")
    PLANS.clear()
    order = _perm(36, 2)
    _run(pat, order, N=36, use_plan=False)
    assert len(PLANS) == 1
    _run(pat, order, N=36, use_plan=False, seed=1)
    assert len(PLANS) == 1
    order.copy_(_perm(36, 3))
    _run(pat, order, N=36, use_plan=False, seed=2)
    assert len(PLANS) == 2
    _run(pat, torch.arange(36), N=36, use_plan=False, seed=3)


def test_callers_order_wins_over_a_layout(monkeypatch):
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.neighborhood((8, 8), 3, backend="torch")
    q = torch.randn(1, 1, 64, 16)
    assert isinstance(pat.plan(q, q, q), RemappedPlan)
    plan = pat.plan(q, q, q, order=_perm(64))
    assert isinstance(plan, OrderedPlan) and not isinstance(plan.inner, RemappedPlan)


def _bad(pat, q, k, order, **kw):
    with pytest.raises(spattn.SpattnInputError, match=kw.pop("match")) as e:
        pat.plan(q, k, k, order=order, **kw)
    assert "order" in str(e.value)
    with pytest.raises(spattn.SpattnInputError, match="order"):
        pat(q, k, k, order=order, **kw)


@pytest.mark.parametrize("order,match", [
    ([2, 0, 1, 3, 4, 5, 6, 7], "torch.Tensor"),
    (torch.arange(8.0), "dtype"),
    (torch.ones(8, dtype=torch.bool), "dtype"),
    (torch.arange(8).reshape(2, 4), "4 slots per row"),
    (torch.arange(8).reshape(2, 2, 2), r"\[L\] .* or \[B, L\]"),
    (torch.arange(7), "7 entries"),
    (torch.tensor([0, 1, 2, 3, 4, 5, 6, 6]), "token 6 is in slots 6 and 7"),
    (torch.tensor([0, 1, 2, 3, 4, 5, 6, 8]), r"order\[7\] = 8 is out of range"),
    (torch.tensor([0, 1, 2, -1, 4, 5, 6, 7]), r"order\[3\] = -1"),
    (torch.arange(8, device="meta"), "meta"),
], ids=["list", "float", "bool", "2d", "3d", "short", "duplicate", "too-large", "negative",
        "meta"])
def test_bad_orders_name_the_argument(order, match):
    pat = spattn.compile("causal", backend="torch")
    q = torch.randn(1, 1, 8, 16)
    _bad(pat, q, q, order, match=match)


def test_order_needs_self_attention_at_offset_zero():
    pat = spattn.compile("causal", backend="torch")
    q, k = torch.randn(1, 1, 8, 16), torch.randn(1, 1, 12, 16)
    _bad(pat, q, k, torch.arange(8), match="same length")
    _bad(pat, q, q, torch.arange(8), q_offset=2, match="q_offset")


def test_order_with_a_plan_or_a_score_is_refused():
    pat = spattn.compile("causal", backend="torch")
    q = torch.randn(1, 1, 8, 16)
    plan = pat.plan(q, q, q, order=torch.arange(8))
    with pytest.raises(spattn.SpattnParamError, match="plan holds its token order"):
        pat(q, q, q, plan=plan, order=torch.arange(8))
    scored = spattn.compile("causal", score="softcap(30.0)", backend="torch")
    with pytest.raises(spattn.SpattnParamError, match="score"):
        scored(q, q, q, order=torch.arange(8))
    with pytest.raises(spattn.SpattnParamError, match="score"):
        scored.plan(q, q, q, order=torch.arange(8))


def test_grid_patterns_still_check_their_length():
    pat = spattn.neighborhood((4, 4), 3, backend="torch")
    q = torch.randn(1, 1, 12, 16)
    with pytest.raises(spattn.SpattnInputError, match="grid"):
        pat(q, q, q, order=torch.arange(12))


def test_an_input_named_order_is_refused_in_a_program():
    with pytest.raises(spattn.SpattnNameError, match="order"):
        spattn.compile("input order\npattern p = order[q] == order[k]")


def test_functional_attention_takes_an_order():
    g = torch.Generator().manual_seed(4)
    q, k, v = _tensors(1, 2, 2, 30, 16, g, grads=False)
    order = _perm(30, 4)
    o = spattn.attention(q, k, v, pattern="abs(q % 5 - k % 5) <= 1 & abs(q // 5 - k // 5) <= 1",
                         order=order, backend="torch")
    ref = spattn.attention(q, k, v, pattern="abs(q % 5 - k % 5) <= 1 & abs(q // 5 - k // 5) <= 1",
                           backend="torch")
    _close("o", o, ref, rtol=1e-5)


def test_bshd_tensors_with_an_order():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 30, 2, 16, generator=g) for _ in range(3))
    pat = spattn.compile("abs(q // 5 - k // 5) <= 1 & abs(q % 5 - k % 5) <= 1", backend="torch")
    o = pat(q, k, v, layout="bshd", order=_perm(30, 6))
    ref = pat(q, k, v, layout="bshd")
    assert o.shape == (1, 30, 2, 16)
    _close("o", o, ref, rtol=1e-5)


def test_a_plan_keeps_its_own_copy_of_the_order():
    """An in-place write to the caller's order after ``pat.plan(..., order=)`` does not reach
    the plan: its gathers, inverse and coordinate tables stay those of the order it was
    built with (the answer stays the mask's over the original positions)."""
    pat = spattn.compile("abs(q // 6 - k // 6) <= 1 & abs(q % 6 - k % 6) <= 1",
                         backend="torch")
    g = torch.Generator().manual_seed(7)
    q, k, v = _tensors(1, 2, 1, 36, 16, g, grads=False)
    order = _perm(36, 7)
    plan = pat.plan(q, k, v, order=order)
    order.copy_(_perm(36, 8))
    o = pat(q, k, v, plan=plan)
    ro, _ = attention_reference(q.double(), k.double(), v.double(), pat.mask(36, 36))
    _close("o", o, ro)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16], ids=["int32", "int16"])
def test_a_narrow_order_is_one_cached_plan(dtype):
    """An order that is not int64 is keyed by the caller's tensor, not by its int64 copy:
    repeated calls with it share one plan."""
    pat = spattn.compile("abs(q // 6 - k // 6) <= 1", backend="torch")
    PLANS.clear()
    order = _perm(36, 9).to(dtype)
    for seed in range(3):
        _run(pat, order, N=36, use_plan=False, seed=seed)
    assert len(PLANS) == 1


def test_the_module_takes_an_order():
    """``SparseAttention(...)(q, k, v, order=...)`` runs in the order, as a call does (not
    read as a runtime input named ``order``)."""
    from spattn.nn import SparseAttention
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, 30, 2, 16, generator=g) for _ in range(3))
    src = "abs(q // 5 - k // 5) <= 1 & abs(q % 5 - k % 5) <= 1"
    mod = SparseAttention(src, backend="torch", layout="bshd")
    pat = spattn.compile(src, backend="torch")
    o = mod(q, k, v, order=_perm(30, 10))
    ro, _ = attention_reference(*(t.transpose(1, 2).double() for t in (q, k, v)),
                                pat.mask(30, 30))
    _close("o", o.transpose(1, 2), ro)


@pytest.mark.parametrize("order,match,hint", [
    (torch.arange(36.0), "dtype", False),
    (torch.arange(36).reshape(36, 1), "1 slots per row", False),
    (torch.tensor([0] * 2 + list(range(2, 36))), "token 0 is in slots 0 and 1", False),
    (torch.arange(2), "2 entries", True),
], ids=["float", "2d", "duplicate", "bshd-length"])
def test_the_layout_hint_only_where_a_layout_explains_the_error(order, match, hint):
    """Tensors that would be valid read as ``[B, L, H, D]``: the ``layout='bshd'`` hint is
    added to an order error only when q's layout could be its cause (the order's length,
    which a bshd q of 36 tokens read as bhsd has as 2)."""
    pat = spattn.compile("causal", backend="torch")
    q = torch.randn(1, 36, 2, 16).transpose(1, 2)        # [B, H, L, D], also valid as bshd
    with pytest.raises(spattn.SpattnInputError, match=match) as e:
        pat(q, q, q, order=order)
    assert ("layout='bshd'" in str(e.value)) == hint


@pytest.mark.interpreter
def test_a_list_indexed_by_position_in_an_order_on_triton():
    """A list indexed by ``q`` beside a residue class that does not divide L (29 tokens,
    ``% 6``): the order's tables keep the index within the list (it was refused as reaching
    29), and the answer matches the reference."""
    N = 29
    lst = "[" + ", ".join(str(i * 7 % 5) for i in range(N)) + "]"
    pat = spattn.compile(f"{lst}[q] >= {lst}[k] & (q - k) % 6 == 0", backend="triton")
    _run(pat, _perm(N, 11), Hq=1, Hk=1, N=N)


def test_orders_and_inputs_made_under_inference_mode():
    """Inference tensors have no version counter: an order or a runtime input made under
    ``torch.inference_mode`` is keyed by its contents (it raised a raw RuntimeError), so a
    call repeats its plan and an in-place write there is a new plan whose answer follows."""
    g = torch.Generator().manual_seed(12)
    PLANS.clear()
    pat = spattn.compile("same(doc) & abs(q // 6 - k // 6) <= 1", backend="torch")
    with torch.inference_mode():
        q, k, v = _tensors(1, 2, 1, 36, 16, g, grads=False)
        doc, order = torch.zeros(36, dtype=torch.int64), _perm(36, 12)
        for _ in range(2):
            pat(q, k, v, order=order, doc=doc)
        assert len(PLANS) == 1
        doc[20:] = 1
        o = pat(q, k, v, order=order, doc=doc)
        assert len(PLANS) == 2
        o2 = pat.decode(q[:, :, -1:], k, v, doc=doc)
    m = pat.mask(36, 36, doc=doc)
    ro, _ = attention_reference(q.double(), k.double(), v.double(), m)
    _close("o", o, ro)
    _close("o decode", o2, ro[:, :, -1:])


def test_a_call_that_finds_its_plan_reads_no_value_of_the_order(monkeypatch):
    """The permutation is checked where its plan is built; a later call with the same,
    unchanged order tensor finds the plan and reads none of its values (no device sync)."""
    from spattn.runtime import plan as plan_mod
    pat = spattn.compile("causal", backend="torch")
    q = torch.randn(1, 1, 8, 16)
    perm = torch.randperm(8)
    o = pat(q, q, q, order=perm)

    def rechecked(*args):
        raise AssertionError("the order's values were read again")
    monkeypatch.setattr(plan_mod, "permutation", rechecked)
    torch.testing.assert_close(pat(q, q, q, order=perm), o)
    perm[:2] = perm[:2].flip(0)             # written in place: a new plan, checked again
    with pytest.raises(AssertionError, match="read again"):
        pat(q, q, q, order=perm)


def _perms(B, N, seed=0):
    return torch.stack([_perm(N, seed + b) for b in range(B)])


@pytest.mark.parametrize("backend", [
    "torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_one_order_per_batch_element(backend):
    """``order [B, L]``: batch element ``b`` runs in its own order; outputs and gradients
    in the caller's order match the reference (GQA, a pattern with a runtime input)."""
    pat = spattn.compile("causal & same(doc)", backend=backend)
    N, B = 40, 2
    doc = torch.randint(0, 4, (B, N), generator=torch.Generator().manual_seed(3)).sort().values
    plan = _run(pat, _perms(B, N), B=B, Hq=4, Hk=2, N=N, inputs={"doc": doc})
    assert isinstance(plan, OrderedPlan) and plan.order.shape == (B, N)
    assert "one order per batch element" in repr(plan)


def test_one_row_for_every_batch_element_is_the_1d_order():
    pat = spattn.neighborhood((8, 6), 3, backend="torch")
    plan = _run(pat, _perm(48)[None], B=2, N=48)
    assert plan.order.shape == (48,)


@pytest.mark.parametrize("order,match", [
    (torch.stack([torch.arange(8), torch.tensor([0, 1, 2, 3, 4, 5, 6, 6])]),
     r"\(row 1\): token 6 is in slots 6 and 7 \(and token 7 in none\)"),
    (torch.stack([torch.arange(8), torch.tensor([0, 1, 2, 3, 4, 5, 6, 9])]),
     r"order\[1, 7\] = 9 is out of range"),
    (torch.stack([torch.arange(8)] * 3), r"3 rows but q .* has B=2"),
    (torch.zeros(2, 2, 8, dtype=torch.int64), r"\[L\] .* or \[B, L\]")],
    ids=["duplicate-in-row-1", "out-of-range-in-row-1", "rows-not-batch", "3-d"])
def test_bad_per_batch_orders_name_the_row(order, match):
    pat = spattn.compile("causal", backend="torch")
    q = torch.randn(2, 1, 8, 16)
    _bad(pat, q, q, order, match=match)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_a_list_too_short_for_the_heads_is_refused_in_any_order(backend):
    """A list indexed by ``h`` with fewer entries than the call's heads is refused with an
    order as without one, also where the term reading it simplifies away in the pattern
    over slots (``Lq >= [21][h] % -2`` holds for any entry: the order's rewritten pattern
    dropped it, and its plan checked no list)."""
    src = "causal & same(doc) & Lq >= [21][h] % -2"
    pat = spattn.compile(src, backend=backend)
    g = torch.Generator().manual_seed(21)
    q, k, v = _tensors(1, 4, 4, 17, 16, g, grads=False)
    doc = torch.zeros(17, dtype=torch.int64)
    for kw in ({}, {"order": torch.randperm(17, generator=g)}):
        with pytest.raises(spattn.SpattnValueError, match=r"list \[21\] has 1 entries .* 4 heads"):
            pat(q, k, v, doc=doc, **kw)
    o = pat(q[:, :1], k[:, :1], v[:, :1], doc=doc, order=torch.randperm(17, generator=g))
    assert torch.isfinite(o).all() and o.abs().sum() > 0
