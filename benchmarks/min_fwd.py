"""A minimal dense attention forward beside spattn's (GPU): Triton's automatic warp
specialisation, and the generated kernel's features one at a time.

Not a spattn kernel: one query tile per program, an online softmax over key tiles in log2
units (the generated kernel's arithmetic), Q, K, V read through TMA descriptors, O and the
lse stored. Flags move it toward the generated forward one feature at a time:

* ``WS``: ``tl.range(..., warp_specialize=True)`` on the key loop. Triton 3.6's Hopper
  pass (``add_hopper_warpspec``) splits the loop into a producer warp group and two
  consumer warp groups of 64 rows each (FlashAttention-3's structure) only with
  ``num_warps=4``, O stored through pointers and one loop in the kernel: O stored through
  a descriptor fails the pass (the halves' stores do not match the descriptor's block), a
  second loop after a specialised one fails (a dominance assertion), and a branch in the
  loop leaves it unspecialised without a message.
* ``DESC4``: 4-D descriptors ``[1, 1, rows, D]`` over ``[B, H, L, D]`` with a reshape, as
  the generated kernels read them (else 2-D over ``[B * H * L, D]``).
* ``O_TMA``: O stored through a descriptor (else pointers).
* ``SPLIT3``: the key loop as the ranges strategy's three loops (PARTIAL, FULL, PARTIAL;
  here the PARTIAL ones empty) in a helper, the masked body with its predicate and the
  fully-masked-row guard.
* ``ORDERED``: the program's work item read from an order table.
* ``CAUSAL``: top-left causal in the one loop, the predicate on every tile.
* ``AHEAD``: the key loop with S of the next key tile computed before the current tile's
  softmax (FlashAttention-3's overlap written in the source; dense only). Compiled for
  sm_90a, Triton's pipeliner still waits for that product right after issuing it
  (``wgmma.wait_group 0``), so nothing overlaps: the Gluon forwards of ``gluon_fwd.py``
  write the overlap by hand.

Timed against spattn's ``full`` / ``causal`` plan and cuDNN in alternating rounds of
``triton.testing.do_bench`` medians; each output checked against cuDNN's first. Each
configuration compiles (``warmup``) before its first launch, with the time printed.

    python benchmarks/min_fwd.py [--rounds 3] [--cases 0,1,2] [--cfgs 0,1] [--out DIR]
    python benchmarks/min_fwd.py --compile-only     # no GPU: what Triton's pass does
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("SPATTN_AUTOTUNE", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402


@triton.jit
def _tiles(acc, l_i, m_i, b_q, o_m, K, V, i_b, i_h, i_bh, Lk, sm_scale_log2, start, end,
           MASKED: tl.constexpr, CAUSAL: tl.constexpr, DESC4: tl.constexpr,
           WS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Key tiles [start, end) of one query tile."""
    for i_n in tl.range(start, end, warp_specialize=WS):
        if DESC4:
            b_kt = tl.trans(K.load([i_b, i_h, i_n * BLOCK_N, 0]).reshape(BLOCK_N, BLOCK_D))
        else:
            b_kt = K.load([i_bh * Lk + i_n * BLOCK_N, 0]).T
        b_s = tl.dot(b_q, b_kt)
        if MASKED or CAUSAL:
            o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
            m_s = o_n[None, :] < Lk
            if CAUSAL:
                m_s = m_s & (o_m[:, None] >= o_n[None, :])
            b_s = tl.where(m_s, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1) * sm_scale_log2)
        if MASKED:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.math.exp2(m_i - m_use)
        b_p = tl.math.exp2(b_s * sm_scale_log2 - m_use[:, None])
        l_i = l_i * alpha + tl.sum(b_p, 1)
        acc = acc * alpha[:, None]
        if DESC4:
            b_v = V.load([i_b, i_h, i_n * BLOCK_N, 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            b_v = V.load([i_bh * Lk + i_n * BLOCK_N, 0])
        acc = tl.dot(b_p.to(b_v.dtype), b_v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _tiles_ahead(acc, l_i, m_i, b_q, K, V, i_bh, Lk, sm_scale_log2, n_end,
                 BLOCK_N: tl.constexpr):
    """Dense key tiles [0, n_end) with S of tile n + 1 computed before tile n's softmax."""
    b_s = tl.dot(b_q, K.load([i_bh * Lk, 0]).T)
    for i_n in range(0, n_end - 1):
        b_s_next = tl.dot(b_q, K.load([i_bh * Lk + (i_n + 1) * BLOCK_N, 0]).T)
        m_new = tl.maximum(m_i, tl.max(b_s, 1) * sm_scale_log2)
        alpha = tl.math.exp2(m_i - m_new)
        b_p = tl.math.exp2(b_s * sm_scale_log2 - m_new[:, None])
        l_i = l_i * alpha + tl.sum(b_p, 1)
        b_v = V.load([i_bh * Lk + i_n * BLOCK_N, 0])
        acc = tl.dot(b_p.to(b_v.dtype), b_v, acc * alpha[:, None])
        m_i = m_new
        b_s = b_s_next
    m_new = tl.maximum(m_i, tl.max(b_s, 1) * sm_scale_log2)
    alpha = tl.math.exp2(m_i - m_new)
    b_p = tl.math.exp2(b_s * sm_scale_log2 - m_new[:, None])
    l_i = l_i * alpha + tl.sum(b_p, 1)
    b_v = V.load([i_bh * Lk + (n_end - 1) * BLOCK_N, 0])
    acc = tl.dot(b_p.to(b_v.dtype), b_v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def min_fwd(Q, K, V, O, OP, LSE, ORDER, sm_scale_log2, H, Lq, Lk,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            CAUSAL: tl.constexpr, WS: tl.constexpr, DESC4: tl.constexpr,
            O_TMA: tl.constexpr, SPLIT3: tl.constexpr, ORDERED: tl.constexpr,
            AHEAD: tl.constexpr = False):
    """One query tile of one (batch, head); O through the descriptor O or the pointer OP."""
    n_m = tl.cdiv(Lq, BLOCK_M)
    if ORDERED:
        i_w = tl.load(ORDER + tl.program_id(0))
    else:
        i_w = tl.program_id(0)
    i_bh = i_w // n_m
    i_m = i_w % n_m
    i_b = i_bh // H
    i_h = i_bh % H
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if DESC4:
        b_q = Q.load([i_b, i_h, i_m * BLOCK_M, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        b_q = Q.load([i_bh * Lq + i_m * BLOCK_M, 0])
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if CAUSAL:
        n_end = tl.cdiv((i_m + 1) * BLOCK_M, BLOCK_N)
    else:
        n_end = tl.cdiv(Lk, BLOCK_N)
    if AHEAD:
        tl.static_assert(not (CAUSAL or DESC4 or WS or SPLIT3))
        acc, l_i, m_i = _tiles_ahead(acc, l_i, m_i, b_q, K, V, i_bh, Lk, sm_scale_log2, n_end,
                                     BLOCK_N=BLOCK_N)
    elif SPLIT3:
        acc, l_i, m_i = _tiles(acc, l_i, m_i, b_q, o_m, K, V, i_b, i_h, i_bh, Lk,
                               sm_scale_log2, 0, 0, MASKED=True, CAUSAL=CAUSAL,
                               DESC4=DESC4, WS=False, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
        acc, l_i, m_i = _tiles(acc, l_i, m_i, b_q, o_m, K, V, i_b, i_h, i_bh, Lk,
                               sm_scale_log2, 0, n_end, MASKED=False, CAUSAL=CAUSAL,
                               DESC4=DESC4, WS=False, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
        acc, l_i, m_i = _tiles(acc, l_i, m_i, b_q, o_m, K, V, i_b, i_h, i_bh, Lk,
                               sm_scale_log2, n_end, n_end, MASKED=True, CAUSAL=CAUSAL,
                               DESC4=DESC4, WS=False, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    else:
        acc, l_i, m_i = _tiles(acc, l_i, m_i, b_q, o_m, K, V, i_b, i_h, i_bh, Lk,
                               sm_scale_log2, 0, n_end, MASKED=False, CAUSAL=CAUSAL,
                               DESC4=DESC4, WS=WS, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    acc = acc / l_safe[:, None]
    m_m = o_m < Lq
    if O_TMA:
        if DESC4:
            O.store([i_b, i_h, i_m * BLOCK_M, 0],
                    acc.to(O.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
        else:
            O.store([i_bh * Lq + i_m * BLOCK_M, 0], acc.to(O.dtype))
    else:
        o_d = tl.arange(0, BLOCK_D)
        tl.store(OP + (i_bh.to(tl.int64) * Lq + o_m)[:, None] * BLOCK_D + o_d[None, :],
                 acc.to(OP.dtype.element_ty), mask=m_m[:, None])
    tl.store(LSE + i_bh.to(tl.int64) * Lq + o_m, lse, mask=m_m)


#: (label, BLOCK_M, BLOCK_N, num_warps, num_stages, flags)
CONFIGS = [
    ("minimal", 128, 128, 8, 3, {}),
    ("+4-D descriptors", 128, 128, 8, 3, dict(DESC4=True)),
    ("+O by TMA", 128, 128, 8, 3, dict(O_TMA=True)),
    ("+three loops", 128, 128, 8, 3, dict(SPLIT3=True)),
    ("+order table", 128, 128, 8, 3, dict(ORDERED=True)),
    ("all four", 128, 128, 8, 3, dict(DESC4=True, O_TMA=True, SPLIT3=True, ORDERED=True)),
    ("ws 128x128 w4 s2", 128, 128, 4, 2, dict(WS=True)),
    ("ws 128x64 w4 s3", 128, 64, 4, 3, dict(WS=True)),
]


#: Specialised loops in forms the generated kernels have (``--compile-only``): 4-D
#: descriptors (taken), O stored through a descriptor (refused by the pass).
WS_FORMS = [("ws 128x128 w4 s2, 4-D descriptors", 128, 128, 4, 2, dict(WS=True, DESC4=True)),
            ("ws 128x128 w4 s2, O by TMA", 128, 128, 4, 2, dict(WS=True, O_TMA=True)),
            ("S a tile ahead 128x128 w8 s2", 128, 128, 8, 2, dict(AHEAD=True))]


def compile_report(causal: bool = False) -> list:
    """Each configuration (and :data:`WS_FORMS`) compiled for sm_90a on this machine, no GPU
    needed: ``(label, error or None, warp-specialised?, shared memory bytes, the PTX's
    wgmma.wait_group arguments)``. Run in a process without ``TRITON_INTERPRET``."""
    import re
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile
    out = []
    for label, bm, bn, nw, ns, flags in CONFIGS + WS_FORMS:
        flags = dict(dict(WS=False, DESC4=False, O_TMA=False, SPLIT3=False, ORDERED=False),
                     **flags)
        block = "1,1," if flags["DESC4"] else ""
        sig = {n: f"tensordesc<bf16[{block}{bn if n in 'KV' else bm},128]>" for n in "QKVO"}
        sig.update(OP="*bf16", LSE="*fp32", ORDER="*i32", sm_scale_log2="fp32", H="i32",
                   Lq="i32", Lk="i32")
        consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=128, CAUSAL=causal, **flags)
        sig.update({n: "constexpr" for n in consts})
        src = ASTSource(fn=min_fwd, signature=sig,
                        constexprs={(min_fwd.arg_names.index(n),): v for n, v in consts.items()})
        try:
            c = triton_compile(src, target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=nw, num_stages=ns))
            waits = sorted(set(re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)",
                                          c.asm["ptx"])))
            out.append((label, None, "ttg.warp_specialize" in c.asm["ttgir"],
                        c.metadata.shared, waits))
        except Exception as e:  # noqa: BLE001 - reported
            out.append((label, f"{type(e).__name__}: {str(e)[:200]}", False, 0, []))
    return out


def launch(q, k, v, cfg, causal):
    """A closure running one configuration on q, k, v ``[B, H, L, D]`` (compiled first)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    _, bm, bn, nw, ns, flags = cfg
    flags = dict(dict(WS=False, DESC4=False, O_TMA=False, SPLIT3=False, ORDERED=False),
                 **flags)
    o = torch.empty_like(q)
    lse = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32)
    n = B * H * triton.cdiv(Lq, bm)
    order = torch.arange(n, device=q.device, dtype=torch.int32)
    if flags["DESC4"]:
        desc = [TensorDescriptor.from_tensor(t, [1, 1, r, D])
                for t, r in ((q, bm), (k, bn), (v, bn), (o, bm))]
    else:
        desc = [TensorDescriptor.from_tensor(t.view(-1, D), [r, D])
                for t, r in ((q, bm), (k, bn), (v, bn), (o, bm))]
    args = (*desc, o, lse, order, D ** -0.5 * 1.4426950408889634, H, Lq, Lk)
    kw = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=D, CAUSAL=causal, num_warps=nw,
              num_stages=ns, **flags)
    t0 = time.perf_counter()
    min_fwd.warmup(*args, grid=(n,), **kw)
    print(f"  compiled in {time.perf_counter() - t0:.1f} s", flush=True)

    def run():
        min_fwd[(n,)](*args, **kw)
        return o
    return run


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--cases", default="0,1,2", help="indices into the cases")
    ap.add_argument("--cfgs", default="0,1,2,3,4,5", help="indices into CONFIGS")
    ap.add_argument("--tag", default="", help="suffix of the json file")
    ap.add_argument("--compile-only", action="store_true",
                    help="compile every configuration for sm_90a here (no GPU) and print "
                         "whether Triton specialised its warps")
    a = ap.parse_args(argv)
    if a.compile_only:
        for label, err, ws, shared, waits in compile_report():
            print(f"{label:36s} " + (f"ERROR {err}" if err else
                                     f"OK warp-specialised {ws} shared {shared} "
                                     f"waits {','.join(waits)}"), flush=True)
        return
    import spattn
    dev, dt, D = "cuda", torch.bfloat16, 128
    cases = [("full 16K", 16, 16384, 16384, False), ("causal 16K", 16, 16384, 16384, True),
             ("full 24x65536x6400", 24, 65536, 6400, False)]
    cases = [cases[int(i)] for i in a.cases.split(",")]
    cfgs = [CONFIGS[int(i)] for i in a.cfgs.split(",") if i]
    rows = []
    for name, H, Lq, Lk, causal in cases:
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(1, H, Lq, D, device=dev, dtype=dt, generator=g)
        k, v = (torch.randn(1, H, Lk, D, device=dev, dtype=dt, generator=g) for _ in range(2))

        def cudnn(q=q, k=k, v=v, c=causal):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=c)
        ref = cudnn()
        pairs = H * (Lq * (Lq + 1) // 2 if causal else Lq * Lk)
        pat = spattn.compile("causal" if causal else "full")
        plan = pat.plan(q, k, v)
        fns = {"cudnn": cudnn,
               "spattn": lambda pat=pat, plan=plan, q=q, k=k, v=v: pat(q, k, v, plan=plan)}
        for cfg in cfgs:
            print(name, cfg[0], flush=True)
            try:
                run = launch(q, k, v, cfg, causal)
                err = (run().float() - ref.float()).abs().max().item()
            except Exception as e:  # noqa: BLE001 - a configuration that does not compile
                rows.append(dict(case=name, kernel=cfg[0], error=f"{type(e).__name__}: {str(e)[:200]}"))
                print("  ERROR", type(e).__name__, str(e)[:200], flush=True)
                continue
            if err > 3e-2:
                rows.append(dict(case=name, kernel=cfg[0], error=f"max abs err {err:.3g}"))
                print("  WRONG", err, flush=True)
                continue
            fns[cfg[0]] = run
        print(name, "spattn err", (fns["spattn"]().float() - ref.float()).abs().max().item(),
              flush=True)
        times = {n: [] for n in fns}
        for r in range(a.rounds):
            for n in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                times[n].append(triton.testing.do_bench(fns[n], warmup=50, rep=200))
        for n, ts in times.items():
            t = sorted(ts)[len(ts) // 2]
            rows.append(dict(case=name, kernel=n, ms=t, tflops=4 * D * pairs / t / 1e9,
                             rounds=ts))
            print(f"{name:20s} {n:18s} {t:8.3f} ms {4 * D * pairs / t / 1e9:7.1f} TF/s",
                  flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"min_fwd{a.tag}.json"), "w") as f:
            json.dump(dict(torch=torch.__version__, triton=triton.__version__,
                           device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
