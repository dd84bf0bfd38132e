"""GPU check: the first training call of a shape whose backward the Gluon kernels take over
tunes nothing for the generated backward.

For each problem (B = 1, 16 heads, D = 128, bf16): a training call with autotuning on and
an empty tuning cache (its seconds, the tuning records it wrote by kind, the backward
stage's kernels), then the same call with autotuning off; the gradients of the two must be
equal bit for bit where the Gluon kernels run both (they are the same kernels).

    SPATTN_CACHE_DIR=/tmp/fresh python benchmarks/tune_gluon_bwd.py
"""
from __future__ import annotations

import json
import os
import time

import torch

import spattn
from spattn.runtime import tune

PROBLEMS = [("causal", 16384), ("window(1024)", 4096)]


def grads(src, N, autotune):
    os.environ["SPATTN_AUTOTUNE"] = "1" if autotune else "0"
    g = torch.Generator(device="cuda").manual_seed(N)
    q, k, v, do = (torch.randn(1, 16, N, 128, device="cuda", dtype=torch.bfloat16,
                               generator=g) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    pat = spattn.compile(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    plan = pat.plan(q, k, v, backward=True)
    pat(q, k, v, plan=plan).backward(do)
    torch.cuda.synchronize()
    stages = [type(plan.forward_stage).__name__] + [
        f"{type(s).__name__}(ws={s.ws is not None}, ws_dq={s.ws_dq is not None})"
        for s in plan._bwd.values()]
    return time.perf_counter() - t0, stages, [t.grad.clone() for t in (q, k, v)]


def records() -> dict:
    """The tuning records in the cache, counted by kind ("fwd", "bwd")."""
    path = tune.tune_dir()
    kinds: dict = {}
    for f in (path.glob("*.json") if path.exists() else []):
        kind = json.loads(f.read_text()).get("kind")
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def main():
    print("| problem | first call s (tuned) | tuning records | stages | first call s (untuned) "
          "| grads equal |")
    print("|---|---|---|---|---|---|")
    for src, N in PROBLEMS:
        before = records()
        s_on, stages, g_on = grads(src, N, True)
        after = records()
        new = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        s_off, _, g_off = grads(src, N, False)
        same = all(torch.equal(a, b) for a, b in zip(g_on, g_off))
        print(f"| {src} {N} | {s_on:.1f} | {new} | {' / '.join(stages)} | {s_off:.1f} | "
              f"{same} |", flush=True)


if __name__ == "__main__":
    main()
