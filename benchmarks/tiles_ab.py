"""GPU A/B of launch configurations: the library's default against fixed ones.

For each case (a pattern of ``bench.PATTERNS``, or ``documentsK``: ``causal & same(doc)``
with K documents of sorted random cuts; N, B, D; H = 16, bf16, token layouts off,
autotuning off) a plan is built per configuration: the library's default (no override)
and each ``--configs`` entry, through the ``SPATTN_*`` overrides in force while the plan
is built (the plan keeps its compiled kernels):

* ``--kind fwd``: ``BLOCK_M,BLOCK_N,warps,stages``; the forwards ``pat(q, k, v, plan=plan)``
  are timed;
* ``--kind bwd``: ``M1,N1,M2,N2,warps,stages[,loop[,dq[,tma]]]`` (the backward's dK/dV and dQ
  tiles, its loops, and ``dq``: ``kernel`` or ``atomic``, ``SPATTN_BWD_DQ``: dQ added
  atomically by the dK/dV kernel, whose M2 is then the row-statistics kernel's rows and N2
  unused; the forward at its default), and ``tma``: ``SPATTN_TMA``, 1 for TMA loads in the
  generated backward kernels too (on CUDA the default loads through TMA in the forward
  only); forward+backward through autograd is timed, and the backward alone (``bwd ms``:
  gradients of one retained forward graph).

An empty field leaves its variable unset, at the library's choice: ``--kind bwd --configs
",,,,,,,,1"`` is the default tiles with TMA in the backward.

``--dq-ab`` (bwd): the dQ modes A/B: the default tiles with the dQ kernel and atomic, and
atomic at other dK/dV tiles (:data:`DQ_CONFIGS`), on :data:`DQ_CASES` (the ``--quick``
cases first); ``--budget`` seconds (default 180 with ``--dq-ab``) stops starting new cases
once spent, so that the run ends in time (the table then has the cases done). ``--quick``:
only :data:`QUICK` cases.

Every configuration's output (and, for ``bwd``, gradients) is checked against the
default's (max abs difference < 2e-2 times the largest magnitude, at least 1: a 16-bit
gradient summed in another order may round one unit apart; the default is checked against
``bench.py``'s rivals elsewhere), then all are timed in alternating rounds in this process (median of
``triton.testing.do_bench`` per round, median of the rounds).

    python benchmarks/tiles_ab.py --out DIR                       # forward, default cases
    python benchmarks/tiles_ab.py --kind bwd --out DIR            # backward, default cases
    python benchmarks/tiles_ab.py --cases "causal:2048:8:128" --configs 64,64,4,3
    python benchmarks/tiles_ab.py --kind bwd --cpu-check   # the logic, on CPU tensors
    python benchmarks/tiles_ab.py --kind bwd --dq-ab --quick --out DIR   # dQ kernel vs atomic

``--cpu-check`` runs tiny cases (N = 96, H = 2, D = 32, fp32) through the Triton
interpreter with small configurations: every plan is built, run and compared with the
default's, nothing is timed (not a measurement).

Cases are ``name:N:B:D`` separated by ``;``. Writes ``DIR/tiles_<kind>.json``; prints a
table last: each configuration's time over the default's (below 1: faster).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if "--cpu-check" in sys.argv:       # before triton is imported: its jit reads it then
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["SPATTN_BACKEND"] = "triton"
os.environ.setdefault("SPATTN_AUTOTUNE", "0")
os.environ.setdefault("SPATTN_LAYOUT", "off")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

import spattn  # noqa: E402

VARS = {"fwd": ("SPATTN_BLOCK_M", "SPATTN_BLOCK_N", "SPATTN_FWD_WARPS", "SPATTN_FWD_STAGES"),
        "bwd": ("SPATTN_BWD_BLOCK_M1", "SPATTN_BWD_BLOCK_N1", "SPATTN_BWD_BLOCK_M2",
                "SPATTN_BWD_BLOCK_N2", "SPATTN_BWD_WARPS", "SPATTN_BWD_STAGES",
                "SPATTN_BWD_LOOP", "SPATTN_BWD_DQ", "SPATTN_TMA")}
CASES = {
    "fwd": ([f"{p}:16384:1:128" for p in ("full", "causal", "window(1024)", "window(256)",
                                          "streaming", "documents", "prefix_lm(2048)",
                                          "chunked(4096)&causal", "longformer", "bigbird",
                                          "power2(256)", "dilated(512,4)", "per-head")]
            + [f"{p}:4096:1:128" for p in ("causal", "window(256)", "documents", "full")]
            + [f"{p}:2048:8:128" for p in ("causal", "window(256)", "documents")]
            + [f"{p}:1024:8:128" for p in ("causal", "window(256)", "documents")]
            + [f"{p}:65536:1:128" for p in ("causal", "window(1024)", "documents")]
            + [f"{p}:16384:1:64" for p in ("causal", "window(1024)", "documents")]),
    "bwd": ([f"{p}:16384:1:128" for p in ("causal", "window(1024)", "window(256)", "streaming",
                                          "documents20", "documents100", "documents1000",
                                          "longformer", "bigbird")]
            + [f"{p}:4096:1:128" for p in ("causal", "window(256)", "documents100")]
            + [f"{p}:2048:8:128" for p in ("causal", "window(256)", "documents")]
            + [f"{p}:65536:1:128" for p in ("documents100", "documents1000")]),
}
CONFIGS = {"fwd": "64,64,4,3;128,128,8,3",
           "bwd": "64,64,64,64,4,3,split;32,64,64,32,4,3,split;64,64,64,64,4,3,fused;"
                  "32,64,64,32,4,3,fused"}


#: ``--dq-ab``: the default tiles with each dQ mode, then atomic dQ at larger dK/dV tiles
#: (M1 x N1 = 64 x 64 and 64 x 128 with 8 warps, 32 x 128 with 4) and the fused loop (which
#: spills fewer registers: ptxas for sm_90a, D = 128, docs/codegen.md). 64 x 64 with 4
#: warps is left out: it spills the most (7.7 KB of spill stores per thread).
DQ_CONFIGS = ("32,64,64,32,4,3,split;32,64,64,32,4,3,split,atomic;64,64,64,32,8,3,split,atomic;"
              "64,128,64,32,8,3,split,atomic;32,128,64,32,4,3,split,atomic;"
              "64,128,64,32,8,3,fused,atomic")
#: ``--quick`` (and the first of ``--dq-ab``'s cases): what the backward is judged on.
QUICK = ["causal:16384:1:128", "documents4:16384:1:128", "window(1024):16384:1:128",
         "causal:4096:1:128", "causal:2048:8:128", "alibi:16384:1:128"]
DQ_CASES = QUICK + ["documents100:16384:1:128", "streaming:16384:1:128",
                    "longformer:16384:1:128", "documents1000:16384:1:128",
                    "window(256):16384:1:128", "bigbird:16384:1:128"]

#: ``--cpu-check``: tiny cases and interpreter-sized configurations.
CHECK_CASES = ["causal:96:1:32", "documents7:96:2:32", "window(256):96:1:32"]
CHECK_CONFIGS = {"fwd": "16,16,4,1;32,16,4,1",
                 "bwd": "16,32,32,16,4,1,fused;32,16,16,32,4,1,split;"
                        "16,32,32,16,4,1,split,atomic;32,16,16,32,4,1,fused,atomic"}
CHECK_DQ_CASES = ["causal:96:1:32", "documents7:96:2:32", "alibi:80:1:32"]
CHECK_DQ_CONFIGS = "16,32,32,16,4,1,split;16,32,32,16,4,1,split,atomic;32,32,16,16,4,1,fused,atomic"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def pattern_of(name, N, dev):
    """``(pattern, runtime inputs)`` of a case's name."""
    if name == "alibi":             # a score with a derivative: ALiBi's slopes, causal
        return spattn.compile("causal", score="alibi(alibi_slope)"), {}
    if name.startswith("documents") and name[len("documents"):].isdigit():
        return spattn.compile("causal & same(doc)"), {
            "doc": bench._doc_ids(N, dev, ndocs=int(name[len("documents"):]))}
    src, params, _, make_inputs = bench.PATTERNS[name]
    return spattn.compile(src, **params), (make_inputs(N, dev) if make_inputs else {})


def build(kind, pat, q, k, v, inputs, cfg):
    """A plan under ``cfg``'s overrides (None: the library's default)."""
    with bench.overrides(VARS[kind], cfg):
        return pat.plan(q, k, v, backward=kind == "bwd", **inputs)


def setup(check):
    """``(heads, device, dtype)`` of the cases: tiny fp32 CPU ones for ``--cpu-check``."""
    return (2, "cpu", torch.float32) if check else (16, "cuda", torch.bfloat16)


def run_case(kind, case, configs, rounds, rep, check=False):
    name, N, B, D = case.split(":")
    N, B, D = int(N), int(B), int(D)
    H, dev, dt = setup(check)
    pat, inputs = pattern_of(name, N, dev)
    q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=dt) for _ in range(4))
    if kind == "bwd":
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    row = {"case": case, "kind": kind, "configs": {}}
    fns, bwd_fns, ref = {}, {}, None
    for cfg in [None] + configs:
        label = label_of(cfg)
        try:
            plan = build(kind, pat, q, k, v, inputs, cfg)
            if kind == "fwd":
                with torch.no_grad():
                    outs = [pat(q, k, v, plan=plan)]
                fn = (lambda p=plan: pat(q, k, v, plan=p))
            else:
                outs = torch.autograd.grad(pat(q, k, v, plan=plan), (q, k, v), do)

                def fn(p=plan):
                    torch.autograd.grad(pat(q, k, v, plan=p), (q, k, v), do)

                def bwd_fn(o=pat(q, k, v, plan=plan)):      # the backward alone
                    torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
                bwd_fns[label] = bwd_fn
            if ref is None:
                ref = outs
            err = max(float((a.float() - b.float()).abs().max()) for a, b in zip(outs, ref))
            if err > 2e-2 * max(1.0, max(float(b.float().abs().max()) for b in ref)):
                raise RuntimeError(f"differs from the default by {err:.3g}")
            fns[label] = fn
            row["configs"][label] = {"err_vs_default": err, "plan": repr(plan)[:800]}
            if kind == "bwd":
                row["configs"][label]["dq"] = "atomic" if "dQ atomic" in repr(plan) else "kernel"
        except Exception as e:      # a configuration that does not fit or run
            row["configs"][label] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            log(f"{case} {label}: {row['configs'][label]['error']}")
    names = list(fns)
    if check:
        return row
    import triton
    times = {n: [] for n in names}
    btimes = {n: [] for n in names if n in bwd_fns}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            times[n].append(triton.testing.do_bench(fns[n], warmup=5, rep=rep,
                                                    return_mode="median"))
            if n in btimes:
                btimes[n].append(triton.testing.do_bench(bwd_fns[n], warmup=5, rep=rep,
                                                         return_mode="median"))
    base = statistics.median(times["default"]) if "default" in times else None
    bbase = statistics.median(btimes["default"]) if "default" in btimes else None
    for n in names:
        t = statistics.median(times[n])
        row["configs"][n].update(ms=t, rounds=times[n], vs_default=t / base if base else None)
        if n in btimes:
            b = statistics.median(btimes[n])
            row["configs"][n].update(bwd_ms=b, bwd_rounds=btimes[n],
                                     bwd_vs_default=b / bbase if bbase else None)
    log(f"{kind} {case}: " + "  ".join(f"{n} {row['configs'][n]['ms']:.3f} ms" for n in names))
    return row


def table(rows, configs) -> str:
    """Each configuration's time over the default's; for ``bwd`` two numbers per cell,
    forward+backward / backward alone."""
    labels = [label_of(c) for c in configs]
    out = ["| case | default ms | " + " | ".join(labels) + " |",
           "|---|---|" + "---|" * len(labels)]

    def cell(x):
        if not x.get("vs_default"):
            return "-"
        b = x.get("bwd_vs_default")
        return f"{x['vs_default']:.3f}" + (f" / {b:.3f}" if b else "")
    for r in rows:
        c = r["configs"]
        d = c.get("default", {})
        ms = (f"{d['ms']:.3f}" + (f" / {d['bwd_ms']:.3f}" if d.get("bwd_ms") else "")
              if d.get("ms") else "-")
        out.append(f"| {r['case']} | {ms} | " + " | ".join(cell(c.get(lb, {})) for lb in labels)
                   + " |")
    return "\n".join(out)


def parse(text):
    """``--configs`` as tuples; an empty field is None (its variable left unset)."""
    return [tuple(None if x == "" else x if x.isalpha() else int(x) for x in c.split(","))
            for c in text.split(";") if c]


def label_of(cfg) -> str:
    return "default" if cfg is None else ",".join("" if x is None else str(x) for x in cfg)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=("fwd", "bwd"), default="fwd")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cases", default=None, help="name:N:B:D;... (default: the kind's list)")
    ap.add_argument("--configs", default=None, help="fwd: BLOCK_M,BLOCK_N,warps,stages;... "
                    "bwd: M1,N1,M2,N2,warps,stages[,loop[,dq[,tma]]];... (beside the default; an "
                    "empty field: the library's choice)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rep", type=int, default=25)
    ap.add_argument("--cpu-check", action="store_true")
    ap.add_argument("--dq-ab", action="store_true",
                    help="bwd: the dQ kernel against atomic dQ (DQ_CONFIGS on DQ_CASES)")
    ap.add_argument("--quick", action="store_true", help="bwd: only the QUICK cases")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after which no new case starts (default 180 with --dq-ab: a case takes up to ~50 s)")
    args = ap.parse_args(argv)
    if (args.dq_ab or args.quick) and args.kind != "bwd":
        ap.error("--dq-ab and --quick are for --kind bwd")
    if args.cpu_check:
        args.configs = args.configs or (CHECK_DQ_CONFIGS if args.dq_ab else CHECK_CONFIGS[args.kind])
        args.cases = args.cases or ";".join(CHECK_DQ_CASES if args.dq_ab else CHECK_CASES)
    configs = parse(args.configs or (DQ_CONFIGS if args.dq_ab else CONFIGS[args.kind]))
    cases = (args.cases.split(";") if args.cases else QUICK if args.quick
             else DQ_CASES if args.dq_ab else CASES[args.kind])
    budget = args.budget if args.budget is not None else 180.0 if args.dq_ab else None
    start = time.monotonic()
    rows = []
    for case in [c for c in cases if c]:
        if budget is not None and time.monotonic() - start > budget and not args.cpu_check:
            log(f"budget of {budget:.0f} s spent: {case} and later cases not run")
            break
        try:
            rows.append(run_case(args.kind, case, configs, args.rounds, args.rep,
                                 args.cpu_check))
        except Exception as e:
            log(f"{case}: {type(e).__name__}: {e}")
            rows.append({"case": case, "error": f"{type(e).__name__}: {str(e)[:200]}",
                         "configs": {}})
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"tiles_{args.kind}.json"), "w") as f:
                json.dump(rows, f, indent=1)
        if not args.cpu_check:
            torch.cuda.empty_cache()
    if args.cpu_check:
        print(json.dumps(rows, indent=1))
        return rows
    print(table([r for r in rows if "error" not in r], configs))
    return rows


if __name__ == "__main__":
    main()
