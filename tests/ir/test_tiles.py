"""Tile classification: soundness (property test vs the dense mask), exactness, inputs, errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spattn.dsl.errors import SpattnError, SpattnInputError, SpattnValueError
from spattn.ir import build as B
from spattn.ir.evaluate import mask
from spattn.ir.intervals import interval_exact
from spattn.ir.tiles import classify
from spattn.pattern import Pattern

from tests.helpers.ir_exprs import affine_bool_exprs, bool_exprs, int_exprs

q, k, h = B.var("q"), B.var("k"), B.var("h")


def c(v):
    return B.const(v)


def truth_tiles(ir, Lq, Lk, bm, bn, *, H=1, batch=1, q_offset=None, inputs=None):
    """Tile classes from the dense mask (the test oracle)."""
    m = mask(ir, Lq, Lk, num_heads=H, batch=batch, q_offset=q_offset, inputs=inputs)
    nq, nk = -(-Lq // bm), -(-Lk // bn)
    pad = torch.zeros(batch, H, nq * bm, nk * bn, dtype=torch.int32)
    valid = torch.zeros_like(pad)
    pad[..., :Lq, :Lk] = m.to(torch.int32)
    valid[..., :Lq, :Lk] = 1
    t = pad.view(batch, H, nq, bm, nk, bn).sum((3, 5))
    v = valid.view(batch, H, nq, bm, nk, bn).sum((3, 5))
    return torch.where(t == 0, 0, torch.where(t == v, 2, 1)).to(torch.int8)


def unsound(got, want):
    return int(((got != want) & (got != 1)).sum())


# ---- prelude (as IR) -------------------------------------------------------
causal = B.cmp("<=", k, q)


def window(w):
    return B.and_(B.cmp("<=", c(0), B.sub(q, k)), B.cmp("<", B.sub(q, k), c(w)))


def local(left, right):
    return B.and_(B.cmp("<=", c(-right), B.sub(q, k)), B.cmp("<=", B.sub(q, k), c(left)))


def sink(n):
    return B.cmp("<", k, c(n))


def global_tokens(n):
    return B.or_(B.cmp("<", q, c(n)), B.cmp("<", k, c(n)))


def prefix_lm(n):
    return B.or_(B.cmp("<=", k, q), B.cmp("<", k, c(n)))


def chunked(n):
    return B.cmp("==", B.floordiv(q, c(n)), B.floordiv(k, c(n)))


AFFINE = {
    "causal": causal,
    "window": window(13),
    "local": local(5, 9),
    "sink": sink(7),
    "global_tokens": global_tokens(6),
    "prefix_lm": prefix_lm(11),
    "chunked": chunked(10),
    "causal&chunked": B.and_(causal, chunked(12)),
    "causal&(window|sink)": B.and_(causal, B.or_(window(9), sink(4))),
    "abs": B.cmp("<=", B.abs_(B.sub(q, k)), c(6)),
    "clamp": B.cmp("==", B.clamp(B.sub(q, k), c(0), c(8)), B.sub(q, k)),
    "min": B.cmp("<=", B.min_(q, B.add(k, c(3))), c(20)),
    "if": B.cmp("<=", B.select(B.cmp("<", q, c(30)), B.sub(q, k), B.sub(k, q)), c(4)),
    "per-head window": B.and_(causal, B.cmp("<", B.sub(q, k), B.table([4, 8, 16], h))),
    "lengths": B.and_(causal, B.cmp(">=", k, B.sub(B.var("Lk"), c(20)))),
    "not": B.not_(B.and_(window(9), B.cmp(">", q, c(12)))),
}

SHAPES = [(37, 50, 4, 6, None), (20, 20, 3, 5, -3), (64, 64, 16, 16, None), (50, 31, 7, 8, 5),
          (1, 40, 1, 9, None), (33, 17, 40, 40, None)]


@pytest.mark.parametrize("name", list(AFFINE))
@pytest.mark.parametrize("shape", SHAPES)
def test_affine_exact(name, shape):
    Lq, Lk, bm, bn, off = shape
    ir = AFFINE[name]
    got = classify(ir, Lq, Lk, bm, bn, num_heads=3, q_offset=off)
    want = truth_tiles(ir, Lq, Lk, bm, bn, H=3, q_offset=off)
    assert got.shape == want.shape and got.dtype == torch.int8
    assert torch.equal(got, want), name


def test_interval_pass_alone_is_sound():
    for name, ir in AFFINE.items():
        got = classify(ir, 45, 60, 8, 6, num_heads=3, refine=False)
        assert unsound(got, truth_tiles(ir, 45, 60, 8, 6, H=3)) == 0, name


# ---- property tests ---------------------------------------------------------
dims = st.tuples(st.integers(1, 120), st.integers(1, 120), st.integers(1, 40),
                 st.integers(1, 40), st.integers(-20, 20) | st.none(), st.integers(1, 3))


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(bool_exprs(), dims)
def test_random_expressions_sound(ir, d):
    Lq, Lk, bm, bn, off, H = d
    want = truth_tiles(ir, Lq, Lk, bm, bn, H=H, q_offset=off)
    got = classify(ir, Lq, Lk, bm, bn, num_heads=H, q_offset=off)
    assert unsound(got, want) == 0, str(ir)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(affine_bool_exprs(), dims)
def test_random_affine_exact(ir, d):
    Lq, Lk, bm, bn, off, H = d
    want = truth_tiles(ir, Lq, Lk, bm, bn, H=H, q_offset=off)
    got = classify(ir, Lq, Lk, bm, bn, num_heads=H, q_offset=off)
    assert torch.equal(got, want), str(ir)



# ---- pass 1 proved exact: the refinement (and its device syncs) is skipped --------------
EXACT_STATIC = {
    "causal": True, "window": True, "local": True, "sink": True, "global_tokens": True,
    "chunked": True, "abs": True, "prefix_lm": False, "causal&chunked": False,
    "causal&(window|sink)": False, "clamp": False, "min": False, "if": False,
    "not": False,
}


@pytest.mark.parametrize("name", list(EXACT_STATIC))
def test_interval_exact_static_claims(name):
    assert interval_exact(AFFINE[name]) is EXACT_STATIC[name]
    # a q - k range and a q range together are not exact in general
    assert not interval_exact(B.and_(causal, B.cmp("<", q, c(5))))
    two_q = B.or_(B.and_(sink(3), B.cmp("<", q, c(5))),               # q twice, k twice
                  B.and_(B.not_(sink(3)), B.cmp("<", q, c(7))))
    assert not interval_exact(two_q)
    assert not interval_exact(B.cmp("<=", B.sub(B.mul(c(2), q), k), c(3)))   # step 2 in q


@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))
@given(bool_exprs() | affine_bool_exprs(), dims)
def test_interval_exact_claim_holds(ir, d):
    """Wherever interval_exact() claims it, pass 1 alone equals the truth tile for tile."""
    if not interval_exact(ir):
        return
    Lq, Lk, bm, bn, off, H = d
    want = truth_tiles(ir, Lq, Lk, bm, bn, H=H, q_offset=off)
    got = classify(ir, Lq, Lk, bm, bn, num_heads=H, q_offset=off, refine=False)
    assert torch.equal(got, want), str(ir)


@pytest.mark.parametrize("src", ["window(1024)", "causal", "sink(4)", "chunked(256)"])
def test_exact_patterns_never_refine(src, monkeypatch):
    import spattn
    import spattn.ir.tiles as T

    def boom(*a, **kw):
        raise AssertionError("refine_partial called")
    monkeypatch.setattr(T, "refine_partial", boom)
    p = spattn.compile(src)
    got = p.tiles(4096, 4096, 128, 64)
    assert got.shape == (1, 1, 32, 64)


# ---- the refinement reads pass 1's values: the same classes as re-evaluating ----------
def _gathered_instead(formula, atoms, cls, grid, device):
    import spattn.ir.tiles as T
    return T._select_gathered(formula, atoms, cls, grid.env, grid.inputs, grid.summaries,
                              device, grid.wrapped)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(bool_exprs(), dims, st.integers(1, 2), st.booleans())
def test_grid_selection_matches_gathered(ir, d, batch, forced):
    """Selecting the tiles to refine from pass 1's memo (one sync, no re-evaluation) gives
    the classes of gathering the PARTIAL tiles and re-evaluating their atoms (also with the
    static skip off, so that the cells are reached)."""
    from unittest import mock

    import spattn.ir.tiles as T
    Lq, Lk, bm, bn, off, H = d
    kw = dict(num_heads=H, batch=batch, q_offset=off)
    patches = [mock.patch.object(T, "refinement_cannot_change", lambda ir: False)] if forced else []
    for p in patches:
        p.start()
    try:
        got = classify(ir, Lq, Lk, bm, bn, **kw)
        with mock.patch.object(T, "_select_from_grid", _gathered_instead):
            want = classify(ir, Lq, Lk, bm, bn, **kw)
    finally:
        for p in patches:
            p.stop()
    assert torch.equal(got, want), str(ir)


# ---- runtime inputs ---------------------------------------------------------
def same(name):
    return B.cmp("==", B.load(name, [q]), B.load(name, [k]))


@pytest.mark.parametrize("bm,bn", [(16, 16), (8, 32), (7, 5)])
def test_documents_exact(bm, bn):
    g = torch.Generator().manual_seed(0)
    L = 150
    doc = torch.sort(torch.randint(0, 6, (2, L), generator=g)).values
    for ir in (same("doc"), B.and_(causal, same("doc"))):
        p = Pattern(ir, inputs={"doc": 1})
        got = p.tiles(L, L, bm, bn, batch=2, doc=doc)
        want = truth_tiles(ir, L, L, bm, bn, batch=2, inputs={"doc": doc})
        assert torch.equal(got, want)


@pytest.mark.parametrize("tile", [16, 32])
def test_block_table_exact(tile):
    g = torch.Generator().manual_seed(1)
    L = 160
    nb = L // 16
    blocks = torch.rand(2, 3, nb, nb, generator=g) < 0.3
    ir = B.truthy(B.load("blocks", [B.floordiv(q, c(16)), B.floordiv(k, c(16))]))
    p = Pattern(ir, inputs={"blocks": 2})
    got = p.tiles(L, L, tile, tile, batch=2, num_heads=3, blocks=blocks)
    want = truth_tiles(ir, L, L, tile, tile, H=3, batch=2, inputs={"blocks": blocks.long()})
    assert torch.equal(got, want)
    # with an affine part and ragged tiles: sound
    ir2 = B.or_(ir, window(20))
    p2 = Pattern(ir2, inputs={"blocks": 2})
    got = p2.tiles(L - 3, L, tile, 24, batch=2, num_heads=3, blocks=blocks)
    want = truth_tiles(ir2, L - 3, L, tile, 24, H=3, batch=2, inputs={"blocks": blocks.long()})
    assert unsound(got, want) == 0


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(bool_exprs(depth=2), dims, st.integers(0, 2**31))
def test_random_inputs_sound(ir, d, seed):
    Lq, Lk, bm, bn, off, H = d
    g = torch.Generator().manual_seed(seed)
    n = 300
    x = torch.randint(-4, 5, (H, n), generator=g)
    y = torch.randint(0, 3, (16, 16), generator=g)
    idx = B.add(B.mod(q, c(7)), k, c(20))     # in [20, 20 + 6 + 119]
    ir = B.or_(B.and_(ir, B.cmp("<=", B.load("x", [idx]), B.load("x", [B.add(k, c(30))]))),
               B.truthy(B.load("y", [B.floordiv(B.add(q, c(40)), c(16)),
                                     B.floordiv(B.abs_(B.sub(q, k)), c(16))])))
    p = Pattern(ir, inputs={"x": 1, "y": 2})
    xx = x.view(1, H, n)
    got = p.tiles(Lq, Lk, bm, bn, num_heads=H, q_offset=abs(off or 0), x=xx, y=y)
    want = truth_tiles(ir, Lq, Lk, bm, bn, H=H, q_offset=abs(off or 0), inputs={"x": xx, "y": y})
    assert unsound(got, want) == 0


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(int_exprs(), st.integers(1, 90), st.integers(1, 90), st.integers(-20, 20) | st.none())
def test_static_interval_is_the_interval_pass(ix, Lq, Lk, off):
    """The host bounds of affine indices (check_input_bounds) equal the interval pass's hull."""
    from spattn.ir.inputs import query_offset
    from spattn.ir.intervals import IntervalEval, domain_env, static_interval
    o = query_offset(Lq, Lk, off)
    got = static_interval(ix, {"q": (o, o + Lq - 1), "k": (0, Lk - 1), "Lq": Lq, "Lk": Lk, "H": 2})
    if got is None:
        return
    lo, hi = IntervalEval(domain_env(Lq, Lk, num_heads=2, batch=1, q_offset=off)).int_(ix)
    assert got == (int(lo.min()), int(hi.max()))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["q", "k"]), st.integers(-30, 30), st.integers(1, 70), st.integers(1, 200),
       st.integers(1, 200), st.integers(1, 40), st.integers(1, 40), st.integers(0, 30) | st.none())
def test_static_width_bounds_tile_intervals(v, c_, m, Lq, Lk, bm, bn, off):
    """``(v + c) // m`` over the tile grid: the static width (with the grid's origins) bounds
    every tile's interval, and is reached by some tile when m divides the tile size."""
    from spattn.ir.intervals import IntervalEval, static_width
    from spattn.ir.tiles import grid_env
    ix = B.floordiv(B.add(B.var(v), c(c_)), c(m))
    env = grid_env(Lq, Lk, bm, bn, num_heads=1, batch=1, q_offset=off, device="cpu")
    lo, hi = IntervalEval(env).int_(ix)
    w = static_width(ix, env["widths"], env["origins"])
    assert int((hi - lo).max()) + 1 <= w
    W, n = (bm, -(-Lq // bm)) if v == "q" else (bn, -(-Lk // bn))
    if W % m == 0 and n > 1:
        assert int((hi - lo).max()) + 1 == w


def test_block_table_summaries_need_no_sync():
    """bigbird's blocks[q // 64, k // 64]: the gather's widths are static on the tile grid."""
    from torch.profiler import ProfilerActivity, profile
    ir = B.truthy(B.load("blocks", [B.floordiv(q, c(64)), B.floordiv(k, c(64))]))
    p = Pattern(ir, inputs={"blocks": 2})
    blocks = torch.rand(16, 16, generator=torch.Generator().manual_seed(0)) < 0.3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = classify(p, 1024, 1024, 128, 64, inputs={"blocks": blocks}, refine=False)
    assert not [e for e in prof.events() if e.name in ("aten::_local_scalar_dense", "aten::nonzero")]
    assert torch.equal(got, truth_tiles(ir, 1024, 1024, 128, 64, inputs={"blocks": blocks.long()}))


# ---- errors -----------------------------------------------------------------
def test_bad_arguments():
    p = Pattern(causal)
    for bad in (dict(block_m=0), dict(block_n=-3), dict(block_m=2.5), dict(block_n=True)):
        kw = dict(block_m=16, block_n=16)
        kw.update(bad)
        with pytest.raises(SpattnValueError, match=list(bad)[0]):
            p.tiles(64, 64, kw["block_m"], kw["block_n"])
    with pytest.raises(SpattnValueError, match="Lq"):
        p.tiles(0, 64, 16, 16)
    with pytest.raises(SpattnValueError, match="Lk"):
        p.tiles(64, -1, 16, 16)
    with pytest.raises(SpattnValueError, match="num_heads"):
        p.tiles(64, 64, 16, 16, num_heads=0)
    with pytest.raises(SpattnValueError, match="q_offset"):
        p.tiles(64, 64, 16, 16, q_offset=1.5)


def test_input_errors():
    p = Pattern(same("doc"), inputs={"doc": 1})
    with pytest.raises(SpattnInputError, match="doc"):
        p.tiles(64, 64, 16, 16)
    with pytest.raises(SpattnInputError, match=r"doc.*\(50,\).*too short.*64"):
        p.tiles(64, 64, 16, 16, doc=torch.zeros(50, dtype=torch.long))
    with pytest.raises(SpattnInputError, match="float"):
        p.tiles(64, 64, 16, 16, doc=torch.zeros(64))
    with pytest.raises(SpattnInputError, match="q_offset=-3"):
        p.tiles(64, 64, 16, 16, q_offset=-3, doc=torch.zeros(64, dtype=torch.long))
    # q_offset > 0 with Lq = Lk reads doc[q] beyond Lk
    with pytest.raises(SpattnInputError, match="needs size >= 68"):
        p.tiles(64, 64, 16, 16, q_offset=4, doc=torch.zeros(64, dtype=torch.long))
    pb = Pattern(B.truthy(B.load("blocks", [B.floordiv(q, c(16)), B.floordiv(k, c(16))])),
                 inputs={"blocks": 2})
    with pytest.raises(SpattnInputError, match="blocks.*dimension 1"):
        pb.tiles(64, 64, 16, 16, blocks=torch.ones(4, 3, dtype=torch.bool))
    assert isinstance(SpattnInputError("x"), SpattnError)


def test_divisor_zero():
    ir = B.cmp("==", B.mod(q, h), c(0))
    with pytest.raises(SpattnValueError, match="0"):
        classify(ir, 8, 8, 4, 4, num_heads=2)


def test_length_divisors_are_static():
    """``k % H``, ``q // (Lk - 2)``: divisors of lengths are Python ints, checked on the host
    (no device read), with the same error for 0."""
    from torch.profiler import ProfilerActivity, profile
    H_ = B.var("H")
    ir = B.and_(B.cmp("==", B.mod(k, H_), h), B.cmp("<=", B.floordiv(q, B.sub(B.var("Lk"), c(2))), c(1)))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = classify(ir, 40, 30, 4, 4, num_heads=3, refine=False)
    syncs = [e.name for e in prof.events() if e.name in ("aten::_local_scalar_dense", "aten::nonzero")]
    assert not syncs
    assert unsound(got, truth_tiles(ir, 40, 30, 4, 4, H=3)) == 0
    with pytest.raises(SpattnValueError, match="H - 3 evaluates to 0"):
        classify(B.cmp("==", B.mod(k, B.sub(H_, c(3))), c(0)), 8, 8, 4, 4, num_heads=3)


def test_per_head_large_memory_ok():
    # per-head pattern, 16 heads: O(tiles) memory (1024 x 1024 tiles here: 16M tiles)
    ir = B.and_(causal, B.or_(B.cmp("<", B.sub(q, k), c(1024)),
                              B.cmp("==", B.mod(k, B.var("H")), h)))
    got = classify(ir, 32768, 32768, 32, 32, num_heads=16)
    assert got.shape == (1, 16, 1024, 1024)
    assert int((got == 0).sum()) > 0


# ---- through the parser -------------------------------------------------------
EXACT_SOURCES = ["causal", "window(17)", "local(3, 9)", "sink(5)", "global_tokens(7)",
                 "prefix_lm(12)", "chunked(16)", "causal & chunked(10)",
                 "causal & (window(9) | sink(4))", "abs(q - k) <= 6 | k < 3",
                 "clamp(q - k, 0, 20) == q - k", "k <= q & q - k < [4, 9, 30][h]",
                 "causal & k >= Lk - 25", "if q < 40 then k <= q else k < 10"]
SOUND_SOURCES = ["dilated(4, 3)", "strided(8)", "fixed(8, 2)", "power2(4)",
                 "causal & (q - k < 16 | k % H == h)", "(q * k) % 7 < 3", "q + k < 50",
                 "dilated(3, [1, 2, 3][h])"]


@pytest.mark.parametrize("src", EXACT_SOURCES + SOUND_SOURCES)
@pytest.mark.parametrize("shape", [(70, 90, 16, 8, None), (45, 45, 7, 11, -6)])
def test_compiled_prelude(src, shape):
    import spattn
    Lq, Lk, bm, bn, off = shape
    p = spattn.compile(src)
    got = p.tiles(Lq, Lk, bm, bn, num_heads=3, q_offset=off)
    want = truth_tiles(p.ir, Lq, Lk, bm, bn, H=3, q_offset=off)
    if src in EXACT_SOURCES:
        assert torch.equal(got, want), src
    else:
        assert unsound(got, want) == 0, src
