"""Random token layouts on the GPU under the default settings (a device check, not a pytest
file): neighbourhoods of 1 to 3 axes (kernels, strides, causal axes; sometimes composed
with another pattern or written flattened), layouts ``auto`` or ``on``, the way the
rows reach the kernels left to ``SPATTN_LAYOUT_GATHER=auto`` (the box forward where the
boxes can be read, its backward by the cost constants, which a case may tilt either
way), bf16 or fp16, D from 32 to 256, GQA, two batch elements, contiguous or transposed
``[B, N, H, D]`` memory. Each case draws fresh inputs, runs the forward and the backward
(o, lse and the gradients of q, k, v) and compares every element with the float64
reference (``runtime.reference.pattern_reference``), relative norms at bf16 tolerance.

    python -m tests.helpers.gpu_layouts --seconds 240 [--seed 0] [--large]

``--large``: grids of 4K-16K tokens (2-D up to 128 x 128, 3-D up to 16 x 32 x 32), one
batch element and two query heads, D 64 or 128.

Prints one line per case (the plan's ways) and a summary; exit status 1 on any failure.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
import traceback

import torch

import spattn
from spattn.ir import cost as C
from spattn.runtime.reference import pattern_reference


def case(seed: int, large: bool = False):
    r = random.Random(seed)
    nd = r.choice([1, 2, 2, 3])
    if nd == 1:
        shape = (r.randint(4096, 16384) if large else r.randint(600, 4096),)
    elif nd == 2:
        shape = (r.randint(64, 128), r.randint(64, 128)) if large else \
            (r.randint(16, 64), r.randint(16, 64))
    elif large:
        shape = (r.randint(4, 16), r.randint(16, 32), r.randint(16, 32))
    else:
        shape = (r.randint(2, 8), r.randint(8, 24), r.randint(8, 24))
    ks = tuple(r.randint(1, max(1, n // r.choice([1, 2, 4]))) for n in shape)
    st = tuple(r.randint(1, kk) if r.random() < 0.4 else 1 for kk in ks)
    ca = tuple(r.random() < 0.25 for _ in shape)
    pat = spattn.neighborhood(shape, ks, st, 1, ca)
    desc = f"neighborhood({shape}, {ks}, {st}, 1, {ca})"
    if r.random() < 0.25:
        src = f"({pat.source}) & ({r.choice(['causal', 'k != q', 'q - k <= 300'])})"
        pat, desc = spattn.compile(src), src
    N = math.prod(shape)
    Hk = r.choice([1, 2])
    Hq = Hk * r.choice([1, 2])
    B = r.choice([1, 1, 2])
    D = r.choice([32, 64, 64, 80, 128, 128, 256])
    dtype = r.choice([torch.bfloat16, torch.bfloat16, torch.float16])
    bshd = r.random() < 0.3
    layout = r.choice(["auto", "on", "on"])
    tilt = r.choice([None, None, "copy", "kernel"])
    if large:
        B, Hq, Hk, D = 1, 2, r.choice([1, 2]), r.choice([64, 128])
    return pat, desc, N, B, Hq, Hk, D, dtype, bshd, layout, tilt


def run(seed: int, large: bool = False) -> str:
    import os
    pat, desc, N, B, Hq, Hk, D, dtype, bshd, layout, tilt = case(seed, large)
    g = torch.Generator(device="cuda").manual_seed(seed)

    def draw(h):
        if bshd:
            return torch.randn(B, N, h, D, device="cuda", dtype=dtype, generator=g) \
                .transpose(1, 2)
        return torch.randn(B, h, N, D, device="cuda", dtype=dtype, generator=g)
    q, k, v, do = draw(Hq), draw(Hk), draw(Hk), draw(Hq)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    os.environ["SPATTN_LAYOUT"] = layout
    forced = {} if tilt is None else {"rows_factor": -0.5 if tilt == "kernel" else 1e9}
    try:
        with C.constants("cuda", **forced):
            plan = pat.plan(*leaves)
            o, lse = pat(*leaves, plan=plan, return_lse=True)
            ((o.float() * do.float()).sum() + torch.nan_to_num(lse, neginf=0.0).sum()) \
                .backward()
    finally:
        os.environ.pop("SPATTN_LAYOUT", None)
    ways = (type(plan).__name__, getattr(plan, "gather", "-"),
            getattr(plan, "backward_gather", "-"))
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro, rl = pattern_reference(pat, *ref)
    ((ro * do.double()).sum() + torch.nan_to_num(rl, neginf=0.0).sum()).backward()
    errs = {}
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lse), fin), "lse: finite where the reference is not"
    errs["o"] = float((o.detach().double() - ro).norm() / ro.norm().clamp_min(1e-30))
    errs["lse"] = float((lse.detach().double()[fin] - rl[fin]).norm()
                        / rl[fin].norm().clamp_min(1e-30))
    for nm, a, b in zip(("dq", "dk", "dv"), leaves, ref):
        assert torch.isfinite(a.grad).all(), f"{nm}: not finite"
        errs[nm] = float((a.grad.double() - b.grad).norm() / b.grad.norm().clamp_min(1e-30))
    bad = {n: e for n, e in errs.items() if not e < 2e-2}
    line = (f"{seed}: {desc} N={N} B{B}-Hq{Hq}-Hk{Hk}-D{D} {str(dtype)[6:]} "
            f"{'bshd' if bshd else 'bhsd'} layout={layout} tilt={tilt} -> {ways} "
            f"max err {max(errs.values()):.1e}")
    if bad:
        raise AssertionError(f"{line}: {bad}")
    return line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=240)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--large", action="store_true", help="grids of 4K-16K tokens")
    a = ap.parse_args(argv)
    end, seed, fails, n, ways = time.time() + a.seconds, a.seed, 0, 0, {}
    while time.time() < end:
        try:
            line = run(seed, a.large)
            w = line.rsplit("-> ", 1)[1].split(" max")[0]
            ways[w] = ways.get(w, 0) + 1
            print(line, flush=True)
        except Exception:
            fails += 1
            print(f"FAIL seed {seed}:\n{traceback.format_exc()}", flush=True)
        n += 1
        seed += 1
    print(f"{n} cases, {fails} failures; ways taken: {ways}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
