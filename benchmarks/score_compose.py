"""GPU A/B of composed score tables (``SPATTN_SCORE_COMPOSE``, docs/backends.md, Scores).

For each case, plans are built with the composition at its default (``auto``), forced on
(``1``) and off (``0``), each checked against the default's output, and timed in
alternating rounds (the order flips every round) beside the mask alone and, for the
forward, FlexAttention with the same block mask and a score_mod that reads the bucket
from a per-distance table (``rel[h, lut[q - k]]``, what a Flex user would write). The
forward runs as inference; forward+backward gives the learned table its gradient (Flex's
backward of a learned table does not compile on an H200: not timed). Cases (H = 16,
D = 128, bf16):

* ``causal+t5``: ``causal`` with ``s + rel[h, t5_bucket_causal(32, 128)]`` (T5 decoder);
* ``full+t5``: ``full`` with ``s + rel[h, t5_bucket(32, 128)]`` (T5 encoder);
* ``window+relbias``: ``causal & window(1024)`` with ``s + rel[h, clamp(q - k, 0, 1023)]``
  (a clamp: below the default threshold, composed only with ``1``).

    python benchmarks/score_compose.py --n 4096,16384 > OUT.log
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

CASES = {
    "causal+t5": ("causal", "s + rel[h, t5_bucket_causal(32, 128)]", 32,
                  lambda b, h, q, k: q >= k),
    "full+t5": ("full", "s + rel[h, t5_bucket(32, 128)]", 32, None),
    "window+relbias": ("causal & window(1024)", "s + rel[h, clamp(q - k, 0, 1023)]", 1024,
                       lambda b, h, q, k: (q >= k) & (q - k < 1024)),
}
MODES = ("auto", "1", "0")


def _lut(pat, N, dev):
    """The source entry of every distance ``d = q - k + N - 1`` (for Flex's score_mod)."""
    from spattn.ir.compose import compose
    from spattn.ir.evaluate import evaluate
    comp = compose(pat.score, pat.score_inputs, min_ops=1)
    (c,) = comp.composed
    d = torch.arange(-(N - 1), N, dtype=torch.int64)
    return torch.as_tensor(evaluate(c.fn, {"u": d})).expand(2 * N - 1).clamp(min=0).to(dev)


def run_case(name, N, H, q, k, v, do, n_rounds):
    mask, score, entries, mask_mod = CASES[name]
    pat, plain = spattn.compile(mask, score=score), spattn.compile(mask)
    rel = (0.5 * torch.randn(H, entries, device=q.device)).requires_grad_()
    fwd, fb = {}, {}
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    leaves = [qs, ks, vs, rel]
    ref = None
    for mode in MODES:
        with overrides(["SPATTN_SCORE_COMPOSE"], [mode]):
            pl = pat.plan(q, k, v, rel=rel.detach())
            plb = pat.plan(qs, ks, vs, rel=rel, backward=True)
        with torch.no_grad():
            o = pat(q, k, v, plan=pl, rel=rel.detach()).float()
        ref = o if ref is None else ref
        err = ((o - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (name, mode, err)
        fwd[f"score {mode}"] = (lambda pl=pl: pat(q, k, v, plan=pl, rel=rel.detach()))
        fb[f"score {mode}"] = (lambda pl=plb: pat(qs, ks, vs, plan=pl, rel=rel).backward(do))
    pp = plain.plan(q, k, v)
    fwd["mask"] = lambda: plain(q, k, v, plan=pp)
    ppb = plain.plan(qs, ks, vs, backward=True)
    fb["mask"] = lambda: plain(qs, ks, vs, plan=ppb).backward(do)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
        lut, r = _lut(pat, N, q.device), rel.detach()
        bm = None if mask_mod is None else create_block_mask(mask_mod, None, None, N, N,
                                                             device=q.device)
        sm = lambda s, b, h, qi, ki: s + r[h, lut[qi - ki + N - 1]]    # noqa: E731
        flex(q, k, v, score_mod=sm, block_mask=bm)
        fwd["flex"] = lambda: flex(q, k, v, score_mod=sm, block_mask=bm)
    except Exception as e:      # Flex failing must not hide spattn's rows
        print(f"{name} N={N}: flex failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
    row = {}
    bench = lambda fn, grad_to_none=None: bench_ms(fn, rep=50, grad_to_none=grad_to_none)  # noqa: E731
    with torch.no_grad():
        time_rounds(row, {n: (fn, None) for n, fn in fwd.items()}, n_rounds, bench=bench,
                    groups=(tuple(fwd),))
    time_rounds(row, {"fb " + n: (fn, leaves) for n, fn in fb.items()}, n_rounds, bench=bench,
                groups=(tuple("fb " + n for n in fb),))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--n", default="16384")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    raise_recompile_limits()
    H, D = 16, 128
    print("case N | fwd ms: auto, 1, 0, mask, flex | f+b ms: auto, 1, 0, mask", flush=True)
    for N in (int(x) for x in args.n.split(",")):
        g = torch.Generator().manual_seed(0)
        q, k, v, do = (torch.randn(1, H, N, D, generator=g).cuda().bfloat16() for _ in range(4))
        for name in args.cases.split(","):
            try:
                row = run_case(name, N, H, q, k, v, do, args.rounds)
            except Exception as e:      # one case failing must not hide the others
                print(f"{name} N={N}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            f = [row.get(f"{n}_ms", float("nan"))
                 for n in ("score auto", "score 1", "score 0", "mask", "flex")]
            b = [row.get(f"fb {n}_ms", float("nan"))
                 for n in ("score auto", "score 1", "score 0", "mask")]
            print(f"{name} {N} | " + " ".join(f"{x:.3f}" for x in f) + " | "
                  + " ".join(f"{x:.3f}" for x in b), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
