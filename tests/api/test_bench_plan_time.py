"""The plan-time benchmark (``benchmarks/plan_time.py``): one small case run end to end
(its own subprocess), so that the script does not break on its first real run."""
import json

import pytest

from tests.helpers.bench_scripts import load


@pytest.mark.slow
def test_runs_one_case_and_writes_json(tmp_path, capsys):
    mod = load("plan_time")
    res = mod.main(["--case", "nbhd2d-choose", "--repeat", "1", "--out", str(tmp_path)])
    row = res["cases"]["nbhd2d-choose"]
    assert row["wall"] > 0 and row["cpu"] > 0 and "boxes" in row["what"]
    assert json.loads((tmp_path / "plan_time.json").read_text())["cases"] == res["cases"]
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("| nbhd2d-choose | choose: grid 64 x 64")
