"""Nesting depth: a pattern as deep as :data:`ir.lower.MAX_DEPTH` (a score as deep as
``MAX_SCORE_DEPTH``) runs every stage on both backends, forward and backward, from a caller
already 150 frames (a score: 250) deep; one level more is a ``SpattnValueError`` at compile time,
never a ``RecursionError`` from a pass (the printer, the analysis, the code generator,
sympy's derivative)."""
import pytest
import torch

import spattn
from spattn.dsl.errors import SpattnValueError
from spattn.ir.lower import MAX_DEPTH, MAX_SCORE_DEPTH
from spattn.ir.nodes import depth
from spattn.runtime.reference import pattern_reference

MASKS = {
    "mod-add": lambda e, i: f"({e}) % {97 + i} + 1",
    "if-chain": lambda e, i: f"(if h == {i % 3} & k % {i + 2} != 0 then window({i + 2}) else {e})",
    "abs-min": lambda e, i: f"abs(min({e}, q + {i}) - k)",
}
MASK_ROOT = {"mod-add": ("q - k", "({e}) % 3 == 0"), "if-chain": ("causal", "{e}"),
             "abs-min": ("q", "{e} <= 40")}
SCORES = {
    "softplus": lambda e, i: f"log(1.0 + exp({e}))",
    "softcap": lambda e, i: f"tanh(({e}) / {20 + i}.0) * {20 + i}.0",
    "select": lambda e, i: f"(if k % {i + 2} == 0 then ({e}) * 0.5 else s - 0.25)",
}


def _deepest(step, root, wrap, limit, score=False):
    """The source of ``step`` applied as often as compiles within ``limit``, and its depth."""
    e, best = root, None
    for i in range(limit):
        e = step(e, i)
        src = wrap.format(e=e)
        try:
            p = spattn.compile("causal", score=src) if score else spattn.compile(src)
        except SpattnValueError as err:
            assert "nested too deeply" in str(err), err
            break
        best = (src, depth(p.score if score else p.ir))
    return best


def _in_deep_stack(frames, fn):
    """``fn()`` called ``frames`` Python frames below here (a caller's own deep stack)."""
    return fn() if frames == 0 else _in_deep_stack(frames - 1, fn)


def _run(p, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 3, 40, 16, generator=g).requires_grad_() for _ in range(3))
    do = torch.randn(1, 3, 40, 16, generator=g)
    o = p(q, k, v)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ro, _ = pattern_reference(p, qd, kd, vd)
    want = torch.autograd.grad(ro, (qd, kd, vd), do.double())
    for got, ref in zip((o, dq, dk, dv), (ro, *want)):
        torch.testing.assert_close(got.double(), ref, atol=2e-4, rtol=2e-3)


@pytest.fixture
def interpret(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path))


@pytest.mark.parametrize("kind", list(MASKS))
def test_deepest_mask_runs_everywhere(interpret, kind):
    root, wrap = MASK_ROOT[kind]
    src, d = _deepest(MASKS[kind], root, wrap, MAX_DEPTH)
    assert MAX_DEPTH - 8 < d <= MAX_DEPTH, d
    for backend in ("torch", "triton"):
        p = spattn.compile(src, backend=backend)
        _in_deep_stack(150, lambda: (p.explain(40), _run(p, seed=d)))


@pytest.mark.parametrize("kind", list(SCORES))
def test_deepest_score_runs_everywhere(interpret, kind):
    src, d = _deepest(SCORES[kind], "s", "{e}", MAX_SCORE_DEPTH, score=True)
    assert MAX_SCORE_DEPTH - 8 < d <= MAX_SCORE_DEPTH, d
    for backend in ("torch", "triton"):
        p = spattn.compile("causal & window(20)", score=src, backend=backend)
        _in_deep_stack(250, lambda: _run(p, seed=d))


@pytest.mark.parametrize("levels", [66, 80, 120, 150, 199, 260])
def test_too_deep_is_located_error(levels):
    e = "q - k"
    for i in range(levels):
        e = f"({e}) % 97 + 1"
    with pytest.raises(SpattnValueError, match="nested too deeply") as info:
        spattn.compile(f"({e}) % 3 == 0")
    assert info.value.line == 1


def test_too_deep_score_and_composition():
    e = "s"
    for _ in range(MAX_SCORE_DEPTH):
        e = f"log(1.0 + exp({e}))"
    with pytest.raises(SpattnValueError, match="score nested too deeply") as info:
        spattn.compile("causal", score=e)
    assert (info.value.line, info.value.column) == (3, 1)       # at the score, not the mask
    with pytest.raises(SpattnValueError, match="score nested too deeply") as info:
        spattn.compile(f"pattern p = causal & window(4) score {e}\n")
    assert (info.value.line, info.value.column) == (1, 38)
    src, d = _deepest(MASKS["abs-min"], "q", "{e} <= 40", MAX_DEPTH)
    p = spattn.compile(src)
    deeper = p
    with pytest.raises(SpattnValueError, match="pattern nested too deeply"):
        for _ in range(MAX_DEPTH - d + 1):
            deeper = ~(deeper & spattn.compile("k % 3 != 0"))
