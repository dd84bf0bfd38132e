"""Generated kernels with scores compile for Hopper (sm_90) without a GPU: the compiled
path checks what the interpreter does not (tests/helpers/compile_kernels.py); the backward
with the lse's gradient (``lse_grad``) among them. The list runs in four shards, so that
test workers share it; together they compile all 47 kernels."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: kernels compiled by each shard (every fourth case of the list)
SHARD_KERNELS = (14, 14, 10, 9)


@pytest.mark.parametrize("shard", range(len(SHARD_KERNELS)),
                         ids=[f"shard{i}of{len(SHARD_KERNELS)}" for i in range(len(SHARD_KERNELS))])
def test_score_kernels_compile_for_sm90(shard):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "compile_kernels.py"),
                        f"--shard={shard}/{len(SHARD_KERNELS)}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stdout.count("OK ") == SHARD_KERNELS[shard], r.stdout
