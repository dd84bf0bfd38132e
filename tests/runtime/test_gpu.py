"""On the GPU: the generated kernels in bf16 at N = 4096..16384 against a float64 reference.

Skipped without CUDA (marker ``gpu``). Run on the device with
``python -m pytest -m gpu tests/runtime/test_gpu.py``.
"""
import pytest
import torch

import spattn
from spattn.codegen.config import default_bwd_tiles, default_tiles
from spattn.runtime.reference import attention_reference_chunked

from spattn.runtime.plan import PLANS

from tests.helpers.kernels import check_table_paths, record_descriptors

pytestmark = pytest.mark.gpu

CASES = [  # name, source, inputs factory
    ("causal", "causal", None),
    ("window", "window(1024)", None),
    ("streaming", "causal & (window(1024) | sink(64))", None),
    ("documents", "causal & same(doc)",
     lambda N, g: {"doc": torch.sort(torch.randint(0, 12, (N,), generator=g, device="cuda")).values}),
    ("longformer", "global_tokens(16) | local(256, 256)", None),
    ("dilated", "dilated(512, 4)", None),
    ("per-head", "causal & (q - k < 1024 | k % H == h)", None),
    ("prefix", "prefix_lm(1000)", None),
]


@pytest.mark.parametrize("N", [4096, 16384], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("name,src,mk", CASES, ids=[c[0] for c in CASES])
def test_forward_bf16(name, src, mk, N):
    g = torch.Generator(device="cuda").manual_seed(N)
    H, D = 2, 128
    q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    inputs = mk(N, g) if mk else {}
    pat = spattn.compile(src)
    o = pat(q, k, v, **inputs)
    ref = attention_reference_chunked(pat, q, k, v, **inputs)
    err = float((o.double() - ref).norm() / ref.norm())
    assert torch.isfinite(o).all()
    assert err < 1e-2, f"{name}: rel. error {err:.2e}"


@pytest.mark.parametrize("N", [4096, 8192], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("name,src,mk", CASES[:5] + CASES[6:7], ids=[c[0] for c in CASES[:5] + CASES[6:7]])
def test_backward_bf16(name, src, mk, N):
    from spattn.runtime.reference import attention_reference
    g = torch.Generator(device="cuda").manual_seed(N + 1)
    H, D = 2, 64 if N > 4096 else 128
    q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    do = torch.randn_like(q)
    inputs = mk(N, g) if mk else {}
    pat = spattn.compile(src)
    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    pat(qs, ks, vs, **inputs).backward(do)
    mask = pat.mask(N, N, num_heads=H, device="cuda", **inputs)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, _ = attention_reference(qr, kr, vr, mask)
    out.backward(do.double())
    for nm, a, b in (("dq", qs, qr), ("dk", ks, kr), ("dv", vs, vr)):
        err = float((a.grad.double() - b.grad).norm() / b.grad.norm())
        assert torch.isfinite(a.grad).all()
        assert err < 2e-2, f"{name} {nm}: rel. error {err:.2e}"


@pytest.mark.parametrize("loop", ["split", "fused", "persistent"])
@pytest.mark.parametrize("name,src,mk", [CASES[1], CASES[3]], ids=["window", "documents"])
def test_forward_loops_bf16(name, src, mk, loop):
    """Every forward loop variant, on both strategies (the persistent kernel launches one
    program per resident slot and loops; its occupancy is learnt after the first launch)."""
    from spattn.runtime import triton_backend as tb
    N, H, D = 8192, 4, 128
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    inputs = mk(N, g) if mk else {}
    pat = spattn.compile(src)
    ref = attention_reference_chunked(pat, q, k, v, **inputs)
    for _ in range(2):      # the second call runs with the learnt persistent grid
        o, _ = tb.fwd(pat, q, k, v, scale=D ** -0.5, q_offset=0, inputs=inputs, loop=loop,
                      block_m=128, block_n=64, num_warps=8, num_stages=3)
        err = float((o.double() - ref).norm() / ref.norm())
        assert err < 1e-2, f"{name} {loop}: rel. error {err:.2e}"


def test_warmup_compiles_without_running():
    """The autotuner's precompile path: ``_build_fwd(..., warmup=True)`` compiles the
    kernel (one new entry in Triton's kernel cache) and writes nothing; the real launch
    then finds it compiled."""
    from spattn.runtime import cache, triton_backend as tb
    from spattn.runtime.plan import Call
    pat = spattn.compile("window(333)")
    q, k, v = (torch.randn(1, 2, 1000, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    opts = dict(block_m=64, block_n=32, num_warps=4, num_stages=2, loop="fused")
    mod, _ = cache.load(pat, "fwd", head_dim=64, dtype=q.dtype, device=q.device, **opts)
    kc = mod.KERNEL.device_caches[torch.cuda.current_device()][0]
    n0 = len(kc)
    call = Call.of(pat, q, k, scale=0.125, q_offset=0, inputs={})
    tb._build_fwd(call, q, k, v, dict(opts, tma=False, int64=False), warmup=True)
    assert len(kc) == n0 + 1
    o, _ = tb.run_fwd(tb._build_fwd(call, q, k, v, dict(opts, tma=False, int64=False)),
                      q, k, v)
    assert len(kc) == n0 + 1
    ref = attention_reference_chunked(pat, q, k, v, scale=0.125)
    assert float((o.double() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("tables", ["csr", "spans", "runs"])
@pytest.mark.parametrize("name,src,mk", [CASES[3], CASES[5], CASES[6]],
                         ids=["documents", "dilated", "per-head"])
def test_table_forms_bf16(monkeypatch, name, src, mk, tables):
    """The table strategy's CSR lists, spans (forced; per-head's spans hold EMPTY tiles) and
    FULL tiles as runs, forward with the split and fused loops, and backward."""
    from spattn.runtime import triton_backend as tb
    from spattn.runtime.reference import attention_reference
    monkeypatch.setenv("SPATTN_TABLES", tables)
    PLANS.clear()
    N, H, D = 4096, 2, 128
    g = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    do = torch.randn_like(q)
    inputs = mk(N, g) if mk else {}
    pat = spattn.compile(src)
    mask = pat.mask(N, N, num_heads=H, device="cuda", **inputs)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(qr, kr, vr, mask)
    ref.backward(do.double())
    for loop in ("split", "fused"):
        o, lse = tb.fwd(pat, q, k, v, scale=D ** -0.5, q_offset=0, inputs=inputs, loop=loop,
                        strategy="table", block_m=128, block_n=64, num_warps=8, num_stages=3)
        err = float((o.double() - ref).norm() / ref.norm())
        assert err < 1e-2, f"{name} {tables} {loop}: rel. error {err:.2e}"
    grads = tb.bwd(pat, q, k, v, o, lse, do, scale=D ** -0.5, q_offset=0, inputs=inputs,
                   strategy="table")
    for nm, a, b in zip(("dq", "dk", "dv"), grads, (qr, kr, vr)):
        err = float((a.double() - b.grad).norm() / b.grad.norm())
        assert err < 2e-2, f"{name} {tables} {nm}: rel. error {err:.2e}"


STEP_TILES = {   # a training step's forward (bm, bn) and backward (m1, n1, m2, n2) tiles
    "default": (default_tiles(128, "bf16")[:2], default_bwd_tiles(128, "bf16")[:4]),
    "128x64": ((128, 64), (64, 128, 128, 64)),
}


@pytest.mark.parametrize("step", list(STEP_TILES))
@pytest.mark.parametrize("name,src,mk", [c for c in CASES if c[0] in
                                          ("documents", "per-head", "streaming", "dilated")],
                         ids=["streaming", "documents", "dilated", "per-head"])
def test_table_kernels_cuda(monkeypatch, name, src, mk, step):
    """The one-launch table and order kernels on the device (``runtime/spans_kernel.py``)
    build the torch path's tables: the same forms, orders, spans and CSR lists, for a
    training step with GQA (8 query heads, 2 key heads) at a ragged length, at the GPU's
    default tiles (one classification at 32 x 32, each kernel's tiles pooled from it) and
    at 128 x 64 / 64 x 128."""
    from spattn.runtime import triton_backend as tb
    from spattn.runtime.tables import Analysis
    N = 8000
    (bm, bn), bwd = STEP_TILES[step]
    g = torch.Generator(device="cuda").manual_seed(5)
    pat = spattn.compile(src)
    kw = dict(B=1, H=8, q_offset=0, device=torch.device("cuda"), inputs=mk(N, g) if mk else {})

    def build():
        analysis = Analysis(pat, N, N, **kw)
        analysis.expect([(bwd[2], bwd[3]), (bwd[0], bwd[1])])
        out = [tb.fwd_tables(pat, N, N, bm, bn, analysis=analysis, **kw),
               *tb.bwd_tables(pat, N, N, bwd, HK=2, analysis=analysis, **kw)]
        assert len(analysis.fine) == 1, analysis
        return out
    check_table_paths(monkeypatch, build)


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("name,src,mk", [CASES[2], CASES[3]], ids=["streaming", "documents"])
def test_tma_and_pointers_bf16(monkeypatch, name, src, mk, tma):
    """Both load paths on the device, forward and backward, where TMA's zero fill and
    clipped stores matter: a ragged length (3000), a head dim that is not a power of two
    (96, padded to a 128-wide block), GQA and a [B, L, H, D] layout; every element
    checked against float64; the descriptors counted."""
    from spattn.runtime import triton_backend as tb
    from spattn.runtime.reference import attention_reference
    built = record_descriptors(monkeypatch)
    monkeypatch.setenv("SPATTN_AUTOTUNE", "0")
    B, H, HK, N, D = 2, 4, 2, 3000, 96
    g = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    k, v = (torch.randn(B, HK, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(2))
    do = torch.randn_like(q)
    inputs = mk(N, g) if mk else {}
    pat = spattn.compile(src)
    mask = pat.mask(N, N, num_heads=H, device="cuda", **inputs)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    kx, vx = (t.repeat_interleave(H // HK, 1) for t in (kr, vr))
    ref, _ = attention_reference(qr, kx, vx, mask)
    ref.backward(do.double())
    o, lse = tb.fwd(pat, q, k, v, scale=D ** -0.5, q_offset=0, inputs=inputs, tma=tma)
    grads = tb.bwd(pat, q, k, v, o, lse, do, scale=D ** -0.5, q_offset=0, inputs=inputs,
                   tma=tma)
    hopper = torch.cuda.get_device_capability()[0] >= 9
    # each stage is compiled and loaded with its own descriptors before its first launch
    # (triton_backend._fitted), then launched: twice the launches' 4 + 6 + 6
    assert len(built) == (2 * (4 + 6 + 6) if tma and hopper else 0)
    for nm, a, b, tol in (("o", o, ref, 1e-2), ("dq", grads[0], qr.grad, 2e-2),
                          ("dk", grads[1], kr.grad, 2e-2), ("dv", grads[2], vr.grad, 2e-2)):
        a = a.double()
        assert torch.isfinite(a).all()
        bad = (a - b).abs() > tol * b.abs().max() + tol * b.abs()
        assert not bad.any(), f"{name} {nm}: {int(bad.sum())} elements off, max err " \
            f"{float((a - b).abs().max()):.3e} (scale {float(b.abs().max()):.3e})"


def graph_of(step):
    """``step`` run twice on a side stream (its warm-up), then captured in a CUDA graph:
    ``(graph, the step's static outputs)``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    return graph, static


def assert_replay_is_eager(graph, static, step):
    """A replay of ``graph`` (on whatever values its inputs hold now) equals the eager
    ``step`` bit for bit."""
    graph.replay()
    eager = step()
    for a, b in zip(static, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("src,mk", [("causal & window(256)", None),
                                    ("causal & same(doc)", lambda N, g: {"doc": torch.sort(
                                        torch.randint(0, 5, (N,), generator=g,
                                                      device="cuda")).values})],
                         ids=["window", "documents"])
@pytest.mark.parametrize("explicit", [True, False], ids=["plan", "last-call"])
def test_cuda_graph_training_step_with_a_plan(src, mk, explicit):
    """A training step (forward and backward) that reuses a plan is captured in one CUDA
    graph; replays on new values match the eager step. Without ``plan=`` the plan is the
    one the pattern remembers from its warm-up calls (its last call's signature: nothing
    is checked or looked up while capturing)."""
    g = torch.Generator(device="cuda").manual_seed(11)
    B, H, N, D = 2, 4, 2048, 64
    inputs = mk(N, g) if mk else {}
    pat = spattn.compile(src)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
               .requires_grad_() for _ in range(3))
    w = torch.randn(B, H, N, D, device="cuda", dtype=torch.float32, generator=g)
    plan = pat.plan(q, k, v, **inputs)              # requires grad: the backward is built too

    def step():
        o = pat(q, k, v, plan=plan) if explicit else pat(q, k, v, **inputs)
        return (o, *torch.autograd.grad((o.float() * w).sum(), (q, k, v)))

    graph, static = graph_of(step)
    for seed in (1, 2):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        with torch.no_grad():
            for t in (q, k, v):
                t.copy_(torch.randn(t.shape, device="cuda", generator=gen))
        assert_replay_is_eager(graph, static, step)


def test_cuda_graph_of_a_score_with_a_table_divisor():
    """``softcap(cap[h])`` with a plan, forward and backward, captured in a CUDA graph: the
    divisor check (a host read of the caps) runs at the warm-up calls, not in the capture;
    replays on new values match the eager step."""
    g = torch.Generator(device="cuda").manual_seed(5)
    B, H, N, D = 1, 2, 1024, 64
    pat = spattn.compile("causal & window(256)", score="softcap(cap[h])")
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
               .requires_grad_() for _ in range(3))
    cap = torch.tensor([20.0, 30.0], device="cuda")
    w = torch.randn(B, H, N, D, device="cuda", generator=g)
    plan = pat.plan(q, k, v, cap=cap)

    def step():
        o = pat(q, k, v, plan=plan, cap=cap)
        return (o, *torch.autograd.grad((o.float() * w).sum(), (q, k, v)))

    graph, static = graph_of(step)
    gen = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, device="cuda", generator=gen))
        cap.copy_(torch.tensor([10.0, 40.0]))
    assert_replay_is_eager(graph, static, step)


@pytest.mark.parametrize("dq", ["kernel", "atomic"])
@pytest.mark.parametrize("name,src,mk", [CASES[1], CASES[3], CASES[6]],
                         ids=["window", "documents", "per-head"])
def test_lse_gradient_bf16(monkeypatch, name, src, mk, dq):
    """A loss on the returned lse as well as the output (GQA 4/2, N = 4096): the Triton
    backward's lse-gradient stage against float64 (relative error of each gradient)."""
    from spattn.runtime.reference import attention_reference
    monkeypatch.setenv("SPATTN_BWD_DQ", dq)
    N, Hq, Hk, D = 4096, 4, 2, 128
    g = torch.Generator(device="cuda").manual_seed(N + 7)
    q = torch.randn(1, Hq, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, Hk, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(2))
    do = torch.randn_like(q)
    dl = torch.randn(1, Hq, N, device="cuda", generator=g) * 4
    inputs = mk(N, g) if mk else {}
    pat = spattn.compile(src)
    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    o, lse = pat(qs, ks, vs, return_lse=True, **inputs)
    ((o.float() * do.float()).sum() + (torch.nan_to_num(lse, neginf=0.0) * dl).sum()).backward()
    mask = pat.mask(N, N, num_heads=Hq, device="cuda", **inputs)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, rl = attention_reference(qr, kr, vr, mask)
    ((out * do.double()).sum() + (torch.nan_to_num(rl, neginf=0.0) * dl.double()).sum()
     ).backward()
    for nm, a, b in (("dq", qs, qr), ("dk", ks, kr), ("dv", vs, vr)):
        err = float((a.grad.double() - b.grad).norm() / b.grad.norm())
        assert torch.isfinite(a.grad).all()
        assert err < 2e-2, f"{name} {nm}: rel. error {err:.2e}"


SCORED_LAYOUTS = [  # shape, kernel, stride, dilation, causal, score, Hq, Hk, B, dtype
    ((24, 40), (5, 7), (1, 2), (1, 1), (False, False),
     "s + rpb[h, q // 40 - k // 40 + 23, q % 40 - k % 40 + 39]", 4, 2, 1, torch.bfloat16),
    ((20, 36), (3, 5), (1, 1), (2, 1), (True, False),
     "softcap(4.0) + rpb[h, q % 36 - k % 36 + 35]", 2, 2, 2, torch.float16),
    ((6, 12, 20), (3, 5, 5), (1, 2, 1), (1, 1, 2), (False, False, True),
     "s + rpb[h, q // 240 - k // 240 + 5] + 0.01 * float(q - k)", 2, 1, 1, torch.bfloat16),
]


@pytest.mark.parametrize("shape,ks,st,dil,ca,score,Hq,Hk,B,dtype", SCORED_LAYOUTS,
                         ids=["2d-stride-gqa-bf16", "2d-dilated-causal-fp16", "3d-mixed-bf16"])
def test_scored_layouts_cuda(monkeypatch, shape, ks, st, dil, ca, score, Hq, Hk, B, dtype):
    """Scored neighbourhoods of strides, dilations and causal axes in their layouts on
    CUDA (the row-copy kernel's gathers, their 3-D lse and the inverse gathers of the
    backward), GQA and batches: o, lse and the gradients of q, k, v and the table."""
    from spattn.runtime.reference import pattern_reference
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.neighborhood(shape, ks, st, dil, ca) & spattn.compile("true", score=score)
    N = 1
    for n in shape:
        N *= n
    g = torch.Generator(device="cuda").manual_seed(N)
    q, do = (torch.randn(B, Hq, N, 64, device="cuda", dtype=dtype, generator=g)
             for _ in range(2))
    k, v = (torch.randn(B, Hk, N, 64, device="cuda", dtype=dtype, generator=g)
            for _ in range(2))
    width = 2 * (shape[1] if "% 36" in score else shape[0]) - 1
    rpb = torch.randn(*((Hq, 2 * shape[0] - 1, 2 * shape[1] - 1) if score.count(",") == 2
                        else (Hq, width)), device="cuda", generator=g)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, rpb)]
    o, lse = pat(*leaves[:3], rpb=leaves[3], return_lse=True)
    ((o.float() * do.float()).sum() + torch.nan_to_num(lse, neginf=0.0).sum()).backward()
    assert any(r is not None for r in pat._layouts.values())
    ref = [t.detach().double().requires_grad_() for t in (q, k, v, rpb)]
    ro, rl = pattern_reference(pat, *ref[:3], rpb=ref[3])
    ((ro * do.double()).sum() + torch.nan_to_num(rl, neginf=0.0).sum()).backward()
    for nm, a, b in (("o", o, ro), ("lse", lse, rl)):
        fin = torch.isfinite(b)
        err = float((a.detach().double()[fin] - b[fin]).norm() / b[fin].norm())
        assert err < 2e-2, f"{nm}: rel. error {err:.2e}"
    for nm, a, b in zip(("dq", "dk", "dv", "drpb"), leaves, ref):
        err = float((a.grad.double() - b.grad).norm() / b.grad.norm())
        assert torch.isfinite(a.grad).all() and err < 3e-2, f"{nm}: rel. error {err:.2e}"


def test_scored_neighbourhood_in_a_layout_bf16(monkeypatch):
    """A 2-D neighbourhood with a learned relative position bias run in its token layout
    (``runtime.scores.LayoutRun``; the grid 30 x 50 is padded by the boxes): o and the
    gradients of q, k, v and the table against float64."""
    from spattn.runtime.reference import pattern_reference
    from spattn.runtime.scores import LayoutRun
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    Y, X, R, H, D = 30, 50, 3, 2, 64
    pat = spattn.neighborhood((Y, X), 2 * R + 1) & spattn.compile(
        "true", score=f"s + rpb[h, q // {X} - k // {X} + {Y - 1}, q % {X} - k % {X} + {X - 1}]")
    g = torch.Generator(device="cuda").manual_seed(11)
    N = Y * X
    q, k, v, do = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(4))
    rpb = torch.randn(H, 2 * Y - 1, 2 * X - 1, device="cuda", generator=g)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, rpb)]
    o = pat(*leaves[:3], rpb=leaves[3])
    o.backward(do)
    assert any(isinstance(r, LayoutRun) for r in pat._layouts.values())
    ref = [t.detach().double().requires_grad_() for t in (q, k, v, rpb)]
    ro, _ = pattern_reference(pat, *ref[:3], rpb=ref[3])
    ro.backward(do.double())
    err = float((o.double() - ro).norm() / ro.norm())
    assert err < 2e-2, f"o: rel. error {err:.2e}"
    for nm, a, b in zip(("dq", "dk", "dv", "drpb"), leaves, ref):
        err = float((a.grad.double() - b.grad).norm() / b.grad.norm())
        assert torch.isfinite(a.grad).all() and err < 2e-2, f"{nm}: rel. error {err:.2e}"


BOX_LAYOUTS = [  # grid, kernel, Hq, Hk, B: each a layout whose boxes 5-D TMA reads
    ((128, 128), 13, 2, 2, 1),          # the flattened 13 x 13 of the 16K suite's size
    ((40, 72), (7, 9), 4, 2, 2),        # a grid the 16 x 8 boxes do not divide, GQA
    ((8, 24, 32), (3, 5, 7), 2, 1, 1),  # 3-D
    ((64, 128), [(24, 48), (8, 16)], 2, 1, 1),      # strided: the FULL key tiles as runs
    ((8, 32, 32), [(4, 16, 16), (2, 8, 8)], 2, 1, 1),  # 3-D strided: runs of runs
]


@pytest.mark.parametrize("backward", ["copy", "kernel"])
@pytest.mark.parametrize("grid,kernel,Hq,Hk,B", BOX_LAYOUTS,
                         ids=["2d-128x128-k13", "2d-40x72-gqa-b2", "3d-8x24x32",
                              "2d-64x128-stride", "3d-8x32x32-stride"])
def test_box_forward_cuda(monkeypatch, grid, kernel, Hq, Hk, B, backward):
    """A neighbourhood in its layout on CUDA with the forward through the layout's boxes
    (5-D TMA on the caller's tensors, what ``SPATTN_LAYOUT_GATHER=auto`` takes there) and
    the backward through row tables or gathered copies, as the cost constants pick (both
    forced here): o, lse and the gradients of q, k, v against float64, bf16."""
    from spattn.ir import cost as C
    from spattn.runtime.plan import RemappedPlan
    from spattn.runtime.reference import pattern_reference
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    monkeypatch.setitem(C.COSTS["cuda"], "rows_factor", 0.0 if backward == "kernel" else 1e9)
    if isinstance(kernel, list):        # (in the 128 x 128 tiles of a strided layout; runs
        monkeypatch.setenv("SPATTN_BLOCK_M", "128")     # wherever they hold, however few)
        monkeypatch.setenv("SPATTN_BLOCK_N", "128")
        monkeypatch.setenv("SPATTN_TABLES", "runs")
    pat = spattn.neighborhood(grid, *kernel) if isinstance(kernel, list) else \
        spattn.neighborhood(grid, kernel)
    N = 1
    for n in grid:
        N *= n
    g = torch.Generator(device="cuda").manual_seed(N + Hq)
    q, do = (torch.randn(B, Hq, N, 64, device="cuda", dtype=torch.bfloat16, generator=g)
             for _ in range(2))
    k, v = (torch.randn(B, Hk, N, 64, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(2))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    plan = pat.plan(*leaves)
    assert isinstance(plan, RemappedPlan)
    assert (plan.gather, plan.backward_gather) == ("box", backward), repr(plan)
    if isinstance(kernel, list):
        assert "table (runs)" in repr(plan), repr(plan)
    o, lse = pat(*leaves, plan=plan, return_lse=True)
    ((o.float() * do.float()).sum() + torch.nan_to_num(lse, neginf=0.0).sum()).backward()
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro, rl = pattern_reference(pat, *ref)
    ((ro * do.double()).sum() + torch.nan_to_num(rl, neginf=0.0).sum()).backward()
    for nm, a, b in (("o", o, ro), ("lse", lse, rl)):
        err = float((a.detach().double() - b).norm() / b.norm())
        assert err < 2e-2, f"{nm}: rel. error {err:.2e}"
    for nm, a, b in zip(("dq", "dk", "dv"), leaves, ref):
        err = float((a.grad.double() - b.grad).norm() / b.grad.norm())
        assert torch.isfinite(a.grad).all() and err < 2e-2, f"{nm}: rel. error {err:.2e}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("how", ["call", "plan", "decode", "scored"])
def test_tensors_on_a_gpu_that_is_not_current(how):
    """Tensors on cuda:1 with cuda:0 current (a model spread over GPUs): Triton launches on
    the current device, so every entry makes the tensors' device current for the call and
    restores the caller's after; forward, backward and decode match the reference."""
    from spattn.runtime.reference import attention_reference, pattern_reference
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    g = torch.Generator(device=dev).manual_seed(7)
    Lq = 3 if how == "decode" else 1000
    q = torch.randn(2, 4, Lq, 64, device=dev, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(2, 2, 1000, 64, device=dev, dtype=torch.bfloat16, generator=g)
            for _ in range(2))
    score = "alibi(0.5)" if how == "scored" else None
    pat = spattn.compile("causal & window(300)", score=score) if score else \
        spattn.compile("causal & window(300)")
    qs, ks, vs = (t.detach().requires_grad_(how != "decode") for t in (q, k, v))
    if how == "decode":
        o = pat.decode(qs, ks, vs)
    elif how == "plan":
        o = pat(qs, ks, vs, plan=pat.plan(qs, ks, vs))
    else:
        o = pat(qs, ks, vs)
    assert torch.cuda.current_device() == 0 and o.device == dev
    rl = [t.detach().double().requires_grad_(how != "decode") for t in (q, k, v)]
    ro, _ = pattern_reference(pat, *rl) if score else attention_reference(
        *rl, pat.mask(Lq, 1000, num_heads=4, device=dev))
    assert float((o.double() - ro).norm() / ro.norm()) < 1e-2
    if how != "decode":
        do = torch.randn_like(o)
        got = torch.autograd.grad(o, (qs, ks, vs), do)
        want = torch.autograd.grad(ro, rl, do.double())
        for a, b in zip(got, want):
            assert a.device == dev
            assert float((a.double() - b).norm() / b.norm()) < 2e-2


def test_analysis_of_cuda_inputs_runs_on_their_device():
    """``mask`` and ``tiles`` with runtime inputs on the GPU and no ``device=`` evaluate on
    the inputs' device (a mix of devices evaluated on the CPU raised torch's device error),
    and equal the CPU's answer; the image-block pattern of the transformers adapter too."""
    pat = spattn.compile("(q >= k | blocks[q] == blocks[k] & blocks[q] >= 0) & q - k < 200")
    ids = torch.full((2, 700), -1, dtype=torch.long)
    ids[0, 100:356] = 0
    ids[1, 400:656] = 1
    m = pat.mask(700, 700, batch=2, blocks=ids.cuda())
    assert m.is_cuda and torch.equal(m.cpu(), pat.mask(700, 700, batch=2, blocks=ids))
    t = pat.tiles(700, 700, 64, 64, batch=2, blocks=ids.cuda())
    assert t.is_cuda and torch.equal(t.cpu(), pat.tiles(700, 700, 64, 64, batch=2, blocks=ids))


@pytest.mark.parametrize("ws", ["0", "1"], ids=["generated", "gluon"])
def test_a_plan_keeps_no_tensor_of_its_calls(monkeypatch, ws):
    """After a plan's first forward+backward (whose launches are then bound), none of that
    call's tensors outlives the call: q, k, v, o, dO and the gradients are freed while the
    plan lives on; a second call on fresh values, through the bound launches, matches the
    float64 reference. ``gluon``: the warp-specialised kernels forced (sm_90 only)."""
    import gc
    import weakref
    if ws == "1" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels run on sm_90")
    for name in ("SPATTN_WS_FWD", "SPATTN_WS_BWD", "SPATTN_WS_DQ"):
        monkeypatch.setenv(name, ws)
    pat = spattn.compile("causal")

    def call(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        q, k, v, do = (torch.randn(1, 2, 1024, 64, device="cuda", dtype=torch.bfloat16,
                                   generator=g) for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        return q, k, v, do

    q, k, v, do = call(0)
    plan = pat.plan(q, k, v, backward=True)
    o = pat(q, k, v, plan=plan)
    o.backward(do)
    torch.cuda.synchronize()
    refs = [weakref.ref(t) for t in (q, k, v, o, do, q.grad, k.grad, v.grad)]
    del q, k, v, o, do
    gc.collect()
    assert [r() is None for r in refs] == [True] * len(refs)
    q, k, v, do = call(1)
    o = pat(q, k, v, plan=plan)
    o.backward(do)
    ref = attention_reference_chunked(pat, q.detach().double(), k.detach().double(),
                                      v.detach().double())
    assert (o.double() - ref).abs().max() < 2e-2


@pytest.mark.parametrize("ws", ["0", "1"], ids=["generated", "gluon"])
def test_bound_launches_call_the_c_launcher(monkeypatch, ws):
    """On this Triton every bound launch of a plan's forward and backward takes the C
    launcher (``BoundLaunch.raw``: a Triton whose launcher has another form would fall
    back to its own path without a word), and its calls on fresh tensors (new addresses:
    maps encoded; the same ones again: maps reused) give outputs and gradients equal bit
    for bit to Triton's own launch path (``RAW_LAUNCH`` off), the output within bf16's
    error of the float64 reference. ``gluon``: the warp-specialised kernels forced (sm_90
    only)."""
    import gc
    from spattn.runtime import triton_backend as tb
    if ws == "1" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels run on sm_90")
    for name in ("SPATTN_WS_FWD", "SPATTN_WS_BWD", "SPATTN_WS_DQ"):
        monkeypatch.setenv(name, ws)
    pat = spattn.compile("causal & same(doc)")
    doc = torch.arange(2048, device="cuda") // 600

    def inputs(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        return [torch.randn(1, 2, 2048, 128, device="cuda", dtype=torch.bfloat16, generator=g)
                for _ in range(4)]

    def call(seed, raw):
        monkeypatch.setattr(tb, "RAW_LAUNCH", raw)
        q, k, v, do = inputs(seed)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        o = pat(q, k, v, plan=plan)
        o.backward(do)
        return [t.detach().clone() for t in (o, q.grad, k.grad, v.grad)]

    def bound():
        return {id(b): b for b in gc.get_objects() if type(b) is tb.BoundLaunch}

    before = bound()
    q = inputs(0)[0]
    plan = pat.plan(q, q, q, backward=True, doc=doc)
    first = call(0, True)
    launches = [b for i, b in bound().items() if i not in before]
    assert launches and all(b.raw is not None for b in launches)
    for seed in (1, 2, 1):
        got, want = call(seed, True), call(seed, False)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    q, k, v, _ = (t.double() for t in inputs(0))
    ref = attention_reference_chunked(pat, q, k, v, doc=doc)
    assert (first[0].double() - ref).abs().max() < 2e-2
