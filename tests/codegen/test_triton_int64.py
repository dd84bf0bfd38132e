"""64-bit kernels (launcher option ``int64=True``) and extreme scales, under TRITON_INTERPRET=1.

An int64 kernel computes positions, lengths, head and batch ids, runtime-input values,
closed-form bounds and in-head element offsets in 64 bits, and receives its runtime
inputs as int64 tensors.  Each case below is wrong in 32 bits (query positions past
2**31, a window of 2**40 keys, a product of positions past 2**31, input values that do
not fit int32): forward and backward against the float64 reference, every element.
The scale is passed to the kernels in fp32: positive scales below fp32's normal range
must still give finite, correct results.
"""
import pytest
import torch

from spattn.codegen import config as st
from spattn.codegen.kernels import render
from spattn.runtime import triton_backend as tb

from tests.helpers.kernels import (analysis_cf, check_close, check_lse, compile_pattern,
                                   rand_qkv, reference, trivial_cf, window_cf)

pytestmark = pytest.mark.interpreter

TOL = 1e-3


def run(src, strategy, *, inputs=None, q_offset=0, L=40, cf=None, params=None, loop="split",
        bwd_loop="split", tma=False, int64=True, scale=0.25, Bn=1, H=2, D=16, block=16):
    """Forward and backward of ``src`` against the float64 reference."""
    pattern = compile_pattern(src, **(params or {}))
    inputs = inputs or {}
    q, k, v = rand_qkv(Bn, H, H, L, L, D, seed=L + len(src))
    gen = torch.Generator().manual_seed(L)
    do = torch.randn(Bn, H, L, D, generator=gen)
    if strategy == "ranges" and cf is None:
        cf = analysis_cf(pattern) or trivial_cf()
    opts = dict(strategy=strategy, block_m=block, block_n=block, tma=tma, closed_form=cf)
    if int64:
        opts["int64"] = True
    o, lse = tb.fwd(pattern, q, k, v, scale=scale, q_offset=q_offset, inputs=inputs,
                    loop=loop, **opts)
    dq, dk, dv = tb.bwd(pattern, q, k, v, o, lse, do, scale=scale, q_offset=q_offset,
                        inputs=inputs, loop=bwd_loop, **opts)
    ref_o, ref_lse, (qd, kd, vd), m = reference(pattern, q, k, v, scale=scale,
                                                q_offset=q_offset, inputs=inputs, grad=True)
    ref_o.backward(do.double())
    check_close("o", o, ref_o.detach(), TOL)
    check_lse(lse, ref_lse.detach())
    check_close("dq", dq, qd.grad, TOL)
    check_close("dk", dk, kd.grad, TOL)
    check_close("dv", dv, vd.grad, TOL)
    return m


def _docs_big():
    return {"doc": torch.tensor([0] * 35 + [2 ** 32] * 35)}


def _docs_edges():
    return {"doc": torch.tensor([0, 2 ** 31, -2 ** 31, 7, 2 ** 31, 0, -2 ** 31, 2 ** 33] * 5)}


def _blocks_big():
    # blocks of 16 positions under 32 x 32 tiles: tiles mix allowed and masked blocks, so
    # the predicate reads the entries (2**32 is allowed: an element means != 0)
    return {"blocks": torch.tensor([[1, 0, 2 ** 32], [0, 2 ** 32, 0], [2 ** 32, 3, 2 ** 40]])}


# (id, source, params, inputs, q_offset, L, hand-written closed form, tile)
CASES = [
    # query positions past 2**31; the analysis's closed form bounds query positions by
    # 2**30 (ir.ranges.Q_UNBOUNDED), so ranges runs a hand-written one (a 2**32 window)
    ("causal-offset", "causal", None, None, 2 ** 31 - 2, 40, lambda: window_cf(2 ** 32), 16),
    ("window-2e40", "k < q + W", {"W": 2 ** 40}, None, 0, 40, None, 16),
    ("product", "q <= 268435459 * k", None, None, 0, 40, None, 16),
    ("documents-2e32", "causal & same(doc)", None, _docs_big, 0, 70, None, 16),
    ("blocks-2e32", "blocks[q // 16, k // 16]", None, _blocks_big, 0, 48, None, 32),
    ("documents-int32-edges", "same(doc)", None, _docs_edges, 0, 40, None, 16),
]

#: (forward loop, backward loop, TMA), taken in turn by the cases
VARIANTS = [("split", "split", False), ("fused", "fused", True), ("persistent", "split", False),
            ("split", "fused", True)]


@pytest.mark.parametrize("strategy", ["ranges", "table"])
@pytest.mark.parametrize("i,name,src,params,inputs_fn,q_offset,L,cf_fn,block",
                         [(i, *c) for i, c in enumerate(CASES)],
                         ids=[f"B1-H2-L{c[5]}-D16-fp32-{c[0]}" for c in CASES])
def test_int64_kernels(i, name, src, params, inputs_fn, q_offset, L, cf_fn, block, strategy):
    """Values beyond int32, forward and backward (ranges: the analysis's closed form where
    it has one, else every key under the predicate; table: the tile classes)."""
    loop, bwd_loop, tma = VARIANTS[(2 * i + (strategy == "table")) % len(VARIANTS)]
    cf = cf_fn() if (cf_fn and strategy == "ranges") else None
    m = run(src, strategy, params=params, inputs=inputs_fn() if inputs_fn else None,
            q_offset=q_offset, L=L, cf=cf, loop=loop, bwd_loop=bwd_loop, tma=tma, block=block)
    assert m.any()


def test_int64_is_a_kernel_of_its_own():
    """``int64`` is part of the kernel config (and cache key): the int64 file widens the
    scalar arguments, the work item and the tile indices where positions are formed, and
    narrows TMA offsets to the int32 descriptors take; the default file has none of it."""
    p = compile_pattern("causal & same(doc)")
    texts = {}
    for int64 in (False, True):
        cfg = st.pick(p, "fwd", head_dim=32, dtype="fp32", strategy="table", loop="split",
                      tma=True, int64=int64, interpret=True)
        assert cfg.int64 is int64
        texts[int64] = render(p, "fwd", cfg, "0" * 32)
    wide, narrow = texts[True], texts[False]
    for line in ("Lq = tl.cast(Lq, tl.int64)", "q_offset = tl.cast(q_offset, tl.int64)",
                 "i_w = tl.load(ORDER + tl.program_id(0)).to(tl.int64)",
                 "o_n = tl.cast(i_n, tl.int64) * BLOCK_N", "tl.cast(i_b, tl.int32)"):
        assert line in wide and line not in narrow, line


def test_int64_inputs_are_passed_as_int64():
    """The launcher converts runtime inputs to int64 for an int64 kernel (int32 would
    truncate 2**32 to 0), to int32 otherwise."""
    p = compile_pattern("causal & same(doc)")
    doc = torch.tensor([0, 2 ** 32, 5])
    assert tb._input_args(p, {"doc": doc}, int64=True)[0].dtype == torch.int64
    assert tb._input_args(p, {"doc": doc}, int64=False)[0].dtype == torch.int32


@pytest.mark.parametrize("strategy", ["ranges", "table"])
@pytest.mark.parametrize("scale", [1e-300, 1e-40, 1e-20], ids=["1e-300", "1e-40", "1e-20"])
def test_tiny_scales(scale, strategy):
    """A positive scale below fp32's normal range gives finite, correct outputs and
    gradients (the kernels' fp32 ``sm_scale_log2`` would be 0 or subnormal, and a masked
    score's ``-inf * 0`` NaN): every row averages the values it sees."""
    run("causal & window(9)", strategy, scale=scale, int64=False,
        cf=window_cf(9) if strategy == "ranges" else None)


BIG = 2 ** 70
BEYOND_INT64 = {
    "range-below": "q < -9223372036854775808",
    "range-above": "q - k > 9223372036854775808 | k <= 9223372036854775809 & q >= 2",
    "min-const": f"min(q, {BIG}) >= 3",
    "max-const": f"max(q - k, -{BIG}) >= 0",
    "floordiv-const": f"q // {BIG} == k // {BIG} & (q - k) // -{BIG} == -1",
    "mod-const": f"q % {BIG} >= 3",
    "sum-wraps": f"q - k + {2 ** 64} > {2 ** 64}",
}


@pytest.mark.parametrize("src", list(BEYOND_INT64.values()), ids=list(BEYOND_INT64))
@pytest.mark.parametrize("strategy", ["table", "ranges"])
def test_constants_beyond_int64(src, strategy):
    """Literals beyond int64 never reach a kernel: comparison bounds fold, min/max constants
    saturate, huge divisors give quotient 0 or -1, sums wrap exactly; through the public
    call (its own strategy: a closed form whose bounds leave int64 runs as a table) and
    through each strategy."""
    from spattn.runtime.reference import attention_reference
    import spattn
    p = spattn.compile(src)
    q, k, v = rand_qkv(1, 1, 1, 24, 24, 16, seed=len(src))
    o = p(q, k, v, q_offset=3)
    want = attention_reference(q, k, v, p.mask(24, 24, q_offset=3))[0]
    check_close("o", o, want, TOL)
    cf = analysis_cf(compile_pattern(src)) if strategy == "ranges" else None
    if strategy == "ranges" and cf is None:
        pytest.skip("no closed form")
    try:
        run(src, strategy, cf=cf, L=24, q_offset=3)
    except Exception as e:      # a given closed form whose bounds leave int64 is refused
        from spattn import SpattnError
        assert isinstance(e, SpattnError), repr(e)


@pytest.mark.parametrize("src, score, W", [
    ("(q - k) % W[h] != 1", None, [3]),
    ("causal & (q - k) % 5 != W[h]", None, [-4]),
    ("causal", "s + float(W[h])", [-3]),
], ids=["B1-H1-L24-D16-fp32-mask", "B1-H1-L24-D16-fp32-negative", "B1-H1-L24-D16-fp32-score"])
def test_one_entry_list_in_an_int64_kernel(src, score, W):
    """A one-entry list indexed by ``h`` (one head) is a bare literal in the kernel: in an
    int64 kernel (queries past 2**31) it was emitted as ``3.to(tl.int64)``, not Python."""
    import spattn
    from spattn.runtime.reference import pattern_reference
    pat = spattn.compile(src, score=score, backend="triton", W=W)
    gen = torch.Generator().manual_seed(len(src))
    q, k, v = (torch.randn(1, 1, 24, 16, generator=gen, requires_grad=True) for _ in range(3))
    do = torch.randn(1, 1, 24, 16, generator=gen)
    o = pat(q, k, v, q_offset=2 ** 40)
    o.backward(do)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = pattern_reference(pat, qd, kd, vd, q_offset=2 ** 40)
    ref.backward(do.double())
    assert ref.abs().sum() > 0
    for name, got, want in (("o", o, ref), ("dq", q.grad, qd.grad), ("dk", k.grad, kd.grad),
                            ("dv", v.grad, vd.grad)):
        check_close(name, got.detach(), want.detach(), TOL)
