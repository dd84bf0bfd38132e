"""Where a learned relative bias's cost goes (GPU): standalone window forwards with
``rel[h, clamp(q - k, 0, W - 1)]`` read four ways, beside spattn's own plans.

Not a spattn kernel: one query tile per program, the ranges strategy's three key loops
(PARTIAL, FULL, PARTIAL) of ``causal & window(W)``, the generated kernel's online softmax,
K and V by pointers or through 2-D TMA descriptors (``tma``). ``MODE``:

* 0: the mask alone;
* 1: the table read per pair a step ahead (spattn's ``score_load="ahead"``);
* 2: as 1, the index from a constant ``i - j`` tile plus the tile's offset, unclamped in
  FULL tiles;
* 3: materialised Toeplitz tiles: a prologue kernel writes one ``[BM, BN]`` fp32 tile per
  head and tile diagonal ``q0 - k0`` (``TT [H, J, BM, BN]``), which the forward loads a
  step ahead like a K tile (4: the same in bf16; 6: loaded in the step, not ahead);
* 5: a bias computed from the positions (no load): the add's own cost;
* 7: one entry per key column (a ``[1, BN]`` load per step).

Every variant but 5 and 7 is checked against a float64 reference at L = 2048 first; then
all, and spattn's mask and scored plans, are timed in five alternating rounds of
``triton.testing.do_bench`` medians at B = 1, H = 16, N = 16384, D = 128, bf16, W = 1024.
Writes ``$OUT/toeplitz.json``; the table goes to stdout.

    OUT=DIR python benchmarks/score_toeplitz.py
"""
import json
import math
import os
import sys

import torch
import triton
import triton.language as tl

OUT = os.environ.get("OUT", "/tmp")


@triton.jit
def _bias_tile(REL, TT, q0, i_n, m_first, o_q, o_i, o_j,
               MASKED: tl.constexpr, MODE: tl.constexpr, W: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr):
    if MODE == 1:
        o_k = (i_n * BN + o_j)[None, :]
        t = tl.minimum(tl.maximum(o_q - o_k, 0), W - 1)
        b = tl.load(REL + t, mask=m_first, other=0.0)
    elif MODE == 2:
        t = (q0 - i_n * BN) + (o_i[:, None] - o_j[None, :])
        if MASKED:
            t = tl.minimum(tl.maximum(t, 0), W - 1)
        b = tl.load(REL + t, mask=m_first, other=0.0)
    elif MODE == 5:
        b = ((o_i[:, None] - o_j[None, :]) + (q0 - i_n * BN)).to(tl.float32) * 0.001
    elif MODE == 7:
        b = tl.load(REL + ((q0 - i_n * BN) + o_j[None, :]) % W, mask=m_first, other=0.0)
    else:
        jd = (q0 - i_n * BN + (BM - BN)) // BN
        p = TT + jd * (BM * BN) + o_i[:, None] * BN + o_j[None, :]
        b = tl.load(p, mask=m_first, other=0.0).to(tl.float32)
    return b


@triton.jit
def _steps(acc, l_i, m_i, b_q, o_q, K, V, KD, VD, row0, REL, TT, q0, sm_scale, scale_log2, L, start, end,
           MASKED: tl.constexpr, MODE: tl.constexpr, TMA: tl.constexpr, W: tl.constexpr,
           BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    o_d = tl.arange(0, BD)
    o_i = tl.arange(0, BM)
    o_j = tl.arange(0, BN)
    if MODE != 0 and MODE != 6:
        b_b = _bias_tile(REL, TT, q0, start, start < end, o_q, o_i, o_j, MASKED, MODE, W, BM, BN)
    for idx in range(start, end):
        nx = tl.minimum(idx + 1, end - 1)
        if MODE == 6:
            b_b = _bias_tile(REL, TT, q0, idx, True, o_q, o_i, o_j, MASKED, 3, W, BM, BN)
        elif MODE != 0:
            nb = _bias_tile(REL, TT, q0, nx, True, o_q, o_i, o_j, MASKED, MODE, W, BM, BN)
        o_n = idx * BN + o_j
        if TMA:
            b_kt = KD.load([row0 + idx * BN, 0]).T
        else:
            b_kt = tl.load(K + o_n[None, :] * BD + o_d[:, None])
        b_s = tl.dot(b_q, b_kt)
        if MODE != 0:
            b_s = b_s * sm_scale + b_b
        if MASKED:
            o_k = o_n[None, :]
            m = (tl.cast(o_q - o_k, tl.uint32) <= W - 1) & (o_k < L)
            b_s = tl.where(m, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1) * scale_log2)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        b_p = tl.math.exp2(b_s * scale_log2 - m_use[:, None])
        l_i = l_i * alpha + tl.sum(b_p, 1)
        acc = acc * alpha[:, None]
        if TMA:
            b_v = VD.load([row0 + idx * BN, 0])
        else:
            b_v = tl.load(V + o_n[:, None] * BD + o_d[None, :])
        acc = tl.dot(b_p.to(b_v.dtype), b_v, acc)
        m_i = m_new
        if MODE != 0 and MODE != 6:
            b_b = nb
    return acc, l_i, m_i


@triton.jit
def fwd_kernel(Q, K, V, KD, VD, O, REL, TT, H, L, J, sm_scale,
               MODE: tl.constexpr, TMA: tl.constexpr, W: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_h = i_bh % H
    base = i_bh.to(tl.int64) * L * BD
    Q += base
    K += base
    V += base
    O += base
    REL += i_h * W
    TT += i_h.to(tl.int64) * J * BM * BN
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    b_q = tl.load(Q + o_m[:, None] * BD + o_d[None, :])
    o_q = o_m[:, None]
    q0 = i_m * BM
    qe = q0 + BM - 1
    if MODE == 0:
        scale_log2 = sm_scale * 1.4426950408889634
    else:
        scale_log2 = 1.4426950408889634
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    lo = tl.maximum(q0 - (W - 1), 0)
    s0 = lo // BN
    e0 = tl.minimum(qe, L - 1) // BN + 1
    flo = tl.maximum(qe - (W - 1), 0)
    f0 = (flo + BN - 1) // BN
    g0 = (q0 + 1) // BN
    g0 = tl.maximum(g0, f0)
    m0 = tl.minimum(tl.maximum(f0, s0), e0)
    m1 = tl.minimum(tl.maximum(g0, m0), e0)
    row0 = i_bh * L
    acc, l_i, m_i = _steps(acc, l_i, m_i, b_q, o_q, K, V, KD, VD, row0, REL, TT, q0, sm_scale, scale_log2, L,
                           s0, m0, True, MODE, TMA, W, BM, BN, BD)
    acc, l_i, m_i = _steps(acc, l_i, m_i, b_q, o_q, K, V, KD, VD, row0, REL, TT, q0, sm_scale, scale_log2, L,
                           m0, m1, False, MODE, TMA, W, BM, BN, BD)
    acc, l_i, m_i = _steps(acc, l_i, m_i, b_q, o_q, K, V, KD, VD, row0, REL, TT, q0, sm_scale, scale_log2, L,
                           m1, e0, True, MODE, TMA, W, BM, BN, BD)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_i[:, None]
    tl.store(O + o_m[:, None] * BD + o_d[None, :], o.to(O.dtype.element_ty))


@triton.jit
def toeplitz_kernel(REL, TT, J, W: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """TT[h, jd, i, j] = REL[h, clamp(jd * BN - (BM - BN) + i - j, 0, W - 1)]."""
    jd = tl.program_id(0)
    i_h = tl.program_id(1)
    o_i = tl.arange(0, BM)
    o_j = tl.arange(0, BN)
    t = jd * BN - (BM - BN) + o_i[:, None] - o_j[None, :]
    t = tl.minimum(tl.maximum(t, 0), W - 1)
    b = tl.load(REL + i_h * W + t)
    tl.store(TT + (i_h.to(tl.int64) * J + jd) * (BM * BN) + o_i[:, None] * BN + o_j[None, :],
             b.to(TT.dtype.element_ty))


def n_diag(W, BM, BN):
    dmax = ((W + BN - 2) // BN) * BN
    return (dmax + (BM - BN)) // BN + 1


def run(q, k, v, rel, mode, W, BM, BN, warps, stages, tt_dtype=torch.float32, tt=None, tma=False):
    B, H, L, D = q.shape
    o = torch.empty_like(q)
    J = n_diag(W, BM, BN)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        kd = TensorDescriptor.from_tensor(k.view(-1, D), [BN, D])
        vd = TensorDescriptor.from_tensor(v.view(-1, D), [BN, D])
    else:
        kd, vd = k, v
    if mode in (3, 4, 6):
        if tt is None:
            tt = torch.empty(H, J, BM, BN, device=q.device, dtype=tt_dtype)
        toeplitz_kernel[(J, H)](rel, tt, J, W=W, BM=BM, BN=BN, num_warps=4)
    else:
        tt = rel
    fwd_kernel[(L // BM, B * H)](q, k, v, kd, vd, o, rel, tt, H, L, J, 1.0 / math.sqrt(D),
                                 MODE=3 if mode == 4 else mode, TMA=tma, W=W, BM=BM, BN=BN, BD=D,
                                 num_warps=warps, num_stages=stages)
    return o


def reference(q, k, v, rel, W, score):
    B, H, L, D = q.shape
    qq, kk, vv = (x.double() for x in (q, k, v))
    s = qq @ kk.transpose(-1, -2) / math.sqrt(D)
    i = torch.arange(L, device=q.device)
    d = i[:, None] - i[None, :]
    if score:
        s = s + rel.double()[:, d.clamp(0, W - 1)][None]
    s = s.masked_fill(~((d >= 0) & (d <= W - 1)), float("-inf"))
    return torch.softmax(s, -1) @ vv


def main():
    torch.manual_seed(0)
    dev = "cuda"
    W = 1024
    variants = [  # name, mode, BM, BN, warps, stages, tt dtype, tma
        ("mask 64x64/3", 0, 64, 64, 4, 3, None, False),
        ("mask tma 64x64/3", 0, 64, 64, 4, 3, None, True),
        ("mask tma 64x32/2", 0, 64, 32, 4, 2, None, True),
        ("gather 64x32/2", 1, 64, 32, 4, 2, None, False),
        ("gather tma 64x32/2", 1, 64, 32, 4, 2, None, True),
        ("gather tma 64x64/2", 1, 64, 64, 4, 2, None, True),
        ("gather tma 64x64/3", 1, 64, 64, 4, 3, None, True),
        ("const tma 64x32/2", 5, 64, 32, 4, 2, None, True),
        ("const tma 64x64/3", 5, 64, 64, 4, 3, None, True),
        ("colbias tma 64x64/3", 7, 64, 64, 4, 3, None, True),
        ("colbias tma 64x32/2", 7, 64, 32, 4, 2, None, True),
        ("toeplitz tma 64x64/2", 3, 64, 64, 4, 2, torch.float32, True),
        ("toeplitz tma 64x32/2", 3, 64, 32, 4, 2, torch.float32, True),
        ("toeplitz-instep tma 64x64/3", 6, 64, 64, 4, 3, torch.float32, True),
        ("toeplitz-instep tma 64x32/3", 6, 64, 32, 4, 3, torch.float32, True),
    ]
    # correctness at L = 2048
    B, H, L, D = 1, 4, 2048, 128
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    rel = torch.randn(H, W, device=dev) * 2
    errs = {}
    for name, mode, BM, BN, w, st, dt, tma in variants:
        if mode in (5, 7):
            continue
        ref = reference(q, k, v, rel, W, mode != 0)
        o = run(q, k, v, rel, mode, W, BM, BN, w, st, dt, tma=tma).double()
        errs[name] = ((o - ref).norm() / ref.norm()).item()
        print(f"check {name}: rel err {errs[name]:.2e}", flush=True)
    # timing at 16K
    B, H, L, D = 1, 16, 16384, 128
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    rel = torch.randn(H, W, device=dev) * 2
    fns = {}
    for name, mode, BM, BN, w, st, dt, tma in variants:
        fns[name] = (lambda mode=mode, BM=BM, BN=BN, w=w, st=st, dt=dt, tma=tma:
                     run(q, k, v, rel, mode, W, BM, BN, w, st, dt, tma=tma))
        J = n_diag(W, BM, BN)
        if mode in (3, 4) and "64x64/2" in name:
            tt = torch.empty(H, J, BM, BN, device=dev, dtype=dt)
            fns[name + " (prologue)"] = (lambda dt=dt, BM=BM, BN=BN, J=J, tt=tt:
                                         toeplitz_kernel[(J, H)](rel, tt, J, W=W, BM=BM, BN=BN, num_warps=4))
    try:
        sys.path.insert(0, ".")
        import spattn
        pm = spattn.compile(f"causal & window({W})")
        ps = spattn.compile(f"causal & window({W})", score=f"s + rel[h, clamp(q - k, 0, {W - 1})]")
        pm_plan = pm.plan(q, k, v)
        ps_plan = ps.plan(q, k, v, rel=rel)
        fns["spattn mask plan"] = lambda: pm(q, k, v, plan=pm_plan)
        fns["spattn score plan"] = lambda: ps(q, k, v, plan=ps_plan, rel=rel)
        fns["spattn mask plan"](); fns["spattn score plan"]()
        print("spattn configs:", pm_plan.forward_stage.config, "|", ps_plan.forward_stage.config)
    except Exception as e:
        print("spattn unavailable:", repr(e)[:300])
        fns.pop("spattn mask plan", None); fns.pop("spattn score plan", None)
    for f in fns.values():
        f()
    torch.cuda.synchronize()
    rounds = {n: [] for n in fns}
    names = list(fns)
    for r in range(5):
        for n in (names if r % 2 == 0 else names[::-1]):
            rounds[n].append(triton.testing.do_bench(fns[n], warmup=25, rep=150, return_mode="median"))
    res = {n: sorted(ts)[len(ts) // 2] for n, ts in rounds.items()}
    json.dump({"rounds": rounds, "median": res, "errs": errs}, open(f"{OUT}/toeplitz.json", "w"), indent=1)
    base = res["mask 64x64/3"]
    print(f"\n{'variant':32s} {'ms':>8s} {'vs mask 64x64':>14s}  rounds")
    for n in names:
        print(f"{n:32s} {res[n]:8.4f} {res[n] / base - 1:+13.1%}  " + " ".join(f"{t:.3f}" for t in rounds[n]))


if __name__ == "__main__":
    main()
