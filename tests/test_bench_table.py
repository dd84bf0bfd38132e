"""The benchmark's report (``benchmarks/bench.py``): its table and options, on the CPU."""
import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("spattn_bench", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(**kw):
    row = {"pattern": "window(1024)", "N": 16384, "D": 64, "density": 0.0625,
           "strategy": "ranges", "fwd_tflops": 300.0, "flex_fwd_tflops": 200.0}
    row.update(kw)
    return row


@pytest.mark.parametrize("dtype, shown", [("bf16", "| 64 |"), ("fp16", "| 64 fp16 |")],
                         ids=["bf16-plain", "fp16-marked"])
def test_table_marks_non_default_dtype(bench, dtype, shown):
    line = bench.table([_row(dtype=dtype)]).splitlines()[2]
    assert shown in line
    assert "| 1.50 |" in line               # 300 / 200, the forward ratio


def test_table_error_row_keeps_its_dtype(bench):
    line = bench.table([{"pattern": "causal", "N": 4096, "D": 128, "dtype": "fp16",
                         "error": "mismatch vs flex: 1e-1"}]).splitlines()[2]
    assert line.startswith("| causal | 4096 | 128 fp16 | ERROR: mismatch vs flex")


def test_dtype_option_choices(bench):
    assert bench.DTYPES == {"bf16": bench.torch.bfloat16, "fp16": bench.torch.float16}
    with pytest.raises(SystemExit):
        bench.main(["--dtype", "fp32"])      # not a choice: argparse exits before any work
