"""CPU benchmark: spattn's torch backend against dense SDPA with a boolean mask.

Both run in one process, timed in alternating rounds (spattn, SDPA, then SDPA, spattn,
...; each entry of a round is the median of ``--reps`` calls), and the reported ratio
is the median over rounds of SDPA time / spattn time (> 1: spattn is faster). Ratios from
one round compare two measurements taken seconds apart, so load from other processes
hits both alike; absolute times are only indicative on a shared machine.

    python benchmarks/cpu_bench.py                       # the suite, forward and fwd+bwd
    python benchmarks/cpu_bench.py --busy 2              # with two busy-loop processes
    python benchmarks/cpu_bench.py --only causal --L 2048 --json out.json

SDPA gets its boolean mask precomputed (``Pattern.mask``; not timed); spattn goes through
the public call (``pattern(q, k, v, **inputs)``) with its plan built by a first, untimed
call, whose time is reported separately ("first call": analysis, plan and masks).
Decode cases (``Lq`` of 1 and 16 against long ``Lk``, bottom-right aligned, GQA) compare
with SDPA given ``enable_gqa=True`` and with k, v expanded to the query heads beforehand
(expansion not timed), and report the faster of the two.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import spattn

B, H, D = 1, 8, 64


def _docs(L: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Document ids ``[L]``: ``n`` documents cut at sorted random positions."""
    cuts = torch.randperm(L - 1, generator=g)[: n - 1] + 1
    ids = torch.zeros(L, dtype=torch.int64)
    ids[cuts] = 1
    return ids.cumsum(0)


#: name -> (source, params, number of documents or None)
CASES = {
    "causal": ("causal", {}, None),
    "causal-window256": ("causal & window(256)", {}, None),
    "docs10": ("causal & same(doc)", {}, 10),
    "window64": ("window(64)", {}, None),
    "docs100": ("causal & same(doc)", {}, 100),
    # few allowed keys in PARTIAL tiles (the plan's ``keys`` strategy)
    "columns64": ("causal & (window(64) | k % 64 == 0)", {}, None),
    "fixed128": ("fixed(128, 8)", {}, None),
    "streaming128": ("causal & (window(128) | sink(4))", {}, None),
    "keep5": ("causal & keep[k]", {}, None),
    # a batch of four left-padded sequences (a batched prefill)
    "padded4": ("causal & k >= first[b]", {}, None),
    # grouped-query heads: 32 query heads over 8 key heads
    "causal-gqa4": ("causal", {}, None),
}

#: Runtime inputs of the cases that take one besides documents: name -> (L, generator) -> inputs
INPUTS = {"keep5": lambda L, g: {"keep": torch.rand(L, generator=g) < 0.05},
          "padded4": lambda L, g: {"first": torch.tensor([0, L // 12, L // 3, 7])}}
#: Batch size of the cases whose batch is not :data:`B`.
BATCH = {"padded4": 4}
#: ``(query heads, key heads)`` of the cases whose heads are not :data:`H` (SDPA gets
#: ``enable_gqa=True``).
HEADS = {"causal-gqa4": (32, 8)}


def _time(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _alternate(fa, fb, rounds: int, reps: int) -> tuple[list, list]:
    """Times of ``fa`` and ``fb`` in alternating rounds (order flipped every round)."""
    ta, tb = [], []
    for r in range(rounds):
        if r % 2 == 0:
            ta.append(_time(fa, reps))
            tb.append(_time(fb, reps))
        else:
            tb.append(_time(fb, reps))
            ta.append(_time(fa, reps))
    return ta, tb


def _runner(fn, backward: bool, tensors, grads):
    if not backward:
        def run():
            with torch.no_grad():
                fn()
        return run

    def run():
        out = fn()
        torch.autograd.backward(out, grads)
        for t in tensors:
            t.grad = None
    return run


def bench_case(name: str, L: int, *, backward: bool, rounds: int, reps: int, seed: int = 0):
    src, params, ndocs = CASES[name]
    g = torch.Generator().manual_seed(seed)
    pat = spattn.compile(src, backend="torch", **params)
    ins = {"doc": _docs(L, ndocs, g)} if ndocs else INPUTS.get(name, lambda L, g: {})(L, g)
    nb = BATCH.get(name, B)
    Hq, Hk = HEADS.get(name, (H, H))
    q, k, v = (torch.randn(nb, h, L, D, generator=g).requires_grad_(backward)
               for h in (Hq, Hk, Hk))
    mask = pat.mask(L, L, num_heads=1, batch=nb, **ins)[:, 0]
    density = float(mask.float().mean())
    mask = mask[:, None] if nb > 1 else mask[0]
    do = torch.randn(nb, Hq, L, D, generator=g)
    t0 = time.perf_counter()
    first = pat(q, k, v, **ins)
    if backward:
        first.backward(do)
    first_s = time.perf_counter() - t0
    sp = _runner(lambda: pat(q, k, v, **ins), backward, (q, k, v), do)
    sd = _runner(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                        enable_gqa=Hq != Hk), backward,
                 (q, k, v), do)
    ts, td = _alternate(sp, sd, rounds, reps)
    return _row(name, f"L={L}", "fwd+bwd" if backward else "fwd", density, ts, td, first_s)


def bench_decode(name: str, Lq: int, Lk: int, *, rounds: int, reps: int, Hq=32, Hk=8,
                 seed: int = 0):
    src, params, _ = CASES[name]
    g = torch.Generator().manual_seed(seed)
    pat = spattn.compile(src, backend="torch", **params)
    q = torch.randn(1, Hq, Lq, D, generator=g)
    k, v = (torch.randn(1, Hk, Lk, D, generator=g) for _ in range(2))
    mask = pat.mask(Lq, Lk)[0, 0]
    density = float(mask.float().mean())
    ke, ve = (t.repeat_interleave(Hq // Hk, 1) for t in (k, v))
    t0 = time.perf_counter()
    pat(q, k, v)
    first_s = time.perf_counter() - t0
    with torch.no_grad():
        sp = lambda: pat(q, k, v)                                    # noqa: E731
        gqa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,  # noqa: E731
                                                     enable_gqa=True)
        exp = lambda: F.scaled_dot_product_attention(q, ke, ve, attn_mask=mask)  # noqa: E731
        t_g = _time(gqa, reps)
        t_e = _time(exp, reps)
        sd = gqa if t_g <= t_e else exp
        ts, td = _alternate(sp, sd, rounds, reps)
    label = f"Lq={Lq} Lk={Lk} Hq={Hq} Hk={Hk}"
    return _row(name, label, "decode" + ("" if sd is gqa else " (sdpa: expanded kv)"), density,
                ts, td, first_s)


def _row(name, shape, mode, density, ts, td, first_s):
    ratios = [b / a for a, b in zip(ts, td)]
    return {"case": name, "shape": shape, "mode": mode, "density": density,
            "spattn_ms": 1e3 * statistics.median(ts), "sdpa_ms": 1e3 * statistics.median(td),
            "speedup": statistics.median(ratios), "speedup_min": min(ratios),
            "speedup_max": max(ratios), "first_call_ms": 1e3 * first_s, "rounds": len(ts)}


def _print(row):
    print(f"{row['case']:18s} {row['shape']:28s} {row['mode']:8s} dens {row['density']:6.3f}  "
          f"spattn {row['spattn_ms']:8.1f} ms  sdpa {row['sdpa_ms']:8.1f} ms  "
          f"x{row['speedup']:5.2f} [{row['speedup_min']:.2f}-{row['speedup_max']:.2f}]  "
          f"first {row['first_call_ms']:7.1f} ms", flush=True)


def environment() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True,
                                  cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        except OSError:
            return ""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
            "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "loadavg": os.getloadavg()}


def table(paths: list) -> str:
    """A markdown table of the speedups (SDPA time / spattn time) of recorded runs, one
    column per file (``--json`` output), rows matched by case, shape and mode."""
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append(json.load(f))
    head = ["case", "shape", "mode", "density"]
    for r in runs:
        env = r["environment"]
        head.append(f"x ({'busy %d' % env['busy'] if env['busy'] else 'no busy loop'})")
    keys = []
    for r in runs:
        for row in r["rows"]:
            k = (row["case"], row["shape"], row["mode"].split(" (")[0])
            if k not in keys:
                keys.append(k)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        cells = list(k)
        dens = None
        for r in runs:
            row = next((x for x in r["rows"]
                        if (x["case"], x["shape"], x["mode"].split(" (")[0]) == k), None)
            if row is None:
                cells.append("")
                continue
            dens = row["density"]
            cells.append(f"{row['speedup']:.2f} ({row['spattn_ms']:.0f} / {row['sdpa_ms']:.0f} ms)")
        cells.insert(3, f"{dens:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, choices=sorted(CASES),
                    help="cases to run (default: all)")
    ap.add_argument("--L", nargs="*", type=int, default=[1024, 2048, 4096])
    ap.add_argument("--modes", nargs="*", default=["fwd", "fwd+bwd", "decode"],
                    choices=["fwd", "fwd+bwd", "decode"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3, help="calls per entry of a round (median)")
    ap.add_argument("--busy", type=int, default=0,
                    help="start this many busy-loop processes for the measurement")
    ap.add_argument("--json", default=None, help="write the rows and environment here")
    ap.add_argument("--table", nargs="+", default=None, metavar="JSON",
                    help="print a markdown table of recorded runs (no measurement)")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0

    env = environment()
    env["busy"] = args.busy
    print(json.dumps(env))
    busy = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(args.busy)]
    rows = []
    try:
        names = args.only or list(CASES)
        for mode in ("fwd", "fwd+bwd"):
            if mode not in args.modes:
                continue
            for name in names:
                for L in args.L:
                    rows.append(bench_case(name, L, backward=mode == "fwd+bwd",
                                           rounds=args.rounds, reps=args.reps))
                    _print(rows[-1])
        if "decode" in args.modes:
            for name in [n for n in ("causal", "causal-window256") if n in names]:
                for Lq, Lk in ((1, 1024), (1, 8192), (16, 1024), (16, 8192)):
                    rows.append(bench_decode(name, Lq, Lk, rounds=args.rounds,
                                             reps=max(args.reps, 5)))
                    _print(rows[-1])
    finally:
        for p in busy:
            p.kill()
            p.wait()
    env["loadavg_end"] = os.getloadavg()
    print(json.dumps({"loadavg_end": env["loadavg_end"]}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
