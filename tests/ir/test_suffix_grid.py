"""Grids with extra tokens after them (an image then text; text, an image, then text):
discovery finds the grid that ends where a range of q or k flips, the remap (extra tokens
before the grid in the first slots, the boxes, the extra tokens after it in the last slots,
each in sequence order) is exact, its tiles sound, and the boxes pay where they should."""
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import spattn
from spattn.ir import layout as LY
from tests.ir.test_layout import _check_remap, _grid_source, _natten_args


def _around_image(T, n, r, U, causal=False):
    """``T`` text tokens seen by every token, an ``n x n`` image whose patches see a
    ``(2r+1)^2`` square, then ``U`` text tokens that see every earlier token (and each
    other causally)."""
    E = T + n * n
    img = (f"abs((q - {T}) // {n} - (k - {T}) // {n}) <= {r} & "
           f"abs((q - {T}) % {n} - (k - {T}) % {n}) <= {r}")
    src = f"k < {T} | (q >= {E} & k <= q) | (q >= {T} & k >= {T} & k < {E} & {img})"
    return f"({src}) & k <= q" if causal else src


def test_discovery_finds_a_grid_that_ends_before_the_sequence():
    ir = spattn.compile(_around_image(0, 8, 1, 0)).ir
    assert LY.Grid((8, 8), suffix=7) in LY.discover(ir, 64 + 7)
    ir = spattn.compile(_around_image(5, 8, 1, 0)).ir
    assert LY.Grid((8, 8), offset=5, suffix=3) in LY.discover(ir, 5 + 64 + 3)
    assert str(LY.Grid((8, 8), offset=5, suffix=3)) == "grid 8 x 8 after 5 tokens before 3 tokens"


def test_a_declared_grid_is_a_candidate_when_the_pattern_does_not_show_its_end():
    """Nothing in ``q % 8 == k % 8`` says where the grid ends: the declared grid is tried."""
    pat = spattn.compile("grid (c: 8, r: 8) before 5 q % 8 == k % 8")
    declared = LY.declared(pat)
    assert declared == LY.Grid((8, 8), suffix=5)
    assert declared not in LY.discover(pat.ir, 69)
    assert LY.discover(pat.ir, 69, declared)[-1] == declared
    assert declared not in LY.discover(pat.ir, 70, declared)      # another length
    assert LY.discover(spattn.compile("doc[q] == doc[k]").ir, 69, declared) == []


CASES = [((0, 8, 1, 7), False), ((5, 8, 1, 3), False), ((3, 6, 2, 20), True),
         ((17, 4, 1, 9), False)]


@pytest.mark.parametrize("args,causal", CASES,
                         ids=["T0-8x8-r1-U7", "T5-8x8-r1-U3", "T3-6x6-r2-U20-causal",
                              "T17-4x4-r1-U9"])
def test_remap_around_a_grid_is_exact(args, causal):
    T, n, r, U = args
    ir = spattn.compile(_around_image(*args, causal=causal)).ir
    N = T + n * n + U
    grid = next(g for g in LY.discover(ir, N) if (g.offset, g.suffix) == (T, U))
    for box in LY.candidate_boxes(grid, 16)[:4]:
        layout = LY.Layout(grid, box)
        assert layout.padded_size == layout.suffix_start + U
        assert layout.suffix_start % 16 == 0
        _check_remap(ir, layout, N, 16, 8)


def _shifted(src, T, E, U, seen, sees):
    """A grid pattern ``src`` over positions ``T .. E - 1``, with ``T`` extra tokens before
    and ``U`` after it: the extra tokens see the earlier tokens, the cells also the first
    ``sees`` extra tokens after the grid, and those the cells of the first ``seen`` rows."""
    shifted = src.replace("q", f"(q - {T})").replace("k", f"(k - {T})")
    cells = f"q >= {T} & q < {E}"
    return (f"(q < {T} & k <= q) | (q >= {E} & k <= q & k >= {T} + {seen}) "
            f"| ({cells} & k >= {E} & k < {E + sees}) "
            f"| ({cells} & k >= {T} & k < {E} & ({shifted}))")


@settings(max_examples=20)
@given(_grid_source(), st.integers(0, 7), st.integers(1, 9), st.integers(0, 6),
       st.integers(0, 3), st.integers(2, 4))
@example(("abs((q // 3) - (k // 3)) <= 1", 9), 0, 4, 2, 1, 2)
@example(("(q - k) % 2 == 0", 12), 3, 1, 0, 0, 3)
@example(("(q % 4) + 1 <= (k % 4) + 2", 16), 5, 3, 2, 2, 2)
def test_remap_around_a_grid_property(case, T, U, seen, sees, e):
    """A random grid pattern after ``T`` extra tokens and before ``U``: every grid
    discovered with tokens after it, and the declared one (one axis of the cells when the
    pattern shows no divisor), remaps exactly, its tile classes sound against the
    remapped mask."""
    src, M = case
    N = T + M + U
    ir = spattn.compile(_shifted(src, T, T + M, U, seen, min(sees, U))).ir
    grids = [g for g in LY.discover(ir, N, LY.Grid((M,), offset=T, suffix=U)) if g.suffix]
    assert any((g.offset, g.suffix) == (T, U) for g in grids)
    for grid in grids:
        for box in LY.candidate_boxes(grid, 1 << e)[:2]:
            _check_remap(ir, LY.Layout(grid, box), N, 1 << e, 1 << max(e - 1, 0))


@pytest.mark.parametrize("N", [4096, 4000], ids=["N4096-a-grid-of-all", "N4000-none"])
def test_documents_as_ranges_suggest_one_grid_per_row_shape(N):
    """Documents written as constant ranges flip at every document's end: of the grids
    ending there (shorter copies of one grid, each costed by sampling), only the longest
    of each row shape is a candidate, whether or not a grid of every token has those
    rows (an image then text whose length is a multiple of the row pays in its own)."""
    bounds = list(range(100, N, 100)) + [N]
    docs = " | ".join(f"(q >= {a} & q < {b} & k >= {a} & k < {b})"
                      for a, b in zip([0] + bounds, bounds))
    ir = spattn.compile(f"(q // 64 == k // 64 | q % 64 == k % 64) & ({docs})").ir
    around = [g for g in LY.discover(ir, N) if g.suffix]
    assert around == [LY.Grid((50, 64), suffix=N - 3200)], around
    ir = spattn.compile(_around_image(0, 64, 8, 128)).ir
    got = LY.choose(ir, 64 * 64 + 128, 64 * 64 + 128, 0, force=True)
    assert got is not None and got.layout.grid == LY.Grid((64, 64), suffix=128)


def test_boxes_pay_around_an_image():
    """Text, a 64 x 64 image with a 17 x 17 window, then 40 text tokens: the layout's
    tiles compute at most 0.8 of sequence order's pairs (whether ``auto`` uses it is the
    cost model's: tests/ir/test_layout.py)."""
    ir = spattn.compile(_around_image(13, 64, 8, 40)).ir
    N = 13 + 64 * 64 + 40
    got = LY.choose(ir, N, N, 0, force=True)
    assert got is not None and (got.layout.grid.offset, got.layout.grid.suffix) == (13, 40)
    assert got.computed_layout <= 0.8 * got.computed_sequence
    assert got.layout.tokens == LY.TILE_TOKENS


def _extra_mask(shape, args, T, U):
    """``spattn.neighborhood(..., extra_before=T, extra_after=U)`` written out: the cells'
    NATTEN mask (tests/helpers/natten_ref.py), every other pair allowed."""
    import numpy as np
    from tests.helpers.natten_ref import neighborhood_mask
    cells = neighborhood_mask(shape, *args)
    M = cells.shape[0]
    out = np.ones((T + M + U, T + M + U), dtype=bool)
    out[T:T + M, T:T + M] = cells
    return torch.from_numpy(out)


NB_EXTRA = [((6, 5), (3, 2, 1, False), 4, 3), ((7,), (4, 2, 1, True), 0, 5),
            ((6, 4), (3, 1, (2, 1), (False, True)), 9, 0)]


@pytest.mark.parametrize("shape,args,T,U", NB_EXTRA,
                         ids=["2d-6x5-k3-s2-T4-U3", "1d-7-k4-s2-causal-U5",
                              "2d-6x4-d2x1-causal-cols-T9"])
def test_neighborhood_with_extra_tokens(shape, args, T, U):
    """The mask equals its definition; the grid and its extra tokens are discovered and
    every box of them remaps exactly."""
    import math
    pat = spattn.neighborhood(shape, *args, extra_before=T, extra_after=U)
    N = T + math.prod(shape) + U
    assert (pat.grid, pat.grid_offset, pat.grid_suffix) == (shape, T, U)
    assert torch.equal(pat.mask(N, N)[0, 0], _extra_mask(shape, args, T, U))
    grids = [g for g in LY.discover(pat.ir, N, LY.declared(pat)) if (g.offset, g.suffix) == (T, U)]
    assert grids
    for grid in grids:
        for box in LY.candidate_boxes(grid, 16)[:3]:
            _check_remap(pat.ir, LY.Layout(grid, box), N, 16, 8)


@pytest.mark.parametrize("kw,words", [
    ({"extra_before": -1}, "extra_before takes an int >= 0"),
    ({"extra_after": 2.0}, "extra_after takes an int >= 0"),
    ({"extra_after": True}, "extra_after takes an int >= 0"),
    ({"extra_before": 2 ** 63 - 16, "extra_after": 1},
     "extra_before=9223372036854775792 and extra_after=1 around the grid \\(4, 4\\) make "
     "9223372036854775809 tokens, more than a call can have"),
    ({"extra_after": 2 ** 64}, "make 18446744073709551632 tokens"),
], ids=["negative", "float", "bool", "past-the-cap", "after-past-the-cap"])
def test_neighborhood_extra_tokens_are_checked(kw, words):
    with pytest.raises(spattn.SpattnParamError, match=words):
        spattn.neighborhood((4, 4), 3, **kw)


@settings(max_examples=10)
@given(_natten_args(), st.integers(0, 6), st.integers(0, 6), st.integers(2, 4))
def test_neighborhood_with_extra_tokens_property(args, T, U, e):
    """Random NATTEN arguments with random extra tokens: the mask equals its definition,
    and every grid discovered for it (the declared one included) remaps exactly with tile
    classes sound against the remapped mask (the grids with these extra tokens)."""
    import math
    pat = spattn.neighborhood(*args, extra_before=T, extra_after=U)
    N = T + math.prod(args[0]) + U
    assert torch.equal(pat.mask(N, N)[0, 0], _extra_mask(args[0], args[1:], T, U))
    grids = [g for g in LY.discover(pat.ir, N, LY.declared(pat)) if (g.offset, g.suffix) == (T, U)]
    assert grids
    for grid in grids:
        boxes = LY.candidate_boxes(grid, 1 << e)
        if boxes:
            _check_remap(pat.ir, LY.Layout(grid, boxes[0]), N, 1 << e, 1 << max(e - 1, 0))
