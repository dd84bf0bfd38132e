"""CPU time of the analysis of big patterns and of plans with layouts on ``auto``.

    python benchmarks/plan_time.py                     # every case, markdown table on stdout
    python benchmarks/plan_time.py --case docs110-plan --repeat 1
    python benchmarks/plan_time.py --out DIR           # also DIR/plan_time.json

Cases (each in its own fresh subprocess, so every per-pattern cache starts empty; the
imports and the parser are warmed by a one-atom pattern first, not counted):

* ``atoms200``: ``q - k != 0 & ... & q - k != 199`` compiled, then ``tiles()`` at
  L = 4096, 128x64 tiles (``benchmarks/many_atoms.py``'s pattern).
* ``streaming`` / ``dilated``: ``tiles()`` of ``bench_tiles.py``'s patterns at L = 131072.
* ``nbhd2d-choose``: ``ir.layout.choose`` of a 17 x 17 neighbourhood over a 64 x 64 grid
  (L = 4096; a product pattern, costed per axis).
* ``nbhd2d-text-choose``: the same with 13 text tokens before the image and 40 after
  (not a product: each candidate box costed by sampling its remapped pattern).
* ``docs110-choose`` / ``docs110-plan``: a 64 x 64 grid pattern (same row or same column)
  cut into 110 documents written as constant ranges (``q >= a & q < b & k >= a & k < b``,
  joined by ``|``): ``choose`` at L = 4096, and the whole ``pat.plan(q, k, v)`` with
  ``SPATTN_LAYOUT=auto`` on the torch backend (not a product: every candidate box is costed
  by classifying sampled query-tile rows of its remapped pattern).
* ``nbhd-docs110-choose``: a 7 x 7 neighbourhood on the 64 x 64 grid cut into the same 110
  documents; ``keys110-choose``: the grid pattern and 110 key ranges of 5 tokens (global
  tokens written as constants; a layout pays).

Times are wall-clock and CPU seconds, the minimum over ``--repeat`` processes (the machine
may be shared). The last lines printed are the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

CHILD = r"""
import json, os, sys, time
case = sys.argv[1]
import torch
torch.set_num_threads(1)
import spattn
from spattn.ir import layout as LY
spattn.compile("q - k != 1").tiles(64, 64, 16, 16)   # imports and the parser, not counted

def docs110(base="q // 64 == k // 64 | q % 64 == k % 64", keys=False):
    L, n = 4096, 110
    step = L // n
    ends = [step * i for i in range(1, n)] + [L]
    if keys:
        return f"({base}) & (" + " | ".join(f"(k >= {a} & k < {a + 5})" for a in
                                          [0] + ends[:-1]) + ")"
    docs = " | ".join(f"(q >= {a} & q < {b} & k >= {a} & k < {b})"
                      for a, b in zip([0] + ends, ends))
    return f"({base}) & ({docs})"

t0, c0 = time.perf_counter(), time.process_time()
if case == "atoms200":
    p = spattn.compile(" & ".join(f"q - k != {i}" for i in range(200)))
    p.tiles(4096, 4096, 128, 64)
    what = "compile + tiles()"
elif case in ("streaming", "dilated"):
    src = {"streaming": "causal & (window(1024) | sink(4))", "dilated": "dilated(512, 4)"}[case]
    p = spattn.compile(src)
    p.tiles(131072, 131072, 128, 128)
    what = "compile + tiles()"
elif case == "nbhd2d-choose":
    p = spattn.neighborhood((64, 64), 17)
    r = LY.choose(p.ir, 4096, 4096, 0, declared=LY.declared(p), force=True)
    what = f"choose: {r.layout}"
elif case == "nbhd2d-text-choose":
    p = spattn.neighborhood((64, 64), 17, extra_before=13, extra_after=40)
    N = 13 + 4096 + 40
    r = LY.choose(p.ir, N, N, 0, declared=LY.declared(p), force=True)
    what = f"choose: {r.layout}"
elif case == "docs110-choose":
    p = spattn.compile(docs110())
    r = LY.choose(p.ir, 4096, 4096, 0, target="cpu")
    what = f"choose: {r.layout if r else 'sequence order'}"
elif case in ("nbhd-docs110-choose", "keys110-choose"):
    if case == "keys110-choose":
        src = docs110(keys=True)
    else:
        src = docs110("abs(q // 64 - k // 64) <= 3 & abs(q % 64 - k % 64) <= 3")
    p = spattn.compile(src)
    r = LY.choose(p.ir, 4096, 4096, 0, target="cpu")
    what = f"choose: {r.layout if r else 'sequence order'}"
elif case == "docs110-plan":
    os.environ["SPATTN_LAYOUT"] = "auto"
    p = spattn.compile(docs110(), backend="torch")
    q = torch.randn(1, 1, 4096, 16)
    plan = p.plan(q, q, q)
    what = f"plan: {type(plan).__name__}"
t1, c1 = time.perf_counter(), time.process_time()
print(json.dumps({"wall": t1 - t0, "cpu": c1 - c0, "what": what}))
"""

CASES = ("atoms200", "streaming", "dilated", "nbhd2d-choose", "nbhd2d-text-choose",
         "docs110-choose", "nbhd-docs110-choose", "keys110-choose",
         "docs110-plan")


def measure(case: str, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", CHILD, case], capture_output=True,
                             text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"wall": min(r["wall"] for r in runs), "cpu": min(r["cpu"] for r in runs),
            "what": runs[0]["what"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", nargs="*", choices=CASES, default=list(CASES))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None, help="folder for plan_time.json")
    args = ap.parse_args(argv)
    rows = {case: measure(case, args.repeat) for case in args.case}
    result = {"machine": platform.processor() or platform.machine(),
              "python": platform.python_version(), "repeat": args.repeat, "cases": rows}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "plan_time.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(f"seconds, wall / cpu, min of {args.repeat} processes")
    print("| case | what | seconds |")
    print("|---|---|---:|")
    for case, r in rows.items():
        print(f"| {case} | {r['what']} | {r['wall']:.3f} / {r['cpu']:.3f} |")
    return result


if __name__ == "__main__":
    main()
