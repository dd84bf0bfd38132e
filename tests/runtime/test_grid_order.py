"""The programs' work order (``runtime.triton_backend._grid_order``): a permutation of the
work items, heavy first by classes of a factor of two, head by head within a class."""
import pytest
import torch

from spattn.runtime.tables import _grid_order


def _check(order, work, B, H):
    n = work.shape[-1]
    full = work.expand(B, H, n).reshape(-1)
    assert order.dtype == torch.int32 and order.shape == (B * H * n,)
    assert torch.equal(torch.sort(order.long()).values, torch.arange(B * H * n))
    w = full[order.long()]
    klass = torch.floor(torch.log2(w.clamp(min=1).double()))
    assert bool((klass[1:] <= klass[:-1]).all()), "classes must not increase"
    bh = order.long() // n
    for c in klass.unique():
        sel = klass == c
        assert bool((bh[sel][1:] >= bh[sel][:-1]).all()), "heads in order within a class"
        for h in bh[sel].unique():
            ws = w[sel & (bh == h)]
            assert bool((ws[1:] <= ws[:-1]).all()), "tiles of a head heavy first"


@pytest.mark.parametrize("B,H,shared", [(1, 1, True), (2, 3, True), (2, 3, False), (1, 16, True)],
                         ids=["B1-H1", "B2-H3-shared", "B2-H3-per-head", "B1-H16-shared"])
def test_grid_order_properties(B, H, shared):
    g = torch.Generator().manual_seed(B * 31 + H)
    n = 37
    shape = (1, 1, n) if shared else (B, H, n)
    work = torch.randint(0, 300, shape, generator=g)
    _check(_grid_order(work, B, H), work, B, H)


def test_sink_tile_of_every_head_first():
    """``causal & (window | sink)``'s dK/dV: key tile 0 is seen by every query tile."""
    n, H = 64, 4
    work = torch.full((1, 1, n), 17)
    work[..., 0] = n
    order = _grid_order(work, 1, H).long()
    assert sorted((order[:H] % n).tolist()) == [0] * H
    assert (order[H:2 * H] // n).tolist() == [0, 0, 0, 0], "then head 0's tiles together"
