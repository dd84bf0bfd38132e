"""The host-path benchmark (``benchmarks/host_cpu.py``): a call's host time on the CPU
with the launches stubbed, run tiny here so that it does not break on its first real run."""
import os

import pytest

from tests.helpers.bench_scripts import load


pytestmark = pytest.mark.interpreter


@pytest.fixture(scope="module")
def host_cpu():
    return load("host_cpu")


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_runs_reports_and_restores(host_cpu, tmp_path, capsys, tma):
    from triton.runtime.interpreter import InterpretedFunction
    launch = InterpretedFunction.__getitem__
    before = os.environ.get("SPATTN_TMA")
    res = host_cpu.main(["--calls", "15", "--n", "48", "--patterns", "causal", "documents",
                         "--out", str(tmp_path)] + (["--tma"] if tma else []))
    assert InterpretedFunction.__getitem__ is launch          # the stub is undone
    assert os.environ.get("SPATTN_TMA") == before
    assert set(res) == {"causal", "documents"}
    for r in res.values():
        assert set(r["us"]) == {"fwd", "fwd plan", "f+b", "f+b plan"}
        assert all(t > 0 for t in r["us"].values())
        assert r["layers"]["fwd"]["last-call signature"] > 0  # the memo served the calls
        assert r["layers"]["fwd"]["plan lookup (key + get)"] == 0
        assert r["steps"]["last-call signature (_signature)"] > 0
    out = capsys.readouterr().out
    assert "kernel launches stubbed" in out and "| documents |" in out
    assert (tmp_path / "host_cpu.json").exists()


def test_the_stub_launches_nothing(host_cpu):
    """Inside the stub a call returns without running a kernel (its output is whatever
    torch.empty held); outside it the kernels run again."""
    import torch
    import spattn
    pat = spattn.compile("causal", backend="triton")
    q, k, v = (torch.randn(1, 1, 32, 16) for _ in range(3))
    ran = []
    with host_cpu.stub_launches():
        from triton.runtime.interpreter import InterpretedFunction
        real_run = InterpretedFunction.run
        InterpretedFunction.run = lambda *a, **k: ran.append(1)
        try:
            pat(q, k, v)
        finally:
            InterpretedFunction.run = real_run
    assert ran == []
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(pat(q, k, v), ref, atol=1e-5)


def test_host_gpu_split_loads_and_names_known_patterns():
    """``benchmarks/host_gpu_split.py`` (GPU only) loads without a GPU, and its default
    patterns are the benchmark suite's."""
    split = load("host_gpu_split")
    bench = load("bench")
    import inspect
    defaults = inspect.signature(split.main).parameters
    assert "argv" in defaults
    src = inspect.getsource(split.main)
    for name in ("causal", "window(256)", "documents"):
        assert f'"{name}"' in src and name in bench.PATTERNS
