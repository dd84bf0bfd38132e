"""Kernel modules in memory: one per kernel text, even where two kernels share a file name."""
import pytest

import spattn
from spattn.runtime import cache


def test_kernels_sharing_a_file_name_keep_their_modules(monkeypatch, tmp_path):
    """Two kernels of one pattern name whose keys share the file name's hex digits (forced
    here) take turns in one file: each call still gets its own kernel's module, never the
    other's (found by the random search with SPATTN_BWD_DQ=atomic, whose extra modules made
    a collision among ~3000 kernels of one process likely)."""
    monkeypatch.setattr(cache, "file_name", lambda pattern, kind, key: f"attn_{kind}_x_000000.py")
    # a directory of its own: modules other tests imported are not served from memory
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path / "kernels"))
    a = spattn.compile("causal & window(9)", pattern=None)
    b = spattn.compile("causal & same(doc)", pattern=None)
    assert a.name == b.name
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match="foreign file"):
            ma, _ = cache.load(a, "fwd", head_dim=32, dtype="fp32", strategy="table")
            mb, _ = cache.load(b, "fwd", head_dim=32, dtype="fp32", strategy="table")
        assert ma is not mb
        assert "DOC_ptr" not in ma.__spattn_text__ and "DOC_ptr" in mb.__spattn_text__
        assert "DOC_ptr" in mb.KERNEL.arg_names and "DOC_ptr" not in ma.KERNEL.arg_names


@pytest.mark.interpreter
def test_a_table_the_score_dropped_keeps_its_own_kernel():
    """Two patterns of one canonical source, ``false score s``, one declaring a table its
    score's simplification dropped (found by the random search: the second call's launch
    passed the table to the first pattern's kernel, which has no such parameter): their
    kernels have two keys, and both calls run."""
    import torch
    plain = spattn.compile("false", score="s", backend="triton")
    dropped = spattn.compile("false", score="if (q + 3000000000) % 7 > -2 then s "
                             "else rel[h, 0]", backend="triton")
    assert plain.source == dropped.source and dropped.score_inputs == {"rel": 2}
    keys = [cache.resolve(p, "fwd", head_dim=16, dtype="fp32")[2] for p in (plain, dropped)]
    assert keys[0] != keys[1]
    q = torch.randn(2, 2, 39, 16)
    k = torch.randn(2, 2, 8, 16)
    assert float(plain(q, k, k).abs().max()) == 0.0
    assert float(dropped(q, k, k, rel=torch.randn(2, 1)).abs().max()) == 0.0
