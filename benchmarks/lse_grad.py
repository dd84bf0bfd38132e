"""GPU: the cost of a loss on the returned lse (the Triton backward's ``lse_grad`` stage).

For each pattern (B = 1, H = 16, D = 128, bf16), forward+backward of three losses, timed
in alternating rounds (``bench.time_rounds``):

* ``out``: ``sum(o * do)``, the plain backward stage;
* ``out+lse``: ``sum(o * do) + sum(lse * dl)``, the stage whose kernels read the lse's
  gradient (delta - dlse in the row statistics);
* ``sinks``: GPT-OSS's attention sinks, ``o * sigmoid(lse - sink[h])`` with a learnable
  ``sink`` (``spattn.integrations.transformers.with_sinks``), then ``sum(. * do)``.

With ``--torch-n N`` the ``out+lse`` loss on the torch backend (what such a loss ran on
before the flag) is timed once at that length, for scale. Every Triton gradient is first
checked against the torch backend's at N = 2048 (relative error < 2e-2).

    python benchmarks/lse_grad.py --n 4096,16384 --rounds 3 --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("SPATTN_AUTOTUNE", "0")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spattn  # noqa: E402
from bench import bench_ms, log, time_rounds  # noqa: E402
from spattn.integrations.transformers import with_sinks  # noqa: E402

PATTERNS = {"causal": "causal", "window(1024)": "causal & window(1024)",
            "documents(20)": "causal & same(doc)"}
H, D = 16, 128


def _inputs(name, N, dev):
    if "documents" not in name:
        return {}
    g = torch.Generator(device="cpu").manual_seed(N)
    cuts = torch.sort(torch.randperm(N - 1, generator=g)[:19] + 1).values
    ids = torch.zeros(N, dtype=torch.int64)
    ids[cuts] = 1
    return {"doc": torch.cumsum(ids, 0).to(dev)}


def _losses(pat, inputs, q, k, v, do, dl, sink):
    def out():
        return (pat(q, k, v, **inputs).float() * do).sum()

    def out_lse():
        o, lse = pat(q, k, v, return_lse=True, **inputs)
        return (o.float() * do).sum() + (torch.nan_to_num(lse, neginf=0.0) * dl).sum()

    def sinks():
        o, lse = pat(q, k, v, return_lse=True, **inputs)
        return (with_sinks(o, lse, sink).float() * do).sum()
    return {"out": out, "out+lse": out_lse, "sinks": sinks}


def _tensors(N, dev, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    q, k, v = (torch.randn(1, H, N, D, device=dev, dtype=torch.bfloat16, generator=g)
               .requires_grad_() for _ in range(3))
    do = torch.randn(1, H, N, D, device=dev, generator=g)
    dl = torch.randn(1, H, N, device=dev, generator=g)
    sink = torch.randn(H, device=dev, generator=g).requires_grad_()
    return q, k, v, do, dl, sink


def check(dev):
    """Triton against the torch backend at N = 2048, every loss and every gradient."""
    for name, src in PATTERNS.items():
        ins = _inputs(name, 2048, dev)
        q, k, v, do, dl, sink = _tensors(2048, dev, seed=1)
        leaves = (q, k, v, sink)
        for loss_name in ("out+lse", "sinks"):
            got = torch.autograd.grad(_losses(spattn.compile(src), ins, q, k, v, do, dl,
                                              sink)[loss_name](), leaves, allow_unused=True)
            want = torch.autograd.grad(_losses(spattn.compile(src, backend="torch"), ins, q,
                                               k, v, do, dl, sink)[loss_name](), leaves,
                                       allow_unused=True)
            for n, a, b in zip("qkv", got, want):
                err = float((a.float() - b.float()).norm() / b.float().norm())
                assert err < 2e-2, f"{name} {loss_name} d{n}: relative error {err:.2e}"
            log(f"check {name} {loss_name}: ok")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="4096,16384")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--torch-n", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = "cuda"
    check(dev)
    rows = []
    for N in map(int, a.n.split(",")):
        for name, src in PATTERNS.items():
            pat, ins = spattn.compile(src), _inputs(name, N, dev)
            q, k, v, do, dl, sink = _tensors(N, dev)
            timed = {}
            for loss_name, fn in _losses(pat, ins, q, k, v, do, dl, sink).items():
                grads = [q, k, v, sink] if loss_name == "sinks" else [q, k, v]
                timed[loss_name] = ((lambda f=fn, g=grads: torch.autograd.grad(f(), g)),
                                    None)
            row = {"N": N, "pattern": name}
            time_rounds(row, timed, a.rounds, bench=lambda f, grad_to_none=None: bench_ms(f),
                        groups=(tuple(timed),))
            if a.torch_n == N:
                tp = spattn.compile(src, backend="torch")
                fn = _losses(tp, ins, q, k, v, do, dl, sink)["out+lse"]
                row["torch out+lse_ms"] = bench_ms(lambda: torch.autograd.grad(fn(), [q, k, v]),
                                                   rep=20)
            rows.append(row)
            log(row)
    print("| N | pattern | out ms | out+lse ms | x | sinks ms | x | torch out+lse ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = r["out_ms"]
        print(f"| {r['N']} | {r['pattern']} | {base:.3f} | {r['out+lse_ms']:.3f} | "
              f"{r['out+lse_ms'] / base:.3f} | {r['sinks_ms']:.3f} | {r['sinks_ms'] / base:.3f} "
              f"| {r.get('torch out+lse_ms', float('nan')):.1f} |")
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "lse_grad.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
