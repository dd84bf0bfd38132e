"""Chunked patterns on the closed-form ranges strategy: generated kernels vs float64 reference."""
import pytest
import torch

import spattn
from spattn.codegen.config import analysis_strategy
from spattn.runtime.reference import attention_reference

pytestmark = pytest.mark.interpreter

CASES = [
    ("chunked-causal", "chunked(12) & causal", 50, 50, None),
    ("chunked-window", "chunked(20) & window(7)", 45, 45, None),
    ("prev-chunk", "(q // 10 == k // 10 | q // 10 == k // 10 + 1) & causal", 47, 47, None),
    ("chunk-causal-blocks", "k // 16 <= q // 16", 40, 55, None),
    ("chunked-kv-cache", "chunked(9) & causal", 13, 40, None),
    ("chunked-offset", "chunked(11) & causal", 30, 30, -6),
]


@pytest.mark.parametrize("name,src,Lq,Lk,off", CASES, ids=[c[0] for c in CASES])
def test_chunked_ranges_fwd_bwd(name, src, Lq, Lk, off, monkeypatch):
    monkeypatch.setenv("SPATTN_STRATEGY", "ranges")
    pat = spattn.compile(src, backend="triton")
    assert analysis_strategy(pat) == "ranges"
    g = torch.Generator().manual_seed(len(src))
    q = torch.randn(2, 2, Lq, 16, generator=g, dtype=torch.float64).float().requires_grad_()
    k, v = (torch.randn(2, 2, Lk, 16, generator=g, dtype=torch.float64).float().requires_grad_()
            for _ in range(2))
    do = torch.randn(2, 2, Lq, 16, generator=g)
    out = pat(q, k, v, q_offset=off)
    out.backward(do)
    mask = pat.mask(Lq, Lk, num_heads=2, batch=2, q_offset=off)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(qr, kr, vr, mask)
    ref.backward(do.double())
    for got, want in ((out.detach(), ref.detach()), (q.grad, qr.grad), (k.grad, kr.grad),
                      (v.grad, vr.grad)):
        err = float((got.double() - want).norm() / want.norm().clamp_min(1e-30))
        assert err < 1e-3, f"{name}: rel. error {err:.2e}"
