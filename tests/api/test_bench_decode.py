"""The decode benchmark (``benchmarks/decode.py``): its tables and the CPU mode, tiny."""
import importlib.util
import json
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "decode.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("spattn_bench_decode", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_table_ratios_and_errors(bench):
    rows = [{"pattern": "causal", "B": 1, "L": 8192, "spattn_ms": 0.02, "flex_ms": 0.03,
             "sdpa_best_ms": 0.02, "spattn_graph_ms": 0.008, "flex_graph_ms": 0.012,
             "sdpa_best_graph_ms": 0.0075, "splits": 64},
            {"pattern": "streaming", "B": 16, "L": 131072, "error": "mismatch vs flex: 0.5"}]
    lines = bench.table_gpu(rows).splitlines()
    assert lines[1].count("---") == lines[0].count("|") - 1
    assert "| 8.0 us | 12.0 us | 7.5 us | 1.50 | 1.07 | 64 |" in lines[2]
    assert lines[3].startswith("| streaming | 16 | 131072 | ERROR: mismatch vs flex")


def test_cpu_mode_runs_and_writes_json(bench, tmp_path, capsys):
    assert bench.main(["--cpu", "--tiny", "--rounds", "1", "--reps", "1",
                       "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "decode_cpu.json").read_text())
    assert len(data["rows"]) == 6
    causal = [r for r in data["rows"] if r["pattern"] == "causal"]
    assert all(r["max_err_vs_sdpa"] < 1e-4 for r in causal)
    assert capsys.readouterr().out.splitlines()[0].startswith("| pattern | L |")
