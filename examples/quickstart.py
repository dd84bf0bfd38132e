"""spattn in one minute: compile a pattern, explain it, run it on the CPU, check it.

    python examples/quickstart.py

1. compile a pattern from a string (StreamingLLM: a sliding window plus sinks),
2. print what the analysis proves about it (tiles EMPTY / PARTIAL / FULL),
3. run it like ``scaled_dot_product_attention`` on CPU tensors (the block-sparse
   torch backend; under TRITON_INTERPRET=1 the generated Triton kernel instead),
   forward and backward,
4. check output and gradients against the float64 dense reference,
5. the same with a runtime input (packed documents) through ``spattn.attention``.

Exits with status 1 if anything disagrees with the reference.
"""
from __future__ import annotations

import sys

import torch

import spattn
from spattn.runtime.reference import attention_reference


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def check(name: str, pattern, q, k, v, **inputs) -> bool:
    """Run ``pattern`` forward and backward; compare with float64 autograd of the reference."""
    B, H, L, D = q.shape
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = pattern(q, k, v, **inputs)
    do = torch.randn_like(o)
    (o * do).sum().backward()

    mask = pattern.mask(L, k.shape[2], num_heads=H, batch=B, **inputs)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, mask)
    (ref * do.double()).sum().backward()
    errs = {"out": rel_err(o, ref), "dq": rel_err(q.grad, q64.grad),
            "dk": rel_err(k.grad, k64.grad), "dv": rel_err(v.grad, v64.grad)}
    ok = all(e < 1e-3 for e in errs.values())
    density = mask.float().mean().item()
    print(f"{name}: density {density:.1%}; max relative error vs float64 reference: "
          + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()) + ("  OK" if ok else "  FAIL"))
    return ok


def main() -> int:
    torch.manual_seed(0)
    ok = True

    # 1. compile: a bare expression with a param; equal patterns hash equal however written
    pattern = spattn.compile("causal & (window(W) | sink(4))", W=64)
    print(pattern)
    assert pattern == spattn.compile("(sink(4) | window(64)) & causal")

    # 2. what the analysis proves, without touching the L x L pairs
    L = 512
    print(pattern.explain(L, num_heads=4))

    # 3-4. run it on the CPU and check it, forward and backward
    B, H, D = 1, 4, 64
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    ok &= check("streaming (window 64 + 4 sinks)", pattern, q, k, v)

    # grouped-query attention: 4 query heads share 2 key/value heads
    k2, v2 = k[:, :2], v[:, :2]
    ok &= check("streaming, GQA 4:2", pattern, q, k2, v2)

    # 5. runtime inputs: documents packed into one sequence, attention stays inside each
    doc = torch.repeat_interleave(torch.arange(4), torch.tensor([100, 200, 62, 150]))
    o = spattn.attention(q, k, v, pattern="causal & same(doc)", doc=doc)
    print(f"spattn.attention(pattern='causal & same(doc)') -> {tuple(o.shape)}")
    ok &= check("packed documents", spattn.compile("causal & same(doc)"), q, k, v, doc=doc)

    print("all results match the reference" if ok else "MISMATCH against the reference")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
