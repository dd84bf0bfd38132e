"""GPU sweep of spattn launch configurations (tiles, warps, stages), forward and backward.

For each pattern (default: causal, window(1024), causal & (window(1024) | sink(64))) at
N=16384, D=128, bf16, B=1, H=16, every configuration is a set of ``SPATTN_*``
environment overrides (see ``codegen/config.py`` and ``docs/codegen.md``):

* forward configs ``(BM, BN, warps, stages[, loop])`` -> ``SPATTN_BLOCK_M``,
  ``SPATTN_BLOCK_N``, ``SPATTN_FWD_WARPS``, ``SPATTN_FWD_STAGES`` (, ``SPATTN_FWD_LOOP``:
  ``split``, ``fused`` or ``persistent``) (the backward stays at its default);
* backward configs ``(M1, N1, M2, N2, warps, stages[, loop])`` -> ``SPATTN_BWD_BLOCK_M1``,
  ``SPATTN_BWD_BLOCK_N1``, ``SPATTN_BWD_BLOCK_M2``, ``SPATTN_BWD_BLOCK_N2``,
  ``SPATTN_BWD_WARPS``, ``SPATTN_BWD_STAGES`` (, ``SPATTN_BWD_LOOP``: ``split`` or
  ``fused``) (the forward stays at its default).

Each configuration gets fresh kernels (environment set, ``runtime.cache.clear_memory()``),
is checked against a reference computed once per pattern (``o``, ``dq``, ``dk``, ``dv``
within 2e-2 relative error: torch SDPA in fp32 for ``causal`` and ``full``, a dense masked fp32
reference on the GPU for the others) and only then timed: median of
``triton.testing.do_bench`` (forward, and forward+backward through autograd).  A config
that fails to compile (e.g. out of shared memory) or to match is reported and skipped.
TF/s are effective: only allowed pairs count (fwd FLOPs = 4 * D * pairs summed over
heads, fwd+bwd = 3.5x that).

    python benchmarks/sweep.py --json sweep.json
    python benchmarks/sweep.py --patterns causal --only bwd --json bwd.json

Progress goes to stderr; a table per pattern to stdout; JSON (rewritten after every
row) to ``--json``.  Needs CUDA; about 5-7 minutes on an H200 for the defaults (a
``--budget-s`` guard skips the remaining configs when time runs out).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

PATTERNS = ["causal", "window(1024)", "causal & (window(1024) | sink(64))"]
FWD_CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
               (128, 128, 8, 2)]
BWD_CONFIGS = [(32, 128, 128, 32, 4, 4), (64, 128, 128, 64, 8, 3), (64, 64, 64, 64, 4, 3),
               (32, 128, 128, 32, 4, 5), (64, 128, 128, 32, 8, 2)]
FWD_VARS = ("SPATTN_BLOCK_M", "SPATTN_BLOCK_N", "SPATTN_FWD_WARPS", "SPATTN_FWD_STAGES",
            "SPATTN_FWD_LOOP")
BWD_VARS = ("SPATTN_BWD_BLOCK_M1", "SPATTN_BWD_BLOCK_N1", "SPATTN_BWD_BLOCK_M2",
            "SPATTN_BWD_BLOCK_N2", "SPATTN_BWD_WARPS", "SPATTN_BWD_STAGES", "SPATTN_BWD_LOOP")
#: every launch override the sweep controls (cleared for the default config)
ALL_VARS = FWD_VARS + BWD_VARS + ("SPATTN_NUM_WARPS", "SPATTN_NUM_STAGES")
TOL = 2e-2
DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, rep, grad_to_none=None) -> float:
    import triton
    return triton.testing.do_bench(fn, warmup=10, rep=rep, grad_to_none=grad_to_none,
                                   return_mode="median")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def config_env(kind: str, cfg) -> dict:
    names = FWD_VARS if kind == "fwd" else BWD_VARS
    return {n: str(v) for n, v in zip(names, cfg)}


def apply_env(env: dict) -> None:
    """Only ``env``'s overrides in force, and no kernel module kept in memory."""
    from spattn.runtime import cache
    for n in ALL_VARS:
        os.environ.pop(n, None)
    os.environ.update(env)
    cache.clear_memory()


def parse_configs(text: str, width: int, loop: bool = False):
    """``"a,b,c,d;..."`` -> tuples of ``width`` integers (``loop``: optionally followed by
    a loop name: ``split``, ``fused`` or, forward only, ``persistent``)."""
    out = []
    for part in text.split(";"):
        if part.strip():
            xs = [x.strip() for x in part.split(",")]
            tail = xs[width:] if loop else []
            if len(xs) - len(tail) != width or len(tail) > 1:
                raise SystemExit(f"config {part!r}: expected {width} integers"
                                 + (" and an optional loop name" if loop else ""))
            out.append(tuple(int(x) for x in xs[:width]) + tuple(tail))
    return out


# -------------------------------------------------------------- reference

def allowed_pairs(pat, N, H, chunk=2048) -> int:
    total = 0
    for s in range(0, N, chunk):
        n = min(chunk, N - s)
        m = pat.mask(n, N, num_heads=H, q_offset=s, device=DEVICE)
        total += int(m.expand(1, H, n, N).sum())
    return total


def dense_reference(pat, q, k, v, do, scale):
    """fp32 o, dq, dk, dv from the dense mask, one head at a time (O(N^2) per head)."""
    B, H, N, D = q.shape
    out = [torch.empty(q.shape, dtype=torch.float32, device=q.device) for _ in range(4)]
    mask = pat.mask(N, N, num_heads=H, batch=B, device=DEVICE)     # [B', H', N, N] bool
    for b in range(B):
        for h in range(H):
            m = mask[b if mask.shape[0] > 1 else 0, h if mask.shape[1] > 1 else 0]
            qh, kh, vh, doh = (t[b, h].float() for t in (q, k, v, do))
            s = (qh @ kh.T) * scale
            s.masked_fill_(~m, float("-inf"))
            lse = torch.logsumexp(s, -1, keepdim=True)
            p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))
            del s
            oh = p @ vh
            dv = p.T @ doh
            dp = doh @ vh.T
            ds = p * (dp - (doh * oh).sum(-1, keepdim=True))
            del p, dp
            out[0][b, h], out[1][b, h] = oh, (ds @ kh) * scale
            out[2][b, h], out[3][b, h] = (ds.T @ qh) * scale, dv
            del ds
    return tuple(out)


def reference(src, pat, q, k, v, do, scale):
    if src.strip() in ("causal", "full"):
        try:
            import torch.nn.functional as F
            qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
            o = F.scaled_dot_product_attention(qf, kf, vf, is_causal=src.strip() == "causal",
                                               scale=scale)
            o.backward(do.float())
            return o.detach(), qf.grad, kf.grad, vf.grad
        except RuntimeError as e:   # no fp32 SDPA backend: the dense reference instead
            log(f"  SDPA reference failed ({e}); using the dense reference")
    return dense_reference(pat, q, k, v, do, scale)


def rel_err(x, ref) -> float:
    return float((x.float() - ref).norm() / ref.norm().clamp_min(1e-30))


# ---------------------------------------------------------------- one row

def run_config(pat, q, k, v, do, ref, flops_f, *, rep, label, env):
    from spattn.codegen.config import pick
    row = {"config": label, "env": env}
    apply_env(env)
    D = q.shape[-1]
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    t0 = time.perf_counter()
    try:
        from spattn.runtime import settings
        st = settings.current()         # the environment's overrides, as the launchers read them
        cf = pick(pat, "fwd", head_dim=D, dtype=q.dtype, overrides=st.overrides("fwd"))
        cb = pick(pat, "bwd", head_dim=D, dtype=q.dtype, overrides=st.overrides("bwd"))
        row["strategy"] = cf.strategy
        row["fwd_cfg"] = [cf.block_m, cf.block_n, cf.num_warps, cf.num_stages, cf.loop]
        row["bwd_cfg"] = [cb.block_m, cb.block_n, cb.block_m2, cb.block_n2, cb.num_warps,
                          cb.num_stages, cb.loop]
        o = pat(qg, kg, vg)
        o.backward(do)
        sync()
    except Exception as e:   # bad config, compile failure (shared memory, registers), launch
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        return row
    row["compile_s"] = time.perf_counter() - t0
    errs = {n: rel_err(x, r) for n, x, r in zip(("o", "dq", "dk", "dv"),
                                               (o.detach(), qg.grad, kg.grad, vg.grad), ref)}
    row["rel_err"] = errs
    if not all(e < TOL for e in errs.values()) or not all(math.isfinite(e) for e in errs.values()):
        row["error"] = "mismatch: " + ", ".join(f"{n} {e:.2e}" for n, e in errs.items())
        return row
    del o

    def fwd():
        pat(q, k, v)

    def fb():
        pat(qg, kg, vg).backward(do)
    try:
        row["fwd_ms"] = bench_ms(fwd, rep)
        row["fb_ms"] = bench_ms(fb, 2 * rep, grad_to_none=[qg, kg, vg])
    except Exception as e:
        row["error"] = f"timing failed: {type(e).__name__}: {e}"[:300]
        return row
    row["fwd_tflops"] = flops_f / (row["fwd_ms"] * 1e-3) / 1e12
    row["fb_tflops"] = 3.5 * flops_f / (row["fb_ms"] * 1e-3) / 1e12
    return row


def _precompile(src, env, N, D, H, device="cuda"):
    """Worker process: one fwd+bwd call under ``env`` at the sweep's exact shapes, so that
    Triton's and spattn's disk caches hold the kernels (same specialisation) when the
    main process gets to this config.  Returns (src, env, seconds, error or None)."""
    global DEVICE
    DEVICE = device
    t0 = time.perf_counter()
    try:
        import spattn
        apply_env(env)
        pat = spattn.compile(src)
        q, k, v, do = (torch.randn(1, H, N, D, device=DEVICE, dtype=torch.bfloat16)
                       for _ in range(4))
        qg, kg, vg = (t.requires_grad_() for t in (q, k, v))
        pat(qg, kg, vg).backward(do)
        sync()
        return src, env, time.perf_counter() - t0, None
    except Exception as e:
        return src, env, time.perf_counter() - t0, f"{type(e).__name__}: {e}"[:200]


def precompile(jobs, patterns, configs, N, D, H) -> None:
    """Compile every (pattern, config) in ``jobs`` worker processes (compilation is
    CPU-bound and serial per process; the timed runs then load from the disk cache)."""
    import concurrent.futures as cf
    import multiprocessing as mp
    work = [(src, env) for src in patterns for _, env in configs]
    t0 = time.perf_counter()
    log(f"precompiling {len(work)} (pattern, config) pairs in {jobs} processes")
    try:
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
            futs = [ex.submit(_precompile, src, env, N, D, H, DEVICE) for src, env in work]
            for f in cf.as_completed(futs):
                src, env, sec, err = f.result()
                log(f"   {src} {env or 'default'}: {sec:.1f} s" + (f" ({err})" if err else ""))
    except Exception as e:    # an optimisation only: the sweep compiles what is missing
        log(f"   precompile stopped: {type(e).__name__}: {e}")
    log(f"   precompile done in {time.perf_counter() - t0:.1f} s")


def table(src, rows, density) -> str:
    lines = [f"### {src}   (density {density:.4f}; TF/s count allowed pairs only)",
             "| config | strategy | fwd ms | fwd TF/s | f+b ms | f+b TF/s | max rel err |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r.get('strategy', '-')} | ERROR: {r['error']} |")
            continue
        err = max(r["rel_err"].values())
        lines.append(f"| {r['config']} | {r['strategy']} | {r['fwd_ms']:.3f} | "
                     f"{r['fwd_tflops']:.0f} | {r['fb_ms']:.3f} | {r['fb_tflops']:.0f} | "
                     f"{err:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patterns", nargs="*", default=PATTERNS, help="spattn sources")
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--only", choices=("fwd", "bwd"), default=None)
    ap.add_argument("--fwd-configs", default=None,
                    help='"BM,BN,warps,stages[,loop];..." (default: the five of the module)')
    ap.add_argument("--bwd-configs", default=None,
                    help='"M1,N1,M2,N2,warps,stages[,loop];..." (default: the five of the module)')
    ap.add_argument("--strategy", choices=("ranges", "table"), default=None,
                    help="force SPATTN_STRATEGY (default: the analysis's choice)")
    ap.add_argument("--rep", type=int, default=50, help="do_bench rep (ms) of the forward; "
                    "forward+backward uses twice this")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="skip the remaining configs once this much time has passed")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                    help="processes compiling the configs up front (0: compile in turn)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/sweep.py needs a CUDA device")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the sweep times compiled kernels")
    if args.strategy:
        os.environ["SPATTN_STRATEGY"] = args.strategy
    import triton

    import spattn

    fwd_cfgs = parse_configs(args.fwd_configs, 4, loop=True) if args.fwd_configs else FWD_CONFIGS
    bwd_cfgs = parse_configs(args.bwd_configs, 6, loop=True) if args.bwd_configs else BWD_CONFIGS
    configs = [("default", {})]
    if args.only != "bwd":
        configs += [("fwd " + ",".join(map(str, c)), config_env("fwd", c)) for c in fwd_cfgs]
    if args.only != "fwd":
        configs += [("bwd " + ",".join(map(str, c)), config_env("bwd", c)) for c in bwd_cfgs]

    t_start = time.perf_counter()
    N, D, H = args.n, args.d, args.heads
    if args.jobs > 0:
        precompile(args.jobs, args.patterns, configs, N, D, H)
    dt = torch.bfloat16
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "N": N, "D": D, "H": H, "B": 1, "dtype": "bf16",
            "rep_ms": args.rep, "strategy_override": args.strategy,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    results = []
    tables = []

    def dump():
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "patterns": results}, f, indent=1)

    for src in args.patterns:
        log(f"== {src}  [{time.perf_counter() - t_start:.0f} s]")
        pat = spattn.compile(src)
        g = torch.Generator(device=DEVICE).manual_seed(0)
        q, k, v, do = (torch.randn(1, H, N, D, device=DEVICE, dtype=dt, generator=g)
                       for _ in range(4))
        scale = D ** -0.5
        t0 = time.perf_counter()
        ref = reference(src, pat, q, k, v, do, scale)
        pairs = allowed_pairs(pat, N, H)
        torch.cuda.synchronize()
        log(f"   reference and pair count: {time.perf_counter() - t0:.1f} s, "
            f"density {pairs / (H * N * N):.4f}")
        flops_f = 4 * D * pairs
        entry = {"pattern": src, "pairs": pairs, "density": pairs / (H * N * N), "rows": []}
        results.append(entry)
        for label, env in configs:
            if time.perf_counter() - t_start > args.budget_s:
                row = {"config": label, "env": env, "error": "skipped: time budget"}
            else:
                row = run_config(pat, q, k, v, do, ref, flops_f, rep=args.rep, label=label,
                                 env=env)
            entry["rows"].append(row)
            log("  ", {k_: (round(v_, 3) if isinstance(v_, float) else v_)
                       for k_, v_ in row.items() if k_ not in ("env", "rel_err")},
                f"[{time.perf_counter() - t_start:.0f} s]")
            dump()
            torch.cuda.empty_cache()
        apply_env({})
        del ref, q, k, v, do
        torch.cuda.empty_cache()
        tables.append(table(src, entry["rows"], entry["density"]))
    meta["total_s"] = time.perf_counter() - t_start
    dump()
    print(f"device: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}; "
          f"N={N} D={D} H={H} B=1 bf16; {meta['total_s']:.0f} s")
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
