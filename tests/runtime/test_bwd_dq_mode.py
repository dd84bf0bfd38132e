"""How a backward stage computes dQ (``codegen.config.BWD_DQ``): the option ``dq``, the
setting ``SPATTN_BWD_DQ`` (default "kernel"), the fall-backs (deterministic algorithms, a
pattern with float score tables), the kernel cache and tuning keys, and plans that see
``torch.use_deterministic_algorithms`` switched on after their first backward."""
import pytest
import torch

import spattn
from spattn.codegen.config import KernelConfig, pick
from spattn.dsl.errors import SpattnConfigError
from spattn.runtime import cache, settings, triton_backend as tb, tune
from spattn.runtime.plan import Call


@pytest.fixture
def deterministic():
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


def _raw(**env):
    return tuple(env.get(n) for n in settings.VARIABLES)


def test_setting_parsed_and_checked():
    s = settings.parse(_raw(SPATTN_BWD_DQ=" Atomic "))
    assert s.bwd_dq == "atomic" and s.overrides("bwd")["dq"] == "atomic"
    assert "dq" not in s.overrides("fwd")
    assert not s.tiles_set("bwd")            # (autotuning still picks the tiles)
    assert settings.parse(_raw()).bwd_dq is None
    with pytest.raises(SpattnConfigError, match="SPATTN_BWD_DQ='atomics'.*'kernel', 'atomic'"):
        settings.parse(_raw(SPATTN_BWD_DQ="atomics"))


def test_config_and_cache_key():
    """The default keeps the keys of every existing configuration (no ``dq`` field in the
    key while it is "kernel"); atomic is a key of its own; a table score keeps "kernel"."""
    pat = spattn.compile("causal")
    c = pick(pat, "bwd", head_dim=64, dtype="bf16")
    assert c.dq == "kernel" and "dq" not in c.as_dict()
    a = pick(pat, "bwd", head_dim=64, dtype="bf16", dq="atomic")
    assert a.dq == "atomic" and a.as_dict()["dq"] == "atomic"
    assert pick(pat, "bwd", head_dim=64, overrides={"dq": "atomic"}).dq == "atomic"
    assert pick(pat, "bwd", head_dim=64, dq="kernel", overrides={"dq": "atomic"}).dq == "kernel"
    with pytest.raises(SpattnConfigError, match="dq='dq'"):
        pick(pat, "bwd", head_dim=64, dq="dq")
    k1 = cache.resolve(pat, "bwd", head_dim=64, dtype="bf16")[2]
    k2 = cache.resolve(pat, "bwd", head_dim=64, dtype="bf16", dq="atomic")[2]
    assert k1 != k2
    scored = spattn.compile("causal", score="s + bias[h]")
    assert pick(scored, "bwd", head_dim=64, dq="atomic").dq == "kernel"
    assert KernelConfig("ranges", 16, 16, 16, 4, 1, "fp32").dq == "kernel"


def test_tune_key_field():
    pat = spattn.compile("causal")
    kw = dict(head_dim=64, dtype=torch.bfloat16, device="cuda", Lq=4096, Lk=4096,
              strategy="ranges")
    base = tune.key_fields(pat, "bwd", **kw)
    assert "bwd_dq" not in base and tune.key_fields(pat, "bwd", dq="kernel", **kw) == base
    atomic = tune.key_fields(pat, "bwd", dq="atomic", **kw)
    assert atomic == {**base, "bwd_dq": "atomic"}
    assert tune.tune_key(atomic) != tune.tune_key(base)


def _call(pat, L=40, H=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, H, L, D, generator=g) for _ in range(3))
    return Call.of(pat, q, k, scale=D ** -0.5, q_offset=None, inputs={}), q, k, v


@pytest.mark.interpreter
def test_option_and_setting_reach_the_stage(monkeypatch):
    pat = spattn.compile("causal & window(9)")
    call, q, k, v = _call(pat)
    o, do = torch.randn_like(q), torch.randn_like(q)
    assert tb.build_bwd(call, q, k, v, o, do).config.dq == "kernel"
    assert tb.build_bwd(call, q, k, v, o, do, {"dq": "atomic"}).config.dq == "atomic"
    monkeypatch.setenv("SPATTN_BWD_DQ", "atomic")
    call, *_ = _call(pat)
    stage = tb.build_bwd(call, q, k, v, o, do)
    assert stage.config.dq == "atomic" and "dQ atomic" in repr(stage)
    assert tb.build_bwd(call, q, k, v, o, do, {"dq": "kernel"}).config.dq == "kernel"


@pytest.mark.interpreter
def test_deterministic_mode_falls_back(monkeypatch, deterministic):
    """Under torch.use_deterministic_algorithms(True) the stage uses the dQ kernel even when
    asked for atomics, and gives the same gradients twice, bit for bit; an atomic stage
    built before is refused, not run."""
    monkeypatch.setenv("SPATTN_BWD_DQ", "atomic")
    pat = spattn.compile("causal & window(9)")
    call, q, k, v = _call(pat, seed=1)
    o, lse = tb.run_fwd(tb.build_fwd(call, q, k, v), q, k, v)
    do = torch.randn_like(o)
    stage = tb.build_bwd(call, q, k, v, o, do, {"dq": "atomic"})
    assert stage.config.dq == "kernel"
    a, b = (tb.run_bwd(stage, q, k, v, o, lse, do) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    torch.use_deterministic_algorithms(False)
    atomic = tb.build_bwd(call, q, k, v, o, do, {"dq": "atomic"})
    assert atomic.config.dq == "atomic"
    torch.use_deterministic_algorithms(True)
    with pytest.raises(SpattnConfigError, match="not deterministic"):
        tb.run_bwd(atomic, q, k, v, o, lse, do)


@pytest.mark.interpreter
def test_plan_builds_a_deterministic_stage_when_switched_on(monkeypatch):
    """A plan's backward stages are keyed by the deterministic switch too: the atomic stage
    of its first backward is not reused once deterministic algorithms are on."""
    monkeypatch.setenv("SPATTN_BWD_DQ", "atomic")
    pat = spattn.compile("causal & window(9)", backend="triton")
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g).requires_grad_() for _ in range(3))
    plan = pat.plan(q, k, v)
    do = torch.randn(1, 2, 40, 16, generator=g)
    first = torch.autograd.grad(pat(q, k, v, plan=plan), (q, k, v), do)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        second = torch.autograd.grad(pat(q, k, v, plan=plan), (q, k, v), do)
    finally:
        torch.use_deterministic_algorithms(was)
    modes = sorted(s.config.dq for s in plan._bwd.values())
    assert modes == ["atomic", "kernel"]
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("score", [None, "alibi(0.25)"], ids=["mask", "alibi"])
def test_call_deterministic_keeps_the_dq_kernel(monkeypatch, score):
    """``pat(q, k, v, deterministic=True)``: dQ from the dQ kernel under SPATTN_BWD_DQ=atomic
    (a stage of its own in the plan); without it the same plan's backward is atomic."""
    monkeypatch.setenv("SPATTN_BWD_DQ", "atomic")
    pat = spattn.compile("causal & window(9)", score=score, backend="triton")
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g).requires_grad_() for _ in range(3))
    do = torch.randn(1, 2, 40, 16, generator=g)
    plan = pat.plan(q, k, v, backward=False)
    a = torch.autograd.grad(pat(q, k, v, plan=plan, deterministic=True), (q, k, v), do)
    assert [s.config.dq for s in plan._bwd.values()] == ["kernel"]
    b = torch.autograd.grad(pat(q, k, v, plan=plan), (q, k, v), do)
    assert sorted(s.config.dq for s in plan._bwd.values()) == ["atomic", "kernel"]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("dq", ["kernel", "atomic"])
def test_dq_stage_grid_is_one_dimension_past_65535_heads(dq):
    """B * H = 70,000 (batch times query heads) passes what a second CUDA grid dimension
    takes (65,535): the dQ kernel's and the row-statistics kernel's grids are one
    dimension, with a program per (query tile, batch, head)."""
    pat = spattn.compile("causal & window(9)")
    q = torch.randn(700, 100, 16, 16)
    call = Call.of(pat, q, q, scale=0.25, q_offset=None, inputs={})
    stage = tb.build_bwd(call, q, q, q, q, q, {"dq": dq})
    assert stage.config.dq == dq
    assert stage.grid_q == (-(-16 // stage.config.block_m2) * 70_000,)
