"""The one-launch row summary (``runtime/spans_kernel.row_spans``, run here by the Triton
interpreter) against ``triton_backend._spans``: the same waste-zero decision per row, the
same spans and work where the waste is zero."""
import pytest
import torch

from spattn.ir.tiles import EMPTY, FULL, PARTIAL
from spattn.runtime import triton_backend as tb
from spattn.runtime.spans_kernel import row_spans


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


@pytest.mark.parametrize("Bp,Hp,n,m", [(1, 1, 7, 5), (2, 3, 9, 33), (1, 2, 5, 1500)],
                         ids=["B1-H1-n7-m5", "B2-H3-n9-m33", "B1-H2-n5-m1500"])
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
def test_row_spans_agree(Bp, Hp, n, m, transposed):
    gen = torch.Generator().manual_seed(Bp * 100 + n * 10 + m)
    cls = _rows(gen, Bp, Hp, n, m)
    if transposed:                       # dK/dV reads a transposed view (non-contiguous)
        cls = _rows(gen, Bp, Hp, m, n).transpose(2, 3)
    spans, waste, work = row_spans(cls)
    ref_spans, ref_waste, ref_work = tb._spans(cls)
    assert torch.equal(work, ref_work.to(torch.int32))
    m_cols = cls.shape[-1]
    for r in range(spans.reshape(-1, 4).shape[0]):
        row = cls.reshape(-1, m_cols)[r]
        ne = (row != EMPTY).nonzero().flatten().tolist()
        fu = (row == FULL).nonzero().flatten().tolist()
        tight = (not ne or ne == list(range(ne[0], ne[-1] + 1))) and \
            (not fu or fu == list(range(fu[0], fu[-1] + 1)))
        got = spans.reshape(-1, 4)[r].tolist()
        if tight:
            assert got == ref_spans.reshape(-1, 4)[r].tolist()
    assert (int(waste) == 0) == (int(ref_waste) == 0)


def test_row_spans_tight_table():
    """Every row tight (documents-like): zero waste and the same spans as ``_spans``."""
    n, m = 12, 20
    cls = torch.full((1, 1, n, m), EMPTY, dtype=torch.int8)
    for i in range(n):
        lo, hi = i // 3 * 4, min(m, i + 6)
        cls[0, 0, i, lo:hi] = PARTIAL
        cls[0, 0, i, lo + 1:hi - 1] = FULL
    spans, waste, work = row_spans(cls)
    ref_spans, ref_waste, ref_work = tb._spans(cls)
    assert int(waste) == 0 == int(ref_waste)
    assert torch.equal(spans, ref_spans) and torch.equal(work, ref_work.to(torch.int32))
