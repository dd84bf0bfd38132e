"""The float64 dense reference against a naive per-row implementation."""
import math

import pytest
import torch

import spattn
from spattn.runtime.reference import attention_reference


def naive(q, k, v, mask, scale):
    """Row by row, key by key, in float64 Python-ish loops (the definition)."""
    B, Hq, Lq, D = q.shape
    Hk = k.shape[1]
    G = Hq // Hk
    out = torch.zeros(B, Hq, Lq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((B, Hq, Lq), float("-inf"), dtype=torch.float64)
    m = mask.expand(B, Hq, Lq, k.shape[2])
    for b in range(B):
        for h in range(Hq):
            for i in range(Lq):
                js = m[b, h, i].nonzero().flatten().tolist()
                if not js:
                    continue
                s = [float(q[b, h, i].double() @ k[b, h // G, j].double()) * scale for j in js]
                mx = max(s)
                w = [math.exp(x - mx) for x in s]
                tot = sum(w)
                lse[b, h, i] = mx + math.log(tot)
                for wj, j in zip(w, js):
                    out[b, h, i] += wj / tot * v[b, h // G, j].double()
    return out, lse


CASES = [
    # B, Hq, Hk, Lq, Lk, D, mask kind
    (1, 2, 2, 7, 7, 16, "causal"),
    (2, 4, 2, 5, 9, 8, "random"),
    (1, 3, 1, 6, 4, 4, "rows-empty"),
    (2, 2, 1, 9, 3, 5, "per-head"),
]


def _mask(kind, B, H, Lq, Lk, g):
    if kind == "causal":
        i = torch.arange(Lq).view(-1, 1) + (Lk - Lq)
        return (torch.arange(Lk).view(1, -1) <= i).view(1, 1, Lq, Lk)
    if kind == "random":
        return torch.rand(B, H, Lq, Lk, generator=g) < 0.5
    if kind == "rows-empty":
        m = torch.rand(1, H, Lq, Lk, generator=g) < 0.6
        m[:, :, ::2] = False
        return m
    m = torch.rand(1, H, Lq, Lk, generator=g) < 0.4
    return m


@pytest.mark.parametrize("B,Hq,Hk,Lq,Lk,D,kind", CASES,
                         ids=[f"B{c[0]}-Hq{c[1]}-Hk{c[2]}-Lq{c[3]}-Lk{c[4]}-D{c[5]}-{c[6]}"
                              for c in CASES])
def test_reference_matches_naive(B, Hq, Hk, Lq, Lk, D, kind):
    g = torch.Generator().manual_seed(1234)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k = torch.randn(B, Hk, Lk, D, generator=g)
    v = torch.randn(B, Hk, Lk, D, generator=g)
    mask = _mask(kind, B, Hq, Lq, Lk, g)
    scale = 0.37
    out, lse = attention_reference(q, k, v, mask, scale=scale)
    want_o, want_l = naive(q, k, v, mask, scale)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert out.shape == (B, Hq, Lq, D) and lse.shape == (B, Hq, Lq)
    torch.testing.assert_close(out, want_o, rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_l))
    fin = torch.isfinite(want_l)
    torch.testing.assert_close(lse[fin], want_l[fin], rtol=1e-12, atol=1e-12)


def test_default_scale_is_inverse_sqrt_d():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 16, generator=g) for _ in range(3))
    mask = torch.ones(4, 4, dtype=torch.bool)
    a, _ = attention_reference(q, k, v, mask)
    b, _ = attention_reference(q, k, v, mask, scale=0.25)
    torch.testing.assert_close(a, b)


def test_fully_masked_rows_zero_output_and_grads():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(1, 2, 6, 6, generator=g) < 0.5
    mask[:, :, 2] = False
    mask[:, 1, 4] = False
    mask[:, 0, 0] = True
    out, lse = attention_reference(q, k, v, mask)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert torch.isneginf(lse[:, :, 2]).all() and torch.isneginf(lse[0, 1, 4])
    fin = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum() + fin.sum()
    loss.backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2]))


def test_reference_gradients_gradcheck():
    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(1, 2, 5, 6, generator=g) < 0.6
    mask[0, 0, 1] = False

    def f(q, k, v):
        o, lse = attention_reference(q, k, v, mask)
        return o, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("Lq,Lk,off,chunk", [(37, 37, None, 8), (13, 40, None, 5), (20, 30, 4, 16)],
                         ids=["L37-chunk8", "Lq13-Lk40-chunk5", "off4-chunk16"])
def test_chunked_reference_equals_dense(Lq, Lk, off, chunk):
    """Row chunks with their own slice of the mask give the dense reference's output."""
    from spattn.runtime.reference import attention_reference_chunked
    g = torch.Generator().manual_seed(Lq * Lk)
    pat = spattn.compile("causal & (window(9) | sink(2)) | same(doc)")
    doc = torch.sort(torch.randint(0, 4, (Lk,), generator=g)).values
    q = torch.randn(2, 4, Lq, 16, generator=g)
    k, v = (torch.randn(2, 2, Lk, 16, generator=g) for _ in range(2))
    want, _ = attention_reference(q, k, v, pat.mask(Lq, Lk, num_heads=4, batch=2,
                                                    q_offset=off, doc=doc))
    got = attention_reference_chunked(pat, q, k, v, q_offset=off, chunk=chunk, doc=doc)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_non_finite_values_where_the_mask_removes_them():
    """An inf or NaN in q, k or v at pairs the mask removes (keys no query may see, a cache
    slot past its length, a query row that allows nothing) leaves the output and every
    gradient finite, as the kernels give; one at an allowed pair reaches exactly the rows
    that weigh it (inf of one sign, NaN for a NaN or both signs)."""
    g = torch.Generator().manual_seed(11)
    B, H, Lq, Lk, D = 1, 2, 6, 12, 8
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
               for L in (Lq, Lk, Lk))
    mask = torch.ones(Lq, Lk, dtype=torch.bool).tril(diagonal=2)   # keys 8.. unseen
    mask[0] = False                                                # row 0 allows nothing
    clean = attention_reference(q, k, v, mask)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    k2[:, :, 9] = math.nan
    v2[:, :, 10] = math.inf
    v2[:, :, 11, 3] = -math.inf
    q2[:, :, 0] = math.nan
    leaves = [t.requires_grad_() for t in (q2, k2, v2)]
    out, lse = attention_reference(*leaves, mask)
    assert torch.equal(out, clean[0]) and torch.equal(lse, clean[1])
    grads = torch.autograd.grad(out.square().sum() + lse[:, :, 1:].sum(), leaves)
    assert all(torch.isfinite(gr).all() for gr in grads)
    # allowed: key 1 (rows 1..5 see it) with +inf at dim 2 and both signs at dim 5
    v3 = v.clone()
    v3[:, :, 1, 2] = math.inf
    v3[:, :, 1, 5] = math.inf
    v3[:, :, 2, 5] = -math.inf
    out3, _ = attention_reference(q, k, v3, mask)
    assert (out3[:, :, 1:, 2] == math.inf).all() and out3[:, :, 1:, 5].isnan().all()
    assert torch.equal(out3[:, :, 0], clean[0][:, :, 0])
    other = [d for d in range(D) if d not in (2, 5)]
    assert torch.allclose(out3[..., other], clean[0][..., other])


def test_reference_under_vmap():
    """The reference takes a torch.func transform's tensors (its checks of non-finite values
    branch on no value there): vmap over q and over v matches a loop of calls."""
    p = spattn.compile("causal & window(3)", backend="torch")
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    from spattn.runtime.reference import pattern_reference
    qs = torch.randn(3, 1, 1, 6, 4, generator=g, dtype=torch.float64)
    got = torch.func.vmap(lambda a: pattern_reference(p, a, k, v)[0])(qs)
    want = torch.stack([pattern_reference(p, a, k, v)[0] for a in qs])
    torch.testing.assert_close(got, want)
    got = torch.func.vmap(lambda b: pattern_reference(p, q, k, b)[0])(qs)
    want = torch.stack([pattern_reference(p, q, k, b)[0] for b in qs])
    torch.testing.assert_close(got, want)
