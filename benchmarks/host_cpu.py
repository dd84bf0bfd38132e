"""Host time of a short Triton-backend call, measured on the CPU with the launches stubbed.

Everything a call does on the host runs for real (argument checks, the plan lookup,
autograd, output and buffer allocation, launch arguments, TMA descriptors with ``--tma``)
on CPU tensors under ``TRITON_INTERPRET=1``; only the kernel launch itself is replaced by a
no-op (the interpreted kernel's ``kernel[grid](...)``), so no kernel runs and the outputs
are garbage. The times are of the host path alone: on a GPU a call costs these plus the
launch (the bound launch's few microseconds) and whatever the device does.

Per pattern (causal, window(256), documents) at B = 1, H = 16, N = 1024, D = 128, fp16
(fp16: bf16 calls are upcast to fp32 under the interpreter, a copy a GPU call does not
make), the microseconds per call (the fastest of 15 rounds) of

* ``fwd``: ``pat(q, k, v)`` under ``torch.no_grad`` (the plan from the plan cache),
* ``fwd plan``: ``pat(q, k, v, plan=plan)``,
* ``f+b``: ``pat(q, k, v)`` with q, k, v requiring grad, then
  ``torch.autograd.grad(o, (q, k, v), do)``,
* ``f+b plan``: the same with ``plan=``,

then a cProfile of each, as per-call microseconds spent in each layer (cumulative time of
the functions that make it; cProfile's own overhead inflates them, so compare them with
each other, not with the plain timings).

    python benchmarks/host_cpu.py [--calls 2000] [--tma] [--out DIR]
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import cProfile  # noqa: E402
import json  # noqa: E402
import pstats  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import spattn  # noqa: E402

#: Layers of a call: name -> the functions (file suffix, function name) whose cumulative
#: time is that layer's.
LAYERS = {
    "Pattern.__call__ (all)": [("spattn/pattern.py", "__call__")],
    "decode fast-step probe": [("runtime/decode.py", "fast_step")],
    "argument checks": [("runtime/api.py", "_checked"), ("runtime/api.py", "_check_plan")],
    "last-call signature": [("runtime/api.py", "_signature")],
    "plan lookup (key + get)": [("runtime/plan.py", "get"), ("runtime/plan.py", "lookup")],
    "  of which the key": [("runtime/plan.py", "key")],
    "autograd.Function apply": [("function.py", "apply")],
    "forward launch (run_fwd)": [("runtime/triton_backend.py", "run_fwd")],
    "  outputs, descriptors": [("runtime/triton_backend.py", "_fwd_tensors")],
    "backward (engine, all)": [("autograd/__init__.py", "grad")],
    "backward launch (run_bwd)": [("runtime/triton_backend.py", "run_bwd")],
    "  grads, buffers, descriptors": [("runtime/triton_backend.py", "_bwd_tensors")],
}

SOURCES = {"causal": ("causal", {}), "window(256)": ("window(256)", {}),
           "documents": ("causal & same(doc)", {})}


def doc_ids(N, ndocs=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(N - 1, generator=g)[: ndocs - 1] + 1).values
    return torch.bucketize(torch.arange(N), cuts, right=True)


@contextlib.contextmanager
def stub_launches():
    """Within it, the interpreted kernels' launch is a no-op (returns None, as a launch
    under the interpreter does)."""
    from triton.runtime.interpreter import InterpretedFunction

    def getitem(self, grid):
        return _noop
    real = InterpretedFunction.__getitem__
    InterpretedFunction.__getitem__ = getitem
    try:
        yield
    finally:
        InterpretedFunction.__getitem__ = real


def _noop(*args, **kwargs):
    return None


def per_call_us(fn, calls, rounds=15):
    """The fastest of ``rounds`` rounds of ``calls // rounds`` calls (the machine's other
    load only ever adds time)."""
    fn()
    n = max(1, calls // rounds)
    out = []
    for _ in range(rounds):
        t = time.perf_counter_ns()
        for _ in range(n):
            fn()
        out.append((time.perf_counter_ns() - t) / n / 1e3)
    return min(out)


def layer_us(fn, calls) -> dict:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    stats = pstats.Stats(pr).stats
    res = {}
    for layer, funcs in LAYERS.items():
        tot = 0.0
        for (file, _line, name), (_cc, _nc, _tt, ct, callers) in stats.items():
            if name in [f for s, f in funcs if file.endswith(s)]:
                # a recursive or nested entry counts once: only calls from outside the layer
                if not any(c[2] in [f for _s, f in funcs] for c in callers):
                    tot += ct
        res[layer] = tot / calls * 1e6
    return res


def layer_steps(name, N=1024, B=1, H=16, D=128, dtype=torch.float16) -> dict:
    """Each layer of a call on its own, as a call of the same arguments runs it (a layer
    the code at hand does not have is left out): name -> a function of no arguments."""
    from spattn.runtime import api, settings, triton_backend as tb
    from spattn.runtime.plan import PLANS
    src, params = SOURCES[name]
    pat = spattn.compile(src, backend="triton", **params)
    ins = {"doc": doc_ids(N)} if "doc" in src else {}
    q, k, v = (torch.randn(B, H, N, D).to(dtype) for _ in range(3))
    with torch.no_grad():
        pat(q, k, v, **ins)
    plan = pat.plan(q, k, v, backward=True, **ins)
    stage = plan.forward_stage
    o = torch.empty_like(q)
    bstage = plan.backward_stage(q, k, v, o, o)
    lse = torch.empty(q.shape[:3])
    scale = D ** -0.5
    steps = {
        "settings (environment read)": settings.current,
        "argument checks (_checked)": lambda: api._checked(pat, q, k, v, None, None, ins,
                                                           None, None),
        "plan cache key": lambda: PLANS.key(pat, "triton", q, k, v, scale, 0, ins,
                                            settings.current()),
        "plan cache lookup (key + get)": lambda: PLANS.get(pat, "triton", q, k, v,
                                                           scale=scale, q_offset=0,
                                                           inputs=ins),
        "plan= check (_check_plan)": lambda: api._check_plan(plan, pat, q, k, v, None, None,
                                                             {}),
        "fwd outputs (+ descriptors)": lambda: tb._fwd_tensors(stage, q, k, v),
        "fwd launch path (run_fwd)": lambda: tb.run_fwd(stage, q, k, v),
        "bwd buffers (+ descriptors)": lambda: tb._bwd_tensors(bstage, q, k, v, o, lse, o),
        "bwd launch path (run_bwd)": lambda: tb.run_bwd(bstage, q, k, v, o, lse, o),
    }
    if hasattr(api, "_signature"):
        steps["last-call signature (_signature)"] = lambda: api._signature(
            pat, q, k, v, None, None, ins, None, None)
    return steps


def cases(name, N=1024, B=1, H=16, D=128, dtype=torch.float16):
    src, params = SOURCES[name]
    pat = spattn.compile(src, backend="triton", **params)
    ins = {"doc": doc_ids(N)} if "doc" in src else {}
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    do = torch.randn(B, H, N, D, generator=g).to(dtype)
    plan = pat.plan(q, k, v, **ins)
    plan_g = pat.plan(qg, kg, vg, **ins)

    def fwd():
        with torch.no_grad():
            pat(q, k, v, **ins)

    def fwd_plan():
        with torch.no_grad():
            pat(q, k, v, plan=plan)

    def fb():       # autograd.grad: no accumulation into .grad (a CPU add a GPU does not pay)
        torch.autograd.grad(pat(qg, kg, vg, **ins), (qg, kg, vg), do)

    def fb_plan():
        torch.autograd.grad(pat(qg, kg, vg, plan=plan_g), (qg, kg, vg), do)
    return {"fwd": fwd, "fwd plan": fwd_plan, "f+b": fb, "f+b plan": fb_plan}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--tma", action="store_true", help="SPATTN_TMA=1 (descriptors per call)")
    ap.add_argument("--patterns", nargs="*", default=list(SOURCES))
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    tma_before = os.environ.get("SPATTN_TMA")
    if a.tma:
        os.environ["SPATTN_TMA"] = "1"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with stub_launches():
            results = measure(a)
    finally:
        torch.set_num_threads(threads)
        if a.tma and tma_before is None:
            os.environ.pop("SPATTN_TMA", None)
        elif a.tma:
            os.environ["SPATTN_TMA"] = tma_before
    report(results, a.out)
    return results


def measure(a) -> dict:
    results = {}
    for name in a.patterns:
        fns = cases(name, N=a.n)
        r = results[name] = {"us": {}, "layers": {}, "steps": {}}
        for key, fn in fns.items():
            r["us"][key] = per_call_us(fn, a.calls)
            r["layers"][key] = layer_us(fn, max(200, a.calls // 4))
        for key, fn in layer_steps(name, N=a.n).items():
            r["steps"][key] = per_call_us(fn, a.calls)
    return results


def report(results: dict, out) -> None:
    keys = list(next(iter(results.values()))["us"])
    print("host only, CPU, kernel launches stubbed: us per call (fastest of 15 rounds)")
    print("| pattern | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r['us'][k]:.1f}" for k in keys) + " |")
    steps = sorted({s for r in results.values() for s in r["steps"]})
    print("\neach layer alone: us per call (fastest of 15 rounds)")
    print("| layer | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for step in steps:
        print(f"| {step} | " + " | ".join(
            f"{r['steps'][step]:.1f}" if step in r["steps"] else "-"
            for r in results.values()) + " |")
    for name, r in results.items():
        print(f"\n{name}: per-call us by layer (cProfile, inflated)")
        print("| layer | " + " | ".join(keys) + " |")
        print("|---|" + "---|" * len(keys))
        for layer in LAYERS:
            print(f"| {layer} | " + " | ".join(f"{r['layers'][k][layer]:.1f}" for k in keys)
                  + " |")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "host_cpu.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
