"""GPU benchmark of scores: spattn against FlexAttention with the same score_mod and mask.

Four cases at N=16K, D=128, H=16, bf16 (docs/language.md §13):

* ``causal+softcap(30)``  Gemma 2's soft-capping, ``causal score softcap(30.0)``;
* ``causal+alibi``        ALiBi with per-head slopes, ``causal score alibi(m[h])``;
* ``window+relbias``      ``window(1024)`` with a learned relative bias ``rel [H, 1024]``
                          (its gradient timed too);
* ``nbhd2d+rpb``          a 13 x 13 neighbourhood on a 128-wide grid with NATTEN-style
                          relative position bias ``rpb [H, 13, 13]`` (learned).

For each: spattn forward and forward+backward, FlexAttention (``torch.compile``d
``flex_attention`` with the same ``score_mod`` and a block mask built once) and spattn's
forward of the same mask without the score (the score's cost) in alternating rounds
(``bench.time_rounds``); forwards run as inference (``torch.no_grad``) on every side. Then
the forward and forward+backward through an explicit plan (``pat.plan``, built once;
timed after the rounds). Every case is checked against Flex (outputs, and q, k, v and table
gradients) before timing. Targets: fwd and fwd+bwd >= 1.2x Flex; score cost <= 10%.

    python benchmarks/scores.py --out OUT            # on an H200 (< 90 s with --no-tune)
    python benchmarks/scores.py --dry                # CPU: tiny shapes, logic only

Writes ``OUT/scores.json`` and prints a markdown table last; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import spattn  # noqa: E402


def _slopes(H, dev):
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], device=dev)


def cases(N: int, H: int, dev, dtype):
    """name -> (mask src, score src, params, tables factory, flex mask_mod, flex score_mod
    factory(tables))."""
    W, G, R = 1024, 128, 6
    slopes = _slopes(H, dev)
    return {
        "causal+softcap(30)": (
            "causal", "softcap(30.0)", {}, lambda: {},
            lambda b, h, q, k: q >= k,
            lambda T: (lambda s, b, h, q, k: 30.0 * torch.tanh(s / 30.0))),
        "causal+alibi": (
            "causal", "alibi(m[h])", {"m": slopes.tolist()}, lambda: {},
            lambda b, h, q, k: q >= k,
            lambda T: (lambda s, b, h, q, k: s - slopes[h] * (q - k))),
        "window+relbias": (
            f"causal & window({W})", f"s + rel[h, clamp(q - k, 0, {W - 1})]", {},
            lambda: {"rel": (0.5 * torch.randn(H, W, device=dev)).requires_grad_()},
            lambda b, h, q, k: (q >= k) & (q - k < W),
            lambda T: (lambda s, b, h, q, k: s + T["rel"][h, (q - k).clamp(0, W - 1)])),
        "nbhd2d+rpb": (
            f"abs(q // {G} - k // {G}) <= {R} & abs(q % {G} - k % {G}) <= {R}",
            f"s + rpb[h, clamp(q // {G} - k // {G}, -{R}, {R}) + {R}, "
            f"clamp(q % {G} - k % {G}, -{R}, {R}) + {R}]", {},
            lambda: {"rpb": (0.5 * torch.randn(H, 2 * R + 1, 2 * R + 1,
                                               device=dev)).requires_grad_()},
            lambda b, h, q, k: ((q // G - k // G).abs() <= R) & ((q % G - k % G).abs() <= R),
            lambda T: (lambda s, b, h, q, k: s + T["rpb"][
                h, (q // G - k // G).clamp(-R, R) + R, (q % G - k % G).clamp(-R, R) + R])),
    }


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_case(name, spec, N, H, D, dev, dtype, *, flex_compiled, rounds, dry):
    from bench import bench_ms, time_rounds
    mask, score, params, make_tables, mask_mod, score_mod_of = spec
    row = {"case": name, "N": N, "H": H, "D": D, "mask": mask, "score": score}
    backend = "torch" if dry else "auto"
    pat = spattn.compile(mask, score=score, backend=backend, **params)
    plain = spattn.compile(mask, backend=backend)
    row["source"] = pat.source
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn(1, H, N, D, generator=g).to(dev, dtype) for _ in range(4))
    tables = make_tables()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention, dynamic=False) if flex_compiled else flex_attention
    bm = create_block_mask(mask_mod, None, None, N, N, device=dev)
    score_mod = score_mod_of(tables)

    # correctness: outputs and every gradient against Flex
    t0 = time.perf_counter()
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    try:
        o = pat(qs, ks, vs, **tables)
        o.backward(do)
    except Exception as e:  # named as spattn's, beside a Flex failure below
        row["error"] = f"spattn: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return row
    mine = {n: t.grad.clone() for n, t in tables.items()}
    for t in tables.values():
        t.grad = None
    row["first_call_s"] = time.perf_counter() - t0
    # the same call through an explicit plan (built once; each call passes its tables)
    plan = pat.plan(qs, ks, vs, **tables)
    # the [BM, BN] operations the score adds per pair in the forward kernel it runs
    from spattn.codegen.opcount import score_cost
    row["score_ops"] = score_cost(pat, getattr(getattr(plan, "forward_stage", None),
                                               "config", None))
    with torch.no_grad():
        row["plan_rel_err"] = _rel(pat(q, k, v, plan=plan, **tables), o)
    if dry:     # Flex has no backward on the CPU: outputs only (the tests check gradients)
        with torch.no_grad():
            fixed = score_mod_of({n: t.detach() for n, t in tables.items()})
            row["rel_err_vs_flex"] = _rel(o, flex(q, k, v, score_mod=fixed, block_mask=bm))
    else:
        qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
        try:
            of = flex(qf, kf, vf, score_mod=score_mod, block_mask=bm)
            of.backward(do)
        except Exception as e:  # Flex cannot run it: spattn against the float64 reference
            row["flex_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            of = None
            for t in tables.values():
                t.grad = None
            try:    # its forward alone may still run (the backward needs more shared memory)
                with torch.no_grad():
                    of_fwd = flex(q, k, v, score_mod=score_mod, block_mask=bm)
                row["flex_fwd_only_rel_err"] = _rel(o, of_fwd)
            except Exception as e2:
                row["flex_fwd_error"] = f"{type(e2).__name__}: {str(e2).splitlines()[0][:200]}"
        if of is not None:
            row["rel_err_vs_flex"] = _rel(o, of)
            row["grad_rel_err_vs_flex"] = max(_rel(a.grad, b.grad) for a, b in
                                              ((qs, qf), (ks, kf), (vs, vf)))
            if tables:
                row["table_grad_rel_err_vs_flex"] = max(_rel(mine[n], t.grad)
                                                        for n, t in tables.items())
        else:
            from spattn.runtime.reference import pattern_reference
            n, off = min(512, N), N - min(512, N)      # the last rows of two heads
            sub = dict(scale=None, q_offset=off)
            with torch.no_grad():
                mine_o = pat(q[:, :2, off:], k[:, :2], v[:, :2], **sub, **tables)
                ref_o, _ = pattern_reference(pat, q[:, :2, off:], k[:, :2], v[:, :2], **sub,
                                             **{n_: t.detach() for n_, t in tables.items()})
            row["rel_err_vs_reference"] = _rel(mine_o, ref_o)
    tol = 3e-2 if dtype != torch.float32 else 1e-3
    bad = [key for key in ("rel_err_vs_flex", "grad_rel_err_vs_flex",
                           "table_grad_rel_err_vs_flex", "rel_err_vs_reference",
                           "flex_fwd_only_rel_err", "plan_rel_err")
           if row.get(key, 0) > tol]
    if bad:
        row["error"] = "mismatch vs flex: " + ", ".join(f"{b}={row[b]:.3e}" for b in bad)
        return row
    if dry:
        return row

    leaves = [qs, ks, vs, *tables.values()]
    fleaves = [qf, kf, vf, *tables.values()]

    def fb():
        pat(qs, ks, vs, **tables).backward(do)

    def fb_flex():
        flex(qf, kf, vf, score_mod=score_mod, block_mask=bm).backward(do)
    def inference(fn):
        def run():
            with torch.no_grad():
                fn()
        return run
    # forwards as inference (no graph, so no saved statistics, on every side), the mask
    # without the score timed in the same alternating rounds as the two scored forwards
    timed = {"fwd": (inference(lambda: pat(q, k, v, **tables)), None),
             "fwd_no_score": (inference(lambda: plain(q, k, v)), None),
             "fwdbwd": (fb, leaves)}
    if "flex_error" not in row:
        timed.update({"flex_fwd": (inference(lambda: flex(q, k, v, score_mod=score_mod,
                                                          block_mask=bm)), None),
                      "flex_fwdbwd": (fb_flex, fleaves)})
    elif "flex_fwd_only_rel_err" in row:
        timed["flex_fwd"] = (inference(lambda: flex(q, k, v, score_mod=score_mod,
                                                    block_mask=bm)), None)
    plain(q, k, v)
    time_rounds(row, timed, rounds, bench=lambda fn, grad_to_none=None:
                bench_ms(fn, rep=40, grad_to_none=grad_to_none),
                groups=(("fwd", "flex_fwd", "fwd_no_score"), ("fwdbwd", "flex_fwdbwd")))
    row["fwd_plan_ms"] = bench_ms(inference(lambda: pat(q, k, v, plan=plan, **tables)), rep=40)
    row["fwdbwd_plan_ms"] = bench_ms(
        lambda: pat(qs, ks, vs, plan=plan, **tables).backward(do), rep=40,
        grad_to_none=leaves)
    for kind in ("fwd", "fwdbwd"):
        if f"{kind}_ms" in row and f"flex_{kind}_ms" in row:
            row[f"speedup_{kind}"] = row[f"flex_{kind}_ms"] / row[f"{kind}_ms"]
    row["score_cost"] = row["fwd_ms"] / row["fwd_no_score_ms"] - 1.0
    return row


def table(rows) -> str:
    head = ("| case | fwd ms | Flex fwd | x | fwd+bwd ms | Flex fwd+bwd | x | no-score fwd | "
            "score cost | ops/pair | plan fwd / fwd+bwd | max rel err |")
    out = [head, "|" + "---|" * 12]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['case']} | ERROR: {r['error']} |" + " |" * 10)
            continue

        def f(key, fmt="{:.3f}"):
            return fmt.format(r[key]) if key in r else "-"
        err = max(r.get("rel_err_vs_flex", 0), r.get("grad_rel_err_vs_flex", 0),
                  r.get("table_grad_rel_err_vs_flex", 0), r.get("rel_err_vs_reference", 0))
        out.append(f"| {r['case']} | {f('fwd_ms')} | {f('flex_fwd_ms')} | "
                   f"{f('speedup_fwd', '{:.2f}')} | {f('fwdbwd_ms')} | {f('flex_fwdbwd_ms')} | "
                   f"{f('speedup_fwdbwd', '{:.2f}')} | {f('fwd_no_score_ms')} | "
                   f"{f('score_cost', '{:+.1%}')} | {f('score_ops', '{}')} | {f('fwd_plan_ms')} / "
                   f"{f('fwdbwd_plan_ms')} | {err:.1e} |")
    out += [f"\n{r['case']}: FlexAttention failed ({r['flex_error']}); spattn checked against "
            "the float64 reference on the last 512 rows of two heads" for r in rows
            if "flex_error" in r]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write scores.json here")
    ap.add_argument("--n", type=int, default=None, help="sequence length (16384; --dry: 384)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cases", help="comma-separated subset of the case names")
    ap.add_argument("--no-tune", action="store_true",
                    help="SPATTN_AUTOTUNE=0 (default launch configurations: faster start)")
    ap.add_argument("--dry", action="store_true",
                    help="CPU, tiny shapes, fp32: check every case against eager Flex, no timing")
    args = ap.parse_args(argv)
    if args.no_tune:
        os.environ["SPATTN_AUTOTUNE"] = "0"
    if args.dry:
        dev, dtype, N, H, D = "cpu", torch.float32, args.n or 384, 2, 16
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry for the CPU check", file=sys.stderr)
            return 2
        dev, dtype, N, H, D = "cuda", torch.bfloat16, args.n or 16384, args.heads, args.dim
        from bench import raise_recompile_limits
        raise_recompile_limits()
    specs = cases(N, H, dev, dtype)
    names = args.cases.split(",") if args.cases else list(specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        print(f"unknown case(s) {unknown}; expected some of {list(specs)}", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        t0 = time.perf_counter()
        try:
            row = run_case(name, specs[name], N, H, D, dev, dtype, flex_compiled=not args.dry,
                           rounds=args.rounds, dry=args.dry)
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
        (out / "scores.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1,
                                                    default=str))
    print(table(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
