"""CPU benchmark of the analysis: tiles(), tile tables, closed-form ranges, explain().

    python benchmarks/bench_tiles.py            # every case, markdown table on stdout
    python benchmarks/bench_tiles.py --case window
    python benchmarks/bench_tiles.py --device cuda --L 65536   # GPU (target: window <= 1 ms)

Each case runs in its own subprocess so that its peak memory (max RSS) is its own.
Timings: best of ``--repeat`` runs after one warm-up (the caches of compiled IR are warm,
the tile grids are recomputed every run).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

L = 131072

CASES = {
    # name: (source, L, block, heads, inputs-builder)
    "window": ("window(1024)", L, 128, 1, None),
    "causal": ("causal", L, 128, 1, None),
    "causal&(window|sink)": ("causal & (window(1024) | sink(4))", L, 128, 1, None),
    "per-head (H=16)": ("causal & (q - k < 1024 | k % H == h)", L, 128, 16, None),
    "documents (64 docs)": ("causal & same(doc)", L, 128, 1, "doc"),
    "block table 1/16": ("blocks[q // 128, k // 128]", L, 128, 1, "blocks"),
    "chunked (8192)": ("causal & chunked(8192)", L, 128, 1, None),
    "dilated(512, 4)": ("dilated(512, 4)", L, 128, 1, None),
}


def build_inputs(kind, L):
    g = torch.Generator().manual_seed(0)
    if kind == "doc":
        return {"doc": torch.sort(torch.randint(0, 64, (L,), generator=g)).values}
    if kind == "blocks":
        n = L // 128
        return {"blocks": torch.rand(n, n, generator=g) < 1 / 16}
    return {}


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_case(name, repeat, device="cpu"):
    import spattn
    from spattn.ir.ranges import closed_form, tile_ranges
    from spattn.ir.tables import tile_table
    src, Lx, blk, H, kind = CASES[name]
    p = spattn.compile(src)
    ins = {k: v.to(device) for k, v in build_inputs(kind, Lx).items()}
    p.tiles(Lx, Lx, blk, blk, num_heads=H, device=device, **ins)        # warm-up
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        t = p.tiles(Lx, Lx, blk, blk, num_heads=H, device=device, **ins)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    tt_best = float("inf")
    for _ in range(max(1, repeat // 2)):
        t0 = time.perf_counter()
        tile_table(t)
        _sync(device)
        tt_best = min(tt_best, time.perf_counter() - t0)
    cf = closed_form(p.ir)
    r_best = None
    if cf is not None:
        r_best = float("inf")
        for _ in range(max(1, repeat // 2)):
            t0 = time.perf_counter()
            tile_ranges(cf, Lx, Lx, blk, blk, num_heads=H, device=device)
            _sync(device)
            r_best = min(r_best, time.perf_counter() - t0)
    n = torch.bincount(t.view(-1).long(), minlength=3).tolist()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"case": name, "source": p.source, "L": Lx, "block": blk, "heads": H,
            "tiles": t.numel(), "empty": n[0], "partial": n[1], "full": n[2],
            "tiles_ms": best * 1e3, "table_ms": tt_best * 1e3,
            "ranges_ms": None if r_best is None else r_best * 1e3, "max_rss_mib": rss}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--L", type=int, default=L, help="sequence length (default 131072)")
    a = ap.parse_args()
    if a.case:
        if a.L != L:
            for k_, v_ in CASES.items():
                CASES[k_] = (v_[0], a.L) + v_[2:]
        print(json.dumps(run_case(a.case, a.repeat, a.device)))
        return
    rows = []
    for name in CASES:
        out = subprocess.run([sys.executable, __file__, "--case", name, "--repeat", str(a.repeat),
                              "--device", a.device, "--L", str(a.L)],
                             capture_output=True, text=True, env=dict(os.environ))
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{name}: {rows[-1]['tiles_ms']:.1f} ms", file=sys.stderr)
    if a.device != "cpu":
        print(f"device: {torch.cuda.get_device_name()}")
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    print(f"CPU: {cpu}, {os.cpu_count()} cores visible, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, python {platform.python_version()}\n")
    print("| pattern | L | tiles (BMxBN) | heads | tiles | full / partial / empty | tiles() ms "
          "| tile_table ms | tile_ranges ms | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rg = "-" if r["ranges_ms"] is None else f"{r['ranges_ms']:.2f}"
        print(f"| `{r['source']}` | {r['L']} | {r['block']}x{r['block']} | {r['heads']} | "
              f"{r['tiles']:,} | {r['full']:,} / {r['partial']:,} / {r['empty']:,} | "
              f"{r['tiles_ms']:.1f} | {r['table_ms']:.1f} | {rg} | {r['max_rss_mib']:.0f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
