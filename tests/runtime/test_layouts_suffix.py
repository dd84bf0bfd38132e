"""Extra tokens after a grid at run time (an image then text; text, an image, then text):
the call runs in a layout with the extra tokens in sequence order around the boxes
(``RemappedPlan``) and agrees with the float64 reference in the caller's order, forward
and backward, on the torch backend and the generated Triton kernels (interpreter), GQA,
grids the boxes do not divide; ``explain()`` shows the layout."""
import pytest
import torch

import spattn
from spattn.runtime.plan import RemappedPlan
from tests.runtime.test_layouts import _run

# text (T tokens, seen by all), a 6 x 10 image (3 x 3 windows), text (U tokens, causal)
AROUND = """param T = 5
param U = 7
grid (row: 6, col: 10) after T before U
pattern p = k < T | (q >= T + 60 & k <= q)
    | (q >= T & k >= T & k < T + 60 & abs(row(q) - row(k)) <= 1 & abs(col(q) - col(k)) <= 1)
"""


def _around_mask(T, H, W, U):
    """The mask of ``AROUND``, written out token by token."""
    N = T + H * W + U
    m = torch.zeros(N, N, dtype=torch.bool)
    for i in range(N):
        for j in range(N):
            if j < T or (i >= T + H * W and j <= i):
                m[i, j] = True
            elif T <= i < T + H * W and T <= j < T + H * W:
                (ri, ci), (rj, cj) = divmod(i - T, W), divmod(j - T, W)
                m[i, j] = abs(ri - rj) <= 1 and abs(ci - cj) <= 1
    return m


def _check_layout(plan, T, U):
    assert isinstance(plan, RemappedPlan)
    layout = plan.remap.layout
    assert (layout.grid.offset, layout.grid.suffix) == (T, U)
    order = plan.order.cpu()
    N = T + layout.grid.size + U
    assert torch.equal(order[layout.suffix_start:], torch.arange(N - U, N))   # text last
    return layout


@pytest.mark.parametrize("B,Hq,Hk", [(1, 2, 1), (2, 3, 3)],
                         ids=["B1-Hq2-Hk1-L72-D16-fp32", "B2-Hq3-Hk3-L72-D16-fp32"])
def test_torch_backend_around_a_declared_grid(B, Hq, Hk, monkeypatch):
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.compile(AROUND, backend="torch")
    assert torch.equal(pat.mask(72, 72)[0, 0], _around_mask(5, 6, 10, 7))
    plan = _run(pat, B=B, Hq=Hq, Hk=Hk, N=72, seed=B)
    layout = _check_layout(plan, 5, 7)
    assert any(n % b for n, b in zip(layout.grid.shape, layout.box_by_axis()))


@pytest.mark.parametrize("T,U", [(0, 9), (3, 20)], ids=["B1-Hq2-Hk1-L73-D16-fp32-image-text",
                                                        "B1-Hq2-Hk1-L87-D16-fp32-text-image-text"])
def test_flattened_pattern_with_text_after_the_image(T, U, monkeypatch):
    """No declaration: discovery finds the 8 x 8 grid from ``// 8``, ``% 8`` and where the
    ranges of q and k flip."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    E = T + 64
    src = (f"k < {T} | (q >= {E} & k <= q) | (q >= {T} & k >= {T} & k < {E} & "
           f"abs((q - {T}) // 8 - (k - {T}) // 8) <= 1 & abs((q - {T}) % 8 - (k - {T}) % 8) "
           "<= 2)")
    pat = spattn.compile(src, backend="torch")
    assert pat.grid is None
    _check_layout(_run(pat, N=E + U), T, U)


@pytest.mark.interpreter
def test_triton_around_a_declared_grid(monkeypatch):
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.compile(AROUND, backend="triton")
    layout = _check_layout(_run(pat, Hq=2, Hk=1, N=72, seed=5), 5, 7)
    assert any(n % b for n, b in zip(layout.grid.shape, layout.box_by_axis()))


def test_explain_shows_the_tokens_around_the_grid():
    pat = spattn.compile(AROUND, backend="torch")
    rep = pat.explain(72)
    assert rep.layout["extra_before"] == 5 and rep.layout["extra_after"] == 7
    assert rep.layout["grid"] == [6, 10]
    assert "grid 6 x 10 after 5 tokens before 7 tokens, tiles of" in str(rep)


@pytest.mark.parametrize("T,U", [(3, 6), (0, 11)],
                         ids=["B1-Hq2-Hk1-L79-D16-fp32-T3-U6", "B1-Hq2-Hk1-L81-D16-fp32-U11"])
def test_neighborhood_with_extra_tokens_remapped(T, U, monkeypatch):
    """``spattn.neighborhood(..., extra_before=T, extra_after=U)`` on a 7 x 10 grid (sides
    the boxes do not divide), strided: runs in its layout, exact forward and backward."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.neighborhood((7, 10), (3, 5), stride=(1, 2), extra_before=T, extra_after=U,
                              backend="torch")
    plan = _run(pat, N=T + 70 + U, seed=T)
    layout = _check_layout(plan, T, U)
    assert any(n % b for n, b in zip(layout.grid.shape, layout.box_by_axis()))


def test_example_text_image_text(monkeypatch):
    """``examples/patterns/text_image_text.spattn`` runs in its layout, exact."""
    from pathlib import Path
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    path = Path(__file__).resolve().parents[2] / "examples" / "patterns" / "text_image_text.spattn"
    pat = spattn.load(path, backend="torch")
    _check_layout(_run(pat, N=60, seed=7), 5, 7)


def test_declared_grid_whose_end_the_pattern_does_not_show(monkeypatch):
    """``before 5`` and a pattern that never compares with the grid's end (the 5 tokens
    after the 8 x 8 grid read as a ninth row): no grid divides 69 tokens, the declared one
    is the layout, exact."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.compile("grid (y: 8, x: 8) before 5 abs(y(q) - y(k)) <= 1 & "
                         "abs(x(q) - x(k)) <= 2", backend="torch")
    _check_layout(_run(pat, N=69, seed=11), 0, 5)
