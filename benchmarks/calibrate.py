"""Fit the cost model of ``ir.cost`` to measured times.

    python benchmarks/calibrate.py            # print the fitted constants of both targets
    python benchmarks/calibrate.py --check    # and the predicted against the measured speedups

The model (``ir.cost.predicted_cost``): a kernel call costs ``full_tile`` per FULL tile,
``partial_tile`` per PARTIAL tile, ``per_row_tile`` per query tile (over batch and heads),
``table_tile`` per visited tile of the table strategy and ``per_call`` once, in units of one
dense tile. The constants are fitted by non-negative least squares (relative errors: each
row weighted by its inverse time) to recorded benchmark rows whose tile counts are
recomputed here from the same patterns, inputs and shapes:

* ``cuda``: the forward times of ``benchmarks/bench.py`` on the H200 at N = 4096, 16384 and
  65536 (D = 128, bf16, H = 16; ``bench_h200_cg10_rounds_*.json``), counted on the
  forward's default 128x64 tiles. The dense baseline is spattn's own ``full`` pattern.
* ``cpu``: the forward times of ``benchmarks/cpu_bench.py`` on 2 cores
  (``cpu_bench_quiet.json``, H = 8, D = 64), counted on the CPU backend's 64x64 tiles. The
  dense baseline is SDPA with a boolean mask, fitted as ``sdpa_pair`` per (query, key)
  pair plus ``per_call``, in the same units.

The printed dictionaries are what ``ir.cost.COSTS`` holds; re-run after a kernel change and
copy them there with the date and commit of the measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
from scipy.optimize import nnls

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import spattn  # noqa: E402
from spattn.ir.cost import tile_counts  # noqa: E402

RESULTS = os.path.join(HERE, "results")
GPU_FILES = ["bench_h200_cg10_rounds_4k.json", "bench_h200_cg10_rounds_16k.json",
             "bench_h200_cg10_rounds_64k.json", "bench_h200_cg10_rounds_64k_rest.json"]
CPU_FILE = "cpu_bench_quiet.json"


def _gpu_rows():
    import bench
    rows = []
    for f in GPU_FILES:
        path = os.path.join(RESULTS, f)
        if not os.path.exists(path):
            continue
        for r in json.load(open(path))["rows"]:
            if r.get("D") != 128 or r.get("dtype") != "bf16" or "fwd_ms" not in r:
                continue
            if r["pattern"] not in bench.PATTERNS:
                continue
            src, params, _, in_factory = bench.PATTERNS[r["pattern"]]
            N, H = r["N"], r["H"]
            ins = in_factory(N, "cpu") if in_factory else {}
            pat = spattn.compile(src, backend="torch", **params)
            c = tile_counts(pat.tiles(N, N, 128, 64, num_heads=H, **ins))
            rows.append(dict(name=f"{r['pattern']}@{N}", ms=r["fwd_ms"], counts=c,
                             table=r.get("strategy") == "table", pairs=N * N * H, N=N))
    return rows


def _cpu_rows():
    import cpu_bench
    rows = []
    data = json.load(open(os.path.join(RESULTS, CPU_FILE)))["rows"]
    for r in data:
        if r["mode"] != "fwd" or not r["shape"].startswith("L="):
            continue
        L = int(r["shape"][2:])
        src, params, ndocs = cpu_bench.CASES[r["case"]]
        g = torch.Generator().manual_seed(0)
        ins = {"doc": cpu_bench._docs(L, ndocs, g)} if ndocs else {}
        pat = spattn.compile(src, backend="torch", **params)
        c = tile_counts(pat.tiles(L, L, 64, 64, num_heads=cpu_bench.H, **ins))
        rows.append(dict(name=f"{r['case']}@{L}", ms=r["spattn_ms"], sdpa_ms=r["sdpa_ms"],
                         counts=c, table=False, pairs=L * L * cpu_bench.H, N=L))
    return rows


def _features(c, table):
    tiles = c["full"] + c["partial"]
    return [c["full"], c["partial"], c["rows"], tiles if table else 0, 1.0]


def fit(rows, dense_rows=None):
    """Constants in units of one dense tile (``full_tile`` = 1 by construction of the
    units: the fitted FULL-tile time is the unit)."""
    A = np.array([_features(r["counts"], r["table"]) for r in rows], dtype=float)
    y = np.array([r["ms"] for r in rows], dtype=float)
    w = 1.0 / y
    coef, _ = nnls(A * w[:, None], y * w)
    unit = coef[0]
    cost = dict(full_tile=1.0, partial_tile=coef[1] / unit, per_row_tile=coef[2] / unit,
                table_tile=coef[3] / unit, per_call=coef[4] / unit, dense_tile=1.0)
    if dense_rows is not None:
        Ad = np.array([[r["pairs"], 1.0] for r in dense_rows], dtype=float)
        yd = np.array([r["sdpa_ms"] for r in dense_rows], dtype=float)
        wd = 1.0 / yd
        cd, _ = nnls(Ad * wd[:, None], yd * wd)
        cost.update(dense_tile=0.0, sdpa_pair=cd[0] / unit, sdpa_call=cd[1] / unit)
    return {k: float(f"{v:.4g}") for k, v in cost.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="print each row's measured and predicted speedup over dense")
    args = ap.parse_args(argv)
    from spattn.ir.cost import predicted_speedup
    gpu = _gpu_rows()
    cpu = _cpu_rows()
    out = {"cuda": fit(gpu), "cpu": fit(cpu, dense_rows=cpu)}
    print(json.dumps(out, indent=1))
    if args.check:
        from spattn.ir.cost import COSTS
        full = {r["N"]: r["ms"] for r in gpu if r["name"].startswith("full@")}
        cases = [("cuda", r, full[r["N"]] / r["ms"]) for r in gpu if r["N"] in full]
        cases += [("cpu", r, r["sdpa_ms"] / r["ms"]) for r in cpu]
        print("| target | row | measured x dense | fitted | in ir.cost |\n|---|---|---|---|---|")
        err = {"fitted": [], "in ir.cost": []}
        for target, r, meas in cases:
            strategy = "table" if r["table"] else "ranges"
            fitted = predicted_speedup(r["counts"], strategy, out[target], pairs=r["pairs"])
            held = predicted_speedup(r["counts"], strategy, COSTS[target], pairs=r["pairs"])
            err["fitted"].append(abs(np.log(fitted / meas)))
            err["in ir.cost"].append(abs(np.log(held / meas)))
            print(f"| {target} | {r['name']} | {meas:.2f} | {fitted:.2f} | {held:.2f} |")
        for k, v in err.items():
            print(f"{k}: median error {100 * (np.exp(np.median(v)) - 1):.0f}%, "
                  f"largest {100 * (np.exp(np.max(v)) - 1):.0f}%")
    return out


if __name__ == "__main__":
    main()
