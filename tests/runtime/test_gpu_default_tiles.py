"""The GPU's default launch configurations under the interpreter.

The CPU tests run the Triton kernels at the interpreter's own small tiles; the GPU runs
``codegen.config.default_tiles`` / ``default_bwd_tiles`` for 16-bit D <= 128 (64 x 64
forward tiles, 64 x 32 with 2 stages for a score with per-pair table loads; 32 x 64 dK/dV
and 64 x 32 dQ tiles). These cases force those tile shapes
through the ``SPATTN_*`` overrides and check o, lse, dq, dk and dv (and a learned table's
gradient) element by element against the float64 reference, on lengths no tile divides,
with grouped heads, runtime inputs, scores and a token layout.
"""
import pytest
import torch

import spattn
from spattn.codegen.config import default_bwd_tiles, default_tiles, score_pair_loads
from spattn.runtime.reference import pattern_reference

pytestmark = pytest.mark.interpreter

FWD = default_tiles(128, "bf16", interpret=False)
#: the forward's default for a score with per-pair table loads (a learned relative bias)
FWD_PAIR = default_tiles(128, "bf16", interpret=False, pair_loads=True)
FWD_VARS = ("SPATTN_BLOCK_M", "SPATTN_BLOCK_N", "SPATTN_FWD_WARPS", "SPATTN_FWD_STAGES")
BWD = default_bwd_tiles(128, "bf16", interpret=False)


@pytest.fixture
def gpu_tiles(monkeypatch):
    monkeypatch.setenv("SPATTN_BACKEND", "triton")
    monkeypatch.setenv("SPATTN_AUTOTUNE", "0")
    for name, value in zip(FWD_VARS, FWD):
        monkeypatch.setenv(name, str(value))
    for name, value in zip(("SPATTN_BWD_BLOCK_M1", "SPATTN_BWD_BLOCK_N1",
                            "SPATTN_BWD_BLOCK_M2", "SPATTN_BWD_BLOCK_N2", "SPATTN_BWD_WARPS",
                            "SPATTN_BWD_STAGES"), BWD):
        monkeypatch.setenv(name, str(value))


def _doc(L, g):
    return (torch.rand(L, generator=g) < 0.03).cumsum(0)


CASES = [
    ("causal", lambda L, g: {}, None, 1),
    ("causal & window(45)", lambda L, g: {}, None, 2),
    ("causal & same(doc)", lambda L, g: {"doc": _doc(L, g)}, None, 2),
    ("causal", lambda L, g: {}, "alibi(alibi_slope)", 1),
    ("causal & window(60)", lambda L, g: {"rel": torch.randn(2, 60, generator=g)
                                          .requires_grad_()},
     "s + rel[h % 2, clamp(q - k, 0, 59)]", 2),
]


@pytest.mark.parametrize("src,make,score,group", CASES,
                         ids=["causal", "window-gqa", "documents-gqa", "alibi", "rel-table"])
def test_default_gpu_tiles_match_reference(gpu_tiles, monkeypatch, src, make, score, group):
    g = torch.Generator().manual_seed(7)
    B, Hk, L, D = 1, 2, 141, 32
    pat = spattn.compile(src, score=score) if score else spattn.compile(src)
    fwd = FWD_PAIR if score_pair_loads(pat) else FWD
    for name, value in zip(FWD_VARS, fwd):
        monkeypatch.setenv(name, str(value))
    q = torch.randn(B, Hk * group, L, D, generator=g).requires_grad_()
    k, v = (torch.randn(B, Hk, L, D, generator=g).requires_grad_() for _ in range(2))
    ins = make(L, g)
    plan = repr(pat.plan(q, k, v, backward=True, **ins))
    assert f"tiles {fwd[0]}x{fwd[1]}, {fwd[2]} warps" in plan, plan
    assert f"dQ tiles {BWD[2]}x{BWD[3]}, dK/dV tiles {BWD[0]}x{BWD[1]}" in plan, plan
    o, lse = pat(q, k, v, return_lse=True, **ins)
    do = torch.randn(o.shape, generator=g)
    tables = [t for t in ins.values() if t.requires_grad]
    grads = torch.autograd.grad(o, (q, k, v, *tables), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ins64 = {n: (t.detach().double().requires_grad_() if t.is_floating_point() else t)
             for n, t in ins.items()}
    ro, rl = pattern_reference(pat, q64, k64, v64, **ins64)
    t64 = [t for t in ins64.values() if t.requires_grad]
    want = torch.autograd.grad(ro, (q64, k64, v64, *t64), do.double())
    torch.testing.assert_close(o.double(), ro, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), rl, rtol=1e-4, atol=1e-4)
    for name, a, b in zip(("dq", "dk", "dv", "table"), grads, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_default_gpu_tiles_layout(gpu_tiles, monkeypatch):
    """A 2-D neighbourhood in its token layout (boxes, gathers) at the GPU's tiles."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    g = torch.Generator().manual_seed(3)
    pat = spattn.neighborhood((12, 11), (5, 3))
    q, k, v = (torch.randn(1, 2, 132, 32, generator=g).requires_grad_() for _ in range(3))
    o = pat(q, k, v)
    do = torch.randn(o.shape, generator=g)
    grads = torch.autograd.grad(o, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, _ = pattern_reference(pat, q64, k64, v64)
    want = torch.autograd.grad(ro, (q64, k64, v64), do.double())
    torch.testing.assert_close(o.double(), ro, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grad,layout", [(True, False), (False, False), (True, True),
                                         ("table", False)],
                         ids=["training", "inference", "training-token-layout",
                              "training-learned-table-only"])
def test_default_gpu_tiles_one_classification(gpu_tiles, monkeypatch, grad, layout):
    """A training step at the GPU's tiles classifies once, at the common divisor of the
    forward's 64 x 64 and the backward's 32 x 64 / 64 x 32 (each kernel's tables pooled from
    it), in sequence order, in a token layout (whose inner plan is built on stand-ins) and
    where the only gradient is a learned score table's; a forward alone classifies at its
    own tiles."""
    g = torch.Generator().manual_seed(5)
    if layout:
        monkeypatch.setenv("SPATTN_LAYOUT", "on")
        pat, ins = spattn.neighborhood((15, 14), (5, 3)), {}
    elif grad == "table":
        pat = spattn.compile("causal & same(doc)", score="s + rel[h, clamp(q - k, 0, 31)]")
        ins = {"doc": _doc(210, g), "rel": torch.randn(2, 32, generator=g).requires_grad_()}
    else:
        pat, ins = spattn.compile("causal & same(doc)"), {"doc": _doc(210, g)}
    q, k, v = (torch.randn(1, 2, 210, 32, generator=g).requires_grad_(grad is True)
               for _ in range(3))
    plan = pat.plan(q, k, v, backward=bool(grad), **ins)
    assert ("slot order" in repr(plan)) == layout, repr(plan)
    step = [(FWD[0], FWD[1])] + ([(BWD[2], BWD[3]), (BWD[0], BWD[1])] if grad else [])
    common = tuple(min(64, *(t[i] for t in step)) for i in (0, 1))
    assert list(plan.call.analysis.fine) == [common], repr(plan)
    if grad != "table":
        assert len(plan.call.analysis.built) == (6 if grad else 2), repr(plan)
