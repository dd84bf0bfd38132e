"""Kernels that address rows through row tables (``rows="table"``) compile for Hopper
(sm_90) without a GPU: both strategies, the loop variants, 64-bit integers, a score and the
FULL tiles as runs (tests/helpers/compile_kernels.py ``--rows``)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_row_table_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "compile_kernels.py"),
                        "--rows"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stdout.count("OK ") == 17 and r.stdout.count(" runs") == 4 and "rows': 'table'" in r.stdout, r.stdout
