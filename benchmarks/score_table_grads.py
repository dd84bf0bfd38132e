"""GPU benchmark of a learnable table's gradient on the Triton backward (docs/backends.md,
Scores): what the fp32 output for the row correction costs and gains, and what the
deterministic partial buffers cost.

Pattern: causal with a learnable slope per head, ``s + w[h] * float(q - k)`` (learnable
ALiBi), bf16, B = 1, H = 16, D = 128. Variants of one forward+backward:

* ``frozen``: the slopes need no gradient (q, k, v only; the 16-bit output's delta);
* ``rounded``: the slopes' gradient with delta from the 16-bit output (what the kernels
  did before ``runtime.scores.exact_delta``; here by turning that function off);
* ``exact``: the default: the forward writes an fp32 output, the backward's delta reads it;
* ``deterministic``: ``deterministic=True``: also the per-tile sums into partial buffers,
  summed on the host in a fixed order.

A second case, ``window(1024)`` with a learned relative bias ``rel[h, clamp(q - k, 0,
1023)]`` at ``--rel-n`` (4096: its per-diagonal partial buffers stay under the 256 MiB
bound there), times ``exact`` (atomic adds) against ``deterministic`` (per-diagonal sums)
and checks that two deterministic runs are bit-identical.

Accuracy (at ``--check-n``, 2048 by default: the float64 reference is dense): the slope
gradient's relative error against the float64 reference for ``rounded``, ``exact`` and
``deterministic``, and whether two ``deterministic`` runs are bit-identical (and two
atomic ones). Timing at ``--n`` (16K): forward+backward of every variant in alternating
rounds, the order flipped each round (``bench.bench_ms``: medians of
``triton.testing.do_bench``), and the forward of ``frozen`` and ``exact`` (the fp32 output
and its cast). Autotuning off (``SPATTN_AUTOTUNE=0``): the default configurations.

    python benchmarks/score_table_grads.py --out OUT     # on an H200, ~90 s (estimated:
                                                         # mostly ten kernel compilations)
    python benchmarks/score_table_grads.py --out OUT --no-rel   # the slope case alone
    python benchmarks/score_table_grads.py --dry         # CPU interpreter: tiny shapes

Writes ``OUT/score_table_grads.json``; prints a markdown table last (progress on stderr).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

MASK, SCORE = "causal", "s + w[h] * float(q - k)"
VARIANTS = ("frozen", "rounded", "exact", "deterministic")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


@contextlib.contextmanager
def rounded_delta(on: bool):
    """While ``on``: the Triton backward's delta from the 16-bit output (exact_delta off)."""
    from spattn.runtime import scores
    old = scores.exact_delta
    if on:
        scores.exact_delta = lambda *a, **kw: False
    try:
        yield
    finally:
        scores.exact_delta = old


def inputs(N, H, D, dev, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(1, H, N, D, generator=g).to(dev, dtype) for _ in range(4))
    w = (0.1 * torch.randn(H, generator=g)).to(dev)
    return q, k, v, do, w


def step(pat, plan, q, k, v, do, w, variant):
    """One forward+backward of ``variant``; ``(leaves, their grads)``."""
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
    wg = w.detach().clone().requires_grad_(variant != "frozen")
    with rounded_delta(variant == "rounded"):
        o = pat(qg, kg, vg, plan=plan, w=wg, deterministic=variant == "deterministic")
        o.backward(do)
    return wg.grad


def reference_slope_grad(q, k, v, do, w):
    """d(sum(O * dO)) / dw of the float64 dense reference (causal, slope per head)."""
    N, D = q.shape[2], q.shape[3]
    qq, kk, vv = (t.double() for t in (q, k, v))
    ww = w.double().requires_grad_(True)
    pos = torch.arange(N, dtype=torch.float64, device=q.device)
    s = qq @ kk.transpose(-1, -2) / math.sqrt(D) \
        + ww[None, :, None, None] * (pos[:, None] - pos[None, :])
    s = s.masked_fill(pos[:, None] < pos[None, :], -math.inf)
    (torch.softmax(s, -1) @ vv).backward(do.double())
    return ww.grad


def accuracy(pat, N, H, D, dev, dtype) -> dict:
    q, k, v, do, w = inputs(N, H, D, dev, dtype, seed=1)
    plan = pat.plan(q, k, v, w=w)
    want = reference_slope_grad(q, k, v, do, w)
    out = {"N": N}
    for variant in ("rounded", "exact", "deterministic"):
        got = step(pat, plan, q, k, v, do, w, variant)
        out[f"{variant}_rel_err"] = float((got.double() - want).abs().max() / want.abs().max())
    a = step(pat, plan, q, k, v, do, w, "deterministic")
    b = step(pat, plan, q, k, v, do, w, "deterministic")
    out["deterministic_bit_identical"] = bool(torch.equal(a, b))
    a = step(pat, plan, q, k, v, do, w, "exact")
    b = step(pat, plan, q, k, v, do, w, "exact")
    out["atomic_bit_identical"] = bool(torch.equal(a, b))
    return out


def timing(pat, N, H, D, dev, dtype, *, rounds, rep, dry) -> dict:
    from bench import bench_ms
    q, k, v, do, w = inputs(N, H, D, dev, dtype)
    plan = pat.plan(q, k, v, w=w)
    row = {"N": N, "H": H, "D": D}
    for variant in VARIANTS:      # compile every variant (and check it runs) first
        t0 = time.perf_counter()
        step(pat, plan, q, k, v, do, w, variant)
        row[f"{variant}_first_s"] = time.perf_counter() - t0
        log(f"  {variant}: first call {row[f'{variant}_first_s']:.1f} s")
    if dry:
        return row
    wg = w.clone().requires_grad_(True)
    qg = q.clone().requires_grad_(True)

    def fwd(variant):
        return lambda: pat(qg, k, v, plan=plan, w=wg if variant == "exact" else w)
    timed = {("fwd", n): fwd(n) for n in ("frozen", "exact")}
    timed.update({("fwdbwd", n): (lambda n=n: step(pat, plan, q, k, v, do, w, n))
                  for n in VARIANTS})
    for kind in ("fwd", "fwdbwd"):
        names = [n for kd, n in timed if kd == kind]
        times = {n: [] for n in names}
        for r in range(rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                times[n].append(bench_ms(timed[(kind, n)], rep=rep))
        for n, ts in times.items():
            row[f"{n}_{kind}_ms"] = statistics.median(ts)
            row[f"{n}_{kind}_ms_rounds"] = ts
    return row


REL_MASK, REL_SCORE = "causal & window(1024)", "s + rel[h, clamp(q - k, 0, 1023)]"


def relative_bias(N, H, D, dev, dtype, *, rounds, rep, dry) -> dict:
    """Atomic against deterministic table gradients of a learned relative bias."""
    import spattn
    from spattn.runtime import scores
    from bench import bench_ms
    pat = spattn.compile(REL_MASK, score=REL_SCORE, backend="triton")
    g = torch.Generator().manual_seed(2)
    q, k, v, do = (torch.randn(1, H, N, D, generator=g).to(dev, dtype) for _ in range(4))
    rel = (0.1 * torch.randn(H, 1024, generator=g)).to(dev)
    plan = pat.plan(q, k, v, rel=rel)
    calls = []
    torch_bwd = scores.bwd

    def spy(*a, **kw):
        calls.append(1)
        return torch_bwd(*a, **kw)

    def step(det):
        qg = q.detach().requires_grad_(True)
        rg = rel.detach().clone().requires_grad_(True)
        pat(qg, k, v, plan=plan, rel=rg, deterministic=det).backward(do)
        return rg.grad
    scores.bwd = spy
    try:
        a, b = step(True), step(True)
    finally:
        scores.bwd = torch_bwd
    row = {"N": N, "H": H, "D": D, "mask": REL_MASK, "score": REL_SCORE,
           "deterministic_on_triton": not calls, "deterministic_bit_identical":
           bool(torch.equal(a, b)),
           "deterministic_vs_atomic_rel_diff": float((a - step(False)).abs().max()
                                                     / a.abs().max())}
    if dry:
        return row
    timed = {"atomic": lambda: step(False), "deterministic": lambda: step(True)}
    times = {n: [] for n in timed}
    for r in range(rounds):
        for n in (list(timed) if r % 2 == 0 else list(timed)[::-1]):
            times[n].append(bench_ms(timed[n], rep=rep))
    for n, ts in times.items():
        row[f"{n}_fwdbwd_ms"] = statistics.median(ts)
        row[f"{n}_fwdbwd_ms_rounds"] = ts
    return row


def table(acc: dict, row: dict, rel: dict | None = None) -> str:
    out = ["| variant | fwd+bwd ms | vs frozen | fwd ms | slope grad rel err "
           f"(N={acc['N']}) |", "|---|---|---|---|---|"]
    base = row.get("frozen_fwdbwd_ms")
    for n in VARIANTS:
        t = row.get(f"{n}_fwdbwd_ms")
        f = row.get(f"{n}_fwd_ms")
        err = acc.get(f"{n}_rel_err")
        out.append(f"| {n} | {t:.3f} | {t / base - 1:+.1%} | "
                   f"{'-' if f is None else f'{f:.3f}'} | "
                   f"{'-' if err is None else f'{err:.2e}'} |" if t is not None and base else
                   f"| {n} | - | - | - | {'-' if err is None else f'{err:.2e}'} |")
    out.append(f"\ndeterministic runs bit-identical: {acc['deterministic_bit_identical']}; "
               f"atomic runs bit-identical: {acc['atomic_bit_identical']}")
    if rel:
        t = [rel.get(f"{n}_fwdbwd_ms") for n in ("atomic", "deterministic")]
        times = (f"fwd+bwd atomic {t[0]:.3f} ms, deterministic {t[1]:.3f} ms "
                 f"({t[1] / t[0] - 1:+.1%})" if None not in t else "not timed")
        out.append(f"relative bias ({rel['mask']}, N={rel['N']}): {times}; on Triton: "
                   f"{rel['deterministic_on_triton']}, bit-identical: "
                   f"{rel['deterministic_bit_identical']}, vs atomic: "
                   f"{rel['deterministic_vs_atomic_rel_diff']:.1e}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="folder for score_table_grads.json")
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--check-n", type=int, default=2048)
    ap.add_argument("--rel-n", type=int, default=4096)
    ap.add_argument("--no-rel", action="store_true", help="skip the relative-bias case")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--dry", action="store_true",
                    help="CPU, Triton interpreter, tiny shapes (checks the script runs)")
    a = ap.parse_args(argv)
    if a.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        a.n, a.check_n, a.rel_n, a.heads, a.d, dev = 64, 64, 96, 2, 16, "cpu"
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry for the CPU check", file=sys.stderr)
            return 2
        dev = "cuda"
        os.environ["SPATTN_AUTOTUNE"] = "0"      # default configurations: a short start
    import spattn
    pat = spattn.compile(MASK, score=SCORE, backend="triton")
    t0 = time.perf_counter()
    log(f"accuracy at N={a.check_n}")
    acc = accuracy(pat, a.check_n, min(a.heads, 4), a.d, dev, torch.bfloat16)
    log(f"timing at N={a.n}")
    row = timing(pat, a.n, a.heads, a.d, dev, torch.bfloat16, rounds=a.rounds, rep=a.rep,
                 dry=a.dry)
    rel = None
    if not a.no_rel:
        log(f"relative bias at N={a.rel_n}")
        rel = relative_bias(a.rel_n, a.heads, a.d, dev, torch.bfloat16, rounds=a.rounds,
                            rep=a.rep, dry=a.dry)
    result = {"accuracy": acc, "timing": row, "relative_bias": rel, "pattern": MASK,
              "score": SCORE,
              "torch": torch.__version__, "device": "cpu (interpreter)" if a.dry else
              torch.cuda.get_device_name(), "seconds": time.perf_counter() - t0}
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "score_table_grads.json").write_text(json.dumps(result, indent=1))
    print(table(acc, row, rel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
