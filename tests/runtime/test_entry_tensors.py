"""What the tensors a call is given may carry besides their values.

Tensors with the negative bit (``x.conj().imag``, ``torch._neg_view``): memory holding the
negation of the values. The kernels read memory, so such a tensor is materialised where it
enters (``runtime.usage.plain``); every form of call then matches the float64 reference, on
both backends: q, k, v, runtime inputs, score tables, decode caches, lengths and page
tables, and the incoming gradient of a backward.

An autocast region: every entry computes in its inputs' dtype, as outside it."""
import pytest
import torch

import spattn
from spattn.nn import SparseAttention
from spattn.runtime.reference import pattern_reference

from tests.helpers.kernels import paged_cache

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]


def neg(x):
    """``x``'s values in a tensor with the negative bit: its memory holds ``-x``."""
    out = torch._neg_view(-x)
    assert out.is_neg() and torch.equal(out, x)
    return out


def _qkv(seed, B=2, Hq=4, Hk=2, Lq=40, Lk=40, D=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g).to(DEV) for H, L in ((Hq, Lq), (Hk, Lk), (Hk, Lk))]


def _close(got, want):
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("form", ["call", "functional", "module", "plan", "bshd"])
def test_call_forms(backend, which, form):
    p = spattn.compile("causal & window(9) | sink(2)", backend=backend)
    q, k, v = _qkv(seed=len(form) * 3 + "qkv".index(which))
    want = pattern_reference(p, q.double(), k.double(), v.double())[0]
    args = {"q": q, "k": k, "v": v}
    args[which] = neg(args[which])
    q2, k2, v2 = args["q"], args["k"], args["v"]
    if form == "call":
        got = p(q2, k2, v2)
    elif form == "functional":
        got = spattn.attention(q2, k2, v2, pattern="causal & window(9) | sink(2)", backend=backend)
    elif form == "module":
        got = SparseAttention("causal & window(9) | sink(2)", backend=backend)(q2, k2, v2)
    elif form == "plan":
        plan = p.plan(q, k, v)
        got = p(q2, k2, v2, plan=plan)
    else:
        t = lambda x: neg(x.transpose(1, 2).contiguous()) if x.is_neg() \
            else x.transpose(1, 2).contiguous()  # noqa: E731
        got = p(t(q2), t(k2), t(v2), layout="bshd").transpose(1, 2)
    _close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_and_tables(backend):
    p = spattn.compile("causal & doc[q] == doc[k]", score="s + rel[h, clamp(q - k, 0, 7)]",
                       backend=backend)
    q, k, v = _qkv(seed=11)
    g = torch.Generator().manual_seed(12)
    doc = (torch.arange(40) // 7).to(DEV)
    rel = torch.randn(4, 8, generator=g).to(DEV)
    want = pattern_reference(p, q.double(), k.double(), v.double(), doc=doc,
                             rel=rel.double())[0]
    _close(p(q, k, v, doc=neg(doc), rel=neg(rel)), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scored", [False, True], ids=["mask", "score"])
def test_backward_of_a_negated_gradient(backend, scored):
    p = spattn.compile("causal & window(9)", score="s + rel[h, q % 3]" if scored else None,
                       backend=backend)
    q, k, v = (t.requires_grad_() for t in _qkv(seed=21 + scored))
    g = torch.Generator().manual_seed(23)
    rel = torch.randn(4, 3, generator=g).to(DEV).requires_grad_()
    do = torch.randn(q.shape, generator=g).to(DEV)
    tables = {"rel": rel} if scored else {}
    o = p(q, k, v, **tables)
    got = torch.autograd.grad(o, (q, k, v, *tables.values()), neg(do))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, *tables.values())]
    ro = pattern_reference(p, *leaves[:3], **dict(zip(tables, leaves[3:])))[0]
    want = torch.autograd.grad(ro, leaves, do.double())
    for a, b in zip(got, want):
        _close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["q", "k_cache", "v_cache", "seq_lens", "page_table",
                                   "routed"])
def test_decode(backend, which):
    p = spattn.compile("causal & window(100) | sink(4)", backend=backend)
    q, k, v = _qkv(seed=31, Lq=2, Lk=320)
    lens = torch.tensor([320, 250], device=DEV)
    want = torch.cat([pattern_reference(p, q[b:b + 1].double(), k[b:b + 1, :, :n].double(),
                                        v[b:b + 1, :, :n].double())[0]
                      for b, n in enumerate(lens.tolist())])
    if which == "routed":
        want = pattern_reference(p, q.double(), k.double(), v.double())[0]
        _close(p(q, neg(k), neg(v)), want)
        return
    if which == "page_table":
        kp, vp, table = paged_cache(k, v, 32, torch.Generator(device=DEV).manual_seed(32))
        got = p.decode(q, kp, vp, seq_lens=lens, page_table=neg(table))
        _close(got, want)
        return
    args = {"q": q, "k_cache": k, "v_cache": v, "seq_lens": lens}
    args[which] = neg(args[which])
    _close(p.decode(args["q"], args["k_cache"], args["v_cache"], seq_lens=args["seq_lens"]),
           want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", [None, "softcap(5.0)"], ids=["mask", "score"])
@pytest.mark.parametrize("form", ["call", "functional", "module", "decode", "routed"])
def test_autocast_changes_nothing(backend, score, form):
    p = spattn.compile("causal & window(9)", score=score, backend=backend)
    q, k, v = _qkv(seed=41, Lq=2 if form in ("decode", "routed") else 40,
                   Lk=300 if form in ("decode", "routed") else 40)
    runs = {"call": lambda: p(q, k, v),
            "functional": lambda: spattn.attention(q, k, v, pattern=p),
            "module": lambda: SparseAttention(p)(q, k, v),
            "decode": lambda: p.decode(q, k, v),
            "routed": lambda: p(q, k, v)}
    want = runs[form]()
    with torch.autocast(DEV, dtype=torch.bfloat16):
        got = runs[form]()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0, rtol=0)
