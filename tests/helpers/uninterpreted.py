"""Run a script of the repository in a child process without ``TRITON_INTERPRET``, as the
tests that compile kernels for a GPU target on the CPU do (Triton reads the variable when
it is imported, so the test process itself cannot drop it)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_script(path: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python ROOT/path *args`` from the repository root, its exit status checked (the
    tails of its output in the failure); returns the finished process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / path), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r
