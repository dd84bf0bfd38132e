"""Kernels that address rows through row tables (``rows="table"``) compile for Hopper
(sm_90) without a GPU: both strategies, the loop variants, 64-bit integers, a score and the
FULL tiles as runs (tests/helpers/compile_kernels.py ``--rows``)."""
from tests.helpers.uninterpreted import run_script


def test_row_table_kernels_compile_for_sm90():
    r = run_script("tests/helpers/compile_kernels.py", "--rows")
    assert r.stdout.count("OK ") == 17 and r.stdout.count(" runs") == 4 and "rows': 'table'" in r.stdout, r.stdout
