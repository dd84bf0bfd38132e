"""Where an all-FULL layout's forward loses against the dense rate (GPU): the forward of
``full`` attention in sequence order with as many keys per query as the strided FLUX
problem's window (6400: 50 key tiles of 128 per query tile) and with every key (65536),
through the table strategy's CSR lists and spans (the cost of an index load per key
tile), against the strided FLUX problem itself (``spattn.neighborhood((256, 256), (80, 80),
(16, 16))`` in its layout, every tile FULL) and cuDNN's dense forward on the same two
shapes; B = 1, 24 heads, D = 128, bf16, the layout's tiles (128 x 128, 8 warps) for every
spattn plan. Alternating rounds of ``triton.testing.do_bench`` medians; TF/s counts the
allowed pairs (4 D flops each).

    python benchmarks/short_rows.py [--rounds 3] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("SPATTN_AUTOTUNE", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import spattn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from layout_cost import alternate  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    H, D, N, W = 24, 128, 65536, 6400
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, H, N, D, device=dev, dtype=dt, generator=g)
    k, v = (torch.randn(1, H, N, D, device=dev, dtype=dt, generator=g) for _ in range(2))
    ks, vs = k[:, :, :W].contiguous(), v[:, :, :W].contiguous()
    for name, value in (("SPATTN_BLOCK_M", "128"), ("SPATTN_BLOCK_N", "128"),
                        ("SPATTN_FWD_WARPS", "8")):
        os.environ[name] = value
    full = spattn.compile("full")
    short, dense = full.plan(q, ks, vs), full.plan(q, k, v)
    # the same rows through the table strategy: the CSR loop (an index load per key tile)
    # and the spans loop (tiles from the loop counter)
    os.environ["SPATTN_STRATEGY"] = "table"
    table = {}
    for mode in ("csr", "spans"):
        os.environ["SPATTN_TABLES"] = mode
        table[mode] = spattn.compile("full").plan(q, ks, vs)
    for name in ("SPATTN_STRATEGY", "SPATTN_TABLES"):
        os.environ.pop(name)
    for name in ("SPATTN_BLOCK_M", "SPATTN_BLOCK_N", "SPATTN_FWD_WARPS"):
        os.environ.pop(name)
    stride = spattn.neighborhood((256, 256), (80, 80), (16, 16))
    lay = stride.plan(q, k, v)

    def cudnn(kk, vv):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, kk, vv)
    ref = cudnn(ks, vs)
    err = float((full(q, ks, vs, plan=short).float() - ref.float()).abs().max())
    fns = {"spattn full, 6400 keys": lambda: full(q, ks, vs, plan=short),
           "spattn full, 6400 keys, CSR tables": lambda: full(q, ks, vs, plan=table["csr"]),
           "spattn full, 6400 keys, spans": lambda: full(q, ks, vs, plan=table["spans"]),
           "cuDNN, 6400 keys": lambda: cudnn(ks, vs),
           "spattn FLUX stride (layout)": lambda: stride(q, k, v, plan=lay),
           "spattn full, 65536 keys": lambda: full(q, k, v, plan=dense),
           "cuDNN, 65536 keys": lambda: cudnn(k, v)}
    ms = alternate(fns, a.rounds)
    pairs = {n: N * (N if "65536" in n else W) * H for n in fns}
    rows = [{"case": n, "ms": ms[n], "TFs": 4 * D * pairs[n] / ms[n] / 1e9} for n in fns]
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "short_rows.json"), "w") as f:
            json.dump({"rows": rows, "max_err_vs_cudnn": err, "plan": repr(lay),
                   "table_plans": {m: repr(t) for m, t in table.items()}}, f, indent=1)
    print(repr(lay).splitlines()[1])
    for m, t in table.items():
        print(m, "|", " ".join(repr(t).split()))
    print(f"spattn full at 6400 keys against cuDNN: max |diff| {err:.2e}")
    print("| case | ms | TF/s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['ms']:.3f} | {r['TFs']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
