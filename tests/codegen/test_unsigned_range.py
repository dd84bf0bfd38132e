"""A two-sided range of the tile ``lo <= x <= hi`` is emitted as one unsigned comparison,
``tl.cast(x - lo, tl.uint32) <= hi - lo`` (``codegen.emit``, Range): exact for every 32-bit
``x`` when the bounds are 32-bit and ``hi - lo < 2**31``; never for 64-bit kernels or
loaded (int64) values. The emission is checked, and the kernels of such masks run under
the interpreter against the float64 reference, including ranges whose ``x - lo`` wraps."""
import numpy as np
import pytest
import torch

import spattn
from spattn.runtime.reference import pattern_reference



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
