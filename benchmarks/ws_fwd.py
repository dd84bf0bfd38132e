"""The warp-specialised forward (``runtime/ws_fwd.py``) against the generated one and
cuDNN (GPU, Hopper): where ``SPATTN_WS_FWD=auto`` should take it.

Each problem's plan is built twice, with ``SPATTN_WS_FWD=1`` (the warp-specialised
forward wherever it runs) and ``=0`` (the generated forward, as the plan otherwise
chooses it), and both calls are timed with cuDNN's dense forward (the dense problems) in
alternating rounds of ``triton.testing.do_bench`` medians, each output checked against
the other first. Problems: ``full`` at 1K to 16K tokens (B = 1 and 8, 16 heads, D = 64
and 128), 128-aligned documents of 1024 tokens at 16K, block-diagonal attention with
one key tile per query tile (``q // 128 == k // 128``), and patterns with PARTIAL tiles,
whose masks the kernel reads: causal at 4K to 64K, causal documents at random cuts;
and #21's strided neighbourhoods (FLUX 256x256, window 80x80, stride 16x16; Hunyuan
30x48x80, window 18x24x24, stride 16x8x8; 24 heads), read through their boxes, against
cuDNN's dense forward. Where every work item has as many key tiles as every other, the
stage is also timed with the other grid, in the same rounds: a program per item (``grid
= n_work``) where it runs persistent programs (one per SM, taking items in turn), else
persistent programs (``ws_fwd.PERSISTENT_MAX_TILES``). bf16. ``us`` is the call's median,
host time included where the GPU waits for it.

    python benchmarks/ws_fwd.py [--rounds 3] [--out DIR] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("SPATTN_AUTOTUNE", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import spattn  # noqa: E402
from spattn.runtime.triton_backend import _persistent_programs  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from layout_cost import alternate  # noqa: E402

PROBLEMS = [  # name, source, B, H, L, D, inputs(L)
    ("full 1K", "full", 1, 16, 1024, 128, None),
    ("full 1K B8 D64", "full", 8, 16, 1024, 64, None),
    ("full 2K", "full", 1, 16, 2048, 128, None),
    ("full 4K", "full", 1, 16, 4096, 128, None),
    ("full 4K D64", "full", 1, 16, 4096, 64, None),
    ("full 16K", "full", 1, 16, 16384, 128, None),
    ("documents of 1024, 16K", "same(doc)", 1, 16, 16384, 128,
     lambda L: {"doc": torch.arange(L, device="cuda") // 1024}),
    ("one key tile per query tile, 16K", "q // 128 == k // 128", 1, 16, 16384, 128, None),
    ("causal 4K", "causal", 1, 16, 4096, 128, None),
    ("causal 16K", "causal", 1, 16, 16384, 128, None),
    ("causal 16K D64", "causal", 1, 16, 16384, 64, None),
    ("causal 64K", "causal", 1, 16, 65536, 128, None),
    ("20 documents at random cuts, causal, 16K", "causal & same(doc)", 1, 16, 16384, 128,
     lambda L: {"doc": _docs(L, 20)}),
    ("4 documents at random cuts, causal, 16K", "causal & same(doc)", 1, 16, 16384, 128,
     lambda L: {"doc": _docs(L, 4)}),
    ("20 documents at random cuts, causal, 64K", "causal & same(doc)", 1, 16, 65536, 128,
     lambda L: {"doc": _docs(L, 20)}),
    ("100 documents at random cuts, causal, 64K", "causal & same(doc)", 1, 16, 65536, 128,
     lambda L: {"doc": _docs(L, 100)}),
    ("1000 documents, causal, 64K", "causal & same(doc)", 1, 16, 65536, 128,
     lambda L: {"doc": _docs(L, 1000)}),
    ("FLUX stride 16x16", ((256, 256), (80, 80), (16, 16)), 1, 24, 65536, 128, None),
    ("Hunyuan stride 16x8x8", ((30, 48, 80), (18, 24, 24), (16, 8, 8)), 1, 24, 115200, 128,
     None),
]


def _docs(L: int, n: int):
    """Document ids of ``n`` documents at sorted random cuts."""
    g = torch.Generator().manual_seed(n)
    cuts = torch.randperm(L - 1, generator=g)[:n - 1] + 1
    ids = torch.zeros(L, dtype=torch.int64)
    ids[cuts] = 1
    return ids.cumsum(0).to("cuda")


def _plan(src, q, k, v, inputs, ws: str):
    os.environ["SPATTN_WS_FWD"] = ws
    try:
        pat = spattn.compile(src) if isinstance(src, str) else spattn.neighborhood(*src)
        return pat, pat.plan(q, k, v, **inputs)
    finally:
        os.environ.pop("SPATTN_WS_FWD")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", nargs="*", help="problem names")
    a = ap.parse_args(argv)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    for name, src, B, H, L, D, mk in PROBLEMS:
        if a.only and name not in a.only:
            continue
        g = torch.Generator(device="cuda").manual_seed(L)
        q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(3))
        inputs = mk(L) if mk else {}
        pat, ws = _plan(src, q, k, v, inputs, "1")
        _, gen = _plan(src, q, k, v, inputs, "0")
        took = getattr(ws.forward_stage, "gluon", False)
        fns = {"warp-specialised": lambda: pat(q, k, v, plan=ws),
               "generated": lambda: pat(q, k, v, plan=gen)}
        stage = ws.forward_stage
        if took and stage.lists.each:
            _, other = _plan(src, q, k, v, inputs, "1")
            other.forward_stage.grid = (
                stage.n_work if stage.persistent
                else _persistent_programs(None, stage.n_work, 1, q.device),)
            fns["the other grid"] = lambda: pat(q, k, v, plan=other)
        if src == "full" or not isinstance(src, str):
            def cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v)
            fns["cuDNN"] = cudnn
        err = float((fns["warp-specialised"]().float() - fns["generated"]().float()).abs().max())
        if "the other grid" in fns:
            err = max(err, float((fns["the other grid"]().float()
                                  - fns["generated"]().float()).abs().max()))
        print(f"{name}: {ws.forward_stage!r}; max difference {err:.3g}", flush=True)
        t = alternate(fns, a.rounds)
        row = dict(problem=name, B=B, H=H, L=L, D=D, ws_stage=took, max_diff=err,
                   persistent=getattr(stage, "persistent", None),
                   tiles_each=stage.lists.each if took else None,
                   **{f"{n}_us": ms * 1e3 for n, ms in t.items()})
        rows.append(row)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "ws_fwd.json"), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           rows=rows), f, indent=1)
    print(table(rows))


def table(rows) -> str:
    """The markdown table of ``rows`` (``main``'s JSON rows): times in us and each rival's
    time over the warp-specialised forward's (above 1: the kernel is faster)."""
    out = ["| problem | tiles an item | grid | warp-specialised us | generated us | gen / ws "
           "| the other grid us | other / ws | cuDNN us | cuDNN / ws |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ws = r["warp-specialised_us"]
        grid = ("persistent" if r["persistent"] else "per item") if r["ws_stage"] else \
            "(not taken)"
        cells = [r["problem"], str(r["tiles_each"] or "unequal"), grid, f"{ws:.1f}",
                 f"{r['generated_us']:.1f}", f"{r['generated_us'] / ws:.2f}x"]
        for key in ("the other grid_us", "cuDNN_us"):
            t = r.get(key)
            cells += ["", ""] if t is None else [f"{t:.1f}", f"{t / ws:.3f}x"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
