"""A permuted plan's gathers: the CUDA row-gather kernel is loaded once, lazily (no import
on the per-call path, and none at all in a process that only gathers CPU tensors)."""
import sys
import types

import torch

from spattn.runtime import plan as P


class _FakeCuda:
    """Stands in for a CUDA tensor: ``_gather`` sends it to the row-gather kernel."""
    is_cuda = True


def test_cuda_gathers_load_the_kernel_once(monkeypatch):
    loads, calls = [], []
    fake = types.ModuleType("spattn.runtime.gather_kernel")

    def gather_rows(t, index):
        calls.append((t, index))
        return "gathered"
    fake.gather_rows = gather_rows
    real_import = __import__

    def counting_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "gather_kernel" or name.endswith(".gather_kernel"):
            loads.append(name)
        return real_import(name, globals, locals, fromlist, level)
    monkeypatch.setitem(sys.modules, "spattn.runtime.gather_kernel", fake)
    monkeypatch.setattr(P, "_GATHER_ROWS", None)
    monkeypatch.setattr("builtins.__import__", counting_import)
    plan = object.__new__(P.PermutedPlan)
    t, index = _FakeCuda(), torch.arange(4)
    assert [plan._gather(t, index) for _ in range(3)] == ["gathered"] * 3
    assert len(calls) == 3 and all(c[0] is t for c in calls)
    assert len(loads) == 1 and P._GATHER_ROWS is gather_rows


def test_cpu_gathers_need_no_kernel(monkeypatch):
    monkeypatch.setattr(P, "_GATHER_ROWS", None)
    plan = object.__new__(P.PermutedPlan)
    t = torch.randn(2, 3, 5, 4)
    order = torch.tensor([4, 0, 3, 1, 2])
    assert torch.equal(plan._gather(t, order), t[:, :, order])
    rows = torch.stack([order, order.flip(0)])
    got = plan._gather(t, rows)
    assert torch.equal(got[0], t[0][:, order]) and torch.equal(got[1], t[1][:, order.flip(0)])
    assert P._GATHER_ROWS is None
