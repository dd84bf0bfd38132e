"""Permuted plans whose kernels address rows through row tables
(``SPATTN_LAYOUT_GATHER=kernel``, ``KernelConfig.rows == "table"``): the generated kernels
run the slots of a layout or of a caller's order on the caller's q, k, v and write o, lse,
dq, dk, dv in the caller's order, with no gather before or after. Outputs and gradients
against the float64 reference on fresh random inputs (every element), padded layouts,
residue classes, GQA, per-batch orders, strided (``bshd``) tensors, a score with a table;
no gather launched; the generated text; the setting, the plan option and the cost model."""
import math

import pytest
import torch

import spattn
from spattn.dsl.errors import SpattnConfigError
from spattn.ir import layout as LY
from spattn.ir.cost import COSTS
from spattn.runtime import triton_backend as TB
from spattn.runtime.api import make_plan
from spattn.runtime.plan import Call, OrderedPlan, PermutedPlan, RemappedPlan
from spattn.runtime.reference import pattern_reference
from tests.runtime.test_torch_backend import _close, check_with_reference


def _tensors(B, Hq, Hk, N, D, g, grads=True):
    return (torch.randn(B, Hq, N, D, generator=g).requires_grad_(grads),
            torch.randn(B, Hk, N, D, generator=g).requires_grad_(grads),
            torch.randn(B, Hk, N, D, generator=g).requires_grad_(grads))


def _run(pat, *, B=1, Hq=2, Hk=1, N, D=16, seed=0, order=None, layout=None):
    """A kernel-gather plan of ``pat`` checked against the reference (o, lse, dq, dk, dv)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = _tensors(B, Hq, Hk, N, D, g)
    if layout == "bshd":        # [B, N, H, D] tensors: the rows' stride is H * D
        q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
                   for t in (q, k, v))
    plan = make_plan(pat, q, k, v, order=order, layout_gather="kernel")
    assert isinstance(plan, PermutedPlan) and plan.gather == "kernel"
    o, lse = pat(q, k, v, plan=plan, return_lse=True)
    check_with_reference(o, lse, q, k, v, pat.mask(N, N, num_heads=Hq, batch=B), g)
    return plan


@pytest.mark.interpreter
@pytest.mark.parametrize("args,B,Hq,Hk", [
    (((9, 14), 3, 1, 1, (True, False)), 1, 2, 1),     # 4 x 16 boxes: 192 slots, 66 padding
    (((8, 8), (3, 5), (1, 2), 1, False), 2, 4, 2),
], ids=["B1-Hq2-Hk1-L126-D16-fp32-nb2d-9x14-padded",
        "B2-Hq4-Hk2-L64-D16-fp32-nb2d-8x8-stride-gqa"])
def test_layout_neighbourhood(args, B, Hq, Hk, monkeypatch):
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.neighborhood(*args, backend="triton")
    N = math.prod(pat.grid)
    plan = _run(pat, B=B, Hq=Hq, Hk=Hk, N=N)
    assert isinstance(plan, RemappedPlan)
    if args[0] == (9, 14):
        assert plan.remap.layout.padded_size > N
        assert int((plan.rows.q < 0).sum()) == plan.remap.layout.padded_size - N
    assert "rows through tables" in repr(plan) and "no gathers" in repr(plan)


@pytest.mark.interpreter
def test_layout_dilated_bshd(monkeypatch):
    """Residue classes (``dilated``: slots 0, 4, 8, ...; each class padded from 64 to 128
    slots), q, k, v as transposed ``[B, N, H, D]`` views."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.compile("dilated(8, 4)", backend="triton")
    plan = _run(pat, B=1, Hq=2, Hk=1, N=256, layout="bshd")
    assert isinstance(plan, RemappedPlan)
    assert plan.rows.q[:4].tolist() == [0, 4, 8, 12] and int((plan.rows.q < 0).sum()) == 256


@pytest.mark.interpreter
@pytest.mark.parametrize("per_batch", [False, True], ids=["B2-Hq2-Hk1-L48-D16-fp32-order",
                                                           "B2-Hq2-Hk1-L48-D16-fp32-order-BN"])
def test_ordered(per_batch):
    pat = spattn.neighborhood((6, 8), 3, backend="triton")
    g = torch.Generator().manual_seed(3)
    order = (torch.stack([torch.randperm(48, generator=g) for _ in range(2)]) if per_batch
             else torch.randperm(48, generator=g))
    plan = _run(pat, B=2, N=48, order=order, seed=4)
    assert isinstance(plan, OrderedPlan) and plan.rows.q.shape == order.shape
    assert torch.equal(plan.rows.q.long(), order)


def _count_gathers(monkeypatch):
    calls = []
    real = PermutedPlan._gather

    def counting(self, t, index):
        calls.append(None if t is None else tuple(t.shape))
        return real(self, t, index)
    monkeypatch.setattr(PermutedPlan, "_gather", counting)
    return calls


@pytest.mark.interpreter
@pytest.mark.parametrize("gather", ["copy", "kernel"])
def test_kernel_path_launches_no_gather(gather, monkeypatch):
    """Forward and backward of a layout plan: no gather with ``kernel``; the copy path's
    gathers (counted the same way) show that the count sees them."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    monkeypatch.setenv("SPATTN_LAYOUT_GATHER", gather)
    calls = _count_gathers(monkeypatch)
    pat = spattn.neighborhood((8, 8), 3, backend="triton")
    g = torch.Generator().manual_seed(1)
    q, k, v = _tensors(1, 2, 1, 64, 16, g)
    o = pat(q, k, v)
    o.backward(torch.randn(o.shape, generator=g))
    if gather == "kernel":
        assert calls == []
    else:
        assert len(calls) >= 5        # q, k, v, o, lse in the forward; more in the backward


@pytest.mark.interpreter
def test_lse_gradient_through_row_tables(monkeypatch):
    """A loss on the lse too: the Triton backward's lse-gradient stage reads it by the
    rows' tables (no gathers, no fall-back warning), against float64."""
    import warnings
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.neighborhood((6, 6), 3, backend="triton")
    g = torch.Generator().manual_seed(2)
    q, k, v = _tensors(1, 2, 2, 36, 16, g)
    plan = make_plan(pat, q, k, v, layout_gather="kernel")
    o, lse = pat(q, k, v, plan=plan, return_lse=True)
    do, dl = torch.randn(o.shape, generator=g), torch.randn(lse.shape, generator=g)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="spattn")
        ((o * do).sum() + (lse * dl).sum()).backward()
    stages = [(s.config.rows, s.config.lse_grad) for s in plan.inner._bwd.values()]
    assert ("table", True) in stages and all(rows == "table" for rows, _ in stages)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = pattern_reference(pat, q64, k64, v64)
    ((ro * do.double()).sum() + (rl * dl.double()).sum()).backward()
    for name, a, b in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        _close(name, a.grad, b.grad)


@pytest.mark.interpreter
def test_score_with_table_through_row_tables():
    """The kernels' score code (a relative-position table, its gradient) with rows read
    through a random permutation's tables: o, lse, dq, dk, dv and the table's gradient in
    the caller's order equal the reference over the permuted tokens, permuted back."""
    pat = spattn.compile("abs(q // 8 - k // 8) <= 2 & abs(q % 8 - k % 8) <= 2",
                         score="s + rpb[h, clamp(q // 8 - k // 8, -2, 2) + 2, "
                               "clamp(q % 8 - k % 8, -2, 2) + 2]", backend="triton")
    B, H, N, D = 1, 2, 48, 16
    g = torch.Generator().manual_seed(6)
    q, k, v = _tensors(B, H, H, N, D, g, grads=False)
    rpb = torch.randn(H, 5, 5, generator=g)
    perm = torch.randperm(N, generator=g)
    rows = TB.RowTables.of(perm, perm, N, N)
    call = Call.of(pat, q, k, scale=D ** -0.5, q_offset=None, inputs={}, tables={"rpb": rpb})
    fwd = TB.build_fwd(call, q, k, v, rows=rows)
    o, lse = TB.run_fwd(fwd, q, k, v, {"rpb": rpb})
    do = torch.randn(o.shape, generator=g)
    bwd = TB.build_bwd(call, q, k, v, o, do, rows=rows)
    drpb = torch.zeros_like(rpb)
    dq, dk, dv = TB.run_bwd(bwd, q, k, v, o, lse, do, {"rpb": rpb}, {"rpb": drpb})
    q64, k64, v64, t64 = (t.double()[..., perm, :] if t.dim() == 4 else t.double()
                          for t in (q, k, v, rpb))
    for t in (q64, k64, v64, t64):
        t.requires_grad_()
    ro, rl = pattern_reference(pat, q64, k64, v64, rpb=t64)
    (ro * do[..., perm, :].double()).sum().backward()
    inv = torch.argsort(perm)
    _close("o", o, ro[..., inv, :])
    _close("lse", lse, rl[..., inv])
    for name, a, b in (("dq", dq, q64), ("dk", dk, k64), ("dv", dv, v64)):
        _close(name, a, b.grad[..., inv, :])
    _close("drpb", drpb, t64.grad)


def test_generated_text_reads_row_tables():
    pat = spattn.neighborhood((8, 8), 3)
    fwd = pat.kernel_source("fwd", strategy="table", rows="table", tma=True)
    assert "Q_ROWS, K_ROWS, stride_qr_b, stride_kr_b, Nq," in fwd
    assert "tl.load(p_qr + o_m, mask=m_m, other=-1)" in fwd
    assert "tl.load(K_ROWS + o_n, mask=o_n < Lk, other=0)" in fwd
    assert "LSE + i_bh.to(tl.int64) * Nq + o_rq" in fwd
    assert ".load([" not in fwd                 # no TMA through tables
    bwd = pat.kernel_source("bwd", strategy="table", rows="table")
    assert "tl.load(Q_ROWS + o_m, mask=o_m < Lq, other=0)" in bwd      # dK/dV's query rows
    assert "o_rk[:, None] * stride_dkn" in bwd and "o_rq[:, None] * stride_dqm" in bwd
    plain = pat.kernel_source("fwd", strategy="table")
    assert "Q_ROWS" not in plain and "o_rq" not in plain


def test_setting_and_option(monkeypatch):
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    monkeypatch.setenv("SPATTN_LAYOUT_GATHER", "sideways")
    pat = spattn.neighborhood((8, 8), 3, backend="torch")
    q, k, v = _tensors(1, 1, 1, 64, 16, torch.Generator().manual_seed(0), grads=False)
    with pytest.raises(SpattnConfigError, match="SPATTN_LAYOUT_GATHER='sideways'"):
        pat(q, k, v)
    monkeypatch.setenv("SPATTN_LAYOUT_GATHER", "kernel")
    with pytest.raises(SpattnConfigError, match="layout_gather='rows'"):
        make_plan(pat, q, k, v, layout_gather="rows")
    plan = pat.plan(q, k, v)            # the torch backend keeps its gathers
    assert isinstance(plan, RemappedPlan) and plan.gather == "copy"


def test_cost_model_drops_the_gathers(monkeypatch):
    """With row tables a layout's predicted cost has no gather term (its kernel priced
    ``rows_factor`` dearer instead), and explain() says so."""
    ir = spattn.compile("dilated(256, 4)").ir
    copy = LY.choose(ir, 4096, 4096, 0, force=True, target="cuda")
    kernel = LY.choose(ir, 4096, 4096, 0, force=True, target="cuda", gathers=False)
    assert kernel.layout == copy.layout and kernel.cost_sequence == copy.cost_sequence
    gather = COSTS["cuda"]["gather_token"]
    assert copy.cost_layout - kernel.cost_layout == pytest.approx(
        gather * kernel.layout.padded_size)
    pat = spattn.compile("dilated(256, 4)")
    monkeypatch.setenv("SPATTN_LAYOUT_GATHER", "kernel")
    rep = pat.explain(4096)
    assert rep.layout["gather"] == "kernel" and "no gathers" in str(rep)
    assert rep.layout["cost_layout"] == pytest.approx(
        kernel.cost_layout * (1 + COSTS["cuda"]["rows_factor"]))
    monkeypatch.setenv("SPATTN_LAYOUT_GATHER", "copy")
    assert "with its gathers" in str(pat.explain(4096))


@pytest.mark.interpreter
@pytest.mark.parametrize("opts", [{"loop": "fused", "tables": "csr", "int64": True},
                                  {"loop": "persistent"}],
                         ids=["B2-Hq2-Hk1-L126-D16-fp32-fused-csr-int64",
                              "B2-Hq2-Hk1-L126-D16-fp32-persistent-fwd"])
def test_kernel_variants(opts, monkeypatch):
    """The loop variants, CSR lists and 64-bit kernels address rows through the tables
    too (the persistent loop is forward only)."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.neighborhood((9, 14), 3, is_causal=(True, False), backend="triton")
    grads = opts.get("loop") != "persistent"
    g = torch.Generator().manual_seed(8)
    q, k, v = _tensors(2, 2, 1, 126, 16, g, grads=grads)
    plan = make_plan(pat, q, k, v, layout_gather="kernel", **opts)
    cfg = plan.forward_stage.config
    assert cfg.rows == "table" and cfg.loop == opts["loop"]
    assert cfg.int64 == opts.get("int64", False)
    o, lse = pat(q, k, v, plan=plan, return_lse=True)
    check_with_reference(o, lse, q, k, v, pat.mask(126, 126), g, grads)


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_kernel_source_of_a_call_in_a_layout(kind, monkeypatch):
    """``kernel_source(q, k, v)`` of a call that runs in a layout: the inner plan's module,
    with the row tables under ``kernel`` (the backward's stages are the inner plan's)."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    monkeypatch.setenv("SPATTN_LAYOUT_GATHER", "kernel")
    pat = spattn.neighborhood((8, 8), 3, backend="triton")
    q, k, v = _tensors(1, 1, 1, 64, 16, torch.Generator().manual_seed(0), grads=False)
    text = pat.kernel_source(q, k, v, kind=kind)
    assert "neighborhood_layout" in text and "Q_ROWS" in text
