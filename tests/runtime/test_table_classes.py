"""Tile classes shared between tile shapes (``runtime/triton_backend.py``: ``_pool``,
``_classes``): coarse classes pooled from a finer classification are sound against the
dense mask and at least as precise as classifying the coarse tiles directly; a training
step classifies once per tile shape that no earlier classification divides.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spattn.ir.tiles import EMPTY, FULL, PARTIAL
from spattn.runtime import tables as tb

from tests.helpers.kernels import block_table, compile_pattern, doc_ids

PATTERNS = [
    ("causal", "causal", None),
    ("window_sink", "causal & (window(13) | sink(4))", None),
    ("dilated", "dilated(5, 3)", None),
    ("documents", "causal & same(doc)", lambda g, L: {"doc": doc_ids(L, 4, g)}),
    ("unsorted", "causal & same(doc)", lambda g, L: {"doc": torch.randint(0, 3, (L,), generator=g)}),
    ("blocks", "blocks[q // 8, k // 8]",
     lambda g, L: {"blocks": block_table(-(-L // 8), -(-L // 8), g, density=0.3)}),
    ("per_head", "causal & q - k < [6, 20][h]", None),
]


def truth(pat, Lq, Lk, bm, bn, H, q_offset, inputs):
    """Tile classes from the dense mask (the oracle)."""
    m = pat.mask(Lq, Lk, num_heads=H, q_offset=q_offset, **inputs).expand(1, H, Lq, Lk)
    nq, nk = -(-Lq // bm), -(-Lk // bn)
    got = torch.zeros(1, H, nq * bm, nk * bn, dtype=torch.int32)
    valid = torch.zeros_like(got)
    got[..., :Lq, :Lk] = m.to(torch.int32)
    valid[..., :Lq, :Lk] = 1
    t = got.view(1, H, nq, bm, nk, bn).sum((3, 5))
    v = valid.view(1, H, nq, bm, nk, bn).sum((3, 5))
    return torch.where(t == 0, EMPTY, torch.where(t == v, FULL, PARTIAL)).to(torch.int8)


@given(st.sampled_from(PATTERNS), st.integers(1, 120), st.integers(1, 120),
       st.sampled_from([8, 16]), st.sampled_from([8, 16]), st.sampled_from([1, 2, 4]),
       st.sampled_from([1, 2, 4]), st.one_of(st.none(), st.integers(-40, 40)),
       st.integers(0, 2 ** 31 - 1))
def test_pooled_classes_sound_and_precise(case, Lq, Lk, fm, fn, rm, rn, q_offset, seed):
    name, src, mk = case
    pat = compile_pattern(src)
    gen = torch.Generator().manual_seed(seed)
    off = Lk - Lq if q_offset is None else q_offset
    if mk:      # inputs indexed by q and k: positions must be >= 0 and within the input
        off = max(off, 0)
    inputs = mk(gen, max(Lq + off, Lk)) if mk else {}
    kw = dict(H=2, B=1, q_offset=off, device="cpu", inputs=inputs)
    fine = tb._classify(pat, Lq, Lk, fm, fn, **kw)
    bm, bn = fm * rm, fn * rn
    pooled = tb._pool(fine, (fm, fn), (bm, bn), Lq, Lk).expand(1, 2, -1, -1)
    direct = tb._classify(pat, Lq, Lk, bm, bn, **kw).expand(1, 2, -1, -1)
    want = truth(pat, Lq, Lk, bm, bn, 2, off, inputs)
    assert pooled.shape == want.shape and pooled.dtype == torch.int8
    decided = pooled != PARTIAL
    assert torch.equal(pooled[decided], want[decided]), f"{name}: pooled class unsound"
    surely = direct != PARTIAL
    assert torch.equal(pooled[surely], direct[surely]), f"{name}: pooled less precise"


def test_pool_is_exact_for_exact_fine_classes():
    """Pooling exact fine classes gives the exact coarse classes (ragged edges included)."""
    pat = compile_pattern("causal & (window(13) | sink(4))")
    for Lq, Lk in ((100, 100), (37, 90), (90, 37)):
        off = Lk - Lq
        fine = truth(pat, Lq, Lk, 8, 8, 1, off, {})
        for bm, bn in ((16, 8), (8, 32), (32, 32)):
            assert torch.equal(tb._pool(fine, (8, 8), (bm, bn), Lq, Lk),
                               truth(pat, Lq, Lk, bm, bn, 1, off, {}))


@pytest.fixture
def count_classify(monkeypatch):
    calls = []
    classify = tb._classify

    def spy(pattern, Lq, Lk, bm, bn, **kw):
        calls.append((bm, bn))
        return classify(pattern, Lq, Lk, bm, bn, **kw)
    monkeypatch.setattr(tb, "_classify", spy)
    return calls


def test_training_step_shares_classifications(count_classify):
    pat = compile_pattern("causal & same(doc)")
    doc = {"doc": doc_ids(300, 5, torch.Generator().manual_seed(1))}
    kw = dict(B=1, H=2, q_offset=0, device="cpu", inputs=doc)
    an = tb.Analysis(pat, 300, 300, **kw)                    # what one plan holds
    tb.fwd_tables(pat, 300, 300, 32, 16, analysis=an, **kw)
    tb.bwd_tables(pat, 300, 300, (16, 32, 32, 16), analysis=an, **kw)   # dQ: the forward's tiles
    assert count_classify == [(32, 16), (16, 32)]
    count_classify.clear()
    tb.bwd_tables(pat, 300, 300, (16, 64, 64, 16), analysis=an, **kw)   # both pooled
    assert count_classify == []
    # another plan (another input) classifies again, once, at the common divisor
    tb.bwd_tables(pat, 300, 300, (16, 32, 64, 16), **kw)
    assert count_classify == [(16, 16)]


def test_shared_classes_equal_direct(count_classify):
    """Tables built from shared classes equal those of a fresh classification."""
    pat = compile_pattern("causal & same(doc)")
    doc = {"doc": doc_ids(300, 5, torch.Generator().manual_seed(2))}
    kw = dict(B=1, H=2, q_offset=7, device="cpu", inputs=doc)
    a = tb.bwd_tables(pat, 293, 300, (16, 64, 64, 16), **kw)
    b = tb.bwd_tables(pat, 293, 300, (16, 64, 64, 16), **dict(kw, tables="csr"))
    c = tb.bwd_tables(pat, 293, 300, (64, 64, 64, 64), **dict(kw, tables="csr"))
    assert len(count_classify) == 3
    spans_a = a[0][0][4]
    spans_direct = tb._spans(tb._demote_ragged(
        tb._classify(pat, 293, 300, 64, 16, **kw), 300, 16, 3))[0]
    assert torch.equal(spans_a[..., :-1, :], spans_direct)
    assert b[1][2] == "csr" and c[1][2] == "csr"


def test_training_step_shares_tables(count_classify, monkeypatch):
    """The dQ table is the forward's when the tile shapes agree; the two backward tables
    are built together (one device read for both spans' waste)."""
    built = []
    table_many = tb._table_many

    def spy(items, mode="auto"):
        built.append(len(items))
        return table_many(items, mode)
    monkeypatch.setattr(tb, "_table_many", spy)
    pat = compile_pattern("causal & same(doc)")
    doc = {"doc": doc_ids(300, 5, torch.Generator().manual_seed(3))}
    kw = dict(B=1, H=2, q_offset=0, device="cpu", inputs=doc)
    an = tb.Analysis(pat, 300, 300, **kw)
    fwd = tb.fwd_tables(pat, 300, 300, 32, 16, analysis=an, **kw)
    (tq, order_q, sq), _ = tb.bwd_tables(pat, 300, 300, (16, 32, 32, 16), analysis=an, **kw)
    assert built == [1, 1], "the dK/dV table only"
    assert all(a is b for a, b in zip(fwd[0], tq)) and torch.equal(fwd[1], order_q)
    built.clear()
    tb.bwd_tables(pat, 300, 300, (16, 64, 64, 16), analysis=an, **kw)
    assert built == [2]
    built.clear()
    tb.bwd_tables(pat, 300, 300, (16, 64, 64, 16), analysis=an, **dict(kw, tables="csr"))
    assert built == [2], "another form is another table"


def test_classified_at_most_class_tile(count_classify):
    """Coarse tiles are pooled from CLASS_TILE-sided classes: the forward's 128x64 and the
    backward's 64x128 share one classification, and the pooled classes equal direct ones."""
    pat = compile_pattern("causal & same(doc)")
    doc = {"doc": doc_ids(703, 5, torch.Generator().manual_seed(4))}
    kw = dict(B=1, H=2, q_offset=3, device="cpu", inputs=doc)
    an = tb.Analysis(pat, 700, 650, **kw)
    fwd = tb.fwd_tables(pat, 700, 650, 128, 64, analysis=an, **kw)
    tb.bwd_tables(pat, 700, 650, (64, 128, 128, 64), analysis=an, **kw)
    assert count_classify == [(tb.CLASS_TILE, tb.CLASS_TILE)] == [(64, 64)]
    direct = tb._demote_ragged(tb._classify(pat, 700, 650, 128, 64, **kw), 650, 64, 3)
    assert torch.equal(fwd[0][4][..., :-1, :], tb._spans(direct)[0])


@pytest.mark.parametrize("expect", [True, False], ids=["expected", "not-expected"])
def test_expected_backward_tiles_share_the_forwards_classification(count_classify, expect):
    """The GPU's default step (forward 64x64, dQ 64x32, dK/dV 32x64): with the backward's
    tiles expected before the forward's tables are built, one classification at 32x32
    serves all three (the tables equal those of a fresh analysis per kernel); without,
    the forward's 64x64 classes cannot be pooled into the backward's tiles."""
    pat = compile_pattern("causal & same(doc)")
    doc = {"doc": doc_ids(703, 5, torch.Generator().manual_seed(6))}
    kw = dict(B=1, H=2, q_offset=3, device="cpu", inputs=doc)
    an = tb.Analysis(pat, 700, 650, **kw)
    if expect:
        an.expect([(64, 32), (32, 64)])
    fwd = tb.fwd_tables(pat, 700, 650, 64, 64, analysis=an, **kw)
    bwd = tb.bwd_tables(pat, 700, 650, (32, 64, 64, 32), analysis=an, **kw)
    assert count_classify == ([(32, 32)] if expect else [(64, 64), (32, 32)])
    fresh = [tb.fwd_tables(pat, 700, 650, 64, 64, **kw),
             *tb.bwd_tables(pat, 700, 650, (32, 64, 64, 32), **kw)]
    for (a, o, sp), (a2, o2, sp2) in zip([fwd, *bwd], fresh):
        assert sp == sp2 and torch.equal(o, o2)
        assert all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
                   for x, y in zip(a, a2))


def test_tables_already_built():
    """Every requested table already built by the analysis: nothing is rebuilt."""
    pat = compile_pattern("causal & window(9)")
    kw = dict(B=1, H=2, q_offset=0, device="cpu", inputs={})
    an = tb.Analysis(pat, 100, 100, **kw)
    a = tb.fwd_tables(pat, 100, 100, 16, 16, analysis=an, **kw)
    b = tb.fwd_tables(pat, 100, 100, 16, 16, analysis=an, **kw)
    assert all(x is y for x, y in zip(a[0], b[0])) and a[1] is b[1] and a[2] == b[2]
