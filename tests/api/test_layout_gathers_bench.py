"""``benchmarks/layout_gathers.py --dry`` on the CPU: every way a layout's rows reach the
kernels (copies, row tables, the box forward with either backward, auto) runs, each plan
takes the way it names, all agree, and the JSON and the table are written."""
import json
import os

import pytest

from tests.helpers.bench_scripts import load


@pytest.mark.slow
@pytest.mark.interpreter
def test_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPATTN_LAYOUT_GATHER", "copy")
    bench = load("layout_gathers")
    from spattn.ir.cost import COSTS
    before = {t: dict(c) for t, c in COSTS.items()}
    assert bench.main(["--dry", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "layout_gathers.json").read_text())
    assert row["took"] == {"copy": ["copy", "copy"], "kernel": ["kernel", "kernel"],
                           "box": ["box", "copy"], "box+rows": ["box", "kernel"],
                           "auto": ["sequence order", None]}
    assert max(row["max_diff_vs_copy"].values()) < 1e-5
    assert min(row["ms"].values()) > 0 and len(row["ms"]) == 10
    assert "| 8x16, kernel 3x3 | box+rows (box, kernel) |" in capsys.readouterr().out
    assert {t: dict(c) for t, c in COSTS.items()} == before      # the constants restored
    assert os.environ["SPATTN_LAYOUT_GATHER"] == "copy"
