"""One decode-step attention call of a transformers layer: spattn's adapter against
transformers' own SDPA attention function, the same tensors and padding.

The call a generated token's layer makes (``Lq = 1``, a cache of ``--keys`` keys, a left
padding per row): ``spattn_attention_forward`` with the ``SpattnMask`` transformers' mask
interface builds, against ``sdpa_attention_forward`` with the mask ``sdpa_mask`` builds.
Both in alternating rounds in one process (the order flips every round), each round the
mean of ``--calls`` calls; the outputs are compared first. Besides the kernel, a call's
time holds each function's own Python: for spattn the layer's pattern, the padding form
and the routed fast entry.

    python benchmarks/hf_call.py [--batch 4] [--keys 620] [--heads 8] [--kv-heads 8]
        [--head-dim 64] [--rounds 7] [--calls 100] [--threads 1] [--out DIR]
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time

import torch

try:
    import transformers
    from transformers import masking_utils as mu
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
except ImportError:
    sys.exit("hf_call.py needs transformers: pip install 'spattn[hf]'")

import spattn.integrations.transformers as sphf


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--keys", type=int, default=620)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    B, L, Hq, Hk, D = a.batch, a.keys, a.heads, a.kv_heads, a.head_dim
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=Hq * D, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=Hq,
                                   num_key_value_heads=Hk, head_dim=D)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    module = model.model.layers[0].self_attn
    am = torch.ones(B, L, dtype=torch.long)
    pads = [(b * 97) % (L // 3) for b in range(B)]
    for b, p in enumerate(pads):
        am[b, :p] = 0
    sizes = dict(batch_size=B, kv_length=L, kv_offset=0, mask_function=mu.causal_mask_function)
    queries = (dict(q_length=1, q_offset=L - 1)
               if "q_length" in inspect.signature(mu.sdpa_mask).parameters
               else dict(cache_position=torch.tensor([L - 1])))
    dense = mu.sdpa_mask(**sizes, **queries, attention_mask=am.bool(),
                         allow_is_causal_skip=False)
    mask = sphf.spattn_mask(**sizes, **queries, attention_mask=am)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 1, Hq, D, generator=g).transpose(1, 2)      # as a layer passes it
    k, v = torch.randn(B, Hk, L, D, generator=g), torch.randn(B, Hk, L, D, generator=g)
    scale = D ** -0.5
    calls = {"sdpa": lambda: sdpa_attention_forward(module, q, k, v, dense, scaling=scale)[0],
             "spattn": lambda: sphf.spattn_attention_forward(module, q, k, v, mask,
                                                              scaling=scale)[0]}
    with torch.no_grad():
        want, got = calls["sdpa"](), calls["spattn"]()
        err = float((got - want).abs().max() / want.abs().max())
        if err > 1e-4:
            sys.exit(f"spattn's output differs from SDPA's (relative error {err:.2e})")
        times = {n: [] for n in calls}
        for r in range(a.rounds):
            for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                fn = calls[name]
                t0 = time.perf_counter()
                for _ in range(a.calls):
                    fn()
                times[name].append((time.perf_counter() - t0) / a.calls * 1e6)
    med = {n: statistics.median(x) for n, x in times.items()}
    result = {"args": vars(a), "paddings": pads, "torch": torch.__version__,
              "transformers": transformers.__version__, "us_per_call": times, "median": med,
              "max_rel_error": err}
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "hf_call.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(f"B={B} keys={L} heads={Hq}/{Hk} D={D} threads={torch.get_num_threads()}, "
          f"left paddings {pads}, transformers {transformers.__version__}")
    print("| | us per call | x SDPA's time |")
    print("|---|---|---|")
    for n in calls:
        print(f"| {n} | {med[n]:.1f} | {med[n] / med['sdpa']:.3f} |")


if __name__ == "__main__":
    main()
