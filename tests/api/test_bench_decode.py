"""The decode benchmark (``benchmarks/decode.py``): its tables and the CPU mode, tiny."""
import json

import pytest

from tests.helpers.bench_scripts import load


@pytest.fixture(scope="module")
def bench():
    return load("decode")


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
    assert bench.main(["--cpu", "--tiny", "--rounds", "2", "--reps", "1", "--threads", "1",
                       "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "decode_cpu.json").read_text())
    assert len(data["rows"]) == 6 and data["meta"]["default_threads"] >= 1
    causal = [r for r in data["rows"] if r["pattern"] == "causal"]
    assert all(r["max_err_vs_sdpa"] < 1e-4 for r in causal)
    gqa = [r for r in data["rows"] if r["Hq"] != r["Hk"]]
    assert gqa and all(len(r["sdpa_expanded_ms_rounds"]) == 2 for r in gqa)
    assert all(r["sdpa_best"] in ("sdpa", "sdpa_expanded") for r in data["rows"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| threads | B | L | Lq |") and len(lines) == 8


def test_cpu_mode_stripes_checks_the_reference(bench, tmp_path, capsys):
    assert bench.main(["--cpu", "--tiny", "--stripes", "--rounds", "1", "--reps", "1",
                       "--threads", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "decode_cpu.json").read_text())
    assert {r["pattern"] for r in data["rows"]} == {"stripes", "s2-stripes"}
    assert all(r["max_err_vs_reference"] < 1e-4 for r in data["rows"])


def test_cpu_mode_scattered_checks_the_reference(bench, tmp_path, capsys):
    assert bench.main(["--cpu", "--tiny", "--scattered", "--rounds", "1", "--reps", "1",
                       "--threads", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "decode_cpu.json").read_text())
    assert {r["pattern"] for r in data["rows"]} == {"dilated-8", "8-of-64", "not-every-3rd",
                                                    "every-other"}
    assert all(r["max_err_vs_reference"] < 1e-4 for r in data["rows"])


def test_cpu_grid_skips_what_does_not_fit(bench):
    import argparse
    args = argparse.Namespace(tiny=False, quick=True, thread_list=[2, 1])
    grid = bench._cpu_grid(args)
    assert len(grid) == 2 * 2 * 3 * 3
    assert (1, 16, 32768, 1, (32, 32, 128)) in grid
    rows = [{"threads": 1, "B": 16, "L": 32768, "Lq": 1, "Hq": 32, "Hk": 32, "D": 128,
             "pattern": "causal", "skipped": "K and V take 16384 MiB"}]
    assert bench.table_cpu(rows).splitlines()[2].endswith("skipped: K and V take 16384 MiB |")
    args = argparse.Namespace(tiny=False, quick=False, thread_list=[1], lengths="1024,8192",
                              lqs="4", batches="1")
    grid = bench._cpu_grid(args)
    assert len(grid) == 2 * 6 and {g[3] for g in grid} == {4} and {g[1] for g in grid} == {1}


@pytest.mark.parametrize("name", ["causal", "window(4096)", "streaming"])
def test_flex_masks_are_the_patterns(bench, name):
    """The rival's mask_mod (one for the three patterns) allows exactly the pattern's keys
    of a decode row."""
    import torch
    import spattn
    L = 9000
    off = torch.tensor(L - 1)
    got = bench._flex_mask(name, off)(0, 0, torch.zeros(1, 1, dtype=torch.int64),
                                      torch.arange(L).view(1, -1))
    want = spattn.compile(bench.PATTERNS[name]).mask(1, L)[0, 0]
    assert torch.equal(got, want)
