"""Atomic-dQ backward kernels (``dq="atomic"``) compile for Hopper (sm_90) without a GPU,
with an atomic add in the dK/dV kernel's PTX: both strategies, split and fused loops, TMA
loads, 64-bit integers, row tables, a score, and the lse's gradient in the row-statistics
kernel (tests/helpers/compile_kernels.py ``--atomic``)."""
from tests.helpers.uninterpreted import run_script


def test_atomic_dq_kernels_compile_for_sm90():
    r = run_script("tests/helpers/compile_kernels.py", "--atomic")
    assert r.stdout.count("OK ") == 18 and r.stdout.count("OK  attn_bwd_rowstats_") == 9, \
        r.stdout
