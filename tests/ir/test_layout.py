"""``spattn.neighborhood`` against an independent numpy definition of NATTEN's semantics,
and the token layouts of ``ir.layout``: a remapped pattern, read through the permutation,
is the original pattern; its tile classes are sound; discovery finds the grids of
flattened expressions; bad arguments name themselves."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spattn
from spattn.ir.cost import COSTS
from spattn.ir import layout as LY
from spattn.ir.evaluate import mask
from spattn.ir.tiles import EMPTY, FULL
from tests.helpers.natten_ref import neighborhood_mask

# id, (shape, kernel_size, stride, dilation, is_causal)
NATTEN = [
    ("1d-odd", ((13,), 5, 1, 1, False)),
    ("1d-even", ((13,), 4, 1, 1, False)),
    ("1d-stride3", ((17,), 5, 3, 1, False)),
    ("1d-stride-even", ((16,), 6, 4, 1, False)),
    ("1d-dilation3-ragged", ((17,), 4, 1, 3, False)),
    ("1d-causal", ((12,), 4, 1, 1, True)),
    ("1d-causal-stride-dilation", ((19,), 4, 3, 2, True)),
    ("2d-odd", ((7, 9), 3, 1, 1, False)),
    ("2d-even-mixed", ((8, 9), (4, 3), (2, 3), (1, 2), (False, True))),
    ("2d-whole-axis", ((5, 6), (5, 6), 1, 1, False)),
    ("3d", ((4, 5, 6), (3, 2, 4), (1, 2, 3), (1, 2, 1), False)),
    ("3d-causal-time", ((5, 4, 6), (2, 3, 3), (2, 1, 3), 1, (True, False, False))),
    ("4d", ((3, 4, 3, 4), 2, (1, 2, 1, 1), (1, 1, 1, 2), (False, True, False, False))),
]


@pytest.mark.parametrize("args", [c[1] for c in NATTEN], ids=[c[0] for c in NATTEN])
def test_neighborhood_matches_natten_reference(args):
    pat = spattn.neighborhood(*args)
    N = math.prod(args[0])
    got = pat.mask(N, N)[0, 0].numpy()
    assert np.array_equal(got, neighborhood_mask(*args))


@st.composite
def _natten_args(draw):
    d = draw(st.integers(1, 3))
    shape, ks, ss, ds, cs = [], [], [], [], []
    for _ in range(d):
        n = draw(st.integers(2, 9 if d > 1 else 30))
        dil = draw(st.integers(1, max(1, n // 2)))
        K = draw(st.integers(1, n // dil))
        shape.append(n)
        ks.append(K)
        ss.append(draw(st.integers(1, K)))
        ds.append(dil)
        cs.append(draw(st.booleans()))
    return tuple(shape), tuple(ks), tuple(ss), tuple(ds), tuple(cs)


@settings(max_examples=40)
@given(_natten_args())
def test_neighborhood_property(args):
    pat = spattn.neighborhood(*args)
    N = math.prod(args[0])
    assert np.array_equal(pat.mask(N, N)[0, 0].numpy(), neighborhood_mask(*args))


def _check_remap(ir, layout, N, bm, bn):
    """The remapped mask read through the permutation is the original; its tile classes
    are sound against the remapped mask."""
    rir = LY.remap(ir, layout)
    Np = layout.padded_size
    order, inverse = layout.permutation()
    assert order.numel() == Np and inverse.numel() == N
    assert torch.equal(torch.sort(inverse).values.unique(), torch.sort(inverse).values)
    m0 = mask(ir, N, N)[0, 0]
    m1 = mask(rir, Np, Np)[0, 0]
    assert torch.equal(m1[inverse][:, inverse], m0)
    assert int(m1.sum()) == int(m0.sum())          # padding cells see nothing
    cls = spattn.Pattern(rir).tiles(Np, Np, bm, bn)[0, 0]
    pad = torch.zeros(-(-Np // bm) * bm, -(-Np // bn) * bn, dtype=torch.bool)
    pad[:Np, :Np] = m1
    blocks = pad.reshape(cls.shape[0], bm, cls.shape[1], bn)
    anyt, allt = blocks.any(3).any(1), blocks.all(3).all(1)
    assert not (anyt & (cls == EMPTY)).any()
    # FULL: every in-range pair allowed (padding rows of a ragged last tile excluded)
    for i, j in (cls == FULL).nonzero().tolist():
        assert m1[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].all()
    return rir


@pytest.mark.parametrize("args", [c[1] for c in NATTEN[7:]], ids=[c[0] for c in NATTEN[7:]])
def test_remap_every_box(args):
    pat = spattn.neighborhood(*args)
    N = math.prod(args[0])
    grids = LY.discover(pat.ir, N)
    assert grids, "the grid of a neighborhood is discovered"
    for grid in grids:
        for box in LY.candidate_boxes(grid, 16)[:4]:
            _check_remap(pat.ir, LY.Layout(grid, box), N, 16, 8)


@settings(max_examples=15)
@given(_natten_args(), st.integers(2, 4))
def test_remap_property(args, e):
    pat = spattn.neighborhood(*args)
    N = math.prod(args[0])
    for grid in LY.discover(pat.ir, N):
        boxes = LY.candidate_boxes(grid, 1 << e)
        if boxes:
            _check_remap(pat.ir, LY.Layout(grid, boxes[0]), N, 1 << e, 1 << max(e - 1, 0))


@pytest.mark.parametrize("src,params,N,shape", [
    ("abs(q // W - k // W) <= 3 & abs(q % W - k % W) <= 3", {"W": 32}, 1024, (32, 32)),
    ("abs(q // 64 - k // 64) <= 1 & abs(q // 8 % 8 - k // 8 % 8) <= 2 & abs(q % 8 - k % 8) <= 2",
     {}, 256, (4, 8, 8)),
    ("dilated(8, 4)", {}, 512, (128, 4)),
])
def test_discovery_of_flattened_patterns(src, params, N, shape):
    pat = spattn.compile(src, **params)
    grids = LY.discover(pat.ir, N)
    assert grids and grids[-1].shape == shape
    _check_remap(pat.ir, LY.Layout(grids[-1], LY.candidate_boxes(grids[-1], 16)[0]), N, 16, 8)


def test_flux_window_box_tiles_beat_sequence_order():
    """A 2-D neighbourhood: box tiles compute fewer pairs, and every box tile pair of a
    strided neighbourhood whose groups hold the box is FULL or EMPTY."""
    pat = spattn.neighborhood((64, 64), (16, 16))
    r = LY.choose(pat.ir, 4096, 4096, 0, force=True)
    assert r is not None and r.computed_layout < 0.6 * r.computed_sequence
    assert r.useful == int(pat.mask(4096, 4096).sum())
    strided = spattn.neighborhood((64, 64), (16, 16), stride=(16, 16))
    r = LY.choose(strided.ir, 4096, 4096, 0, force=True)
    assert r.fraction_layout == 1.0


@pytest.mark.parametrize("shape,kernel,pays", [
    ((64, 64), (16, 16), False),      # 4K tokens, 256 keys a query: the gathers cost more
    ((128, 128), (32, 32), True),     # 16K tokens, 1024 keys a query
    ((256, 256), (80, 80), True),     # FLUX
], ids=["64x64-k16", "128x128-k32", "256x256-k80"])
def test_a_layout_pays_by_its_predicted_cost(shape, kernel, pays):
    """``auto`` weighs the layout's computed pairs, tile lists, query tiles and gathers
    against sequence order's (``layout_cost``): at 4K tokens a 16 x 16 window computes
    fewer pairs in boxes (0.57x) yet is predicted slower with its gathers (measured 2.1x
    slower on the H200, benchmarks/RESULTS.md), at 16K and beyond the boxes pay."""
    pat = spattn.neighborhood(shape, kernel)
    N = shape[0] * shape[1]
    forced = LY.choose(pat.ir, N, N, 0, force=True)
    assert forced.computed_layout < forced.computed_sequence
    assert forced.pays is pays
    assert (LY.choose(pat.ir, N, N, 0) is not None) is pays
    gathers = N * COSTS["cuda"]["gather_token"]
    assert forced.cost_layout >= gathers
    assert forced.cost_layout - gathers < forced.cost_sequence
    cpu = LY.choose(pat.ir, N, N, 0, force=True, target="cpu")
    assert cpu.cost_layout < forced.cost_layout


def test_no_layout_for_plain_sequence_patterns():
    for src in ("causal", "window(64)", "causal & same(doc)"):
        assert LY.discover(spattn.compile(src).ir, 4096) == []
    assert LY.choose(spattn.compile("window(64)").ir, 4096, 4096, 0) is None


@pytest.mark.parametrize("kwargs,words", [
    (dict(shape=(8, 8), kernel_size=9), ["kernel_size[0]", "exceeds axis 0"]),
    (dict(shape=(8, 8), kernel_size=3, dilation=(1, 3)), ["dilation[1]", "axis 1"]),
    (dict(shape=(8, 8), kernel_size=3, stride=4), ["stride[0]", "1..kernel_size[0]"]),
    (dict(shape=(8, 8), kernel_size=(3, 3, 3)), ["kernel_size", "2 axes"]),
    (dict(shape=(8, 8, 8, 8, 8), kernel_size=3), ["shape"]),
    (dict(shape=(8, 0), kernel_size=1), ["shape"]),
    (dict(shape=(8, 8), kernel_size=3, is_causal=1), ["is_causal"]),
    (dict(shape=(8, 8), kernel_size=2.5), ["kernel_size"]),
    (dict(shape=(8, 8), kernel_size=0), ["kernel_size[0]"]),
])
def test_neighborhood_argument_errors(kwargs, words):
    with pytest.raises(spattn.SpattnError) as e:
        spattn.neighborhood(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_grid_length_mismatch_is_an_input_error():
    pat = spattn.neighborhood((4, 6), 3, backend="torch")
    q = torch.randn(1, 1, 25, 16)
    with pytest.raises(spattn.SpattnInputError, match=r"grid \(4, 6\) of 24 tokens"):
        pat(q, q, q)
    with pytest.raises(spattn.SpattnInputError, match="Lk=20"):
        pat.mask(24, 20)
    assert pat.mask(4, 24, q_offset=8).shape == (1, 1, 4, 24)      # some query rows


def test_composes_through_its_source():
    nb = spattn.neighborhood((8, 8), 3)
    both = spattn.compile(f"({nb.source}) & k <= q")
    want = nb.mask(64, 64) & spattn.compile("causal").mask(64, 64)
    assert torch.equal(both.mask(64, 64), want)
    assert LY.discover(both.ir, 64)[-1].shape == (8, 8)


def test_explain_reports_the_layout():
    rep = spattn.neighborhood((64, 64), (9, 9)).explain(4096)
    lay = rep.layout
    assert lay is not None and lay["grid"] == [64, 64] and math.prod(lay["box"]) == 128
    assert lay["fraction_layout"] > lay["fraction_sequence"]
    assert abs(lay["fraction_sequence"] - rep.efficiency) < 1e-9   # same tiles, same count
    assert "layout    grid 64 x 64" in str(rep)
    assert spattn.compile("causal").explain(1024).layout is None


@pytest.mark.parametrize("src,N", [
    ("dilated(5, 3)", 96),
    ("strided(8)", 64),
    ("fixed(8, 2)", 64),
    ("chunked(6) & causal", 72),
    ("abs(q // 9 - k // 9) <= 1 & k % 9 <= q % 9 | k < 3", 81),
    ("(q // 16) % 4 == (k // 16) % 4 & abs(q % 16 - k % 16) <= 2 & h == 0", 128),
    ("abs(q // 12 - k // 12) + abs(q % 12 - k % 12) <= 3 & (q - k) % 2 == 0", 96),
    ("k < 24 | q < 24 | abs((q - 24) // 8 - (k - 24) // 8) <= 1 & "
     "abs((q - 24) % 8 - (k - 24) % 8) <= 2", 24 + 64),
    ("k < 20 | abs((q - 20) // 8 - (k - 20) // 8) <= 1", 80),
], ids=["dilated", "strided", "fixed", "chunked-causal", "2d-or-sink", "3d-head",
        "diamond-parity", "text-rows-beside-image", "text-not-whole-rows"])
def test_remap_of_flattened_patterns_is_exact(src, N):
    """Any pattern whose divisors suggest a grid: the remapped mask read through the
    permutation is the original and its tile classes are sound, for several boxes."""
    ir = spattn.compile(src).ir
    grids = LY.discover(ir, N)
    assert grids
    for grid in grids:
        for box in LY.candidate_boxes(grid, 16)[:3]:
            _check_remap(ir, LY.Layout(grid, box), N, 16, 8)


def test_text_tokens_on_whole_rows_read_as_rows():
    """Keys before an image that fill whole rows of its grid (``k < 512`` with rows of 64)
    become a condition on the row alone, which box tiles decide exactly."""
    from spattn.ir.printer import to_source
    ir = spattn.compile("k < 512 | abs((q - 512) // 64 - (k - 512) // 64) <= 2").ir
    grid = LY.discover(ir, 512 + 64 * 64)[0]
    form = to_source(LY.coordinate_form(ir, grid))
    assert "k#0 <= 7" in form and "k#1" not in form


@st.composite
def _grid_source(draw):
    """A random pattern over a 2-D or 3-D grid flattened row-major: comparisons of
    coordinates (``q // S % n``), flattened positions and offsets, under & and |."""
    shape = tuple(draw(st.lists(st.integers(2, 6), min_size=2, max_size=3)))
    strides = [math.prod(shape[a + 1:]) for a in range(len(shape))]

    def coord(x, a):
        c = f"({x} // {strides[a]})" if strides[a] > 1 else x
        return c if a == 0 else f"({c} % {shape[a]})"

    def atom():
        a = draw(st.integers(0, len(shape) - 1))
        kind = draw(st.sampled_from(["abs", "le", "eq", "flat", "mod"]))
        r = draw(st.integers(0, 3))
        if kind == "abs":
            return f"abs({coord('q', a)} - {coord('k', a)}) <= {r}"
        if kind == "le":
            return f"{coord('k', a)} + {r} <= {coord('q', a)} + {draw(st.integers(0, 2))}"
        if kind == "eq":
            return f"{coord('q', a)} % 2 == {coord('k', a)} % 2"
        if kind == "flat":
            return f"k < {draw(st.integers(0, math.prod(shape)))}"
        return f"(q - k) % {draw(st.integers(2, 4))} == 0"
    parts = [atom() for _ in range(draw(st.integers(1, 4)))]
    src = parts[0]
    for p in parts[1:]:
        src = f"({src}) {draw(st.sampled_from(['&', '|']))} ({p})"
    return src, math.prod(shape)


@settings(max_examples=30)
@given(_grid_source(), st.integers(2, 4))
def test_remap_property_of_random_grid_patterns(case, e):
    src, N = case
    ir = spattn.compile(src).ir
    for grid in LY.discover(ir, N):
        boxes = LY.candidate_boxes(grid, 1 << e)
        for box in boxes[:2]:
            _check_remap(ir, LY.Layout(grid, box), N, 1 << e, 1 << max(e - 1, 0))


def test_pays_is_what_choose_decides():
    """``Remap.pays`` (what ``explain`` reports as used) holds only where ``choose`` keeps
    the layout: fewer computed pairs by the margin, and a lower predicted cost by it (a
    layout whose ranges beat sequence order's table reads in cost, with pairs above the
    margin, is not used)."""
    r = LY.Remap(None, None, None, computed_sequence=1000, computed_layout=950,
                 cost_sequence=100.0, cost_layout=80.0)
    assert not r.pays
    assert LY.Remap(None, None, None, 1000, 850, 100.0, 80.0).pays
    assert not LY.Remap(None, None, None, 1000, 500, 100.0, 95.0).pays
    for shape, kernel in (((64, 64), (16, 16)), ((128, 128), (32, 32))):
        pat = spattn.neighborhood(shape, kernel)
        N = shape[0] * shape[1]
        forced = LY.choose(pat.ir, N, N, 0, force=True)
        assert forced.pays is (LY.choose(pat.ir, N, N, 0) is not None)


@pytest.mark.parametrize("rows_factor, want", [(0.0, "kernel"), (10.0, "copy")],
                         ids=["rows-free", "rows-dear"])
def test_auto_gathers_take_the_cheaper_way(rows_factor, want, monkeypatch):
    """SPATTN_LAYOUT_GATHER=auto: the layout's cost with its gathers (copy) against its
    cost times 1 + rows_factor (row tables), the cheaper kept as the remap's cost; a mode
    that no longer pays drops the layout unless forced."""
    from spattn.ir import cost as C
    from spattn.ir import layout as LY
    pat = spattn.compile("abs(q // 64 - k // 64) <= 4 & abs(q % 64 - k % 64) <= 4")
    r = LY.choose(pat.ir, 4096, 4096, 0, num_heads=1, force=True, target="cuda",
                  gathers=False)
    monkeypatch.setitem(C.COSTS["cuda"], "rows_factor", rows_factor)
    got, mode, backward = LY.resolve_gathers(r, "auto", "cuda", force=True)
    assert mode == backward == want
    copy = r.cost_layout + r.layout.padded_size * C.COSTS["cuda"]["gather_token"]
    assert got.cost_layout == pytest.approx(min(copy, r.cost_layout * (1 + rows_factor)))
    assert LY.resolve_gathers(r, "copy", "cuda") == (r, "copy", "copy")
    monkeypatch.setitem(C.COSTS["cuda"], "gather_token", 1e9)
    monkeypatch.setitem(C.COSTS["cuda"], "rows_factor", 1e9)
    assert LY.resolve_gathers(r, "auto", "cuda")[0] is None
    assert LY.resolve_gathers(r, "auto", "cuda", force=True)[0] is not None


def test_cost_constants_override_and_restore():
    """``ir.cost.constants``: the entries given hold inside the block (the gathers' choice
    follows them) and are restored after, an entry absent before removed again, also when
    the block raises."""
    from spattn.ir import cost as C
    from spattn.ir import layout as LY
    before = {t: dict(c) for t, c in C.COSTS.items()}
    r = LY.Remap(LY.Layout(LY.Grid((8, 16)), (4, 8)), None, None, 100, 50,
                 cost_sequence=100.0, cost_layout=50.0)
    with C.constants("cuda", rows_factor=0.0, gather_token=1.0):
        assert C.COSTS["cuda"]["rows_factor"] == 0.0
        assert LY.resolve_gathers(r, "auto", "cuda").mode == "kernel"
    with C.constants("cuda", rows_factor=1e9):
        assert LY.resolve_gathers(r, "auto", "cuda").mode == "copy"
    with pytest.raises(RuntimeError):
        with C.constants("cpu", rows_factor=-0.5, gather_token=3.0):
            assert C.COSTS["cpu"]["rows_factor"] == -0.5
            raise RuntimeError
    assert {t: dict(c) for t, c in C.COSTS.items()} == before


def test_a_box_whose_remapped_pattern_cannot_be_computed_is_no_candidate():
    """The remapped pattern's arithmetic may leave the 64-bit integers where the pattern's own
    does not (the padding slots of a box that does not divide the grid lie past the tokens):
    such a box is skipped, never an error from ``explain`` or a call's layout choice."""
    pat = spattn.compile("neighborhood([4, 4], 1) & (q*q*q*q*q*q*q*q*k*k*k*k*k*k*k) % 7 != 3")
    grid = LY.discover(pat.ir, 16, LY.declared(pat))[0]
    refused = []
    for box in LY.candidate_boxes(grid, 64):
        layout = LY.Layout(grid, box)
        try:
            LY.sampled_pairs(LY.remap(pat.ir, layout), layout.padded_size, 64, 64)
        except spattn.SpattnError:
            refused.append(box)
    assert (8, 8) in refused
    r = LY.choose(pat.ir, 16, 16, 0, force=True, declared=LY.declared(pat))
    assert r is not None and r.layout.box not in refused
    assert "layout    grid 4 x 4" in str(pat.explain(16))
    every = LY.choose(pat.ir, 16, 16, 0, force=True, grids=[grid], block_m=64, block_n=64)
    assert every is None or every.layout.box not in refused
