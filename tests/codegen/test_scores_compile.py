"""Generated kernels with scores compile for Hopper (sm_90) without a GPU: the compiled
path checks what the interpreter does not (tests/helpers/compile_kernels.py); the backward
with the lse's gradient (``lse_grad``) among them."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_score_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "compile_kernels.py")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stdout.count("OK ") == 47, r.stdout
