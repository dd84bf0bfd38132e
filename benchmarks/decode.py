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
``seq_lens``, a device tensor). Every spattn output is checked against Flex's (where Flex
fails, against the float64 reference, ``runtime.reference.pattern_reference``).

    python benchmarks/decode.py --out DIR           # everything (< 90 s on an H200)
    python benchmarks/decode.py --quick --out DIR   # 32K only
    python benchmarks/decode.py --cpu [--quick]     # the CPU decode step against dense SDPA
    python benchmarks/decode.py --cpu --quick --stripes --threads 1   # head stripes
    python benchmarks/decode.py --cpu --quick --scattered --threads 1 # keys in many runs

CPU mode (``--cpu``): float32, B in {1, 16}, L = 1024..32768 (``--quick``: 1024, 8192,
32768), Lq = 1 and 4 (``--quick``: 1), Hq/Hk 8/8, 32/8 and 32/32 with D = 64 and 128
(``--quick``: 8/8 with 64, the others with 128), each with torch's default number of threads
and with one (``--threads``), skipping rows whose K and V take more than 2 GiB (and
SDPA on expanded K and V where those copies would). Rivals,
timed in alternating rounds in this process (medians of ``time.perf_counter`` per round):

* spattn, the same step again: ``pat(q, k, v)`` (routed to the decode path) at one length,
  as the layers of a model run one step (the plan's memo of steps serves all but the
  first);
* spattn, a new step every call: the length cycles through five values, so the memo never
  holds it (a decode loop's first layer);
* dense SDPA on every key (bottom-right causal rows through a bool mask for Lq > 1), with
  ``enable_gqa=True`` and, for grouped heads, on K and V expanded beforehand: the faster
  counts;
* not a rival: ``k.sum() + v.sum()``, reading K and V once, the floor of any step that
  reads every key (causal) on this machine ("K, V read" in the table).

``--stripes`` runs two head-stripe patterns instead (``causal & (q - k < 1024 | k % H ==
h)`` and S2-Attention's ``causal & (window(1024) | (k // 8) % H == h)``: each head sees a
window and its own class of keys), each checked against the float64 reference.
``--scattered`` runs patterns whose keys lie in many short runs (a dilation by 8, the first
8 keys of every 64, every key but each third, every other key below the diagonal), against
SDPA with the pattern's bool mask (built outside the timed calls), each checked against
the float64 reference.

Progress goes to stderr; the table is printed last; rows go to ``DIR/decode.json``
(``DIR/decode_cpu.json`` with ``--cpu``), each with its per-round times.
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
from spattn.runtime.reference import pattern_reference

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


def _reference(pat, q, k, v):
    """The float64 reference output, one batch element at a time (the reference expands K
    and V to the query heads in float64: at B = 16 with 128K keys the whole batch would
    take 64 GiB). The patterns here do not read ``b``."""
    return torch.cat([pattern_reference(pat, q[i:i + 1], k[i:i + 1], v[i:i + 1])[0]
                      for i in range(q.shape[0])])


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
    Bs = tuple(int(x) for x in args.batches.split(",")) if args.batches else (1, 16)
    Ls = (tuple(int(x) for x in args.lengths.split(",")) if args.lengths
          else (32768,) if args.quick else (8192, 32768, 131072))
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
                    timed = {"spattn": sp}
                    try:
                        bm = create_block_mask(_flex_mask(name, off), None, None, 1, L,
                                               device=dev)
                        fx = lambda: flex(q, k, v, block_mask=bm, enable_gqa=True)  # noqa: E731
                        ref = fx()
                        timed["flex"] = fx
                    except Exception as e:   # Flex failing must not hide spattn and SDPA
                        row["flex_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                        torch.cuda.empty_cache()
                        ref = _reference(pat, q, k, v)
                    row["max_err_vs_flex"] = float((o.float() - ref.float()).abs().max())
                    if row["max_err_vs_flex"] > 2e-2:
                        row["error"] = f"mismatch vs flex: {row['max_err_vs_flex']:.3g}"
                        rows.append(row)
                        continue
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

#: CPU rows whose K and V take more bytes are skipped (and SDPA on expanded K and V where
#: those would).
CPU_MAX_BYTES = 2 << 30


def _cpu_time(fn, reps):
    """Median of ``reps`` timed calls, in ms (after one untimed call)."""
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def _cpu_grid(args):
    """(threads, B, L, Lq, (Hq, Hk, D)) of the CPU rows."""
    if args.tiny:
        return [(t, 1, 300, 1, s) for t in args.thread_list for s in ((8, 8, 64), (32, 8, 128))]
    shapes = [(8, 8, 64), (32, 8, 128), (32, 32, 128)]
    if not args.quick:
        shapes += [(8, 8, 128), (32, 8, 64), (32, 32, 64)]
    Ls = (1024, 8192, 32768) if args.quick else (1024, 2048, 4096, 8192, 16384, 32768)
    Lqs = (1,) if args.quick else (1, 4)
    Bs = (1, 16)
    pick = lambda given, default: tuple(int(x) for x in given.split(",")) if given \
        else default  # noqa: E731
    Ls, Lqs, Bs = (pick(getattr(args, n, None), d) for n, d in
                   (("lengths", Ls), ("lqs", Lqs), ("batches", Bs)))
    return [(t, B, L, lq, s) for t in args.thread_list for B in Bs for L in Ls
            for lq in Lqs for s in shapes]


def _rounds(fns: dict, rounds: int, reps: int) -> dict:
    """``{name: [ms per round]}``: the rivals timed in alternating rounds (the order flips
    every round)."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            times[n].append(_cpu_time(fns[n], reps))
    return times


def run_cpu(args):
    """The CPU decode step against dense SDPA (see the module docstring)."""
    import torch.nn.functional as F
    pats = {"causal": "causal", "window(1024)": "causal & window(1024)",
            "streaming": "causal & (window(1024) | sink(4))"}
    if args.tiny:
        pats = {"causal": "causal", "window(1024)": "causal & window(100)",
                "streaming": "causal & (window(100) | sink(4))"}
    if args.stripes:        # head stripes: each head's keys gathered (docs/decode.md)
        pats = {"stripes": "causal & (q - k < 1024 | k % H == h)",
                "s2-stripes": "causal & (window(1024) | (k // 8) % H == h)"}
    if args.scattered:      # keys in many runs: gathered, or one span under a mask
        pats = {"dilated-8": "(q - k) % 8 == 0", "8-of-64": "causal & k % 64 < 8",
                "not-every-3rd": "k % 3 != 0", "every-other": "causal & (q - k) % 2 == 0"}
    compiled = {n: spattn.compile(src, backend="torch") for n, src in pats.items()}
    rows = []
    for threads, B, L, Lq, (Hq, Hk, D) in _cpu_grid(args):
        G = Hq // Hk
        kv_bytes = 2 * B * Hk * L * D * 4
        expand = G > 1 and kv_bytes * (1 + G) <= CPU_MAX_BYTES
        base = {"threads": threads, "B": B, "L": L, "Lq": Lq, "Hq": Hq, "Hk": Hk, "D": D}
        if kv_bytes > CPU_MAX_BYTES:
            rows += [dict(base, pattern=n, skipped=f"K and V take {kv_bytes >> 20} MiB")
                     for n in pats]
            continue
        torch.set_num_threads(threads)
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, Hq, Lq, D, generator=g)
        k = torch.randn(B, Hk, L + DISTINCT, D, generator=g)
        v = torch.randn(B, Hk, L + DISTINCT, D, generator=g)
        kL, vL = k[:, :, :L], v[:, :, :L]
        # dense SDPA: every key (one query row sees all of them), bottom-right causal rows
        # for Lq > 1 (a bool mask built once)
        mask = None
        if Lq > 1:
            mask = torch.arange(L).view(1, -1) <= torch.arange(L - Lq, L).view(-1, 1)
        dense = {"sdpa": lambda: F.scaled_dot_product_attention(  # noqa: E731
            q, kL, vL, attn_mask=mask, enable_gqa=G > 1)}
        if expand:           # SDPA on K and V expanded beforehand, where that is faster
            ke, ve = kL.repeat_interleave(G, 1), vL.repeat_interleave(G, 1)
            dense["sdpa_expanded"] = lambda: F.scaled_dot_product_attention(  # noqa: E731
                q, ke, ve, attn_mask=mask)
        ref = dense["sdpa"]()
        reps = args.reps or max(3, min(50, int(0.15 / max(1e-5, _cpu_time(dense["sdpa"], 2)
                                                          / 1e3))))
        for name, pat in compiled.items():
            row = dict(base, pattern=name, reps=reps)
            if args.scattered:      # SDPA with the pattern's own bool mask
                pm = pat.mask(Lq, L, num_heads=Hq)
                dense = {"sdpa": lambda pm=pm: F.scaled_dot_product_attention(  # noqa: E731
                    q, kL, vL, attn_mask=pm, enable_gqa=G > 1)}
            # the same step again (the layers of a model at one step: the plan's memo serves
            # it) and a new length every call (a decode loop's first layer: the memo misses)
            views = [(k[:, :, :L - j], v[:, :, :L - j]) for j in range(DISTINCT)]
            cyc = {"i": 0}

            def new_step():
                cyc["i"] = (cyc["i"] + 1) % DISTINCT
                kn, vn = views[cyc["i"]]
                return pat(q, kn, vn)
            fns = {"spattn": lambda: pat(q, kL, vL), "spattn_new_step": new_step, **dense,
                   "read_kv": lambda: kL.sum() + vL.sum()}
            if name == "causal":
                row["max_err_vs_sdpa"] = float((fns["spattn"]() - ref).abs().max())
            elif args.stripes or args.scattered:    # the first batch element's reference
                want = pattern_reference(pat, q[:1].double(), kL[:1].double(), vL[:1].double())[0]
                row["max_err_vs_reference"] = float((fns["spattn"]()[:1] - want).abs().max())
            times = _rounds(fns, args.rounds, reps)
            for n, ts in times.items():
                row[n + "_ms"] = statistics.median(ts)
                row[n + "_ms_rounds"] = ts
            best = min((n for n in dense), key=lambda n: row[n + "_ms"])
            row["sdpa_best"], row["sdpa_best_ms"] = best, row[best + "_ms"]
            for n in ("spattn", "spattn_new_step"):
                per_round = [d / s for d, s in zip(times[best], times[n])]
                row[n + "_speedup"] = row["sdpa_best_ms"] / row[n + "_ms"]
                row[n + "_speedup_rounds"] = per_round
            log(f"threads={threads} B={B} L={L} Lq={Lq} H={Hq}/{Hk} D={D} {name}: "
                f"{row['spattn_ms']:.3f} / new step {row['spattn_new_step_ms']:.3f} vs "
                f"{best} {row['sdpa_best_ms']:.3f} ms")
            rows.append(row)
        del q, k, v, kL, vL, ref
        dense.clear()
    return rows


#: Distinct lengths the "new step" rival cycles through (more than a plan's memo holds).
DISTINCT = 5


def table_cpu(rows) -> str:
    """Ratios SDPA / spattn (above 1: spattn faster), medians over rounds with the range of
    the per-round ratios."""
    out = ["| threads | B | L | Lq | Hq/Hk | D | pattern | spattn ms | new step ms | "
           "SDPA ms | SDPA / spattn | (rounds) | SDPA / new step | K, V read ms |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = (f"| {r['threads']} | {r['B']} | {r['L']} | {r['Lq']} | {r['Hq']}/{r['Hk']} | "
                f"{r['D']} | {r['pattern']} |")
        if "skipped" in r:
            out.append(f"{head} skipped: {r['skipped']} |")
            continue
        sr = r["spattn_speedup_rounds"]
        sdpa = f"{r['sdpa_best_ms']:.3f}" + (" (exp.)" if r["sdpa_best"] != "sdpa" else "")
        out.append(f"{head} {r['spattn_ms']:.3f} | {r['spattn_new_step_ms']:.3f} | {sdpa} | "
                   f"{r['spattn_speedup']:.2f} | {min(sr):.2f}-{max(sr):.2f} | "
                   f"{r['spattn_new_step_speedup']:.2f} | "
                   f"{r.get('read_kv_ms', float('nan')):.3f} |")
    return "\n".join(out)


def _machine() -> str:
    import platform
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


def _commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="directory for decode.json")
    p.add_argument("--quick", action="store_true", help="a subset")
    p.add_argument("--cpu", action="store_true", help="the CPU decode step against SDPA")
    p.add_argument("--tiny", action="store_true", help="CPU: tiny lengths (tests)")
    p.add_argument("--stripes", action="store_true",
                   help="CPU: head-stripe patterns (per-head classes of keys) instead")
    p.add_argument("--scattered", action="store_true",
                   help="CPU: patterns whose keys lie in many short runs")
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--rep", type=int, default=40, help="GPU: ms per do_bench measurement")
    p.add_argument("--reps", type=int, default=0,
                   help="CPU: calls per round (0: about 0.15 s of SDPA per round)")
    p.add_argument("--lengths", default="", help="cache lengths, comma-separated")
    p.add_argument("--lqs", default="", help="CPU: query rows, comma-separated")
    p.add_argument("--batches", default="", help="batch sizes, comma-separated")
    p.add_argument("--threads", default="0,1",
                   help="CPU: torch thread counts, comma-separated (0: torch's default)")
    args = p.parse_args(argv)
    default_threads = torch.get_num_threads()
    args.thread_list = [int(t) or default_threads for t in str(args.threads).split(",")]
    t0, commit = time.time(), _commit()      # the code this process imported
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
            else _machine(), "default_threads": default_threads, "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "argv": sys.argv[1:] if argv is None else list(argv)}
    torch.set_num_threads(default_threads)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "decode_cpu.json" if args.cpu else "decode.json"),
                  "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
