"""The generation benchmarks (``benchmarks/hf_generate.py``, ``benchmarks/hf_call.py``,
``benchmarks/decode_padding.py``), tiny, on the CPU: they run, check their outputs and
write their tables."""
import json
import pathlib
import subprocess
import sys

import pytest

_BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def _run(script, *args):
    out = subprocess.run([sys.executable, str(_BENCH / script), *args], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("cache,dtype", [("dynamic", "float32"), ("static", "float32"),
                                         ("dynamic", "bfloat16")],
                         ids=["dynamic-fp32", "static-fp32", "dynamic-bf16"])
def test_hf_generate_tiny(tmp_path, cache, dtype):
    pytest.importorskip("transformers")
    table = _run("hf_generate.py", "--batch", "2", "--prompt", "280", "--new", "3",
                 "--layers", "2", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
                 "--rounds", "1", "--cache", cache, "--dtype", dtype, "--out", str(tmp_path))
    data = json.loads((tmp_path / "hf_generate.json").read_text())
    assert data["rounds"]["spattn"][0]["plans"] == 1         # one decode plan per generation
    assert data["rounds"]["spattn"][0]["decode_calls"] == 2 * 2      # 2 tokens x 2 layers
    if dtype == "float32":
        assert data["generated_tokens_equal_to_sdpa"] == 1.0
    else:
        errors = data["last_logits_error_against_float32"]
        assert set(errors) == {"sdpa", "eager", "spattn"} and errors["spattn"] < 0.1
    assert f"{cache} cache" in table and "| spattn |" in table


@pytest.mark.slow
def test_decode_padding_tiny(tmp_path):
    table = _run("decode_padding.py", "--device", "cpu", "--batch", "2", "--heads", "4/2",
                 "--dim", "32", "--length", "300", "--tokens", "3", "--layers", "2",
                 "--rounds", "1", "--scan", "--out", str(tmp_path))
    data = json.loads((tmp_path / "decode_padding.json").read_text())
    assert set(data["median"]) == {"sdpa", "keep", "first", "first-scan"}
    assert data["plans"]["first"] == 1 and data["plans"]["keep"] == 3
    assert "| first-scan |" in table


@pytest.mark.slow
def test_hf_call_tiny(tmp_path):
    pytest.importorskip("transformers")
    table = _run("hf_call.py", "--batch", "2", "--keys", "300", "--heads", "4", "--kv-heads",
                 "2", "--head-dim", "16", "--rounds", "2", "--calls", "3", "--out", str(tmp_path))
    data = json.loads((tmp_path / "hf_call.json").read_text())
    assert data["max_rel_error"] <= 1e-4 and len(data["us_per_call"]["spattn"]) == 2
    assert "| spattn |" in table
