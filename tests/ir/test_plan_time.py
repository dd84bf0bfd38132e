"""What keeps the layout choice and the analysis of big patterns cheap, pinned structurally
(no timings): sampled rows classified in one pass, equal to the whole grid's rows; the
count of classifications a choice makes (docs/layouts.md, "Choice")."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spattn
from spattn.dsl.errors import SpattnValueError
from spattn.ir import layout as LY
from spattn.ir import nodes as N
from spattn.ir import tiles as T
from spattn.ir.pattern import CompiledPattern
from spattn.ir.tiles import EMPTY, classify

from tests.helpers.ir_exprs import bool_exprs


def documents_as_ranges(n: int, L: int = 4096) -> str:
    """A 64-wide grid pattern (same row or same column) cut into ``n`` documents written
    as constant ranges: not a product of per-axis conditions, and its ends suggest grids."""
    ends = [L // n * i for i in range(1, n)] + [L]
    docs = " | ".join(f"(q >= {a} & q < {b} & k >= {a} & k < {b})"
                      for a, b in zip([0] + ends, ends))
    return f"(q // 64 == k // 64 | q % 64 == k % 64) & ({docs})"


dims = st.tuples(st.integers(1, 120), st.integers(1, 120), st.integers(1, 40),
                 st.integers(1, 40), st.integers(-20, 20) | st.none(), st.integers(1, 2))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(bool_exprs(), dims, st.data())
def test_rows_are_the_whole_grids_rows(ir, d, data):
    """``classify(..., rows=r)`` is the whole grid's classes at rows ``r`` (any subset, in
    any order, repeats allowed)."""
    Lq, Lk, bm, bn, off, H = d
    nq = -(-Lq // bm)
    rows = data.draw(st.lists(st.integers(0, nq - 1), min_size=1, max_size=6))
    whole = classify(ir, Lq, Lk, bm, bn, num_heads=H, q_offset=off)
    got = classify(ir, Lq, Lk, bm, bn, num_heads=H, q_offset=off, rows=rows)
    assert torch.equal(got, whole[:, :, rows]), (str(ir), rows)


@pytest.mark.parametrize("src", ["causal & (window(20) | sink(3))", "q % 7 == k % 7 | k < 5",
                                 "blocks[q // 16, k // 16] & q >= k"],
                         ids=["streaming", "residues", "block-table"])
def test_rows_in_slabs_and_with_inputs(src, monkeypatch):
    """Sampled rows split into several slabs (tiny ``SLAB_TILES``), with heads, batch and a
    runtime input, are still the whole grid's rows."""
    monkeypatch.setattr(T, "SLAB_TILES", 12)
    p = spattn.compile(src)
    g = torch.Generator().manual_seed(3)
    ins = {"blocks": torch.rand(2, 3, 7, 7, generator=g) < 0.4} if p.inputs else {}
    kw = dict(num_heads=3, batch=2, inputs=ins)
    whole = classify(p, 100, 100, 16, 8, **kw)
    rows = [6, 0, 3, 3, 5]
    assert torch.equal(classify(p, 100, 100, 16, 8, rows=rows, **kw), whole[:, :, rows])


@pytest.mark.parametrize("rows", [[], [5], [-1]], ids=["none", "past-the-end", "negative"])
def test_rows_out_of_range_are_refused(rows):
    with pytest.raises(SpattnValueError, match=r"rows must be query-tile rows in 0\.\.4"):
        classify(spattn.compile("causal").ir, 40, 40, 8, 8, rows=rows)


def _counting(monkeypatch) -> list:
    calls = []
    real = T.classify

    def counted(*args, **kwargs):
        calls.append(kwargs.get("rows"))
        return real(*args, **kwargs)
    monkeypatch.setattr(T, "classify", counted)
    return calls


@pytest.mark.parametrize("src,L", [
    ("causal & (window(100) | sink(4))", 2500),
    ("abs(q // 50 - k // 50) <= 3 & abs(q % 50 - k % 50) <= 4", 2500),
    ("(q - 13) // 40 == (k - 13) // 40 | q < 13 | k < 13", 1620),
], ids=["streaming-L2500", "grid50-L2500", "offset-grid-L1620"])
def test_sampled_pairs_classifies_once(src, L, monkeypatch):
    """The estimate classifies its sampled rows in one call (it was one call per row: a
    bounds analysis and an interval pass over the IR each) and counts exactly the
    non-EMPTY tiles of those rows of the whole grid, scaled up."""
    ir = spattn.compile(src).ir
    bm, bn = 64, 32
    nq = -(-L // bm)
    rows = LY.sampled_rows(nq)
    assert len(set(rows)) == LY.SAMPLED_ROWS < nq
    calls = _counting(monkeypatch)
    got = LY.sampled_pairs(ir, L, bm, bn)
    assert calls == [rows]
    whole = classify(CompiledPattern(ir), L, L, bm, bn)
    live = int((whole[:, :, rows] != EMPTY).sum())
    assert got == live * bm * bn * nq // LY.SAMPLED_ROWS


def test_choice_among_boxes_classifies_once_per_box(monkeypatch):
    """110 documents written as constant ranges over a 64 x 64 grid at L = 4096 (not a
    product pattern; its choice took 7 s with a classification per sampled row): each
    candidate box and the sequence order cost one classification of sampled rows, and none
    of the whole grid runs when no box pays."""
    ir = spattn.compile(documents_as_ranges(110)).ir
    grids = LY.discover(ir, 4096)
    assert grids and all(LY._axis_groups(LY.coordinate_form(ir, g), g) is None
                         or g.offset or g.suffix for g in grids)
    calls = _counting(monkeypatch)
    got = LY.choose(ir, 4096, 4096, 0, target="cpu")
    boxes = sum(len(LY.candidate_boxes(g)[:LY.FULL_CANDIDATES]) for g in grids
                if g.tokens == 4096)
    assert got is None
    assert len(calls) == boxes + 1 and all(r is not None for r in calls)
    # a grid's coordinate form depends on the grid, not on the box: computed once for
    # every box remapped (the regions around extra tokens move by the box's padding)
    grid = LY.Grid((64, 64))
    LY._coordinate_form.cache_clear()
    del calls[:]
    LY.choose(ir, 4096, 4096, 0, grids=[grid], force=True)
    assert len(calls) == len(LY.candidate_boxes(grid)[:LY.FULL_CANDIDATES]) + 2
    assert LY._coordinate_form.cache_info().misses == 1


def _truth(ir, L, bm, bn):
    from spattn.ir.evaluate import mask
    m = mask(ir, L, L)
    nq, nk = -(-L // bm), -(-L // bn)
    pad = torch.zeros(1, 1, nq * bm, nk * bn, dtype=torch.int32)
    valid = torch.zeros_like(pad)
    pad[..., :L, :L] = m.to(torch.int32)
    valid[..., :L, :L] = 1
    t = pad.view(1, 1, nq, bm, nk, bn).sum((3, 5))
    v = valid.view(1, 1, nq, bm, nk, bn).sum((3, 5))
    return torch.where(t == 0, 0, torch.where(t == v, 2, 1)).to(torch.int8)


@pytest.mark.parametrize("kind", ["keys", "diagonals", "documents"])
@pytest.mark.parametrize("bm,bn", [(32, 16), (64, 64), (7, 5)], ids=["32x16", "64x64", "7x5"])
def test_many_ranges_refine_exactly(kind, bm, bn, monkeypatch):
    """Unions of many constant ranges (each cuts every tile, most of them at the tile's
    ends, whose empty segments the CPU's refinement drops: ``_distinct_cuts``) classify
    exactly as the dense mask says, with the refinement forced on."""
    monkeypatch.setattr(T, "refinement_cannot_change", lambda ir: False)
    L, n = 300, 40
    if kind == "keys":
        src = " | ".join(f"(k >= {7 * i + 1} & k < {7 * i + 4})" for i in range(n))
    elif kind == "diagonals":
        src = "q >= k & (" + " | ".join(f"q - k == {5 * i + 2}" for i in range(n)) + ")"
    else:
        src = documents_as_ranges(n, L).replace("q // 64 == k // 64 | q % 64 == k % 64",
                                               "q % 3 == k % 3")
    ir = spattn.compile(src).ir
    got = classify(ir, L, L, bm, bn)
    assert torch.equal(got, _truth(ir, L, bm, bn))
    calls = []
    real = T._distinct_cuts
    monkeypatch.setattr(T, "_distinct_cuts", lambda *a: calls.append(a) or real(*a))
    classify(ir, L, L, bm, bn)
    assert calls and max(c[0].shape[1] for c in calls) >= n


def test_simplify_rewrites_each_distinct_subtree_once(monkeypatch):
    """Substituting a box's coordinates rewrites each distinct subtree of the coordinate
    form once (documents repeat the same coordinate atoms in every range); the result is
    the remapped pattern's."""
    ir = spattn.compile(documents_as_ranges(40)).ir
    grid = LY.Grid((64, 64))
    layout = LY.Layout(grid, LY.candidate_boxes(grid)[0])
    form = LY.coordinate_form(ir, grid)
    sub = {LY._vplaceholder(side, j).name: c for side in "qk"
           for j, c in enumerate(layout.virtual_coords(spattn.ir.build.var(side)))}
    calls = []
    real = LY._simplify_node
    monkeypatch.setattr(LY, "_simplify_node", lambda n, *a: calls.append(n) or real(n, *a))
    got = LY._simplify(form, {}, sub)
    occurrences = list(N.walk(form))
    assert len(calls) == len(set(calls)) == len(set(occurrences)) < len(occurrences) // 2
    monkeypatch.setattr(LY, "_simplify_node", real)
    q, k = spattn.ir.build.var("q"), spattn.ir.build.var("k")
    assert LY.remap(ir, layout) == spattn.ir.build.and_(got, layout.valid(q), layout.valid(k))


def test_cpu_chunks_stay_below_the_grain(monkeypatch):
    """The CPU's refinement sizes its chunks by the cells left after the empty segments
    are dropped (at most a tile's extent per direction): every chunk's cells stay within
    ``CPU_CHUNK`` elements (the parallel grain), and 110 key ranges need few chunks."""
    monkeypatch.setattr(T, "refinement_cannot_change", lambda ir: False)
    ends = list(range(0, 4096, 37))[:110]
    src = "q // 64 == k // 64 & (" + " | ".join(f"(k >= {a} & k < {a + 5})" for a in ends) + ")"
    ir = spattn.compile(src).ir
    sizes, chunks = [], []
    real_eval, real_chunk = T.evaluate, T._refine_chunk

    def evaluate(node, env, *a, **kw):
        q = env.get("q")
        if isinstance(q, torch.Tensor) and q.dim() == 2:
            sizes.append(q.numel())
        return real_eval(node, env, *a, **kw)
    monkeypatch.setattr(T, "evaluate", evaluate)
    monkeypatch.setattr(T, "_refine_chunk", lambda *a: chunks.append(a[3].shape[0])
                        or real_chunk(*a))
    got = classify(ir, 4096, 4096, 128, 64)
    assert torch.equal(got, _truth(ir, 4096, 128, 64))
    assert sizes and max(sizes) <= T.CPU_CHUNK
    partial = sum(chunks)
    # 221 k-segments per tile without the bound: one tile per 2^15 / 221 cells
    assert len(chunks) <= -(-partial // (T.CPU_CHUNK // (64 * 2 * 2))) < partial // 8
