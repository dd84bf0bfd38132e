"""First-call time of tile classification for patterns with many comparisons (issue #9).

    python benchmarks/many_atoms.py                      # n = 60 .. 250, L = 4096, 128x64 tiles
    python benchmarks/many_atoms.py --n 200 --L 65536 --repeat 5

The pattern is ``" & ".join(f"q - k != {i}" for i in range(n))``: ``n`` cellable atoms of
one direction, the case where the refinement's static skip (``refinement_cannot_change``)
has the most to decide. Each measurement runs in a fresh subprocess (modules imported and
the parser built by a one-atom pattern first), so ``compile`` and the first ``tiles()`` call
pay every per-pattern step (parsing, canonicalisation, lifting, the skip decision, the
refinement plan) with empty caches; the second call shows the steady state. Times are
wall-clock and CPU seconds, the minimum over ``--repeat`` subprocesses (the machine may be
shared). The target: compile and the first call under 2 s for n = 200 at L = 4096 on the
CPU.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time
n, L, bm, bn = (int(x) for x in sys.argv[1:5])
import torch
import spattn
spattn.compile("q - k != 1").tiles(64, 64, 16, 16)   # imports and the parser, not counted
src = " & ".join(f"q - k != {i}" for i in range(n))
t0, c0 = time.perf_counter(), time.process_time()
p = spattn.compile(src)
t1, c1 = time.perf_counter(), time.process_time()
p.tiles(L, L, bm, bn)
t2, c2 = time.perf_counter(), time.process_time()
p.tiles(L, L, bm, bn)
t3, c3 = time.perf_counter(), time.process_time()
from spattn.ir.tiles import refinement_cannot_change
print(json.dumps({"compile": [t1 - t0, c1 - c0], "first": [t2 - t1, c2 - c1],
                  "second": [t3 - t2, c3 - c2], "skip": refinement_cannot_change(p.ir)}))
"""


def measure(n: int, L: int, bm: int, bn: int, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(L), str(bm), str(bn)],
                             capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {k: [min(r[k][i] for r in runs) for i in range(2)]
            for k in ("compile", "first", "second")}
    best["skip"] = runs[0]["skip"]
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="*", default=[60, 100, 150, 175, 190, 200, 250])
    ap.add_argument("--L", type=int, default=4096)
    ap.add_argument("--block", type=int, nargs=2, default=[128, 64])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    bm, bn = args.block
    print(f"L = {args.L}, tiles {bm}x{bn}; seconds, wall / cpu, min of {args.repeat} processes")
    print("| atoms | compile | first tiles() | second tiles() | refinement skipped |")
    print("|---:|---:|---:|---:|:---:|")
    for n in args.n:
        r = measure(n, args.L, bm, bn, args.repeat)
        cell = lambda k: f"{r[k][0]:.3f} / {r[k][1]:.3f}"   # noqa: E731
        print(f"| {n} | {cell('compile')} | {cell('first')} | {cell('second')} | "
              f"{'yes' if r['skip'] else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
