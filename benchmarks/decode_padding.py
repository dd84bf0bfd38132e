"""Decode steps of a left-padded batch, as a model generating token after token runs them.

Each generated token runs ``--layers`` attention calls (Lq = 1) over a cache that grows by
one key per token, for a batch whose rows carry left padding. The padding reaches spattn in
one of two ways:

* ``keep``: ``causal & keep[k]`` with the 2-D padding mask ``keep [B, L]`` sliced anew at
  every token (one new tensor per token, shared by the layers);
* ``first``: ``causal & k >= first[b]`` with ``first [B]`` the first real key of each row,
  one tensor for the whole generation (what ``spattn.integrations.transformers`` passes for
  a left padding); its decode kernel takes its key ranges from ``first[b]``
  (``ranges``); with ``--scan`` also ``first-scan``, the same on the ``scan`` strategy.

Against dense SDPA with the boolean mask ``[B, 1, 1, L]`` (``enable_gqa=True``). Rivals in
alternating rounds in one process (the order flips every round); a round's figure is the
wall time per token (all layers, synchronised at the token's end), median over the tokens;
the spattn outputs are checked against SDPA's first.

    python benchmarks/decode_padding.py [--device cuda] [--batch 8] [--heads 32/8] [--dim 128]
        [--length 4096] [--tokens 64] [--layers 32] [--rounds 5] [--scan] [--out DIR]

The table is printed last; rows go to ``DIR/decode_padding.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import spattn
from spattn.runtime import decode as dec


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", default="32/8", help="query heads / key heads")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--length", type=int, default=4096, help="keys at the first token")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="CPU: torch threads (0: default)")
    ap.add_argument("--scan", action="store_true",
                    help="also time `first` on the scan strategy (the kernel's key ranges "
                         "without the closed form that reads first[b])")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    Hq, Hk = (int(x) for x in a.heads.split("/"))
    B, D, L0, T = a.batch, a.dim, a.length, a.tokens
    cap = L0 + T
    g = torch.Generator(device="cpu").manual_seed(0)
    k = torch.randn(B, Hk, cap, D, generator=g).to(dev, dtype)
    v = torch.randn(B, Hk, cap, D, generator=g).to(dev, dtype)
    qs = [torch.randn(B, Hq, 1, D, generator=g).to(dev, dtype) for _ in range(4)]
    pads = torch.tensor([(b * 397) % (L0 // 3) for b in range(B)])
    am = (torch.arange(cap)[None] >= pads[:, None]).to(dev)            # [B, cap] bool
    first = pads.to(dev)
    by_keep = spattn.compile("causal & keep[k]")
    by_first = spattn.compile("causal & k >= first[b]")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run(name, t):
        L = L0 + t
        kk, vv = k[:, :, :L], v[:, :, :L]
        if name == "keep":
            keep = am[:, :L].clone()                  # a new tensor per token
            for layer in range(a.layers):
                by_keep(qs[layer % 4], kk, vv, keep=keep)
        elif name == "first":
            for layer in range(a.layers):
                by_first(qs[layer % 4], kk, vv, first=first)
        elif name == "first-scan":                  # plans built without the closed form
            kernel_cf = dec._kernel_closed_form
            dec._kernel_closed_form = lambda pattern: None
            try:
                for layer in range(a.layers):
                    by_first(qs[layer % 4], kk, vv, first=first)
            finally:
                dec._kernel_closed_form = kernel_cf
        else:
            mask = am[:, None, None, :L]
            for layer in range(a.layers):
                F.scaled_dot_product_attention(qs[layer % 4], kk, vv, attn_mask=mask,
                                               enable_gqa=True)

    with torch.no_grad():
        L = L0 + 3
        want = F.scaled_dot_product_attention(qs[0].double(), k[:, :, :L].double(),
                                              v[:, :, :L].double(),
                                              attn_mask=am[:, None, None, :L], enable_gqa=True)
        for name, got in (("keep", by_keep(qs[0], k[:, :, :L], v[:, :, :L],
                                           keep=am[:, :L].clone())),
                          ("first", by_first(qs[0], k[:, :, :L], v[:, :, :L], first=first))):
            err = float((got.double() - want).abs().max() / want.abs().max())
            print(f"{name}: max error {err:.2e} against float64 SDPA", file=sys.stderr)
            if err > (2e-2 if dtype == torch.bfloat16 else 1e-4):
                sys.exit(f"{name} differs from SDPA")
        names = ["sdpa", "keep", "first"] + (["first-scan"] if a.scan else [])
        for name in names:                           # warm-up: compile, plans, first steps
            for t in range(3):
                run(name, t)
        sync()
        rounds = {n: [] for n in names}
        plans = {}
        for r in range(a.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                dec.DECODE_PLANS.clear()
                times = []
                for t in range(T):
                    t0 = time.perf_counter()
                    run(name, t)
                    sync()
                    times.append(time.perf_counter() - t0)
                rounds[name].append(statistics.median(times) * 1e3)
                plans[name] = len(dec.DECODE_PLANS)
                print(f"round {r} {name}: {rounds[name][-1]:.3f} ms/token", file=sys.stderr)
    med = {n: statistics.median(x) for n, x in rounds.items()}
    result = {"args": vars(a), "torch": torch.__version__, "device": str(dev),
              "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "ms_per_token": rounds, "median": med, "plans": plans,
              "paddings": pads.tolist()}
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "decode_padding.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(f"{result['device_name']}: B={B} Hq/Hk={Hq}/{Hk} D={D} keys {L0}..{cap - 1} "
          f"layers={a.layers} {dtype}; left paddings {pads.tolist()}")
    print("| | ms per token | x SDPA | decode plans in a generation |")
    print("|---|---|---|---|")
    for n in names:
        print(f"| {n} | {med[n]:.3f} | {med['sdpa'] / med[n]:.2f} | "
              f"{plans[n] if n != 'sdpa' else '-'} |")


if __name__ == "__main__":
    main()
