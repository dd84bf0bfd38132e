"""The few-launch table setup (``runtime/spans_kernel.py``, run here by the Triton
interpreter) against the torch path of ``triton_backend``: the table kernel pools,
demotes, transposes and summarises like ``_Job.classes`` + ``_spans`` (the same waste-zero
decision per table, the same spans and work where it is zero), the order kernel gives
``_grid_order``'s order exactly, and whole training-step tables agree."""
import pytest
import torch

from spattn.ir.tiles import EMPTY, FULL, PARTIAL
from spattn.runtime import tables as tb
from spattn.runtime.spans_kernel import grid_order, table_rows

from tests.helpers.kernels import block_table, check_table_paths, compile_pattern, doc_ids

pytestmark = pytest.mark.interpreter


def _rows(gen, Bp, Hp, n, m):
    """Random classes mixing rows of every kind: spans with one FULL run (waste 0), EMPTY
    holes, several FULL runs, empty rows, all-FULL rows."""
    cls = torch.full((Bp, Hp, n, m), EMPTY, dtype=torch.int8)
    for r in range(Bp * Hp * n):
        row = cls.view(-1, m)[r]
        kind = r % 5
        lo = int(torch.randint(0, m, (1,), generator=gen))
        hi = int(torch.randint(lo, m + 1, (1,), generator=gen))
        if kind == 0:          # tight span, one FULL run inside
            row[lo:hi] = PARTIAL
            if hi - lo > 2:
                a = int(torch.randint(lo, hi, (1,), generator=gen))
                b = int(torch.randint(a, hi + 1, (1,), generator=gen))
                row[a:b] = FULL
        elif kind == 1:        # random classes
            row[:] = torch.randint(0, 3, (m,), generator=gen, dtype=torch.int8)
        elif kind == 2:        # all FULL
            row[lo:hi] = FULL
        elif kind == 3:        # two FULL runs
            row[lo:hi] = FULL
            if hi - lo > 2:
                row[(lo + hi) // 2] = PARTIAL
        # kind 4: empty row
    return cls


def _tight(row):
    ne = (row != EMPTY).nonzero().flatten().tolist()
    fu = (row == FULL).nonzero().flatten().tolist()
    return (not ne or ne == list(range(ne[0], ne[-1] + 1))) and \
        (not fu or fu == list(range(fu[0], fu[-1] + 1)))


# (B', H', fine tile, table tile, Lq, Lk): factors 1 and 2, ragged lengths on either side
CASES = [
    (1, 1, (8, 8), (8, 8), 56, 40),
    (2, 3, (8, 8), (16, 8), 75, 131),
    (1, 2, (8, 8), (8, 16), 131, 75),
    (1, 1, (8, 4), (16, 16), 97, 101),
    (1, 2, (4, 4), (4, 4), 40, 6000),
]


@pytest.mark.parametrize("Bp,Hp,fine_tile,tile,Lq,Lk", CASES,
                         ids=[f"B{c[0]}-H{c[1]}-f{c[2][0]}x{c[2][1]}-t{c[3][0]}x{c[3][1]}-"
                              f"Lq{c[4]}-Lk{c[5]}" for c in CASES])
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_table_rows_agree(Bp, Hp, fine_tile, tile, Lq, Lk, transposed, layout):
    if transposed:      # lengths swapped: the rows (key tiles) keep the case's row lengths
        Lq, Lk = Lk, Lq
    gen = torch.Generator().manual_seed(Bp * 100 + Hp * 10 + Lq + Lk)
    nfq, nfk = -(-Lq // fine_tile[0]), -(-Lk // fine_tile[1])
    if layout == "strided":
        fine = _rows(gen, Bp, Hp, nfk, nfq).transpose(2, 3)
    else:
        fine = _rows(gen, Bp, Hp, nfq, nfk)
    job = tb._Job(fine, fine_tile, tile, transposed, Lq, Lk)
    waste = torch.zeros(1, dtype=torch.int32)
    factors = (tile[0] // fine_tile[0], tile[1] // fine_tile[1])
    spans, work = table_rows(fine, factors, job.n_rows, job.n_cols, transposed=transposed,
                             ragged=job.ragged, waste=waste)
    cls = job.classes()
    ref_spans, ref_waste, ref_work = tb._spans(cls)
    assert spans.shape == (Bp, Hp, job.n_rows + 1, 4)
    assert torch.equal(work, ref_work.to(torch.int32))
    assert torch.equal(spans[:, :, -1], torch.zeros_like(spans[:, :, -1])), "padding row"
    rows = cls.reshape(-1, job.n_cols)
    tight = [_tight(r) for r in rows]
    for r, ok in enumerate(tight):
        if ok:
            assert spans[:, :, :-1].reshape(-1, 4)[r].tolist() == \
                ref_spans.reshape(-1, 4)[r].tolist(), f"row {r}"
    assert (int(waste) == 0) == (int(ref_waste) == 0) == all(tight)


def test_table_rows_tight_table():
    """Every pooled row tight (documents-like): zero waste and exactly ``_spans``."""
    n, m = 24, 40
    fine = torch.full((1, 1, n, m), EMPTY, dtype=torch.int8)
    for i in range(n):
        lo, hi = i // 6 * 8, min(m, 2 * i + 6)
        fine[0, 0, i, lo:hi] = PARTIAL
        fine[0, 0, i, lo + 2:hi - 2] = FULL
    for tile, transposed in [((8, 8), False), ((16, 8), False), ((8, 16), True)]:
        job = tb._Job(fine, (8, 8), tile, transposed, 8 * n, 8 * m)
        waste = torch.zeros(1, dtype=torch.int32)
        spans, work = table_rows(fine, (tile[0] // 8, tile[1] // 8), job.n_rows, job.n_cols,
                                 transposed=transposed, ragged=False, waste=waste)
        ref_spans, ref_waste, ref_work = tb._spans(job.classes())
        if int(ref_waste) == 0:
            assert int(waste) == 0
            assert torch.equal(spans[:, :, :-1], ref_spans)
        assert torch.equal(work, ref_work.to(torch.int32))


@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
def test_table_rows_padding_counts_as_full(transposed):
    """A table tile reaching past the fine classes (97 = 12 * 8 + 1 queries: the last
    16-query tile holds one fine row and one beyond) pools as its fine tiles alone: all
    FULL stays FULL, except on the ragged last column, which needs a bounds mask."""
    fine = torch.full((1, 1, 13, 26), FULL, dtype=torch.int8)
    job = tb._Job(fine, (8, 4), (16, 16), transposed, 97, 101)
    waste = torch.zeros(1, dtype=torch.int32)
    spans, work = table_rows(fine, (2, 4), job.n_rows, job.n_cols, transposed=transposed,
                             ragged=job.ragged, waste=waste)
    n_cols = job.n_cols
    for row in spans[0, 0, :-1].tolist():
        assert row == [0, n_cols, 0, n_cols - 1], row      # [lo, hi), FULL [flo, fhi)
    assert int(waste) == 0 and bool((work == 2 * n_cols - (n_cols - 1)).all())


@pytest.mark.parametrize("B,HO,shape,group", [(1, 1, (1, 1, 37), 1), (2, 3, (1, 1, 37), 1),
                                              (2, 3, (2, 3, 37), 1), (1, 2, (1, 6, 50), 3),
                                              (3, 2, (3, 4, 1500), 2)],
                         ids=["B1-H1", "B2-H3-shared", "B2-H3-per-head", "B1-HK2-G3",
                              "B3-HK2-G2-n1500"])
def test_grid_order_kernel_equals_torch(B, HO, shape, group):
    g = torch.Generator().manual_seed(sum(shape) + group)
    work = torch.randint(0, 300, shape, generator=g, dtype=torch.int32)
    work[..., ::7] = 0                       # zero work counts as one (class 0)
    got = grid_order(work, B, HO, group, w_max=300 * group)
    w = work.view(shape[0], HO, group, shape[2]).sum(2) if group > 1 else work
    want = tb._grid_order(w, B, HO)
    assert got.dtype == torch.int32 and torch.equal(got, want)


def test_grid_order_kernel_declines_overflow():
    work = torch.ones((1, 1, 8), dtype=torch.int32)
    assert grid_order(work, 1, 1, 1, w_max=2 ** 61) is None


def _docs(L, gen, per_head=False):
    d = doc_ids(L, 5, gen)
    return {"doc": d.expand(1, 4, L).clone() if per_head else d}


# (id, source, inputs factory, Lq, Lk)
PATTERNS = [
    ("documents", "causal & same(doc)", lambda g: _docs(300, g), 300, 300),
    ("documents-ragged", "causal & same(doc)", lambda g: _docs(301, g), 301, 301),
    ("window_sink", "causal & (window(40) | sink(8))", None, 290, 300),
    ("blocks", "blocks[q // 16, k // 16]", lambda g: {"blocks": block_table(19, 19, g)},
     300, 300),
    ("per_head", "causal & q - k < [20, 50, 90, 200][h]", None, 300, 300),
]


@pytest.mark.parametrize("name,src,inputs_fn,Lq,Lk", PATTERNS, ids=[p[0] for p in PATTERNS])
def test_training_tables_equal_torch_path(monkeypatch, name, src, inputs_fn, Lq, Lk):
    """``fwd_tables`` + ``bwd_tables`` (GQA: 4 query heads, 2 key heads) through the table
    and order kernels equal the torch path: the same forms, orders and spans; CSR lists
    where the waste is not zero."""
    pat = compile_pattern(src)
    inputs = inputs_fn(torch.Generator().manual_seed(len(name))) if inputs_fn else {}
    kw = dict(B=2, H=4, q_offset=Lk - Lq, device="cpu", inputs=inputs)
    check_table_paths(monkeypatch, lambda: [
        tb.fwd_tables(pat, Lq, Lk, 32, 16, **kw),
        *tb.bwd_tables(pat, Lq, Lk, (16, 32, 32, 16), HK=2, **kw),
        *tb.bwd_tables(pat, Lq, Lk, (32, 16, 16, 32), HK=2, **kw)])
