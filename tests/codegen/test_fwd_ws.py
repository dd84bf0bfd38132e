"""The forward's warp-specialised key loops (``SPATTN_FWD_WS=1``, ``KernelConfig.ws``):
the same kernels with ``tl.range(..., warp_specialize=True)`` loops, rendered and run under
TRITON_INTERPRET=1 against the float64 reference (o, every element), for both strategies
and both loop forms; the setting is parsed and checked, and reaches the kernel's source."""
import pytest
import torch

import spattn
from spattn import SpattnConfigError
from spattn.runtime import settings as S
from spattn.runtime.reference import pattern_reference

pytestmark = pytest.mark.interpreter


def _doc(L, g):
    return (torch.rand(L, generator=g) < 0.05).cumsum(0)


@pytest.mark.parametrize("loop", ["split", "fused"])
@pytest.mark.parametrize("src,make", [("causal & window(37)", lambda L, g: {}),
                                      ("causal & same(doc)", lambda L, g: {"doc": _doc(L, g)})],
                         ids=["window-ranges", "documents-table"])
def test_ws_forward_matches_reference(monkeypatch, src, make, loop):
    monkeypatch.setenv("SPATTN_BACKEND", "triton")
    monkeypatch.setenv("SPATTN_FWD_WS", "1")
    monkeypatch.setenv("SPATTN_FWD_LOOP", loop)
    g = torch.Generator().manual_seed(11)
    B, H, L, D = 1, 2, 133, 32
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    ins = make(L, g)
    pat = spattn.compile(src)
    plan = pat.plan(q, k, v, **ins)
    assert "warp-specialised" in repr(plan)
    assert "warp_specialize=True" in pat.kernel_source(q, k, v, **ins)
    o = pat(q, k, v, plan=plan)
    ref = pattern_reference(pat, q.double(), k.double(), v.double(), **ins)
    ref = ref[0] if isinstance(ref, tuple) else ref
    torch.testing.assert_close(o.double(), ref, rtol=1e-4, atol=1e-4)


def test_ws_setting_parsed(monkeypatch):
    monkeypatch.setenv("SPATTN_FWD_WS", "1")
    assert S.current().overrides("fwd")["ws"] is True
    monkeypatch.setenv("SPATTN_FWD_WS", "0")
    assert S.current().overrides("fwd")["ws"] is False
    monkeypatch.setenv("SPATTN_FWD_WS", "maybe")
    with pytest.raises(SpattnConfigError, match="SPATTN_FWD_WS"):
        S.current()
