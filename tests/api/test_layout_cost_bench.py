"""``benchmarks/layout_cost.py --rows --dry`` on the CPU: the copy and row-table paths of a
padded 2-D layout run, agree, and are written as JSON and a table; the GPU mode's patterns
exist."""
import json
import os

import pytest

from tests.helpers.bench_scripts import load


@pytest.fixture(scope="module")
def bench():
    return load("layout_cost")


@pytest.mark.slow
@pytest.mark.interpreter
def test_dry_rows_run(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPATTN_LAYOUT", "auto")
    monkeypatch.setenv("SPATTN_LAYOUT_GATHER", "copy")
    rc = bench.main(["--rows", "--dry", "--fwd-only", "--only", "nbhd 9x14 (3x3)",
                     "--out", str(tmp_path)])
    assert rc == 0
    (row,) = json.loads((tmp_path / "layout_rows.json").read_text())
    assert row["layout"].startswith("grid 9 x 14") and row["max_diff"] < 1e-5
    assert row["max_diff_off"] < 1e-4 and row["fwd_copy_ptr_ms"] > 0
    assert min(row["fwd_off_ms"], row["fwd_copy_ms"], row["fwd_kernel_ms"]) > 0
    assert row["predicted_kernel_vs_off"] < row["predicted_copy_vs_off"]
    assert "| nbhd 9x14 (3x3) | 126 |" in capsys.readouterr().out
    assert os.environ["SPATTN_LAYOUT"] == "auto"                 # the settings restored
    assert os.environ["SPATTN_LAYOUT_GATHER"] == "copy"


def test_gpu_patterns_exist(bench):
    assert set(bench.ROWS_PATTERNS) <= set(bench.PATTERNS)
    assert [bench.PATTERNS[n][1] for n in bench.ROWS_PATTERNS].count(4096) == 1
