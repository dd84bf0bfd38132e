"""Closed-form key ranges: verified against tiles() (soundness always, exactness for the prelude)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spattn.ir import build as B
from spattn.ir.ranges import ClosedForm, Interval, closed_form, tile_ranges
from spattn.ir.cost import pick_strategy
from spattn.ir.tables import tile_table
from spattn.ir.tiles import classify
from spattn.pattern import Pattern

from tests.helpers.ir_exprs import affine_bool_exprs, bool_exprs
from tests.ir.test_tiles import (AFFINE, SHAPES, causal, chunked, q, k, c, h, sink, truth_tiles,
                         window)


def covered(ranges, shape, which):
    """bool [B, H, n_tiles, n_other]: union of the [lo, hi] (which=0) or [flo, fhi] (which=2)."""
    Bn, Hn, n, m = shape
    j = torch.arange(m).view(1, 1, 1, m)
    out = torch.zeros(shape, dtype=torch.bool)
    for r in ranges:
        lo, hi = r[which].unsqueeze(-1), r[which + 1].unsqueeze(-1)
        out |= (j >= lo) & (j <= hi)
    return out


def check(ir, Lq, Lk, bm, bn, H=1, off=None, exact=True, truth=False):
    """Ranges vs the tile classes of classify() (truth=True: of the dense mask)."""
    cf = closed_form(ir)
    assert cf is not None
    if truth:
        tiles = truth_tiles(ir, Lq, Lk, bm, bn, H=H, q_offset=off)
    else:
        tiles = classify(ir, Lq, Lk, bm, bn, num_heads=H, q_offset=off)
    for transpose in (False, True):
        t = tiles.transpose(2, 3) if transpose else tiles
        rs = tile_ranges(cf, Lq, Lk, bm, bn, num_heads=H, q_offset=off, transpose=transpose)
        for r in rs:
            assert all(x.shape == t.shape[:3] and x.dtype == torch.int64 for x in r)
        cov = covered(rs, t.shape, 0)
        full = covered(rs, t.shape, 2)
        assert not ((t != 0) & ~cov).any(), "a non-empty tile outside every range"
        assert (t[full] == 2).all(), "a tile inside a full range is not FULL"
        if exact:
            assert torch.equal(cov, t != 0), "ranges cover EMPTY tiles"


@pytest.mark.parametrize("name", list(AFFINE))
@pytest.mark.parametrize("shape", SHAPES)
def test_prelude_exact(name, shape):
    Lq, Lk, bm, bn, off = shape
    check(AFFINE[name], Lq, Lk, bm, bn, H=3, off=off)


def test_not_closed():
    assert closed_form(B.cmp("<=", B.scale(k, 2), q)) is None
    assert closed_form(B.cmp("==", B.mod(B.sub(q, k), c(3)), c(0))) is None
    assert closed_form(B.cmp("==", B.load("doc", [q]), B.load("doc", [k]))) is None
    # chunk terms outside the solved fragment
    assert closed_form(B.cmp("==", B.floordiv(B.sub(q, k), c(4)), c(0))) is None   # (q - k) // 4
    assert closed_form(B.cmp("==", B.floordiv(B.scale(k, 2), c(4)), B.floordiv(q, c(4)))) is None
    assert closed_form(B.cmp("<=", B.sub(k, B.floordiv(k, c(4))), q)) is None      # k twice
    assert closed_form(B.cmp("<=", k, B.sub(q, B.floordiv(q, c(4))))) is None      # not monotone
    assert closed_form(B.cmp("==", B.floordiv(q, B.add(h, c(1))),
                             B.floordiv(k, B.add(h, c(1))))) is None             # per-head chunk
    assert closed_form(B.cmp("==", B.floordiv(q, c(-4)), B.floordiv(k, c(-4)))) is None
    # rows solvable, columns not (two chunk terms of q): no closed form
    assert closed_form(B.cmp("<=", kc(6), B.add(qc(6), qc(9)))) is None
    assert pick_strategy(B.cmp("==", B.mod(B.sub(q, k), c(3)), c(0))) == "table"
    assert pick_strategy(AFFINE["chunked"]) == "ranges"
    assert pick_strategy(causal) == "ranges"
    assert pick_strategy(Pattern(causal)) == "ranges"
    # more than 4 disjuncts
    many = B.or_(*[B.and_(B.cmp(">=", k, c(10 * i)), B.cmp("<=", k, c(10 * i + 3)))
                   for i in range(6)])
    assert closed_form(many) is None


def test_format():
    cf = closed_form(B.and_(causal, B.cmp("<", B.sub(q, k), c(64))))
    assert isinstance(cf, ClosedForm) and len(cf.rows) == 1 and len(cf.cols) == 1
    assert isinstance(cf.rows[0], Interval)
    names = set()
    from spattn.ir.nodes import Var, walk
    for iv in cf.rows:
        for x in (iv.lo, iv.hi, iv.flo, iv.fhi):
            names |= {n.name for n in walk(x) if isinstance(n, Var)}
    assert names <= {"qs", "qe", "h", "b", "Lq", "Lk", "H"}
    assert "qs" in str(cf)
    assert Pattern(causal).key_ranges() == closed_form(causal)


def test_false_and_true():
    assert closed_form(B.FALSE).rows == ()
    cf = closed_form(B.TRUE)
    (lo, hi, flo, fhi), = tile_ranges(cf, 10, 20, 4, 8)
    assert lo.tolist() == [[[0, 0, 0]]] and hi.tolist() == [[[2, 2, 2]]]
    assert flo.tolist() == [[[0, 0, 0]]] and fhi.tolist() == [[[2, 2, 2]]]


def test_large_window_ranges_match():
    ir = B.and_(causal, B.cmp("<", B.sub(q, k), c(1024)))
    check(ir, 16384, 16384, 128, 64)
    check(ir, 4096, 16384, 64, 128)      # KV cache: bottom-right aligned


# ---- chunk comparisons: k // c solved as an integer interval of chunk indices ---------------

def qc(n, e=0):
    return B.floordiv(B.add(q, c(e)), c(n))


def kc(n, e=0):
    return B.floordiv(B.add(k, c(e)), c(n))


CHUNKED = {
    "chunked48": chunked(48),
    "chunked48&causal": B.and_(chunked(48), causal),
    "chunked48&window30": B.and_(chunked(48), window(30)),
    "chunked48&window100": B.and_(chunked(48), window(100)),
    "chunked7&causal": B.and_(chunked(7), causal),
    "chunked16&~causal": B.and_(chunked(16), B.not_(causal)),
    "~chunked16": B.not_(chunked(16)),
    "chunked10|sink5": B.or_(chunked(10), sink(5)),
    "shifted chunks": B.and_(B.cmp("==", qc(20, 7), kc(20)), causal),   # rows 13..19 of 20 empty
    "key chunks offset": B.cmp("==", qc(12), kc(12, 5)),
    "previous chunk": B.cmp("==", qc(24), B.add(kc(24), c(1))),
    "this+previous chunk&causal": B.and_(causal, B.cmp(">=", kc(32), B.sub(qc(32), c(1)))),
    "mixed sizes": B.and_(B.cmp("==", qc(40), kc(40)), B.cmp("<=", B.sub(qc(8), kc(8)), c(2))),
    "coarse causal": B.cmp("<=", kc(16), qc(16)),
    "k below chunk start": B.cmp("<", k, B.scale(qc(8), 8)),
    "q chunk alone": B.and_(causal, B.cmp(">=", qc(16), c(2))),
    "k chunk alone": B.and_(causal, B.cmp("<", kc(10), c(3))),
    "per-head shift": B.and_(B.cmp("==", B.floordiv(B.add(q, h), c(9)), kc(9)), causal),
}

# [lo, hi] is the hull over the tile's rows, empty rows included: a superset here
NOT_EXACT = {"shifted chunks"}

CHUNK_SHAPES = [
    (200, 300, 20, 36, None),     # block sizes not dividing c
    (300, 200, 32, 24, None),     # Lq > Lk: negative offset (bottom-right)
    (150, 150, 64, 16, -37),      # negative q_offset
    (97, 211, 13, 17, 50),        # ragged, positive offset
    (1, 100, 1, 9, None),
    (256, 256, 64, 64, None),
    (100, 90, 128, 128, None),    # one tile larger than the sequence
    (129, 140, 48, 48, 3),        # blocks equal to c, shifted
]


@pytest.mark.parametrize("name", list(CHUNKED))
@pytest.mark.parametrize("shape", CHUNK_SHAPES)
def test_chunks_exact(name, shape):
    Lq, Lk, bm, bn, off = shape
    exact = name not in NOT_EXACT
    check(CHUNKED[name], Lq, Lk, bm, bn, H=3, off=off, exact=exact)
    check(CHUNKED[name], Lq, Lk, bm, bn, H=3, off=off, exact=exact, truth=True)


def test_chunked_causal_strategy():
    import spattn
    from spattn.codegen.config import analysis_strategy
    p = spattn.compile("chunked(64) & causal")
    assert analysis_strategy(p) == "ranges"
    assert analysis_strategy(spattn.compile("chunked(48) & window(100)")) == "ranges"
    (iv,) = closed_form(p).rows
    names = set()
    from spattn.ir.nodes import Var, walk
    for x in (iv.lo, iv.hi, iv.flo, iv.fhi):
        names |= {n.name for n in walk(x) if isinstance(n, Var)}
    assert names <= {"qs", "qe"}


def test_llama4_chunked():
    import spattn
    from spattn.codegen.config import analysis_strategy
    src = open(__file__.rsplit("/tests/", 1)[0] + "/examples/patterns/chunked_llama4.spattn").read()
    p = spattn.compile(src, C=512)
    assert analysis_strategy(p) == "ranges"
    check(p.ir, 2048, 2048, 128, 64)
    check(p.ir, 1024, 3000, 64, 128)           # KV cache: bottom-right aligned
    check(spattn.compile(src, C=300).ir, 1500, 1500, 128, 64, H=2, off=-100)
    # FULL part: a query tile inside one chunk sees the chunk's earlier keys as FULL tiles
    (lo, hi, flo, fhi), = tile_ranges(closed_form(p.ir), 2048, 2048, 128, 64)
    t = [x[0, 0, 5].item() for x in (lo, hi, flo, fhi)]       # queries 640..767, chunk 512..
    assert t == [8, 11, 8, 9]
    t = [x[0, 0, 4].item() for x in (lo, hi, flo, fhi)]       # 512..639: diagonal tiles only
    assert t == [8, 9, 0, -1]
    # a query tile spanning two chunks (C=300: 256..383) has no FULL tile at all
    (lo, hi, flo, fhi), = tile_ranges(closed_form(spattn.compile(src, C=300).ir),
                                      1500, 1500, 128, 64)
    assert [x[0, 0, 2].item() for x in (lo, hi, flo, fhi)] == [0, 5, 0, -1]


dims = st.tuples(st.integers(1, 100), st.integers(1, 100), st.integers(1, 33),
                 st.integers(1, 33), st.integers(-20, 20) | st.none(), st.integers(1, 3))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(affine_bool_exprs(), dims)
def test_random_affine_sound(ir, d):
    Lq, Lk, bm, bn, off, H = d
    if closed_form(ir) is None:
        return
    check(ir, Lq, Lk, bm, bn, H=H, off=off, exact=False)


@st.composite
def chunk_atoms(draw):
    """Comparisons of chunk indices of q and k with offsets, coefficients, q/k terms."""
    o, a = draw(st.sampled_from([("k", "q"), ("q", "k")]))
    ov, av = B.var(o), B.var(a)
    cc = draw(st.integers(1, 13))
    oterm = B.floordiv(B.add(ov, c(draw(st.integers(-6, 6))), B.scale(h, draw(st.integers(0, 1)))),
                       c(cc))
    if draw(st.booleans()):
        oterm = ov if draw(st.booleans()) else oterm
    s = draw(st.sampled_from([1, 1, -1, 2, -3]))
    sign = draw(st.sampled_from([1, -1]))
    g = B.const(draw(st.integers(-8, 8)))
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["lin", "floor"]))
        if kind == "lin":
            term = B.scale(av, draw(st.integers(1, 2)))
        else:
            term = B.floordiv(B.add(B.scale(av, draw(st.integers(1, 3))), c(draw(st.integers(-5, 5)))),
                              c(draw(st.integers(1, 11))))
        g = B.add(g, B.scale(term, sign * draw(st.integers(1, 2))))
    return B.cmp(draw(st.sampled_from(_OPS)), B.scale(oterm, s), g)


_OPS = ["<", "<=", ">", ">=", "==", "!="]


@st.composite
def chunk_formulas(draw, depth=2):
    kind = draw(st.sampled_from(["atom", "atom", "affine", "and", "or", "not"]
                                if depth > 0 else ["atom", "atom", "affine"]))
    if kind == "atom":
        return draw(chunk_atoms())
    if kind == "affine":
        return draw(affine_bool_exprs(depth=0))
    sub = chunk_formulas(depth=depth - 1)
    if kind == "not":
        return B.not_(draw(sub))
    if kind == "and":
        return B.and_(draw(sub), draw(sub))
    return B.or_(draw(sub), draw(sub))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(chunk_formulas(), dims)
def test_random_chunks_sound(ir, d):
    """Soundness against the dense mask (classify() is not exact for every such formula)."""
    Lq, Lk, bm, bn, off, H = d
    if closed_form(ir) is None:
        return
    check(ir, Lq, Lk, bm, bn, H=H, off=off, exact=False, truth=True)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(bool_exprs(), dims)
def test_random_expressions_sound(ir, d):
    """Any IR the derivation accepts (every node kind generated) is sound."""
    Lq, Lk, bm, bn, off, H = d
    if closed_form(ir) is None:
        return
    check(ir, Lq, Lk, bm, bn, H=H, off=off, exact=False, truth=True)


def test_tile_table_csr():
    g = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 3, (2, 3, 7, 5), generator=g).to(torch.int8)
    tt = tile_table(tiles)
    assert tt.partial_ptr.shape == (2, 3, 8) and tt.partial_ptr.dtype == torch.int32
    assert tt.t_full_ptr.shape == (2, 3, 6)
    for b in range(2):
        for h in range(3):
            for i in range(7):
                p, f = tt.row(b, h, i)
                assert p == (tiles[b, h, i] == 1).nonzero().view(-1).tolist()
                assert f == (tiles[b, h, i] == 2).nonzero().view(-1).tolist()
            for j in range(5):
                s, e = int(tt.t_partial_ptr[b, h, j]), int(tt.t_partial_ptr[b, h, j + 1])
                assert tt.t_partial_idx[s:e].tolist() == (tiles[b, h, :, j] == 1).nonzero().view(-1).tolist()
            cnt = (tiles[b, h] != 0).sum(1)
            o = tt.order[b, h].long()
            assert sorted(o.tolist()) == list(range(7))
            assert (cnt[o][:-1] >= cnt[o][1:]).all()
    assert int(tt.partial_ptr[-1, -1, -1]) == tt.num_partial == int((tiles == 1).sum())
    flat = tt.counts.reshape(-1)[tt.order_flat.long()]
    assert (flat[:-1] >= flat[1:]).all()
    p = Pattern(causal)
    tt = p.tile_table(100, 100, 16, 16)
    assert tt.num_full + tt.num_partial == int((p.tiles(100, 100, 16, 16) != 0).sum())


def test_pattern_key_ranges_is_the_closed_form():
    import spattn
    p = spattn.compile("causal & (window(8) | sink(2))")
    assert p.key_ranges() == closed_form(p.ir) and len(p.key_ranges().rows) >= 1
    assert spattn.compile("causal & same(doc)").key_ranges() is None
