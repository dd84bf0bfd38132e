"""GPU benchmark: packed documents at any count, in fresh processes, against FlexAttention.

``causal & same(doc)`` with 1, 4, 20, 100 and 1000 documents (sorted random cuts, the same
in every process) at N = 4096, 16384 and 65536 (B = 1, H = 16, D = 128, bf16): spattn's
forward and forward+backward against FlexAttention's (``torch.compile(flex_attention)``,
Triton backend, its block mask of the same pattern built once outside the timed region,
as spattn's plan is), timed in alternating rounds in the same process
(``bench.time_rounds``), each output and gradient checked against Flex's first.

A driver runs the whole set in ``--procs`` (3) FRESH processes and reports, per shape,
each process's times, the ratio Flex / spattn (above 1: spattn faster; the issue asks for
>= 1.1 in every process) and spattn's spread across the processes, ``(max - min) / min``
(the issue asks for <= 5%). ``--schedule``: ``interleaved`` (default) keeps the processes
alive together, taking turns shape by shape, so that the card's drift over
the minutes of a run (clocks under the power limit, temperature) falls on every process
alike rather than reading as a difference between processes; ``sequential`` runs one
process after the other. Each round times at least ``MIN_RUNS`` calls. ``--tune`` says
where the processes keep the autotuner's choices (``SPATTN_CACHE_DIR``):

* ``shared`` (default): one cache, empty at the start: the first process tunes, the
  others read its choices (what a machine with a persisted cache does); < 5 min;
* ``fresh``: a cache of its own per process: every process tunes for itself, so the
  spread also measures whether the tuner makes the same choice twice (about twice as
  long: the tuning of the 65536-token shapes dominates; give it ``--budget``);
* ``off``: ``SPATTN_AUTOTUNE=0``, the default configurations.

    python benchmarks/documents.py --out OUT                 # the must-show set
    python benchmarks/documents.py --out OUT --tune fresh --budget 560   # every process tunes
    python benchmarks/documents.py --out OUT --cpu --tiny    # the driver on the CPU

``--graphs`` (GPU) also times each library's forward and forward+backward replayed from a
CUDA graph captured after three warm-up calls (spattn through its plan), so that the host's
time to issue a call, which bounds the short calls of both libraries on some machines, is
taken out: a second table compares the kernels alone. A library whose capture fails is left
out of it with the error in the row.

``--cpu --tiny`` runs the same driver on the CPU with tiny shapes (N = 64 and 256, H = 2,
D = 16, fp32; Flex's forward runs eagerly there, and as Flex has no CPU backward its
forward+backward stand-in is SDPA with the same boolean mask): a check of the logic, not
a measurement. ``--budget`` (285 s) bounds the whole run: the processes are stopped when
it runs out (in the sequential schedule each process gets a share of what is left, the
first, which compiles the kernels and tunes, the largest), with the shapes they finished
reported. Writes
``OUT/documents.json`` (and each process's ``documents-proc<i>.json`` and ``.log``); prints a
markdown table last.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
SOURCE = "causal & same(doc)"
LENGTHS = [4096, 16384, 65536]
DOCS = [1, 4, 20, 100, 1000]
TINY_LENGTHS = [64, 256]
TINY_DOCS = [1, 4, 20]
#: The issue's bars: Flex / spattn at least this in every process, spread at most this.
MIN_RATIO = 1.1
MAX_SPREAD = 0.05
#: The fewest timed runs per round (``gpu_timer``).
MIN_RUNS = 10
#: What a shape times: each kind's spattn and Flex callables are timed in alternation
#: (``bench.time_rounds``'s groups); the ``graph_`` kinds only with ``--graphs``.
KINDS = ("fwd", "fwdbwd", "graph_fwd", "graph_fwdbwd")
GROUPS = tuple((k, f"flex_{k}") for k in KINDS)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ worker

def doc_ids(N: int, n: int, device, seed: int = 0):
    """Document ids ``[N]`` of ``n`` documents: ``n - 1`` distinct sorted random cuts
    (seeded, the same in every process)."""
    import torch
    g = torch.Generator().manual_seed(seed * 1_000_003 + N * 7 + n)
    cuts = torch.sort(torch.randperm(N - 1, generator=g)[: n - 1] + 1).values
    return torch.bucketize(torch.arange(N), cuts, right=True).to(device)


#: The document ids of the shape being run: read by :func:`doc_mask` as a global, so that
#: one mask function serves every shape and compiled Flex recompiles per length only (a
#: new closure per shape would be a new function to guard on).
DOC_IDS = None


def doc_mask(b, h, qi, ki):
    """Flex's ``mask_mod`` of ``causal & same(doc)``."""
    return (qi >= ki) & (DOC_IDS[qi] == DOC_IDS[ki])


def cpu_timer(fn, grad_to_none=None):
    """Median ms of 3 runs after one warm-up (the CPU mode's stand-in for do_bench)."""
    fn()
    ts = []
    for _ in range(3):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def gpu_timer(fn, grad_to_none=None):
    """Median ms of ``fn`` by ``do_bench`` over 50 ms of runs and at least ``MIN_RUNS``
    runs (50 ms alone would time a 65536-token call once or twice), after 25 ms of
    warm-up."""
    import torch
    import triton
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est_ms = (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=max(50.0, MIN_RUNS * est_ms),
                                   grad_to_none=grad_to_none, return_mode="median")


def stage_name(stage) -> str | None:
    """What a plan's stage runs (tiles, warps, loop, ...: the tuner's choice), or its type's
    name on the CPU backend."""
    if stage is None:
        return None
    return repr(stage) if hasattr(stage, "config") else type(stage).__name__


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_shape(N: int, n: int, *, H: int, D: int, dtype, dev: str, rounds: int, cpu: bool,
              graphs: bool = False):
    """One shape in this process: checks, then spattn and Flex in alternating rounds."""
    import bench
    row, timed = prepare_shape(N, n, H=H, D=D, dtype=dtype, dev=dev, cpu=cpu, graphs=graphs)
    if "error" not in row:
        bench.time_rounds(row, timed, rounds, bench=cpu_timer if cpu else gpu_timer,
                          groups=GROUPS)
        ratios(row)
    drop_graphs(timed)
    return row


def drop_graphs(timed) -> None:
    """Reset the CUDA graphs whose replays ``timed`` holds: each graph and its memory pool go
    now, not when the last reference to the replay does (a run kept ~4 GiB of pools per
    65536-token shape: benchmarks/RESULTS.md, "documents replayed from CUDA graphs")."""
    import torch
    for fn, _ in (timed or {}).values():
        if isinstance(getattr(fn, "__self__", None), torch.cuda.CUDAGraph):
            fn.__self__.reset()


def ratios(row: dict) -> None:
    for kind in KINDS:
        if f"flex_{kind}_ms" in row and row.get(f"{kind}_ms"):
            row[f"{kind}_ratio"] = row[f"flex_{kind}_ms"] / row[f"{kind}_ms"]


def prepare_shape(N: int, n: int, *, H: int, D: int, dtype, dev: str, cpu: bool,
                  graphs: bool = False):
    """One shape's inputs, plan, Flex block mask and checks: the row so far and the timed
    callables (``bench.time_rounds``'s ``timed``); with ``graphs``, also the replays of
    CUDA graphs of the same calls (``decode._graph``)."""
    import torch
    import spattn
    import bench
    row = {"N": N, "docs": n, "H": H, "D": D}
    ids = doc_ids(N, n, dev)
    g = torch.Generator(device=dev).manual_seed(N + n)
    q, k, v, do = (torch.randn(1, H, N, D, device=dev, dtype=dtype, generator=g)
                   for _ in range(4))
    pat = spattn.compile(SOURCE)
    sync = (lambda: None) if cpu else torch.cuda.synchronize
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    t0 = time.perf_counter()
    plan = pat.plan(qg, kg, vg, doc=ids, backward=True)      # compiles and tunes both
    sync()
    row["plan_s"] = time.perf_counter() - t0
    from spattn.runtime.tables import row_bucket
    analysis = getattr(getattr(plan, "call", None), "analysis", None)
    row["rows_bucket"] = row_bucket(*analysis.row_span()) \
        if plan.backend == "triton" and analysis is not None else None
    row["fwd_stage"] = stage_name(plan.forward_stage)
    o = pat(q, k, v, plan=plan)
    og = pat(qg, kg, vg, plan=plan)
    og.backward(do)
    if plan.backend == "triton":
        row["bwd_stage"] = stage_name(next(iter(plan._bwd.values()), None))

    # Flex, block mask built once (as the plan is)
    if cpu:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    else:
        create_block_mask, flex_attention = bench._flex()

    global DOC_IDS
    DOC_IDS = ids
    t0 = time.perf_counter()
    # compiled on the GPU: evaluated eagerly, the mask's gathers take [N, N] int64 tensors
    # (32 GiB at 65536 tokens, which three live processes' memory cannot spare)
    bm = create_block_mask(doc_mask, 1, None, N, N, device=dev,
                           **({} if cpu else {"_compile": True}))
    sync()
    row["flex_mask_ms"] = (time.perf_counter() - t0) * 1e3
    ref = flex_attention(q, k, v, block_mask=bm)
    row["rel_err_vs_flex"] = rel(o, ref)
    timed = {"fwd": ((lambda: pat(q, k, v, plan=plan)), None),
             "flex_fwd": ((lambda: flex_attention(q, k, v, block_mask=bm)), None)}
    qf, kf, vf = (t.detach().requires_grad_() for t in (q, k, v))
    if cpu:        # Flex has no CPU backward: SDPA with the same boolean mask stands in
        import torch.nn.functional as F
        dense = pat.mask(N, N, doc=ids, device=dev)

        def rival():
            return F.scaled_dot_product_attention(qf, kf, vf, attn_mask=dense)
        row["fwdbwd_rival"] = "sdpa-boolean-mask"
    else:
        def rival():
            return flex_attention(qf, kf, vf, block_mask=bm)
        row["fwdbwd_rival"] = "flex"
    rival().backward(do)
    row["grad_rel_err_vs_rival"] = max(rel(a.grad, b.grad)
                                       for a, b in ((qg, qf), (kg, kf), (vg, vf)))
    if not (row["rel_err_vs_flex"] < 2e-2 and row["grad_rel_err_vs_rival"] < 2e-2):
        row["error"] = (f"mismatch: output {row['rel_err_vs_flex']:.2e}, gradients "
                        f"{row['grad_rel_err_vs_rival']:.2e}")
        return row, timed

    def fb():
        pat(qg, kg, vg, plan=plan).backward(do)

    def fb_rival():
        rival().backward(do)
    timed["fwdbwd"] = fb, [qg, kg, vg]
    timed["flex_fwdbwd"] = fb_rival, [qf, kf, vf]
    if graphs:
        from decode import _graph as graph_of     # warm-up on a side stream, capture, replay
        # fresh leaves: a leaf whose AccumulateGrad node an eager call made on the default
        # stream (kept alive by og's graph) would make the capture wait on that stream
        qc, kc, vc, qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v) * 2)
        steps = {"graph_fwd": lambda: pat(q, k, v, plan=plan),
                 "flex_graph_fwd": lambda: flex_attention(q, k, v, block_mask=bm),
                 "graph_fwdbwd": lambda: torch.autograd.grad(
                     pat(qc, kc, vc, plan=plan), (qc, kc, vc), do),
                 "flex_graph_fwdbwd": lambda: torch.autograd.grad(
                     flex_attention(qd, kd, vd, block_mask=bm), (qd, kd, vd), do)}
        del og
        for name, step in steps.items():
            err = "flex_graph_error" if name.startswith("flex_") else "graph_error"
            if err in row:
                continue
            try:
                timed[name] = graph_of(step), None
            except Exception as e:     # noqa: BLE001 -- reported in the row
                row[err] = f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                lib = "flex_" if name.startswith("flex_") else ""
                for kind in ("graph_fwd", "graph_fwdbwd"):
                    timed.pop(lib + kind, None)
    return row, timed


def worker(args) -> None:
    """One process: every shape, the rows written to ``documents-proc<i>.json`` as they
    come (a process stopped by its time limit leaves the shapes it finished)."""
    sys.path.insert(0, str(HERE))
    import torch
    out = pathlib.Path(args.out) / f"documents-proc{args.worker}.json"
    dev = "cpu" if args.cpu else "cuda"
    dtype = torch.float32 if args.cpu else torch.bfloat16
    rows = []
    for N in args.lengths:
        for n in args.docs:
            if n > N // 2:
                continue
            log(f"[proc {args.worker}] N={N} docs={n}")
            try:
                row = run_shape(N, n, H=args.heads, D=args.head_dim, dtype=dtype, dev=dev,
                                rounds=args.rounds, cpu=args.cpu, graphs=args.graphs)
            except Exception as e:       # noqa: BLE001 -- reported in the row, next shape
                row = {"N": N, "docs": n, "error": f"{type(e).__name__}: {e}"[:400]}
            row["proc"] = args.worker
            rows.append(row)
            out.write_text(json.dumps(rows, indent=1))
            if not args.cpu:
                torch.cuda.empty_cache()


def serve(args) -> None:
    """One process of the interleaved schedule: commands on stdin, one per line, each
    answered by ``@@ok`` on stdout once done:

    * ``shape N n``: inputs, plan, Flex's block mask and the checks of one shape;
    * ``round r``: one alternating timing round of that shape (the order flipped when
      ``r`` is odd);
    * ``finish``: the medians of its rounds, the row appended to
      ``documents-proc<i>.json``.
    """
    sys.path.insert(0, str(HERE))
    import torch
    import bench
    out = pathlib.Path(args.out) / f"documents-proc{args.worker}.json"
    dev = "cpu" if args.cpu else "cuda"
    dtype = torch.float32 if args.cpu else torch.bfloat16
    timer = cpu_timer if args.cpu else gpu_timer
    rows, row, timed = [], None, None

    def release(timed):
        """What the shape held goes back before another process's turn (its CUDA graphs'
        memory pools, the closures' cycles, the plan cache's plans, the allocator's cached
        blocks); what stays reserved goes to the log (two idle processes kept 14-20 GiB
        each: benchmarks/RESULTS.md, "documents in three interleaved processes")."""
        import gc
        from spattn.runtime.plan import PLANS
        drop_graphs(timed)
        gc.collect()
        PLANS.clear()
        if not args.cpu:
            torch.cuda.empty_cache()
            log(f"[proc {args.worker}] reserved after the shape: "
                f"{torch.cuda.memory_reserved() / 2**30:.2f} GiB")
    for line in sys.stdin:
        cmd, *val = line.split()
        try:
            if cmd == "shape":
                N, n = map(int, val)
                log(f"[proc {args.worker}] N={N} docs={n}")
                row, timed = {"N": N, "docs": n}, None
                row, timed = prepare_shape(N, n, H=args.heads, D=args.head_dim, dtype=dtype,
                                           dev=dev, cpu=args.cpu, graphs=args.graphs)
            elif cmd == "round" and timed is not None and "error" not in row:
                got = {}
                bench.time_rounds(got, timed, 1, bench=timer, groups=GROUPS, first=int(val[0]))
                for k, x in got.items():
                    if k.endswith("_ms_rounds"):
                        row.setdefault(k, []).extend(x)
                    elif k == "flex_error":
                        row[k] = x
            elif cmd == "finish":
                for k in [k for k in row if k.endswith("_ms_rounds")]:
                    row[k[: -len("_rounds")]] = statistics.median(row[k])
                ratios(row)
                row["proc"] = args.worker
                rows.append(row)
                out.write_text(json.dumps(rows, indent=1))
                release(timed)
                row, timed = None, None
        except Exception as e:       # noqa: BLE001 -- reported in the row, next shape
            if row is not None:
                row["error"] = f"{type(e).__name__}: {e}"[:400]
        print("@@ok", flush=True)


# ------------------------------------------------------------------ driver

def spread(xs) -> float | None:
    xs = [x for x in xs if x]
    return (max(xs) - min(xs)) / min(xs) if len(xs) > 1 else None


def summarise(per_proc: list[list[dict]], procs: int) -> list[dict]:
    """Per shape: each process's times and ratios, spattn's spread, the bars met or not."""
    shapes = {}
    for p, rows in enumerate(per_proc):
        for r in rows:
            shapes.setdefault((r["N"], r["docs"]), [None] * procs)[p] = r
    out = []
    for (N, n), rs in sorted(shapes.items()):
        s = {"N": N, "docs": n, "errors": [r.get("error") for r in rs if r and r.get("error")],
             "missing": sum(r is None for r in rs)}
        for kind in KINDS:
            if kind.startswith("graph_") and not any(r and f"{kind}_ms" in r for r in rs):
                continue
            ours = [r.get(f"{kind}_ms") if r else None for r in rs]
            theirs = [r.get(f"flex_{kind}_ms") if r else None for r in rs]
            ratios = [r.get(f"{kind}_ratio") if r else None for r in rs]
            s[f"{kind}_ms"] = ours
            s[f"flex_{kind}_ms"] = theirs
            s[f"{kind}_ratio"] = ratios
            s[f"{kind}_spread"] = spread(ours)
            got = [x for x in ratios if x]
            s[f"{kind}_min_ratio"] = min(got) if got else None
            s[f"{kind}_ok"] = (len(got) == procs and min(got) >= MIN_RATIO
                               and (procs == 1 or s[f"{kind}_spread"] <= MAX_SPREAD))
        s["fwd_stages"] = sorted({r.get("fwd_stage") for r in rs if r and r.get("fwd_stage")})
        s["bwd_stages"] = sorted({r.get("bwd_stage") for r in rs if r and r.get("bwd_stage")})
        out.append(s)
    return out


def table(summary: list[dict]) -> str:
    """The markdown table of the eager calls, and with ``--graphs`` a second one of the
    calls replayed from CUDA graphs."""
    out = _table(summary, ("fwd", "fwdbwd"))
    if any("graph_fwd_ms" in s or "graph_fwdbwd_ms" in s for s in summary):
        out += "\n\nReplayed from CUDA graphs (the host's time to issue a call taken out):\n\n" \
            + _table(summary, ("graph_fwd", "graph_fwdbwd"))
    return out


def _table(summary: list[dict], kinds: tuple) -> str:
    def ms(xs):
        return "/".join("-" if x is None else f"{x:.3f}" for x in xs or [])

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    def ratio(x):
        return "-" if x is None else f"{x:.2f}x"
    f, fb = kinds
    lines = ["| N | docs | fwd ms (per process) | spread | Flex fwd ms | min ratio | "
             "fwd+bwd ms (per process) | spread | Flex fwd+bwd ms | min ratio | bars | "
             "configs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        bars = "error" if s["errors"] else ("missing" if s["missing"] else
               " ".join(f"{k}:{'ok' if s.get(k + '_ok') else 'NO'}" for k in kinds))
        nconf = f"{len(s['fwd_stages'])}/{len(s['bwd_stages'])}"
        lines.append(
            f"| {s['N']} | {s['docs']} | {ms(s.get(f + '_ms'))} | {pct(s.get(f + '_spread'))} | "
            f"{ms(s.get('flex_' + f + '_ms'))} | {ratio(s.get(f + '_min_ratio'))} | "
            f"{ms(s.get(fb + '_ms'))} | {pct(s.get(fb + '_spread'))} | "
            f"{ms(s.get('flex_' + fb + '_ms'))} | {ratio(s.get(fb + '_min_ratio'))} | {bars} | "
            f"{nconf} |")
    lines.append("")
    lines.append(f"ratio = Flex / spattn (bar >= {MIN_RATIO}x in every process); spread = "
                 f"(max - min) / min of spattn's times across processes (bar <= "
                 f"{100 * MAX_SPREAD:.0f}%); configs = distinct fwd/bwd stages chosen across "
                 "processes")
    return "\n".join(lines)


def _proc_env(args, i: int) -> dict:
    """Process ``i``'s environment: its tuning cache (emptied where it is to tune)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.tune == "off":
        env["SPATTN_AUTOTUNE"] = "0"
    else:
        env.pop("SPATTN_AUTOTUNE", None)
    root = pathlib.Path(args.cache_root) if args.cache_root else pathlib.Path(args.out)
    cache = root / ("spattn-cache" + (f"-proc{i}" if args.tune == "fresh" else ""))
    if i == 0 or args.tune == "fresh":
        import shutil
        shutil.rmtree(cache, ignore_errors=True)     # empty at the start: tuned here
    env["SPATTN_CACHE_DIR"] = str(cache)
    if args.cpu:
        env.pop("TRITON_INTERPRET", None)
    return env


def _worker_cmd(args, i: int) -> list[str]:
    return [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", str(i),
            "--out", str(args.out), "--rounds", str(args.rounds), "--heads", str(args.heads),
            "--head-dim", str(args.head_dim), "--lengths", *map(str, args.lengths),
            "--docs", *map(str, args.docs)] + (["--cpu"] if args.cpu else []) \
        + (["--graphs"] if args.graphs else [])


def run_sequential(args, start: float) -> list[dict]:
    """Each process runs every shape, one process after the other."""
    runs = []
    for i in range(args.procs):
        env = _proc_env(args, i)
        left = args.budget - (time.perf_counter() - start)
        limit = max(10.0, left / (args.procs - i))
        if i == 0 and args.tune != "fresh":   # the first process compiles (and tunes): more
            limit = max(10.0, left - (args.procs - 1) * args.budget / (2 * args.procs))
        log(f"process {i}: {args.tune} tuning cache, limit {limit:.0f} s")
        t0 = time.perf_counter()
        with open(pathlib.Path(args.out) / f"documents-proc{i}.log", "w") as lf:
            try:
                rc = subprocess.run(_worker_cmd(args, i), env=env, stdout=lf,
                                    stderr=subprocess.STDOUT, timeout=limit,
                                    cwd=str(HERE.parent)).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        runs.append({"proc": i, "rc": rc, "seconds": time.perf_counter() - t0})
        log(f"process {i}: rc {rc}, {runs[-1]['seconds']:.0f} s")
    return runs


def run_interleaved(args, start: float) -> list[dict]:
    """All processes alive at once, taking turns shape by shape: each runs a shape (its
    setup, checks and timing rounds) and lets it go before the next process runs the
    same shape, so that the card's drift over the minutes of a run (clocks, temperature)
    falls on every process alike, as the alternating rounds make it fall on spattn and
    Flex alike. One process holds a shape's tensors at a time (three processes each
    holding a 65536-token shape's do not fit an 80 GB card). The first process to run a
    shape is the next one each shape (process 0 always with ``--tune shared``: it tunes,
    the others read its choices)."""
    import queue
    import threading
    procs, answers, logs = [], [], []
    for i in range(args.procs):
        lf = open(pathlib.Path(args.out) / f"documents-proc{i}.log", "w")
        p = subprocess.Popen(_worker_cmd(args, i) + ["--serve"], env=_proc_env(args, i),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=lf,
                             text=True, cwd=str(HERE.parent))
        q = queue.Queue()

        def pump(p=p, q=q, lf=lf):
            for line in p.stdout:
                if line.strip() == "@@ok":
                    q.put(True)
                else:
                    lf.write(line)
            q.put(False)
        threading.Thread(target=pump, daemon=True).start()
        procs.append(p)
        answers.append(q)
        logs.append(lf)

    def ask(i: int, cmd: str) -> None:
        procs[i].stdin.write(cmd + "\n")
        procs[i].stdin.flush()
        left = args.budget - (time.perf_counter() - start)
        if left <= 0 or not answers[i].get(timeout=left):
            raise TimeoutError(f"process {i} at {cmd!r}")

    rc, shape = 0, 0
    try:
        for N in args.lengths:
            for n in args.docs:
                if n > N // 2:
                    continue
                log(f"N={N} docs={n}")
                first = 0 if args.tune == "shared" else shape % args.procs
                for i in [(first + j) % args.procs for j in range(args.procs)]:
                    ask(i, f"shape {N} {n}")
                    for r in range(args.rounds):
                        ask(i, f"round {r}")
                    ask(i, "finish")
                shape += 1
    except (TimeoutError, queue.Empty, BrokenPipeError) as e:
        log(f"stopped: {type(e).__name__} {e}")
        rc = "timeout"
    for p in procs:
        try:
            p.stdin.close()
            p.wait(timeout=30)
        except (subprocess.TimeoutExpired, BrokenPipeError):
            p.kill()
    for lf in logs:
        lf.close()
    return [{"proc": i, "rc": rc if rc else p.returncode,
             "seconds": time.perf_counter() - start} for i, p in enumerate(procs)]


def driver(args) -> int:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(args.procs):
        (out / f"documents-proc{i}.json").unlink(missing_ok=True)
    start = time.perf_counter()
    runs = (run_interleaved if args.schedule == "interleaved" else run_sequential)(args, start)
    per_proc = []
    for i in range(args.procs):
        f = out / f"documents-proc{i}.json"
        per_proc.append(json.loads(f.read_text()) if f.exists() else [])
    summary = summarise(per_proc, args.procs)
    meta = {"source": SOURCE, "lengths": args.lengths, "docs": args.docs, "H": args.heads,
            "D": args.head_dim, "dtype": "fp32" if args.cpu else "bf16", "B": 1,
            "procs": args.procs, "tune": args.tune, "rounds": args.rounds,
            "schedule": args.schedule, "min_runs": MIN_RUNS, "graphs": args.graphs,
            "device": "cpu" if args.cpu else _gpu_name(), "runs": runs,
            "seconds": time.perf_counter() - start}
    (out / "documents.json").write_text(json.dumps(
        {"meta": meta, "summary": summary, "processes": per_proc}, indent=1))
    print(table(summary))
    return 0 if all(r["rc"] == 0 for r in runs) else 1


def _gpu_name() -> str:
    try:
        import torch
        return torch.cuda.get_device_name(0)
    except Exception:        # noqa: BLE001
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for the JSON and the logs")
    ap.add_argument("--procs", type=int, default=3, help="fresh processes (default 3)")
    ap.add_argument("--tune", choices=("shared", "fresh", "off"), default="shared")
    ap.add_argument("--rounds", type=int, default=2, help="alternating timing rounds "
                    "(default 2)")
    ap.add_argument("--lengths", type=int, nargs="+")
    ap.add_argument("--docs", type=int, nargs="+")
    ap.add_argument("--heads", type=int)
    ap.add_argument("--head-dim", type=int)
    ap.add_argument("--budget", type=float, default=285.0,
                    help="seconds for all processes together (default 285)")
    ap.add_argument("--cache-root", help="where the processes' kernel and tuning caches go "
                    "(emptied first; default: --out)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (logic check)")
    ap.add_argument("--graphs", action="store_true", help="also time each call replayed "
                    "from a CUDA graph (GPU)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (with --cpu)")
    ap.add_argument("--schedule", choices=("interleaved", "sequential"),
                    default="interleaved", help="processes alive together and taking "
                    "turns shape by shape (default), or one after the other")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    tiny = args.tiny or args.cpu
    args.lengths = args.lengths or (TINY_LENGTHS if tiny else LENGTHS)
    args.docs = args.docs or (TINY_DOCS if tiny else DOCS)
    args.heads = args.heads or (2 if tiny else 16)
    args.head_dim = args.head_dim or (16 if tiny else 128)
    if args.procs < 1 or args.rounds < 1:
        ap.error("--procs and --rounds must be at least 1")
    if args.graphs and args.cpu:
        ap.error("--graphs needs CUDA (CUDA graphs)")
    if args.worker is not None:
        (serve if args.serve else worker)(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
