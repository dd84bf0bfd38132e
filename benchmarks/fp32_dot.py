"""fp32 inputs on the GPU: how the kernels' matrix products run (`tl.dot`'s
``input_precision``) against compile time, speed and accuracy.

Each variant runs in a fresh process with empty Triton and spattn caches, so that its first
calls include the compilation of every kernel they need (the forward; the dQ and dK/dV
kernels); the variants compile at the same time, each on its own cores. Then the steady forward and forward+backward times (median of
``triton.testing.do_bench``) and the largest error of o, dq, dk, dv against the float64
reference, relative to the largest reference entry.

    python benchmarks/fp32_dot.py                      # every variant, one table
    python benchmarks/fp32_dot.py --one ieee --D 128   # one variant (the worker)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

VARIANTS = ["ieee", "tf32x3", "tf32"]
CASES = [("causal", 64, 2048), ("causal", 128, 2048), ("window(256)", 160, 2048),
         ("causal", 128, 8192)]


def one(dot: str, src: str, D: int, L: int) -> dict:
    import torch
    import triton

    import spattn
    import spattn.runtime.triton_backend as tb
    from spattn.runtime.reference import attention_reference
    tb._dot_prec = lambda dtype: dot if dtype == torch.float32 else "tf32"
    B, H = 1, 4
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device="cuda", generator=g, requires_grad=True)
               for _ in range(3))
    do = torch.randn(B, H, L, D, device="cuda", generator=g)
    pat = spattn.compile(src)
    t0 = time.perf_counter()
    o = pat(q, k, v)
    torch.cuda.synchronize()
    first_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    torch.cuda.synchronize()
    first_bwd = time.perf_counter() - t0
    rl = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro, _ = attention_reference(*rl, pat.mask(L, L, num_heads=H, device="cuda"))
    want = [ro, *torch.autograd.grad(ro, rl, do.double())]
    errs = {n: float((a.double() - b).abs().max() / b.abs().max())
            for n, a, b in zip(["o", "dq", "dk", "dv"], [o, dq, dk, dv], want)}
    del rl, ro, want
    print("ready", flush=True)      # compiled: the timings wait for their turn on the GPU
    sys.stdin.readline()
    fwd = triton.testing.do_bench(lambda: pat(q, k, v), warmup=25, rep=200)

    def step():
        torch.autograd.grad(pat(q, k, v), (q, k, v), do)
    fb = triton.testing.do_bench(step, warmup=25, rep=200)
    return dict(dot=dot, src=src, D=D, L=L, first_fwd_s=first_fwd, first_bwd_s=first_bwd,
                fwd_ms=fwd, fb_ms=fb, **{f"err_{n}": e for n, e in errs.items()})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--one")
    ap.add_argument("--src", default="causal")
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--L", type=int, default=2048)
    ap.add_argument("--out")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--cases", type=int, default=len(CASES), help="the first N of CASES")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.src, args.D, args.L)))
        return
    # every variant compiles at once, in its own process and caches; then each is timed
    # alone on the GPU, one after the other
    procs = []
    for src, D, L in CASES[:args.cases]:
        for dot in args.variants.split(","):
            env = dict(os.environ, TRITON_CACHE_DIR=tempfile.mkdtemp(),
                       SPATTN_CACHE_DIR=tempfile.mkdtemp(), SPATTN_AUTOTUNE="0")
            err = tempfile.TemporaryFile("w+")
            procs.append(((dot, src, D, L), err, subprocess.Popen(
                [sys.executable, __file__, "--one", dot, "--src", src, "--D", str(D),
                 "--L", str(L)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=err, text=True)))
    rows = []
    procs.sort(key=lambda x: x[0][0] == "ieee")      # the slowest to compile last
    for (dot, src, D, L), err, p in procs:
        try:
            if p.stdout.readline().strip() != "ready":
                p.wait()
                err.seek(0)
                raise RuntimeError(err.read()[-400:])
            p.stdin.write("go\n")
            p.stdin.flush()
            row = json.loads(p.stdout.readline())
        except Exception as e:  # noqa: BLE001 -- a failed variant is a row of the table
            row = dict(dot=dot, src=src, D=D, L=L, error=repr(e)[:300])
        p.kill()
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    print("| pattern | D | L | dot | first fwd s | first bwd s | fwd ms | f+b ms | err o | "
          "err dq | err dk | err dv |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['src']} | {r['D']} | {r['L']} | {r['dot']} | {r['error']} |")
            continue
        print(f"| {r['src']} | {r['D']} | {r['L']} | {r['dot']} | {r['first_fwd_s']:.1f} | "
              f"{r['first_bwd_s']:.1f} | {r['fwd_ms']:.3f} | {r['fb_ms']:.3f} | "
              f"{r['err_o']:.1e} | {r['err_dq']:.1e} | {r['err_dk']:.1e} | {r['err_dv']:.1e} |")


if __name__ == "__main__":
    main()
