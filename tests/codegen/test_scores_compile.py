"""Generated kernels with scores compile for Hopper (sm_90) without a GPU: the compiled
path checks what the interpreter does not (tests/helpers/compile_kernels.py); the backward
with the lse's gradient (``lse_grad``) among them. The list runs in four shards, so that
test workers share it; together they compile all 47 kernels. Shard 0 (every fourth case)
runs by default, the others under ``-m slow`` (the suite's time on CI's two cores)."""
import pytest

from tests.helpers.uninterpreted import run_script


#: kernels compiled by each shard (every fourth case of the list)
SHARD_KERNELS = (14, 14, 10, 9)


@pytest.mark.parametrize("shard", [pytest.param(i, marks=[pytest.mark.slow] if i else [],
                                                id=f"shard{i}of{len(SHARD_KERNELS)}")
                                   for i in range(len(SHARD_KERNELS))])
def test_score_kernels_compile_for_sm90(shard):
    r = run_script("tests/helpers/compile_kernels.py", f"--shard={shard}/{len(SHARD_KERNELS)}")
    assert r.stdout.count("OK ") == SHARD_KERNELS[shard], r.stdout
