"""Generated kernels for masks that are uniform along a tile loop, under TRITON_INTERPRET=1.

The forward and dQ kernels loop over key tiles, dK/dV over query tiles; the part of the
predicate that does not depend on the loop's variable is computed once per program (per
head in dK/dV) and passed to the tile loop.  When that is the whole predicate -- a mask
of q alone in the forward and dQ, of k alone in dK/dV, of heads and batches alone, or a
constant -- the tile loop receives ``m_pattern`` itself.  Forward and backward against
the float64 reference, every element, for every loop variant, strategy and TMA setting.
"""
import pytest
import torch

from spattn.runtime import triton_backend as tb

from tests.helpers.kernels import (analysis_cf, check_close, check_lse, compile_pattern,
                                   rand_qkv, reference, trivial_cf)

pytestmark = pytest.mark.interpreter

TOL = 1e-3
#: L is not a multiple of the tiles: the ragged last tile is PARTIAL under every strategy, so
#: the predicate runs even where the mask is uniform over whole tiles (h == 1, constants)
H, L, D = 2, 36, 16

#: (forward loop, backward loop, TMA): each loop of either kind with and without TMA (the
#: persistent forward always runs pointer loads).
VARIANTS = [("split", "split", False), ("split", "fused", True), ("fused", "split", True),
            ("fused", "fused", False), ("persistent", "split", False),
            ("persistent", "fused", True)]


def run(src, strategy, fwd_loop, bwd_loop, tma, q_offset=0, Bn=1):
    """Forward with ``fwd_loop``, backward with ``bwd_loop``: outputs, lse and gradients
    against the float64 reference."""
    pattern = compile_pattern(src)
    q, k, v = rand_qkv(Bn, H, H, L, L, D, seed=len(src))
    gen = torch.Generator().manual_seed(len(src) + 1)
    do = torch.randn(Bn, H, L, D, generator=gen)
    scale = D ** -0.5
    cf = (analysis_cf(pattern) or trivial_cf()) if strategy == "ranges" else None
    opts = dict(strategy=strategy, block_m=16, block_n=16, closed_form=cf, tma=tma)
    o, lse = tb.fwd(pattern, q, k, v, scale=scale, q_offset=q_offset, inputs={}, loop=fwd_loop,
                    **opts)
    dq, dk, dv = tb.bwd(pattern, q, k, v, o, lse, do, scale=scale, q_offset=q_offset,
                        inputs={}, loop=bwd_loop, **opts)
    ref_o, ref_lse, (qd, kd, vd), _ = reference(pattern, q, k, v, scale=scale,
                                                q_offset=q_offset, inputs={}, grad=True)
    ref_o.backward(do.double())
    check_close("o", o, ref_o.detach(), TOL)
    check_lse(lse, ref_lse.detach())
    check_close("dq", dq, qd.grad, TOL)
    check_close("dk", dk, kd.grad, TOL)
    check_close("dv", dv, vd.grad, TOL)


def _vid(v):
    return f"fwd-{v[0]}-bwd-{v[1]}-{'tma' if v[2] else 'ptr'}"


@pytest.mark.parametrize("strategy", ["ranges", "table"])
@pytest.mark.parametrize("variant", VARIANTS, ids=[_vid(v) for v in VARIANTS])
@pytest.mark.parametrize("src", ["q >= 3", "k >= 5"], ids=["only-q", "only-k"])
def test_one_axis(src, variant, strategy):
    """A mask of q alone is hoisted whole in the forward and dQ kernels, one of k alone in
    dK/dV: every loop variant, strategy and TMA setting."""
    run(src, strategy, *variant)


# (id, source, batch): one strategy and variant each, taken in turn
CASES = [
    ("q-ne", "q != 27", 1),
    ("q-mod", "q % 2 == 0", 1),
    ("k-lt", "k < 21", 1),
    ("h", "h == 1", 1),
    ("b", "b < 1", 2),
    ("h-b", "(h + b) % 2 == 0", 2),
    ("true", "full", 1),
    ("folded-true", "q - q == 0", 1),
    ("false", "q - q == 1", 1),
]


@pytest.mark.parametrize("i,name,src,Bn", [(i, *c) for i, c in enumerate(CASES)],
                         ids=[f"B{c[2]}-H{H}-L{L}-D{D}-fp32-{c[0]}" for c in CASES])
def test_uniform_masks(i, name, src, Bn):
    """Masks of q or k alone, of heads and batches alone, and constants (``true`` and
    ``false`` after folding): forward and backward."""
    run(src, ("ranges", "table")[i % 2], *VARIANTS[i % len(VARIANTS)], Bn=Bn)


def test_hoisted_predicate_is_passed_to_the_tile_loop():
    """The forward's tile loop of ``q >= 3`` receives ``m_pattern`` computed before it."""
    from spattn.codegen import config as st
    from spattn.codegen.kernels import render
    p = compile_pattern("q >= 3")
    for loop in ("split", "fused"):
        cfg = st.pick(p, "fwd", head_dim=32, dtype="fp32", strategy="table", loop=loop,
                      interpret=True)
        text = render(p, "fwd", cfg, "0" * 32)
        kernel = text.split("def attn_fwd_")[1]
        assert "m_pattern = o_q >= 3" in kernel
        fn = "_fwd_fused_000000(" if loop == "fused" else "_fwd_range_000000("
        signature = text.split("def " + fn)[1].split("):")[0]
        assert "m_pattern," in signature
        assert "m_pattern" in kernel.split(fn)[1].split(")")[0]
