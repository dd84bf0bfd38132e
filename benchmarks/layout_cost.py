"""Where a layout's forward time goes, against the cost model's prediction (GPU).

For bench.py's 16K patterns that have a grid (13 x 13 neighbourhood on a 128-wide grid,
``dilated(512, 4)``, ``strided(128)``) and a few neighbourhoods at 4K and 16K tokens
(B = 1, H = 16, D = 128, bf16): the forward in
sequence order (``SPATTN_LAYOUT=off``), the forward in the layout (``on``), the layout's
inner kernel alone on tensors already in box order, and its gathers alone (q, k, v into box
order, o and the lse back), each the median of ``triton.testing.do_bench`` in alternating
rounds; and ``explain()``'s predicted costs of the two orders (``ir.layout.layout_cost``).
From them: the measured time per cost unit of each order and the gathers' cost per token
in sequence order's units (what ``ir.cost.COSTS["cuda"]["gather_token"]`` prices).

    python benchmarks/layout_cost.py --out DIR
    python benchmarks/layout_cost.py --gathers --out DIR   # the gathers alone: index_select
                                                           # against runtime/gather_kernel.py
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

import spattn
from spattn.ir.cost import COSTS

GATHER = COSTS["cuda"]["gather_token"]

#: name -> (pattern factory, tokens or None for --n)
PATTERNS = {
    "neighborhood2d(13x13)": (lambda: spattn.compile(
        "abs(q // 128 - k // 128) <= 6 & abs(q % 128 - k % 128) <= 6"), None),
    "dilated(512,4)": (lambda: spattn.compile("dilated(512, 4)"), None),
    "strided(128)": (lambda: spattn.compile("strided(128)"), None),
    "nbhd 64x64 (16x16)": (lambda: spattn.neighborhood((64, 64), (16, 16)), 4096),
    "nbhd 64x64 (8x8)": (lambda: spattn.neighborhood((64, 64), (8, 8)), 4096),
    "nbhd 128x128 (32x32)": (lambda: spattn.neighborhood((128, 128), (32, 32)), 16384),
    "nbhd 16x32x32 (3,9,9)": (lambda: spattn.neighborhood((16, 32, 32), (3, 9, 9)), 16384),
}


def alternate(fns, rounds):
    """Median ms of each of ``fns`` (name -> callable), timed by ``triton.testing.do_bench``
    in ``rounds`` rounds whose order flips every round."""
    import triton
    names, times = list(fns), {n: [] for n in fns}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            times[n].append(triton.testing.do_bench(fns[n], warmup=10, rep=60,
                                                    return_mode="median"))
    return {n: statistics.median(x) for n, x in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gathers", action="store_true", help="the gathers alone")
    a = ap.parse_args()
    if a.gathers:
        return gathers_only(a)
    H, D = a.heads, 128
    rows = []
    for name, (make, tokens) in PATTERNS.items():
        try:
            rows.append(measure(name, make, tokens or a.n, H, D, a.rounds))
        except Exception as e:   # one pattern failing must not hide the others
            rows.append({"pattern": name, "error": f"{type(e).__name__}: {e}"[:300]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "layout_cost.json"), "w") as f:
            json.dump(rows, f, indent=1)
    print("| pattern | N | off ms | on ms | inner ms | gathers ms | measured on/off | predicted | "
          "gather_token measured | inner per unit vs sequence |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['pattern']} | ERROR {r['error'][:120]} |")
            continue
        print(f"| {r['pattern']} | {r['N']} | {r['off_ms']:.3f} | {r['on_ms']:.3f} | "
              f"{r['inner_ms']:.3f} | {r['gathers_ms']:.3f} | {r['measured_ratio']:.2f} | "
              f"{r['predicted_ratio']:.2f} | {r['gather_token_measured']:.4f} | "
              f"{r['inner_ms_per_unit_vs_sequence']:.2f} |")


def gathers_only(a):
    """Per shape: one q-sized gather and one lse-sized gather by ``index_select`` and by
    ``gather_rows``, in alternating rounds; TB/s counts the bytes read and written."""
    from spattn.runtime.gather_kernel import gather_rows
    rows = []
    for N in (4096, 16384, 65536):
        for shape in ((1, a.heads, N, 128), (1, a.heads, N)):
            t = torch.randn(shape, device="cuda", dtype=torch.bfloat16 if len(shape) == 4
                            else torch.float32)
            idx = torch.randperm(N, device="cuda")
            assert torch.equal(gather_rows(t, idx), t.index_select(2, idx))
            fns = {"index_select": lambda: t.index_select(2, idx),
                   "gather_rows": lambda: gather_rows(t, idx)}
            row = {"shape": list(shape),
                   **{f"{n}_ms": x for n, x in alternate(fns, a.rounds).items()}}
            nbytes = 2 * t.numel() * t.element_size()
            for n in fns:
                row[f"{n}_TBps"] = nbytes / row[f"{n}_ms"] / 1e9
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "gathers.json"), "w") as f:
            json.dump(rows, f, indent=1)
    print("| shape | index_select ms | TB/s | gather_rows ms | TB/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['index_select_ms']:.4f} | {r['index_select_TBps']:.2f} | "
              f"{r['gather_rows_ms']:.4f} | {r['gather_rows_TBps']:.2f} |")


def measure(name, make, N, H, D, rounds):
    """One pattern's row (module docstring)."""
    pat = make()
    q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    os.environ["SPATTN_LAYOUT"] = "off"
    off = pat.plan(q, k, v)
    os.environ["SPATTN_LAYOUT"] = "on"
    on = pat.plan(q, k, v)
    os.environ["SPATTN_LAYOUT"] = "auto"
    lay = pat.explain(N, num_heads=1).layout
    if not hasattr(on, "inner"):
        raise ValueError("no layout found")
    g = [on._gather(t, on.order) for t in (q, k, v)]
    o, lse = on.inner.forward(*g)
    ref = pat(q, k, v, plan=off)
    err = float((pat(q, k, v, plan=on).float() - ref.float()).abs().max())

    def gathers():
        for t in (q, k, v):
            on._gather(t, on.order)
        on._gather(o, on.inverse)
        on._gather(lse, on.inverse)

    fns = {"off": lambda: pat(q, k, v, plan=off), "on": lambda: pat(q, k, v, plan=on),
           "inner": lambda: on.inner.forward(*g), "gathers": gathers}
    ms = alternate(fns, rounds)
    unit = ms["off"] / (lay["cost_sequence"] * H)
    row = {"pattern": name, "N": N, "H": H, "max_err": err, **{f"{n}_ms": x for n, x in ms.items()},
           "cost_sequence": lay["cost_sequence"], "cost_layout": lay["cost_layout"],
           "predicted_ratio": lay["cost_layout"] / lay["cost_sequence"],
           "measured_ratio": ms["on"] / ms["off"],
           "gather_token_measured": ms["gathers"] / unit / (N * H),
           "inner_ms_per_unit_vs_sequence":
               ms["inner"] / (lay["cost_layout"] - N * GATHER) / H / unit,
           "layout": lay["layout"]}
    return row


if __name__ == "__main__":
    main()
