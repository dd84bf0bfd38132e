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


def test_auto_form():
    """Sorted documents are one span per row (auto: spans, no CSR built); a random block
    table is not (auto: CSR); "spans" and "csr" force the form."""
    docs = compile_pattern("causal & same(doc)")
    gen = torch.Generator().manual_seed(0)
    kw = dict(B=1, H=2, q_offset=0, device="cpu")
    doc = {"doc": doc_ids(200, 5, gen)}
    assert tb.fwd_tables(docs, 200, 200, 32, 16, inputs=doc, **kw)[2] is True
    assert tb.fwd_tables(docs, 200, 200, 32, 16, inputs=doc, tables="csr", **kw)[2] is False
    (_, _, sq), (_, _, sk) = tb.bwd_tables(docs, 200, 200, (16, 32, 32, 16), inputs=doc, **kw)
    assert sq is True and sk is True
    blocks = compile_pattern("blocks[q // 16, k // 16]")
    tab = {"blocks": block_table(13, 13, gen, density=0.3)}
    assert tb.fwd_tables(blocks, 200, 200, 16, 16, inputs=tab, **kw)[2] is False
    assert tb.fwd_tables(blocks, 200, 200, 16, 16, inputs=tab, tables="spans", **kw)[2] is True
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
    """The forms the launchers built (True = spans), in call order."""
    seen = []
    table_many = tb._table_many
    PLANS.clear()                                    # no plans kept by earlier tests

    def spy(*a, **k):
        out = table_many(*a, **k)
        seen.extend(t[2] for t in out)
        return out
    monkeypatch.setattr(tb, "_table_many", spy)
    return seen


@pytest.mark.parametrize("tables", ["csr", "spans"])
@pytest.mark.parametrize("name,src,inputs_fn,q_offset", CASES, ids=[c[0] for c in CASES])
def test_forward_forms(monkeypatch, spy_forms, name, src, inputs_fn, q_offset, tables):
    monkeypatch.setenv("SPATTN_TABLES", tables)
    run_fwd(src, strategy="table", Bn=2, Lq=70, Lk=70 if inputs_fn else 61, bm=16, bn=16,
            inputs_fn=inputs_fn, q_offset=q_offset, seed=sum(map(ord, name)))
    assert spy_forms and all(f == (tables == "spans") for f in spy_forms)


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
    assert spy_forms and all(spy_forms)


@pytest.mark.parametrize("tables", ["csr", "spans"])
@pytest.mark.parametrize("name,src,inputs_fn,q_offset", CASES, ids=[c[0] for c in CASES])
def test_backward_forms(monkeypatch, spy_forms, name, src, inputs_fn, q_offset, tables):
    monkeypatch.setenv("SPATTN_TABLES", tables)
    run_bwd(src, strategy="table", Lq=100, Lk=100 if inputs_fn else 90, bm=16, bn=32,
            inputs_fn=inputs_fn, q_offset=q_offset, seed=sum(map(ord, name)) + 2)
    assert spy_forms and all(f == (tables == "spans") for f in spy_forms)


def test_auto_mixes_forms_per_kernel(spy_forms):
    """auto decides per table: sorted documents run spans in every kernel."""
    run_bwd("causal & same(doc)", strategy="table", Lq=64, bm=16, bn=32,
            inputs_fn=_docs, seed=5)
    # the forward, then the backward's dQ and dK/dV (built together: the helper runs the
    # backward as a call of its own; within one plan dQ reuses the forward's table)
    assert spy_forms == [True, True, True]
