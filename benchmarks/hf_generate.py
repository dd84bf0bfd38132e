"""Batched generation with left padding in a Hugging Face model: spattn against SDPA.

A randomly initialised Llama (``from_config``, no download) generates greedily for a
batch of left-padded prompts, once with ``attn_implementation="sdpa"`` and once with
``"spattn"``, in alternating rounds in one process (the order flips every round). Timed:
the whole ``generate`` call and, through wrappers registered in transformers'
``AttentionInterface``, the attention calls of the generated tokens (Lq = 1, on spattn's
decode path) and of the prefill; the decode plans spattn built during a generation are
counted. In float32 every spattn run
must produce the tokens SDPA produced; in bfloat16, where greedy tokens part at near-ties
of a random model, the logits of the prompts' last position must be as close to float32
SDPA's as bfloat16 SDPA's and eager's are (within 1.5x of the larger error), and the
share of equal generated tokens is reported.

    python benchmarks/hf_generate.py [--batch 4] [--prompt 600] [--new 40] [--layers 4]
        [--threads 1] [--rounds 5] [--device cpu] [--dtype float32|bfloat16]
        [--cache dynamic|static] [--out DIR]

Progress goes to stderr; the table is printed last; the rows go to ``DIR/hf_generate.json``
with their per-round times.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
except ImportError:
    sys.exit("hf_generate.py needs transformers: pip install 'spattn[hf]'")

import spattn.integrations.transformers as sphf
from spattn.runtime import decode as dec


def _timed(name, fn, acc):
    """``fn`` with its time added to ``acc[name]``: ``[decode calls, decode s, prefill s]``."""
    def wrapped(module, query, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(module, query, *args, **kwargs)
        if query.is_cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        row = acc.setdefault(name, [0, 0.0, 0.0])
        if query.shape[2] == 1:
            row[0] += 1
            row[1] += dt
        else:
            row[2] += dt
        return out
    return wrapped


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=600, help="longest prompt, in tokens")
    ap.add_argument("--new", type=int, default=40, help="tokens generated per row")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--cache", default="dynamic", choices=["dynamic", "static"],
                    help="transformers' KV cache (static: every layer gets all its slots)")
    ap.add_argument("--no-compile", action="store_true",
                    help="generate(disable_compile=True): transformers compiles the decoding "
                         "step of a static cache on CUDA by default")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    hidden = a.heads * a.head_dim
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=hidden,
                                   intermediate_size=2 * hidden, num_hidden_layers=a.layers,
                                   num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                                   head_dim=a.head_dim, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(a.device):
        model = transformers.AutoModelForCausalLM.from_config(
            cfg, attn_implementation="sdpa", dtype=getattr(torch, a.dtype)).eval()
    L = a.prompt
    pads = [0, L // 12, L // 3, 7, L // 5, 1, L // 2, 30][:a.batch] + [0] * max(0, a.batch - 8)
    ids = torch.randint(1, 1000, (a.batch, L))
    am = torch.ones(a.batch, L, dtype=torch.long)
    for b, p in enumerate(pads):
        am[b, :p] = 0
        ids[b, :p] = 0
    ids, am = ids.to(a.device), am.to(a.device)
    kw = dict(attention_mask=am, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False,
              pad_token_id=0)
    if a.cache == "static":
        kw["cache_implementation"] = "static"
    if a.no_compile:
        kw["disable_compile"] = True
    acc: dict = {}
    AttentionInterface.register("sdpa", _timed("sdpa", sdpa_attention_forward, acc))
    AttentionInterface.register(sphf.NAME, _timed("spattn", sphf.spattn_attention_forward, acc))

    def generate(impl):
        model.set_attn_implementation(impl)
        dec.DECODE_PLANS.clear()
        acc.clear()
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            total = time.perf_counter() - t0
        calls, t_dec, t_pre = acc[impl if impl == "sdpa" else "spattn"]
        return out, {"total_s": total, "decode_us": t_dec / calls * 1e6, "decode_calls": calls,
                     "prefill_ms": t_pre * 1e3, "plans": len(dec.DECODE_PLANS)}

    def last_logits(impl):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            return model(ids, attention_mask=am).logits[:, -1].double()

    exact = a.dtype == "float32"
    logit_errors = None
    if not exact:       # bf16: greedy tokens part at near-ties; the prefill's logits must agree
        got = {impl: last_logits(impl) for impl in ("sdpa", "eager", sphf.NAME)}
        model.float()
        want = last_logits("sdpa")
        model.to(getattr(torch, a.dtype))
        logit_errors = {impl: float((x - want).abs().max() / want.abs().max())
                        for impl, x in got.items()}
        print(f"last position's logits against float32 SDPA, relative error: {logit_errors}",
              file=sys.stderr)
        if logit_errors[sphf.NAME] > 1.5 * max(logit_errors["sdpa"], logit_errors["eager"]):
            sys.exit(f"spattn's logits are further from float32 than SDPA's and eager's "
                     f"({logit_errors})")
    ref, _ = generate("sdpa")                   # warm-up, and the reference tokens
    generate(sphf.NAME)
    rows = {"sdpa": [], "spattn": []}
    agree = []
    for r in range(a.rounds):
        order = ["sdpa", sphf.NAME] if r % 2 == 0 else [sphf.NAME, "sdpa"]
        for impl in order:
            out, row = generate(impl)
            if impl == sphf.NAME:
                same = float((out[:, L:] == ref[:, L:]).float().mean())
                agree.append(same)
                if exact and same < 1.0:
                    sys.exit("spattn generated other tokens than SDPA")
            rows["sdpa" if impl == "sdpa" else "spattn"].append(row)
            print(f"round {r} {impl}: {row}", file=sys.stderr)

    def med(name, key):
        return statistics.median(x[key] for x in rows[name])
    ratios = [s["decode_us"] / p["decode_us"] for s, p in zip(rows["sdpa"], rows["spattn"])]
    total = [s["total_s"] / p["total_s"] for s, p in zip(rows["sdpa"], rows["spattn"])]
    result = {"args": vars(a), "paddings": pads, "torch": torch.__version__,
              "transformers": transformers.__version__, "rounds": rows,
              "generated_tokens_equal_to_sdpa": min(agree),
              "last_logits_error_against_float32": logit_errors,
              "decode_ratio_median": statistics.median(ratios),
              "decode_ratio_range": [min(ratios), max(ratios)],
              "total_ratio_median": statistics.median(total)}
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "hf_generate.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(f"B={a.batch} prompt={L} (left paddings {pads}) new={a.new} layers={a.layers} "
          f"heads={a.heads}/{a.kv_heads} D={a.head_dim} threads={torch.get_num_threads()} "
          f"{a.cache} cache{' (not compiled)' if a.no_compile else ''}, {a.dtype}, {a.device}")
    print("| | decode attention us/call | prefill attention ms | generate s | plans |")
    print("|---|---|---|---|---|")
    for name in ("sdpa", "spattn"):
        print(f"| {name} | {med(name, 'decode_us'):.0f} | {med(name, 'prefill_ms'):.1f} | "
              f"{med(name, 'total_s'):.3f} | {rows[name][-1]['plans']} |")
    print(f"SDPA / spattn, decode attention: {result['decode_ratio_median']:.2f} "
          f"({min(ratios):.2f}-{max(ratios):.2f}); whole generate: "
          f"{result['total_ratio_median']:.2f}; generated tokens equal to SDPA's: "
          f"{min(agree):.0%}")


if __name__ == "__main__":
    main()
