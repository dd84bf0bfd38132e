"""Device-op and host-sync count of one ``classify`` call, per pattern and tile shape (CPU).

On a GPU the classification is launch-bound: every device op costs ~5-10 us of host time
and every host synchronisation drains the queue. This script counts both on the CPU with
``torch.profiler`` so that changes can be measured without a GPU:

    python benchmarks/classify_ops.py                    # the table (N = 16384)
    python benchmarks/classify_ops.py --detail bigbird   # op names of one pattern

Counted as device ops: the top-level aten ops of the call (those with no aten parent: an op's
own sub-ops run in the same launch sequence and are not recounted) except the view and
metadata ops of :data:`NO_LAUNCH` unless they copy (``reshape`` of a non-viewable tensor,
``aten::to`` that converts); plus
one upload per tensor built from Python data (``torch.tensor``/``torch.as_tensor`` of a
Python scalar or list, seen as ``aten::lift_fresh``): on a GPU each is a host-to-device copy.
Counted as host syncs: ``nonzero`` (also inside boolean-mask indexing), ``masked_select``,
``_local_scalar_dense`` (``item``, ``int(t)``, ``bool(t)``) at any depth, and
``Tensor.tolist`` calls. CPU ms: median wall time of 5 calls (no profiler).
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import statistics
import sys
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

import spattn
from spattn.ir.nodes import free_vars
from spattn.ir.tiles import classify

#: aten ops that launch no device work (views, metadata, allocation without a fill)
NO_LAUNCH = frozenset("aten::" + n for n in (
    "as_strided", "as_strided_", "view", "reshape", "_reshape_alias", "select", "slice",
    "expand", "expand_as", "unsqueeze", "squeeze", "t", "transpose", "permute", "unbind",
    "split", "alias", "detach", "detach_", "empty", "empty_strided", "empty_like", "resize_",
    "result_type", "lift_fresh", "_unsafe_view", "view_as", "broadcast_tensors",
    "resolve_conj", "resolve_neg", "is_nonzero", "size", "stride", "numel", "dim",
    "is_floating_point", "contiguous", "flatten", "narrow", "movedim", "chunk", "indices",
    "values", "_has_compatible_shallow_copy_type", "clone_if_needed"))
SYNC_OPS = frozenset(("aten::nonzero", "aten::masked_select", "aten::_local_scalar_dense"))

PATTERN_NAMES = ["strided(128)", "power2(256)", "bigbird", "per-head", "documents",
                 "dilated(512,4)", "window(1024)", "streaming"]
TILES = [(128, 64), (64, 128), (64, 64)]


def _bench_module():
    path = pathlib.Path(__file__).with_name("bench.py")
    spec = importlib.util.spec_from_file_location("_spattn_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def setup(name: str, N: int, H: int = 16):
    """(pattern, num_heads, inputs) as the runtime classifies it: one head unless per-head."""
    bench = _bench_module()
    src, params, _, in_factory = bench.PATTERNS[name]
    pat = spattn.compile(src, **params)
    inputs = in_factory(N, "cpu") if in_factory else {}
    heads = H if {"h", "H"} & free_vars(pat.ir) else 1
    return pat, heads, inputs


def _top_level(events):
    for e in events:
        p = e.cpu_parent
        if p is None or not p.name.startswith("aten::"):
            yield e


def _launches(e) -> bool:
    """Whether an aten op launches device work: not a view/metadata op, or one that copies
    (``reshape`` of a non-viewable tensor clones, ``to`` converts)."""
    if e.name not in NO_LAUNCH and e.name != "aten::to":
        return True
    return any(_launches(c) for c in e.cpu_children)


def count(fn) -> tuple[int, int, Counter]:
    """(device ops, host syncs, Counter of device-op names) of one call of ``fn``."""
    calls = {"tolist": 0}
    orig = torch.Tensor.tolist

    def tolist(self):
        calls["tolist"] += 1
        return orig(self)

    torch.Tensor.tolist = tolist
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        torch.Tensor.tolist = orig
    events = list(prof.events())
    names: Counter = Counter()
    for e in _top_level(events):
        if e.name == "aten::lift_fresh":
            names["upload (lift_fresh)"] += 1
        elif e.name.startswith("aten::") and _launches(e):
            names[e.name] += 1
    syncs = sum(1 for e in events if e.name in SYNC_OPS) + calls["tolist"]
    return sum(names.values()), syncs, names


def cpu_ms(fn, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(name: str, tile, N: int):
    pat, heads, inputs = setup(name, N)
    bm, bn = tile

    def fn():
        return classify(pat, N, N, bm, bn, num_heads=heads, inputs=inputs)

    fn()                                  # warm the per-IR caches
    ops, syncs, names = count(fn)
    return ops, syncs, cpu_ms(fn), names


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=16384)
    ap.add_argument("--patterns", nargs="*", default=PATTERN_NAMES)
    ap.add_argument("--detail", help="print the device-op names of this pattern")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.detail:
        for tile in TILES:
            ops, syncs, ms, names = measure(args.detail, tile, args.N)
            print(f"{args.detail} {tile}: {ops} ops, {syncs} syncs, {ms:.2f} ms")
            for n, c in names.most_common():
                print(f"  {c:5d}  {n}")
        return
    print(f"N = {args.N}, torch {torch.__version__}, CPU, 1 thread\n")
    print("| pattern | tile | device ops | host syncs | CPU ms |")
    print("|---|---|---:|---:|---:|")
    for name in args.patterns:
        for tile in TILES:
            ops, syncs, ms, _ = measure(name, tile, args.N)
            print(f"| {name} | {tile[0]}x{tile[1]} | {ops} | {syncs} | {ms:.2f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
