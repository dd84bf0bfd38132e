"""Tile tables are memoised per shape and input identity; in-place edits of an input invalidate."""
import pytest
import torch

import spattn
from spattn.runtime import triton_backend
from spattn.runtime.reference import attention_reference

pytestmark = pytest.mark.interpreter


def test_inplace_input_edit_is_seen(monkeypatch):
    monkeypatch.setenv("SPATTN_STRATEGY", "table")
    pat = spattn.compile("causal & same(doc)", backend="triton")
    g = torch.Generator().manual_seed(3)
    L = 70
    q, k, v = (torch.randn(1, 2, L, 16, generator=g) for _ in range(3))
    doc = torch.sort(torch.randint(0, 3, (L,), generator=g)).values
    for step in range(3):
        out = pat(q, k, v, doc=doc)
        ref, _ = attention_reference(q.double(), k.double(), v.double(),
                                     pat.mask(L, L, num_heads=2, doc=doc))
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-3, step
        doc[: L // 2] = doc[: L // 2].flip(0) if step == 0 else torch.arange(L // 2)


def test_memo_is_bounded():
    pat = spattn.compile("causal & same(doc)", backend="triton")
    q = torch.randn(1, 1, 33, 16)
    for i in range(triton_backend.TABLE_MEMO_SIZE + 5):
        pat(q, q, q, doc=torch.zeros(33, dtype=torch.int64) + i % 2)
    assert len(triton_backend._TABLE_MEMO) <= triton_backend.TABLE_MEMO_SIZE
