"""Exact integer semantics (#19): the analysis and the reference evaluator agree with Python
integers, or raise SpattnValueError; never a wrap, never another exception.

The oracle is tests/ir/scalar.py (one pair at a time on Python ints)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spattn
from spattn.ir.evaluate import mask as ir_mask
from spattn.dsl.errors import SpattnError, SpattnInputError, SpattnValueError
from spattn.ir import build as B
from spattn.ir.bounds import analyse, call_domain, kernel_int64, wrap
from spattn.ir.evaluate import evaluate, mask
from spattn.ir.intervals import check_input_bounds, index_hull
from spattn.ir.nodes import BoolConst
from spattn.ir.ranges import closed_form, tile_ranges
from spattn.ir.tiles import classify
from spattn.runtime.reference import attention_reference

from tests.helpers.ir_exprs import bool_exprs, wide
from tests.helpers.sources import WIDE, bool_exprs as source_exprs
from tests.ir.scalar import Undefined, scalar_mask, scalar_tiles, tiles_of, unsound

I64_MIN, I64_MAX = -2**63, 2**63 - 1
q, k = B.var("q"), B.var("k")


def same_doc():
    return B.cmp("==", B.load("doc", [q]), B.load("doc", [k]))


def causal_same():
    return B.and_(B.cmp("<=", k, q), same_doc())


# ---- the reproducers of #19 ---------------------------------------------------------------

def test_document_ids_2_62_apart_tiles_and_output():
    """Ids differing by 2**63: the mask was right, the tiles all EMPTY and the output zero."""
    p = spattn.compile("causal & same(doc)", backend="torch")
    doc = torch.tensor([-2**62, 2**62] * 4)
    want = scalar_tiles(p.ir, 8, 8, 4, 4, inputs={"doc": doc})
    got = p.tiles(8, 8, 4, 4, doc=doc)
    assert torch.equal(got, want)
    assert int((got != 0).sum()) == 3
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(1, 1, 8, 16, generator=g) for _ in range(3)]
    out = p(*qkv, doc=doc)
    ref, _ = attention_reference(*qkv, scalar_mask(p.ir, 8, 8, inputs={"doc": doc}))
    assert ref.abs().sum() > 0
    torch.testing.assert_close(out, ref.to(out.dtype), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("src, allowed", [
    ("q - k > 9223372036854775807", False),
    ("q - k < 10000000000000000000", True),
    ("q - k < 18446744073709551617", True),
    ("q - k >= -18446744073709551617", True),
    ("q - k == 18446744073709551616", False),       # congruent to 0: never a wrap
    ("k - q != -18446744073709551616", True),
], ids=["gt-int64-max", "lt-1e19", "lt-2**64+1", "ge-(-2**64-1)", "eq-2**64", "ne-(-2**64)"])
def test_bounds_beyond_int64_fold_exactly(src, allowed):
    p = spattn.compile(src)
    m = p.mask(6, 6)
    assert bool(m.all()) if allowed else not bool(m.any())
    assert torch.equal(p.tiles(6, 6, 4, 4), tiles_of(m, 4, 4))


@pytest.mark.parametrize("W", [10**30, -10**30, 2**63, -2**63, 2**64 + 3], ids=str)
def test_huge_divisor_exact(W):
    """q // W and q % W for a constant beyond int64: quotient 0 or -1, exact."""
    for src in ("q // W < 1", "q // W == -1", "(q - k) % W == q - k"):
        p = spattn.compile(src, W=W)
        for off in (-3, 0):
            want = scalar_mask(p.ir, 5, 5, q_offset=off)
            try:
                got = p.mask(5, 5, q_offset=off)
            except SpattnValueError:
                # a % W of a negative value is beyond int64: refused, never wrapped
                assert "%" in src and any(v < 0 for v in range(off - 4, off + 5))
                continue
            assert torch.equal(got, want), (src, off)
            assert unsound(p.tiles(5, 5, 2, 2, q_offset=off), tiles_of(want, 2, 2)) == 0


def test_min_max_with_constants_beyond_int64():
    for src, n in (("min(q, 2**70) <= 4", 40), ("max(q - k, -(2**70)) <= 4", 58)):
        p = spattn.compile(src.replace("2**70", str(2**70)))
        assert int(p.mask(8, 8).sum()) == n
        assert torch.equal(p.tiles(8, 8, 4, 4), tiles_of(p.mask(8, 8), 4, 4))


# ---- offsets up to 2**62 ------------------------------------------------------------------

OFFSETS = [2**31, -2**31 - 7, 2**40 + 3, -2**52, 2**62 - 20, -2**62]
AFFINE = ["causal", "causal & window(7)", "prefix_lm(5)", "k <= q + 3 & q - k < 20", "k >= q",
          "chunked(4) & causal", "abs(q - k) <= 3 | k < 2", "q % 3 == 0 & k >= q - 9"]


@pytest.mark.parametrize("off", OFFSETS, ids=str)
@pytest.mark.parametrize("src", AFFINE)
def test_large_offsets_tiles_and_ranges(src, off):
    """Tile classes and closed-form ranges (rows and columns) exact at far query positions."""
    p = spattn.compile(src)
    Lq, Lk, bm, bn = 19, 13, 4, 3
    want = scalar_tiles(p.ir, Lq, Lk, bm, bn, q_offset=off)
    got = classify(p, Lq, Lk, bm, bn, q_offset=off)
    assert unsound(got, want) == 0
    cf = closed_form(p.ir)
    if cf is None:
        return
    for transpose in (False, True):
        t = (want.transpose(2, 3) if transpose else want)[0, 0]
        for lo, hi, flo, fhi in [tuple(x[0, 0] for x in r)
                                 for r in tile_ranges(cf, Lq, Lk, bm, bn, q_offset=off,
                                                      transpose=transpose)]:
            for i in range(t.shape[0]):
                for j in range(int(flo[i]), int(fhi[i]) + 1):
                    assert t[i, j] == 2, (transpose, i, j)
        for i in range(t.shape[0]):
            cover = set()
            for lo, hi, _, _ in tile_ranges(cf, Lq, Lk, bm, bn, q_offset=off,
                                            transpose=transpose):
                cover |= set(range(int(lo[0, 0, i]), int(hi[0, 0, i]) + 1))
            assert {j for j in range(t.shape[1]) if t[i, j] != 0} <= cover, (transpose, i)


def test_positions_beyond_int64_or_closed_form_range_refused():
    p = spattn.compile("causal")
    with pytest.raises(SpattnValueError, match="q_offset"):   # the public API: |q_offset| <= 2**62
        p.mask(4, 4, q_offset=2**63 - 2)
    with pytest.raises(SpattnValueError, match="q_offset="):   # the analysis: q reaches 2**63
        ir_mask(p.ir, 4, 4, q_offset=2**63 - 2)
    with pytest.raises(SpattnValueError, match="q_offset="):
        classify(p.ir, 4, 4, 2, 2, q_offset=-2**63 - 1)
    assert ir_mask(p.ir, 4, 4, q_offset=2**63 - 4).all()  # the last representable positions
    for src in ("causal", "causal & (q - k) % 3 == 0", "q > 9223372036854775805"):
        for block in (2, 3, 128):                   # padded tiles would pass 2**63 - 1
            ir = spattn.compile(src).ir
            got = classify(ir, 5, 4, block, block, q_offset=2**63 - 5)
            assert unsound(got, scalar_tiles(ir, 5, 4, block, block, q_offset=2**63 - 5)) == 0
    with pytest.raises(SpattnValueError, match="closed-form column ranges"):
        tile_ranges(closed_form(p.ir), 4, 4, 2, 2, q_offset=2**62 + 1, transpose=True)


def test_offset_products_refused_with_the_expression():
    p = spattn.compile("q * k < 5")
    with pytest.raises(SpattnValueError, match=r"product `q \* k`.*q_offset=4611686018427387904"):
        p.tiles(4, 8, 2, 2, q_offset=2**62)
    assert int(p.mask(4, 8, q_offset=2**40).sum()) == 4      # k = 0 only


# ---- runtime inputs with 64-bit values -----------------------------------------------------

def _runs(g, L, n_docs, values):
    """Document ids of ``n_docs`` runs over ``L`` positions, the ids drawn from ``values``."""
    cuts = torch.sort(torch.randperm(L - 1, generator=g)[: n_docs - 1] + 1).values
    run = torch.bucketize(torch.arange(L), cuts, right=True)
    return values[run]


HASH_VALUES = {
    "random-int64": lambda g, n: torch.randint(I64_MIN, I64_MAX, (n,), generator=g),
    "extremes": lambda g, n: torch.tensor([I64_MIN, I64_MAX, I64_MIN + 1, I64_MAX - 1, 0, -1,
                                           2**62, -2**62] * n)[:n],
    "pm-2**62": lambda g, n: torch.tensor([-2**62, 2**62, 2**62 - 1, -2**62 + 1] * n)[:n],
}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(sorted(HASH_VALUES)), st.integers(1, 40), st.integers(1, 40),
       st.integers(1, 9), st.integers(1, 9), st.integers(1, 6), st.integers(0, 2**31),
       st.sampled_from(["causal & same(doc)", "same(doc) | q - k < 3", "~same(doc) & k <= q",
                        "doc[q] - doc[k] == 0 & (q - k) % 3 == 0"]))
def test_hash_ids_tiles_and_mask(kind, Lq, Lk, bm, bn, ndocs, seed, src):
    g = torch.Generator().manual_seed(seed)
    L = max(Lq, Lk)
    doc = _runs(g, L, min(ndocs, L), HASH_VALUES[kind](g, min(ndocs, L)))
    p = spattn.compile(src)
    want_mask = scalar_mask(p.ir, Lq, Lk, q_offset=0, inputs={"doc": doc})
    assert torch.equal(p.mask(Lq, Lk, q_offset=0, doc=doc), want_mask)
    got = p.tiles(Lq, Lk, bm, bn, q_offset=0, doc=doc)
    assert unsound(got, tiles_of(want_mask, bm, bn)) == 0


def test_hash_ids_keep_their_sparsity():
    """Tiles inside one document on each side are decided exactly, whatever the id values:
    the tiles between different documents are EMPTY (not merely PARTIAL)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(I64_MIN, I64_MAX, (8,), generator=g)
    doc = ids.repeat_interleave(16)                 # 8 documents of 16, tile-aligned
    p = spattn.compile("causal & same(doc)")
    got = p.tiles(128, 128, 16, 16, doc=doc)
    assert torch.equal(got, scalar_tiles(p.ir, 128, 128, 16, 16, inputs={"doc": doc}))
    assert int((got == 0).sum()) == 64 - 8


def test_sums_of_inputs_beyond_int64():
    """doc[q] + doc[k] == c is exact modulo 2**64; doc[q] - doc[k] <= 3 needs the values in
    int64: refused for extreme ids (naming the expression and the measured range), exact for
    small ids of any dtype."""
    doc = torch.tensor([I64_MAX, I64_MAX - 1, 5, I64_MIN + 3, -5, 7])
    p = spattn.compile("doc[q] + doc[k] == 2")
    want = scalar_mask(p.ir, 6, 6, inputs={"doc": doc})
    assert want.any()
    assert torch.equal(p.mask(6, 6, doc=doc), want)
    assert unsound(p.tiles(6, 6, 2, 3, doc=doc), tiles_of(want, 2, 3)) == 0
    lt = spattn.compile("doc[q] - doc[k] <= 3")
    with pytest.raises(SpattnValueError,
                       match=r"compared value `doc\[k\] - doc\[q\]`.*'doc' in "
                             r"-9223372036854775805\.\.9223372036854775807 \(measured\)"):
        lt.mask(6, 6, doc=doc)
    with pytest.raises(SpattnValueError, match="compared value"):
        lt.tiles(6, 6, 2, 2, doc=doc)
    for dtype in (torch.int64, torch.int32, torch.int8):
        small = torch.tensor([3, -2, 9, 0, 1, 1], dtype=dtype)
        want = scalar_mask(lt.ir, 6, 6, inputs={"doc": small.to(torch.int64)})
        assert torch.equal(lt.mask(6, 6, doc=small), want)
        assert unsound(lt.tiles(6, 6, 2, 2, doc=small), tiles_of(want, 2, 2)) == 0


def test_input_ranges_measured_only_when_needed(monkeypatch):
    """The dtype's range is enough for same(doc): no device read of the values."""
    import spattn.ir.bounds as Bd
    reads = []
    real = Bd.input_ranges
    monkeypatch.setattr(Bd, "input_ranges",
                        lambda ins, *, measure: (reads.append(measure), real(ins, measure=measure))[1])
    doc = torch.arange(64) // 7
    spattn.compile("causal & same(doc)").tiles(64, 64, 16, 16, doc=doc)
    assert reads == [False]
    reads.clear()
    spattn.compile("doc[q] - doc[k] <= 3").tiles(64, 64, 16, 16, doc=doc)
    assert reads == [False, True]


def test_index_bounds_exact_for_huge_indices():
    p = spattn.compile("doc[q] == doc[k]")
    doc = torch.zeros(10, dtype=torch.int64)
    with pytest.raises(SpattnInputError, match=r"takes values 4611686018427387904\.\."):
        p.tiles(4, 4, 2, 2, q_offset=2**62, doc=doc)
    far = spattn.compile(f"doc[q + {2**70}] == doc[k]")
    with pytest.raises(SpattnValueError, match="index"):
        far.tiles(4, 4, 2, 2, doc=doc)
    with pytest.raises(SpattnInputError, match="needs size >= 1180591620717411303428"):
        check_input_bounds(far, {"doc": doc}, 4, 4)     # the affine hull, exact on the host
    hull = index_hull(spattn.compile("doc[q // 2] == 0").ir, 4, 4, q_offset=2**62)
    assert list(hull.values()) == [[(2**61, 2**61 + 1)]]
    nested = spattn.compile("doc[doc[q] % 4] != 0")
    ids = torch.tensor([I64_MAX, I64_MIN, 3, -1])
    want = scalar_mask(nested.ir, 4, 4, inputs={"doc": ids})
    assert torch.equal(nested.mask(4, 4, doc=ids), want)


# ---- the check and the evaluators ----------------------------------------------------------

def test_wrapped_equalities_listed_and_others_refused():
    dom = call_domain(8, 8, input_ranges={"doc": (I64_MIN, I64_MAX)})
    res = analyse(causal_same(), dom)
    assert not res.problems and len(res.wrapped) == 1
    plus_one = B.cmp("==", B.add(B.load("doc", [q]), B.const(1)), B.load("doc", [k]))
    assert analyse(plus_one, dom).problems          # -2**64 + 1 and 1 are congruent
    twice = B.cmp("==", B.scale(B.load("doc", [q]), 2), B.load("doc", [k]))
    assert analyse(twice, dom).problems
    small = call_domain(8, 8, input_ranges={"doc": (0, 1000)})
    assert not analyse(plus_one, small).problems and not analyse(plus_one, small).wrapped


def test_wrap_matches_python():
    for v in (0, 1, -1, I64_MAX, I64_MIN, 2**63, -2**63 - 1, 2**64 + 5, -(2**64) - 5, 10**30):
        w = wrap(v)
        assert I64_MIN <= w <= I64_MAX and (w - v) % 2**64 == 0
        assert wrap(v, 32) == ((v + 2**31) % 2**32) - 2**31


def test_evaluate_python_ints_stay_exact():
    env = {"q": 2**70, "k": 3, "h": 0, "b": 0, "Lq": 1, "Lk": 1, "H": 1}
    ir = B.cmp("==", B.floordiv(B.sub(q, k), B.const(2**69)), B.const(1))
    assert evaluate(ir, env) is True


# ---- kernels: 32 or 64 bits ----------------------------------------------------------------

@pytest.mark.parametrize("src, kw, want", [
    pytest.param("causal", {}, False, id="causal"),
    pytest.param("causal & window(1024)", {"q_offset": -2**29}, False, id="window-off-2**29"),
    pytest.param("causal", {"q_offset": 2**31}, True, id="causal-off-2**31"),
    pytest.param("q - k < %d" % 2**40, {}, True, id="closed-form-beyond-int32"),
    pytest.param("q * k < 100", {}, False, id="product-L4096"),
    pytest.param("q * k < 100", {"Lq": 2**16, "Lk": 2**16}, True, id="product-L65536"),
    pytest.param("causal & same(doc)", {"doc": "small"}, False, id="same-small-int64-ids"),
    pytest.param("causal & same(doc)", {"doc": "hash"}, True, id="same-hash-ids"),
    pytest.param("blocks[q // 64, k // 64]", {"blocks": "bool"}, False, id="blocks-bool"),
    pytest.param("blocks[q // 64, k // 64]", {"blocks": "big"}, True, id="blocks-2**40"),
])
def test_kernel_int64(src, kw, want):
    g = torch.Generator().manual_seed(0)
    make = {"small": lambda: torch.arange(4096) // 100,
            "hash": lambda: torch.randint(I64_MIN, I64_MAX, (4096,), generator=g),
            "bool": lambda: torch.rand(64, 64, generator=g) < 0.5,
            "big": lambda: torch.randint(0, 2**40, (64, 64), generator=g)}
    kw = dict(kw)
    Lq, Lk = kw.pop("Lq", 4096), kw.pop("Lk", 4096)
    off = kw.pop("q_offset", None)
    inputs = {n: make[v]() for n, v in kw.items()}
    p = spattn.compile(src)
    assert kernel_int64(p, Lq, Lk, q_offset=off, inputs=inputs, closed_form=closed_form(p.ir),
                        block_m=128, block_n=64) is want


# ---- random patterns with wide constants ---------------------------------------------------

def _agree_or_refuse(ir, Lq, Lk, bm, bn, *, H=1, q_offset=None, inputs=None, pattern=None):
    """The library's mask equals the oracle's and its tiles are sound, or it raises
    SpattnValueError (and then so do both entry points); anything else fails."""
    try:
        want = scalar_mask(ir, Lq, Lk, H=H, q_offset=q_offset, inputs=inputs)
    except Undefined:
        return "undefined"
    target = pattern if pattern is not None else ir
    kw = dict(num_heads=H, q_offset=q_offset)
    try:
        got = mask(ir, Lq, Lk, inputs=inputs, **kw)
    except SpattnValueError:
        with pytest.raises(SpattnValueError):
            classify(target, Lq, Lk, bm, bn, inputs=inputs, **kw)
        return "refused"
    assert torch.equal(got, want)
    tiles = classify(target, Lq, Lk, bm, bn, inputs=inputs, **kw)
    assert unsound(tiles, tiles_of(want, bm, bn)) == 0
    return "exact"


big_offsets = st.one_of(st.integers(2**31, 2**62), st.integers(-2**62, -2**31),
                        st.sampled_from([2**62 - 9, -2**62, 2**32, -2**32 - 1]),
                        st.integers(-40, 40), st.none())
wide_patterns = bool_exprs(consts=wide).filter(lambda ir: not isinstance(ir, BoolConst))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(wide_patterns, st.integers(1, 9), st.integers(1, 9), st.integers(1, 4),
       st.integers(1, 4), big_offsets, st.integers(1, 2))
def test_random_wide_patterns_exact_or_refused(ir, Lq, Lk, bm, bn, off, H):
    try:
        _agree_or_refuse(ir, Lq, Lk, bm, bn, H=H, q_offset=off)
    except SpattnError as e:
        assert isinstance(e, SpattnValueError), e


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(source_exprs(consts=WIDE), st.integers(1, 7), st.integers(1, 7), big_offsets)
def test_random_wide_sources_exact_or_refused(src, Lq, Lk, off):
    """The same end to end from source text (the parser's ints, canonicalisation, printing)."""
    p = spattn.compile(src)
    assert spattn.compile(p.source) == p
    _agree_or_refuse(p.ir, Lq, Lk, 2, 3, H=2, q_offset=off, pattern=p)


@settings(max_examples=1, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_wide_patterns_are_mostly_exact(data):
    """Not vacuous: most wide-constant patterns are computed, not refused (fixed draws)."""
    seen = {"exact": 0, "refused": 0, "undefined": 0}
    for _ in range(80):
        ir, off = data.draw(st.tuples(wide_patterns, big_offsets))
        seen[_agree_or_refuse(ir, 5, 6, 2, 3, q_offset=off)] += 1
    assert seen["exact"] > 2 * seen["refused"] and seen["refused"] > 0, seen


def test_explain_counts_tiles_when_a_closed_form_bound_leaves_int64():
    from spattn.ir.explain import explain
    p = spattn.compile("k >= q - %d & k <= q + 3" % (3 * 2**61))
    for off, method in ((-2**62, "partial tiles evaluated"), (0, "per-row closed form")):
        r = explain(p, 16, 16, q_offset=off, block_m=4, block_n=4)
        assert method in r.density_method
        assert r.allowed_pairs == int(scalar_mask(p.ir, 16, 16, q_offset=off).sum())
