"""A token layout's FULL key tiles as runs against CSR lists (GPU): the neighbourhood
problems of ``benchmarks/layouts.py`` (FLUX 256 x 256 and Hunyuan 30 x 48 x 80, window and
stride) planned twice in one process, with the table form ``auto`` (runs where every
row's FULL tiles are runs, ``runtime.tables._runs``) and ``csr`` (an index load per key
tile), timed in alternating rounds with cuDNN's dense forward on the same tensors. The
two plans' outputs must agree bit for bit (the runs visit the FULL tiles in the CSR
lists' order). B = 1, 24 heads, D = 128, bf16, each layout's own forward tiles; and four
table patterns in sequence order at 16K tokens (the same two forms).

    python benchmarks/layout_runs.py [--rounds 3] [--bwd] [--only NAME ...] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

os.environ.setdefault("SPATTN_AUTOTUNE", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import spattn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from layout_cost import alternate  # noqa: E402

PROBLEMS = {
    "flux-stride": ((256, 256), (80, 80), (16, 16)),
    "hunyuan-stride": ((30, 48, 80), (18, 24, 24), (16, 8, 8)),
    "flux-window": ((256, 256), (80, 80), 1),
    "hunyuan-window": ((30, 48, 80), (18, 24, 24), 1),
    # table patterns in sequence order (no layout), 16K tokens: FULL tiles as runs where
    # every row's are
    "bigbird-16k": "global_tokens(64) | local(192, 192) | blocks[q // 64, k // 64]",
    "dilated-16k": "dilated(512, 4)",
    "strided-16k": "strided(128)",
    "power2-16k": "power2(256)",
}


def _form(plan, stage: str) -> str:
    line = next(x for x in repr(plan).splitlines() if x.strip().startswith(stage + ":"))
    return line.split("table (")[1].split(")")[0] if "table (" in line else "ranges"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bwd", action="store_true", help="forward+backward too (no cuDNN)")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    H, D, dev, dt = 24, 128, "cuda", torch.bfloat16
    rows = []
    for name, problem in PROBLEMS.items():
        if a.only and name not in a.only:
            continue
        g = torch.Generator(device=dev).manual_seed(0)
        inputs = {}
        if isinstance(problem, str):
            N = 16384
            os.environ["SPATTN_LAYOUT"] = "off"
            os.environ["SPATTN_STRATEGY"] = "table"
            pat = spattn.compile(problem)
            if "blocks" in pat.inputs:
                inputs["blocks"] = (torch.rand(N // 64, N // 64, device=dev, generator=g)
                                    < 0.05).to(torch.int64)
        else:
            N = math.prod(problem[0])
            pat = spattn.neighborhood(*problem)
        q, k, v = (torch.randn(1, H, N, D, device=dev, dtype=dt, generator=g)
                   for _ in range(3))
        plans = {}
        for mode in ("auto", "csr"):
            os.environ["SPATTN_TABLES"] = mode
            plans[mode] = pat.plan(q, k, v, backward=a.bwd, **inputs)
        os.environ.pop("SPATTN_TABLES")
        forms = {m: _form(p, "forward") for m, p in plans.items()}
        outs = {m: pat(q, k, v, plan=p) for m, p in plans.items()}
        same = bool(torch.equal(outs["auto"], outs["csr"]))

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)
        fns = {f"{name} {m}": (lambda p=p: pat(q, k, v, plan=p)) for m, p in plans.items()}
        fns[f"{name} cuDNN dense"] = cudnn
        ms = alternate(fns, a.rounds)
        row = {"problem": name, "N": N, "forms": forms, "bitwise_equal": same,
               "fwd_ms": {m: ms[f"{name} {m}"] for m in plans},
               "cudnn_ms": ms[f"{name} cuDNN dense"]}
        if a.bwd:
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            do = torch.randn_like(q)
            bplans = {}
            for mode in ("auto", "csr"):
                os.environ["SPATTN_TABLES"] = mode
                bplans[mode] = pat.plan(qg, kg, vg, backward=True, **inputs)
            os.environ.pop("SPATTN_TABLES")
            row["bwd_forms"] = {m: _form(p, "backward") for m, p in bplans.items()}

            def step(p):
                pat(qg, kg, vg, plan=p).backward(do)
            bms = alternate({m: (lambda p=p: step(p)) for m, p in bplans.items()}, a.rounds,
                            grad_to_none=[qg, kg, vg])
            row["fwd_bwd_ms"] = bms
            grads = {}
            for m, p in bplans.items():
                for t in (qg, kg, vg):
                    t.grad = None
                step(p)
                grads[m] = [t.grad.clone() for t in (qg, kg, vg)]
            row["grads_bitwise_equal"] = all(torch.equal(x, y) for x, y in
                                             zip(grads["auto"], grads["csr"]))
        rows.append(row)
        print(json.dumps(row), flush=True)
        for var in ("SPATTN_LAYOUT", "SPATTN_STRATEGY"):
            os.environ.pop(var, None)
        outs = plans = None
        torch.cuda.empty_cache()
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "layout_runs.json"), "w") as f:
            json.dump({"rows": rows, "torch": torch.__version__,
                       "device": torch.cuda.get_device_name()}, f, indent=1)
    print("| problem | forms (auto / csr) | fwd auto ms | fwd csr ms | csr / auto | "
          "x cuDNN auto | x cuDNN csr | equal | f+b auto ms | f+b csr ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fa, fc, cd = r["fwd_ms"]["auto"], r["fwd_ms"]["csr"], r["cudnn_ms"]
        fb = r.get("fwd_bwd_ms", {})
        print(f"| {r['problem']} | {r['forms']['auto']} / {r['forms']['csr']} | {fa:.3f} | "
              f"{fc:.3f} | {fc / fa:.3f} | {cd / fa:.2f} | {cd / fc:.2f} | "
              f"{r['bitwise_equal']}{'/' + str(r['grads_bitwise_equal']) if fb else ''} | "
              f"{fb.get('auto', float('nan')):.3f} | {fb.get('csr', float('nan')):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
