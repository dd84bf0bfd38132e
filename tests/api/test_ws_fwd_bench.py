"""``benchmarks/ws_fwd.py`` without a GPU: its problems are the ones its docstring names,
and its table reads its rows (a rival's time over the kernel's; the grid the stage ran;
cells left empty where a rival was not timed)."""

import pytest

from tests.helpers.bench_scripts import load


@pytest.fixture(scope="module")
def bench():
    return load("ws_fwd")


def test_the_stride_problems_are_21s(bench):
    got = {name: (src, H, L) for name, src, B, H, L, D, mk in bench.PROBLEMS}
    assert got["FLUX stride 16x16"] == (((256, 256), (80, 80), (16, 16)), 24, 65536)
    assert got["Hunyuan stride 16x8x8"] == (((30, 48, 80), (18, 24, 24), (16, 8, 8)), 24,
                                            115200)


def test_table_reads_the_rows(bench):
    rows = [dict(problem="FLUX stride 16x16", ws_stage=True, persistent=True, tiles_each=50,
                 **{"warp-specialised_us": 8000.0, "generated_us": 10000.0,
                    "the other grid_us": 8200.0, "cuDNN_us": 80000.0}),
            dict(problem="causal 4K", ws_stage=True, persistent=False, tiles_each=0,
                 **{"warp-specialised_us": 160.0, "generated_us": 152.0}),
            dict(problem="full 1K", ws_stage=False, persistent=None, tiles_each=None,
                 **{"warp-specialised_us": 30.0, "generated_us": 30.0})]
    lines = bench.table(rows).splitlines()
    assert len(lines) == 5 and all(ln.count("|") == 11 for ln in lines)
    assert lines[2] == ("| FLUX stride 16x16 | 50 | persistent | 8000.0 | 10000.0 | 1.25x | "
                        "8200.0 | 1.025x | 80000.0 | 10.000x |")
    assert lines[3] == "| causal 4K | unequal | per item | 160.0 | 152.0 | 0.95x |  |  |  |  |"
    assert "| (not taken) |" in lines[4]
