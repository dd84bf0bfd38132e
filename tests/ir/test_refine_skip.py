"""The exact refinement is skipped where it provably cannot change a tile
(:func:`spattn.ir.tiles.refinement_cannot_change`): the static claims, the cases it must not
claim (each shown to be changed by the refinement), and a property test that the refinement,
forced on, is a no-op wherever the predicate holds (random lengths, blocks, offsets, heads,
batches and *unsorted* document ids)."""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spattn
import spattn.ir.tiles as T
from spattn.ir import build as B
from spattn.ir.inputs import query_offset
from spattn.ir.tiles import classify, refinement_cannot_change
from spattn.pattern import Pattern

from tests.ir.test_tiles import truth_tiles, unsound

q, k, h = B.var("q"), B.var("k"), B.var("h")


def c(v):
    return B.const(v)


def same(name="doc"):
    return B.cmp("==", B.load(name, [q]), B.load(name, [k]))


causal = B.cmp("<=", k, q)
window9 = B.and_(B.cmp("<=", c(0), B.sub(q, k)), B.cmp("<", B.sub(q, k), c(9)))
opaque_qk = B.cmp("<", B.add(q, k), c(50))          # q + k: not a cellable direction

# IR-built formulas (name -> (ir, uses doc))
SKIPPED_IR = {
    "causal&same": (B.and_(causal, same()), True),
    "causal&k%3": (B.and_(causal, B.cmp("==", B.mod(k, c(3)), c(0))), False),
    "chunked(8)&same": (B.and_(B.cmp("==", B.floordiv(q, c(8)), B.floordiv(k, c(8))), same()),
                        True),
    "(q-k)//8<=1|q+k<50": (B.or_(B.cmp("<=", B.floordiv(B.sub(q, k), c(8)), c(1)), opaque_qk),
                           False),
    "~window&k%4": (B.and_(B.not_(window9), B.cmp("==", B.mod(k, c(4)), c(0))), False),
    "per-head window|same": (B.or_(B.cmp("<", B.sub(q, k), B.table([4, 9, 30], h)), same()),
                             True),
    # the opaque atom occurs twice, the cellable one once
    "(causal|same)&(k%3|same)": (B.and_(B.or_(causal, same()),
                                        B.or_(B.cmp("==", B.mod(k, c(3)), c(0)), same())), True),
    "sink|same": (B.or_(B.cmp("<", k, B.sub(B.var("Lk"), c(20))), same()), True),
    "h-offset causal&same": (B.and_(B.cmp("<=", B.add(k, h), q), same()), True),
    # (e): several cellable atoms, one direction, fixed thresholds (segment runs enumerated)
    "strided(5)": (B.and_(B.cmp("<=", k, q), B.or_(B.cmp("<", B.sub(q, k), c(5)),
                                                   B.cmp("==", B.mod(B.sub(q, k), c(5)), c(0)))),
                   False),
    "power2(6)": (B.and_(B.cmp("<=", k, q), B.or_(B.cmp("<", B.sub(q, k), c(6)),
                                                  B.is_pow2(B.sub(q, k)))), False),
    "per-head causal&(q-k<7|k%H==h)": (
        B.and_(causal, B.or_(B.cmp("<", B.sub(q, k), c(7)),
                             B.cmp("==", B.mod(k, B.var("H")), h))), False),
    "local(3,4)|(q-k)%7": (B.or_(B.and_(B.cmp("<=", c(-4), B.sub(q, k)), B.cmp("<=", B.sub(q, k), c(3))),
                                 B.cmp("==", B.mod(B.sub(q, k), c(7)), c(0))), False),
    "(w|k%5)&(w|same)": (B.and_(B.or_(window9, B.cmp("==", B.mod(k, c(5)), c(0))),
                                B.or_(window9, same())), True),
    "~window&(k-q)%3&same": (B.and_(B.not_(window9), B.cmp("==", B.mod(B.sub(k, q), c(3)), c(0)),
                                    same()), True),
}

SKIPPED_SOURCES = ["causal & same(doc)", "causal & (k % 3 == 0)", "chunked(64) & same(doc)",
                   "dilated(4, 3)", "causal & window(8) & same(doc)", "same(doc)",
                   "causal & (q - k) % 5 == 0 & same(doc)", "k > q | same(doc)",
                   "strided(16)", "power2(8)", "causal & (q - k < 16 | k % H == h)",
                   "causal & window(8) & (q - k) % 3 == 0",
                   "(q - k < 16 | k % 5 == 0) & (q - k < 16 | same(doc))"]   # (e): atom twice
NOT_SKIPPED_SOURCES = [
    "causal & (window(9) | sink(4)) & same(doc)",      # two cellable atoms
    "causal & q < 50",                                  # two cellable atoms
    "causal & chunked(64) & same(doc)",                 # a lin and a floor atom
    "window(9) & ~window(3)",                           # one direction, a run changes
    "causal & (q - k < 16 | k % 5 == 0) & q < 90",      # two directions
    "abs(q - k) <= 6 & same(doc)",                      # lifted
    "min(q, k + 3) <= 20 & same(doc)",                  # lifted
    "if q < 40 then k <= q else k < 10",                # lifted
]


@pytest.mark.parametrize("src", SKIPPED_SOURCES)
def test_predicate_true(src):
    assert refinement_cannot_change(spattn.compile(src).ir) is True


@pytest.mark.parametrize("src", NOT_SKIPPED_SOURCES)
def test_predicate_false(src):
    assert refinement_cannot_change(spattn.compile(src).ir) is False


def test_predicate_ir():
    for name, (ir, _) in SKIPPED_IR.items():
        assert refinement_cannot_change(ir), name
    assert not refinement_cannot_change(B.and_(causal, B.cmp("<", q, c(5))))


# ---- the conditions are needed: where one fails, the refinement does change tiles ------
def _both(p, Lq, Lk, bm, bn, **kw):
    """(classes with the refinement as classify decides, classes with it forced on)."""
    skip = classify(p, Lq, Lk, bm, bn, **kw)
    with mock.patch.object(T, "refinement_cannot_change", lambda ir: False):
        forced = classify(p, Lq, Lk, bm, bn, **kw)
    return skip, forced


def test_repeated_atom_not_claimed():
    # (w | a) & (~w | a) is a: on a diagonal tile where a is false the cells see EMPTY, the
    # tile-level Kleene value (w undecided, twice) is PARTIAL
    ir = B.and_(B.or_(window9, opaque_qk), B.or_(B.not_(window9), opaque_qk))
    assert not refinement_cannot_change(ir)
    _, forced = _both(ir, 64, 64, 16, 16)
    pass1 = classify(ir, 64, 64, 16, 16, refine=False)
    assert int(pass1[0, 0, 3, 3]) == T.PARTIAL and int(forced[0, 0, 3, 3]) == T.EMPTY
    assert torch.equal(forced, truth_tiles(ir, 64, 64, 16, 16))


def test_one_direction_run_that_changes_not_claimed():
    # 3 <= q - k <= 8 as window(9) & ~window(3): on a tile whose q - k spans -2..2 both atoms
    # are undecided (Kleene: PARTIAL), but no cell is true (EMPTY)
    ir = B.and_(window9, B.not_(B.and_(B.cmp("<=", c(0), B.sub(q, k)),
                                       B.cmp("<", B.sub(q, k), c(3)))))
    assert not refinement_cannot_change(ir)
    pass1 = classify(ir, 30, 30, 3, 3, refine=False)
    _, forced = _both(ir, 30, 30, 3, 3)
    assert int(pass1[0, 0, 2, 2]) == T.PARTIAL and int(forced[0, 0, 2, 2]) == T.EMPTY
    assert torch.equal(forced, truth_tiles(ir, 30, 30, 3, 3))


def test_non_consecutive_atom_not_claimed():
    # 2k + h == 3 never holds for h = 0, but its tile interval [0, 30] contains 3
    x = B.cmp("==", B.add(B.scale(k, 2), h), c(3))
    ir = B.or_(x, opaque_qk)
    assert not refinement_cannot_change(ir)
    pass1 = classify(ir, 80, 80, 16, 16, refine=False)
    _, forced = _both(ir, 80, 80, 16, 16)
    assert int(pass1[0, 0, 4, 0]) == T.PARTIAL and int(forced[0, 0, 4, 0]) == T.EMPTY
    assert torch.equal(forced, truth_tiles(ir, 80, 80, 16, 16))


def test_nd_input_not_claimed():
    # one consecutive lin atom, read once, but a 2-D input: pass 1 summarises blocks over all
    # tiles (17 x 17 > NARROW_GATHER entries for the widest: whole-input min/max), the
    # refinement only over the PARTIAL ragged row of tiles (8 x 17: gathered, decided)
    blocks_at = B.load("blocks", [B.floordiv(q, c(4)), B.floordiv(B.add(k, c(2)), c(4))])
    ir = B.and_(B.cmp(">=", q, c(150)), B.truthy(blocks_at))
    assert not refinement_cannot_change(ir)
    p = Pattern(ir, inputs={"blocks": 2})
    blocks = torch.ones(40, 41, dtype=torch.long)
    blocks[32:] = 0
    pass1 = classify(p, 160, 160, 64, 64, inputs={"blocks": blocks}, refine=False)
    _, forced = _both(p, 160, 160, 64, 64, inputs={"blocks": blocks})
    assert int(pass1[0, 0, 2, 0]) == T.PARTIAL and int(forced[0, 0, 2, 0]) == T.EMPTY


# ---- where it is claimed, the forced refinement changes nothing ------------------------
def _random_doc(g, batch, n, ndocs, sort):
    doc = torch.randint(0, ndocs, (batch, n), generator=g)
    return torch.sort(doc).values if sort else doc


def _check_no_op(name, Lq, Lk, bm, bn, off, H, batch, seed, ndocs, sort):
    ir, uses_doc = SKIPPED_IR[name]
    assert refinement_cannot_change(ir)
    kw = dict(num_heads=H, batch=batch)
    inputs = {}
    if uses_doc:
        off = abs(query_offset(Lq, Lk, off))      # doc[q] must stay in bounds
        g = torch.Generator().manual_seed(seed)
        inputs["doc"] = _random_doc(g, batch, max(Lk, off + Lq), ndocs, sort)
        p = Pattern(ir, inputs={"doc": 1})
        kw["inputs"] = inputs
    else:
        p = ir
    kw["q_offset"] = off
    calls = []
    real = T.refine_partial

    def spy(*a, **kw_):
        calls.append(1)
        return real(*a, **kw_)
    with mock.patch.object(T, "refine_partial", spy):
        skip = classify(p, Lq, Lk, bm, bn, **kw)
    assert not calls                               # the skip happened
    with mock.patch.object(T, "refinement_cannot_change", lambda ir: False):
        forced = classify(p, Lq, Lk, bm, bn, **kw)
    assert torch.equal(skip, forced), name
    want = truth_tiles(ir, Lq, Lk, bm, bn, H=H, batch=batch, q_offset=off, inputs=inputs)
    assert unsound(skip, want) == 0, name
    return skip, want


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(sorted(SKIPPED_IR)), st.integers(1, 120), st.integers(1, 120),
       st.integers(1, 40), st.integers(1, 40), st.integers(-20, 20) | st.none(),
       st.integers(1, 3), st.integers(1, 2), st.integers(0, 2**31), st.integers(1, 12),
       st.booleans())
def test_forced_refinement_is_a_no_op(name, Lq, Lk, bm, bn, off, H, batch, seed, ndocs, sort):
    _check_no_op(name, Lq, Lk, bm, bn, off, H, batch, seed, ndocs, sort)


@pytest.mark.parametrize("name", sorted(SKIPPED_IR))
def test_forced_refinement_reaches_the_cells(name):
    """Not vacuous: the forced refinement does evaluate cells (undecided tiles with an
    undecided cellable atom), and still changes nothing."""
    cells = []
    real = T._refine_chunk

    def spy(*a, **kw):
        cells.append(a[3].shape[0])               # tiles refined cell by cell
        return real(*a, **kw)
    with mock.patch.object(T, "_refine_chunk", spy):
        for seed, sort in ((0, False), (1, True)):
            _check_no_op(name, 150, 150, 16, 8, None, 2, 2, seed, 5, sort)
    assert sum(cells) > 0, name


def test_documents_unchanged_at_scale():
    """causal & same(doc), sorted ids of 12 documents (benchmarks' documents input shape)."""
    N = 4096
    g = torch.Generator().manual_seed(0)
    cuts = torch.sort(torch.randperm(N - 1, generator=g)[:11] + 1).values
    doc = torch.bucketize(torch.arange(N), cuts, right=True)
    p = spattn.compile("causal & same(doc)")
    skip, forced = _both(p, N, N, 128, 64, inputs={"doc": doc})
    assert torch.equal(skip, forced)
    assert torch.equal(skip, truth_tiles(p.ir, N, N, 128, 64, inputs={"doc": doc}))


# ---- (e) on random formulas of one direction ---------------------------------------------
@st.composite
def one_direction_formulas(draw, depth=3):
    """``& | ~`` trees over q - k comparisons with constant bounds (coefficient +-1), opaque
    atoms (``%``, ``q + k``, ``is_pow2``) and a head test: the fragment of condition (e)."""
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        kind = draw(st.sampled_from(["lin", "lin", "lin", "mod", "qk", "pow2", "head"]))
        d = B.sub(q, k) if draw(st.booleans()) else B.sub(k, q)
        if kind == "lin":
            lo = draw(st.none() | st.integers(-12, 12))
            hi = draw(st.none() | st.integers(-12, 12)) if lo is not None else draw(st.integers(-12, 12))
            return B.range_(d, lo, hi)
        if kind == "mod":
            return B.cmp("==", B.mod(d, c(draw(st.integers(2, 7)))), c(0))
        if kind == "qk":
            return B.cmp("<", B.add(q, k), c(draw(st.integers(0, 60))))
        if kind == "pow2":
            return B.is_pow2(d)
        return B.cmp("==", h, c(0))
    op = draw(st.sampled_from(["and", "or", "not"]))
    if op == "not":
        return B.not_(draw(one_direction_formulas(depth - 1)))
    a, b = draw(one_direction_formulas(depth - 1)), draw(one_direction_formulas(depth - 1))
    return B.and_(a, b) if op == "and" else B.or_(a, b)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(one_direction_formulas(), st.integers(1, 60), st.integers(1, 60), st.integers(1, 12),
       st.integers(1, 12), st.integers(-15, 15) | st.none(), st.integers(1, 2))
def test_segment_runs_claim_holds(ir, Lq, Lk, bm, bn, off, H):
    """Wherever the predicate holds, the forced refinement changes no tile."""
    if not refinement_cannot_change(ir):
        return
    kw = dict(num_heads=H, q_offset=off)
    skip = classify(ir, Lq, Lk, bm, bn, **kw)
    with mock.patch.object(T, "refinement_cannot_change", lambda ir: False):
        forced = classify(ir, Lq, Lk, bm, bn, **kw)
    assert torch.equal(skip, forced)


def test_segment_runs_claims_are_not_vacuous():
    """The random fragment above does reach (e): claims beyond (c)/(d), and refusals."""
    from hypothesis import find
    find(one_direction_formulas(), lambda ir: T._segment_runs_agree(*T.refinement_plan(ir))
         if T.refinement_plan(ir) and T.refinement_plan(ir)[0] == ir
         and len([a for a in T.refinement_plan(ir)[1] if a.kind == "lin"]) >= 2 else False)
    find(one_direction_formulas(), lambda ir: T.refinement_plan(ir) is not None
         and T.refinement_plan(ir)[0] == ir and not refinement_cannot_change(ir))


# ---- (e) without enumerating the runs: the same answers, bounded work -------------------

def _segment_points(atoms):
    """(spans of the cellable atoms, one value of the direction in each segment)."""
    spans = {}
    for a in (a for a in atoms if a.kind == "lin"):
        r, U = a.node, a.uniform.value
        lo = None if r.lo is None else r.lo - U
        hi = None if r.hi is None else r.hi - U
        if a.coeff < 0:
            lo, hi = (None if hi is None else -hi), (None if lo is None else -lo)
        spans[a.node] = (lo, hi)
    cuts = sorted({c for lo, hi in spans.values() for c in
                   ((lo,) if lo is not None else ()) + ((hi + 1,) if hi is not None else ())})
    return spans, [cuts[0] - 1] + cuts


def _runs_agree_by_enumeration(formula, atoms) -> bool:
    """Condition (e) by brute force: every run of segments, every pair of the other atoms
    (the definition :func:`T._segment_runs_agree` decides without enumerating the runs)."""
    import itertools

    from spattn.ir.intervals import combine
    spans, points = _segment_points(atoms)
    seg_vals = [{x: (lo is None or u >= lo) and (hi is None or u <= hi)
                 for x, (lo, hi) in spans.items()} for u in points]
    others = [a for a in atoms if a.kind not in ("lin", "floor")]
    choices = [T._PAIRS[:2] if a.kind == "const" else T._PAIRS for a in others]
    for i in range(len(points)):
        for j in range(i, len(points)):
            run = seg_vals[i:j + 1]
            kleene = {x: (any(v[x] for v in run), not all(v[x] for v in run)) for x in spans}
            if not any(ct and cf for ct, cf in kleene.values()):
                continue
            for pairs in itertools.product(*choices):
                leaf = dict(zip((a.node for a in others), pairs))
                ct, cf = combine(formula, {**leaf, **kleene})
                if not (ct and cf):
                    continue
                vals = [combine(formula, {**leaf, **{x: (b, not b) for x, b in v.items()}})
                        for v in run]
                if not (any(t for t, _ in vals) and any(f for _, f in vals)):
                    return False
    return True


def _one_direction_plan(ir):
    plan = T.refinement_plan(ir)
    if plan is None or plan[0] != ir:
        return None
    cellable = [a for a in plan[1] if a.kind in ("lin", "floor")]
    if not cellable or any(a.kind != "lin" or abs(a.coeff) != 1 or not isinstance(a.uniform, B.Const)
                           for a in cellable) or len({a.direction for a in cellable}) != 1:
        return None
    return plan


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(one_direction_formulas(depth=4))
def test_segment_runs_match_the_enumeration(ir):
    """The same answer as enumerating every run, within MAX_RUN_WORK (False above it)."""
    plan = _one_direction_plan(ir)
    if plan is None:
        return
    formula, atoms = plan
    segments = len(_segment_points(atoms)[1])
    assignments = 1
    for a in atoms:
        assignments *= {"const": 2, "opaque": 4}.get(a.kind, 1)
    got = T._segment_runs_agree(formula, atoms)
    if (segments + 2) * T._junction_size(formula) * assignments > T.MAX_RUN_WORK:
        assert got is False
    elif segments ** 2 * assignments <= 20000:           # the enumeration stays quick
        assert got == _runs_agree_by_enumeration(formula, atoms), ir


@pytest.mark.parametrize("n", [60, 175, 200, 400])
def test_many_atoms_decided_with_bounded_work(n, monkeypatch):
    """200 'q - k != i' atoms took 19-33 s when every run of segments was enumerated: now the
    formula is evaluated once over all segments and once per maximal block (here one block
    where it cannot be true, two where it cannot be false)."""
    from spattn.ir import intervals
    ir = B.and_(*(B.not_(B.cmp("==", B.sub(q, k), c(i))) for i in range(n)))
    calls = []
    real = intervals.combine
    monkeypatch.setattr(T, "combine", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    T.refinement_cannot_change.cache_clear()
    assert refinement_cannot_change(ir) is False      # a tile inside the band is EMPTY
    assert len(calls) <= 4
    small = B.and_(*(B.not_(B.cmp("==", B.sub(q, k), c(i))) for i in range(n // 20)))
    want = truth_tiles(small, 96, 96, 8, 4)
    assert torch.equal(classify(small, 96, 96, 8, 4), want)


def test_run_work_is_capped(monkeypatch):
    """Above MAX_RUN_WORK (many opaque atoms: 4 pairs each) nothing is evaluated: the
    refinement simply runs."""
    ir = B.and_(*(B.not_(B.cmp("==", B.sub(q, k), c(i))) for i in range(8)),
                *(B.cmp("<", B.add(q, B.scale(k, j)), c(50)) for j in range(2, 12)))
    calls = []
    monkeypatch.setattr(T, "combine", lambda *a, **kw: calls.append(1))
    T.refinement_cannot_change.cache_clear()
    assert refinement_cannot_change(ir) is False
    assert calls == []
