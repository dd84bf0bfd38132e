"""``benchmarks/documents.py``: the driver on the CPU (``--cpu --tiny``: fresh processes,
interleaved or one after the other; checks against Flex's forward and SDPA's gradients,
JSON and table), and its summary logic (ratios, spread across processes, the issue's bars)
on fabricated rows."""
import json

import pytest

from tests.helpers.bench_scripts import load


@pytest.fixture(scope="module")
def documents():
    return load("documents")


def test_must_show_set(documents):
    assert documents.LENGTHS == [4096, 16384, 65536]
    assert documents.DOCS == [1, 4, 20, 100, 1000]
    assert documents.SOURCE == "causal & same(doc)"
    import torch
    ids = documents.doc_ids(4096, 1000, "cpu")
    assert ids[0] == 0 and ids[-1] == 999 and bool((ids.diff() >= 0).all())
    assert torch.equal(ids, documents.doc_ids(4096, 1000, "cpu"))   # the same every process
    assert int(documents.doc_ids(4096, 1, "cpu").max()) == 0


def _row(N, n, proc, fwd, flex_fwd, fb, flex_fb, stage="fwd A"):
    return {"N": N, "docs": n, "proc": proc, "fwd_ms": fwd, "flex_fwd_ms": flex_fwd,
            "fwd_ratio": flex_fwd / fwd, "fwdbwd_ms": fb, "flex_fwdbwd_ms": flex_fb,
            "fwdbwd_ratio": flex_fb / fb, "fwd_stage": stage, "bwd_stage": "bwd A"}


def test_summary_ratios_spread_and_bars(documents):
    per_proc = [
        [_row(4096, 4, 0, 1.00, 1.20, 3.0, 3.6), _row(4096, 20, 0, 1.0, 1.5, 2.0, 3.0)],
        [_row(4096, 4, 1, 1.02, 1.20, 3.0, 3.2, stage="fwd B"),
         _row(4096, 20, 1, 1.1, 1.5, 2.0, 3.0)],
        [_row(4096, 4, 2, 1.01, 1.20, 3.0, 3.6)],                  # 4096 x 20 missing
    ]
    s4, s20 = documents.summarise(per_proc, 3)
    assert s4["fwd_spread"] == pytest.approx(0.02) and s4["fwd_ok"]     # >= 1.1x, <= 5%
    assert s4["fwdbwd_min_ratio"] == pytest.approx(3.2 / 3.0) and not s4["fwdbwd_ok"]
    assert s4["fwd_stages"] == ["fwd A", "fwd B"] and s4["missing"] == 0
    assert s20["missing"] == 1 and not s20["fwd_ok"]
    assert s20["fwd_spread"] == pytest.approx(0.1)
    table = documents.table([s4, s20])
    assert "| 4096 | 4 | 1.000/1.020/1.010 | 2.0% |" in table
    assert "fwd:ok fwdbwd:NO" in table and "| missing |" in table


def test_summary_of_calls_replayed_from_graphs(documents):
    """With ``--graphs`` the rows also hold the replayed calls' times: they get their own
    ratios, spreads and bars and a second table; without them there is one table."""
    def row(proc, g, flex_g):
        r = _row(4096, 4, proc, 1.0, 1.2, 3.0, 3.6)
        r.update({"graph_fwd_ms": g, "flex_graph_fwd_ms": flex_g, "graph_fwdbwd_ms": 2 * g,
                  "flex_graph_fwdbwd_ms": 2 * flex_g})
        documents.ratios(r)
        return r
    s, = documents.summarise([[row(0, 0.50, 0.60)], [row(1, 0.51, 0.60)],
                              [row(2, 0.60, 0.60)]], 3)
    assert s["graph_fwd_ratio"] == [pytest.approx(1.2), pytest.approx(0.6 / 0.51), 1.0]
    assert s["graph_fwd_spread"] == pytest.approx(0.2) and not s["graph_fwd_ok"]
    assert s["fwd_ok"] and s["graph_fwdbwd_min_ratio"] == pytest.approx(1.0)
    table = documents.table([s])
    eager, replayed = table.split("Replayed from CUDA graphs")
    assert "| 4096 | 4 | 1.000/1.000/1.000 |" in eager
    assert "| 4096 | 4 | 0.500/0.510/0.600 | 20.0% | 0.600/0.600/0.600 | 1.00x |" in replayed
    assert "graph_fwd:NO graph_fwdbwd:NO" in replayed
    plain, = documents.summarise([[_row(4096, 4, 0, 1.0, 1.2, 3.0, 3.6)]], 1)
    assert "graph_fwd_ms" not in plain
    assert "Replayed" not in documents.table([plain])
    with pytest.raises(SystemExit):
        documents.main(["--out", "x", "--cpu", "--graphs"])


@pytest.mark.slow
@pytest.mark.parametrize("schedule,rounds", [("interleaved", 2), ("sequential", 1)])
def test_cpu_driver_runs_fresh_processes(documents, tmp_path, capsys, schedule, rounds):
    rc = documents.main(["--out", str(tmp_path), "--cpu", "--tiny", "--procs", "2",
                         "--lengths", "64", "--docs", "1", "4", "--rounds", str(rounds),
                         "--schedule", schedule])
    assert rc == 0
    data = json.loads((tmp_path / "documents.json").read_text())
    assert data["meta"]["schedule"] == schedule
    assert [r["rc"] for r in data["meta"]["runs"]] == [0, 0]
    assert len(data["processes"]) == 2
    for rows in data["processes"]:
        assert [(r["N"], r["docs"]) for r in rows] == [(64, 1), (64, 4)]
        for r in rows:
            assert "error" not in r, r
            assert r["rel_err_vs_flex"] < 1e-4 and r["grad_rel_err_vs_rival"] < 1e-4
            assert r["fwd_ms"] > 0 and r["flex_fwdbwd_ms"] > 0 and r["fwd_ratio"] > 0
            for name in ("fwd", "flex_fwd", "fwdbwd", "flex_fwdbwd"):
                assert len(r[name + "_ms_rounds"]) == rounds
    assert [(s["N"], s["docs"]) for s in data["summary"]] == [(64, 1), (64, 4)]
    assert all(s["fwd_spread"] is not None for s in data["summary"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("| N | docs | fwd ms (per process)")
