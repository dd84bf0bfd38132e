"""Forward kernels that read a token layout's boxes through 5-D TMA descriptors
(``rows="box"``) compile for Hopper (sm_90) without a GPU, with 5-D bulk tensor loads in
the PTX: 2-D (a padded grid) and 3-D layouts (batch and heads folded) in the table
strategy, a 1-D one in the ranges strategy, the split and fused loops, 64-bit integers, the
FULL key tiles as runs (tests/helpers/compile_kernels.py ``--box``)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_box_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "compile_kernels.py"),
                        "--box"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stdout.count("OK ") == 8 and r.stdout.count(" runs") == 2 and "rows': 'box'" in r.stdout, r.stdout
