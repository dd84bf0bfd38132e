"""A two-sided range of the tile ``lo <= x <= hi`` is emitted as one unsigned comparison,
``tl.cast(x - lo, tl.uint32) <= hi - lo`` (``codegen.emit``, Range): exact for every 32-bit
``x`` when the bounds are 32-bit and ``hi - lo < 2**31``; never for 64-bit kernels or
loaded (int64) values. The emission is checked, and the kernels of such masks run under
the interpreter against the float64 reference, including ranges whose ``x - lo`` wraps."""
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import spattn
from spattn.runtime.reference import pattern_reference

from tests.helpers.sources import WIDE, bool_exprs



def _pred(src, **kw):
    text = spattn.compile(src, **kw).kernel_source("fwd")
    return [line.strip() for line in text.splitlines() if "m_pattern =" in line]


@pytest.mark.parametrize("src,unsigned", [
    ("causal & window(1024)", True),              # 0 <= q - k <= 1023
    ("-5 <= q - k & q - k <= 7", True),
    ("q - k <= 7", False),                        # one bound: one comparison already
    ("-2147483000 <= q - k & q - k <= 2000", False),   # hi - lo >= 2**31
], ids=["window", "negative-lo", "one-sided", "too-wide"])
def test_which_ranges_are_unsigned(src, unsigned):
    lines = _pred(src)
    assert lines and any("tl.uint32" in x for x in lines) == unsigned, lines


def test_no_unsigned_range_on_a_loaded_value():
    """A document id is an int64 load: its range keeps the two comparisons."""
    lines = _pred("input doc\npattern p = causal & (doc[k] - doc[q] >= -1) & "
                  "(doc[k] - doc[q] <= 1)")
    assert lines and not any("tl.uint32" in x for x in lines)


@pytest.mark.parametrize("lo,hi,x", [(-5, 7, np.arange(-20, 20)), (0, 1023, np.arange(-3, 1030)),
                                     (-2**30, 2**30 - 1, np.array([-2**31, -2**30 - 1, -2**30, 0, 2**30 - 1,
                                                               2**30, 2**30 + 1, 2**31 - 1])),
                                     (2**31 - 10, 2**31 - 1, np.array([-2**31, 2**31 - 11,
                                                                       2**31 - 10, 2**31 - 1]))])
def test_the_identity_with_wrapping(lo, hi, x):
    """(x - lo) mod 2**32 <= hi - lo iff lo <= x <= hi, for int32 x, as the kernel computes
    it (int32 subtraction wraps, then the unsigned view)."""
    assert hi - lo < 2**31
    x = x.astype(np.int32)
    with np.errstate(over="ignore"):
        d = (x - np.int32(lo)).astype(np.int32).view(np.uint32)
    assert np.array_equal(d <= np.uint32(hi - lo), (x >= lo) & (x <= hi))


@pytest.mark.interpreter
@pytest.mark.parametrize("src", ["causal & window(37)", "-5 <= q - k & q - k <= 7",
                                 "abs(q // 8 - k // 8) <= 1 & -2 <= q % 8 - k % 8 & "
                                 "q % 8 - k % 8 <= 3"],
                         ids=["window", "band", "2d-band"])
def test_unsigned_ranges_run(src):
    p = spattn.compile(src, backend="triton")
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, 72, 16, generator=g) for _ in range(3))
    o = p(q, k, v)
    ro, _ = pattern_reference(p, q.double(), k.double(), v.double())
    torch.testing.assert_close(o.double(), ro, atol=2e-4, rtol=1e-3)


# Literals past int32 in a 32-bit kernel: Triton types a Python int in 2**31 .. 2**32 - 1 as
# uint32, which turns the int32 comparison, min or subtraction it meets unsigned (a negative
# q - k compares above 3e9; ``ks - min(ke, 3221225424)`` wraps), and refuses a larger one
# beside an int32 tensor. The emitter wraps, saturates or folds them to the kernel's width,
# as ir.bounds assumes (codegen.emit, _fit and _saturate).
BIG = [
    ("causal & k + C >= A & k + C <= Z", dict(C=-2147483597, A=-2147483599, Z=1073741827), None),
    ("q - k <= 3000000000 & k >= 2", {}, None),
    ("k <= min(q, 3000000000)", {}, -5),
    ("q == k | 3221225401 <= q - k & q - k <= 3221225423", {}, None),
    ("causal & (if k <= 99 then k else 3221225424) <= q + 1", {}, None),
]
BIG_IDS = ["k-range-to-3221225424", "q-k-below-3e9", "min-3e9-negative-q", "range-past-int32",
           "select-unused-big-branch"]


def _literals(text):
    import re
    code = re.sub(r"#.*", "", re.sub(r'"""(.|\n)*?"""', "", text))
    return {int(m) for m in re.findall(r"(?<![\w.])(-?\d+)(?![\w.])", code)}


@pytest.mark.parametrize("src,params,q_offset", BIG, ids=BIG_IDS)
def test_no_literal_past_int32_in_a_32_bit_kernel(src, params, q_offset):
    p = spattn.compile(src, backend="triton", **params)
    for kind in ("fwd", "bwd"):
        big = {v for v in _literals(p.kernel_source(kind, head_dim=16))
               if not -2**31 <= v < 2**31}
        assert not big, (kind, sorted(big))


@pytest.mark.interpreter
@pytest.mark.parametrize("src,params,q_offset", BIG, ids=BIG_IDS)
def test_literals_past_int32_run(src, params, q_offset):
    """B1-H2-L40-D16-fp32, Lq 40 against Lk 40 (or 45 after a negative q_offset): o, lse,
    dq, dk, dv against the float64 reference."""
    p = spattn.compile(src, backend="triton", **params)
    g = torch.Generator().manual_seed(11)
    Lk = 40 if q_offset is None else 45
    q = torch.randn(1, 2, 40, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 2, Lk, 16, generator=g, requires_grad=True) for _ in range(2))
    o, lse = p(q, k, v, q_offset=q_offset, return_lse=True)
    do = torch.randn(o.shape, generator=g)
    got = torch.autograd.grad((o * do).sum(), (q, k, v))
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro, rlse = pattern_reference(p, *ref, q_offset=q_offset)
    want = torch.autograd.grad((ro * do.double()).sum(), ref)
    torch.testing.assert_close(o.double(), ro, atol=2e-4, rtol=1e-3)
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse.double()[fin], rlse[fin], atol=2e-4, rtol=1e-3)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-3, rtol=1e-3,
                                   msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.filterwarnings("ignore:spattn. pattern")   # random patterns that allow nothing
@settings(max_examples=40, deadline=None)
@given(bool_exprs(consts=WIDE), st.integers(1, 48), st.integers(1, 48))
@example("k <= q & -2 <= k & k <= 3221225424", 14, 14)     # the uint32 band
def test_a_32_bit_kernel_writes_int32_literals_only(src, Lq, Lk):
    """Random patterns with constants anywhere up to past int64: where a call of ``Lq`` x
    ``Lk`` runs a 32-bit kernel (``ir.bounds.kernel_int64`` with the kernel's closed form),
    that kernel's text holds no integer literal outside int32."""
    from spattn.codegen.config import get_closed_form
    from spattn.ir.bounds import kernel_int64
    p = spattn.compile(src, backend="triton")
    cf = get_closed_form(p)
    for strategy, form in (("table", None), ("ranges", cf)):
        if strategy == "ranges" and cf is None:
            continue
        if kernel_int64(p, Lq, Lk, closed_form=form, block_m=128, block_n=128):
            continue
        for kind in ("fwd", "bwd"):
            big = {v for v in _literals(p.kernel_source(kind, head_dim=16, strategy=strategy))
                   if not -2**31 <= v < 2**31}
            assert not big, (strategy, kind, sorted(big))
