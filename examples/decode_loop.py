"""A decode loop with spattn: a growing KV cache, contiguous and paged, checked as it goes.

    python examples/decode_loop.py [--cuda] [--steps N]

1. a StreamingLLM pattern (window plus sinks) decoding 40 steps against a preallocated
   contiguous cache ``[B, Hk, capacity, D]``, each batch element at its own length
   (``seq_lens``), grouped-query heads 8/2;
2. the same steps against a paged cache (pools ``[num_pages, page_size, Hk, D]`` and a
   shuffled page table), which must give the same outputs;
3. every step checked against the float64 reference; one decode plan serves all the
   steps (the length bucket), printed at the end.

Runs on the CPU (torch backend), or on CUDA tensors with ``--cuda`` (the Triton kernels).
Exits with status 1 if anything disagrees with the reference.
"""
from __future__ import annotations

import sys

import torch

import spattn
from spattn.runtime.decode import DECODE_PLANS
from spattn.runtime.reference import attention_reference


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    dev = "cuda" if "--cuda" in argv else "cpu"
    steps = int(argv[argv.index("--steps") + 1]) if "--steps" in argv else 40
    g = torch.Generator(device=dev).manual_seed(0)
    B, Hq, Hk, D, cap, page = 2, 8, 2, 64, 1024, 64
    pat = spattn.compile("causal & (window(W) | sink(4))", W=128,
                         backend="triton" if dev == "cuda" else "torch")
    k_cache = torch.zeros(B, Hk, cap, D, device=dev)
    v_cache = torch.zeros(B, Hk, cap, D, device=dev)
    # pools with a shuffled page table: batch b's page p is pool page table[b, p]
    n = cap // page
    table = torch.randperm(B * n, generator=g, device=dev).view(B, n).to(torch.int32)
    k_pool = torch.zeros(B * n, page, Hk, D, device=dev)
    v_pool = torch.zeros(B * n, page, Hk, D, device=dev)
    lens = torch.tensor([700, 300], device=dev)        # prompts already in the caches
    for t, c in ((k_cache, k_pool), (v_cache, v_pool)):
        t.normal_(generator=g)
        c[table.view(-1).long()] = t.view(B, Hk, n, page, D).permute(0, 2, 3, 1, 4) \
            .reshape(B * n, page, Hk, D)
    worst = 0.0
    for step in range(steps):
        # the new token's key and value, appended at each sequence's end
        kn = torch.randn(B, Hk, D, generator=g, device=dev)
        vn = torch.randn(B, Hk, D, generator=g, device=dev)
        for b in range(B):
            at = int(lens[b])
            k_cache[b, :, at], v_cache[b, :, at] = kn[b], vn[b]
            page_id = int(table[b, at // page])
            k_pool[page_id, at % page], v_pool[page_id, at % page] = kn[b], vn[b]
        lens += 1
        q = torch.randn(B, Hq, 1, D, generator=g, device=dev)
        o = pat.decode(q, k_cache, v_cache, seq_lens=lens)
        o_paged = pat.decode(q, k_pool, v_pool, seq_lens=lens, page_table=table)
        for b in range(B):
            L = int(lens[b])
            ref, _ = attention_reference(q[b:b + 1], k_cache[b:b + 1, :, :L],
                                         v_cache[b:b + 1, :, :L],
                                         pat.mask(1, L, num_heads=Hq, device=dev))
            for got in (o, o_paged):
                worst = max(worst, float((got[b:b + 1].double() - ref).abs().max()))
    print(f"{steps} decode steps, lengths now {lens.tolist()}: largest error {worst:.2e}")
    for plan in DECODE_PLANS._plans.values():
        print(" ", plan)
    ok = worst < 1e-4 if dev == "cpu" else worst < 1e-2
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
