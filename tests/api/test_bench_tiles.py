"""The launch-configuration benchmarks (``benchmarks/tiles_ab.py``,
``benchmarks/decode_sweep.py``): their ``--cpu-check`` modes, which build, run and compare
every configuration under the interpreter (no timing), so a GPU run does not fail on them."""
import importlib.util
import pathlib
import sys

import pytest

_DIR = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"

pytestmark = pytest.mark.interpreter


def _load(name):
    sys.path.insert(0, str(_DIR))        # tiles_ab imports bench
    try:
        spec = importlib.util.spec_from_file_location(f"spattn_bench_{name}", _DIR / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(_DIR))


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


def test_decode_sweep_cpu_check(monkeypatch, capsys):
    mod = _load("decode_sweep")
    monkeypatch.setattr(sys, "argv", ["decode_sweep.py", "--cpu-check"])
    mod.main(["--cpu-check"])
    cap = capsys.readouterr()
    assert cap.out.count('"err"') == 4 and "Error" not in cap.err, cap.err
