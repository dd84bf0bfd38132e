"""Decode steps of patterns with a score (GPU): one query row against a KV cache.

Cases: Gemma 2's ``causal`` with ``softcap(50)``, ALiBi (``causal``, a learned slope per
head), and ``causal & window(4096)`` with a learned relative bias ``rel[h, clamp(q - k, 0,
4095)]``; B in {1, 16}, caches of 8K and 32K keys, GQA 32/8, D = 128, bf16. Rivals, timed in
alternating rounds in this process (``triton.testing.do_bench``, median):

* ``decode``: ``pat.decode(q, k, v, seq_lens=..., check=False, **tables)`` (the split-K
  kernel with the score, and the combine), called from Python and replayed from a CUDA
  graph;
* ``call``: ``spattn.runtime.scores.call`` on the same tensors, the path a scored call of
  few queries took before it routed to decode (a forward kernel of one query tile per
  head, its plan made per shape);
* ``mask``: the decode step of the mask alone (what the score costs);
* ``flex``: ``torch.compile(flex_attention)`` with the same block mask and a score_mod of
  the same score (its decoding kernel), eager and from a CUDA graph.

Every output is checked against Flex's (relative error of the norm < 2e-2).

CPU mode (``--cpu``): float32, B = 1, caches of 1024 and 8192 keys (``--lengths``), Hq/Hk/D
8/8/64 and 32/8/128, torch's threads as given (``--threads``); rivals in alternating rounds (medians
of ``time.perf_counter``): ``decode`` (``pat(q, k, v, **tables)``, routed: the same step
again, as a model's layers at one token), ``decode_new`` (the same at a new length every
call: the cache's last ``DISTINCT`` lengths in turn, more than a plan keeps, as a decode
loop's first layer), ``call`` (``scores.call``, the path before the routing), ``mask`` (the
mask alone, routed), and for the additive scores dense SDPA with the score's bias as a
float mask built beforehand (its time leaves out that build). Every output is checked
against the float64 reference (``decode_new`` at each of its lengths).

    python benchmarks/decode_scores.py --out DIR [--rounds 3] [--quick]
    python benchmarks/decode_scores.py --cpu [--threads 1] [--lengths 1024] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

import spattn
from spattn.runtime import scores

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import _flex, _graph, log  # noqa: E402

H_Q, H_K, D = 32, 8, 128

CASES = {
    "softcap(50)": ("causal", "softcap(50)"),
    "alibi": ("causal", "s + slope[h] * float(k - q)"),
    "window(4096) + rel": ("causal & window(4096)", "s + rel[h, clamp(q - k, 0, 4095)]"),
}


def _tables(name, dev):
    g = torch.Generator(device=dev).manual_seed(1)
    if name == "alibi":
        return {"slope": 2.0 ** (-8.0 * torch.arange(1, H_Q + 1, device=dev) / H_Q)}
    if name.endswith("rel"):
        return {"rel": torch.randn(H_Q, 4096, device=dev, generator=g)}
    return {}


def _flex_mods(name, off, tables):
    """(mask_mod, score_mod) of a case for one decode row at position ``off``."""
    def causal(b, h, q, k):
        return q + off >= k

    if name == "softcap(50)":
        return causal, lambda s, b, h, q, k: 50.0 * torch.tanh(s / 50.0)
    if name == "alibi":
        slope = tables["slope"]
        return causal, lambda s, b, h, q, k: s + slope[h] * (k - q - off).to(torch.float32)
    rel = tables["rel"]

    def window(b, h, q, k):
        return (q + off >= k) & (q + off - k < 4096)
    return window, lambda s, b, h, q, k: s + rel[h, torch.clamp(q + off - k, 0, 4095)]


def run(args):
    import triton
    dev = "cuda"
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=args.rep,  # noqa: E731
                                               return_mode="median")
    create_block_mask, flex = _flex()
    rows = []
    for B in (1, 16):
        for L in ((32768,) if args.quick else (8192, 32768)):
            g = torch.Generator(device=dev).manual_seed(0)
            k = torch.randn(B, H_K, L, D, device=dev, dtype=torch.bfloat16, generator=g)
            v = torch.randn(B, H_K, L, D, device=dev, dtype=torch.bfloat16, generator=g)
            q = torch.randn(B, H_Q, 1, D, device=dev, dtype=torch.bfloat16, generator=g)
            seq = torch.full((B,), L, device=dev, dtype=torch.int32)
            off = torch.tensor(L - 1, device=dev)
            for name, (mask, score) in CASES.items():
                row = {"case": name, "B": B, "L": L, "Hq": H_Q, "Hk": H_K, "D": D}
                log(f"{name} B={B} L={L}")
                try:
                    tables = _tables(name, dev)
                    pat = spattn.compile(mask, score=score)
                    plain = spattn.compile(mask)
                    timed = {
                        "decode": lambda: pat.decode(q, k, v, seq_lens=seq, check=False,
                                                     **tables),
                        "call": lambda: scores.call(pat, q, k, v, inputs=tables),
                        "mask": lambda: plain.decode(q, k, v, seq_lens=seq, check=False),
                    }
                    mm, sm = _flex_mods(name, off, tables)
                    bm = create_block_mask(mm, None, None, 1, L, device=dev)
                    timed["flex"] = lambda: flex(q, k, v, score_mod=sm, block_mask=bm,
                                                 enable_gqa=True)
                    ref = timed["flex"]().double()
                    for n in ("decode", "call"):
                        out = timed[n]().double()
                        row[f"{n}_rel_err"] = float((out - ref).norm() / ref.norm())
                        if row[f"{n}_rel_err"] > 2e-2:
                            raise RuntimeError(f"{n} differs from flex: {row[n + '_rel_err']}")
                    for n in ("decode", "flex"):
                        try:
                            timed[n + "_graph"] = _graph(timed[n])
                        except Exception as e:
                            row[f"{n}_graph_error"] = f"{type(e).__name__}: {str(e)[:120]}"
                    times = {n: [] for n in timed}
                    names = list(timed)
                    for r in range(args.rounds):
                        for n in (names if r % 2 == 0 else names[::-1]):
                            times[n].append(bench(timed[n]))
                    for n, ts in times.items():
                        row[n + "_ms"] = statistics.median(ts)
                        row[n + "_ms_rounds"] = ts
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(row)
                log(json.dumps({n: x for n, x in row.items() if not n.endswith("_rounds")}))
            k = v = q = None
            torch.cuda.empty_cache()
    return rows


def _tables_cpu(name, H):
    g = torch.Generator().manual_seed(1)
    if name == "alibi":
        return {"slope": 2.0 ** (-8.0 * torch.arange(1, H + 1) / H)}
    if name.endswith("rel"):
        return {"rel": torch.randn(H, 4096, generator=g)}
    return {}


def _bias(name, tables, H, L):
    """The additive score of a case as a float mask [1, H, 1, L] over every key for the
    last row (SDPA's rival; None for softcap, which is not additive)."""
    qpos, k = L - 1, torch.arange(L)
    if name == "alibi":
        return (tables["slope"].view(H, 1) * (k - qpos).float()).view(1, H, 1, L)
    if name.endswith("rel"):
        b = tables["rel"][:, torch.clamp(qpos - k, 0, 4095)]
        return torch.where(qpos - k < 4096, b, float("-inf")).view(1, H, 1, L)
    return None


def _cpu_time(fn, reps):
    import time
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def run_cpu(args):
    import torch.nn.functional as F
    from spattn.runtime.reference import pattern_reference
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for Hq, Hk, Dh in ((8, 8, 64), (32, 8, 128)):
        for L in [int(x) for x in args.lengths.split(",")]:
            g = torch.Generator().manual_seed(0)
            q = torch.randn(1, Hq, 1, Dh, generator=g)
            k = torch.randn(1, Hk, L, Dh, generator=g)
            v = torch.randn(1, Hk, L, Dh, generator=g)
            for name, (mask, score) in CASES.items():
                row = {"case": name, "B": 1, "L": L, "Hq": Hq, "Hk": Hk, "D": Dh,
                       "threads": torch.get_num_threads()}
                log(f"cpu {name} Hq={Hq} Hk={Hk} D={Dh} L={L}")
                tables = _tables_cpu(name, Hq)
                pat = spattn.compile(mask, score=score, backend="torch")
                plain = spattn.compile(mask, backend="torch")
                views = [(k[:, :, :L - j], v[:, :, :L - j]) for j in range(DISTINCT)]
                cyc = {"i": 0}

                def new_step():
                    cyc["i"] = (cyc["i"] + 1) % DISTINCT
                    kn, vn = views[cyc["i"]]
                    return pat(q, kn, vn, **tables)
                timed = {"decode": lambda: pat(q, k, v, **tables), "decode_new": new_step,
                         "call": lambda: scores.call(pat, q, k, v, inputs=tables),
                         "mask": lambda: plain(q, k, v)}
                bias = _bias(name, tables, Hq, L)
                if bias is not None:
                    timed["sdpa_bias"] = lambda: F.scaled_dot_product_attention(
                        q, k, v, attn_mask=bias, enable_gqa=True)
                G = Hq // Hk
                ref = pattern_reference(pat, q.double(), k.double().repeat_interleave(G, 1),
                                        v.double().repeat_interleave(G, 1),
                                        **{n: t.double() for n, t in tables.items()})[0]
                for n in ("decode", "call", "sdpa_bias"):
                    if n in timed:
                        out = timed[n]().double()
                        row[f"{n}_rel_err"] = float((out - ref).norm() / ref.norm())
                errs = []
                for j in range(DISTINCT):
                    out = new_step().double()
                    kn, vn = views[cyc["i"]]
                    want = pattern_reference(
                        pat, q.double(), kn.double().repeat_interleave(G, 1),
                        vn.double().repeat_interleave(G, 1),
                        **{n: t.double() for n, t in tables.items()})[0]
                    errs.append(float((out - want).norm() / want.norm()))
                row["decode_new_rel_err"] = max(errs)
                reps = max(3, min(200, int(0.1 / max(1e-5, _cpu_time(timed["mask"], 3) / 1e3))))
                times = {n: [] for n in timed}
                names = list(timed)
                for r in range(args.rounds):
                    for n in (names if r % 2 == 0 else names[::-1]):
                        times[n].append(_cpu_time(timed[n], reps))
                for n, ts in times.items():
                    row[n + "_ms"] = statistics.median(ts)
                    row[n + "_ms_rounds"] = ts
                rows.append(row)
                log(json.dumps({n: x for n, x in row.items() if not n.endswith("_rounds")}))
    return rows


#: Distinct lengths the ``decode_new`` rival cycles through (more than a plan keeps).
DISTINCT = 5


def table_cpu(rows) -> str:
    out = ["| case | Hq/Hk | D | L | decode ms | new length ms | call ms | mask ms "
           "| SDPA + bias ms | call / decode | SDPA / decode | SDPA / new |",
           "|" + "---|" * 12]
    for r in rows:
        sd = r.get("sdpa_bias_ms")
        sd_ms = "-" if sd is None else f"{sd:.3f}"
        sd_x = "-" if sd is None else f"{sd / r['decode_ms']:.2f}"
        sd_n = "-" if sd is None else f"{sd / r['decode_new_ms']:.2f}"
        out.append(f"| {r['case']} | {r['Hq']}/{r['Hk']} | {r['D']} | {r['L']} "
                   f"| {r['decode_ms']:.3f} | {r['decode_new_ms']:.3f} | {r['call_ms']:.3f} "
                   f"| {r['mask_ms']:.3f} | {sd_ms} | {r['call_ms'] / r['decode_ms']:.2f} "
                   f"| {sd_x} | {sd_n} |")
    return "\n".join(out)


def table(rows) -> str:
    head = ("| case | B | L | decode us | graph us | call us | mask us | Flex us | "
            "Flex graph us | call / decode | Flex / decode (graphs) | score cost |")
    out = [head, "|" + "---|" * 12]
    us = lambda r, n: f"{1e3 * r[n + '_ms']:.1f}" if n + "_ms" in r else "-"  # noqa: E731
    for r in rows:
        if "error" in r:
            out.append(f"| {r['case']} | {r['B']} | {r['L']} | {r['error']} |" + " |" * 9)
            continue
        fx = (f"{r['flex_graph_ms'] / r['decode_graph_ms']:.2f}"
              if "flex_graph_ms" in r and "decode_graph_ms" in r else "-")
        out.append(
            f"| {r['case']} | {r['B']} | {r['L']} | {us(r, 'decode')} | {us(r, 'decode_graph')} "
            f"| {us(r, 'call')} | {us(r, 'mask')} | {us(r, 'flex')} | {us(r, 'flex_graph')} "
            f"| {r['call_ms'] / r['decode_ms']:.1f} | {fx} "
            f"| {100 * (r['decode_ms'] / r['mask_ms'] - 1):+.1f}% |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rep", type=int, default=100)
    p.add_argument("--quick", action="store_true", help="32K keys only")
    p.add_argument("--cpu", action="store_true", help="the CPU step (torch backend)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (CPU; 0: default)")
    p.add_argument("--lengths", default="1024,8192", help="cache lengths (CPU; comma-separated)")
    args = p.parse_args(argv)
    rows = run_cpu(args) if args.cpu else run(args)
    text = table_cpu(rows) if args.cpu else table(rows)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = "decode_scores_cpu.json" if args.cpu else "decode_scores.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump({"device": "cpu" if args.cpu else torch.cuda.get_device_name(),
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
