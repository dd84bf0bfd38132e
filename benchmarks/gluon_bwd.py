"""FlashAttention-3's dK/dV structure written in Gluon on Hopper: how far a warp-specialised
backward takes the key-side gradients past the generated Triton kernel (GPU).

spattn's backward is two Triton kernels: a dQ kernel (over key tiles of each query tile,
three tile products) and a dK/dV kernel (over query tiles of each key tile, four). Both
run at FlexAttention's rate (benchmarks/NOTES.md, rows 44-52), and the bars of #22 and #23
that remain are bound by them. This benchmark's kernel is the dK/dV half in Gluon:

* a loader partition (one warp group, 24 registers a thread) brings the program's 128 keys
  of K and V once, then each query tile's Q and dO (64 rows each) into a ring of
  ``STAGES`` shared-memory slots through TMA, each slot guarded by ready barriers (Q, dO)
  and an empty barrier the two consumers release;
* two consumer warp groups of 64 keys each (``setmaxnreg`` ``CONSUMER_REGS``), each
  holding its dK and dV accumulators ``[64, D]`` in registers. Per query tile, S^T = K Q^T
  and dP^T = V dO^T are issued asynchronously; P^T = exp2(S^T log2e scale - lse) is computed
  while dP^T is in flight, dV += P^T dO is issued from registers, dS^T = P^T (dP^T - delta)
  while dV's product runs, then dK += dS^T Q; the slot goes back once the next tile's S^T
  is in flight (its products done).

``CAUSAL``: the query tiles from the key tile's diagonal on, the two diagonal tiles masked
by position; else every query tile. The lse (log2 units) and delta = rowsum(dO o O) come
from torch, as the dQ kernel writes them in spattn. Lengths multiples of 128, H = Hk, B =
1. The kernel's dK and dV are checked against cuDNN's backward first; then the kernel is
timed against spattn's whole backward, split by ``torch.profiler`` into its two kernels,
FlexAttention's backward and cuDNN's, in alternating rounds.

    python benchmarks/gluon_bwd.py [--n 4096,16384] [--rounds 3] [--out DIR]
    python benchmarks/gluon_bwd.py --compile-only   # no GPU: compile for sm_90a here
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

os.environ.setdefault("SPATTN_AUTOTUNE", "0")

import torch  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_init, warpgroup_mma_wait)

LOG2E = 1.4426950408889634
BLOCK_N = 128       # keys a program (two warp groups of 64)
BLOCK_M = 64        # query rows a slot


@gluon.jit
def _bwd_load(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, q_smem, k_smem, v_smem,
              do_smem, bars, lse_desc, delta_desc, l_smem, d_smem, N, BH, sm_scale_log2,
              sm_scale):
    """The loader partition: the program's K and V (two halves each), then its query tiles'
    Q and dO into the ring, a slot refilled once both consumers released it."""
    kv_bar, q_ready, do_ready, empty, flags = bars
    CAUSAL: gl.constexpr = flags.type.shape[0] == 2
    STAGES: gl.constexpr = q_smem.type.shape[0]
    i_w = gl.program_id(0)
    i_n = i_w // BH
    i_bh = i_w % BH
    o_k = i_bh * N + i_n * 128
    mbarrier.expect(kv_bar, 4 * k_desc.block_type.nbytes)
    for i_h in gl.static_range(2):
        tma.async_copy_global_to_shared(k_desc, [o_k + i_h * 64, 0], kv_bar, k_smem.index(i_h))
        tma.async_copy_global_to_shared(v_desc, [o_k + i_h * 64, 0], kv_bar, v_smem.index(i_h))
    m0 = 0
    if CAUSAL:
        m0 = i_n * 2
    n_m = N // 64 - m0
    for j in range(n_m):
        i_s = j % STAGES
        phase = (j // STAGES) & 1
        o_q = i_bh * N + (m0 + j) * 64
        mbarrier.wait(empty.index(i_s), phase ^ 1)
        mbarrier.expect(q_ready.index(i_s), q_desc.block_type.nbytes
                        + lse_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [o_q, 0], q_ready.index(i_s), q_smem.index(i_s))
        tma.async_copy_global_to_shared(lse_desc, [o_q], q_ready.index(i_s), l_smem.index(i_s))
        mbarrier.expect(do_ready.index(i_s), do_desc.block_type.nbytes
                        + delta_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(do_desc, [o_q, 0], do_ready.index(i_s),
                                        do_smem.index(i_s))
        tma.async_copy_global_to_shared(delta_desc, [o_q], do_ready.index(i_s),
                                        d_smem.index(i_s))


@gluon.jit
def _bwd_consume(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, q_smem, k_smem, v_smem,
                 do_smem, bars, lse_desc, delta_desc, l_smem, d_smem, N, BH, sm_scale_log2,
                 sm_scale, HALF: gl.constexpr):
    """A consumer warp group: keys ``[64 * HALF, +64)`` of the program's key tile against
    its query tiles; dK and dV stored through its own K and V halves. (The flags come from
    a buffer's shape: Triton 3.6 passes a partition's arguments as values.)"""
    kv_bar, q_ready, do_ready, empty, flags = bars
    CAUSAL: gl.constexpr = flags.type.shape[0] == 2
    SCHED: gl.constexpr = flags.type.shape[1] // 2
    STAGES: gl.constexpr = q_smem.type.shape[0]
    D: gl.constexpr = q_smem.type.shape[2]
    gl.static_assert(q_smem.type.shape[1] == 64)
    gl.static_assert(k_smem.type.shape[1] == 64)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    a_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=a_layout,
                                                  k_width=2)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    i_w = gl.program_id(0)
    i_n = i_w // BH
    i_bh = i_w % BH
    m0 = 0
    if CAUSAL:
        m0 = i_n * 2
    n_m = N // 64 - m0
    k_s = k_smem.index(HALF)
    v_s = v_smem.index(HALF)
    b_zero = gl.zeros([64, 64], gl.float32, s_layout)
    b_dk = warpgroup_mma_init(gl.zeros([64, D], gl.float32, a_layout))
    b_dv = warpgroup_mma_init(gl.zeros([64, D], gl.float32, a_layout))
    o_kk = i_n * 128 + HALF * 64 + gl.arange(0, 64, layout=row_s)
    mbarrier.wait(kv_bar, 0)
    for j in range(n_m):
        i_s = j % STAGES
        phase = (j // STAGES) & 1
        o_m = (m0 + j) * 64 + gl.arange(0, 64, layout=col_s)
        q_s = q_smem.index(i_s)
        do_s = do_smem.index(i_s)
        # products: S^T = K Q^T, dP^T = V dO^T, both in flight
        mbarrier.wait(q_ready.index(i_s), phase)
        b_st = warpgroup_mma(k_s, q_s.permute((1, 0)), b_zero, use_acc=False, is_async=True)
        mbarrier.wait(do_ready.index(i_s), phase)
        b_dpt = warpgroup_mma(v_s, do_s.permute((1, 0)), b_zero, use_acc=False,
                              is_async=True)
        b_st = warpgroup_mma_wait(1, deps=(b_st,))
        if SCHED > 0:
            # (the last tile's dV and dK products completed with S: its slot goes back)
            if j > 0:
                mbarrier.arrive(empty.index((j - 1) % STAGES))
        # P^T, pairs above a causal diagonal at 0
        b_lse = l_smem.index(i_s).load(col_s)
        b_pt = gl.exp2(b_st * sm_scale_log2 - gl.expand_dims(b_lse, 0))
        if CAUSAL:
            if j < 2:
                m_ok = gl.expand_dims(o_m, 0) >= gl.expand_dims(o_kk, 1)
                b_pt = gl.where(m_ok, b_pt, 0.0)
        b_ptd = gl.convert_layout(b_pt.to(q_desc.dtype), op_layout)
        b_dv = warpgroup_mma(b_ptd, do_s, b_dv, is_async=True)
        if SCHED == 1:
            b_dpt = warpgroup_mma_wait(1, deps=(b_dpt,))
        else:
            b_dpt, b_dv = warpgroup_mma_wait(0, deps=(b_dpt, b_dv))
            b_dv = warpgroup_mma_init(b_dv)
        b_delta = d_smem.index(i_s).load(col_s)
        b_dst = b_pt * (b_dpt - gl.expand_dims(b_delta, 0))
        b_dstd = gl.convert_layout(b_dst.to(q_desc.dtype), op_layout)
        b_dk = warpgroup_mma(b_dstd, q_s, b_dk, is_async=True)
        if SCHED == 0:
            b_dk = warpgroup_mma_init(warpgroup_mma_wait(0, deps=(b_dk,)))
            mbarrier.arrive(empty.index(i_s))
    b_dk, b_dv = warpgroup_mma_wait(0, deps=(b_dk, b_dv))
    if SCHED > 0:
        mbarrier.arrive(empty.index((n_m - 1) % STAGES))
    # store dK (scaled) and dV through this group's K and V halves
    k_s.store((b_dk * sm_scale).to(dk_desc.dtype))
    v_s.store(b_dv.to(dv_desc.dtype))
    fence_async_shared()
    o_k = i_bh * N + i_n * 128 + HALF * 64
    tma.async_copy_shared_to_global(dk_desc, [o_k, 0], k_s)
    tma.async_copy_shared_to_global(dv_desc, [o_k, 0], v_s)
    tma.store_wait(pendings=0)


@gluon.jit
def _bwd_consume0(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, q_smem, k_smem, v_smem,
                  do_smem, bars, lse_desc, delta_desc, l_smem, d_smem, N, BH, sm_scale_log2,
                  sm_scale):
    _bwd_consume(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, q_smem, k_smem, v_smem,
                 do_smem, bars, lse_desc, delta_desc, l_smem, d_smem, N, BH, sm_scale_log2,
                 sm_scale, 0)


@gluon.jit
def _bwd_consume1(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, q_smem, k_smem, v_smem,
                  do_smem, bars, lse_desc, delta_desc, l_smem, d_smem, N, BH, sm_scale_log2,
                  sm_scale):
    _bwd_consume(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, q_smem, k_smem, v_smem,
                 do_smem, bars, lse_desc, delta_desc, l_smem, d_smem, N, BH, sm_scale_log2,
                 sm_scale, 1)


@gluon.jit
def attn_bwd_dkdv_ws(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, lse_desc, delta_desc,
                     N, BH, sm_scale_log2, sm_scale, CAUSAL: gl.constexpr,
                     STAGES: gl.constexpr, SCHED: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                     num_warps: gl.constexpr):
    """dK and dV of one key tile (128 keys) of one head, program ``i_n * BH + i_bh`` (the
    key tiles with the most query tiles first under ``CAUSAL``). Q, K, V, dO, dK, dV
    through ``[BH * N, D]`` descriptors of 64-row blocks; the lse (log2 units) and delta
    through ``[BH * N]`` fp32 descriptors of 64. ``SCHED``: 0, each tile's four products
    waited within its step; 1, dV in flight across dS and dK across the next tile's S^T;
    2, dK alone in flight across the next S^T."""
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape,
                                       q_desc.layout)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [STAGES] + do_desc.block_type.shape,
                                        do_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [2] + k_desc.block_type.shape,
                                       k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [2] + v_desc.block_type.shape,
                                       v_desc.layout)
    l_smem = gl.allocate_shared_memory(gl.float32, [STAGES] + lse_desc.block_type.shape,
                                       lse_desc.layout)
    d_smem = gl.allocate_shared_memory(gl.float32, [STAGES] + delta_desc.block_type.shape,
                                       delta_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(do_ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    flags = gl.allocate_shared_memory(gl.int64, [1 + CAUSAL, 1 << SCHED],
                                      mbarrier.MBarrierLayout())
    bars = (kv_bar, q_ready, do_ready, empty, flags)
    args = (q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, q_smem, k_smem, v_smem,
            do_smem, bars, lse_desc, delta_desc, l_smem, d_smem, N, BH, sm_scale_log2,
            sm_scale)
    gl.warp_specialize([(_bwd_load, args), (_bwd_consume0, args), (_bwd_consume1, args)],
                       [4, 4], [CONSUMER_REGS, CONSUMER_REGS])


# ------------------------------------------------------------------ host side

def _descs(tensors, D):
    """Gluon TMA descriptors of 64-row blocks over ``[rows, D]`` views."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    gdt = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[tensors[0].dtype]
    lay = gl.NVMMASharedLayout.get_default_for([64, D], gdt)
    out = []
    for t in tensors:
        t2 = t.reshape(-1, D)
        out.append(TensorDescriptor(t2, list(t2.shape), list(t2.stride()), [64, D], lay))
    return out


def dkdv_args(q, k, v, do, lse2, delta, dk, dv, causal, stages=2, sched=0, regs=240):
    """The kernel's arguments and keywords for contiguous ``[1, H, N, D]`` tensors."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    _, H, N, D = q.shape
    scale = D ** -0.5
    descs = _descs((q, k, v, do, dk, dv), D)
    lay = gl.NVMMASharedLayout.get_default_for([64], gl.float32)
    rows = [TensorDescriptor(t.reshape(-1), [t.numel()], [1], [64], lay) for t in (lse2, delta)]
    args = (*descs, *rows, N, H, scale * LOG2E, scale)
    kw = dict(CAUSAL=causal, STAGES=stages, SCHED=sched, CONSUMER_REGS=regs, num_warps=4,
              maxnreg=168)
    return args, kw, ((N // BLOCK_N) * H,)


def compile_only() -> None:
    """Compile the kernel for sm_90a here (no GPU) and print its PTX facts and spills."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gluon_fwd import compile_sm90
    for causal in (False, True):
        for stages in (2, 3):
            q, k, v, do, dk, dv = (torch.empty(1, 2, 1024, 128, dtype=torch.bfloat16)
                                   for _ in range(6))
            lse2, delta = torch.empty(2, 1024), torch.empty(2, 1024)
            args, kw, _ = dkdv_args(q, k, v, do, lse2, delta, dk, dv, causal, stages)
            label = f"causal={causal} stages={stages}"
            try:
                c = compile_sm90(attn_bwd_dkdv_ws, args, kw)
            except Exception as e:  # noqa: BLE001 - reported
                print(f"{label} FAILED {type(e).__name__}: {' '.join(str(e).split())[-600:]}")
                continue
            ptx = c.asm["ptx"]
            print(label, "OK", dict(
                setmaxnreg=sorted(set(re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx))),
                waits=sorted(set(re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx))),
                spills=getattr(c, "n_spills", None), regs=getattr(c, "n_regs", None),
                smem=c.metadata.shared))


# ------------------------------------------------------------------ GPU measurement

def _problem(N, H, D, causal, device="cuda"):
    """Random bf16 q, k, v, dO ``[1, H, N, D]``, cuDNN's O and lse, and the reference
    gradients (cuDNN's backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = torch.Generator(device=device).manual_seed(N + H + D)
    q, k, v, do = (torch.randn(1, H, N, D, device=device, dtype=torch.bfloat16, generator=g)
                   for _ in range(4))
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)
    o, lse = out[0], out[1]
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        torch.nn.functional.scaled_dot_product_attention(qr, kr, vr, is_causal=causal).backward(do)
    return q, k, v, do, o, lse, kr.grad, vr.grad


def _kernel_times(fn, iters: int = 10) -> dict:
    """Mean device microseconds per call of each CUDA kernel ``fn`` launches."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0):
            t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            if t:
                out[e.key] = t / iters
    return out


VARIANTS = [(2, 0), (3, 0), (2, 1), (2, 2)]        # (stages, sched)


def _err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def run(ns, rounds: int, out_dir: str | None, variants=VARIANTS) -> list:
    import triton
    import spattn
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    H, D = 16, 128
    torch._functorch.config.donated_buffer = False      # (Flex's backward run repeatedly)
    flex = torch.compile(flex_attention)
    rows = []
    for N in ns:
        for causal in (True, False):
            q, k, v, do, o, lse, dk_ref, dv_ref = _problem(N, H, D, causal)
            lse2 = (lse.float() * LOG2E).reshape(H, N).contiguous()
            delta = (do.float() * o.float()).sum(-1).reshape(H, N).contiguous()
            fns, err = {}, {}
            for stages, sched in variants:
                name = f"gluon st{stages} s{sched}"
                dk, dv = torch.empty_like(k), torch.empty_like(v)
                args, kw, grid = dkdv_args(q, k, v, do, lse2, delta, dk, dv, causal, stages,
                                           sched)
                try:
                    attn_bwd_dkdv_ws[grid](*args, **kw)
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001 - reported
                    print(name, "FAILED", type(e).__name__, str(e)[-300:], flush=True)
                    continue
                err[name] = (_err(dk, dk_ref), _err(dv, dv_ref))
                fns[name] = (lambda a=args, k_=kw, g=grid: attn_bwd_dkdv_ws[g](*a, **k_))
            # spattn's backward (its two kernels timed by the profiler) and Flex's, cuDNN's
            pat = spattn.compile("causal" if causal else "full")
            qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
            o_s = pat(qs, ks, vs)
            sp_bwd = lambda o_s=o_s, t=(qs, ks, vs): torch.autograd.grad(o_s, t, do, retain_graph=True)  # noqa: E731
            g_s = sp_bwd()
            err["spattn"] = (_err(g_s[1], dk_ref), _err(g_s[2], dv_ref))
            mask_mod = (lambda b, h, qi, ki: qi >= ki) if causal else (lambda b, h, qi, ki: qi >= 0)
            bm = create_block_mask(mask_mod, 1, 1, N, N, device="cuda")
            qf, kf, vf = (t.detach().clone().requires_grad_() for t in (q, k, v))
            o_f = flex(qf, kf, vf, block_mask=bm)
            fns["spattn bwd"] = sp_bwd
            fns["flex bwd"] = lambda o_f=o_f, t=(qf, kf, vf): torch.autograd.grad(o_f, t, do, retain_graph=True)  # noqa: E731
            qc, kc, vc = (t.detach().clone().requires_grad_() for t in (q, k, v))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                o_c = torch.nn.functional.scaled_dot_product_attention(qc, kc, vc, is_causal=causal)
            fns["cudnn bwd"] = lambda o_c=o_c, t=(qc, kc, vc): torch.autograd.grad(o_c, t, do, retain_graph=True)  # noqa: E731
            times = {n: [] for n in fns}
            for r in range(rounds):
                for n in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                    times[n].append(triton.testing.do_bench(fns[n], warmup=25, rep=100))
            med = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
            split = _kernel_times(sp_bwd)
            row = dict(N=N, causal=causal, err=err, ms=med, rounds=times,
                       spattn_kernels_us={n: t for n, t in split.items() if t > 1.0})
            rows.append(row)
            print(json.dumps(row), flush=True)
            del q, k, v, do, o, lse, dk_ref, dv_ref, o_s, o_f, o_c, fns
            torch.cuda.empty_cache()
    if out_dir:
        with open(os.path.join(out_dir, "gluon_bwd.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return rows


def table(rows) -> str:
    """The rows as a short table: ms of each form, the spattn backward's two kernels (from
    the profiler), and the best Gluon form against spattn's dK/dV kernel."""
    out = ["| N | mask | form | max err dK / dV | ms | x spattn dK/dV kernel |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        ks = r["spattn_kernels_us"]
        dkdv = sum(t for n, t in ks.items() if "dkdv" in n.lower()) / 1000
        dq = sum(t for n, t in ks.items() if "bwd_dq" in n.lower()) / 1000
        mask = "causal" if r["causal"] else "full"
        for n, ms in r["ms"].items():
            e = r["err"].get(n.replace(" bwd", "").replace("spattn", "spattn"), None)
            es = f"{e[0]:.1e} / {e[1]:.1e}" if e else ""
            x = f"{dkdv / ms:.2f}" if n.startswith("gluon") else ""
            out.append(f"| {r['N']} | {mask} | {n} | {es} | {ms:.3f} | {x} |")
        out.append(f"| {r['N']} | {mask} | spattn dK/dV kernel / dQ kernel (profiler) | "
                   f"{r['err']['spattn'][0]:.1e} / {r['err']['spattn'][1]:.1e} | "
                   f"{dkdv:.3f} / {dq:.3f} | |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--n", default="4096,16384")
    ap.add_argument("--variants", default=None, help="stages:sched,... (default: all)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.compile_only:
        compile_only()
        return
    t0 = time.time()
    variants = VARIANTS if not a.variants else [
        tuple(int(x) for x in v.split(":")) for v in a.variants.split(",")]
    rows = run([int(x) for x in a.n.split(",")], a.rounds, a.out, variants)
    print(f"({time.time() - t0:.0f} s)")
    print(table(rows))


if __name__ == "__main__":
    main()
