"""GPU A/B of forward tile configurations: the library's default against fixed ones.

For each case (a pattern of ``bench.PATTERNS``, N, B, D; H = 16, bf16, token layouts off,
autotuning off) a plan is built per configuration: the library's default (no override)
and each ``--configs`` entry ``BLOCK_M,BLOCK_N,warps,stages`` (through the ``SPATTN_*``
overrides in force while the plan is built; the plan keeps its compiled kernels). Every
configuration's output is checked against the default's (max abs difference < 2e-2; the
default is checked against ``bench.py``'s rivals elsewhere), then the forwards
``pat(q, k, v, plan=plan)`` are timed in alternating rounds in this process (median of
``triton.testing.do_bench`` per round, median of the rounds).

    python benchmarks/fwd_tiles.py --out DIR                     # the default case list
    python benchmarks/fwd_tiles.py --cases causal:2048:8:128 --configs 64,64,4,3

Cases are ``name:N:B:D`` separated by ``;``. Writes ``DIR/fwd_tiles.json``; prints a table last: each
configuration's time over the default's (below 1: faster than the default).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

os.environ.setdefault("SPATTN_AUTOTUNE", "0")
os.environ.setdefault("SPATTN_LAYOUT", "off")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

import spattn  # noqa: E402

VARS = ("SPATTN_BLOCK_M", "SPATTN_BLOCK_N", "SPATTN_FWD_WARPS", "SPATTN_FWD_STAGES")
CASES = ([f"{p}:16384:1:128" for p in ("full", "causal", "window(1024)", "window(256)",
                                       "streaming", "documents", "prefix_lm(2048)",
                                       "chunked(4096)&causal", "longformer", "bigbird",
                                       "power2(256)", "dilated(512,4)", "per-head")]
         + [f"{p}:4096:1:128" for p in ("causal", "window(256)", "documents", "full")]
         + [f"{p}:2048:8:128" for p in ("causal", "window(256)", "documents")]
         + [f"{p}:1024:8:128" for p in ("causal", "window(256)", "documents")]
         + [f"{p}:65536:1:128" for p in ("causal", "window(1024)", "documents")]
         + [f"{p}:16384:1:64" for p in ("causal", "window(1024)", "documents")])


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def build(pat, q, k, v, inputs, cfg):
    """A forward plan under ``cfg``'s overrides (None: the library's default)."""
    saved = {n: os.environ.pop(n, None) for n in VARS}
    try:
        if cfg is not None:
            os.environ.update({n: str(x) for n, x in zip(VARS, cfg)})
        return pat.plan(q, k, v, backward=False, **inputs)
    finally:
        for n, x in saved.items():
            os.environ.pop(n, None)
            if x is not None:
                os.environ[n] = x


def run_case(case, configs, rounds, rep):
    import triton
    name, N, B, D = case.split(":")
    N, B, D, H, dev = int(N), int(B), int(D), 16, "cuda"
    src, params, _, make_inputs = bench.PATTERNS[name]
    pat = spattn.compile(src, **params)
    inputs = make_inputs(N, dev) if make_inputs else {}
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    row = {"case": case, "pattern": name, "N": N, "B": B, "D": D, "configs": {}}
    plans, ref = {}, None
    for cfg in [None] + configs:
        label = "default" if cfg is None else ",".join(map(str, cfg))
        try:
            plan = build(pat, q, k, v, inputs, cfg)
            o = pat(q, k, v, plan=plan)
            if ref is None:
                ref = o
            err = float((o.float() - ref.float()).abs().max())
            if err > 2e-2:
                raise RuntimeError(f"differs from the default by {err:.3g}")
            fwd = getattr(plan, "fwd_config", None)
            plans[label] = plan
            row["configs"][label] = {"err_vs_default": err, "plan": repr(plan)[:300],
                                     "fwd_config": str(fwd) if fwd else None}
        except Exception as e:      # a configuration that does not fit or run
            row["configs"][label] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            log(f"{case} {label}: {row['configs'][label]['error']}")
    names = list(plans)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            p = plans[n]
            times[n].append(triton.testing.do_bench(lambda: pat(q, k, v, plan=p), warmup=5,
                                                    rep=rep, return_mode="median"))
    base = statistics.median(times["default"]) if "default" in times else None
    for n in names:
        t = statistics.median(times[n])
        row["configs"][n].update(ms=t, rounds=times[n], vs_default=t / base if base else None)
    log(f"{case}: " + "  ".join(f"{n} {row['configs'][n]['ms']:.3f} ms" for n in names))
    return row


def table(rows, configs) -> str:
    labels = [",".join(map(str, c)) for c in configs]
    out = ["| case | default ms | " + " | ".join(labels) + " |",
           "|---|---|" + "---|" * len(labels)]
    for r in rows:
        c = r["configs"]
        d = c.get("default", {}).get("ms")
        cells = [f"{c[lb]['vs_default']:.3f}" if c.get(lb, {}).get("vs_default") else "-"
                 for lb in labels]
        out.append(f"| {r['case']} | {d:.3f} | " + " | ".join(cells) + " |" if d else
                   f"| {r['case']} | - | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--cases", default=";".join(CASES), help="name:N:B:D;...")
    ap.add_argument("--configs", default="64,64,4,3;128,128,8,3",
                    help="BLOCK_M,BLOCK_N,warps,stages;... (beside the default)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rep", type=int, default=25)
    args = ap.parse_args(argv)
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs.split(";") if c]
    rows = []
    cases = [c for c in args.cases.split(";") if c]
    for case in cases:
        try:
            rows.append(run_case(case, configs, args.rounds, args.rep))
        except Exception as e:
            log(f"{case}: {type(e).__name__}: {e}")
            rows.append({"case": case, "error": f"{type(e).__name__}: {str(e)[:200]}",
                         "configs": {}})
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "fwd_tiles.json"), "w") as f:
                json.dump(rows, f, indent=1)
        torch.cuda.empty_cache()
    print(table([r for r in rows if "error" not in r], configs))


if __name__ == "__main__":
    main()
