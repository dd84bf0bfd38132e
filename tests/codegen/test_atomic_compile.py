"""Atomic-dQ backward kernels (``dq="atomic"``) compile for Hopper (sm_90) without a GPU,
with an atomic add in the dK/dV kernel's PTX: both strategies, split and fused loops, TMA
loads, 64-bit integers, row tables, a score, and the lse's gradient in the row-statistics
kernel (tests/helpers/compile_kernels.py ``--atomic``). Two shards of every other case:
the first by default, the second under ``-m slow``."""
import pytest

from tests.helpers.uninterpreted import run_script


@pytest.mark.parametrize("shard", [0, pytest.param(1, marks=pytest.mark.slow)],
                         ids=["shard0of2", "shard1of2"])
def test_atomic_dq_kernels_compile_for_sm90(shard):
    r = run_script("tests/helpers/compile_kernels.py", "--atomic", f"--shard={shard}/2")
    cases = 5 if shard == 0 else 4        # of the 9, each a dQ and a row-statistics kernel
    assert r.stdout.count("OK ") == 2 * cases and \
        r.stdout.count("OK  attn_bwd_rowstats_") == cases, r.stdout
