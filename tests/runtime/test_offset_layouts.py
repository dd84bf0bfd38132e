"""Text tokens before an image grid (a count that is not a multiple of the row length) run
in a layout whose first slots are the text in sequence order and whose other tiles are boxes
of the image: the same outputs and gradients as the float64 reference, in the caller's
order, on the torch backend and on the generated kernels (interpreter)."""
import pytest

import spattn
from spattn.runtime.plan import RemappedPlan
from tests.runtime.test_layouts import _run


def _text_image(T, n, r):
    return (f"k < {T} | (q >= {T} & k >= {T} & abs((q - {T}) // {n} - (k - {T}) // {n}) <= {r}"
            f" & abs((q - {T}) % {n} - (k - {T}) % {n}) <= {r})")


@pytest.mark.parametrize("T,n,r", [(5, 8, 1), (11, 6, 2)],
                         ids=["B2-Hq2-Hk1-L69-D16-fp32-T5-8x8", "B2-Hq2-Hk1-L47-D16-fp32-T11-6x6"])
def test_torch_backend_after_text(T, n, r, monkeypatch):
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.compile(_text_image(T, n, r) + " & k <= q + 20", backend="torch")
    plan = _run(pat, B=2, N=T + n * n)
    assert isinstance(plan, RemappedPlan)
    assert plan.remap.layout.grid.offset == T
    assert f"after {T} tokens" in repr(plan)


@pytest.mark.interpreter
def test_triton_after_text(monkeypatch):
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.compile(_text_image(5, 8, 1), backend="triton")
    plan = _run(pat, Hq=2, Hk=2, N=5 + 64)
    assert isinstance(plan, RemappedPlan) and plan.remap.layout.grid.offset == 5


@pytest.mark.interpreter
@pytest.mark.parametrize("N,src", [
    (30, "L[q] >= L[k] & abs(q // 6 - k // 6) <= 1 & abs(q % 6 - k % 6) <= 1"),
    (27, "L[q] >= L[k] & abs((q - 3) // 6 - (k - 3) // 6) <= 1 | k < 3"),
], ids=["B1-H1-L30-D16-fp32-grid", "B1-H1-L27-D16-fp32-after-text"])
def test_a_list_indexed_by_position_runs_in_sequence_order(N, src, monkeypatch):
    """A list indexed by a position has no layout: padding slots and the slots around the
    extra tokens would index it out of range, which the Triton call's list check refused
    (``SPATTN_LAYOUT=on``)."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    lst = "[" + ", ".join(str(i * 7 % 5) for i in range(N)) + "]"
    pat = spattn.compile(src.replace("L[", lst + "["), backend="triton")
    assert not isinstance(_run(pat, N=N, Hq=1, grads=False), RemappedPlan)
