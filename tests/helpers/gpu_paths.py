"""The call paths the transformers adapter leans on, through the compiled kernels on CUDA.

Each row is a bf16 call and its gradients against the float64 reference. The rows are:
- a v of another head dim (multi-head latent attention), also routed to the decode path;
- T5's position-bias score ``s + position_bias[h, q - Lk + Lq, k]``;
- an image-block pattern with per-batch block ids;
- a head dim of 512 on the torch backend, and its refusal by the kernels.

One line per row: OK or BAD, then the relative errors of o, dq, dk and dv.

    python -m tests.helpers.gpu_paths
"""
from __future__ import annotations

import torch

TOL = 3e-2          # bf16


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def check(pat, q, k, v, **inputs) -> list[float]:
    """Relative errors of ``(o, dq, dk, dv)`` of ``pat(q, k, v, **inputs)`` against the
    float64 reference (a ``position_bias`` input is added to the scaled scores)."""
    from spattn.runtime.reference import attention_reference
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o = pat(q, k, v, **inputs)
    B, Hq, Lq, _ = q.shape
    mask = pat.mask(Lq, k.shape[2], num_heads=Hq, batch=B,
                    **{n: t for n, t in inputs.items() if n in pat.inputs})
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    if "position_bias" in inputs:
        s = q64 @ k64.transpose(-1, -2) / q.shape[-1] ** 0.5 + inputs["position_bias"].double()
        ref = s.masked_fill(~mask, float("-inf")).softmax(-1) @ v64
    else:
        ref, _ = attention_reference(q64, k64, v64, mask)
    do = torch.randn_like(o)
    (o.float() * do.float()).sum().backward()
    (ref * do.double()).sum().backward()
    return [_rel(o, ref)] + [_rel(a.grad, b.grad) for a, b in ((q, q64), (k, k64), (v, v64))]


def main():
    import spattn
    from spattn.dsl.errors import SpattnInputError
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, device="cuda", generator=g).to(torch.bfloat16)

    rows = []
    window = spattn.compile("causal & window(300)")
    for D, Dv in ((192, 128), (64, 128), (128, 32)):
        rows.append((f"Dv B2-H8/2-L1000-D{D}-Dv{Dv}", check(
            window, r(2, 8, 1000, D), r(2, 2, 1000, D), r(2, 2, 1000, Dv))))
    rows.append(("Dv decode route B2-H8/2-Lq1-Lk3000-D192-Dv128", check(
        window, r(2, 8, 1, 192), r(2, 2, 3000, 192), r(2, 2, 3000, 128))))
    t5 = spattn.compile("causal", score="s + position_bias[h, q - Lk + Lq, k]")
    rows.append(("T5 bias B2-H4-Lq256-Lk512-D64", check(
        t5, r(2, 4, 256, 64), r(2, 4, 512, 64), r(2, 4, 512, 64),
        position_bias=r(4, 256, 512))))
    blocks = spattn.compile("(q >= k | blocks[q] == blocks[k] & blocks[q] >= 0) & q - k < 200")
    ids = torch.full((2, 700), -1, device="cuda", dtype=torch.long)
    ids[0, 100:356] = 0
    ids[1, 50:306] = 0
    ids[1, 400:656] = 1
    rows.append(("image blocks B2-H8/4-L700-D128", check(
        blocks, r(2, 8, 700, 128), r(2, 4, 700, 128), r(2, 4, 700, 128), blocks=ids)))
    rows.append(("D512 torch backend B1-H4-L300", check(
        spattn.compile("causal & window(64)", backend="torch"),
        r(1, 4, 300, 512), r(1, 4, 300, 512), r(1, 4, 300, 512))))
    for name, errs in rows:
        ok = all(e < TOL for e in errs)
        print(f"{'OK ' if ok else 'BAD'} {name:48s} " + " ".join(f"{e:.1e}" for e in errs))
    x = r(1, 2, 64, 512)
    try:
        spattn.compile("causal")(x, x, x)
        print("BAD D512 on the kernels: no error")
    except SpattnInputError as e:
        ok = "backend='torch'" in str(e)
        print(f"{'OK ' if ok else 'BAD'} D512 on the kernels refused: {str(e)[:70]}")


if __name__ == "__main__":
    main()
