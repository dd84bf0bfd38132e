"""The 16K rows of ``benchmarks/bench.py`` for the patterns that run in a token layout
(``dilated(512,4)``, ``strided(128)``, the 2-D 13x13 neighbourhood, the per-head stripes)
against FlexAttention, forward and forward+backward, layouts on ``auto`` (the default):
one JSON row per pattern in ``OUT/flex16.json`` and a markdown table last. H = 16, D = 128,
bf16, alternating rounds (``bench.time_rounds``).

    python benchmarks/flex16.py --out OUT [--only NAME ...] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench  # noqa: E402

NAMES = ["dilated(512,4)", "strided(128)", "neighborhood2d(13x13)", "per-head"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in a.only or NAMES:
        print(f"flex16: {name}", file=sys.stderr, flush=True)
        rows.append(bench.run_one(name, 16384, 128, H=16, rounds=a.rounds))
        (out / "flex16.json").write_text(json.dumps(rows, indent=1))
    print("| pattern | fwd ms | Flex fwd ms | x | fwd+bwd ms | Flex ms | x |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        f, ff = r.get("fwd_ms"), r.get("flex_fwd_ms")
        b, fb = r.get("fwdbwd_ms"), r.get("flex_fwdbwd_ms")
        x = (lambda a, c: f"{c / a:.2f}" if a and c else "-")
        print(f"| {r['pattern']} | {f} | {ff} | {x(f, ff)} | {b} | {fb} | {x(b, fb)} |")


if __name__ == "__main__":
    main()
