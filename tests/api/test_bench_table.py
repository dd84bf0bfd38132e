"""The benchmark's report (``benchmarks/bench.py``): its table and options, on the CPU."""

import pytest

from tests.helpers.bench_scripts import load


@pytest.fixture(scope="module")
def bench():
    return load("bench")


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
    assert line.startswith("| causal | 1 | 4096 | 128 fp16 | ERROR: mismatch vs flex")


def test_dtype_option_choices(bench):
    assert bench.DTYPES == {"bf16": bench.torch.bfloat16, "fp16": bench.torch.float16}
    with pytest.raises(SystemExit):
        bench.main(["--dtype", "fp32"])      # not a choice: argparse exits before any work


class _Clock:
    """A fake ``bench_ms``: records the order of the calls, reads each name's times."""

    def __init__(self, times, fail=()):
        self.times = {n: list(t) for n, t in times.items()}
        self.fail = set(fail)
        self.order = []

    def timed(self):
        return {n: ((lambda n=n: n), None) for n in self.times}

    def __call__(self, fn, grad_to_none=None):
        n = fn()
        self.order.append(n)
        if n in self.fail:
            raise RuntimeError("CUDA out of memory")
        return self.times[n].pop(0)


def test_time_rounds_alternate_and_take_medians(bench):
    clock = _Clock({"fwd": [1.0, 1.2, 1.1], "flex_fwd": [2.0, 2.6, 2.2],
                    "fwdbwd": [3.0, 3.3, 3.1], "flex_fwdbwd": [4.0, 4.1, 4.4]})
    row = {}
    bench.time_rounds(row, clock.timed(), 3, bench=clock)
    # forwards first; the order flips every round
    assert clock.order == ["fwd", "flex_fwd", "flex_fwd", "fwd", "fwd", "flex_fwd",
                           "fwdbwd", "flex_fwdbwd", "flex_fwdbwd", "fwdbwd", "fwdbwd",
                           "flex_fwdbwd"]
    assert (row["fwd_ms"], row["flex_fwd_ms"], row["fwdbwd_ms"], row["flex_fwdbwd_ms"]) == \
        (1.1, 2.2, 3.1, 4.1)
    assert row["flex_fwd_ms_rounds"] == [2.0, 2.6, 2.2]
    bench._rates(row, flops_f=1e12)
    assert row["fwd_tflops"] == pytest.approx(1e12 / 1.1e-3 / 1e12)
    assert row["fwdbwd_tflops"] == pytest.approx(3.5e12 / 3.1e-3 / 1e12)


def test_time_rounds_one_at_a_time_keep_flipping(bench):
    """A caller timing one round per call (``documents.py``'s interleaved processes) passes
    each round's number as ``first``: round 1 times Flex first, as in one call of 2."""
    clock = _Clock({"fwd": [1.0, 1.2], "flex_fwd": [2.0, 2.6]})
    for r in range(2):
        bench.time_rounds({}, clock.timed(), 1, bench=clock, groups=(("fwd", "flex_fwd"),),
                          first=r)
    assert clock.order == ["fwd", "flex_fwd", "flex_fwd", "fwd"]


def test_time_rounds_drop_flex_when_it_fails(bench):
    clock = _Clock({"fwd": [1.0, 1.0, 1.0], "flex_fwd": [2.0, 2.0, 2.0],
                    "fwdbwd": [3.0, 3.0, 3.0], "flex_fwdbwd": [0.0]}, fail={"flex_fwdbwd"})
    row = {}
    bench.time_rounds(row, clock.timed(), 3, bench=clock)
    assert "out of memory" in row["flex_error"]
    assert "flex_fwdbwd_ms" not in row and row["fwdbwd_ms"] == 3.0
    assert clock.order.count("flex_fwdbwd") == 1 and clock.order.count("fwdbwd") == 3


def test_time_rounds_spattn_errors_propagate(bench):
    clock = _Clock({"fwd": [1.0], "flex_fwd": [2.0]}, fail={"fwd"})
    with pytest.raises(RuntimeError, match="out of memory"):
        bench.time_rounds({}, clock.timed(), 3, bench=clock)


@pytest.mark.parametrize("ndocs", [1, 4, 20, 100, 1000],
                         ids=[f"documents{n}" for n in (1, 4, 20, 100, 1000)])
def test_named_only_document_patterns(bench, ndocs):
    """``documents1`` to ``documents1000`` (run only when named) hold that many sorted
    documents, and the suite's default list leaves them out."""
    name = f"documents{ndocs}"
    assert name in bench.EXTRA and name in bench.PATTERNS
    src, _, mask_mod, inputs = bench.PATTERNS[name]
    doc = inputs(4096, "cpu")["doc"]
    assert doc.unique().numel() == ndocs and bool((doc[1:] >= doc[:-1]).all())
    assert src == bench.PATTERNS["documents"][0]
    assert name not in bench.default_names() and name not in bench.default_names(quick=True)
