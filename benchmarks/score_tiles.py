"""GPU A/B of forward (or backward) launch configurations for scored patterns.

The cases of ``benchmarks/scores.py`` (N = 16K, H = 16, D = 128, bf16) and two more:
``causal+t5`` (T5's causal buckets into a learned table ``rel [H, 32]``) and
``causal+temp`` (a per-head temperature table). For each case a plan is built per
configuration, through the ``SPATTN_*`` overrides in force while it is built (the plan
keeps its kernels), each checked against the default's output (relative L2 error below
1e-2), and all are timed in alternating rounds (the order flips every round) with, for
the forward, FlexAttention's forward (same score_mod and block mask) and the mask alone at
the default and at 64 x 64 / 2 stages; forwards run as inference. ``--kind bwd`` times
forward+backward with the tables' gradients at backward configurations instead.

    python benchmarks/score_tiles.py --cases window+relbias,nbhd2d+rpb > OUT.log
    python benchmarks/score_tiles.py --kind bwd --cases window+relbias

Prints one line per case and configuration: its time, Flex's time over it, and the
default's time over it (above 1: faster than the default).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("SPATTN_AUTOTUNE", "0")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spattn  # noqa: E402
from bench import bench_ms, overrides, raise_recompile_limits, time_rounds  # noqa: E402
from scores import cases  # noqa: E402

FWD_VARS = ("SPATTN_BLOCK_M", "SPATTN_BLOCK_N", "SPATTN_FWD_WARPS", "SPATTN_FWD_STAGES")
BWD_VARS = ("SPATTN_BWD_BLOCK_M1", "SPATTN_BWD_BLOCK_N1", "SPATTN_BWD_BLOCK_M2",
            "SPATTN_BWD_BLOCK_N2", "SPATTN_BWD_WARPS", "SPATTN_BWD_STAGES")
CONFIGS = {"fwd": [None, (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 4, 3),
                   (128, 64, 8, 2)],
           "bwd": [None, (32, 64, 64, 32, 4, 2), (32, 32, 32, 32, 4, 2),
                   (64, 64, 64, 64, 4, 2), (32, 64, 64, 32, 8, 2), (16, 64, 64, 16, 4, 2)]}


def all_cases(N, H, dev):
    specs = cases(N, H, dev, torch.bfloat16)
    specs["causal+t5"] = (
        "causal", "s + rel[h, t5_bucket_causal(32, 128)]", {},
        lambda: {"rel": (0.5 * torch.randn(H, 32, device=dev)).requires_grad_()}, None, None)
    specs["causal+temp"] = (
        "causal", "s * temp[h]", {},
        lambda: {"temp": (torch.rand(H, device=dev) + 0.5).requires_grad_()},
        lambda b, h, q, k: q >= k, lambda T: (lambda s, b, h, q, k: s * T["temp"][h]))
    return specs


def build(pat, cfg, names, q, k, v, tables, backward=False):
    """A plan under ``cfg``'s overrides of ``names`` (None: the library's default)."""
    with overrides(names, cfg):
        return pat.plan(q, k, v, backward=backward, **tables)


def rounds(fns, n_rounds, grad_to_none=None):
    """Median ms of each of ``fns`` over alternating rounds (:func:`bench.time_rounds`)."""
    row = {}
    time_rounds(row, {n: (fn, grad_to_none) for n, fn in fns.items()}, n_rounds,
                bench=lambda fn, grad_to_none=None: bench_ms(fn, rep=30,
                                                             grad_to_none=grad_to_none),
                groups=(tuple(fns),))
    return {n: row[n + "_ms"] for n in fns}


def forward_case(name, spec, q, k, v, n_rounds):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    mask, score, params, make_tables, mask_mod, score_mod_of = spec
    pat, plain = spattn.compile(mask, score=score, **params), spattn.compile(mask)
    tables = {n: t.detach() for n, t in make_tables().items()}
    N = q.shape[2]
    fns = {}
    if mask_mod is not None:
        bm = create_block_mask(mask_mod, None, None, N, N, device=q.device)
        sm = score_mod_of(tables)
        fns["flex"] = lambda: flex(q, k, v, score_mod=sm, block_mask=bm)
    ref = pat(q, k, v, **tables).float()
    for cfg in CONFIGS["fwd"]:
        pl = build(pat, cfg, FWD_VARS, q, k, v, tables)
        o = pat(q, k, v, plan=pl, **tables).float()
        err = ((o - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (name, cfg, err)
        fns[f"score {cfg}"] = (lambda pl=pl: pat(q, k, v, plan=pl, **tables))
        if cfg in (None, (64, 64, 4, 2)):
            pp = build(plain, cfg, FWD_VARS, q, k, v, {})
            fns[f"mask  {cfg}"] = (lambda pp=pp: plain(q, k, v, plan=pp))
    with torch.no_grad():
        return rounds(fns, n_rounds)


def backward_case(name, spec, q, k, v, do, n_rounds):
    mask, score, params, make_tables, *_ = spec
    pat = spattn.compile(mask, score=score, **params)
    tables = make_tables()
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    leaves = [qs, ks, vs, *tables.values()]
    fns, ref = {}, None
    for cfg in CONFIGS["bwd"]:
        pl = build(pat, cfg, BWD_VARS, qs, ks, vs, tables, backward=True)
        for t in leaves:
            t.grad = None
        pat(qs, ks, vs, plan=pl, **tables).backward(do)
        grads = [t.grad.float().clone() for t in leaves]
        ref = ref or grads
        err = max(((a - b).norm() / b.norm()).item() for a, b in zip(grads, ref))
        assert err < 2e-2, (name, cfg, err)
        fns[f"score {cfg}"] = (lambda pl=pl: pat(qs, ks, vs, plan=pl, **tables).backward(do))
    return rounds(fns, n_rounds, grad_to_none=leaves)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=("fwd", "bwd"), default="fwd")
    ap.add_argument("--cases", default="window+relbias,nbhd2d+rpb,causal+t5,causal+alibi,"
                    "causal+softcap(30),causal+temp")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    raise_recompile_limits()
    N, H, D = 16384, 16, 128
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, H, N, D, generator=g).cuda().bfloat16() for _ in range(4))
    specs = all_cases(N, H, "cuda")
    for name in args.cases.split(","):
        try:
            times = (forward_case(name, specs[name], q, k, v, args.rounds) if args.kind == "fwd"
                     else backward_case(name, specs[name], q, k, v, do, args.rounds))
        except Exception as e:      # one case failing must not hide the others
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        base, flex = times["score None"], times.get("flex", float("nan"))
        for n, ms in times.items():
            print(f"{name:20s} {args.kind} {n:32s} {ms:.3f} ms  flex/this {flex / ms:.2f}  "
                  f"default/this {base / ms:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
