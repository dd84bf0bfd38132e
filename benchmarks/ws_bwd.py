"""The warp-specialised backward kernels (``runtime/ws_bwd.py``, ``runtime/ws_dq.py``)
against the generated ones and FlexAttention's backward (GPU, Hopper): where
``SPATTN_WS_BWD=auto`` and ``SPATTN_WS_DQ=auto`` should take them.

Each problem's plan is built twice, with the setting ``--setting`` (``SPATTN_WS_BWD``, the
Gluon dK/dV kernel, with the Gluon dQ kernel where ``SPATTN_WS_DQ`` takes it; or
``SPATTN_WS_DQ``, the Gluon dQ kernel alone, the Gluon dK/dV kernel in both plans) at
``1`` and at ``0``; both, and FlexAttention (Triton backend, compiled, the same block mask
and score), are timed forward+backward (one ``autograd.grad`` of a fresh forward) and
backward alone (``autograd.grad`` of a kept forward) in alternating rounds of
``triton.testing.do_bench`` medians, the two plans' gradients compared first. Problems:
``full`` and ``causal`` at 4K to 64K, causal with ALiBi at 16K, causal documents at sorted
random cuts (1 to 1000 documents) at 16K and 64K. B = 1, 16 heads, D = 128, bf16.

    python benchmarks/ws_bwd.py [--rounds 3] [--out DIR] [--only NAME ...]
                                [--setting SPATTN_WS_DQ]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("SPATTN_AUTOTUNE", "0")

import torch  # noqa: E402

import spattn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import overrides  # noqa: E402
from layout_cost import alternate  # noqa: E402
from ws_fwd import _docs  # noqa: E402

PROBLEMS = [  # name, source, L, documents (, score)
    ("full 16K", "full", 16384, 0),
    ("causal 4K", "causal", 4096, 0),
    ("causal 16K", "causal", 16384, 0),
    ("causal 64K", "causal", 65536, 0),
    ("causal+alibi 16K", "causal", 16384, 0, "alibi"),
    ("1 document 16K", "causal & same(doc)", 16384, 1),
    ("4 documents 16K", "causal & same(doc)", 16384, 4),
    ("20 documents 16K", "causal & same(doc)", 16384, 20),
    ("100 documents 16K", "causal & same(doc)", 16384, 100),
    ("4 documents 64K", "causal & same(doc)", 65536, 4),
    ("20 documents 64K", "causal & same(doc)", 65536, 20),
    ("100 documents 64K", "causal & same(doc)", 65536, 100),
    ("1000 documents 64K", "causal & same(doc)", 65536, 1000),
]


def _plan(pat, q, k, v, inputs, setting: str, ws: str, do):
    """A plan of ``pat`` built with ``setting=ws``, its backward stage built."""
    with overrides([setting], [ws]):
        plan = pat.plan(q, k, v, **inputs)
    torch.autograd.grad(pat(q, k, v, plan=plan), (q, k, v), do)
    return plan


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", nargs="*", help="problem names")
    ap.add_argument("--setting", default="SPATTN_WS_BWD",
                    choices=["SPATTN_WS_BWD", "SPATTN_WS_DQ"])
    a = ap.parse_args(argv)
    field = "ws" if a.setting == "SPATTN_WS_BWD" else "ws_dq"
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    torch._functorch.config.donated_buffer = False      # (Flex's backward run repeatedly)
    flex = torch.compile(flex_attention)
    H, D = 16, 128
    rows = []
    for name, src, L, n_docs, *score in PROBLEMS:
        if a.only and name not in a.only:
            continue
        slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], device="cuda")
        score_mod = (lambda s, b, h, i, j: s - slopes[h] * (i - j)) if score else None
        g = torch.Generator(device="cuda").manual_seed(L + n_docs)
        q, k, v, do = (torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16,
                                   generator=g) for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        inputs = {"doc": _docs(L, n_docs)} if n_docs else {}
        pat = (spattn.compile(src, score="alibi(m[h])", m=slopes.tolist()) if score
               else spattn.compile(src))
        ws, gen = (_plan(pat, q, k, v, inputs, a.setting, x, do) for x in ("1", "0"))
        took = [s for s in ws._bwd.values() if getattr(s, field) is not None]
        g_ws = torch.autograd.grad(pat(q, k, v, plan=ws), (q, k, v), do)
        g_gen = torch.autograd.grad(pat(q, k, v, plan=gen), (q, k, v), do)
        diff = max(float((a_ - b_).float().abs().max() / b_.float().abs().max())
                   for a_, b_ in zip(g_ws, g_gen))
        if src == "full":
            bm = None
        elif n_docs:
            doc = inputs["doc"]
            bm = create_block_mask(lambda b, h, i, j: (i >= j) & (doc[i] == doc[j]), 1, 1, L, L,
                                   device="cuda")
        else:
            bm = create_block_mask(lambda b, h, i, j: i >= j, 1, 1, L, L, device="cuda")
        o_ws, o_gen = pat(q, k, v, plan=ws), pat(q, k, v, plan=gen)
        o_fx = flex(q, k, v, block_mask=bm, score_mod=score_mod)
        grads = (q, k, v)
        fns = {
            "ws f+b": lambda: torch.autograd.grad(pat(q, k, v, plan=ws), grads, do),
            "gen f+b": lambda: torch.autograd.grad(pat(q, k, v, plan=gen), grads, do),
            "flex f+b": lambda: torch.autograd.grad(flex(q, k, v, block_mask=bm,
                                                         score_mod=score_mod), grads, do),
            "ws bwd": lambda: torch.autograd.grad(o_ws, grads, do, retain_graph=True),
            "gen bwd": lambda: torch.autograd.grad(o_gen, grads, do, retain_graph=True),
            "flex bwd": lambda: torch.autograd.grad(o_fx, grads, do, retain_graph=True),
        }
        print(f"{name}: {took[0]!r}" if took else f"{name}: (not taken)",
              f"; max gradient difference {diff:.2e}", flush=True)
        t = alternate(fns, a.rounds)
        rows.append(dict(problem=name, L=L, docs=n_docs, ws_stage=bool(took), max_diff=diff,
                         **{f"{n}_ms": ms for n, ms in t.items()}))
        print(json.dumps(rows[-1]), flush=True)
        del q, k, v, do, o_ws, o_gen, o_fx, fns, ws, gen
        torch.cuda.empty_cache()
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"{field}.json".replace("ws.", "ws_bwd.")), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           rows=rows), f, indent=1)
    print(table(rows))


def table(rows) -> str:
    """The markdown table of ``rows``: ms, and Flex's time over each plan's (above 1:
    faster than Flex), forward+backward and backward alone."""
    out = ["| problem | taken | ws f+b | gen f+b | flex f+b | flex / ws | flex / gen "
           "| ws bwd | gen bwd | flex bwd | gen / ws bwd |", "|---" * 11 + "|"]
    for r in rows:
        out.append(
            f"| {r['problem']} | {'yes' if r['ws_stage'] else 'no'} | {r['ws f+b_ms']:.3f} | "
            f"{r['gen f+b_ms']:.3f} | {r['flex f+b_ms']:.3f} | "
            f"{r['flex f+b_ms'] / r['ws f+b_ms']:.2f} | {r['flex f+b_ms'] / r['gen f+b_ms']:.2f} | "
            f"{r['ws bwd_ms']:.3f} | {r['gen bwd_ms']:.3f} | {r['flex bwd_ms']:.3f} | "
            f"{r['gen bwd_ms'] / r['ws bwd_ms']:.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
