"""The forward tiles of a token layout's call when nothing else chooses them
(``runtime.tables.layout_tiles``): 128 x 128 where every computed tile is FULL, 64 x 64
where those tiles compute clearly fewer pairs than 128 x 64 (what the prior was measured
against; the forward's default is 64 x 64 too); never for a call
in sequence order, a tile given by the call or the settings, the autotuner, fp32 or the
interpreter."""
from types import SimpleNamespace

import pytest
import torch

import spattn
from spattn.ir.layout import choose
from spattn.runtime import settings as _settings
from spattn.runtime import triton_backend as TB
from spattn.runtime.tables import (LAYOUT_FULL_TILES, LAYOUT_SMALL_TILES, Analysis,
                                   layout_tiles)

# (id, pattern, tokens, the prior)
CASES = [
    # windows shifted to multiples of 16 by the stride: every box tile pair FULL
    ("strided-2d", lambda: spattn.neighborhood((64, 64), (48, 48), stride=(16, 16)), 4096,
     LAYOUT_FULL_TILES),
    ("window-2d", lambda: spattn.neighborhood((64, 64), (17, 17)), 4096, LAYOUT_SMALL_TILES),
    ("dilated", lambda: spattn.compile("dilated(128, 4)"), 4096, LAYOUT_SMALL_TILES),
]


def _analysis(pattern, N):
    r = choose(pattern.ir, N, N, 0, target="cuda", force=True)
    assert r is not None
    return Analysis(type(pattern)(r.ir), r.layout.padded_size, r.layout.padded_size, B=1, H=1)


@pytest.mark.parametrize("make,N,want", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_layout_tiles_follow_the_classes(make, N, want):
    a = _analysis(make(), N)
    assert layout_tiles(a) == want
    # the rule's own statement, from independent classifications at each shape
    from spattn.ir.tiles import EMPTY, PARTIAL, classify
    p, L = a.pattern, a.Lq
    c = {t: classify(p, L, L, *t) for t in ((64, 64), (128, 64), (128, 128))}
    pairs = {t: int((x != EMPTY).sum()) * t[0] * t[1] for t, x in c.items()}
    if want == LAYOUT_FULL_TILES:
        assert int((c[(128, 128)] == PARTIAL).sum()) == 0
    else:
        assert int((c[(128, 128)] == PARTIAL).sum()) > 0
        assert pairs[(64, 64)] <= 0.95 * pairs[(128, 64)]


def test_sequence_order_has_no_prior():
    """A pattern in sequence order with few PARTIAL tiles keeps the default tiles."""
    p = spattn.compile("causal")
    assert layout_tiles(Analysis(p, 4096, 4096, B=1, H=1)) is None


def _fake_call(analysis, **env):
    raw = tuple(env.get(n) for n in _settings.VARIABLES)
    return SimpleNamespace(tile_prior=True, analysis=analysis, settings=_settings.parse(raw))


@pytest.mark.parametrize("dtype,D,env,opts,applies", [
    (torch.bfloat16, 128, {}, {}, True),
    (torch.float16, 96, {}, {}, True),
    (torch.float32, 128, {}, {}, False),
    (torch.bfloat16, 64, {}, {}, False),
    (torch.bfloat16, 128, {"TRITON_INTERPRET": "1"}, {}, False),
    (torch.bfloat16, 128, {"SPATTN_BLOCK_M": "128"}, {}, False),
    (torch.bfloat16, 128, {}, {"block_n": 64}, False),
], ids=["bf16-D128", "fp16-D96", "fp32", "D64", "interpreter", "setting", "option"])
def test_the_prior_only_where_nothing_else_chooses(dtype, D, env, opts, applies):
    call = _fake_call(_analysis(CASES[0][1](), 4096), **env)
    q = torch.empty(1, 1, 4096, D, dtype=dtype)
    got = dict(opts)
    TB._layout_tiles(call, got, q)
    prior = dict(zip(("block_m", "block_n", "num_warps", "num_stages"), LAYOUT_FULL_TILES))
    assert (got == {**opts, **prior}) == applies
    if not applies:
        assert got == opts


def test_a_layout_plan_carries_the_prior(monkeypatch):
    """A RemappedPlan's inner call is marked; a plan in sequence order is not."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    p = spattn.compile("dilated(64, 4)", backend="torch")
    q = torch.randn(1, 1, 1024, 16)
    plan = p.plan(q, q, q)
    assert type(plan).__name__ == "RemappedPlan" and plan.inner.call.tile_prior
    assert not spattn.compile("causal", backend="torch").plan(q, q, q).call.tile_prior
