"""The launch-configuration benchmarks (``benchmarks/tiles_ab.py``,
``benchmarks/decode_sweep.py``): their ``--cpu-check`` modes, which build, run and compare
every configuration under the interpreter (no timing), so a GPU run does not fail on them."""
import re
import sys

import pytest
import torch

from tests.helpers.bench_scripts import load as _load

pytestmark = pytest.mark.interpreter


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_tiles_ab_cpu_check(monkeypatch, kind):
    monkeypatch.setenv("SPATTN_BACKEND", "triton")
    mod = _load("tiles_ab")
    rows = mod.main(["--kind", kind, "--cpu-check"])
    assert len(rows) == len(mod.CHECK_CASES)
    for row in rows:
        cfgs = row["configs"]
        assert set(cfgs) == {"default"} | {c.replace(";", "") for c in
                                           mod.CHECK_CONFIGS[kind].split(";")}, row
        assert all("error" not in c and c["err_vs_default"] < 1e-4 for c in cfgs.values()), row
        tiles = "dK/dV tiles 16x32" if kind == "bwd" else "tiles 16x16"
        assert any(tiles in c["plan"] for c in cfgs.values()), row


@pytest.mark.slow
def test_decode_sweep_cpu_check(monkeypatch, capsys):
    mod = _load("decode_sweep")
    monkeypatch.setattr(sys, "argv", ["decode_sweep.py", "--cpu-check"])
    mod.main(["--cpu-check"])
    cap = capsys.readouterr()
    assert cap.out.count('"err"') == 4 and "Error" not in cap.err, cap.err


@pytest.mark.slow
def test_tiles_ab_dq_ab(monkeypatch):
    """``--dq-ab``: the atomic configurations (8th field) run through the interpreter,
    each plan's backward in the mode its label says, every result equal to the default's;
    the timing loop and the table (f+b / b alone per cell) with a fake timer on CPU."""
    monkeypatch.setenv("SPATTN_BACKEND", "triton")
    mod = _load("tiles_ab")
    rows = mod.main(["--kind", "bwd", "--dq-ab", "--cpu-check"])
    assert [r["case"] for r in rows] == mod.CHECK_DQ_CASES
    for row in rows:
        cfgs = row["configs"]
        assert all("error" not in c and c["err_vs_default"] < 1e-4 for c in cfgs.values()), row
        assert {lb: c["dq"] for lb, c in cfgs.items()} == {
            lb: "atomic" if lb.endswith("atomic") else "kernel" for lb in cfgs}, row
    assert len(mod.parse(mod.DQ_CONFIGS)) == 6 and len(mod.QUICK) == 6
    assert mod.parse("32,64,64,32,4,3,split,atomic")[0][-2:] == ("split", "atomic")
    import triton.testing
    calls = []

    def fake_bench(fn, **kw):
        fn()
        calls.append(fn)
        return 1.0 + 0.1 * len(calls)
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(mod, "setup", lambda check: (2, "cpu", torch.float32))
    configs = mod.parse("16,32,32,16,4,1,split,atomic")
    row = mod.run_case("bwd", "causal:48:1:16", configs, rounds=2, rep=1)
    assert len(calls) == 2 * 2 * 2              # rounds x configs x (f+b, b alone)
    c = row["configs"]["16,32,32,16,4,1,split,atomic"]
    assert c["dq"] == "atomic" and c["vs_default"] > 0 and c["bwd_vs_default"] > 0
    text = mod.table([row], configs)
    assert "| causal:48:1:16 |" in text and " / " in text


@pytest.mark.slow
def test_tiles_ab_empty_fields_keep_the_default(monkeypatch):
    """An empty field of ``--configs`` leaves its variable unset: ``,,,,,,,,1`` is the
    default tiles with ``SPATTN_TMA=1`` (TMA descriptors in the backward kernels too, which
    the interpreter emulates); the result equals the default's."""
    monkeypatch.setenv("SPATTN_BACKEND", "triton")
    monkeypatch.delenv("SPATTN_TMA", raising=False)
    mod = _load("tiles_ab")
    assert mod.parse(",,,,,,,,1") == [(None,) * 8 + (1,)]
    [row] = mod.main(["--kind", "bwd", "--cpu-check", "--cases", "causal:96:1:32",
                      "--configs", ",,,,,,,,1"])
    cfgs = row["configs"]
    assert set(cfgs) == {"default", ",,,,,,,,1"}, row
    assert all("error" not in c and c["err_vs_default"] < 1e-4 for c in cfgs.values()), row
    assert "TMA" not in cfgs["default"]["plan"] and "TMA" in cfgs[",,,,,,,,1"]["plan"], row
    tiles = [re.search(r"dQ tiles \d+x\d+, dK/dV tiles \d+x\d+", c["plan"]).group()
             for c in cfgs.values()]
    assert tiles[0] == tiles[1], tiles
