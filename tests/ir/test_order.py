"""A pattern read through a caller's token order (``ir.layout.ordered``): the mask over
slots is the original mask permuted, the tile classes computed from the coordinate tables
are sound, and an order whose tiles are boxes of the grid decides every tile of a strided
neighbourhood."""
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import spattn
from spattn.ir import layout as LY
from spattn.ir.evaluate import mask
from spattn.ir.pattern import CompiledPattern
from spattn.ir.tiles import EMPTY, FULL, PARTIAL, classify
from tests.ir.test_layout import _grid_source, _natten_args


def _check(ir, N, order, bm, bn, inputs=None):
    """The ordered mask is the permuted mask; its tiles are sound. Returns the tiles."""
    inputs = dict(inputs or {})
    od = LY.ordered(ir, N, taken=inputs)
    tables = od.tables(order)
    m0 = mask(ir, N, N, inputs=inputs)[0, 0]
    m1 = mask(od.ir, N, N, inputs={**inputs, **tables})[0, 0]
    assert torch.equal(m1, m0[order][:, order])
    pat = CompiledPattern(od.ir, inputs={**{n: 1 for n in inputs}, **{n: 1 for n in od.names}})
    cls = classify(pat, N, N, bm, bn, inputs={**inputs, **tables})[0, 0]
    for i, j in itertools_product(cls.shape):
        block = m1[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
        if cls[i, j] == EMPTY:
            assert not block.any(), (i, j)
        elif cls[i, j] == FULL:
            assert block.all(), (i, j)
    return cls


def itertools_product(shape):
    return ((i, j) for i in range(shape[0]) for j in range(shape[1]))


@settings(max_examples=25)
@given(_natten_args(), st.integers(0, 2**31))
def test_ordered_neighborhood_property(args, seed):
    pat = spattn.neighborhood(*args)
    N = math.prod(args[0])
    order = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
    _check(pat.ir, N, order, 8, 4)


@settings(max_examples=25)
@given(_grid_source(), st.integers(0, 2**31))
def test_ordered_random_grid_patterns(case, seed):
    src, N = case
    order = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
    _check(spattn.compile(src).ir, N, order, 8, 4)


@pytest.mark.parametrize("src,params,N", [
    ("causal & same(doc)", {}, 40),
    ("window(5) & (q - k) % [2, 3][h] == 0", {}, 36),
    ("dilated(4, 3)", {}, 45),
], ids=["input-doc", "per-head-list", "dilated"])
def test_ordered_patterns_with_inputs_heads_and_residues(src, params, N):
    ir = spattn.compile(src, **params).ir
    g = torch.Generator().manual_seed(1)
    order = torch.randperm(N, generator=g)
    inputs = {"doc": torch.randint(0, 4, (N,), generator=g).sort().values} if "doc" in src \
        else {}
    od = LY.ordered(ir, N, taken=inputs)
    tables = od.tables(order)
    for h in range(2):
        m0 = mask(ir, N, N, num_heads=2, inputs=inputs)[0, h]
        m1 = mask(od.ir, N, N, num_heads=2, inputs={**inputs, **tables})[0, h]
        assert torch.equal(m1, m0[order][:, order])


def test_table_names_avoid_the_patterns_inputs():
    ir = spattn.compile("order_0[q] == order_0[k]").ir
    od = LY.ordered(ir, 10, taken={"order_0": 1})
    assert all(not n.startswith("order_") for n in od.names)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    _check(ir, 10, order, 4, 4, inputs={"order_0": torch.arange(10) % 3})


def test_box_order_decides_every_tile_of_a_strided_neighborhood():
    """On a 16 x 16 grid, windows 8 x 8 with stride 8 x 8: in an order whose 64-slot tiles
    are the 8 x 8 stride groups, every tile is FULL or EMPTY (in sequence order most are
    PARTIAL)."""
    pat = spattn.neighborhood((16, 16), 8, stride=8)
    N = 256
    layout = LY.Layout(LY.Grid((16, 16)), (8, 8))
    order, _ = layout.permutation()
    cls = _check(pat.ir, N, order, 64, 64)
    assert not (cls == PARTIAL).any()
    assert int((cls == FULL).sum()) == 4
    seq = pat.tiles(N, N, 64, 64)[0, 0]
    assert (seq == PARTIAL).any()


def test_ordered_text_before_a_grid():
    """A pattern whose grid starts after text tokens (an offset grid) is read through an
    order over all its tokens, text included."""
    T = 5
    ir = spattn.compile(f"k < {T} | (q >= {T} & k >= {T} & "
                        f"abs((q - {T}) // 8 - (k - {T}) // 8) <= 1)").ir
    N = T + 48
    assert any(g.offset for g in LY.discover(ir, N))
    _check(ir, N, torch.randperm(N, generator=torch.Generator().manual_seed(3)), 8, 4)


def test_the_tables_bound_positions_within_the_sequence():
    """Over a residue class that does not divide ``N`` (``(q - k) % 6`` at 29 tokens) the
    order is read on a grid without padding: the positions the coordinate tables bound stay
    in ``0 .. N-1`` (a list indexed by ``q`` is then in range for every order)."""
    N = 29
    ir = spattn.compile("(q - k) % 6 == 0 & q >= k").ir
    od = LY.ordered(ir, N)
    assert all(n % d == 0 for n, d in zip(od.grid.shape, od.grid.splits))
    tables = od.tables(torch.randperm(N, generator=torch.Generator().manual_seed(0)))
    top = sum(int(t.max()) * w * od.grid.strides[a]
              for t, (a, w, _) in zip(tables.values(), od.grid.virtual()))
    assert top <= N - 1
    _check(ir, N, torch.randperm(N, generator=torch.Generator().manual_seed(1)), 8, 8)
