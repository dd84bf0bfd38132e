"""Each way a token layout's rows reach the Triton kernels, forward and forward+backward
(GPU; docs/layouts.md, "How the kernels reach the rows").

For grid neighbourhoods whose boxes 5-D TMA can read (B = 1, D = 128, bf16; the layout
forced, ``SPATTN_LAYOUT=on``), one plan per way:

* ``copy``: q, k, v gathered into box order and o, the lse (and the gradients) back;
* ``kernel``: row tables in every kernel, no gathers;
* ``box``: the forward through the layout's boxes (5-D TMA on the caller's tensors), the
  backward on gathered copies;
* ``box+rows``: the same forward, the backward through row tables;
* ``auto``: what ``SPATTN_LAYOUT=auto`` with ``SPATTN_LAYOUT_GATHER=auto`` builds (sequence
  order where no layout pays);

and FlexAttention with the pattern's ``mask_mod`` where the problem has one (its block
mask built once), all timed in the same alternating rounds (``triton.testing.do_bench``
medians). The two box plans differ only in the backward, which the cost constants choose
(``ir.layout.resolve_gathers``): each is built with ``ir.cost.COSTS["cuda"]["rows_factor"]``
set to make its way the cheaper. Every plan's output and gradients are compared with the
copy plan's, Flex's output with it too.

    python benchmarks/layout_gathers.py --out DIR [--only NAME ...] [--rounds 3]
    python benchmarks/layout_gathers.py --dry      # tiny, on the CPU (interpreter): a check

Writes ``DIR/layout_gathers.json``; prints a markdown table last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if "--dry" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"      # before Triton is imported: kernels on the CPU
os.environ.setdefault("SPATTN_AUTOTUNE", "0")

import torch  # noqa: E402

import spattn  # noqa: E402
from spattn.ir import cost as C  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from layout_cost import alternate  # noqa: E402


def _nbhd13(b, h, q, k):
    return ((q // 128 - k // 128).abs() <= 6) & ((q % 128 - k % 128).abs() <= 6)


#: name -> (pattern factory, tokens, heads, mask_mod or None)
PROBLEMS = {
    "2-D 13x13 (flattened), 16K": (lambda: spattn.compile(
        "abs(q // 128 - k // 128) <= 6 & abs(q % 128 - k % 128) <= 6"), 16384, 16, _nbhd13),
    "64x64, kernel 8x8": (lambda: spattn.neighborhood((64, 64), (8, 8)), 4096, 16, None),
    "16x32x32, kernel (3, 9, 9)": (lambda: spattn.neighborhood((16, 32, 32), (3, 9, 9)),
                                   16384, 16, None),
    "FLUX 256x256, window 80x80": (lambda: spattn.neighborhood((256, 256), (80, 80)),
                                   65536, 24, None),
    "FLUX, stride 16x16": (lambda: spattn.neighborhood((256, 256), (80, 80), (16, 16)),
                           65536, 24, None),
}
DRY = {"8x16, kernel 3x3": (lambda: spattn.neighborhood((8, 16), (3, 3)), 128, 2, None)}
#: way -> (SPATTN_LAYOUT, SPATTN_LAYOUT_GATHER, rows_factor for the build or None)
WAYS = {"copy": ("on", "copy", None), "kernel": ("on", "kernel", None),
        "box": ("on", "box", 1e9), "box+rows": ("on", "box", -0.5),
        "auto": ("auto", "auto", None)}


def _plan(pat, q, k, v, layout, gather, rows_factor):
    saved = {n: os.environ.get(n) for n in ("SPATTN_LAYOUT", "SPATTN_LAYOUT_GATHER")}
    os.environ["SPATTN_LAYOUT"], os.environ["SPATTN_LAYOUT_GATHER"] = layout, gather
    tilt = {} if rows_factor is None else {"rows_factor": rows_factor}
    try:
        with C.constants("cuda" if q.is_cuda else "cpu", **tilt):
            return pat.plan(q, k, v)
    finally:
        for n, x in saved.items():
            if x is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = x


def measure(name, make, N, H, mask_mod, rounds, dry):
    dev, dt, D = ("cpu", torch.float32, 16) if dry else ("cuda", torch.bfloat16, 128)
    pat = make()
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, do = (torch.randn(1, H, N, D, device=dev, dtype=dt, generator=g)
                   for _ in range(4))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    plans = {w: _plan(pat, qg, kg, vg, *spec) for w, spec in WAYS.items()}
    took = {w: (getattr(p, "gather", "sequence order"), getattr(p, "backward_gather", None))
            for w, p in plans.items()}
    outs = {}
    for w, p in plans.items():
        a, b, c = (t.clone().requires_grad_() for t in (q, k, v))
        o = pat(a, b, c, plan=p)
        o.backward(do)
        outs[w] = [o.detach().float(), a.grad.float(), b.grad.float(), c.grad.float()]
    diff = {w: max(float((x - y).abs().max()) for x, y in zip(outs[w], outs["copy"]))
            for w in outs}
    fns = {f"fwd {w}": (lambda p=p: pat(q, k, v, plan=p)) for w, p in plans.items()}
    fns.update({f"f+b {w}": (lambda p=p: pat(qg, kg, vg, plan=p).backward(do))
                for w, p in plans.items()})
    if mask_mod is not None and not dry:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        bm = create_block_mask(mask_mod, 1, 1, N, N, device=dev)
        flex = torch.compile(flex_attention)
        diff["flex"] = float((flex(q, k, v, block_mask=bm).float() - outs["copy"][0])
                             .abs().max())
        fns["fwd flex"] = lambda: flex(q, k, v, block_mask=bm)
        fns["f+b flex"] = lambda: flex(qg, kg, vg, block_mask=bm).backward(do)
    ms = alternate(fns, 1 if dry else rounds, grad_to_none=[qg, kg, vg], wall=dry)
    return {"problem": name, "N": N, "H": H, "D": D, "took": took, "max_diff_vs_copy": diff,
            "ms": ms}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dry", action="store_true", help="tiny, on the CPU (interpreter)")
    a = ap.parse_args(argv)
    problems = DRY if a.dry else PROBLEMS
    rows = []
    for name, (make, N, H, mm) in problems.items():
        if a.only and name not in a.only:
            continue
        print(name, file=sys.stderr, flush=True)
        rows.append(measure(name, make, N, H, mm, a.rounds, a.dry))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "layout_gathers.json"), "w") as f:
            json.dump(rows, f, indent=1)
    print("| problem | way (forward, backward) | fwd ms | f+b ms | max diff vs copy |")
    print("|---|---|---|---|---|")
    for r in rows:
        for w in list(WAYS) + ["flex"]:
            if f"fwd {w}" not in r["ms"]:
                continue
            how = w if w == "flex" else f"{w} ({', '.join(x for x in r['took'][w] if x)})"
            print(f"| {r['problem']} | {how} | {r['ms'][f'fwd {w}']:.3f} | "
                  f"{r['ms'][f'f+b {w}']:.3f} | {r['max_diff_vs_copy'][w]:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
