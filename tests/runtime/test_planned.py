"""The launchers' per-signature memo of resolved launch options (``triton_backend._planned``):
it must answer exactly what resolving again would."""
import pytest
import torch

import spattn
from spattn.runtime import triton_backend as tb, tune
from spattn.runtime.reference import attention_reference

CFG_A = {"block_m": 16, "block_n": 32, "num_warps": 4, "num_stages": 1, "loop": "split"}
CFG_B = {"block_m": 32, "block_n": 16, "num_warps": 4, "num_stages": 1, "loop": "split"}


@pytest.fixture
def seen(monkeypatch, tmp_path):
    """Run the launchers under the interpreter with autotuning forced on and a stored
    choice read from ``stored`` (no timing); record the options ``_fwd`` receives."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path))
    for name in ("SPATTN_TMA", "SPATTN_AUTOTUNE", "SPATTN_BLOCK_M"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tune, "enabled", lambda device: True)
    stored = {"fwd": CFG_A}
    monkeypatch.setattr(tune, "read", lambda key, kind: dict(stored[kind]))
    tune.clear_memory()
    tb._PLANS.clear()
    out = []
    real = tb._fwd

    def spy(*a, opts, **kw):
        out.append(dict(opts))
        return real(*a, opts=opts, **kw)
    monkeypatch.setattr(tb, "_fwd", spy)
    yield out, stored
    tune.clear_memory()
    tb._PLANS.clear()


def _run(pat, L=40, H=2, D=16, seed=0):
    """One forward through the launcher on fresh inputs, checked against the float64
    reference (whatever the options, the result must not change)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, H, L, D, generator=g) for _ in range(3))
    o, _ = tb.fwd(pat, q, k, v, scale=D ** -0.5, q_offset=0)
    ref, _ = attention_reference(q.double(), k.double(), v.double(),
                                 pat.mask(L, L, num_heads=H))
    assert torch.allclose(o.double(), ref, atol=1e-4)
    return o


def test_a_changed_environment_resolves_again(seen, monkeypatch):
    out, _ = seen
    pat = spattn.compile("causal & window(24)", backend="triton")
    _run(pat)
    _run(pat)
    assert [o["tma"] for o in out] == [False, False] and len(tb._PLANS) == 1
    monkeypatch.setenv("SPATTN_TMA", "1")
    _run(pat)
    assert out[-1]["tma"] is True
    monkeypatch.setenv("SPATTN_BLOCK_M", "32")       # an override: no tuning, the override
    _run(pat)
    assert out[-1]["_env"] == (("SPATTN_BLOCK_M", "32"),) and "block_m" not in out[-1]
    monkeypatch.delenv("SPATTN_BLOCK_M")
    monkeypatch.delenv("SPATTN_TMA")
    _run(pat)
    assert out[-1] == out[0]


def test_a_new_tuner_state_resolves_again(seen):
    out, stored = seen
    pat = spattn.compile("causal & window(24)", backend="triton")
    _run(pat)
    assert out[-1]["block_m"] == 16
    stored["fwd"] = CFG_B                             # a new file: memory still holds A
    _run(pat)
    assert out[-1]["block_m"] == 16
    tune.clear_memory()                               # what a new process would see
    _run(pat)
    assert (out[-1]["block_m"], out[-1]["block_n"]) == (32, 16)


def test_shapes_strides_and_patterns_are_part_of_the_signature(seen):
    out, _ = seen
    a = spattn.compile("causal & window(24)", backend="triton")
    b = spattn.compile("causal & window(24)", backend="triton")   # equal, another object
    _run(a)
    _run(a, L=48)
    _run(b)
    assert len(tb._PLANS) == 3
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 40, 2, 16, generator=g).transpose(1, 2)     # other strides
    k, v = torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 2, 40, 16, generator=g)
    tb.fwd(a, q, k, v, scale=0.25, q_offset=0)
    assert len(tb._PLANS) == 4


def test_explicit_options_and_captures_are_not_remembered(seen, monkeypatch):
    out, _ = seen
    pat = spattn.compile("causal & window(24)", backend="triton")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    tb.fwd(pat, q, k, v, scale=0.25, q_offset=0, block_m=16, block_n=16)
    assert len(tb._PLANS) == 0 and out[-1]["block_n"] == 16
    monkeypatch.setattr(tune, "_capturing", lambda: True)
    tb.fwd(pat, q, k, v, scale=0.25, q_offset=0)
    assert len(tb._PLANS) == 0
