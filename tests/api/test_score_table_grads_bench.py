"""benchmarks/score_table_grads.py's CPU mode (the Triton interpreter, tiny shapes): every
variant runs, the JSON is written, and its accuracy rows say what the fp32 delta gains."""
import json
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.interpreter
def test_score_table_grads_benchmark_dry_run(capsys, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import score_table_grads
    code = score_table_grads.main(["--dry", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[0].startswith("| variant | fwd+bwd ms |")
    result = json.loads((tmp_path / "score_table_grads.json").read_text())
    acc, rel = result["accuracy"], result["relative_bias"]
    assert rel["deterministic_on_triton"] and rel["deterministic_bit_identical"]
    assert rel["deterministic_vs_atomic_rel_diff"] < 1e-5
    assert acc["rounded_rel_err"] > 1e-3 > 1e-5 > max(acc["exact_rel_err"],
                                                        acc["deterministic_rel_err"])
    assert acc["deterministic_bit_identical"]
