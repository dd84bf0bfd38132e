"""Decode benchmark: one decode step (Lq = 1) against a long KV cache.

GPU (default): B in {1, 16}, caches of 8K / 32K / 128K keys, GQA 32/8, D = 128, bf16, for
causal, ``causal & window(4096)`` and streaming ``causal & (window(4096) | sink(4))``.
Rivals, timed in alternating rounds in this process (``triton.testing.do_bench``, median):

* spattn: ``pat.decode(q, k_cache, v_cache, seq_lens=...)`` (the split-K kernel and the
  combine; ``check=False``: no host synchronisation);
* FlexAttention: ``torch.compile(flex_attention)`` with Lq = 1, ``enable_gqa=True`` and a
  block mask built once (its decoding kernel);
* dense SDPA (causal rows only: one query sees every key): flash, efficient and cuDNN, each
  with ``enable_gqa=True`` (or k, v expanded beforehand where a backend refuses it), the
  fastest counts.

Each is timed twice: called from Python ("eager") and replayed from a CUDA graph captured
once ("graph", the way serving engines run decode steps; spattn reads its lengths from
``seq_lens``, a device tensor). Every spattn output is checked against Flex's (or SDPA's).

    python benchmarks/decode.py --out DIR           # everything (< 90 s on an H200)
    python benchmarks/decode.py --quick --out DIR   # 32K only
    python benchmarks/decode.py --cpu [--quick]     # the CPU decode step against dense SDPA

CPU mode: B = 1, H = 8 and 32 (and GQA 32/8), D = 64 / 128, L = 1024..8192, float32,
spattn's decode step (``pat(q, k, v)``, routed to the decode path) against dense SDPA
(``enable_gqa=True``) in alternating rounds of ``time.perf_counter`` medians.

Progress goes to stderr; the table is printed last; rows go to ``DIR/decode.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import spattn
from spattn.runtime.decode import DECODE_PLANS

PATTERNS = {
    "causal": "causal",
    "window(4096)": "causal & window(4096)",
    "streaming": "causal & (window(4096) | sink(4))",
}
ROUNDS = 3


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ GPU

#: (window, sinks) of each pattern for the one mask_mod all three share (one Flex compile
#: per shape, not per pattern): causal is a window longer than any cache with no sinks
FLEX_PARAMS = {"causal": (1 << 30, 0), "window(4096)": (4096, 0), "streaming": (4096, 4)}


def _flex_mask(name, off):
    """The mask_mod of a pattern for one decode row at position ``off`` (0-dim tensors)."""
    w, s = (torch.tensor(x, device=off.device) for x in FLEX_PARAMS[name])

    def mask_mod(b, h, q, k):
        return (q + off >= k) & ((q + off - k < w) | (k < s))
    return mask_mod


def _flex():
    import torch._dynamo.config as dc
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dc, name):
            setattr(dc, name, 1024)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    return create_block_mask, torch.compile(flex_attention, dynamic=False)


def _graph(fn):
    """``fn`` captured in a CUDA graph (after warm-up on a side stream): the replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def _sdpa_candidates(q, k, v):
    """(label, fn) of every dense SDPA backend that runs this shape (GQA native, else with
    k, v expanded beforehand)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    G = q.shape[1] // k.shape[1]
    ke, ve = None, None
    out = []
    for label, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                           ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                           ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        for gqa in (True, False):
            if not gqa and ke is None:
                ke, ve = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)

            def fn(backend=backend, gqa=gqa):
                with sdpa_kernel(backend):
                    if gqa:
                        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                    return F.scaled_dot_product_attention(q, ke, ve)
            try:
                fn()
                torch.cuda.synchronize()
            except RuntimeError:
                continue
            out.append((f"{label}{'' if gqa else '-expanded'}", fn))
            break
    return out


def run_gpu(args):
    import triton
    dev = "cuda"
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=args.rep,  # noqa: E731
                                               return_mode="median")
    create_block_mask, flex = _flex()
    Bs = (1, 16)
    Ls = (32768,) if args.quick else (8192, 32768, 131072)
    Hq, Hk, D, dt = 32, 8, 128, torch.bfloat16
    rows = []
    for B in Bs:
        for L in Ls:
            g = torch.Generator(device=dev).manual_seed(0)
            k = torch.randn(B, Hk, L, D, device=dev, dtype=dt, generator=g)
            v = torch.randn(B, Hk, L, D, device=dev, dtype=dt, generator=g)
            q = torch.randn(B, Hq, 1, D, device=dev, dtype=dt, generator=g)
            seq = torch.full((B,), L, device=dev, dtype=torch.int32)
            off = torch.tensor(L - 1, device=dev)
            for name, src in PATTERNS.items():
                row = {"pattern": name, "B": B, "L": L, "Hq": Hq, "Hk": Hk, "D": D}
                log(f"{name} B={B} L={L}")
                try:
                    pat = spattn.compile(src)
                    sp = lambda: pat.decode(q, k, v, seq_lens=seq, check=False)  # noqa: E731
                    o = sp()
                    plan = next(p for p in reversed(DECODE_PLANS._plans.values())
                                if p.pattern == pat)
                    row.update(splits=plan.splits, pack=plan.pack, strategy=plan.config.strategy)
                    bm = create_block_mask(_flex_mask(name, off), None, None, 1, L,
                                           device=dev)
                    fx = lambda: flex(q, k, v, block_mask=bm, enable_gqa=True)  # noqa: E731
                    ref = fx()
                    row["max_err_vs_flex"] = float((o.float() - ref.float()).abs().max())
                    if row["max_err_vs_flex"] > 2e-2:
                        row["error"] = f"mismatch vs flex: {row['max_err_vs_flex']:.3g}"
                        rows.append(row)
                        continue
                    timed = {"spattn": sp, "flex": fx}
                    if name == "causal":
                        for label, fn in _sdpa_candidates(q, k, v):
                            timed["sdpa_" + label] = fn
                    graphs = {}
                    for n, fn in timed.items():
                        try:
                            graphs[n + "_graph"] = _graph(fn)
                        except Exception as e:   # a rival that cannot be captured
                            row[f"{n}_graph_error"] = f"{type(e).__name__}: {str(e)[:120]}"
                    timed.update(graphs)
                    times = {n: [] for n in timed}
                    names = list(timed)
                    for r in range(args.rounds):
                        for n in (names if r % 2 == 0 else names[::-1]):
                            times[n].append(bench(timed[n]))
                    for n, ts in times.items():
                        row[n + "_ms"] = statistics.median(ts)
                        row[n + "_ms_rounds"] = ts
                    for mode in ("", "_graph"):
                        sd = [row[n] for n in row if n.startswith("sdpa_") and
                              n.endswith(mode + "_ms") and (mode or "_graph" not in n)]
                        if sd:
                            row["sdpa_best" + mode + "_ms"] = min(sd)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(row)
                log(json.dumps({n: x for n, x in row.items() if not n.endswith("_rounds")}))
            del k, v
            torch.cuda.empty_cache()
    return rows


def table_gpu(rows) -> str:
    head = ("| pattern | B | L | spattn eager | Flex eager | SDPA eager | spattn graph | "
            "Flex graph | SDPA graph | Flex / spattn (graph) | spattn / SDPA (graph) | splits |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    f = lambda x: "-" if x is None else f"{x * 1000:.1f} us"  # noqa: E731
    for r in rows:
        if "error" in r:
            out.append(f"| {r['pattern']} | {r['B']} | {r['L']} | ERROR: {r['error']} |")
            continue
        sg, fg, dg = r.get("spattn_graph_ms"), r.get("flex_graph_ms"), r.get("sdpa_best_graph_ms")
        ratio_f = f"{fg / sg:.2f}" if sg and fg else "-"
        ratio_d = f"{sg / dg:.2f}" if sg and dg else "-"
        out.append(f"| {r['pattern']} | {r['B']} | {r['L']} | {f(r.get('spattn_ms'))} | "
                   f"{f(r.get('flex_ms'))} | {f(r.get('sdpa_best_ms'))} | {f(sg)} | {f(fg)} | "
                   f"{f(dg)} | {ratio_f} | {ratio_d} | {r.get('splits', '-')} |")
    return "\n".join(out)


# ------------------------------------------------------------------ CPU

def _cpu_time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def run_cpu(args):
    import torch.nn.functional as F
    shapes = [(8, 8, 64), (32, 8, 128)] if args.tiny else [(8, 8, 64), (32, 8, 128),
                                                           (32, 32, 128)]
    Ls = (256,) if args.tiny else ((1024, 8192) if args.quick else (1024, 4096, 8192))
    pats = {"causal": "causal", "window(1024)": "causal & window(1024)",
            "streaming": "causal & (window(1024) | sink(4))"}
    rows = []
    for L in Ls:
        for Hq, Hk, D in shapes:
            g = torch.Generator().manual_seed(0)
            q = torch.randn(1, Hq, 1, D, generator=g)
            k = torch.randn(1, Hk, L, D, generator=g)
            v = torch.randn(1, Hk, L, D, generator=g)
            for name, src in pats.items():
                pat = spattn.compile(src, backend="torch")
                row = {"pattern": name, "L": L, "Hq": Hq, "Hk": Hk, "D": D}
                ours = lambda: pat(q, k, v)  # noqa: E731
                dense = lambda: F.scaled_dot_product_attention(  # noqa: E731
                    q, k, v, enable_gqa=Hq != Hk)
                if name == "causal":
                    err = float((ours() - dense()).abs().max())
                    row["max_err_vs_sdpa"] = err
                a, b = [], []
                for r in range(args.rounds):
                    for n in ((0, 1) if r % 2 == 0 else (1, 0)):
                        (a if n == 0 else b).append(_cpu_time(ours if n == 0 else dense,
                                                              args.reps))
                row["spattn_ms"], row["sdpa_ms"] = statistics.median(a), statistics.median(b)
                row["speedup"] = row["sdpa_ms"] / row["spattn_ms"]
                log(f"{name} L={L} H={Hq}/{Hk} D={D}: {row['spattn_ms']:.3f} vs "
                    f"{row['sdpa_ms']:.3f} ms")
                rows.append(row)
    return rows


def table_cpu(rows) -> str:
    out = ["| pattern | L | Hq/Hk | D | spattn ms | dense SDPA ms | SDPA / spattn |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['pattern']} | {r['L']} | {r['Hq']}/{r['Hk']} | {r['D']} | "
                   f"{r['spattn_ms']:.3f} | {r['sdpa_ms']:.3f} | {r['speedup']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="directory for decode.json")
    p.add_argument("--quick", action="store_true", help="a subset")
    p.add_argument("--cpu", action="store_true", help="the CPU decode step against SDPA")
    p.add_argument("--tiny", action="store_true", help="CPU: tiny lengths (tests)")
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--rep", type=int, default=40, help="GPU: ms per do_bench measurement")
    p.add_argument("--reps", type=int, default=20, help="CPU: calls per round")
    p.add_argument("--threads", type=int, default=0, help="CPU: torch threads (0: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.cpu:
        rows = run_cpu(args)
        text = table_cpu(rows)
    else:
        if not torch.cuda.is_available():
            log("no CUDA device: run with --cpu")
            return 2
        rows = run_gpu(args)
        text = table_gpu(rows)
    meta = {"torch": torch.__version__, "seconds": time.time() - t0,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu
            else "cpu", "threads": torch.get_num_threads()}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "decode_cpu.json" if args.cpu else "decode.json"),
                  "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
