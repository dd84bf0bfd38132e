"""The atomic-dQ backward (``dq="atomic"``, ``SPATTN_BWD_DQ=atomic``) under
TRITON_INTERPRET=1: the dK/dV kernel adds dS K of every tile into an fp32 accumulator, the
row-statistics kernel writes delta and lse first; dq, dk, dv against float64 autograd
through the dense reference, every element, fresh random inputs.

Both strategies, split and fused loops, TMA descriptors, 64-bit kernels, GQA (each query
head adds into its own rows), ragged and unequal lengths with an offset, fully masked rows
(dq = 0, no NaN), row tables of a token layout, scores with a derivative (ALiBi, softcap)
through the public API, fp16 (the scaled cast of the accumulator), a score table (falls
back to the dQ kernel), and the rendered module.
"""
import pytest
import torch

import spattn
from spattn.runtime import triton_backend as tb
from spattn.runtime.api import make_plan
from spattn.runtime.plan import PermutedPlan

from tests.codegen.test_triton_bwd import _spy_configs, run_bwd
from tests.helpers.kernels import doc_ids, window_cf, window_sink_cf
from tests.runtime.test_scores import CASES as SCORE_CASES, check as check_score
from tests.runtime.test_torch_backend import check_with_reference

pytestmark = pytest.mark.interpreter

ATOMIC = dict(dq="atomic")


def _atomic_used(seen, n=1):
    cfgs = [c for kind, c in seen if kind == "bwd"]
    assert cfgs and all(c.dq == "atomic" for c in cfgs[-n:]), cfgs
    return cfgs[-1]


CASES = [
    # (id, source, inputs, closed form, kwargs, options)
    ("causal", "causal", None, None, dict(Lq=45), {}),
    ("window", "causal & window(13)", None, lambda: window_cf(13), dict(Lq=45), {}),
    ("documents", "causal & same(doc)", lambda g, *a: {"doc": doc_ids(45, 4, g)}, None,
     dict(Lq=45), {}),
    ("gqa4-2", "causal & (window(13) | sink(4))", None, lambda: window_sink_cf(13, 4),
     dict(Bn=2, Hq=4, Hk=2, Lq=37), {}),
    ("Lq30-Lk55", "causal & window(13)", None, lambda: window_cf(13),
     dict(Lq=30, Lk=55), {}),
    ("Lq55-Lk30-off-7-D80", "causal & window(13)", None, lambda: window_cf(13),
     dict(Lq=55, Lk=30, q_offset=-7, D=80), {}),
    ("window-fused", "causal & window(13)", None, lambda: window_cf(13), dict(Lq=45),
     dict(loop="fused")),
    ("documents-fused-gqa", "causal & same(doc)", lambda g, *a: {"doc": doc_ids(45, 4, g)},
     None, dict(Bn=2, Hq=4, Hk=2), dict(loop="fused")),
    ("window-tma", "causal & window(13)", None, lambda: window_cf(13), dict(Lq=45),
     dict(tma=True)),
    ("window-int64", "causal & window(13)", None, lambda: window_cf(13), dict(Lq=45),
     dict(int64=True)),
    ("strided-layout", "causal & window(13)", None, lambda: window_cf(13),
     dict(Bn=2, layout="blhd"), {}),
]

# (strategy per case: the closed form where it has one, the table for runtime inputs)
PARAMS = [(c, s) for c in CASES for s in ("ranges", "table")
          if not (s == "ranges" and c[2] is not None)
          and not (c[0] in ("window-int64", "strided-layout", "Lq30-Lk55") and s == "table")]


def _id(case, strategy):
    name, _, _, _, kw, _ = case
    return (f"B{kw.get('Bn', 1)}-H{kw.get('Hq', 2)}-L{kw.get('Lq', 45)}-D{kw.get('D', 32)}"
            f"-fp32-{name}-{strategy}")


@pytest.mark.parametrize("case,strategy", PARAMS, ids=[_id(c, s) for c, s in PARAMS])
def test_gradients(case, strategy, monkeypatch):
    name, src, inputs_fn, cf_factory, kw, opts = case
    seen = _spy_configs(monkeypatch)
    run_bwd(src, strategy=strategy, inputs_fn=inputs_fn, cf_factory=cf_factory,
            seed=sum(map(ord, name)) + 3, bwd_opts=dict(ATOMIC, **opts), **kw)
    cfg = _atomic_used(seen)
    assert cfg.loop == opts.get("loop", "split") and cfg.tma == opts.get("tma", False)
    assert cfg.int64 == opts.get("int64", False)


@pytest.mark.parametrize("strategy", ["ranges", "table"])
def test_fully_masked_rows(strategy, monkeypatch):
    """Rows that see no key get dq = 0 exactly (their p is 0: nothing is added), no NaN."""
    seen = _spy_configs(monkeypatch)
    dq, dk, dv, m = run_bwd("causal & k >= 20", strategy=strategy, Lq=50, seed=19,
                            bwd_opts=ATOMIC)
    _atomic_used(seen)
    dead = ~m.any(-1)
    assert dead.any() and torch.isfinite(dq).all()
    assert torch.count_nonzero(dq[dead.expand(dq.shape[:3])]) == 0


def test_fp16_scaled_cast(monkeypatch):
    """16-bit inputs: the accumulator is scaled and cast to fp16 in one pass."""
    monkeypatch.setenv("SPATTN_BWD_DQ", "atomic")
    seen = _spy_configs(monkeypatch)
    pat = spattn.compile("causal & window(13)", backend="triton")
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 40, 32, generator=g).half().requires_grad_() for _ in range(3))
    o = pat(q, k, v)
    do = torch.randn(o.shape, generator=g).half()
    got = torch.autograd.grad(o, (q, k, v), do)
    _atomic_used(seen)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro = spattn.runtime.reference.pattern_reference(pat, q64, k64, v64)[0]
    want = torch.autograd.grad(ro, (q64, k64, v64), do.double())
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == torch.float16, name
        torch.testing.assert_close(a.double(), b, atol=2e-2, rtol=2e-2, msg=f"d{name}")


@pytest.mark.parametrize("case", [SCORE_CASES[0], SCORE_CASES[2]], ids=["alibi", "softcap"])
def test_scores_with_a_derivative(case, monkeypatch):
    """ALiBi (d score / d s = 1) and softcap (1 - tanh^2): dS already holds the derivative
    when dK/dV forms dS K."""
    monkeypatch.setenv("SPATTN_BWD_DQ", "atomic")
    seen = _spy_configs(monkeypatch)
    check_score(case, "triton", B=1, Lq=40, Lk=40)
    _atomic_used(seen)


def test_score_table_keeps_the_dq_kernel(monkeypatch):
    """A pattern with a float score table keeps the dQ kernel (it accumulates the table's
    gradient there), whatever SPATTN_BWD_DQ says."""
    monkeypatch.setenv("SPATTN_BWD_DQ", "atomic")
    seen = _spy_configs(monkeypatch)
    check_score(SCORE_CASES[5], "triton", B=1, Lq=40, Lk=40)
    assert [c.dq for kind, c in seen if kind == "bwd"] and \
        all(c.dq == "kernel" for kind, c in seen if kind == "bwd")


def test_row_tables(monkeypatch):
    """A token layout's plan whose kernels address rows through row tables (padding slots
    add nothing): dq in the caller's order."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.neighborhood((9, 14), 3, is_causal=(True, False), backend="triton")
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 4, 126, 16, generator=g).requires_grad_()
    k, v = (torch.randn(1, 2, 126, 16, generator=g).requires_grad_() for _ in range(2))
    plan = make_plan(pat, q, k, v, layout_gather="kernel", dq="atomic")
    assert isinstance(plan, PermutedPlan) and plan.gather == "kernel"
    o, lse = pat(q, k, v, plan=plan, return_lse=True)
    check_with_reference(o, lse, q, k, v, pat.mask(126, 126), g)
    stages = list(plan.inner._bwd.values()) if hasattr(plan, "inner") else list(plan._bwd.values())
    assert stages and all(s.config.dq == "atomic" and s.config.rows == "table" for s in stages)
    assert "dQ atomic" in repr(plan)


def test_rendered_module():
    """The atomic module: the dK/dV kernel's atomic add and the row-statistics kernel, no
    dQ kernel; the default module is unchanged by the flag's existence (see
    test_generated_examples)."""
    pat = spattn.compile("causal")
    text = pat.kernel_source(kind="bwd", head_dim=64, dtype="bf16", dq="atomic")
    assert "tl.atomic_add(DQ + o_m[:, None] * stride_dqm" in text
    assert "ROWSTATS = attn_bwd_rowstats_" in text and "DQ = attn_bwd_dq_" not in text
    assert "def attn_bwd_dq_" not in text
    default = pat.kernel_source(kind="bwd", head_dim=64, dtype="bf16")
    assert "atomic_add" not in default and "DQ = attn_bwd_dq_" in default
