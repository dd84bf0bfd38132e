"""Box tables (runtime/tables ``_boxes``, the forward's ``BOXES`` form): a forward in a token
layout addresses its key tiles as a box of the key-tile grid. With zero waste the boxes
visit exactly the non-EMPTY tiles and leave exactly the FULL ones unmasked (a property over
random classes); the kernels agree with the float64 reference where boxes are chosen."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import spattn
from spattn.ir.tiles import EMPTY, FULL, PARTIAL
from spattn.runtime import tables as tb
from spattn.runtime.plan import RemappedPlan
from spattn.runtime.triton_backend import key_dims
from tests.runtime.test_layouts import _run


def _visited(box, dims):
    """What the kernel's box loop does for one row: {tile index: unmasked?}."""
    dims4 = (1,) * (4 - len(dims)) + tuple(dims)
    rng = [range(int(box[4 * a]), int(box[4 * a + 1])) for a in range(4)]
    out = {}
    for c in ((a, b, c, d) for a in rng[0] for b in rng[1] for c in rng[2] for d in rng[3]):
        i = ((c[0] * dims4[1] + c[1]) * dims4[2] + c[2]) * dims4[3] + c[3]
        out[i] = all(box[4 * a + 2] <= c[a] < box[4 * a + 3] for a in range(4))
    return out


@st.composite
def _classes(draw):
    dims = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    rows = draw(st.integers(1, 3))
    out = []
    for _ in range(rows):
        if draw(st.booleans()):       # a product: a box of non-EMPTY tiles, a box of FULL
            ne = [sorted(draw(st.lists(st.integers(0, d), min_size=2, max_size=2)))
                  for d in dims]
            fu = [sorted(draw(st.lists(st.integers(lo, hi), min_size=2, max_size=2)))
                  for lo, hi in ne]
            cls = torch.full(dims, EMPTY, dtype=torch.int8)
            cls[tuple(slice(lo, hi) for lo, hi in ne)] = PARTIAL
            cls[tuple(slice(lo, hi) for lo, hi in fu)] = FULL
        else:                          # anything
            cls = torch.tensor(draw(st.lists(st.sampled_from([EMPTY, PARTIAL, FULL]),
                                             min_size=math.prod(dims),
                                             max_size=math.prod(dims))),
                               dtype=torch.int8).reshape(dims)
        out.append(cls.reshape(-1))
    return torch.stack(out)[None, None], dims


@given(_classes())
def test_zero_waste_boxes_visit_exactly_the_tables_tiles(case):
    cls, dims = case
    boxes, waste, work = tb._boxes(cls, dims)
    row_waste = []
    for i in range(cls.shape[2]):
        row = cls[0, 0, i]
        seen = _visited(boxes[0, 0, i].tolist(), dims)
        want = {j: int(row[j]) == FULL for j in range(row.numel()) if int(row[j]) != EMPTY}
        row_waste.append(seen != want)
        assert int(work[0, 0, i]) == 2 * len(want) - sum(want.values())
    # zero waste exactly when every row's boxes are its tables' tiles
    assert (int(waste) == 0) == (not any(row_waste))


def test_product_of_boxes_has_zero_waste():
    cls = torch.full((2, 3, 4), EMPTY, dtype=torch.int8)
    cls[0:2, 1:3, 1:4] = PARTIAL
    cls[1:2, 1:3, 2:3] = FULL
    boxes, waste, _ = tb._boxes(cls.reshape(1, 1, 1, -1), (2, 3, 4))
    assert int(waste) == 0
    assert boxes[0, 0, 0].tolist() == [0, 1, 0, 1, 0, 2, 1, 2, 1, 3, 1, 3, 1, 4, 2, 3]
    cls[0, 0, 0] = PARTIAL              # not a box any more
    assert int(tb._boxes(cls.reshape(1, 1, 1, -1), (2, 3, 4))[1]) > 0


@pytest.mark.parametrize("grid, bn, Lk, want", [
    (None, 64, 1024, None), (((2, 4), 128), 64, 1024, (2, 4, 2)),
    (((2, 4), 128), 128, 1024, (2, 4)), (((2, 4), 128), 256, 1024, None),
    (((3, 1, 4), 128), 32, 1536, (3, 4, 4)), (((2, 4), 128), 64, 1000, None),
    (((2, 3, 4, 5), 64), 32, 7680, None)],
    ids=["no-layout", "half-boxes", "whole-boxes", "tile-over-boxes", "axis-of-one",
         "not-whole", "five-axes"])
def test_key_dims(grid, bn, Lk, want):
    assert key_dims(grid, bn, Lk) == want


# neighbourhoods whose rows are boxes of the key-tile grid (not one contiguous span) at
# the interpreter's 32-key tiles
BOX_CASES = [("2d-24x40-k7x9", ((24, 40), (7, 9))),
             ("3d-4x16x16-k3x5x5", ((4, 16, 16), (3, 5, 5)))]


@pytest.mark.interpreter
@pytest.mark.parametrize("args", [c[1] for c in BOX_CASES],
                         ids=[f"B1-Hq2-Hk1-D16-fp32-{c[0]}" for c in BOX_CASES])
def test_triton_forward_in_boxes(args, monkeypatch):
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.neighborhood(*args, backend="triton")
    plan = _run(pat, N=math.prod(pat.grid), Hq=2, Hk=1)
    assert isinstance(plan, RemappedPlan)
    assert plan.inner.forward_stage.tables == "boxes"
