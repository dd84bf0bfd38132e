"""``benchmarks/ws_bwd.py`` and ``benchmarks/gluon_bwd.py`` without a GPU: the problems
the first times, its table (Flex's time over each plan's, the generated backward's over
the Gluon kernel's), and the second's table (the Gluon kernel against the generated dK/dV
kernel from the profiler's split)."""
import pytest

from tests.helpers.bench_scripts import load


@pytest.fixture(scope="module")
def ws_bwd():
    return load("ws_bwd")


def test_problems_cover_few_and_many_documents(ws_bwd):
    docs = {(L, n) for _, src, L, n, *_ in ws_bwd.PROBLEMS if n}
    assert {(16384, 1), (16384, 4), (16384, 100), (65536, 20)} <= docs
    assert all(src == "causal & same(doc)" for _, src, _, n, *_ in ws_bwd.PROBLEMS if n)


def test_table_reads_its_rows(ws_bwd):
    row = {"problem": "causal 16K", "ws_stage": True, "ws f+b_ms": 8.0, "gen f+b_ms": 9.0,
           "flex f+b_ms": 12.0, "ws bwd_ms": 6.0, "gen bwd_ms": 7.5, "flex bwd_ms": 9.0}
    lines = ws_bwd.table([row, dict(row, problem="100 documents", ws_stage=False)]).splitlines()
    assert len(lines) == 4 and lines[0].count("|") == lines[1].count("|") == 12
    assert lines[2] == ("| causal 16K | yes | 8.000 | 9.000 | 12.000 | 1.50 | 1.33 | 6.000 "
                        "| 7.500 | 9.000 | 1.25 |")
    assert lines[3].startswith("| 100 documents | no |")


def test_gluon_bwd_table():
    gb = load("gluon_bwd")
    row = {"N": 4096, "causal": True,
           "err": {"gluon st2 s0": (5e-3, 6e-4), "spattn": (5e-3, 7e-4)},
           "ms": {"gluon st2 s0": 0.25, "spattn bwd": 0.5},
           "spattn_kernels_us": {"attn_bwd_dkdv_pattern_x": 300.0, "attn_bwd_dq_pattern_x": 200.0}}
    lines = gb.table([row]).splitlines()
    assert "| 4096 | causal | gluon st2 s0 | 5.0e-03 / 6.0e-04 | 0.250 | 1.20 |" in lines
    assert lines[-1] == ("| 4096 | causal | spattn dK/dV kernel / dQ kernel (profiler) | "
                         "5.0e-03 / 7.0e-04 | 0.300 / 0.200 | |")
