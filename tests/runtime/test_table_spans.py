"""The table strategy's two forms: CSR lists and spans (``runtime/triton_backend.py``).

``_spans`` is checked against a per-row brute force on random tile classes; "auto" picks
spans exactly when they visit the CSR lists' tiles; and the generated kernels are run
under TRITON_INTERPRET=1 with each form forced (``SPATTN_TABLES``), on tight patterns
(documents, causal) and on patterns whose spans hold EMPTY tiles or several FULL runs
(which forced spans must still get right), for the forward (split, fused and persistent
loops) and the backward.  Every element is checked against the float64 reference.
"""

import pytest

from spattn.runtime.plan import PLANS
import torch
from hypothesis import given
from hypothesis import strategies as st

from spattn.ir.tiles import EMPTY, FULL, PARTIAL
from spattn import SpattnConfigError
from spattn.runtime import tables as tb
from spattn.runtime import triton_backend

from tests.helpers.kernels import block_table, compile_pattern, doc_ids, rand_qkv
from tests.codegen.test_triton_bwd import run_bwd
from tests.codegen.test_triton_fwd import run_fwd

pytestmark = pytest.mark.interpreter


# ------------------------------------------------------------------ _spans

def _brute(row):
    """(lo, hi, flo, fhi, waste) of one row of classes, by the definition."""
    ne = [j for j, c in enumerate(row) if c != EMPTY]
    lo, hi = (ne[0], ne[-1] + 1) if ne else (0, 0)
    best, at = 0, None
    run = 0
    for j, c in enumerate(row):
        run = run + 1 if c == FULL else 0
        if run > best:
            best, at = run, j
    fhi = at + 1 if best else hi
    flo = fhi - best
    waste = (hi - lo - len(ne)) + (sum(c == FULL for c in row) - best)
    return lo, hi, flo, fhi, waste


@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 6), st.integers(1, 9),
       st.integers(0, 2 ** 31 - 1))
def test_spans_match_definition(Bn, H, n, m, seed):
    gen = torch.Generator().manual_seed(seed)
    cls = torch.randint(0, 3, (Bn, H, n, m), generator=gen).to(torch.int8)
    spans, waste, work = tb._spans(cls)
    assert spans.shape == (Bn, H, n, 4) and spans.dtype == torch.int32
    assert work.shape == (Bn, H, n)
    total = 0
    for b in range(Bn):
        for h in range(H):
            for i in range(n):
                row = cls[b, h, i].tolist()
                lo, hi, flo, fhi, w = _brute(row)
                assert spans[b, h, i].tolist() == [lo, hi, flo, fhi]
                assert int(work[b, h, i]) == 2 * row.count(PARTIAL) + row.count(FULL)
                assert lo <= flo <= fhi <= hi
                total += w
    assert int(waste) == total


@given(st.integers(1, 6), st.integers(1, 9), st.integers(0, 2 ** 31 - 1))
def test_zero_waste_spans_visit_the_csr_tiles(n, m, seed):
    """Rows built as [PARTIAL...][FULL...][PARTIAL...] inside EMPTY margins: zero waste, and
    the span's masked / unmasked tiles are exactly the PARTIAL / FULL ones."""
    gen = torch.Generator().manual_seed(seed)
    cls = torch.full((1, 1, n, m), EMPTY, dtype=torch.int8)
    for i in range(n):
        a, b, c, d = sorted(torch.randint(0, m + 1, (4,), generator=gen).tolist())
        cls[0, 0, i, a:d] = PARTIAL
        cls[0, 0, i, b:c] = FULL
    spans, waste, _ = tb._spans(cls)
    assert int(waste) == 0
    for i in range(n):
        lo, hi, flo, fhi = spans[0, 0, i].tolist()
        row = cls[0, 0, i]
        assert set(range(flo, fhi)) == set(torch.nonzero(row == FULL).flatten().tolist())
        assert set(range(lo, flo)) | set(range(fhi, hi)) == \
            set(torch.nonzero(row == PARTIAL).flatten().tolist())


# ------------------------------------------------------------------ _runs

def _run_tiles(rec):
    """The tiles the kernel's runs loop visits for one record, in loop order."""
    lo, L, R2, P2, P1, count = rec[:6]
    return [lo + s // (L * R2) * P1 + s // L % R2 * P2 + s % L for s in range(count)]


@given(st.integers(1, 3), st.integers(1, 40), st.integers(0, 2 ** 31 - 1),
       st.sampled_from(["random", "structured"]))
def test_runs_restate_the_full_tiles(n, m, seed, kind):
    """Whatever rows of FULL tiles, the runs, when given, visit each FULL tile exactly
    once, in increasing order (the CSR list's order), and nothing else; rows built as runs
    (two levels, any pitches that keep them apart) are always recognised."""
    gen = torch.Generator().manual_seed(seed)

    def draw(hi):
        return int(torch.randint(0, hi, (1,), generator=gen))
    full = torch.zeros(1, 1, n, m, dtype=torch.bool)
    for i in range(n):
        if kind == "random":
            full[0, 0, i] = torch.rand(m, generator=gen) < 0.5
            continue
        L = 1 + draw(3)
        P2 = L + draw(3)
        R2 = 1 + draw(3)
        P1 = R2 * P2 + draw(4)
        R1 = 1 + draw(3)
        if (R1 - 1) * P1 + (R2 - 1) * P2 + L > m or draw(4) == 0:
            continue                                    # (a row without FULL tiles)
        lo = draw(m - ((R1 - 1) * P1 + (R2 - 1) * P2 + L) + 1)
        for a in range(R1):
            for b in range(R2):
                full[0, 0, i, lo + a * P1 + b * P2:lo + a * P1 + b * P2 + L] = True
    runs = tb._runs(full)
    if kind == "structured":
        assert runs is not None
    if runs is None:
        return
    assert runs.shape == (1, 1, n, tb.RUN_FIELDS) and runs.dtype == torch.int32
    for i in range(n):
        tiles = _run_tiles(runs[0, 0, i].tolist())
        assert tiles == torch.nonzero(full[0, 0, i]).flatten().tolist()


def test_runs_need_enough_tiles_in_auto():
    """``min_tiles``: runs of fewer FULL tiles per row on average, or of none, are
    refused."""
    full = torch.zeros(1, 1, 2, 64, dtype=torch.bool)
    full[0, 0, 0, 0:40:4] = True                          # 10 tiles, one per 4
    full[0, 0, 1, 8:14] = True                            # 6 tiles, one run
    assert tb._runs(full, 8) is not None and tb._runs(full, 9) is None
    assert tb._runs(full[..., :0, :]) is not None and tb._runs(full[..., :0, :], 1) is None
    assert tb._runs(torch.zeros_like(full), 1) is None         # no FULL tile: no runs
    assert tb._runs(full)[0, 0, :, :6].tolist() == [[0, 1, 10, 4, 40, 10], [8, 6, 1, 6, 6, 6]]


#: every other key tile of 16 in the first three of each eight, within the query's block
#: of 128 and its neighbours: per query tile, R1 = 3 groups (pitch 8 tiles) of R2 = 2
#: runs (pitch 2) of one FULL tile each
TWO_LEVELS = "abs(q // 128 - k // 128) <= 1 & k % 128 < 48 & k % 32 < 16"


@pytest.mark.interpreter
@pytest.mark.parametrize("Lq", [512, 500], ids=["B1-H2-L512-D32-fp32", "B1-H2-L500-D32-fp32"])
def test_runs_of_runs_in_the_kernels(monkeypatch, Lq):
    """FULL tiles as runs of runs in the forward, dQ and dK/dV kernels (``tables="runs"``):
    outputs and gradients against the float64 reference (a ragged length too), and the
    dQ table's records really have two levels."""
    monkeypatch.setenv("SPATTN_TABLES", "runs")
    seen = []
    runs = tb._runs

    def spy(full, *a):
        out = runs(full, *a)
        seen.append(out)
        return out
    monkeypatch.setattr(tb, "_runs", spy)
    run_fwd(TWO_LEVELS, strategy="table", Lq=Lq, bm=32, bn=16, seed=11)
    run_bwd(TWO_LEVELS, strategy="table", Lq=Lq, bm=16, bn=32, seed=12,
            bwd_opts={"block_m2": 32, "block_n2": 16})
    two = [r for r in seen if r is not None and
           int((r[..., 5] // (r[..., 1] * r[..., 2]).clamp(min=1)).max()) > 1
           and int(r[..., 2].max()) > 1]
    assert len(two) >= 2, "the forward's and dQ's tables are runs of runs"


def test_auto_form():
    """Sorted documents are one span per row (auto: spans, no CSR built); a random block
    table is not, nor are its FULL tiles runs (auto: CSR); "spans" and "csr" force the
    form, "runs" asks for runs where the FULL tiles are runs."""
    docs = compile_pattern("causal & same(doc)")
    gen = torch.Generator().manual_seed(0)
    kw = dict(B=1, H=2, q_offset=0, device="cpu")
    doc = {"doc": doc_ids(200, 5, gen)}
    assert tb.fwd_tables(docs, 200, 200, 32, 16, inputs=doc, **kw)[2] == "spans"
    assert tb.fwd_tables(docs, 200, 200, 32, 16, inputs=doc, tables="csr", **kw)[2] == "csr"
    assert tb.fwd_tables(docs, 200, 200, 32, 16, inputs=doc, tables="runs", **kw)[2] == "runs"
    (_, _, sq), (_, _, sk) = tb.bwd_tables(docs, 200, 200, (16, 32, 32, 16), inputs=doc, **kw)
    assert sq == "spans" and sk == "spans"
    blocks = compile_pattern("blocks[q // 16, k // 16]")
    tab = {"blocks": block_table(13, 13, gen, density=0.3)}
    assert tb.fwd_tables(blocks, 200, 200, 16, 16, inputs=tab, **kw)[2] == "csr"
    assert tb.fwd_tables(blocks, 200, 200, 16, 16, inputs=tab, tables="runs", **kw)[2] == "csr"
    assert tb.fwd_tables(blocks, 200, 200, 16, 16, inputs=tab, tables="spans", **kw)[2] == "spans"
    with pytest.raises(SpattnConfigError, match="tables='dense'"):
        triton_backend.fwd(docs, *rand_qkv(1, 1, 1, 40, 40, 16), scale=0.25, q_offset=0,
                           inputs={"doc": torch.arange(40) // 9}, tables="dense")


# ------------------------------------------------- kernels with each form forced

def _unsorted_docs(gen, Bn, H, Lq, Lk):
    return {"doc": torch.randint(0, 3, (max(Lq, Lk),), generator=gen)}


def _docs(gen, Bn, H, Lq, Lk):
    return {"doc": doc_ids(max(Lq, Lk), 4, gen)}


def _blocks(gen, Bn, H, Lq, Lk):
    return {"blocks": block_table(-(-Lq // 16), -(-Lk // 16), gen, density=0.3)}


# (id, source, inputs, q_offset): tight rows, then spans with EMPTY tiles / several FULL runs
CASES = [
    ("documents", "causal & same(doc)", _docs, None),
    ("causal-off-5", "causal", None, -5),
    ("unsorted-docs", "causal & same(doc)", _unsorted_docs, None),
    ("blocks", "blocks[q // 16, k // 16]", _blocks, None),
    ("dilated", "dilated(5, 3)", None, None),
    ("global_local", "global_tokens(4) | local(3, 5)", None, None),
    ("masked-rows", "causal & k >= 20", None, None),
]


@pytest.fixture
def spy_forms(monkeypatch):
    """The forms the launchers built (``runtime.tables.TABLE_FORMS``), in call order."""
    seen = []
    table_many = tb._table_many
    PLANS.clear()                                    # no plans kept by earlier tests

    def spy(*a, **k):
        out = table_many(*a, **k)
        seen.extend(t[2] for t in out)
        return out
    monkeypatch.setattr(tb, "_table_many", spy)
    return seen


def _forms_as_asked(forms, tables, name):
    """The forms built under a forced ``tables``: that form, or (``runs``) CSR lists where
    the FULL tiles are not runs (the random block table's and unsorted documents')."""
    if tables != "runs":
        return forms and all(f == tables for f in forms)
    runs = name not in ("blocks", "unsorted-docs")
    return forms and all(f == "runs" if runs else f in ("runs", "csr") for f in forms)


@pytest.mark.parametrize("tables", ["csr", "spans", "runs"])
@pytest.mark.parametrize("name,src,inputs_fn,q_offset", CASES, ids=[c[0] for c in CASES])
def test_forward_forms(monkeypatch, spy_forms, name, src, inputs_fn, q_offset, tables):
    monkeypatch.setenv("SPATTN_TABLES", tables)
    run_fwd(src, strategy="table", Bn=2, Lq=70, Lk=70 if inputs_fn else 61, bm=16, bn=16,
            inputs_fn=inputs_fn, q_offset=q_offset, seed=sum(map(ord, name)))
    assert _forms_as_asked(spy_forms, tables, name)


@pytest.mark.parametrize("loop", ["fused", "persistent"])
@pytest.mark.parametrize("name,src,inputs_fn,q_offset", CASES[:4], ids=[c[0] for c in CASES[:4]])
def test_forward_spans_loops(monkeypatch, spy_forms, name, src, inputs_fn, q_offset, loop):
    """The fused and persistent loops run a span as one loop with a per-tile branch."""
    from spattn.runtime import cache
    monkeypatch.setenv("SPATTN_TABLES", "spans")
    monkeypatch.setenv("SPATTN_FWD_LOOP", loop)
    cache.clear_memory()
    try:
        run_fwd(src, strategy="table", Bn=2, Lq=70, Lk=70 if inputs_fn else 61, bm=16, bn=16,
                inputs_fn=inputs_fn, q_offset=q_offset, seed=sum(map(ord, name)) + 1)
        srcs = [open(p).read() for p in cache._modules]
        assert srcs and all("_fwd_fused_" in s for s in srcs)
    finally:
        cache.clear_memory()
    assert spy_forms and all(f == "spans" for f in spy_forms)


@pytest.mark.parametrize("tables", ["csr", "spans", "runs"])
@pytest.mark.parametrize("name,src,inputs_fn,q_offset", CASES, ids=[c[0] for c in CASES])
def test_backward_forms(monkeypatch, spy_forms, name, src, inputs_fn, q_offset, tables):
    monkeypatch.setenv("SPATTN_TABLES", tables)
    run_bwd(src, strategy="table", Lq=100, Lk=100 if inputs_fn else 90, bm=16, bn=32,
            inputs_fn=inputs_fn, q_offset=q_offset, seed=sum(map(ord, name)) + 2)
    assert _forms_as_asked(spy_forms, tables, name)


def test_auto_mixes_forms_per_kernel(spy_forms):
    """auto decides per table: sorted documents run spans in every kernel."""
    run_bwd("causal & same(doc)", strategy="table", Lq=64, bm=16, bn=32,
            inputs_fn=_docs, seed=5)
    # the forward, then the backward's dQ and dK/dV (built together: the helper runs the
    # backward as a call of its own; within one plan dQ reuses the forward's table)
    assert spy_forms == ["spans", "spans", "spans"]
