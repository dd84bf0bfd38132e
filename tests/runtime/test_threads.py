"""Calls from several threads at once: every output against the float64 reference.

A decode plan's split kernel writes partial outputs that its combine kernel reads; two
threads' steps on one plan must not read each other's (``DecodePlan._stream_parts``). The
Triton interpreter keeps the launch it runs in globals, so interpreted launches take a
lock (``settings.launch_guard``).
"""
import threading
import time

import pytest
import torch

import spattn
from spattn.runtime import decode as dec
from spattn.runtime.reference import pattern_reference

pytestmark = pytest.mark.interpreter


def _run_threads(work, n):
    errors = []

    def guarded(i):
        try:
            work(i)
        except Exception as e:      # noqa: BLE001 -- reported by the test, not the thread
            errors.append(f"thread {i}: {type(e).__name__}: {e}")
    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def _close(o, q, k, v, pat):
    want = pattern_reference(pat, q.double(), k.double(), v.double())[0]
    torch.testing.assert_close(o.double(), want, atol=2e-5, rtol=2e-5)


def test_decode_steps_of_three_threads_on_one_plan(monkeypatch):
    """Threads stepping one decode plan: each step's combine reads its own partials. A
    pause after each split launch hands the interpreter to the other threads there, where
    their steps would overwrite the partials before the combine."""
    launch = dec._launch

    def pausing(bound, kernel, grid, args, free, meta):
        launch(bound, kernel, grid, args, free, meta)
        if free:                    # the split kernel (the combine binds no free ints)
            time.sleep(0.02)
    monkeypatch.setattr(dec, "_launch", pausing)
    pat = spattn.compile("causal & window(64)", backend="triton")
    dec.DECODE_PLANS.clear()

    def work(i):
        g = torch.Generator().manual_seed(i)
        for _ in range(3):
            q = torch.randn(1, 2, 1, 16, generator=g)
            k, v = (torch.randn(1, 2, 300, 16, generator=g) for _ in range(2))
            _close(pat.decode(q, k, v), q, k, v, pat)
    _run_threads(work, 3)
    assert len(dec.DECODE_PLANS) == 1       # the three threads stepped one plan


@pytest.mark.parametrize("src", ["causal & window(16)", "causal & (window(8) | sink(2))"])
def test_interpreted_calls_from_threads(src):
    """Forward, backward and decode steps of one pattern at different lengths from four
    threads, under the interpreter."""
    pat = spattn.compile(src, backend="triton")

    def work(i):
        g = torch.Generator().manual_seed(100 + i)
        L = (32, 48, 64, 40)[i]
        q, k, v = (torch.randn(1, 2, L, 16, generator=g).requires_grad_() for _ in range(3))
        o = pat(q, k, v)
        _close(o.detach(), q.detach(), k.detach(), v.detach(), pat)
        do = torch.randn(o.shape, generator=g)
        o.backward(do)
        ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
        pattern_reference(pat, *ref)[0].backward(do.double())
        for a, b in zip((q, k, v), ref):
            torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-5, rtol=2e-5)
        q1 = torch.randn(1, 2, 1, 16, generator=g)
        _close(pat.decode(q1, k.detach(), v.detach()), q1, k.detach(), v.detach(), pat)
    _run_threads(work, 4)
