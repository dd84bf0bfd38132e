"""Generated backward kernels under TRITON_INTERPRET=1: dq, dk, dv vs float64 autograd.

The reference is float64 autograd through the dense reference on the pattern's
mask; the kernels get the forward's own o and lse.  Both strategies, runtime
inputs, per-head params, GQA (dk/dv summed over the group inside one program),
Lq != Lk, fully masked rows (zero gradients, no NaN), ragged lengths, D = 80,
non-contiguous q/k/v/dO.  Relative error < 1e-3 in fp32, every element.
dK/dV and dQ have their own tile shapes (BLOCK_M1 x BLOCK_N1, BLOCK_M2 x BLOCK_N2):
distinct shapes are tested through explicit options and the SPATTN_BWD_* environment.
"""

import pytest

from spattn.runtime.plan import PLANS
import torch

from spattn.runtime import triton_backend as tb

from tests.helpers.kernels import (analysis_cf, chunked_cf, check_close, compile_pattern,
                              doc_ids, global_local_cf, rand_qkv, reference, trivial_cf,
                              window_cf, window_sink_cf)

pytestmark = pytest.mark.interpreter

TOL = 1e-3
STRATEGIES = ("ranges", "table")


def run_bwd(src, *, strategy, Bn=1, Hq=2, Hk=None, Lq=45, Lk=None, D=32, bm=16, bn=32,
            inputs_fn=None, cf_factory=None, q_offset=None, seed=0, layout="bhld", tol=TOL,
            bwd_opts=None):
    Hk = Hk or Hq
    Lk = Lk or Lq
    pattern = compile_pattern(src)
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = inputs_fn(gen, Bn, Hq, Lq, Lk) if inputs_fn else {}
    q, k, v = rand_qkv(Bn, Hq, Hk, Lq, Lk, D, seed=seed, layout=layout)
    off = Lk - Lq if q_offset is None else q_offset
    scale = D ** -0.5
    cf = None
    if strategy == "ranges":
        cf = cf_factory() if cf_factory else (analysis_cf(pattern) or trivial_cf())
    opts = dict(strategy=strategy, block_m=bm, block_n=bn, closed_form=cf)
    o, lse = tb.fwd(pattern, q, k, v, scale=scale, q_offset=off, inputs=inputs, **opts)
    do = torch.randn(Bn, Lq, Hq, D, generator=gen).transpose(1, 2) if layout == "blhd" \
        else torch.randn(Bn, Hq, Lq, D, generator=gen)
    dq, dk, dv = tb.bwd(pattern, q, k, v, o, lse, do, scale=scale, q_offset=off, inputs=inputs,
                        **dict(opts, **(bwd_opts or {})))
    ref_o, _, (qd, kd, vd), m = reference(pattern, q, k, v, scale=scale, q_offset=off,
                                          inputs=inputs, grad=True)
    ref_o.backward(do.double())
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    check_close("dq", dq, qd.grad, tol)
    check_close("dk", dk, kd.grad, tol)
    check_close("dv", dv, vd.grad, tol)
    return dq, dk, dv, m


CASES = [
    # (id, source, inputs, closed form, kwargs)
    ("causal", "causal", None, lambda: window_cf(10 ** 5), {}),
    ("window_sink", "causal & (window(13) | sink(4))", None, lambda: window_sink_cf(13, 4), {}),
    ("global_local", "global_tokens(4) | local(3, 5)", None, lambda: global_local_cf(4, 3, 5), {}),
    ("chunked", "chunked(12)", None, lambda: chunked_cf(12), {}),
    ("dilated", "dilated(5, 3)", None, None, {}),
    ("power2", "power2(4)", None, None, {}),
    ("per_head", "causal & q - k < [6, 20][h]", None, None, {}),
    ("documents", "causal & same(doc)", lambda g, *a: {"doc": doc_ids(45, 4, g)}, None, {}),
    ("gqa", "causal & (window(13) | sink(4))", None, lambda: window_sink_cf(13, 4),
     dict(Bn=2, Hq=4, Hk=2)),
    ("mqa", "causal & window(9)", None, lambda: window_cf(9), dict(Hq=3, Hk=1)),
    ("Lq30-Lk55", "causal & (window(13) | sink(4))", None, lambda: window_sink_cf(13, 4),
     dict(Lq=30, Lk=55)),
    ("Lq55-Lk30-off-7", "causal & window(13)", None, lambda: window_cf(13),
     dict(Lq=55, Lk=30, q_offset=-7)),
    ("D80", "causal & window(13)", None, lambda: window_cf(13), dict(D=80, Lq=33)),
    ("strided-layout", "causal & window(13)", None, lambda: window_cf(13),
     dict(Bn=2, layout="blhd")),
]


def _id(case):
    name, _, _, _, kw = case
    return (f"B{kw.get('Bn', 1)}-H{kw.get('Hq', 2)}-L{kw.get('Lq', 45)}-D{kw.get('D', 32)}"
            f"-fp32-{name}")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name,src,inputs_fn,cf_factory,kw", CASES, ids=[_id(c) for c in CASES])
def test_gradients(name, src, inputs_fn, cf_factory, kw, strategy):
    run_bwd(src, strategy=strategy, inputs_fn=inputs_fn, cf_factory=cf_factory,
            seed=sum(map(ord, name)), **kw)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fully_masked_rows_zero_grad(strategy):
    dq, dk, dv, m = run_bwd("causal & k >= 20", strategy=strategy, Lq=50, seed=17)
    dead = ~m.any(-1)                                  # [B, H, Lq]
    assert dead.any()
    assert torch.count_nonzero(dq[dead.expand(dq.shape[:3])]) == 0
    # keys no query sees get zero dk/dv
    unseen = ~m.any(-2)                                 # [B, H, Lk]
    assert torch.count_nonzero(dk[unseen.expand(dk.shape[:3])]) == 0
    assert torch.count_nonzero(dv[unseen.expand(dv.shape[:3])]) == 0


def test_deterministic():
    """dk/dv accumulate in one program per key tile: repeated calls agree bit for bit."""
    pattern = compile_pattern("causal & same(doc)")
    gen = torch.Generator().manual_seed(3)
    inputs = {"doc": doc_ids(40, 3, gen)}
    q, k, v = rand_qkv(1, 4, 2, 40, 40, 32, seed=3)
    o, lse = tb.fwd(pattern, q, k, v, scale=0.2, q_offset=0, inputs=inputs, strategy="table",
                    block_m=16, block_n=16)
    do = torch.randn_like(o)
    a = tb.bwd(pattern, q, k, v, o, lse, do, scale=0.2, q_offset=0, inputs=inputs,
               strategy="table", block_m=16, block_n=16)
    b = tb.bwd(pattern, q, k, v, o, lse, do, scale=0.2, q_offset=0, inputs=inputs,
               strategy="table", block_m=16, block_n=16)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ------------------------------------------------ distinct dK/dV and dQ tile shapes

SHAPE_CASES = [
    # (id, source, inputs, closed form, kwargs): ragged lengths everywhere
    ("window_sink", "causal & (window(13) | sink(4))", None, lambda: window_sink_cf(13, 4), {}),
    ("Lq30-Lk55", "causal & (window(13) | sink(4))", None, lambda: window_sink_cf(13, 4),
     dict(Lq=30, Lk=55)),
    ("Lq55-Lk30-off-7", "causal & window(13)", None, lambda: window_cf(13),
     dict(Lq=55, Lk=30, q_offset=-7)),
    ("gqa-documents", "causal & same(doc)", lambda g, *a: {"doc": doc_ids(45, 4, g)}, None,
     dict(Bn=2, Hq=4, Hk=2)),
    ("global_local-D80", "global_tokens(4) | local(3, 5)", None, lambda: global_local_cf(4, 3, 5),
     dict(D=80, Lq=41)),
    ("masked-rows", "causal & k >= 20", None, None, dict(Lq=50)),
]

ENV_SHAPE = {"SPATTN_BWD_BLOCK_M1": "16", "SPATTN_BWD_BLOCK_N1": "32",
             "SPATTN_BWD_BLOCK_M2": "32", "SPATTN_BWD_BLOCK_N2": "16"}


def _spy_configs(monkeypatch):
    """Record the KernelConfig of every kernel module the launchers load."""
    seen = []
    load = tb._cache.load_with_form

    def spy(pattern, kind="fwd", **options):
        mod, cfg, cf = load(pattern, kind, **options)
        seen.append((kind, cfg))
        return mod, cfg, cf
    monkeypatch.setattr(tb._cache, "load_with_form", spy)
    return seen


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name,src,inputs_fn,cf_factory,kw", SHAPE_CASES,
                         ids=[c[0] for c in SHAPE_CASES])
def test_distinct_tile_shapes_env(monkeypatch, name, src, inputs_fn, cf_factory, kw, strategy):
    """SPATTN_BWD_BLOCK_M1=16, N1=32, M2=32, N2=16: tables / ranges per kernel shape."""
    for var, val in ENV_SHAPE.items():
        monkeypatch.setenv(var, val)
    seen = _spy_configs(monkeypatch)
    run_bwd(src, strategy=strategy, bm=None, bn=None, inputs_fn=inputs_fn, cf_factory=cf_factory,
            seed=sum(map(ord, name)) + 5, **kw)
    cfg = [c for kind, c in seen if kind == "bwd"][-1]
    assert (cfg.block_m, cfg.block_n, cfg.block_m2, cfg.block_n2) == (16, 32, 32, 16)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("tiles", [(32, 16, 16, 64), (16, 64, 64, 32)], ids=str)
def test_distinct_tile_shapes_options(monkeypatch, tiles, strategy):
    """Explicit block_m1/n1/m2/n2 beat the environment; Lq != Lk, ragged, GQA."""
    for var, val in ENV_SHAPE.items():
        monkeypatch.setenv(var, val)
    seen = _spy_configs(monkeypatch)
    m1, n1, m2, n2 = tiles
    run_bwd("causal & (window(13) | sink(4))", strategy=strategy, Bn=1, Hq=4, Hk=2, Lq=37, Lk=70,
            bm=None, bn=None, cf_factory=lambda: window_sink_cf(13, 4), seed=11,
            bwd_opts=dict(block_m1=m1, block_n1=n1, block_m2=m2, block_n2=n2))
    cfg = [c for kind, c in seen if kind == "bwd"][-1]
    assert (cfg.block_m, cfg.block_n, cfg.block_m2, cfg.block_n2) == tiles


@pytest.mark.parametrize("loop", ["split", "fused"])
def test_per_head_tables_gqa(monkeypatch, loop):
    """Per-head tile classes with GQA: the dK/dV tables are per query head and a key head's
    work (its grid order) sums that of its query heads."""
    monkeypatch.setenv("SPATTN_BWD_LOOP", loop)
    run_bwd("causal & (q - k < 7 | k % H == h)", strategy="table", Bn=2, Hq=4, Hk=2, Lq=45,
            seed=21)


def test_env_change_picks_new_config(monkeypatch):
    """The per-process config memo sees a changed SPATTN_BWD_* environment."""
    seen = _spy_configs(monkeypatch)
    for m1 in ("16", "32"):
        monkeypatch.setenv("SPATTN_BWD_BLOCK_M1", m1)
        run_bwd("causal & window(9)", strategy="table", Lq=40, bm=None, bn=None, seed=2)
        assert [c for kind, c in seen if kind == "bwd"][-1].block_m == int(m1)


# ------------------------------------------ fused backward loops (SPATTN_BWD_LOOP=fused)

@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name,src,inputs_fn,cf_factory,kw", CASES, ids=[_id(c) for c in CASES])
def test_gradients_fused(monkeypatch, name, src, inputs_fn, cf_factory, kw, strategy):
    """dK/dV and dQ each run an interval piece (ranges) or a span (table) as one loop with a
    per-tile branch around the predicate; the table's CSR lists keep their two loops."""
    import pathlib
    from spattn.runtime import cache
    monkeypatch.setenv("SPATTN_BWD_LOOP", "fused")
    PLANS.clear()
    cache.clear_memory()
    seen = _spy_configs(monkeypatch)
    try:
        run_bwd(src, strategy=strategy, inputs_fn=inputs_fn, cf_factory=cf_factory,
                seed=sum(map(ord, name)) + 9, **kw)
        bwd = [pathlib.Path(p).read_text() for p in cache._modules if "attn_bwd" in p]
    finally:
        cache.clear_memory()
    assert [c.loop for kind, c in seen if kind == "bwd"] == ["fused"]
    assert bwd and all("= _dkdv_fused_" in s and "= _dq_fused_" in s for s in bwd)
