"""Pattern.mask() against independent numpy definitions of the prelude and compositions."""
import numpy as np
import pytest
import torch

import spattn
from spattn import SpattnError

SHAPES = [  # (Lq, Lk, q_offset)
    pytest.param(24, 24, None, id="Lq24-Lk24"),
    pytest.param(9, 31, None, id="Lq9-Lk31-aligned"),
    pytest.param(13, 20, 3, id="Lq13-Lk20-off3"),
    pytest.param(12, 10, -4, id="Lq12-Lk10-off-4"),
]


def positions(Lq, Lk, q_offset):
    off = Lk - Lq if q_offset is None else q_offset
    return np.arange(Lq)[:, None] + off, np.arange(Lk)[None, :]


def is_pow2(x):
    return (x > 0) & ((x & (x - 1)) == 0)


# name, source, params, numpy definition over (q, k)
PRELUDE = [
    ("full", "full", {}, lambda q, k: np.ones(np.broadcast(q, k).shape, bool)),
    ("causal", "causal", {}, lambda q, k: k <= q),
    ("window", "window(5)", {}, lambda q, k: (q - k >= 0) & (q - k < 5)),
    ("local", "local(3, 2)", {}, lambda q, k: (q - k <= 3) & (k - q <= 2)),
    ("sink", "sink(3)", {}, lambda q, k: np.broadcast_to(k < 3, np.broadcast(q, k).shape)),
    ("global", "global_tokens(2)", {}, lambda q, k: (q < 2) | (k < 2)),
    ("prefix_lm", "prefix_lm(4)", {}, lambda q, k: (k <= q) | (k < 4)),
    ("dilated", "dilated(3, 2)", {}, lambda q, k: (q - k >= 0) & (q - k < 6) & ((q - k) % 2 == 0)),
    ("strided", "strided(4)", {}, lambda q, k: (q - k >= 0) & ((q - k < 4) | ((q - k) % 4 == 0))),
    ("fixed", "fixed(4, 1)", {}, lambda q, k: (k <= q) & ((q // 4 == k // 4) | (k % 4 >= 3))),
    ("chunked", "chunked(6)", {}, lambda q, k: q // 6 == k // 6),
    ("power2", "power2(3)", {}, lambda q, k: (q - k >= 0) & ((q - k < 3) | is_pow2(q - k))),
    ("streaming", "causal & (window(W) | sink(2))", {"W": 4},
     lambda q, k: (k <= q) & (((q - k >= 0) & (q - k < 4)) | (k < 2))),
    ("chained", "0 <= q - k < 7 & ~(k % 3 == 1)", {},
     lambda q, k: (q - k >= 0) & (q - k < 7) & ~(k % 3 == 1)),
    ("neg-floordiv", "(q - k) // 3 == -1 | (k - q) % 5 == 2", {},
     lambda q, k: ((q - k) // 3 == -1) | ((k - q) % 5 == 2)),
    ("neg-divisor", "q // -3 >= k // -4 & (q - k) % -3 != -1", {},
     lambda q, k: (q // -3 >= k // -4) & ((q - k) % -3 != -1)),
    ("minmax", "abs(q - k) <= max(2, min(q, 4)) | clamp(k, 3, 6) == q", {},
     lambda q, k: (np.abs(q - k) <= np.maximum(2, np.minimum(q, 4))) | (np.clip(k, 3, 6) == q)),
    ("if", "if q < 8 then k <= q else q - k < 3", {},
     lambda q, k: np.where(q < 8, k <= q, q - k < 3)),
]


@pytest.mark.parametrize("Lq,Lk,off", SHAPES)
@pytest.mark.parametrize("name,src,params,ref", PRELUDE, ids=[p[0] for p in PRELUDE])
def test_prelude_mask(name, src, params, ref, Lq, Lk, off):
    pat = spattn.compile(src, **params)
    got = pat.mask(Lq, Lk, q_offset=off)
    q, k = positions(Lq, Lk, off)
    want = np.broadcast_to(ref(q, k), (Lq, Lk))
    assert got.shape == (1, 1, Lq, Lk) and got.dtype == torch.bool
    np.testing.assert_array_equal(got[0, 0].numpy(), want)


@pytest.mark.parametrize("Lq,Lk,off", SHAPES)
def test_list_param_per_head(Lq, Lk, off):
    spans = [2, 5, 9]
    pat = spattn.compile("causal & q - k < spans[h]", spans=spans)
    got = pat.mask(Lq, Lk, num_heads=3, q_offset=off)
    q, k = positions(Lq, Lk, off)
    for h, s in enumerate(spans):
        np.testing.assert_array_equal(got[0, h].numpy(), (k <= q) & (q - k < s))


def test_list_param_program_and_heads_variable():
    src = """
    param spans = [3, 6]
    pattern moa = causal & q - k < spans[h % 2] | k % H == h
    """
    pat = spattn.compile(src)
    got = pat.mask(16, 16, num_heads=4)
    q, k = positions(16, 16, None)
    for h in range(4):
        want = ((k <= q) & (q - k < [3, 6][h % 2])) | (k % 4 == h)
        np.testing.assert_array_equal(got[0, h].numpy(), want)


def test_documents_per_batch():
    gen = torch.Generator().manual_seed(0)
    B, L = 2, 30
    doc = torch.sort(torch.randint(0, 4, (B, L), generator=gen), dim=1).values
    pat = spattn.compile("causal & same(doc)")
    got = pat.mask(L, L, batch=B, doc=doc)
    q, k = positions(L, L, None)
    for b in range(B):
        d = doc[b].numpy()
        np.testing.assert_array_equal(got[b, 0].numpy(), (k <= q) & (d[q] == d[k]))


@pytest.mark.parametrize("Lq,Lk,off", SHAPES[:3])
def test_input_indexed_by_expressions(Lq, Lk, off):
    gen = torch.Generator().manual_seed(1)
    doc = torch.randint(0, 3, (Lk,), generator=gen)
    blocks = torch.rand(Lk // 4 + 1, Lk // 4 + 1, generator=gen) < 0.5
    pat = spattn.compile("doc[k // 2] == doc[max(q, 0) // 2] | blocks[max(q, 0) // 4, k // 4]")
    got = pat.mask(Lq, Lk, q_offset=off, doc=doc, blocks=blocks)
    q, k = positions(Lq, Lk, off)
    d, bl = doc.numpy(), blocks.numpy()
    qq = np.maximum(q, 0)
    want = (d[k // 2] == d[qq // 2]) | bl[qq // 4, k // 4]
    np.testing.assert_array_equal(got[0, 0].numpy(), np.broadcast_to(want, (Lq, Lk)))


def test_input_too_short_is_named():
    pat = spattn.compile("same(doc)")
    with pytest.raises(SpattnError, match="doc"):
        pat.mask(8, 8, doc=torch.zeros(5, dtype=torch.int64))


def test_missing_and_extra_inputs():
    pat = spattn.compile("same(doc)")
    with pytest.raises(SpattnError, match="missing runtime input 'doc'"):
        pat.mask(8, 8)
    with pytest.raises(SpattnError, match="unexpected runtime input 'seg'"):
        pat.mask(8, 8, doc=torch.zeros(8, dtype=torch.int64), seg=torch.zeros(8))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_lengths(bad):
    with pytest.raises(SpattnError, match="Lq"):
        spattn.compile("causal").mask(bad, 8)


def test_equal_patterns_hash_equal():
    a = spattn.compile("causal & window(8)")
    b = spattn.compile("window(8) & causal")
    c = spattn.compile("0 <= q - k & q - k < 8")
    assert a == b == c and hash(a) == hash(b) == hash(c) and a.source == c.source
    assert spattn.compile("causal") != spattn.compile("window(8)")
