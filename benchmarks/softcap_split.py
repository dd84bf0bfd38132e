"""Softcapping in the Gluon forward (``runtime/ws_fwd.py``, GPU, Hopper): ``exp2`` of every
pair on the special-function unit (flag 3) against half of the pairs' ``exp2`` on the FMA
units (flag 4, ``ws_fwd._exp2_split``), beside the mask alone, in alternating rounds of
``triton.testing.do_bench`` medians in one process. Each variant's o and lse are checked
first against the float64 reference on the last 512 rows of two heads. Problems: causal
and ``causal & window(4096)`` at 16K with ``softcap(30)``, and causal 16K with
``softcap(50)`` at D = 64; B = 1, 16 heads, bf16, autotuning off.

    python benchmarks/softcap_split.py [--rounds 5] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("SPATTN_AUTOTUNE", "0")
os.environ.setdefault("SPATTN_WS_FWD", "1")

import torch  # noqa: E402

import spattn  # noqa: E402
from spattn.runtime.reference import pattern_reference  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import bench_ms  # noqa: E402

PROBLEMS = [  # name, mask, score, N, D
    ("causal 16K softcap(30)", "causal", "softcap(30.0)", 16384, 128),
    ("window(4096) 16K softcap(30)", "causal & window(4096)", "softcap(30.0)", 16384, 128),
    ("causal 16K D64 softcap(50)", "causal", "softcap(50.0)", 16384, 64),
]


def variant(plan, scored: int):
    """A forward of ``plan`` whose Gluon stage launches with flag ``scored``."""
    from spattn.runtime import ws_fwd
    stage = plan.forward_stage
    meta = dict(stage.meta, SCORED=scored)

    def run(q, k, v):
        args, o, lse = stage.args(q, k, v)
        ws_fwd.context_on_thread(q.device)
        stage.kernel[stage.grid](*args, **meta)
        return o, lse
    return run


def check(pat, run, q, k, v) -> dict:
    o, lse = run(q, k, v)
    n = 512
    sub = (q[:, :2, -n:].double(), k[:, :2].double(), v[:, :2].double())
    ro, rl = pattern_reference(pat, *sub, q_offset=q.shape[2] - n)
    return {"o_err": float((o[:, :2, -n:].double() - ro).abs().max()),
            "lse_err": float((lse[:, :2, -n:].double() - rl).abs().max())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows = []
    for name, mask, score, N, D in PROBLEMS:
        g = torch.Generator(device="cuda").manual_seed(N + D)
        q, k, v = (torch.randn(1, 16, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(3))
        pat = spattn.compile(mask, score=score)
        plain = spattn.compile(mask)
        plan, plan0 = pat.plan(q, k, v), plain.plan(q, k, v)
        assert plan.forward_stage.gluon and plan.forward_stage.meta["SCORED"] >= 3, plan
        fns = {"mufu": variant(plan, 3), "split": variant(plan, 4),
               "mask": lambda q, k, v: plan0.forward_stage.run(q, k, v)}
        row = {"problem": name, "N": N, "D": D,
               **{f"{n}_{e}": x for n in ("mufu", "split")
                  for e, x in check(pat, fns[n], q, k, v).items()}}
        times = {n: [] for n in fns}
        for r in range(args.rounds):
            order = list(fns) if r % 2 == 0 else list(fns)[::-1]
            for n in order:
                times[n].append(bench_ms(lambda: fns[n](q, k, v), rep=60))
        for n, t in times.items():
            row[f"{n}_ms"] = sorted(t)[len(t) // 2]
            row[f"{n}_ms_rounds"] = t
        row["cost_mufu"] = row["mufu_ms"] / row["mask_ms"] - 1
        row["cost_split"] = row["split_ms"] / row["mask_ms"] - 1
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "softcap_split.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "rows": rows}, f, indent=1)
    print("| problem | mask alone ms | exp2 on the SFU ms (cost) | half on FMA ms (cost) | "
          "split / SFU | o err SFU / split | lse err SFU / split |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['problem']} | {r['mask_ms']:.3f} | {r['mufu_ms']:.3f} "
              f"({r['cost_mufu']:+.1%}) | {r['split_ms']:.3f} ({r['cost_split']:+.1%}) | "
              f"{r['split_ms'] / r['mufu_ms']:.3f} | {r['mufu_o_err']:.1e} / "
              f"{r['split_o_err']:.1e} | {r['mufu_lse_err']:.1e} / {r['split_lse_err']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
