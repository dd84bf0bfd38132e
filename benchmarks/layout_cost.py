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
    python benchmarks/layout_cost.py --rows --out DIR      # copies against row tables

``--rows``: for the 16K patterns with a grid and a 4K neighbourhood whose layout the
gathers made too dear (:data:`ROWS_PATTERNS`), the forward and the forward+backward in
sequence order, in the layout with the gathers (``SPATTN_LAYOUT_GATHER=copy``) and in the
layout with rows addressed through row tables in the kernels (``kernel``: no gathers, no
TMA), and the forward with the gathers and pointer loads (``SPATTN_TMA=0``: what the table
kernels give up besides the gathers), all in the same alternating rounds, each with the
default configuration (``SPATTN_AUTOTUNE=0`` unless ``--tune``), beside ``explain()``'s
predicted cost ratios with and without the gathers; the largest difference of the table
path's output and gradients from the copy path's and from sequence order's. About 2 minutes
on an H200 (``--fwd-only`` or ``--only NAME ...`` for less). ``--dry`` runs the same code on the CPU
(the Triton interpreter, tiny grids, wall-clock timing): a check that the script runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if "--dry" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"      # before Triton is imported: kernels on the CPU

import torch  # noqa: E402

import spattn  # noqa: E402
from spattn.ir.cost import COSTS  # noqa: E402

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


#: ``--rows``: the 16K patterns of :data:`PATTERNS` and a 4K neighbourhood (module docstring).
ROWS_PATTERNS = ("neighborhood2d(13x13)", "dilated(512,4)", "strided(128)",
                 "nbhd 128x128 (32x32)", "nbhd 16x32x32 (3,9,9)", "nbhd 64x64 (16x16)")
#: ``--rows --dry``: tiny grids for the interpreter (a padded 2-D layout, residue classes).
DRY_PATTERNS = {
    "nbhd 9x14 (3x3)": (lambda: spattn.neighborhood((9, 14), 3), 126),
    "dilated(8,4)": (lambda: spattn.compile("dilated(8, 4)"), 256),
}


def alternate(fns, rounds, *, grad_to_none=None, wall=False):
    """Median ms of each of ``fns`` (name -> callable), timed by ``triton.testing.do_bench``
    in ``rounds`` rounds whose order flips every round (``wall``: one wall-clock call each,
    for the CPU check)."""
    names, times = list(fns), {n: [] for n in fns}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            if wall:
                t0 = time.perf_counter()
                fns[n]()
                times[n].append((time.perf_counter() - t0) * 1e3)
                continue
            import triton
            times[n].append(triton.testing.do_bench(fns[n], warmup=10, rep=60,
                                                    grad_to_none=grad_to_none,
                                                    return_mode="median"))
    return {n: statistics.median(x) for n, x in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gathers", action="store_true", help="the gathers alone")
    ap.add_argument("--rows", action="store_true",
                    help="copies against row tables (SPATTN_LAYOUT_GATHER)")
    ap.add_argument("--fwd-only", action="store_true", help="--rows: no forward+backward")
    ap.add_argument("--tune", action="store_true", help="--rows: autotune the stages")
    ap.add_argument("--only", nargs="*", default=None, help="--rows: these patterns")
    ap.add_argument("--dry", action="store_true",
                    help="--rows on the CPU (Triton interpreter, tiny grids)")
    a = ap.parse_args(argv)
    if a.rows or a.dry:
        return rows_mode(a)
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
    os.environ["SPATTN_LAYOUT_GATHER"] = "copy"     # this mode times the gathers themselves
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



def rows_mode(a) -> int:
    """``--rows`` (module docstring): one row per pattern, JSON under ``--out``, a table."""
    saved = {n: os.environ.get(n) for n in ("SPATTN_LAYOUT", "SPATTN_LAYOUT_GATHER",
                                            "SPATTN_AUTOTUNE", "SPATTN_TMA")}
    if not a.tune:
        os.environ["SPATTN_AUTOTUNE"] = "0"
    if a.dry:
        problems, H, D = dict(DRY_PATTERNS), 2, 16
    else:
        problems, H, D = {n: PATTERNS[n] for n in ROWS_PATTERNS}, a.heads, 128
    if a.only:
        problems = {n: problems[n] for n in a.only}
    rows = []
    try:
        for name, (make, tokens) in problems.items():
            try:
                rows.append(measure_rows(name, make, tokens or a.n, H, D, a))
            except Exception as e:   # one pattern failing must not hide the others
                rows.append({"pattern": name, "error": f"{type(e).__name__}: {e}"[:300]})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "layout_rows.json"), "w") as f:
            json.dump(rows, f, indent=1)
    fb = not a.fwd_only
    print("| pattern | N | fwd off ms | fwd copy ms | fwd copy no-TMA ms | fwd kernel ms | "
          "kernel/copy | kernel/off | predicted copy/off | predicted kernel/off |"
          + (" f+b off ms | f+b copy ms | f+b kernel ms | f+b kernel/copy |" if fb else "")
          + " max diff copy | max diff off |")
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if fb else "")
          + "---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['pattern']} | ERROR {r['error'][:120]} |")
            continue
        line = (f"| {r['pattern']} | {r['N']} | {r['fwd_off_ms']:.3f} | {r['fwd_copy_ms']:.3f} "
                f"| {r['fwd_copy_ptr_ms']:.3f} "
                f"| {r['fwd_kernel_ms']:.3f} | {r['fwd_kernel_vs_copy']:.2f} | "
                f"{r['fwd_kernel_vs_off']:.2f} | {r['predicted_copy_vs_off']:.2f} | "
                f"{r['predicted_kernel_vs_off']:.2f} |")
        if fb:
            line += (f" {r['fb_off_ms']:.3f} | {r['fb_copy_ms']:.3f} | {r['fb_kernel_ms']:.3f} "
                     f"| {r['fb_kernel_vs_copy']:.2f} |")
        print(line + f" {r['max_diff']:.2e} | {r['max_diff_off']:.2e} |")
    return 0 if rows and all("error" not in r for r in rows) else 1


def measure_rows(name, make, N, H, D, a):
    """One pattern's ``--rows`` row: plans in sequence order, in the layout with copies and
    with row tables, timed in the same rounds; the table path checked against the copies."""
    from spattn.runtime.plan import PermutedPlan
    pat = make()
    dev, dtype = ("cpu", torch.float32) if a.dry else ("cuda", torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, device=dev, dtype=dtype, generator=g)
               for _ in range(3))
    do = torch.randn(1, H, N, D, device=dev, dtype=dtype, generator=g)
    plans = {}
    for mode, layout, gather, tma in (("off", "off", "copy", None),
                                      ("copy", "on", "copy", None),
                                      ("copy_ptr", "on", "copy", "0"),
                                      ("kernel", "on", "kernel", None)):
        os.environ["SPATTN_LAYOUT"], os.environ["SPATTN_LAYOUT_GATHER"] = layout, gather
        if tma is None:
            os.environ.pop("SPATTN_TMA", None)
        else:
            os.environ["SPATTN_TMA"] = tma
        plans[mode] = pat.plan(q, k, v)
    os.environ.pop("SPATTN_TMA", None)
    if not isinstance(plans["kernel"], PermutedPlan) or plans["kernel"].gather != "kernel":
        raise ValueError("no layout found")
    os.environ["SPATTN_LAYOUT_GATHER"] = "copy"
    lay = pat.explain(N, num_heads=1).layout
    os.environ["SPATTN_LAYOUT_GATHER"] = "kernel"
    lay_k = pat.explain(N, num_heads=1).layout
    grads = {}
    for mode, plan in plans.items():
        if mode == "copy_ptr":
            continue
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        o = pat(qg, kg, vg, plan=plan)
        o.backward(do)
        grads[mode] = (o.detach(), qg.grad, kg.grad, vg.grad)
    diff, diff_off = (max(float((x.float() - y.float()).abs().max())
                          for x, y in zip(grads["kernel"], grads[other]))
                      for other in ("copy", "off"))
    fns = {f"fwd_{m}": (lambda p=p: pat(q, k, v, plan=p)) for m, p in plans.items()}
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    if not a.fwd_only:
        fns.update({f"fb_{m}": (lambda p=p: pat(qg, kg, vg, plan=p).backward(do))
                    for m, p in plans.items() if m != "copy_ptr"})
    ms = alternate(fns, 1 if a.dry else a.rounds, grad_to_none=[qg, kg, vg], wall=a.dry)
    row = {"pattern": name, "N": N, "H": H, "D": D, "layout": lay["layout"], "max_diff": diff,
           "max_diff_off": diff_off, "used_copy": lay["used"], "used_kernel": lay_k["used"],
           **{f"{n}_ms": x for n, x in ms.items()},
           "fwd_kernel_vs_copy": ms["fwd_kernel"] / ms["fwd_copy"],
           "fwd_kernel_vs_off": ms["fwd_kernel"] / ms["fwd_off"],
           "fwd_copy_vs_off": ms["fwd_copy"] / ms["fwd_off"],
           "predicted_copy_vs_off": lay["cost_layout"] / lay["cost_sequence"],
           "predicted_kernel_vs_off": lay_k["cost_layout"] / lay_k["cost_sequence"]}
    if not a.fwd_only:
        row["fb_kernel_vs_copy"] = ms["fb_kernel"] / ms["fb_copy"]
        row["fb_kernel_vs_off"] = ms["fb_kernel"] / ms["fb_off"]
    return row


if __name__ == "__main__":
    sys.exit(main())
