"""``benchmarks/headorder.py`` on the CPU (``--cpu``: tiny lengths): both problems run in a
per-head key order and in sequence order, match the float64 reference (outputs and
gradients) and write their JSON and table."""
import json

from tests.helpers.bench_scripts import load


def test_cpu_run_writes_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPATTN_AUTOTUNE", "0")      # restored after the run sets it
    monkeypatch.delenv("SPATTN_LAYOUT", raising=False)
    mod = load("headorder")
    assert mod.main(["--out", str(tmp_path), "--cpu", "--rounds", "1"]) == 0
    rows = json.loads((tmp_path / "headorder.json").read_text())["rows"]
    assert [r["problem"] for r in rows] == ["per-head", "s2-stripes8"]
    for r in rows:
        assert "error" not in r and r["order"].startswith("per-head key order")
        assert r["order_rel_err"] < 1e-4 and r["seq_rel_err"] < 1e-4
        assert r["order_fwd_ms"] > 0 and r["seq_fwdbwd_ms"] > 0
    assert "| per-head | class h == k % H first |" in capsys.readouterr().out
    # the GPU problems are the brief's: bench.py's per-head row and S2's stripes of 8 keys
    assert mod.PROBLEMS["per-head"][0] == "causal & (q - k < 1024 | k % H == h)"
    assert mod.PROBLEMS["s2-stripes8"][0] == "causal & (q - k < 512 | (k // 8) % H == h)"
