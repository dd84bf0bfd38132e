"""The warp-specialised dQ kernel (``runtime/ws_dq.py``, Gluon, Hopper).

On the CPU: its rules (after the dK/dV kernel's, its own setting), the work items' order
(the longest key-tile lists first), the forward's lists under its thresholds, and the
kernel compiled for sm_90a in each form (masks, rows' runs, additive scores, D = 64 and
128, GQA). On an sm_90 GPU (marker ``gpu``): dQ, dK and dV against the float64 reference
on fresh random inputs, with and without an additive score; a launch that is its thread's
first CUDA work; a training step captured in a CUDA graph; and the calls it leaves to the
generated dQ kernel.
"""
import ast
from types import SimpleNamespace

import pytest
import torch

import spattn
from spattn.runtime import settings as S
from spattn.runtime import ws_dq, ws_fwd
from tests.helpers.uninterpreted import run_script
from tests.runtime.test_gpu import assert_replay_is_eager, graph_of
from tests.runtime.test_ws_bwd import GPU_CASES, GPU_IDS
from tests.runtime.test_ws_fwd import (SHARE_CASES, SHARE_IDS, _call, _check, _rand, checked_plan,
                                      hopper, share_rule)
from tests.runtime.test_ws_scores import GPU_CASES as SCORED_CASES
from tests.runtime.test_ws_scores import GPU_IDS as SCORED_IDS


def test_setting_parses(monkeypatch):
    for raw, want in (("0", False), ("1", True), ("auto", None)):
        monkeypatch.setenv("SPATTN_WS_DQ", raw)
        assert S.current().ws_dq is want
    monkeypatch.setenv("SPATTN_WS_DQ", "often")
    with pytest.raises(spattn.SpattnError, match="SPATTN_WS_DQ"):
        S.current()


def test_rules(monkeypatch):
    """It follows the warp-specialised dK/dV kernel only (whose rules hold once it runs),
    on the device rules of the Gluon kernels and its own setting."""
    pat, call = _call("causal", 1, 2, 1024)
    q = torch.empty(1, 2, 1024, 128, dtype=torch.bfloat16)
    stage = SimpleNamespace(ws=None)
    assert "dK/dV kernel does not run" in ws_dq.why_not(call, stage, q, q)
    stage.ws = object()
    monkeypatch.setenv("SPATTN_WS_DQ", "0")
    call = _call("causal", 1, 2, 1024)[1]
    assert ws_dq.why_not(call, stage, q, q) == "SPATTN_WS_DQ=0"
    monkeypatch.setenv("SPATTN_WS_DQ", "1")
    call = _call("causal", 1, 2, 1024)[1]
    assert ws_dq.why_not(call, stage, q, q) == "not on a CUDA device"
    monkeypatch.setattr(ws_dq, "device_why_not", lambda *a: None)   # (past the device)
    assert ws_dq.why_not(call, stage, q, q) is None
    o = torch.empty(1, 2, 128, 1024, dtype=torch.bfloat16).transpose(-1, -2)
    assert "rows are not contiguous" in ws_dq.why_not(call, stage, q, o)


@pytest.mark.parametrize("src,H,L,why", [
    ("causal & k % 3 != 1", 16, 4096,
     "tiles PARTIAL (auto takes 50% where rows' runs are read, 5% masks)"),
    ("full", 1, 2048, "tiles in all"),
], ids=["holes-H16-L4096", "full-H1-L2048"])
def test_lists_refuse(src, H, L, why):
    got = _dq_lists(_call(src, 1, H, L)[1])
    assert isinstance(got, str) and why in got, got


def _dq_lists(call):
    return ws_fwd.key_lists(call, call.settings.ws_dq,
                            (ws_dq.MAX_PARTIAL_SHARE, ws_dq.MAX_RUNS_SHARE), empty_row=None)


@pytest.mark.parametrize("src,H,L,n_docs", SHARE_CASES, ids=SHARE_IDS)
def test_auto_share_of_partial_tiles_by_what_is_read(src, H, L, n_docs, monkeypatch):
    """``SPATTN_WS_DQ=auto``: the forward's rule over the same lists, with this kernel's
    shares."""
    share_rule(_dq_lists, src, H, L, n_docs, "SPATTN_WS_DQ",
               (ws_dq.MAX_PARTIAL_SHARE, ws_dq.MAX_RUNS_SHARE), monkeypatch)


@pytest.mark.parametrize("src,empty,tiles", [("causal", 0, 128 * 129 // 2),
                                              ("k + 200 < q", 1, 127 * 128 // 2)],
                         ids=["causal", "first-rows-without-keys"])
def test_lists_take_long_causal(src, empty, tiles):
    """Long causal calls, with or without a query tile that sees no key (its dQ is 0:
    listed, empty; the key tiles of tile t > 0 of ``k + 200 < q`` are 0 .. t - 1)."""
    call = _call(src, 1, 16, 16384)[1]
    kl = _dq_lists(call)
    assert not isinstance(kl, str), kl
    assert int((kl.count == 0).sum()) == empty and kl.count.numel() == 128
    assert int(kl.count.sum()) == tiles


@pytest.mark.parametrize("B,H,LB,LH", [(1, 3, 0, 0), (2, 2, 4, 0), (2, 3, 12, 4), (1, 2, 0, 4)],
                         ids=["shared", "per-batch", "per-batch-and-head", "per-head"])
def test_items_longest_first(B, H, LB, LH):
    """One program per work item ``(b * H + h) * n_q + t``, taken longest list first, ties
    in item order; the lists' strides say which batch elements and heads share a list."""
    n_q = 4
    Bp, Hp = (B if LB else 1), (H if LH else 1)
    g = torch.Generator().manual_seed(B * 10 + H + LB + LH)
    count = torch.randint(1, 5, (Bp * Hp * n_q,), generator=g, dtype=torch.int32)
    lists = ws_fwd.KeyLists(torch.cumsum(count, 0, dtype=torch.int32) - count, count,
                            torch.zeros(int(count.sum()), dtype=torch.int32),
                            torch.full((int(count.sum()),), -1, dtype=torch.int32),
                            torch.zeros(1, 128, 128, dtype=torch.uint8), (LB, LH), n_q)
    q = torch.empty(B, H, n_q * 128, 64, dtype=torch.bfloat16)
    call = SimpleNamespace(Lq=n_q * 128, Lk=n_q * 128, scale=0.125,
                           positions=SimpleNamespace(q_offset=0))
    ws = ws_dq.WsDq(call, q, q, q, lists)
    assert ws.grid == (B * H * n_q,)
    per_item = [int(count[b * LB + h * LH + t]) for b in range(B) for h in range(H)
                for t in range(n_q)]
    want = sorted(range(len(per_item)), key=lambda i: (-per_item[i], i))
    assert ws.order.tolist() == want


def test_backward_of_the_two_gluon_launches(monkeypatch):
    """A backward stage with both Gluon launches runs the dQ launch, then the dK/dV launch
    on the delta and lse2 buffers the first wrote, and returns what they wrote, without
    the generated kernels' arguments (stand-in launches on CPU tensors)."""
    from spattn.runtime import triton_backend as tb
    B, H, HK, L, D = 1, 4, 2, 256, 64
    q, o, do = (torch.randn(B, H, L, D) for _ in range(3))
    k, v = (torch.randn(B, HK, L, D) for _ in range(2))
    lse = torch.randn(B, H, L)
    seen = {}

    def dq_run(q_, k_, v_, o_, lse_, do_, dq, lse2, delta):
        assert o_ is o and torch.equal(lse_, lse) and do_ is do
        dq.fill_(1.0), lse2.fill_(2.0), delta.fill_(3.0)
        seen["rows"] = (lse2, delta)

    def dkdv_run(q_, k_, v_, do_, lse2, delta, dk, dv):
        assert lse2 is seen["rows"][0] and delta is seen["rows"][1]
        dk.fill_(4.0), dv.fill_(5.0)

    def unused(*a, **kw):
        raise AssertionError("the generated kernels' arguments were built")
    monkeypatch.setattr(tb, "_bwd_tensors", unused)
    stage = SimpleNamespace(config=SimpleNamespace(dq="kernel"), upcast=False,
                            shapes=(B, H, HK, L, L, D), out_rows=(L, L),
                            ws_dq=SimpleNamespace(run=dq_run), ws=SimpleNamespace(run=dkdv_run))
    dq, dk, dv = tb.run_bwd(stage, q, k, v, o, lse, do)
    assert dq.shape == q.shape and dk.shape == dv.shape == k.shape
    assert bool((dq == 1).all() and (dk == 4).all() and (dv == 5).all())


@pytest.mark.parametrize("takes", [(True, True), (True, False), (False, False)],
                         ids=["both-gluon", "gluon-dkdv-only", "no-gluon"])
def test_generated_backward_tuned_only_where_it_runs(takes, monkeypatch):
    """With autotuning on, a backward stage is first built with the generated kernels'
    defaults; the autotuner times them only where the Gluon dQ and dK/dV kernels do not
    both take the stage over, and the Gluon launches built once go with the tuned stage
    (stand-ins for the device and the Gluon builds, CPU tensors)."""
    from spattn.runtime import triton_backend as tb
    from spattn.runtime import tune as T
    from spattn.runtime import ws_bwd
    pat, call = _call("causal", 1, 2, 256)
    q, k, v, o, do = (torch.randn(1, 2, 256, 64) for _ in range(5))
    tuned = []

    def tuned_options(*a, options, **kw):
        tuned.append(options)
        return options
    monkeypatch.setattr(tb, "_gluon_may_run", lambda call, q: True)
    monkeypatch.setattr(T, "enabled", lambda device, settings=None: True)
    monkeypatch.setattr(T, "tuned_options", tuned_options)
    built = []

    def gluon_build(i):
        def build(*a):
            built.append(i)
            return (object(), None) if takes[i] else (None, "refused")
        return build
    monkeypatch.setattr(ws_bwd, "build", gluon_build(0))
    monkeypatch.setattr(ws_dq, "build", gluon_build(1))
    stage = tb.build_bwd(call, q, k, v, o, do)
    assert (stage.ws is not None, stage.ws_dq is not None) == takes
    assert len(tuned) == (0 if all(takes) else 1)
    assert sorted(built) == [0, 1]          # each Gluon kernel's rules and build run once


def test_kernel_compiles_for_sm90():
    """Every configuration of tests/helpers/compile_ws_dq.py builds for sm_90a: consumers
    at 240 registers and the loader at 24, Q, dO, K and V read and dQ stored through 5-D
    TMA, S and dP in flight together (a wait of 1); masks, rows' runs and scores."""
    r = run_script("tests/helpers/compile_ws_dq.py")
    lines = r.stdout.splitlines()
    assert len(lines) == 7, r.stdout
    facts = []
    for ln in lines:
        label, ok, rest = ln.partition(" OK ")
        assert ok, ln
        f = ast.literal_eval(rest)
        assert {"240", "24"} <= set(f["setmaxnreg"]) and "1" in f["waits"], ln
        assert f["loads5d"] >= 6 and f["stores5d"] >= 2, ln
        facts.append((f["masked"], f["scored"]))
    assert {m for m, _ in facts} == {0, 1, 2} and {s for _, s in facts} == {0, 1, 2}


# ---------------------------------------------------------------- on the GPU

def _dq_stages(plan):
    return [s for s in plan._bwd.values() if getattr(s, "ws_dq", None) is not None]


def _gluon_backward(monkeypatch):
    for name in ("SPATTN_WS_FWD", "SPATTN_WS_BWD", "SPATTN_WS_DQ"):
        monkeypatch.setenv(name, "1")      # (small calls: auto leaves them)


@pytest.mark.parametrize("src,B,H,Hk,Lq,Lk,D,dtype,bshd,ins", GPU_CASES, ids=GPU_IDS)
@hopper
def test_gradients_gpu(src, B, H, Hk, Lq, Lk, D, dtype, bshd, ins, monkeypatch):
    """dQ from the warp-specialised kernel, then its delta and lse read by the dK/dV
    kernel: the gradients against the float64 reference (GQA, batches, ragged lengths,
    [B, L, H, D] memory, documents at random cuts, holes, key tiles without queries,
    query tiles without keys)."""
    _gluon_backward(monkeypatch)
    plan = checked_plan(src, None, {}, B, H, Hk, Lq, Lk, D, dtype, Lq + Lk + B + H + D + 1,
                        bshd=bshd)
    assert _dq_stages(plan), plan._bwd


@pytest.mark.parametrize("mask,score,params,B,H,Hk,Lq,Lk,D,dtype", SCORED_CASES,
                         ids=SCORED_IDS)
@hopper
def test_scored_gradients_gpu(mask, score, params, B, H, Hk, Lq, Lk, D, dtype, monkeypatch):
    """An additive score (ALiBi, terms of the key, of the query, a factor of s) through
    the three Gluon kernels: o, lse and the gradients against the float64 reference."""
    _gluon_backward(monkeypatch)
    plan = checked_plan(mask, score, params, B, H, Hk, Lq, Lk, D, dtype, Lq + Lk + B + H + D + 2,
                        lse_tol=2e-3)
    assert _dq_stages(plan), plan._bwd


@pytest.mark.parametrize("env", [{"SPATTN_WS_DQ": "0"}, {"SPATTN_WS_BWD": "0"},
                                 {"SPATTN_WS_DQ": "auto"}],
                         ids=["setting-off", "no-gluon-dkdv", "auto-little-work"])
@hopper
def test_left_to_the_generated_kernel_gpu(env, monkeypatch):
    _gluon_backward(monkeypatch)
    for n, val in env.items():
        monkeypatch.setenv(n, val)
    g = torch.Generator(device="cuda").manual_seed(7)
    q, k, v = (_rand((1, 2, 1024, 64), torch.bfloat16, g) for _ in range(3))
    pat = spattn.compile("causal")
    plan = pat.plan(q, k, v)
    _check(pat, q, k, v, {}, plan=plan)
    assert not _dq_stages(plan), plan._bwd


@hopper
def test_first_cuda_work_of_a_thread_gpu(monkeypatch):
    """A thread whose first CUDA work is the kernel's launch, as autograd's device thread's
    is where the caching allocator needs no new memory: the launch encodes its TMA
    descriptors with the thread's context made current first (else "invalid device
    context"), and computes what the same launch computes on this thread."""
    import threading
    _gluon_backward(monkeypatch)
    g = torch.Generator(device="cuda").manual_seed(11)
    q, k, v = (_rand((1, 2, 1024, 128), torch.bfloat16, g) for _ in range(3))
    pat = spattn.compile("causal")
    plan = pat.plan(q, k, v)
    o, lse = pat(q, k, v, return_lse=True, plan=plan)
    do = torch.randn_like(o)
    o.backward(do)
    (ws,) = [s.ws_dq for s in _dq_stages(plan)]
    o, lse = o.detach(), lse.detach().contiguous()
    out = [(torch.empty_like(q), torch.empty_like(lse), torch.empty_like(lse))
           for _ in range(2)]
    ws.run(q, k, v, o, lse, do, *out[0])
    got = {}

    def work():
        try:
            ws.run(q, k, v, o, lse, do, *out[1])
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 -- reported below
            got["error"] = e
    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert "error" not in got, got
    torch.cuda.synchronize()
    for a, b in zip(*out):
        assert torch.equal(a, b)


@hopper
def test_later_launches_bound_gpu(monkeypatch):
    """After a plan's first call, the three Gluon kernels launch through bound launches
    (Triton's dispatch skipped): later calls on fresh values, with the JIT functions taken
    away from the stages, still match the float64 reference."""
    _gluon_backward(monkeypatch)
    g = torch.Generator(device="cuda").manual_seed(13)
    q, k, v = (_rand((1, 2, 1024, 128), torch.bfloat16, g) for _ in range(3))
    pat = spattn.compile("causal & window(300)")
    plan = pat.plan(q, k, v)
    _check(pat, q, k, v, {}, plan=plan)
    stages = _dq_stages(plan)
    launches = [plan.forward_stage.launches, *(s.ws_dq.launches for s in stages),
                *(s.ws.launches for s in stages)]
    assert plan.forward_stage.gluon and len(launches) == 3, plan
    for one in launches:
        assert len(one.bound) == 1, one.bound
        one.kernel = None           # (a launch through the JIT now fails)
    for _ in range(2):
        q, k, v = (_rand((1, 2, 1024, 128), torch.bfloat16, g) for _ in range(3))
        _check(pat, q, k, v, {}, plan=plan)


@hopper
def test_cuda_graph_training_step_gpu(monkeypatch):
    """A training step through the three Gluon kernels is captured in one CUDA graph;
    replays on new values match the eager step bit for bit (every kernel is
    deterministic)."""
    _gluon_backward(monkeypatch)
    g = torch.Generator(device="cuda").manual_seed(12)
    pat = spattn.compile("causal", score="alibi(alibi_slope)")
    q, k, v = (_rand((1, 2, 1024, 128), torch.bfloat16, g) for _ in range(3))
    w = torch.randn(1, 2, 1024, 128, device="cuda", generator=g)
    plan = pat.plan(q, k, v)

    def step():
        o = pat(q, k, v, plan=plan)
        return (o, *torch.autograd.grad((o.float() * w).sum(), (q, k, v)))

    graph, static = graph_of(step)
    assert plan.forward_stage.gluon and _dq_stages(plan), plan
    for seed in (1, 2):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        with torch.no_grad():
            for t in (q, k, v):
                t.copy_(torch.randn(t.shape, device="cuda", generator=gen))
        assert_replay_is_eager(graph, static, step)
