"""A/B of two spattn commits in one process: the working tree against a base commit.

The base commit is imported as a second package, ``spattn_base`` (made by ``--make-base``
from ``git archive``: its imports, its custom-op namespace and its kernel module names are
renamed so that the two versions live side by side). For each pattern of
``benchmarks/bench.py`` both versions run the same problem (B = 1, bf16): their outputs
are checked against each other (and both against FlexAttention where it runs), then the
forward and forward+backward are timed in alternating rounds (``bench.time_rounds``:
base and new take turns, the order flipping every round), FlexAttention beside them as
the common anchor. ``--host`` also times the host side of one forward call at a short
length (the time until the call returns, the GPU queue not being the bottleneck): the
base version's plain call, the new version's plain call and its call with a reused plan,
and FlexAttention's compiled call with its block mask built beforehand.

    python benchmarks/ab.py --make-base a3684b7 --out .out/base_pkg     # on the dev machine
    python benchmarks/ab.py --base-pkg .out/base_pkg --N 16384 --json ab.json   # on the GPU

Prints a markdown table last.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

STAGES = ("dsl", "ir", "codegen", "runtime")


def make_base(commit: str, out: pathlib.Path) -> pathlib.Path:
    """Write commit ``commit`` of this repository as the package ``out/spattn_base``."""
    root = pathlib.Path(__file__).resolve().parents[1]
    pkg = out / "spattn_base"
    if pkg.exists():
        shutil.rmtree(pkg)
    with tempfile.TemporaryDirectory() as tmp:
        tar = subprocess.run(["git", "-C", str(root), "archive", commit, "spattn", *STAGES],
                             check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=tar, check=True)
        shutil.copytree(pathlib.Path(tmp) / "spattn", pkg)
        for stage in STAGES:
            shutil.copytree(pathlib.Path(tmp) / stage, pkg / stage)
    for path in pkg.rglob("*.py"):
        text = path.read_text()
        text = re.sub(r"\bspattn\.(?=(dsl|ir|codegen|runtime|pattern|cli|nn|plot)\b)",
                      "spattn_base.", text)
        text = re.sub(r"\bfrom spattn import\b", "from spattn_base import", text)
        text = re.sub(r"^import spattn$", "import spattn_base as spattn", text, flags=re.M)
        text = text.replace('"spattn::', '"spattn_base::').replace('"spattn_kernels.',
                                                                  '"spattn_base_kernels.')
        text = text.replace("f\"spattn_kernels.", "f\"spattn_base_kernels.")
        path.write_text(text)
    (out / "COMMIT").write_text(commit + "\n")
    return pkg


def _load_base(path: str):
    sys.path.insert(0, str(pathlib.Path(path).resolve()))
    return importlib.import_module("spattn_base")


def host_ms(fn, calls: int = 200) -> float:
    """Median host time (ms) of ``fn()``: perf_counter around each call, no synchronisation
    inside (a call returns once its kernels are queued)."""
    import torch
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        if len(ts) % 50 == 0:
            torch.cuda.synchronize()     # keep the queue short: measure the host, not a full queue
    torch.cuda.synchronize()
    return statistics.median(ts) * 1e3


def run_pattern(name, N, D, H, base, rounds, flex=True):
    import torch
    import spattn
    import bench
    src, params, mm_factory, in_factory = bench.PATTERNS[name]
    dev = "cuda"
    inputs = in_factory(N, dev) if in_factory else {}
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, device=dev, dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    do = torch.randn_like(q)
    new = spattn.compile(src, **params)
    old = base.compile(src, **params)
    row = {"pattern": name, "N": N, "D": D, "H": H}
    o_new, o_old = new(q, k, v, **inputs), old(q, k, v, **inputs)
    row["rel_diff"] = float((o_new.float() - o_old.float()).norm() / o_old.float().norm())
    timed = {"fwd": ((lambda: new(q, k, v, **inputs)), None),
             "flex_fwd": ((lambda: old(q, k, v, **inputs)), None)}
    grads = {}
    for tag, pat in (("new", new), ("old", old)):
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        pat(qg, kg, vg, **inputs).backward(do)
        grads[tag] = (qg, kg, vg)
    row["grad_rel_diff"] = max(float((a.grad.float() - b.grad.float()).norm() / b.grad.float().norm())
                               for a, b in zip(grads["new"], grads["old"]))

    def fb(pat, ts):
        def run():
            pat(*ts, **inputs).backward(do)
        return run
    timed["fwdbwd"] = fb(new, grads["new"]), list(grads["new"])
    timed["flex_fwdbwd"] = fb(old, grads["old"]), list(grads["old"])
    # bench.time_rounds alternates its two names: "new" plays spattn, "base" plays flex
    bench.time_rounds(row, timed, rounds)
    for kind in ("fwd", "fwdbwd"):
        row[f"new_{kind}_ms"] = row.pop(f"{kind}_ms")
        row[f"base_{kind}_ms"] = row.pop(f"flex_{kind}_ms")
        row[f"new_{kind}_ms_rounds"] = row.pop(f"{kind}_ms_rounds", None)
        row[f"base_{kind}_ms_rounds"] = row.pop(f"flex_{kind}_ms_rounds", None)
        row[f"{kind}_new_over_base"] = row[f"base_{kind}_ms"] / row[f"new_{kind}_ms"]
    return row


def run_host(base, N=4096, D=64, H=16):
    """Host time of one forward call: base, new, new with a reused plan, FlexAttention."""
    import torch
    import spattn
    import bench
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    out = []
    for name in ("causal", "window(1024)", "documents"):
        src, params, mm_factory, in_factory = bench.PATTERNS[name]
        inputs = in_factory(N, dev) if in_factory else {}
        q, k, v = (torch.randn(1, H, N, D, device=dev, dtype=torch.bfloat16, generator=g)
                   for _ in range(3))
        new, old = spattn.compile(src, **params), base.compile(src, **params)
        row = {"pattern": name, "N": N, "D": D, "H": H}
        row["base_us"] = host_ms(lambda: old(q, k, v, **inputs)) * 1e3
        row["new_us"] = host_ms(lambda: new(q, k, v, **inputs)) * 1e3
        if hasattr(new, "plan"):
            plan = new.plan(q, k, v, **inputs)
            row["new_plan_us"] = host_ms(lambda: new(q, k, v, plan=plan)) * 1e3
        create_block_mask, flex_attention = bench._flex()
        bm = create_block_mask(mm_factory(N, H, inputs), 1, None, N, N, device=dev)
        flex_attention(q, k, v, block_mask=bm)
        row["flex_us"] = host_ms(lambda: flex_attention(q, k, v, block_mask=bm)) * 1e3
        out.append(row)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--make-base", metavar="COMMIT")
    ap.add_argument("--out", default=".out/base_pkg")
    ap.add_argument("--base-pkg")
    ap.add_argument("--N", type=int, nargs="+", default=[16384])
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--patterns", nargs="+")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--host", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.make_base:
        print(make_base(args.make_base, pathlib.Path(args.out)))
        return
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import bench
    base = _load_base(args.base_pkg)
    rows, host = [], []
    for N in args.N:
        for name in args.patterns or [p for p in bench.default_names() if p != "bigbird"]:
            try:
                rows.append(run_pattern(name, N, args.D, args.H, base, args.rounds))
            except Exception as e:  # noqa: BLE001 -- report and go on
                rows.append({"pattern": name, "N": N, "error": f"{type(e).__name__}: {e}"[:300]})
            bench.log(json.dumps(rows[-1]))
    if args.host:
        host = run_host(base)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"rows": rows, "host": host}, indent=1))
    print("| pattern | N | fwd ms base / new | new/base speed | f+b ms base / new | new/base speed | max rel diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['pattern']} | {r['N']} | error: {r['error'][:80]} | | | | |")
            continue
        print(f"| {r['pattern']} | {r['N']} | {r['base_fwd_ms']:.3f} / {r['new_fwd_ms']:.3f} | "
              f"{r['fwd_new_over_base']:.3f} | {r['base_fwdbwd_ms']:.3f} / {r['new_fwdbwd_ms']:.3f} | "
              f"{r['fwdbwd_new_over_base']:.3f} | {max(r['rel_diff'], r['grad_rel_diff']):.1e} |")
    if host:
        print("\n| pattern | host us: base | new | new, reused plan | Flex |")
        print("|---|---|---|---|---|")
        for r in host:
            print(f"| {r['pattern']} | {r['base_us']:.1f} | {r['new_us']:.1f} | "
                  f"{r.get('new_plan_us', float('nan')):.1f} | {r['flex_us']:.1f} |")


if __name__ == "__main__":
    main()
