"""Cross-checks of the newer call paths against the float64 reference: token layouts
(``spattn.neighborhood`` and flattened grid patterns composed with other terms, GQA, B > 1,
runtime inputs), the routing of short calls to the decode path (runtime inputs, per-head and
per-batch patterns, explicit ``q_offset``, fully masked rows, ``layout="bshd"``, GQA groups
that are not powers of two, paged caches whose page size does not divide the length, bf16),
and scored patterns through ``bshd`` and decode-sized calls (the score is applied)."""
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

import spattn
from spattn.dsl.errors import SpattnError, SpattnInputError
from spattn.runtime import decode as dec
from spattn.runtime.reference import pattern_reference
from tests.helpers.natten_ref import neighborhood_mask
from tests.helpers.sources import WIDE, bool_exprs
from tests.runtime.test_torch_backend import _close

interp = pytest.mark.interpreter
BACKENDS = ["torch", pytest.param("triton", marks=interp)]


def _qkv(B, Hq, Hk, Lq, Lk, D=16, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, D, generator=g).to(dtype).requires_grad_(grad)
                 for H, L in ((Hq, Lq), (Hk, Lk), (Hk, Lk)))


def _check(pat, q, k, v, *, q_offset=None, layout=None, grads=False, rtol=2e-3, **inputs):
    """pat(q, k, v) (in ``layout``) against pattern_reference: o, lse and, with ``grads``,
    dq, dk, dv."""
    args = (q, k, v) if layout != "bshd" else tuple(t.transpose(1, 2) for t in (q, k, v))
    o, lse = pat(*args, return_lse=True, q_offset=q_offset, layout=layout, **inputs)
    if layout == "bshd":
        o = o.transpose(1, 2)
    ref = tuple(t.detach().double().requires_grad_(grads) for t in (q, k, v))
    ro, rl = pattern_reference(pat, *ref, q_offset=q_offset, **inputs)
    _close("o", o, ro, rtol)
    _close("lse", lse, rl, rtol)
    if grads:
        do = torch.randn(o.shape, generator=torch.Generator().manual_seed(7))
        (o * do).sum().backward()
        (ro * do.double()).sum().backward()
        for name, a, b in zip(("dq", "dk", "dv"), (q, k, v), ref):
            _close(name, a.grad, b.grad, rtol)
    return o


# ------------------------------------------------------------------ token layouts

@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])   # one setenv for all
@given(data=st.data())
def test_neighborhood_layouts_match_reference(data, monkeypatch):
    """Random grids, kernels, strides, dilations and causal axes (torch backend, layouts
    forced on), composed with causal or a document input, with GQA and B > 1: o, lse and
    the gradients equal the reference."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    nd = data.draw(st.integers(1, 3), label="axes")
    shape, ks, ss, ds, cs = [], [], [], [], []
    for _ in range(nd):
        n = data.draw(st.integers(2, {1: 16, 2: 6, 3: 4}[nd]))
        d = data.draw(st.integers(1, min(3, n)))
        K = data.draw(st.integers(1, n // d))
        shape.append(n), ds.append(d), ks.append(K)
        ss.append(data.draw(st.integers(1, K))), cs.append(data.draw(st.booleans()))
    nb = spattn.neighborhood(tuple(shape), tuple(ks), stride=tuple(ss), dilation=tuple(ds),
                             is_causal=tuple(cs))
    N = int(torch.tensor(shape).prod())
    kind = data.draw(st.sampled_from(["plain", "causal", "doc"]))
    inputs = {}
    if kind == "plain":
        pat = nb
    elif kind == "causal":
        pat = spattn.compile(f"({nb.source}) & causal")
    else:
        pat = spattn.compile(f"({nb.source}) & (doc[q] == doc[k])")
        inputs["doc"] = torch.sort(torch.randint(0, 3, (N,)))[0]
    Hk = data.draw(st.sampled_from([1, 2]))
    Hq = Hk * data.draw(st.sampled_from([1, 3]))
    B = data.draw(st.sampled_from([1, 2]))
    q, k, v = _qkv(B, Hq, Hk, N, N, grad=True, seed=N)
    _check(pat, q, k, v, grads=True, **inputs)


@pytest.mark.parametrize("args", [
    pytest.param(((6,), 4, 1, 1, False), id="even-k"),
    pytest.param(((5, 4), (5, 4), 1, 1, False), id="k-eq-axis"),
    pytest.param(((12,), 3, 2, 2, False), id="stride2-dil2"),
    pytest.param(((13,), 4, 3, 3, False), id="stride3-dil3-ragged"),
    pytest.param(((10,), 4, 2, 1, True), id="causal-stride2"),
    pytest.param(((9, 6), (3, 2), (3, 2), (2, 3), (True, False)), id="2d-causal-stride-dil"),
    pytest.param(((8,), 8, 8, 1, True), id="causal-stride-eq-k-eq-axis"),
])
def test_neighborhood_corner_masks(args):
    """The mask of spattn.neighborhood in NATTEN's corner cases equals the member-by-member
    numpy definition (tests/helpers/natten_ref.py)."""
    shape, K, s, d, c = args
    nb = spattn.neighborhood(shape, K, stride=s, dilation=d, is_causal=c)
    N = int(torch.tensor(shape).prod())
    want = torch.from_numpy(neighborhood_mask(shape, K, s, d, c))
    assert torch.equal(nb.mask(N, N)[0, 0], want)


@interp
@pytest.mark.parametrize("layout", ["on", "off"])
def test_neighborhood_layout_interpreter(layout, monkeypatch):
    """A 2-D strided, dilated neighbourhood with a causal row axis and GQA on the generated
    kernels, layouts on and off: forward and backward equal the reference."""
    monkeypatch.setenv("SPATTN_LAYOUT", layout)
    nb = spattn.neighborhood((6, 5), (3, 2), stride=(2, 1), dilation=(2, 1),
                             is_causal=(True, False), backend="triton")
    q, k, v = _qkv(2, 2, 1, 30, 30, grad=True)
    _check(nb, q, k, v, grads=True)


# ------------------------------------------------------------------ grids and the decode path

def test_grid_pattern_short_call_is_refused_not_routed():
    """A neighbourhood declared on a 300-token grid, called with 4 queries against 300 keys
    (a decode-sized call), is a SpattnInputError as on the normal path; the decode path used
    to run it silently with positions the grid does not define."""
    nb = spattn.neighborhood((20, 15), 5)
    q, k, v = _qkv(1, 2, 1, 4, 300)
    assert dec.routes(q, k, v)
    with pytest.raises(SpattnInputError, match="grid"):
        nb(q, k, v)
    with pytest.raises(SpattnInputError, match="grid"):
        nb.decode(q, k, v)


def test_grid_pattern_decode_at_its_length():
    """decode of a grid pattern whose cell count is the query count and the capacity runs."""
    nb = spattn.neighborhood((4, 4), 3)
    q, k, v = _qkv(1, 2, 1, 16, 16)
    o = nb.decode(q, k, v)
    ro, _ = pattern_reference(nb, q.double(), k.double(), v.double())
    _close("o", o, ro)


# ------------------------------------------------------------------ routing of short calls

L = 300
ROUTED = [
    ("doc", "causal & (doc[q] == doc[k])", dict(B=2, Hq=4, Hk=2, Lq=4), None),
    ("doc-b", "causal & (doc[b, q] == doc[b, k])", dict(B=2, Hq=4, Hk=2, Lq=4), None),
    ("per-head", "causal & (q - k < 8 * (h + 1))", dict(B=2, Hq=6, Hk=2, Lq=3), None),
    ("gqa5", "causal & q - k < 50", dict(B=1, Hq=5, Hk=1, Lq=5), None),
    ("gqa6-2", "causal & q - k < 50", dict(B=1, Hq=6, Hk=2, Lq=2), None),
    ("q-offset-100", "causal & q - k < 40", dict(B=1, Hq=2, Hk=1, Lq=4), 100),
    ("q-offset-past-end", "causal & q - k < 40", dict(B=1, Hq=2, Hk=1, Lq=4), 320),
    ("q-offset-neg", "causal", dict(B=1, Hq=2, Hk=1, Lq=4), -2),
    ("all-masked", "k >= q + 1000", dict(B=1, Hq=2, Hk=1, Lq=4), None),
    ("some-rows-masked", "causal & (q % 2 == 0)", dict(B=2, Hq=2, Hk=1, Lq=5), None),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", [None, "bshd"])
@pytest.mark.parametrize("name,src,shape,q_offset", ROUTED, ids=[r[0] for r in ROUTED])
def test_routed_calls_match_reference(name, src, shape, q_offset, layout, backend):
    if backend == "triton" and layout == "bshd" and name not in ("doc-b", "gqa5", "all-masked"):
        pytest.skip("bshd on the interpreter: a few cases suffice")
    pat = spattn.compile(src, backend=backend)
    q, k, v = _qkv(shape["B"], shape["Hq"], shape["Hk"], shape["Lq"], L)
    assert dec.routes(q, k, v, q_offset)
    inputs = {}
    if "doc[b" in src:
        inputs["doc"] = torch.sort(torch.randint(0, 4, (shape["B"], L)))[0]
    elif "doc" in src:
        inputs["doc"] = torch.sort(torch.randint(0, 4, (L,)))[0]
    o = _check(pat, q, k, v, q_offset=q_offset, layout=layout, **inputs)
    if name == "all-masked":
        assert torch.equal(o, torch.zeros_like(o))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page", [5, 7, 13])
def test_paged_pages_not_dividing_lengths(page, backend):
    """Paged decode with shuffled pages whose size divides no length, GQA 3:1, a per-batch
    input: every batch element equals the reference at its own length."""
    pat = spattn.compile("causal & (q - k < 20 | k < 3) & (doc[b, q] == doc[b, k])",
                         backend=backend)
    B, Hq, Hk, Lq, D = 2, 3, 1, 3, 16
    lens = [41, 17]
    pages_per = max((n + page - 1) // page for n in lens)
    g = torch.Generator().manual_seed(page)
    npages = B * pages_per + 2
    kp = torch.randn(npages, page, Hk, D, generator=g)
    vp = torch.randn(npages, page, Hk, D, generator=g)
    table = torch.randperm(npages, generator=g)[:B * pages_per].view(B, pages_per).int()
    doc = torch.sort(torch.randint(0, 2, (B, pages_per * page), generator=g))[0]
    q = torch.randn(B, Hq, Lq, D, generator=g)
    o, lse = pat.decode(q, kp, vp, seq_lens=torch.tensor(lens), page_table=table,
                        return_lse=True, doc=doc)
    for b, n in enumerate(lens):
        j = torch.arange(n)
        kk = kp[table[b, j // page].long(), j % page].permute(1, 0, 2)[None]
        vv = vp[table[b, j // page].long(), j % page].permute(1, 0, 2)[None]
        ro, rl = pattern_reference(pat, q[b:b + 1].double(), kk.double(), vv.double(),
                                   doc=doc[b:b + 1, :n])
        _close(f"o[{b}]", o[b:b + 1], ro)
        _close(f"lse[{b}]", lse[b:b + 1], rl)


@pytest.mark.parametrize("backend", BACKENDS)
def test_routed_bf16(backend):
    """A bf16 decode-sized call equals the reference to bf16 precision (under Triton 3.6's
    interpreter the decode kernel used to multiply bf16 bits as numbers: outputs ~1e8)."""
    pat = spattn.compile("causal & q - k < 77", backend=backend)
    q, k, v = _qkv(2, 4, 2, 5, 256, dtype=torch.bfloat16)
    assert dec.routes(q, k, v)
    o, lse = pat(q, k, v, return_lse=True)
    ro, rl = pattern_reference(pat, q.double(), k.double(), v.double())
    assert o.dtype == torch.bfloat16
    _close("o", o, ro, 2e-2)
    _close("lse", lse, rl, 2e-2)


# ------------------------------------------------------------------ scores

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", [None, "bshd"])
@pytest.mark.parametrize("score,Lq,Lk", [
    ("softcap(2.0)", 4, 300), ("s - 0.3 * (q - k)", 1, 256), ("softcap(2.0)", 16, 8),
    ("softcap(3.0)", 24, 24),
], ids=["softcap-decode-sized", "alibi-Lq1", "softcap-Lq-gt-Lk", "softcap-prefill"])
def test_scores_never_dropped(score, Lq, Lk, layout, backend):
    """A scored pattern in decode-sized and bshd calls applies its score: the output equals
    the scored reference and differs from the unscored one."""
    if backend == "triton" and Lk > 256 and layout == "bshd":
        pytest.skip("one bshd decode-sized case on the interpreter suffices")
    pat = spattn.compile("causal & q - k < 100", score=score, backend=backend)
    q, k, v = _qkv(2, 4, 2, Lq, Lk, seed=Lq)
    q = q * 3
    o = _check(pat, q, k, v, layout=layout)
    plain = spattn.compile("causal & q - k < 100")
    mo, _ = pattern_reference(plain, q.double(), k.double(), v.double())
    assert (o.double() - mo).abs().max() > 1e-2


def test_scored_pattern_refuses_sdpa_keywords_in_bshd():
    pat = spattn.compile("causal", score="softcap(30.0)")
    q, k, v = (t.transpose(1, 2) for t in _qkv(1, 2, 2, 3, 300))
    for name, value in (("is_causal", True), ("score_mod", lambda s, *a: s),
                        ("attn_mask", torch.ones(3, 300, dtype=torch.bool))):
        with pytest.raises(SpattnError, match=name):
            pat(q, k, v, layout="bshd", **{name: value})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_routed_views_strided_along_d(which, backend):
    """q, k or v a ``[..., ::2]`` view (stride 2 along D) in a decode-sized call: ATen's CPU
    flash kernel read D as contiguous (wrong rows, errors ~0.5) before the torch backend
    copied such views."""
    pat = spattn.compile("causal & q - k < 60", backend=backend)
    t = dict(zip("qkv", _qkv(1, 2, 1, 3, 300, D=32, seed=3)))
    for n in "qkv":
        t[n] = t[n][..., ::2] if n == which else t[n][..., :16]
    assert dec.routes(t["q"], t["k"], t["v"])
    _check(pat, t["q"], t["k"], t["v"])


def test_torch_backend_strided_d_gradients():
    """The normal torch path with views strided along D, forward and backward."""
    pat = spattn.compile("causal & q - k < 20", backend="torch")
    q, k, v = (t[..., ::2].detach().requires_grad_(True) for t in _qkv(2, 2, 1, 40, 40, D=32))
    _check(pat, q, k, v, grads=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [0, -1, "a", 1.5, True, 2048])
def test_decode_bad_num_splits(bad, backend):
    """A bad num_splits is a SpattnParamError on both backends (was a raw ValueError for a
    str on Triton, and silently ignored or used as given otherwise)."""
    pat = spattn.compile("causal", backend=backend)
    q, k, v = _qkv(1, 2, 1, 3, 300)
    with pytest.raises(spattn.SpattnParamError, match="num_splits"):
        pat.decode(q, k, v, num_splits=bad)


# ------------------------------------------------------------------ random patterns

GRID_BASES = ["abs(q // {W} - k // {W}) <= {r} & abs(q % {W} - k % {W}) <= {s}",
              "(q // {W} - k // {W}) % {r1} == 0 & abs(q % {W} - k % {W}) <= {s}",
              "q // {W} == k // {W}", "(q - k) % {W} == 0 & abs(q - k) <= {r} * {W}"]
FUZZ = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate, Phase.shrink])


def _grid_case(data, backend):
    W, H = data.draw(st.sampled_from([2, 3, 4, 8])), data.draw(st.integers(2, 8))
    src = data.draw(st.sampled_from(GRID_BASES)).format(
        W=W, r=data.draw(st.integers(0, 3)), s=data.draw(st.integers(0, 3)),
        r1=data.draw(st.integers(1, 3)))
    src += data.draw(st.one_of(st.just(""), bool_exprs(max_leaves=3).map(
        lambda e: f" {data.draw(st.sampled_from('&|'))} ({e})")))
    try:
        pat = spattn.compile(src, backend=backend)
    except SpattnError:
        return
    if pat.inputs:
        return
    Hk = data.draw(st.integers(1, 2))
    q, k, v = _qkv(data.draw(st.integers(1, 2)), Hk * data.draw(st.sampled_from([1, 3])),
                   Hk, W * H, W * H, grad=True, seed=W * H)
    with torch.enable_grad():
        _check(pat, q, k, v, grads=True)


@settings(max_examples=8, **FUZZ)
@given(data=st.data())
def test_random_grid_patterns_in_layouts(data):
    """Flattened grid patterns combined with random terms (``& (...)``, ``| (...)``), layouts
    forced on (torch backend): forward, lse and gradients equal the reference, remapped or
    not."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPATTN_LAYOUT", "on")
        _grid_case(data, "torch")


def _routed_case(data, backend):
    src = data.draw(bool_exprs(consts=data.draw(st.sampled_from([None, WIDE]))))
    src += data.draw(st.sampled_from(["", " & same(doc)", " | same(doc)", " & causal"]))
    try:
        pat = spattn.compile(src, backend=backend)
    except SpattnError:
        return
    if set(pat.inputs) - {"doc"}:
        return
    Lq, Lk = data.draw(st.integers(1, 16)), data.draw(st.integers(256, 300))
    q_offset = data.draw(st.one_of(st.none(), st.integers(-40, 320)))
    Hk = data.draw(st.integers(1, 2))
    q, k, v = _qkv(data.draw(st.integers(1, 2)), Hk * data.draw(st.sampled_from([1, 3])),
                   Hk, Lq, Lk, seed=Lq + Lk)
    assert dec.routes(q, k, v, q_offset)
    inputs = {"doc": torch.sort(torch.randint(0, 5, (Lk,)))[0]} if pat.inputs else {}
    try:
        pat(q, k, v, q_offset=q_offset, **inputs)
    except SpattnError:
        return
    _check(pat, q, k, v, q_offset=q_offset, **inputs)


@settings(max_examples=10, **FUZZ)
@given(data=st.data())
def test_random_patterns_routed(data):
    """Random patterns (with a document input or causal) in decode-sized calls, GQA 1:1 and
    3:1, random q_offset (torch backend): the routed call equals the reference or is a
    SpattnError."""
    _routed_case(data, "torch")
