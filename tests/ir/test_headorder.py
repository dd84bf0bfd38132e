"""Per-head key orders (``ir.headorder``): the pattern over slots read through each head's
order is the original mask, its tile classes are sound per head, the head stripes of the
benchmark compute far fewer pairs than in sequence order, and patterns that read ``h``
otherwise have no order."""
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import spattn
from spattn.ir import headorder as HO
from spattn.ir.evaluate import mask
from spattn.ir.nodes import free_vars
from spattn.ir.tiles import EMPTY, FULL, classify
from tests.helpers.headorder import class_source


def _check(src, N, H, bm=8, bn=4, atom=0):
    """The mask over slots, read through the order, is the original; tiles are sound."""
    ir = spattn.compile(src).ir
    atoms = HO.class_atoms(ir)
    if not atoms:       # the class folded to one of k alone (one head: [0][h] is 0)
        assert "h" not in free_vars(ir), src
        return None, None
    ho = HO.head_order(ir, atoms[atom], N, H)
    order = ho.order(N)
    assert order.shape == (H, N)
    assert torch.equal(order.sort(-1).values, torch.arange(N).expand(H, N))
    m0 = mask(ir, N, N, num_heads=H)[0]
    ins = HO.tables(ho, N)
    m1 = mask(ho.ir, N, N, num_heads=H, inputs=ins)[0]
    want = torch.stack([m0[h][:, order[h]] for h in range(H)])
    assert torch.equal(m1, want), src
    # each head's class comes first, in sequence order
    member = HO.class_mask(atoms[atom], N, H)
    for h in range(H):
        n = ho.counts[h]
        assert member[h, order[h, :n]].all() and not member[h, order[h, n:]].any()
        assert (order[h, :n].diff() > 0).all() and (order[h, n:].diff() > 0).all()
    cls = classify(HO.pattern_of(ho), N, N, bm, bn, num_heads=H, inputs=ins)[0]
    for h in range(H):
        for i in range(cls.shape[1]):
            for j in range(cls.shape[2]):
                block = m1[h, i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
                if cls[h, i, j] == EMPTY:
                    assert not block.any(), (src, h, i, j)
                elif cls[h, i, j] == FULL:
                    assert block.all(), (src, h, i, j)
    return ho, cls


@pytest.mark.parametrize("src,N,H", [
    ("causal & (q - k < 16 | k % 4 == h)", 64, 4),
    ("causal & (q - k < 9 | k % 4 == h)", 61, 4),                 # N not divisible by m
    ("causal & (q - k < 8 | (k - 3) % 8 == h % 8)", 70, 4),         # an offset
    ("q - k < 5 & k - q < 5 | k % 3 == (h + 1) % 3", 50, 4),        # bidirectional, shifted
    ("causal & (q - k < 8 | (k // 2) % 4 == h)", 64, 4),            # stripes of 2 keys
    ("causal & (q - k < 8 | k % 8 == 2 * h)", 64, 6),               # heads 4, 5: empty class
    ("k % 4 != h & causal", 40, 4),                                  # a negated class
], ids=["causal-w16-m4", "causal-w9-m4-N61", "offset3-m8", "band-shifted-m3",
        "stripes2-m4", "empty-classes", "negated"])
def test_mask_through_head_order(src, N, H):
    _check(src, N, H)


def test_empty_class_heads_keep_sequence_order():
    ho, _ = _check("causal & (q - k < 8 | k % 8 == 2 * h)", 64, 6)
    assert ho.counts[4] == ho.counts[5] == 0
    order = ho.order(64)
    assert torch.equal(order[4], torch.arange(64)) and torch.equal(order[5], torch.arange(64))


@settings(max_examples=20)
@given(st.integers(2, 9), st.integers(0, 5), st.integers(1, 20), st.integers(1, 3),
       st.integers(24, 70), st.integers(1, 5), st.booleans(), st.integers(1, 8))
@example(4, 0, 16, 1, 61, 4, True, 1)
@example(3, 2, 5, 1, 40, 3, False, 5)
@example(2, 0, 1, 1, 24, 1, False, 5)
def test_head_order_property(m, c, w, b, N, H, causal, form):
    cls = class_source(m, c, b, H, form)
    src = f"(q - k < {w} & k - q < {w} | {cls})" + (" & causal" if causal else "")
    _check(src, N, H)


def test_bench_stripes_compute_few_pairs():
    """The per-head row of benchmarks/bench.py scaled to 2K tokens and 16 heads: under half
    the computed pairs of sequence order's causal tiles (5x fewer at 16K)."""
    ir = spattn.compile("causal & (q - k < 256 | k % 16 == h)").ir
    ho = HO.choose_head_order(ir, 2048, 16, force=True)
    assert ho is not None and ho.pays
    assert ho.computed_order < 0.5 * ho.computed_sequence
    assert "h == k % 16" in str(ho.atom) or "k % 16" in str(ho.atom)


@pytest.mark.parametrize("src,H", [
    ("causal & q - k < 8 + h", 4),                 # reads h, no class of keys
    ("causal & (q - k < 8 | q % 4 == h)", 4),      # a class of queries
    ("causal & (q - k < 8 | k % 4 == h)", 1),      # one head
    ("causal & (q - k < 8 | k % 4 == b)", 4),      # per batch element
], ids=["window-per-head", "query-class", "one-head", "batch-class"])
def test_no_head_order(src, H):
    assert HO.choose_head_order(spattn.compile(src).ir, 256, H, force=True) is None


def test_pattern_over_slots_is_the_same_at_every_length():
    """Class sizes and positions are inputs: one kernel file serves every length."""
    ir = spattn.compile("causal & (q - k < 64 | k % H == h)").ir
    atom = HO.class_atoms(ir)[0]
    a, b = HO.head_order(ir, atom, 256, 4), HO.head_order(ir, atom, 301, 8)
    assert a.ir == b.ir and a.counts != b.counts
    assert free_vars(a.ir) <= {"q", "k", "h"}


def test_a_union_of_residues_is_one_class():
    """Two residues per head beside a window (``|`` of two class atoms among the window's
    disjuncts): the class is their union, and every class tile is decided."""
    src = "causal & (q - k < 16 | k % 8 == h | k % 8 == (h + 4) % 8)"
    ir = spattn.compile(src).ir
    assert str(HO.class_atoms(ir)[0]).count("k % 8") == 2
    ho, _ = _check(src, 256, 4, bm=16, bn=16)
    assert ho.counts == (64,) * 4
    best = HO.choose_head_order(ir, 1024, 4, block_m=64, block_n=32, force=True)
    single = HO.head_order(ir, HO.class_atoms(ir)[1], 1024, 4)
    ins = HO.tables(single, 1024)
    one = HO.per_head_pairs(HO.pattern_of(single), 1024, 1024, 4, 64, 32, inputs=ins)
    assert best.computed_order < one


def test_runtime_inputs_read_through_the_order():
    """``same(doc)`` beside the stripes: ``doc[k]`` becomes ``doc[kpos[k]]``, exact."""
    from spattn.ir.pattern import CompiledPattern
    pat = spattn.compile("input doc\npattern p = same(doc) & causal & (q - k < 9 | k % 4 == h)")
    N, H = 50, 4
    doc = torch.stack([(torch.rand(N, generator=torch.Generator().manual_seed(b)) < 0.1)
                       .cumsum(-1) for b in range(2)])
    ho = HO.choose_head_order(pat.ir, N, H, block_m=8, block_n=4, force=True,
                              inputs={"doc": doc}, declared=pat.inputs, batch=2)
    assert ho is not None and "doc" in dict(ho.inputs)
    ins = {"doc": doc, **HO.tables(ho, N)}
    m0 = mask(pat.ir, N, N, num_heads=H, batch=2, inputs={"doc": doc})
    m1 = mask(ho.ir, N, N, num_heads=H, batch=2, inputs=ins)
    order = ho.order(N)
    for b in range(2):
        for h in range(H):
            assert torch.equal(m1[b, h], m0[b, h][:, order[h]])
    cls = classify(CompiledPattern(ho.ir, inputs=HO.declared_inputs(ho)), N, N, 8, 4,
                   num_heads=H, batch=2, inputs=ins)
    for b, h, i, j in torch.nonzero(cls != 1).tolist():
        block = m1[b, h, i * 8:(i + 1) * 8, j * 4:(j + 1) * 4]
        assert bool(block.all()) if cls[b, h, i, j] == FULL else not block.any()
