"""Atomic-dQ backward kernels (``dq="atomic"``) compile for Hopper (sm_90) without a GPU,
with an atomic add in the dK/dV kernel's PTX: both strategies, split and fused loops, TMA
loads, 64-bit integers, row tables, a score, and the lse's gradient in the row-statistics
kernel (tests/helpers/compile_kernels.py ``--atomic``)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_atomic_dq_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "compile_kernels.py"),
                        "--atomic"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stdout.count("OK ") == 18 and r.stdout.count("OK  attn_bwd_rowstats_") == 9, \
        r.stdout
