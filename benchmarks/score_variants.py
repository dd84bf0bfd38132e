"""GPU benchmark of the score code variants (docs/backends.md, Scores): how each way of
reading a score's tables and computing its tanh costs against the same mask without a
score, in one process.

The four cases of ``benchmarks/scores.py`` (N = 16K, D = 128, H = 16, bf16) with the
variants that change their kernels:

* ``causal+softcap(30)``: ``fast_tanh`` off (``2 sigmoid(2x) - 1``) and on
  (``tanh.approx.f32``);
* ``causal+alibi``: its cost, the slope's load beside the pair's arithmetic and a step
  ahead;
* ``window+relbias`` and ``nbhd2d+rpb``: ``score_index`` "mask" (a predicated load per
  pair, the kernels of CODEGEN_VERSION 15) and "auto" (unchecked where proven in range,
  else clamped: both cases are proven, their indices clamped by the pattern) with
  ``score_load`` "pair" (today's placement), and "auto" with "early" (loads issued before
  the q·k dot), "ahead" (each step of a tile loop loads the next tile's entries) and, for
  the 1-D bias (a function of ``q - k``), "gather" (one slice per
  tile and ``tl.gather``); ``--all`` adds "mask" with "early" (both tables) and "gather"
  for the 2-D bias (which falls back to "early": the same code).

Each variant is a plan built under its settings (``SPATTN_SCORE_LOAD``, ``SPATTN_SCORE_INDEX``,
``SPATTN_FAST_TANH``; the plan holds them), checked against the float64 reference on the
last rows of two heads (output, and unless ``--no-bwd`` q, k, v and table gradients on a
call of those rows), then timed: forward (and forward+backward) of every variant and of
the mask alone in alternating rounds, the order flipped every round (``bench.bench_ms``:
medians of ``triton.testing.do_bench``). Autotuning off: the default configurations.

    python benchmarks/score_variants.py --out OUT        # on an H200, < 150 s (estimated)
    python benchmarks/score_variants.py --dry            # CPU interpreter: tiny shapes

Writes ``OUT/score_variants.json``; prints a markdown table last (progress on stderr).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: variant name -> settings (unset variables take their defaults)
TANH_VARIANTS = {"tanh-sigmoid": {"SPATTN_FAST_TANH": "0"},
                 "tanh-approx": {"SPATTN_FAST_TANH": "1"}}
TABLE_VARIANTS = {
    "mask-pair": {"SPATTN_SCORE_INDEX": "mask", "SPATTN_SCORE_LOAD": "pair"},
    "auto-pair": {"SPATTN_SCORE_INDEX": "auto", "SPATTN_SCORE_LOAD": "pair"},
    "auto-early": {"SPATTN_SCORE_INDEX": "auto", "SPATTN_SCORE_LOAD": "early"},
    "auto-ahead": {"SPATTN_SCORE_INDEX": "auto", "SPATTN_SCORE_LOAD": "ahead"},
}
GATHER = {"auto-gather": {"SPATTN_SCORE_INDEX": "auto", "SPATTN_SCORE_LOAD": "gather"}}
#: with --all (each variant's kernels compile in ~7-15 s: the default set keeps the run
#: under 150 s on an H200)
MORE = {"mask-early": {"SPATTN_SCORE_INDEX": "mask", "SPATTN_SCORE_LOAD": "early"}}
VARIANTS = {"causal+softcap(30)": TANH_VARIANTS,
            "causal+alibi": {"default": {}, "ahead": {"SPATTN_SCORE_LOAD": "ahead"}},
            "window+relbias": {**TABLE_VARIANTS, **GATHER}, "nbhd2d+rpb": TABLE_VARIANTS}
SETTINGS = ("SPATTN_FAST_TANH", "SPATTN_SCORE_INDEX", "SPATTN_SCORE_LOAD")


@contextlib.contextmanager
def settings(env: dict):
    """The score settings of one variant while its plan is built (restored after)."""
    old = {k: os.environ.get(k) for k in SETTINGS}
    for k in SETTINGS:
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def flags(plan) -> str:
    c = plan.forward_stage.config
    return f"{c.score_load}/{c.score_index}/{'approx' if c.fast_tanh else 'sigmoid'}"


def check(pat, plan_of, tables, q, k, v, *, bwd: bool, rows: int) -> dict:
    """Relative errors of one variant against the float64 reference: the output of the
    last ``rows`` rows of two heads (the full call's kernels, ``plan_of(None)``), and with
    ``bwd`` every gradient of a call of those rows alone (its own plan, same settings)."""
    from spattn.runtime.reference import pattern_reference
    N = q.shape[2]
    off = N - rows
    ref_t = {n: t.detach().double() for n, t in tables.items()}
    with torch.no_grad():
        o = pat(q, k, v, plan=plan_of(None), **tables)
        ro, _ = pattern_reference(pat, q[:, :2, off:].double(), k[:, :2].double(),
                                  v[:, :2].double(), q_offset=off, **ref_t)
    out = {"rel_err": _rel(o[:, :2, off:], ro)}
    if not bwd:
        return out
    qs = q[:, :2, off:].detach().clone().requires_grad_(True)
    ks, vs = (t[:, :2].detach().clone().requires_grad_(True) for t in (k, v))
    tabs = {n: t.detach().clone().requires_grad_(True) for n, t in tables.items()}
    sub = plan_of((qs, ks, vs, off, tabs))
    os_ = pat(qs, ks, vs, plan=sub, q_offset=off, **tabs)
    do = torch.randn_like(os_)
    leaves = [qs, ks, vs, *tabs.values()]
    got = torch.autograd.grad(os_, leaves, do)
    ref = [t.detach().double().requires_grad_(True) for t in leaves]
    ro, _ = pattern_reference(pat, *ref[:3], q_offset=off, **dict(zip(tabs, ref[3:])))
    want = torch.autograd.grad(ro, ref, do.double())
    out["grad_rel_err"] = max(_rel(a, b) for a, b in zip(got, want))
    return out


def run_case(name, spec, variants, N, H, D, dev, dtype, *, rounds, bwd, dry, rep):
    import spattn
    from bench import bench_ms
    mask, score, params, make_tables = spec[:4]
    row = {"case": name, "N": N, "H": H, "D": D, "mask": mask, "score": score, "variants": {}}
    backend = "triton"
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn(1, H, N, D, generator=g).to(dev, dtype) for _ in range(4))
    tables = {n: t.detach() for n, t in make_tables().items()}
    pat = spattn.compile(mask, score=score, backend=backend, **params)
    plain = spattn.compile(mask, backend=backend)
    plans, timed = {}, {}
    base_plan = plain.plan(q, k, v)
    timed["no-score"] = {"fwd": lambda: plain(q, k, v, plan=base_plan)}
    if bwd:
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        tg = {n: t.clone().requires_grad_(True) for n, t in tables.items()}
        base_bwd = plain.plan(qg, kg, vg)
        timed["no-score"]["fwdbwd"] = (
            lambda: plain(qg, kg, vg, plan=base_bwd).backward(do), [qg, kg, vg])
    tol = 3e-2 if dtype != torch.float32 else 1e-3
    rows_checked = min(256, N)
    for vname, env in variants.items():
        with settings(env):
            plan = pat.plan(q, k, v, **tables)
            plan_bwd = pat.plan(qg, kg, vg, **tg) if bwd else None

            def plan_of(sub, plan=plan):
                if sub is None:
                    return plan
                qs, ks, vs, off, tabs = sub
                return pat.plan(qs, ks, vs, q_offset=off, **tabs)
            err = check(pat, plan_of, tables, q, k, v, bwd=bwd, rows=rows_checked)
        from spattn.codegen.opcount import score_cost     # [BM, BN] operations per pair
        info = {"flags": f"{flags(plan)}, {score_cost(pat, plan.forward_stage.config)}",
                **err}
        row["variants"][vname] = info
        bad = [f"{k_}={e:.2e}" for k_, e in err.items() if e > tol]
        if bad:
            info["error"] = "mismatch vs reference: " + ", ".join(bad)
            continue
        plans[vname] = plan
        timed[vname] = {"fwd": (lambda plan=plan: pat(q, k, v, plan=plan, **tables))}
        if bwd:
            timed[vname]["fwdbwd"] = (
                lambda plan=plan_bwd: pat(qg, kg, vg, plan=plan, **tg).backward(do),
                [qg, kg, vg, *tg.values()])
    if dry:
        return row
    for kind in ("fwd", "fwdbwd"):
        names = [n for n in timed if kind in timed[n]]
        times = {n: [] for n in names}
        for r in range(rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                fn = timed[n][kind]
                fn, grads = fn if isinstance(fn, tuple) else (fn, None)
                times[n].append(bench_ms(fn, rep=rep, grad_to_none=grads))
        for n, ts in times.items():
            target = row if n == "no-score" else row["variants"][n]
            target[f"{kind}_ms"] = statistics.median(ts)
            target[f"{kind}_ms_rounds"] = ts
    base = row.get("fwd_ms")
    for info in row["variants"].values():
        if base and "fwd_ms" in info:
            info["score_cost"] = info["fwd_ms"] / base - 1.0
        if row.get("fwdbwd_ms") and "fwdbwd_ms" in info:
            info["score_cost_fwdbwd"] = info["fwdbwd_ms"] / row["fwdbwd_ms"] - 1.0
    return row


def table(rows) -> str:
    out = ["| case | variant | flags (load/index/tanh), ops/pair | fwd ms | score cost fwd | "
           "fwd+bwd ms | cost fwd+bwd | rel err (out / grads) |",
           "|" + "---|" * 8]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['case']} | ERROR: {r['error']} |" + " |" * 6)
            continue
        base = [f"{r[k]:.3f}" if k in r else "-" for k in ("fwd_ms", "fwdbwd_ms")]
        out.append(f"| {r['case']} | (mask alone) | | {base[0]} | | {base[1]} | | |")
        for n, i in r["variants"].items():
            if "error" in i:
                out.append(f"| {r['case']} | {n} | {i['flags']} | ERROR: {i['error']} |"
                           + " |" * 4)
                continue

            def f(key, fmt="{:.3f}"):
                return fmt.format(i[key]) if key in i else "-"
            err = f"{i['rel_err']:.1e}" + (f" / {i['grad_rel_err']:.1e}"
                                           if "grad_rel_err" in i else "")
            out.append(f"| {r['case']} | {n} | {i['flags']} | {f('fwd_ms')} | "
                       f"{f('score_cost', '{:+.1%}')} | {f('fwdbwd_ms')} | "
                       f"{f('score_cost_fwdbwd', '{:+.1%}')} | {err} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write score_variants.json here")
    ap.add_argument("--n", type=int, default=None, help="sequence length (16384; --dry: 96)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rep", type=int, default=30, help="do_bench's rep (ms) per timing")
    ap.add_argument("--no-bwd", action="store_true", help="forward only (faster)")
    ap.add_argument("--all", action="store_true",
                    help="every variant (mask-early too; about 60 s more)")
    ap.add_argument("--cases", help="comma-separated subset of the case names")
    ap.add_argument("--dry", action="store_true",
                    help="CPU under Triton's interpreter, tiny shapes: the logic and the "
                         "checks of every variant, no timing")
    args = ap.parse_args(argv)
    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"
        dev, dtype, N, H, D = "cpu", torch.float32, args.n or 96, 2, 16
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry for the CPU check", file=sys.stderr)
            return 2
        dev, dtype, N, H, D = "cuda", torch.bfloat16, args.n or 16384, args.heads, args.dim
        os.environ["SPATTN_AUTOTUNE"] = "0"
    from scores import cases
    specs = cases(N, H, dev, dtype)
    if args.dry:        # small enough for the interpreter: a 4-wide grid, short window
        specs = _dry_specs(specs, N, H, dev)
    names = args.cases.split(",") if args.cases else list(VARIANTS)
    variants = dict(VARIANTS)
    if args.all:
        variants["window+relbias"] = {**TABLE_VARIANTS, **MORE, **GATHER}
        variants["nbhd2d+rpb"] = {**TABLE_VARIANTS, **MORE, **GATHER}
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown case(s) {unknown}; expected some of {list(VARIANTS)}", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        t0 = time.perf_counter()
        try:
            row = run_case(name, specs[name], variants[name], N, H, D, dev, dtype,
                           rounds=args.rounds, bwd=not args.no_bwd, dry=args.dry, rep=args.rep)
        except Exception as e:  # one case failing must not hide the others
            row = {"case": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        row["wall_s"] = time.perf_counter() - t0
        print(f"{name}: {row.get('error', 'ok')} ({row['wall_s']:.1f} s) "
              f"{json.dumps(row, default=str)}", file=sys.stderr, flush=True)
        rows.append(row)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                "torch": torch.__version__, "dtype": str(dtype), "dry": args.dry}
        (out / "score_variants.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                            indent=1, default=str))
    print(table(rows))
    bad = any("error" in r or any("error" in i for i in r.get("variants", {}).values())
              for r in rows)
    return 1 if bad else 0


def _dry_specs(specs, N, H, dev):
    """The cases at interpreter size: a window of 24 and a 6-wide grid with R = 1."""
    W, G, R = 24, 6, 1
    out = dict(specs)
    out["window+relbias"] = (
        f"causal & window({W})", f"s + rel[h, clamp(q - k, 0, {W - 1})]", {},
        lambda: {"rel": 0.5 * torch.randn(H, W, device=dev)})
    out["nbhd2d+rpb"] = (
        f"abs(q // {G} - k // {G}) <= {R} & abs(q % {G} - k % {G}) <= {R}",
        f"s + rpb[h, clamp(q // {G} - k // {G}, -{R}, {R}) + {R}, "
        f"clamp(q % {G} - k % {G}, -{R}, {R}) + {R}]", {},
        lambda: {"rpb": 0.5 * torch.randn(H, 2 * R + 1, 2 * R + 1, device=dev)})
    return out


if __name__ == "__main__":
    sys.exit(main())
