"""Plans (``runtime/plan.py``): built once, reused, inspectable; the cache behind calls
without one answers exactly what building again would."""
import pytest
import torch

import spattn
from spattn import SpattnInputError, SpattnParamError
from spattn.runtime import tune
from spattn.runtime.plan import PLANS, PlanCache
from spattn.runtime.reference import attention_reference

pytestmark = pytest.mark.interpreter

CFG_A = {"block_m": 16, "block_n": 32, "num_warps": 4, "num_stages": 1, "loop": "split"}
CFG_B = {"block_m": 32, "block_n": 16, "num_warps": 4, "num_stages": 1, "loop": "split"}


def qkv(L=40, H=2, D=16, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, H, L, D, generator=g, **kw) for _ in range(3))


def check(pat, out, q, k, v, **inputs):
    L, H = q.shape[2], q.shape[1]
    ref, _ = attention_reference(q.double(), k.double(), v.double(),
                                 pat.mask(L, k.shape[2], num_heads=H, **inputs))
    assert torch.allclose(out.double(), ref, atol=1e-4)


# --------------------------------------------------------------- explicit plans

@pytest.mark.parametrize("src", ["causal & window(9)", "causal & same(doc)"],
                         ids=["ranges", "table"])
def test_a_reused_plan_gives_the_same_answer(src):
    pat = spattn.compile(src, backend="triton")
    inputs = {"doc": torch.arange(40) // 11} if "doc" in src else {}
    q, k, v = qkv()
    plan = pat.plan(q, k, v, **inputs)
    first = pat(q, k, v, plan=plan)
    check(pat, first, q, k, v, **inputs)
    q2, k2, v2 = qkv(seed=1)                         # new values, the same layout
    check(pat, pat(q2, k2, v2, plan=plan), q2, k2, v2, **inputs)
    assert torch.equal(pat(q, k, v, plan=plan), first)


def test_a_plan_trains():
    pat = spattn.compile("causal & window(9)", backend="triton")
    q, k, v = (t.requires_grad_() for t in qkv())
    plan = pat.plan(q, k, v)                         # requires grad: backward built now
    assert "backward: bwd" in repr(plan)
    pat(q, k, v, plan=plan).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    pat(q, k, v).sum().backward()                    # without a plan: the same gradients
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad)


def test_repr_says_what_a_plan_holds():
    pat = spattn.compile("causal & same(doc)", backend="triton")
    plan = pat.plan(*qkv(), doc=torch.arange(40) // 11, backward=False)
    text = repr(plan)
    for part in ("backend triton", "Lq=40", "positions: q = row + 0", "inputs: doc (40,)",
                 "forward: fwd attn_fwd_", "table", "backward: built at the first backward"):
        assert part in text, part


def test_a_plan_holds_a_copy_of_its_inputs():
    """Editing an input after building a plan does not change what the plan computes."""
    pat = spattn.compile("causal & same(doc)", backend="triton")
    q, k, v = qkv()
    doc = torch.arange(40) // 11
    plan = pat.plan(q, k, v, doc=doc)
    want = pat(q, k, v, doc=doc.clone())
    doc.zero_()
    assert torch.equal(pat(q, k, v, plan=plan), want)


def test_calls_that_do_not_match_the_plan_are_refused():
    pat = spattn.compile("causal & same(doc)", backend="triton")
    q, k, v = qkv()
    plan = pat.plan(q, k, v, doc=torch.arange(40) // 11)
    with pytest.raises(SpattnInputError, match="the plan was built for"):
        pat(*qkv(L=48), plan=plan)
    with pytest.raises(SpattnInputError, match="the plan was built for"):
        pat(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, plan=plan)   # strides
    with pytest.raises(SpattnParamError, match="plan holds its inputs"):
        pat(q, k, v, plan=plan, doc=torch.arange(40) // 11)
    with pytest.raises(SpattnParamError, match="scale"):
        pat(q, k, v, plan=plan, scale=0.5)
    with pytest.raises(SpattnParamError, match="not 'q >= k'"):
        spattn.compile("causal", backend="triton")(q, k, v, plan=plan)
    with pytest.raises(SpattnParamError, match="plan= takes a plan"):
        pat(q, k, v, plan="plan")


def test_torch_backend_plans():
    pat = spattn.compile("causal & window(9)", backend="torch")
    q, k, v = qkv()
    plan = pat.plan(q, k, v)
    assert plan.backend == "torch"
    check(pat, pat(q, k, v, plan=plan), q, k, v)


# --------------------------------------------------------------- the plan cache

@pytest.fixture
def tuned(monkeypatch, tmp_path):
    """Autotuning forced on under the interpreter with a stored choice read from ``stored``
    (no timing)."""
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path))
    for name in ("SPATTN_TMA", "SPATTN_AUTOTUNE", "SPATTN_BLOCK_M"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tune, "enabled", lambda device, settings=None: True)
    stored = {"fwd": CFG_A}
    monkeypatch.setattr(tune, "read", lambda key, kind: dict(stored[kind]))
    tune.clear_memory()
    PLANS.clear()
    yield stored
    tune.clear_memory()
    PLANS.clear()


def _plan(pat, q, k, v, **inputs):
    return PLANS.get(pat, "triton", q, k, v, scale=0.25, q_offset=0, inputs=inputs)


def test_the_cache_answers_what_building_again_would(tuned, monkeypatch):
    pat = spattn.compile("causal & window(24)", backend="triton")
    q, k, v = qkv()
    a = _plan(pat, q, k, v)
    assert _plan(pat, q, k, v) is a and a.forward_stage.config.block_m == 16
    monkeypatch.setenv("SPATTN_TMA", "1")            # a changed environment: a new plan
    b = _plan(pat, q, k, v)
    assert b is not a and b.forward_stage.config.tma
    monkeypatch.delenv("SPATTN_TMA")
    a = _plan(pat, q, k, v)                          # (the tuner's state moved: rebuilt)
    assert not a.forward_stage.config.tma and a.forward_stage.config.block_m == 16
    tuned["fwd"] = CFG_B                             # a new file: memory still holds A
    assert _plan(pat, q, k, v) is a
    tune.clear_memory()                              # what a new process would see
    c = _plan(pat, q, k, v)
    assert (c.forward_stage.config.block_m, c.forward_stage.config.block_n) == (32, 16)
    _, k2, v2 = qkv(L=48)
    assert _plan(pat, q, k2, v2) is not c            # shapes are part of the key
    qt = torch.randn(1, 40, 2, 16).transpose(1, 2)   # and strides
    assert _plan(pat, qt, k, v) is not c


def test_inplace_input_edit_is_seen():
    pat = spattn.compile("causal & same(doc)", backend="triton")
    g = torch.Generator().manual_seed(3)
    L = 70
    q, k, v = (torch.randn(1, 2, L, 16, generator=g) for _ in range(3))
    doc = torch.sort(torch.randint(0, 3, (L,), generator=g)).values
    for step in range(3):
        check(pat, pat(q, k, v, doc=doc), q, k, v, doc=doc)
        doc[: L // 2] = doc[: L // 2].flip(0) if step == 0 else torch.arange(L // 2)


def test_the_cache_is_bounded():
    cache = PlanCache(size=3)
    pat = spattn.compile("causal & same(doc)", backend="triton")
    q = torch.randn(1, 1, 33, 16)
    for i in range(6):
        cache.get(pat, "triton", q, q, q, scale=0.25, q_offset=0,
                  inputs={"doc": torch.zeros(33, dtype=torch.int64) + i % 2})
    assert len(cache) == 3


def test_nothing_is_kept_during_a_capture(monkeypatch):
    cache = PlanCache()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(tune, "_capturing", lambda: True)
    pat = spattn.compile("causal", backend="triton")
    q, k, v = qkv()
    cache.get(pat, "triton", q, k, v, scale=0.25, q_offset=0, inputs={})
    assert len(cache) == 0


def test_bound_launches_only_where_every_later_call_fits():
    """A stage binds a launch (CUDA) only when the JIT's alignment assumptions hold for every
    call its plan accepts: any launch of a plan built with aligned q, k, v (its check refuses
    others), only an all-unaligned one otherwise; a backward's o and do all or none."""
    from spattn.runtime.triton_backend import _bindable

    class Stage:
        aligned = True
    base = torch.zeros(80)
    a, u = base[:64], base[1:65]
    assert _bindable(Stage, a, u, a)
    Stage.aligned = False
    assert not _bindable(Stage, a, a, a) and not _bindable(Stage, u, a, u)
    assert _bindable(Stage, u, u, u)
    assert _bindable(Stage, a, a, same=True) and _bindable(Stage, u, u, same=True)
    assert not _bindable(Stage, a, u, same=True)


def test_plans_are_not_copied_or_pickled():
    """copy, deepcopy and pickle of a plan (or of an object holding one) say what a plan
    holds and what to do instead, not Python's "cannot pickle '_thread.lock'"."""
    import copy
    import pickle
    pat = spattn.compile("causal", backend="torch")
    q = torch.randn(1, 2, 32, 16)
    plan = pat.plan(q, q, q)
    for f in (copy.copy, copy.deepcopy, pickle.dumps, lambda p: copy.deepcopy({"plan": p})):
        with pytest.raises(spattn.SpattnError, match="not pickled or copied.*pat.plan"):
            f(plan)
