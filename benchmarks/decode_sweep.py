"""GPU sweep of the decode kernel's launch configuration against dense SDPA.

One decode step (Lq = 1, causal: every key of the cache allowed), GQA 32/8, D = 128, bf16,
for B in {1, 16} and caches of 8K / 32K / 128K keys (``--batches``, ``--lengths``). Each
candidate is a decode configuration (key tile ``BLOCK_N``, warps, stages: the fields of
``runtime.decode.DecodeConfig``) and a number of key splits (the default rule's count,
times ``--split-factors``). Every candidate's output is checked against SDPA's (2e-2) and
then timed from a CUDA graph (as serving engines run decode steps), in rounds that
alternate the candidates with dense SDPA (flash with ``enable_gqa``, the fastest of the
backends that run); the table gives each candidate's time over SDPA's and the bytes of K
and V per second.

    python benchmarks/decode_sweep.py --out DIR            # < 3 min on an H200
    python benchmarks/decode_sweep.py --cpu-check          # the logic, on CPU tensors

``--cpu-check`` runs the candidates through the Triton interpreter on a tiny cache (no
timing): a check that every configuration renders, runs and matches, not a measurement.
Writes ``DIR/decode_sweep.json``; the table is printed last.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

if "--cpu-check" in sys.argv:      # before triton is imported: its jit reads it then
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import spattn  # noqa: E402
from spattn.runtime import decode as dec  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import _graph as graph  # noqa: E402  (benchmarks/decode.py: captured once, replayed)

#: (BLOCK_N, warps, stages) candidates; the first is the library's default.
CONFIGS = [(128, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (64, 8, 4),
           (32, 4, 4), (128, 8, 4)]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def forced(block_n, warps, stages):
    """A ``default_config`` that returns this configuration (the strategy as the library's)."""
    base = dec.default_config

    def config(closed_form, head_dim, dtype, interpret, **flags):
        c = base(closed_form, head_dim, dtype, interpret, **flags)
        return dataclasses.replace(c, block_n=block_n, num_warps=warps, num_stages=stages)
    return config


def default_splits(B, Hq, Hk, L, block_n, sms):
    """The library's split count for this shape (``decode.split_count``; causal at one
    query visits every key tile)."""
    return dec.split_count(B * Hq // (Hq // Hk), -(-L // block_n) * block_n, sms)


def run(args):
    import triton
    import torch.nn.functional as F
    dev = "cpu" if args.cpu_check else "cuda"
    Hq, Hk, D = 32, 8, 128
    dt = torch.float32 if args.cpu_check else torch.bfloat16
    sms = 132 if args.cpu_check else torch.cuda.get_device_properties(0).multi_processor_count
    pat = spattn.compile("causal")
    rows = []
    Bs = [int(x) for x in args.batches.split(",")]
    Ls = [int(x) for x in args.lengths.split(",")]
    configs = CONFIGS[:2] if args.cpu_check else CONFIGS
    for B in Bs:
        for L in Ls:
            g = torch.Generator(device=dev).manual_seed(0)
            k = torch.randn(B, Hk, L, D, device=dev, dtype=dt, generator=g)
            v = torch.randn(B, Hk, L, D, device=dev, dtype=dt, generator=g)
            q = torch.randn(B, Hq, 1, D, device=dev, dtype=dt, generator=g)
            seq = torch.full((B,), L, device=dev, dtype=torch.int32)
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                 enable_gqa=True).to(dt)
            timed = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}
            meta = {}
            for bn, w, st in configs:
                base = default_splits(B, Hq, Hk, L, bn, sms)
                for f in args.split_factors:
                    splits = max(1, int(base * f))
                    name = f"{bn}x{w}w{st}s/{splits}"
                    if name in meta:
                        continue
                    dec.default_config = forced(bn, w, st)
                    dec.DECODE_PLANS.clear()
                    try:
                        fn = (lambda s=splits: dec.decode(pat, q, k, v, seq_lens=seq, check=False,
                                                          num_splits=s))
                        o = fn()
                        err = float((o.float() - ref.float()).abs().max())
                        if err > 2e-2:
                            raise RuntimeError(f"mismatch {err:.3g}")
                        timed[name] = fn if args.cpu_check else graph(fn)
                        meta[name] = {"block_n": bn, "warps": w, "stages": st, "splits": splits,
                                      "default_splits": base, "err": err,
                                      "default": (bn, w, st) == CONFIGS[0] and f == 1.0}
                    except Exception as e:          # a candidate that does not fit or run
                        log(f"B={B} L={L} {name}: {type(e).__name__}: {str(e)[:160]}")
                    finally:
                        dec.default_config = _BASE
            if args.cpu_check:
                rows.append({"B": B, "L": L, "candidates": meta})
                continue
            timed["sdpa"] = graph(timed["sdpa"])
            names = list(timed)
            times = {n: [] for n in names}
            for r in range(args.rounds):
                for n in (names if r % 2 == 0 else names[::-1]):
                    times[n].append(triton.testing.do_bench(timed[n], warmup=5, rep=args.rep,
                                                            return_mode="median"))
            sd = statistics.median(times["sdpa"])
            kv_bytes = 2 * B * Hk * L * D * 2
            row = {"B": B, "L": L, "sdpa_ms": sd, "sdpa_rounds": times["sdpa"], "candidates": {}}
            for n, m in meta.items():
                t = statistics.median(times[n])
                row["candidates"][n] = dict(m, ms=t, rounds=times[n], vs_sdpa=t / sd,
                                            tb_s=kv_bytes / t / 1e9)
            rows.append(row)
            best = min(row["candidates"].items(), key=lambda kv: kv[1]["ms"])
            log(f"B={B} L={L}: sdpa {sd * 1e3:.1f} us, best {best[0]} "
                f"{best[1]['ms'] * 1e3:.1f} us ({best[1]['vs_sdpa']:.2f}x)")
            del k, v
            torch.cuda.empty_cache()
    return rows


def table(rows) -> str:
    out = ["| B | L | SDPA us | default | its x SDPA | best | its us | its x SDPA | TB/s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["candidates"]
        d = next((n for n, m in c.items() if m["default"]), None)
        b = min(c, key=lambda n: c[n]["ms"])
        dx = f"{c[d]['vs_sdpa']:.3f}" if d else "-"
        out.append(f"| {r['B']} | {r['L']} | {r['sdpa_ms'] * 1e3:.1f} | {d} | {dx} | {b} | "
                   f"{c[b]['ms'] * 1e3:.1f} | {c[b]['vs_sdpa']:.3f} | {c[b]['tb_s']:.2f} |")
    return "\n".join(out)


_BASE = dec.default_config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--lengths", default="8192,32768,131072")
    p.add_argument("--split-factors", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rep", type=int, default=25, help="ms per do_bench measurement")
    p.add_argument("--cpu-check", action="store_true")
    args = p.parse_args(argv)
    if args.cpu_check:
        args.batches, args.lengths, args.split_factors = "2", "200", [1.0, 2.0]
    rows = run(args)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "decode_sweep.json"), "w") as f:
            json.dump(rows, f, indent=1)
    if args.cpu_check:
        print(json.dumps(rows, indent=1))
    else:
        print(table(rows))


if __name__ == "__main__":
    main()
