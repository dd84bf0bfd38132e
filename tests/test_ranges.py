"""Closed-form key ranges: verified against tiles() (soundness always, exactness for the prelude)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spattn.ir import build as B
from spattn.ir.ranges import ClosedForm, Interval, closed_form, tile_ranges
from spattn.ir.strategy import pick_strategy
from spattn.ir.tables import tile_table
from spattn.ir.tiles import classify
from spattn.pattern import Pattern

from .ir_strategies import affine_bool_exprs
from .test_tiles import AFFINE, SHAPES, causal, q, k, c

NOT_CLOSED = {"chunked", "causal&chunked"}


def covered(ranges, shape, which):
    """bool [B, H, n_tiles, n_other]: union of the [lo, hi] (which=0) or [flo, fhi] (which=2)."""
    Bn, Hn, n, m = shape
    j = torch.arange(m).view(1, 1, 1, m)
    out = torch.zeros(shape, dtype=torch.bool)
    for r in ranges:
        lo, hi = r[which].unsqueeze(-1), r[which + 1].unsqueeze(-1)
        out |= (j >= lo) & (j <= hi)
    return out


def check(ir, Lq, Lk, bm, bn, H=1, off=None, exact=True):
    cf = closed_form(ir)
    assert cf is not None
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


@pytest.mark.parametrize("name", [n for n in AFFINE if n not in NOT_CLOSED])
@pytest.mark.parametrize("shape", SHAPES)
def test_prelude_exact(name, shape):
    Lq, Lk, bm, bn, off = shape
    check(AFFINE[name], Lq, Lk, bm, bn, H=3, off=off)


def test_not_closed():
    assert closed_form(AFFINE["chunked"]) is None
    assert closed_form(B.cmp("<=", B.scale(k, 2), q)) is None
    assert closed_form(B.cmp("==", B.mod(B.sub(q, k), c(3)), c(0))) is None
    assert closed_form(B.cmp("==", B.load("doc", [q]), B.load("doc", [k]))) is None
    assert pick_strategy(AFFINE["chunked"]) == "table"
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
    assert Pattern(causal).key_ranges(64, 64) == closed_form(causal)


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


dims = st.tuples(st.integers(1, 100), st.integers(1, 100), st.integers(1, 33),
                 st.integers(1, 33), st.integers(-20, 20) | st.none(), st.integers(1, 3))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(affine_bool_exprs(), dims)
def test_random_affine_sound(ir, d):
    Lq, Lk, bm, bn, off, H = d
    if closed_form(ir) is None:
        return
    check(ir, Lq, Lk, bm, bn, H=H, off=off, exact=False)


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
