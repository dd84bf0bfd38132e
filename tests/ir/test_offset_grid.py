"""Grids after extra tokens (text before an image, any count): discovery finds the grid of
the tokens after the offset the pattern subtracts, the remap (extra tokens first in
sequence order, then the boxes) is exact, its tiles sound, and the boxes beat sequence
order where the count is not a multiple of the row length."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import spattn
from spattn.ir import layout as LY
from tests.ir.test_layout import _check_remap, _grid_source


def _text_image(T, n, r):
    """``T`` text tokens seen by every token (and seeing each other), then an ``n x n``
    image whose patches see a ``(2r+1)^2`` square."""
    return (f"k < {T} | (q >= {T} & k >= {T} & abs((q - {T}) // {n} - (k - {T}) // {n}) <= {r}"
            f" & abs((q - {T}) % {n} - (k - {T}) % {n}) <= {r})")


def test_discovery_finds_the_grid_after_the_text():
    ir = spattn.compile(_text_image(5, 8, 1)).ir
    grids = LY.discover(ir, 5 + 64)
    assert LY.Grid((8, 8), offset=5) in grids
    assert "after 5 tokens" in str(LY.Grid((8, 8), offset=5))


@pytest.mark.parametrize("T,n,r,causal", [(5, 8, 1, False), (3, 6, 2, True), (17, 4, 1, False)],
                         ids=["T5-8x8-r1", "T3-6x6-r2-causal", "T17-4x4-r1"])
def test_remap_after_extra_tokens_is_exact(T, n, r, causal):
    src = _text_image(T, n, r) + (" & k <= q" if causal else "")
    ir = spattn.compile(src).ir
    N = T + n * n
    grid = next(g for g in LY.discover(ir, N) if g.offset == T)
    for box in LY.candidate_boxes(grid, 16)[:4]:
        layout = LY.Layout(grid, box)
        assert layout.prefix == -(-T // 16) * 16
        _check_remap(ir, layout, N, 16, 8)


@settings(max_examples=20)
@given(_grid_source(), st.integers(1, 9), st.integers(2, 4))
def test_remap_after_extra_tokens_property(case, T, e):
    """A random grid pattern shifted past ``T`` extra tokens, which see the first keys."""
    src, N = case
    shifted = src.replace("q", f"(q - {T})").replace("k", f"(k - {T})")
    full = f"(q < {T} & k <= q) | (q >= {T} & k >= {T} & ({shifted}))"
    ir = spattn.compile(full).ir
    for grid in LY.discover(ir, N + T):
        if grid.offset != T:
            continue
        for box in LY.candidate_boxes(grid, 1 << e)[:2]:
            _check_remap(ir, LY.Layout(grid, box), N + T, 1 << e, 1 << max(e - 1, 0))


def test_boxes_pay_after_text_not_on_whole_rows():
    """13 text tokens and a 32 x 32 image (13 is not a multiple of 32): the layout's tiles
    compute at most 0.8 of sequence order's pairs (at this size its gathers would cost
    more than that saves: ``auto`` leaves it, ``pays``)."""
    ir = spattn.compile(_text_image(13, 32, 4)).ir
    N = 13 + 32 * 32
    got = LY.choose(ir, N, N, 0, force=True)
    assert got is not None and got.layout.grid.offset == 13
    assert got.computed_layout <= 0.8 * got.computed_sequence
