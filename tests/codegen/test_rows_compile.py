"""Kernels that address rows through row tables (``rows="table"``) compile for Hopper
(sm_90) without a GPU: both strategies, the loop variants, 64-bit integers, a score and the
FULL tiles as runs (tests/helpers/compile_kernels.py ``--rows``). Two shards of every other
case: the first by default, the second under ``-m slow``; 17 kernels in all, 4 of them
with the FULL tiles as runs."""
import pytest

from tests.helpers.uninterpreted import run_script


@pytest.mark.parametrize("shard,kernels,runs", [(0, 8, 1),
                                                pytest.param(1, 9, 3, marks=pytest.mark.slow)],
                         ids=["shard0of2", "shard1of2"])
def test_row_table_kernels_compile_for_sm90(shard, kernels, runs):
    r = run_script("tests/helpers/compile_kernels.py", "--rows", f"--shard={shard}/2")
    assert r.stdout.count("OK ") == kernels and r.stdout.count(" runs") == runs, r.stdout
    assert r.stdout.count("rows': 'table'") == kernels, r.stdout
