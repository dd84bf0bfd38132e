"""The CPU decode step's hot path (``runtime/decode.py``, ``DecodePlan.run_torch``): the steps
a plan memoises per (lengths, positions), the steps built from the rows' exact intervals,
the single dense-SDPA call of a one-view step, the plan's fast entry (``fast_step``) and
the accepting path of the argument checks (``runtime.api._valid``).

Every case draws fresh random q and caches and checks every output element (and lse) against
the float64 reference on the pattern's dense mask of each batch element's own length.
"""
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import spattn
from spattn.dsl.errors import SpattnInputError, SpattnParamError, SpattnValueError
from spattn.runtime import api
from spattn.runtime import decode as dec
from spattn.runtime.reference import attention_reference

from tests.helpers.sources import bool_exprs
from tests.runtime.test_decode import _close, _reference


def _plan(pat):
    return next(p for p in reversed(dec.DECODE_PLANS._plans.values()) if p.pattern == pat)


def _rand(*shape, g, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


# ------------------------------------------------------------------ the memo of steps

def test_memo_serves_only_its_lengths_and_positions():
    """One plan (one bucket) across lengths, per-batch lengths and q_offset: each call is
    right, each (lengths, positions) its own memo entry, a repeated one served from it."""
    dec.DECODE_PLANS.clear()
    pat = spattn.compile("causal & (window(W) | sink(4))", W=40, backend="torch")
    g = torch.Generator().manual_seed(11)
    k, v = _rand(2, 2, 500, 32, g=g), _rand(2, 2, 500, 32, g=g)
    seen = []
    for lens in ([500, 500], [500, 300], [300, 500], [271, 271]):
        q = _rand(2, 4, 2, 32, g=g)
        o, lse = pat.decode(q, k, v, seq_lens=torch.tensor(lens), return_lse=True)
        want_o, want_lse = _reference(pat, q, k, v, lens, {})
        _close(f"{lens} o", o, want_o)
        _close(f"{lens} lse", lse, want_lse)
        plan = _plan(pat)
        seen.append(plan)
    assert all(p is seen[0] for p in seen)
    assert len(seen[0]._steps) == 4
    # the same step again: served from the memo (the same object), still right
    step = seen[0].cpu_step((300, 500), 0, 0, {})
    assert seen[0].cpu_step((300, 500), 0, 0, {}) is step and len(seen[0]._steps) == 4
    q = _rand(2, 4, 2, 32, g=g)
    _close("again", pat.decode(q, k, v, seq_lens=torch.tensor([300, 500])),
           _reference(pat, q, k, v, [300, 500], {})[0])
    # q_offset moves the rows: a step of its own
    q = _rand(1, 4, 1, 32, g=g)
    for off in (499, 350, 20):
        o = pat(q, k[:1], v[:1], q_offset=off)
        _close(f"q_offset {off}", o,
               attention_reference(q, k[:1], v[:1], pat.mask(1, 500, q_offset=off))[0])


def test_memo_is_bounded_and_keyed_by_view_bytes(monkeypatch):
    dec.DECODE_PLANS.clear()
    pat = spattn.compile("causal & (window(W) | sink(4))", W=16, backend="torch")
    g = torch.Generator().manual_seed(12)
    k, v = _rand(1, 2, 512, 16, g=g), _rand(1, 2, 512, 16, g=g)
    for L in range(300, 300 + dec.CPU_STEPS + 3):
        q = _rand(1, 2, 1, 16, g=g)
        _close(f"L{L}", pat(q, k[:, :, :L], v[:, :, :L]),
               attention_reference(q, k[:, :, :L], v[:, :, :L], pat.mask(1, L))[0])
    plan = _plan(pat)
    assert len(plan._steps) == dec.CPU_STEPS
    one = plan.cpu_step((400,), 0, 0, {})
    assert len(one.groups[0][2]) == 1           # sinks and window copied into one segment
    monkeypatch.setattr(dec, "VIEW_BYTES", 0)
    two = plan.cpu_step((400,), 0, 0, {})
    assert len(two.groups[0][2]) == 2           # every run a view of its own
    q = _rand(1, 2, 1, 16, g=g)
    _close("views", pat(q, k[:, :, :400], v[:, :, :400]),
           attention_reference(q, k[:, :, :400], v[:, :, :400], pat.mask(1, 400))[0])


def test_memo_never_serves_other_runtime_inputs():
    """A plan is keyed by its inputs' identity and version: writing the document ids in place,
    or passing new ones, gives a step computed from the new ids."""
    dec.DECODE_PLANS.clear()
    pat = spattn.compile("input doc\npattern documents = causal & same(doc)", backend="torch")
    g = torch.Generator().manual_seed(13)
    k, v = _rand(1, 2, 320, 16, g=g), _rand(1, 2, 320, 16, g=g)
    q = _rand(1, 2, 1, 16, g=g)
    doc = torch.zeros(1, 320, dtype=torch.int64)
    doc[:, 200:] = 1

    def check(name, d):
        o = pat(q, k, v, doc=d)
        _close(name, o, attention_reference(q, k, v, pat.mask(1, 320, doc=d))[0])
        return o
    first = check("two documents", doc)
    first_plan = _plan(pat)
    doc[:, 300:] = 2                                # written in place: a new version
    second = check("three documents", doc)
    assert _plan(pat) is not first_plan
    assert not torch.allclose(first, second)
    other = torch.zeros(1, 320, dtype=torch.int64)  # a new tensor: a new plan
    check("one document", other)
    assert len(dec.DECODE_PLANS) == 3


def test_converted_inputs_keep_one_plan():
    """A bool (or int32) runtime input is converted to int64 once while it is unchanged:
    every call that passes it (the layers of a model at one step) finds one plan; written
    in place, it is converted again and gives a new plan with the new values."""
    dec.DECODE_PLANS.clear()
    pat = spattn.compile("causal & keep[k]", backend="torch")
    g = torch.Generator().manual_seed(14)
    k, v = _rand(2, 2, 300, 16, g=g), _rand(2, 2, 300, 16, g=g)
    keep = torch.rand(2, 300, generator=g) > 0.3
    for layer in range(3):
        q = _rand(2, 2, 1, 16, g=g)
        _close(f"layer {layer}", pat(q, k, v, keep=keep),
               _reference(pat, q, k, v, [300, 300], {"keep": keep})[0])
    assert len(dec.DECODE_PLANS) == 1
    keep[:, :150] = False                           # written in place: converted again
    q = _rand(2, 2, 1, 16, g=g)
    _close("in place", pat(q, k, v, keep=keep),
           _reference(pat, q, k, v, [300, 300], {"keep": keep})[0])
    assert len(dec.DECODE_PLANS) == 2


#: (source, inputs from (B, Hq, L, generator), whether the batch runs as one group at B)
_PER_BATCH = {
    "left-padding-bool": ("causal & keep[k]",
                          lambda B, H, L, g: {"keep": torch.arange(L)[None] >= torch.tensor(
                              [0, 17, 3, 40][:B])[:, None]}, lambda B: True),
    "holes-int32": ("causal & window(W) & keep[k] != 0",
                    lambda B, H, L, g: {"keep": (torch.rand(B, L, generator=g) > 0.2)
                                        .to(torch.int32)}, lambda B: True),
    # at B = 2 the union (295 keys) is twice what the one row with keys sees
    "first-b-one-row-empty": ("causal & k >= first[b]",
                              lambda B, H, L, g: {"first": torch.tensor([5, L, 0, 9][:B])},
                              lambda B: B > 2),
    "per-head": ("causal & keep[h, k]",
                 lambda B, H, L, g: {"keep": torch.rand(B, H, L, generator=g) > 0.1},
                 lambda B: True),
    "far-apart": ("k >= first[b] & k < first[b] + 100",
                  lambda B, H, L, g: {"first": torch.tensor([0, 200, 100, 150][:B])},
                  lambda B: False),
}


@pytest.mark.parametrize("B,Hq,Hk,Lq", [(2, 4, 4, 1), (4, 8, 2, 1), (3, 4, 2, 3)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("name", sorted(_PER_BATCH))
def test_per_batch_inputs_batched_step(name, B, Hq, Hk, Lq):
    """Batch elements whose keys differ through a per-batch input run as one kernel call
    over the union of their keys, each masked to its own (a padding mask), unless the union
    is much wider than what they see (then a call per element); every output element and
    lse against the float64 reference, rows without a key 0 and -inf."""
    dec.DECODE_PLANS.clear()
    src, make, merged = _PER_BATCH[name]
    pat = spattn.compile(src, backend="torch", **({"W": 120} if "W" in src else {}))
    g = torch.Generator().manual_seed(15)
    L = 300
    ins = make(B, Hq, L, g)
    k, v = _rand(B, Hk, L, 32, g=g), _rand(B, Hk, L, 32, g=g)
    q = _rand(B, Hq, Lq, 32, g=g)
    o, lse = pat.decode(q, k, v, return_lse=True, **ins)
    want_o, want_lse = _reference(pat, q, k, v, [L] * B, ins)
    _close("o", o, want_o)
    _close("lse", lse, want_lse)
    assert torch.equal(pat(q, k, v, **ins), o)
    step = _plan(pat).cpu_step((L,) * B, 0, 0, dec.DECODE_PLANS.int64(ins, q.device))
    assert (len(step.groups) == 1) == merged(B), step.groups


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("src,first,B,Hq,Hk", [
    ("causal & k >= first[b]", [0, 50, 200, 7], 4, 8, 8),
    ("causal & k >= first[b]", [31, 2, 90], 3, 8, 2),
    ("causal & (k >= first[b] | k < 3)", [0, 40, 9], 3, 4, 4),
    ("causal & k >= first[b] & k != first[b] + 5", [1, 3], 2, 4, 1)],
    ids=["left-padding-B4-H8/8", "left-padding-B3-H8/2", "sinks-B3-H4/4", "hole-B2-H4/1"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_growing_padded_batch_steps_view_one_mask(src, first, B, Hq, Hk, dtype, device):
    """One query row per element of a left-padded batch over a growing cache (batched
    generation): every element's last key run ends at the cache's end, so each longer
    cache's step masks the union of the keys with a view of one kept buffer instead of a
    mask of its own. Every output element and lse against the float64 reference at each
    length, and the steps' masks share the buffer."""
    dec.DECODE_PLANS.clear()
    pat = spattn.compile(src, backend="torch")
    g = torch.Generator().manual_seed(sum(first) + B)
    ins = {"first": torch.tensor(first, device=device)}
    k, v = (_rand(B, Hk, 512, 32, g=g, dtype=dtype).to(device) for _ in range(2))
    rtol = 2e-3 if dtype == torch.float32 else 2e-2
    for L in (300, 301, 302, 333, 511, 301):
        q = _rand(B, Hq, 1, 32, g=g, dtype=dtype).to(device)
        kL, vL = k[:, :, :L], v[:, :, :L]
        want_o, want_lse = _reference(pat, q, kL, vL, [L] * B, ins)
        _close(f"L{L}", pat(q, kL, vL, **ins), want_o, rtol)
        o, lse = pat(q, kL, vL, return_lse=True, **ins)
        _close(f"L{L} o (lse path)", o, want_o, rtol)
        _close(f"L{L} lse", lse, want_lse, rtol)
    plan = _plan(pat)
    bufs = [m for key, m in plan._masks.items() if key[0] == "head"]
    assert len(bufs) == 1, list(plan._masks)
    for L in (302, 511):
        a, z, mask = plan.cpu_step((L,) * B, 0, 0, dec.DECODE_PLANS.int64(ins, q.device)).one
        assert z == L and mask.shape == (B, 1, 1, L - a)
        assert mask.data_ptr() == bufs[0].data_ptr()


@pytest.mark.parametrize("src", [
    "causal & k >= first[b]", "q - k >= 3 & k >= first[b]", "k <= q + 2 & k >= first[b]",
    "causal & k >= first[b] + 4", "causal & k >= first[b] & k >= 2",
    "causal & (k >= first[b] | k < 3)", "causal & window(80) & k >= first[b]"],
    ids=["causal", "gap-3", "ahead-2", "first+4", "from-2", "sinks", "window"])
@pytest.mark.parametrize("static", [False, True], ids=["growing", "static"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=st.lists(st.integers(0, 120), min_size=2, max_size=4), L=st.integers(257, 300),
       steps=st.integers(3, 6), seed=st.integers(0, 2**31 - 1))
def test_next_grown_step_is_the_built_step(src, static, first, L, steps, seed):
    """A left-padded batch's one query row moving on one position at a time, over a growing
    cache (each length one longer) or a static one (the same length, the row one slot
    later): where the plan's keys are one interval ``[lo, q + c]`` with ``lo`` fixed
    (``DecodePlan._grows``) each step follows from the last (``_next_grown``); every step
    equals the one ``_build_step`` builds (the same keys and mask values), and every output
    element matches the float64 reference."""
    dec.DECODE_PLANS.clear()
    pat = spattn.compile(src, backend="torch")
    g = torch.Generator().manual_seed(seed)
    B = len(first)
    ins = {"first": torch.tensor(first)}
    k, v = _rand(B, 2, L + steps, 16, g=g), _rand(B, 2, L + steps, 16, g=g)
    for i in range(steps):
        n, off = (L, L - steps + i) if static else (L + i, None)
        q = _rand(B, 4, 1, 16, g=g)
        out = pat(q, k[:, :, :n], v[:, :, :n], q_offset=off, **ins)
        m = pat.mask(1, n, batch=B, num_heads=4, q_offset=off, **ins)
        _close(f"step {i}", out, attention_reference(q, k[:, :, :n], v[:, :, :n], m)[0])
        plan = _plan(pat)
        shift = 0 if off is None else off - (n - 1)
        i64 = dec.DECODE_PLANS.int64(ins, q.device)
        kept = plan.cpu_step((n,) * B, shift, 0, i64)
        built = plan._build_step((n,) * B, shift, 0, i64)
        assert (kept.one is None) == (built.one is None)
        if kept.one is not None:
            assert kept.one[:2] == built.one[:2]
            assert (kept.one[2] is None) == (built.one[2] is None)
            if kept.one[2] is not None:
                assert torch.equal(kept.one[2], built.one[2])
        event(f"grows {plan._grows}, last grown {plan._last_grown is not None}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(src=st.sampled_from(["causal & k >= first[b]", "k >= first[b] & q - k <= w[b]",
                            "causal & k >= first[b] + lim[h]", "q - k >= first[b] | k < 3"]),
       B=st.integers(1, 4), Lq=st.integers(1, 3), L=st.integers(257, 330),
       shift=st.integers(-40, 0), seed=st.integers(0, 2**31 - 1))
def test_uniform_inputs_give_the_cpu_plan_a_closed_form(src, B, Lq, L, shift, seed):
    """Inputs read only at uniform indices (``first[b]``, ``lim[h]``) enter a CPU plan's
    closed form as lists of their values (``ir.inputs.loads_as_lists``): its steps build from
    each row's intervals, not the predicate over every key. Every output element and lse
    against the float64 reference, with the query rows at any offset."""
    dec.DECODE_PLANS.clear()
    pat = spattn.compile(src, backend="torch")
    g = torch.Generator().manual_seed(seed)
    Hq, Hk = 4, 2
    ins = {"first": torch.randint(0, L + 1, (B,), generator=g)}
    if "w[b]" in src:
        ins["w"] = torch.randint(0, 2 * L, (B,), generator=g, dtype=torch.int32)
    if "lim[h]" in src:
        ins["lim"] = torch.randint(-5, 60, (Hq,), generator=g)
    k, v = _rand(B, Hk, L, 16, g=g), _rand(B, Hk, L, 16, g=g)
    q = _rand(B, Hq, Lq, 16, g=g)
    off = L - Lq + shift
    o, lse = pat.decode(q, k, v, q_offset=off, return_lse=True, **ins)
    want_o, want_lse = _reference(pat, q, k, v, [L] * B, ins, q_offset=off)
    _close("o", o, want_o)
    _close("lse", lse, want_lse)
    assert _plan(pat).closed_form is not None


def test_inputs_as_lists_only_at_uniform_indices():
    """``loads_as_lists``: loads at ``b``, ``h`` and constants become lists of the input's
    values (a 2-D input flattened row-major); a load at ``q`` or ``k``, an input with
    leading dims or one too large leaves the IR alone (None)."""
    from spattn.ir.evaluate import evaluate
    from spattn.ir.inputs import LIST_INPUT_MAX, loads_as_lists
    from spattn.ir.nodes import Load, walk
    g = torch.Generator().manual_seed(3)
    t = torch.randint(-9, 9, (3, 5), generator=g)
    pat = spattn.compile("q - k >= t[b, h] & k >= u[1]")
    ins = {"t": t, "u": torch.tensor([4, 7])}
    spec = loads_as_lists(pat.ir, ins)
    assert spec is not None and not any(isinstance(n, Load) for n in walk(spec))
    q = torch.arange(20).view(1, 1, -1, 1)
    k = torch.arange(20).view(1, 1, 1, -1)
    env = {"q": q, "k": k, "b": torch.arange(3).view(-1, 1, 1, 1),
           "h": torch.arange(5).view(1, -1, 1, 1), "Lq": 20, "Lk": 20, "H": 5}
    assert torch.equal(torch.as_tensor(evaluate(spec, env, {})),
                       torch.as_tensor(evaluate(pat.ir, env, ins)))
    assert loads_as_lists(spattn.compile("causal").ir, {}) is None
    assert loads_as_lists(spattn.compile("keep[k] != 0").ir,
                          {"keep": torch.ones(20, dtype=torch.int64)}) is None
    assert loads_as_lists(spattn.compile("k >= first[b]").ir,
                          {"first": torch.zeros(2, 3, dtype=torch.int64)}) is None
    assert loads_as_lists(spattn.compile("k >= first[b]").ir,
                          {"first": torch.zeros(LIST_INPUT_MAX + 1, dtype=torch.int64)}) is None


def test_routed_steps_at_a_q_offset_take_the_fast_entry():
    """A routed call with a ``q_offset`` (the layers of one token over a static cache) leaves
    a fast entry for calls of the same offset and cache length: they run the plan's step
    without the full path's checks; another offset or length, or no offset, takes the full
    path. Every output against the reference."""
    dec.DECODE_PLANS.clear()
    pat = spattn.compile("causal & k >= first[b]", backend="torch")
    g = torch.Generator().manual_seed(8)
    B, L = 3, 400
    first = torch.tensor([0, 31, 120])
    k, v = _rand(B, 2, L, 16, g=g), _rand(B, 2, L, 16, g=g)
    for off in (300, 300, 301, 301):
        q = _rand(B, 4, 1, 16, g=g)
        hit = dec.fast_routed(pat, q, k, v, None, {"first": first}, off)
        o = pat(q, k, v, q_offset=off, first=first)
        _close(f"q_offset {off}", o, _reference(pat, q, k, v, [L] * B, {"first": first},
                                                q_offset=off)[0])
        if hit is not None:
            assert torch.equal(hit, o)
        plan = _plan(pat)
        assert plan.fast_routed[-1] == (L, off)
    q = _rand(B, 4, 1, 16, g=g)
    assert dec.fast_routed(pat, q, k, v, None, {"first": first}, 301) is not None
    assert dec.fast_routed(pat, q, k, v, None, {"first": first}, 302) is None
    assert dec.fast_routed(pat, q, k, v, None, {"first": first}) is None
    assert dec.fast_routed(pat, q, k[:, :, :399], v[:, :, :399], None, {"first": first},
                           301) is None


@pytest.mark.parametrize("src,Lq,Hq,Hk,buffers", [
    ("causal", 4, 4, 2, 1), ("causal & window(W)", 3, 2, 2, 1), ("q - k >= 2", 4, 2, 1, 1),
    ("causal & window(2)", 5, 2, 2, 1), ("causal & (window(W) | sink(4))", 4, 2, 2, 0)],
    ids=["causal-Lq4-H4/2", "window-Lq3", "gap-Lq4-H2/1", "window2-Lq5", "streaming-Lq4"])
def test_growing_cache_steps_from_row_intervals(src, Lq, Hq, Hk, buffers):
    """Several query rows against a growing cache: a step whose rows' keys are one run is
    built from the rows' exact intervals, its mask a slice of a buffer kept per shape of the
    partial keys relative to the last key (causal or a window: one buffer for every
    length; streaming: two runs, the general build). Every step (and its lse) is the
    reference's, and a row that sees no key (a q_offset) takes the general build."""
    dec.DECODE_PLANS.clear()
    pat = spattn.compile(src, backend="torch", **({"W": 30} if "W" in src else {}))
    g = torch.Generator().manual_seed(50 + Lq)
    k, v = _rand(2, Hk, 512, 16, g=g), _rand(2, Hk, 512, 16, g=g)
    for L in (257, 258, 300, 333, 400, 511, 300):
        q = _rand(2, Hq, Lq, 16, g=g)
        kL, vL = k[:, :, :L], v[:, :, :L]
        want_o, want_lse = _reference(pat, q, kL, vL, [L, L], {})
        _close(f"L{L}", pat(q, kL, vL), want_o)
        o, lse = pat(q, kL, vL, return_lse=True)
        _close(f"L{L} o (lse path)", o, want_o)
        _close(f"L{L} lse", lse, want_lse)
    plan = _plan(pat)
    assert len(plan._masks) == buffers
    if buffers:
        assert plan.cpu_step((400, 400), 0, 0, {}).one is not None
    q = _rand(1, Hq, Lq, 16, g=g)
    for off in (0, 1, 250):
        _close(f"q_offset {off}", pat(q, k[:1, :, :300], v[:1, :, :300], q_offset=off),
               attention_reference(q, k[:1, :, :300], v[:1, :, :300],
                                   pat.mask(Lq, 300, q_offset=off, num_heads=Hq))[0])


def test_fast_entry_is_not_traced_by_torch_compile():
    """A decode-sized call compiled with ``fullgraph=True`` after eager calls left a fast
    entry: no graph break (the compiled call takes the custom op), the same numbers."""
    torch._dynamo.reset()
    dec.DECODE_PLANS.clear()
    pat = spattn.compile("causal & window(64)", backend="torch")
    g = torch.Generator().manual_seed(45)
    q, k, v = _rand(1, 2, 1, 16, g=g), _rand(1, 2, 300, 16, g=g), _rand(1, 2, 300, 16, g=g)
    eager = pat(q, k, v)
    assert dec.fast_step(pat, q, k, v) is not None

    def f(q, k, v):
        return pat(q, k, v) * 2

    assert torch._dynamo.explain(f)(q, k, v).graph_break_count == 0
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), eager * 2)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(src=bool_exprs(), group=st.integers(1, 2), Lq=st.integers(1, 16),
       L=st.integers(256, 300), grow=st.integers(1, 40), seed=st.integers(0, 2 ** 31 - 1))
def test_random_patterns_repeated_and_growing_steps(src, group, Lq, L, grow, seed):
    """Random patterns, the calls a decode loop makes: routed calls at one length (the full
    path, then the fast path) and at a longer one in the bucket (a step built from the
    rows' intervals where they are exact), and pat.decode with equal seq_lens; each is the
    reference's."""
    try:
        pat = spattn.compile(src, backend="torch")
    except spattn.SpattnError:
        return
    dec.DECODE_PLANS.clear()
    g = torch.Generator().manual_seed(seed)
    Hq = 2 * group
    L = max(L, 4 * Lq)
    cap = min(L + grow, 512)
    k, v = _rand(2, 2, cap, 16, g=g), _rand(2, 2, cap, 16, g=g)
    for n in (L, L, cap):
        q = _rand(2, Hq, Lq, 16, g=g)
        kn, vn = k[:, :, :n], v[:, :, :n]
        try:
            o = pat(q, kn, vn)
        except spattn.SpattnError:
            event("refused")
            return
        _close(f"L{n}", o, _reference(pat, q, kn, vn, [n, n], {})[0])
    event("fast entry" if _plan(pat).fast is not None else "no fast entry")
    event("one-run steps" if any(s.one is not None for s in _plan(pat)._steps.values())
          else "general steps")
    q = _rand(2, Hq, Lq, 16, g=g)
    lens = torch.tensor([L, L])
    _close("decode", pat.decode(q, k, v, seq_lens=lens), _reference(pat, q, k, v, [L, L], {})[0])


# ------------------------------------------------------------------ one SDPA call

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("B,Hq,Hk,Lq", [(1, 8, 8, 1), (2, 8, 2, 1), (2, 4, 4, 3), (1, 8, 2, 4)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("src", ["causal", "causal & window(100)"])
def test_single_view_step_matches_the_lse_path(src, B, Hq, Hk, Lq, dtype):
    """Without ``return_lse`` a one-view step is one call of dense SDPA (with the rows of a
    key head's query heads folded): the same output as the kernel call with its lse."""
    pat = spattn.compile(src, backend="torch")
    g = torch.Generator().manual_seed(B * 100 + Hq * 10 + Lq)
    L = 333
    q, k, v = (_rand(B, Hq, Lq, 32, g=g, dtype=dtype), _rand(B, Hk, L, 32, g=g, dtype=dtype),
               _rand(B, Hk, L, 32, g=g, dtype=dtype))
    o = pat(q, k, v)
    o2, lse = pat(q, k, v, return_lse=True)
    assert _plan(pat).cpu_step((L,) * B, 0, 0, {}).one is not None
    assert o.dtype == dtype and o.shape == (B, Hq, Lq, 32)
    ref_o, ref_lse = attention_reference(q.double(), k.double(), v.double(), pat.mask(Lq, L))
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    _close("o", o, ref_o, rtol=tol)
    _close("o (lse path)", o2, ref_o, rtol=tol)
    _close("lse", lse, ref_lse, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("Lq", [1, 3], ids=lambda n: f"Lq{n}")
def test_two_views_merged(monkeypatch, Lq, dtype):
    """Streaming past its window: the sinks and the window are two kernel calls on views,
    merged through their log-sum-exps (one lerp when every row sees a key of both)."""
    monkeypatch.setattr(dec, "VIEW_BYTES", 0)
    pat = spattn.compile("causal & (window(W) | sink(4))", W=50, backend="torch")
    g = torch.Generator().manual_seed(31 + Lq)
    q, k, v = (_rand(2, 4, Lq, 32, g=g, dtype=dtype), _rand(2, 2, 400, 32, g=g, dtype=dtype),
               _rand(2, 2, 400, 32, g=g, dtype=dtype))
    o, lse = pat(q, k, v, return_lse=True)
    assert len(_plan(pat).cpu_step((400, 400), 0, 0, {}).groups[0][2]) == 2
    ref_o, ref_lse = attention_reference(q.double(), k.double(), v.double(),
                                         pat.mask(Lq, 400))
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    _close("o", o, ref_o, rtol=tol)
    _close("lse", lse, ref_lse, rtol=tol)


def test_strided_cache_views():
    """Caches with any strides (a [B, L, H, D] buffer seen as [B, H, L, D], a cache with
    spare capacity sliced to its length, a D-strided view) give the reference's rows."""
    pat = spattn.compile("causal & window(64)", backend="torch")
    g = torch.Generator().manual_seed(21)
    q = _rand(2, 4, 1, 32, g=g)
    bshd = _rand(2, 300, 2, 32, g=g)
    big = _rand(2, 2, 400, 64, g=g)
    for name, k, v in (("bshd", bshd.transpose(1, 2), bshd.transpose(1, 2).flip(-1)),
                       ("spare", big[:, :, :300, :32], big[:, :, :300, 32:]),
                       ("D-strided", big[:, :, :300, ::2], big[:, :, :300, 1::2])):
        _close(name, pat(q, k, v), attention_reference(q, k, v, pat.mask(1, 300))[0])


# ------------------------------------------------------------------ keys in many runs

_SCATTERED = {
    # name: (source, params, inputs(B, H, L, g), the step's one segment: "index" or "span")
    "stride-8": ("(q - k) % 8 == 0", {}, None, "index"),
    "stride-2": ("(q - k) % 2 == 0", {}, None, "span"),
    "not-every-third": ("k % 3 != 0", {}, None, "span"),
    "causal-stripes": ("causal & (k % 32 < 4 | k < 2)", {}, None, "index"),
    "row-stripes": ("causal & (q + k) % 5 == 0", {}, None, "index"),
    "head-stripes": ("causal & k % H != h", {}, None, "span"),
    "holes": ("causal & keep[k]", {},
              lambda B, H, L, g: {"keep": torch.rand(L, generator=g) < 0.1}, "index"),
    "holes-per-batch": ("causal & keep[b, k]", {},
                        lambda B, H, L, g: {"keep": torch.rand(B, L, generator=g) < 0.6},
                        "span"),
}


@pytest.mark.parametrize("B,Hq,Hk,Lq", [(1, 4, 4, 1), (2, 8, 2, 1), (2, 4, 2, 4)],
                         ids=["B1-H4-Lq1", "B2-H8/2-Lq1", "B2-H4/2-Lq4"])
@pytest.mark.parametrize("name", sorted(_SCATTERED))
def test_keys_in_many_runs(name, B, Hq, Hk, Lq):
    """Allowed keys scattered over hundreds of runs are read through one gather of their
    positions (sparse) or one view of their span under a mask (dense), never a copy per
    run: the step's kernel calls are few whatever the runs, and every output element and
    lse is the float64 reference's (rows without a key 0 and -inf), on the first call,
    the repeated one (the plan's gather buffer reused) and a longer cache."""
    dec.DECODE_PLANS.clear()
    src, params, make, kind = _SCATTERED[name]
    pat = spattn.compile(src, backend="torch", **params)
    g = torch.Generator().manual_seed(hash(name) % 1000 + B * 10 + Lq)
    L, D = 1500, 32
    ins = make(B, Hq, L + 40, g) if make else {}
    k, v = _rand(B, Hk, L + 40, D, g=g), _rand(B, Hk, L + 40, D, g=g)
    for n in (L, L, L + 37):
        q = _rand(B, Hq, Lq, D, g=g)
        kn, vn = k[:, :, :n], v[:, :, :n]
        cut = {a: t[..., :n] for a, t in ins.items()}
        o, lse = pat(q, kn, vn, return_lse=True, **cut)
        want_o, want_lse = _reference(pat, q, kn, vn, [n] * B, cut)
        _close(f"o L{n}", o, want_o)
        _close(f"lse L{n}", lse, want_lse)
        step = _plan(pat).cpu_step((n,) * B, 0, 0, dec.DECODE_PLANS.int64(cut, q.device))
        segs = [s for _, _, group in step.groups if group is not None for s in group]
        assert 1 <= len(segs) <= 2 * B, [len(s.runs) for s in segs]
        assert all(len(s.runs) <= dec.COPY_RUNS or s.index is not None for s in segs)
        if Lq > 1:
            continue                    # the rows' union decides: sparse or dense
        if kind == "index":
            assert any(s.index is not None for s in segs), [len(s.runs) for s in segs]
        else:
            assert all(len(s.runs) == 1 and s.mask is not None for s in segs)


@settings(max_examples=200, deadline=None)
@given(runs=st.lists(st.tuples(st.integers(0, 80), st.integers(1, 6)), max_size=12),
       other=st.lists(st.tuples(st.integers(0, 80), st.integers(1, 9)), max_size=8))
def test_run_arithmetic_matches_sets(runs, other):
    """The step's run arithmetic (``_subtract``, ``_overlap``, ``_positions``, ``_columns``,
    ``_runs``) on disjoint sorted runs is the arithmetic of the sets of positions."""
    runs = dec._merge([(a, a + n) for a, n in runs])
    other = dec._merge([(a, a + n) for a, n in other])
    mine = {x for a, z in runs for x in range(a, z)}
    theirs = {x for a, z in other for x in range(a, z)}
    left = dec._subtract(runs, other)
    assert [x for a, z in left for x in range(a, z)] == sorted(mine - theirs)
    assert dec._overlap(runs, other) == len(mine & theirs)
    if runs:
        assert dec._positions(runs, "cpu").tolist() == [x for a, z in runs for x in range(a, z)]
        flags = torch.zeros(90, dtype=torch.bool)
        flags[list(mine)] = True
        found = dec._runs(flags)
        assert list(found) == runs
        assert dec._positions(found, "cpu").tolist() == sorted(mine)
        order = runs[1::2] + runs[::2]                  # segments laid out in another order
        laid = [x for a, z in order for x in range(a, z)]
        sub = runs[::3]
        assert dec._columns(order, sub, "cpu").tolist() == \
            [laid.index(x) for a, z in sub for x in range(a, z)]


# ------------------------------------------------------------------ the repeated step

def _fast_ref(pat, q, k, v, lens=None, scale=None):
    L = k.shape[2]
    return _reference(pat, q, k, v, lens or [L] * q.shape[0], {}, scale=scale)[0]


@pytest.mark.parametrize("src,B,Hq,Hk,Lq,L", [
    ("causal", 1, 4, 4, 1, 300), ("causal & window(100)", 2, 4, 2, 1, 333),
    ("causal", 2, 4, 2, 3, 300), ("causal & window(64)", 1, 2, 1, 4, 400)],
    ids=["causal-B1-H4-Lq1", "window-B2-H4/2-Lq1", "causal-B2-H4/2-Lq3-mask",
         "window-B1-H2/1-Lq4-mask"])
def test_repeated_step_takes_the_fast_path(src, B, Hq, Hk, Lq, L):
    """A routed call leaves its one-call step in its plan; the same shapes again (fresh
    tensors) take ``fast_step`` (the SDPA call alone) and give the reference's rows."""
    dec.DECODE_PLANS.clear()
    pat = spattn.compile(src, backend="torch")
    g = torch.Generator().manual_seed(41 + Lq)

    def draw():
        return (_rand(B, Hq, Lq, 32, g=g), _rand(B, Hk, L, 32, g=g), _rand(B, Hk, L, 32, g=g))
    q, k, v = draw()
    assert dec.fast_step(pat, q, k, v) is None              # nothing remembered yet
    _close("first", pat(q, k, v), _fast_ref(pat, q, k, v))
    assert _plan(pat).fast is not None
    q, k, v = draw()
    fast = dec.fast_step(pat, q, k, v)
    assert fast is not None
    _close("fast_step", fast, _fast_ref(pat, q, k, v))
    _close("again", pat(q, k, v), _fast_ref(pat, q, k, v))
    _close("decode() is its own entry", pat.decode(q, k, v), _fast_ref(pat, q, k, v))
    assert dec.fast_step(pat, q, k, v, None, None, False) is not None


@pytest.mark.parametrize("src, first, Hq, Hk, one", [
    ("causal", False, 4, 4, True), ("causal & window(64)", False, 4, 2, True),
    ("causal & k >= first[b]", True, 4, 2, True), ("causal & k >= first[b]", True, 2, 2, True),
    ("causal & (k % 3 != 0)", False, 4, 2, True), ("causal & (k < 64 | q - k < 64)", False, 4, 2,
                                                    False)],
    ids=["causal-H4/4", "window-H4/2", "left-padded-H4/2", "left-padded-H2/2",
         "every-third-masked-H4/2", "sinks-and-window-copied-H4/2"])
def test_one_call_describes_the_step_it_repeats(src, first, Hq, Hk, one):
    """``one_call`` after a routed call: ``(a, z, mask, scale)`` whose SDPA call on the
    keys ``a:z`` (query heads of a key head folded into the rows) gives the call's output
    for fresh tensors of the same shapes, exactly (keys in many runs: one span under a
    mask); None before any call and where the step is not one call (two runs copied
    together)."""
    dec.DECODE_PLANS.clear()
    pat = spattn.compile(src, backend="torch")
    g = torch.Generator().manual_seed(43 + Hq + Hk)
    B, L, D = 3, 330, 32
    inputs = {"first": torch.tensor([0, 40, 7])} if first else {}
    q, k, v = (_rand(B, Hq, 1, D, g=g), _rand(B, Hk, L, D, g=g), _rand(B, Hk, L, D, g=g))
    assert dec.one_call(pat, q, k, v, 0.2, inputs) is None         # nothing remembered yet
    pat(q, k, v, scale=0.2, **inputs)
    q, k, v = (_rand(B, Hq, 1, D, g=g), _rand(B, Hk, L, D, g=g), _rand(B, Hk, L, D, g=g))
    got = dec.one_call(pat, q, k, v, 0.2, inputs)
    assert (got is not None) == one
    assert dec.one_call(pat, q, k, v, 0.3, inputs) is None        # another scale: no entry
    if got is None:
        return
    a, z, mask, scale = got
    rows = q.reshape(B, Hk, Hq // Hk, D)
    out = torch.nn.functional.scaled_dot_product_attention(
        rows, k[:, :, a:z], v[:, :, a:z], attn_mask=mask, scale=scale).view(q.shape)
    assert torch.equal(out, pat(q, k, v, scale=0.2, **inputs))
    want = attention_reference(q, k, v, pat.mask(1, L, batch=B, num_heads=Hq, **inputs),
                               scale=0.2)[0]
    _close("one call", out, want)


def test_fast_path_steps_aside_for_autocast_dual_levels_and_transforms():
    """With a step remembered, a call under CPU autocast, inside an open forward-AD level or
    under ``torch.vmap`` / ``torch.func.grad`` does not take ``fast_step`` (which runs
    before those checks): it returns None there, the full path runs the call in the
    inputs' dtype, refuses a dual tensor, and batches / differentiates it, each output
    equal to the reference."""
    from torch.autograd import forward_ad as fwad
    from spattn.dsl.errors import SpattnBackendError
    dec.DECODE_PLANS.clear()
    pat = spattn.compile("causal & window(200)", backend="torch")
    g = torch.Generator().manual_seed(97)
    q, k, v = _rand(2, 4, 1, 32, g=g), _rand(2, 4, 300, 32, g=g), _rand(2, 4, 300, 32, g=g)
    _close("first", pat(q, k, v), _fast_ref(pat, q, k, v))
    assert dec.fast_step(pat, q, k, v) is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dec.fast_step(pat, q, k, v) is None
        o = pat(q, k, v)
    assert o.dtype == torch.float32
    _close("autocast", o, _fast_ref(pat, q, k, v))
    with fwad.dual_level():
        assert dec.fast_step(pat, q, k, v) is None
        _close("dual level, plain tensors", pat(q, k, v), _fast_ref(pat, q, k, v))
        with pytest.raises(SpattnBackendError, match="forward"):
            pat(fwad.make_dual(q, torch.randn_like(q)), k, v)
    qs, ks, vs = (t.unsqueeze(0).expand(3, *t.shape).clone() for t in (q, k, v))
    qs = qs + torch.randn(qs.shape, generator=g)
    out = torch.vmap(lambda a, b, c: pat(a, b, c))(qs, ks, vs)
    for i in range(3):
        _close(f"vmap[{i}]", out[i], _fast_ref(pat, qs[i], ks[i], vs[i]))
    gq = torch.func.grad(lambda a: pat(a, k, v).sum())(q)
    q2 = q.clone().requires_grad_()
    pat(q2, k, v).sum().backward()
    _close("func.grad", gq, q2.grad)
    escaped = []
    torch.vmap(lambda a: escaped.append(a) or a)(qs)
    assert dec.fast_step(pat, escaped[0], k, v) is None     # a vmap tensor after its vmap
    with pytest.raises(spattn.SpattnInputError, match="torch.func transform"):
        pat(escaped[0], k, v)


@pytest.mark.parametrize("src", ["causal", "causal & window(100)", "q - k >= 3",
                                 "k >= 10 & q >= k", "causal & (window(50) | sink(4))",
                                 "causal & (window(350) | sink(4))", "k % 2 == 0"],
                         ids=["causal", "window", "gap", "from-key-10", "streaming",
                              "streaming-wide", "even"])
def test_one_row_step_is_the_built_step(src):
    """``_row1_step`` (one query row, intervals exact at the row forming one run) gives the
    step ``_build_step`` builds, or None where that is not one call without a mask
    (streaming past its window: two runs; no closed form: even keys, one view under a
    mask); a decode loop through the fast path at new lengths
    is right."""
    dec.DECODE_PLANS.clear()
    pat = spattn.compile(src, backend="torch")
    g = torch.Generator().manual_seed(46)
    k, v = _rand(2, 2, 512, 16, g=g), _rand(2, 2, 512, 16, g=g)
    for L in (257, 300, 301, 302, 303, 304, 305, 511):
        q = _rand(2, 4, 1, 16, g=g)
        _close(f"L{L}", pat(q, k[:, :, :L], v[:, :, :L]),
               _fast_ref(pat, q, k[:, :, :L], v[:, :, :L]))
    plan = _plan(pat)
    for L in (257, 300, 400, 512):
        quick = plan._row1_step(L)
        built = plan._build_step((L, L), 0, 0, {})
        if quick is None:       # not one call without a mask: two runs, or scattered keys
            assert built.one is None or built.one[2] is not None, (src, L)
            continue
        assert src != "k % 2 == 0"
        assert quick.one == built.one
        (b0, b1, (s,)), = quick.groups
        (c0, c1, (t,)), = built.groups
        assert (b0, b1, s.runs, s.width, s.mask, s.full, s.empty, s.gather) == \
            (c0, c1, t.runs, t.width, t.mask, t.full, t.empty, t.gather)


#: Bounds a decode pattern's rows take: affine in the row and the length (sinks, windows,
#: gaps, offsets from the cache's end, a slope of 2), and mins / maxes of them.
_DECODE_ATOMS = ("causal", "window({a})", "sink({b})", "q - k >= {c}", "k >= {c}",
                 "k <= Lk - {b}", "k >= q - Lq - {c}", "2 * k <= q + {c}", "k >= Lk - {a}",
                 "k <= min(q, {a})", "k >= max(q - {a}, {c})", "q - k < {b} + Lq")


@st.composite
def _decode_sources(draw):
    n = draw(st.integers(1, 3))
    parts = [draw(st.sampled_from(_DECODE_ATOMS)).format(
        a=draw(st.integers(1, 40)), b=draw(st.integers(1, 6)), c=draw(st.integers(-3, 8)))
        for _ in range(n)]
    out = parts[0]
    for p in parts[1:]:
        out = f"({out}) {draw(st.sampled_from(['&', '|']))} ({p})"
    return out


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(src=st.one_of(_decode_sources(), bool_exprs()), Lq=st.integers(1, 16),
       G=st.integers(1, 3), lengths=st.lists(st.integers(1, 90), min_size=1, max_size=4),
       shift=st.integers(-40, 0))
def test_affine_row_intervals_are_the_host_functions(src, Lq, G, lengths, shift):
    """The rows' intervals from the bounds' affine forms (``_rows_affine``, int ranges over
    all rows) are the host function's row by row (``_rows_host``), None included, at short
    caches (the clamps to ``[0, L)``) and moved rows; the O(1) step of one affine interval
    (``_aff1_step``), where it applies, is the one-run step built from the rows; and that
    step has the pattern's dense mask: no key outside its run, ``mask == 0`` exactly where
    the pattern allows the key, for every query head of a key head."""
    try:
        pat = spattn.compile(src, backend="torch")
        plan = dec.DecodePlan(pat, "torch", B=1, Hq=G, Hk=1, Lq=Lq, D=16,
                              dtype=torch.float32, device=torch.device("cpu"),
                              bucket_len=dec.bucket(max(lengths) + Lq), paged=False, inputs={})
    except spattn.SpattnError:
        event("refused")
        return
    if plan._row_forms is None:
        event("host function" if plan._rows_fn is not None else "no closed form")
        return
    event("affine forms")
    for n in lengths:
        L = n + Lq
        for off in (L - Lq, L - Lq + shift):
            rows = plan._rows_affine(off, L)
            assert rows == plan._rows_host(off, L, 0), (src, L, off)
            step = plan._one_run_step(L, off)
            quick = plan._aff1_step(L, off)
            if quick is not None:
                event("O(1) one-run step")
                assert step is not None and quick.one[:2] == step.one[:2], (src, L, off)
                assert (quick.one[2] is None) == (step.one[2] is None), (src, L, off)
                if step.one[2] is not None:
                    assert torch.equal(quick.one[2], step.one[2]), (src, L, off)
                (s,), (t,) = quick.groups[0][2], step.groups[0][2]
                assert (s.runs, s.width, s.full, s.empty, s.gather) == \
                    (t.runs, t.width, t.full, t.empty, t.gather), (src, L, off)
            if step is None:
                continue
            event("one-run step")
            a, z, mask = step.one
            dense = pat.mask(Lq, L, q_offset=off)[0, 0]              # [Lq, L]
            assert not dense[:, :a].any() and not dense[:, z:].any(), (src, L)
            got = torch.ones(Lq * G, z - a, dtype=torch.bool) if mask is None else \
                mask[0, 0] == 0
            assert torch.equal(got, dense[:, a:z].repeat(G, 1)), (src, L)


@pytest.mark.parametrize("Lq", [1, 4, 16], ids=lambda n: f"Lq{n}")
def test_sinks_beside_a_window_take_the_constant_time_step(Lq):
    """Streaming (``causal & (window(40) | sink(4))``): while the sinks touch the window
    every row's keys are one interval and ``_aff1_step`` gives the row-built step; once
    some row's are apart it declines (the rows' build decides: one run while other rows
    bridge the gap, else the general build); each step is the reference's."""
    dec.DECODE_PLANS.clear()
    pat = spattn.compile("causal & (window(40) | sink(4))", backend="torch")
    plan = dec.DecodePlan(pat, "torch", B=1, Hq=2, Hk=1, Lq=Lq, D=16, dtype=torch.float32,
                          device=torch.device("cpu"), bucket_len=512, paged=False, inputs={})
    assert plan._aff1 is not None
    g = torch.Generator().manual_seed(60 + Lq)
    k, v = _rand(1, 1, 300, 16, g=g), _rand(1, 1, 300, 16, g=g)
    kinds = []
    for L in (16, 30, 44, 44 + Lq - 1, 45 + Lq - 1, 60, 257, 299):
        if L < Lq:
            continue
        quick, built = plan._aff1_step(L, L - Lq), plan._one_run_step(L, L - Lq)
        kinds.append(quick is not None)
        if quick is not None:
            assert built is not None and quick.one[:2] == built.one[:2], L
            assert (quick.one[2] is None) == (built.one[2] is None), L
            if built.one[2] is not None:
                assert torch.equal(quick.one[2], built.one[2]), L
        if L >= 256:
            q = _rand(1, 2, Lq, 16, g=g)
            _close(f"L{L}", pat(q, k[:, :, :L], v[:, :, :L]),
                   _reference(pat, q, k[:, :, :L], v[:, :, :L], [L], {})[0])
    assert any(kinds) and not kinds[-1], kinds


def test_fast_path_last_step_is_keyed_by_length_and_view_bytes(monkeypatch):
    """The fast path's last step (``DecodePlan._last_step``) serves only its own length and
    ``VIEW_BYTES``: alternating lengths, and a changed ``VIEW_BYTES`` (streaming past its
    window: the sinks become a view of their own), each give the reference's output."""
    dec.DECODE_PLANS.clear()
    pat = spattn.compile("causal & (window(100) | sink(4))", backend="torch")
    g = torch.Generator().manual_seed(70)
    k, v = _rand(1, 2, 400, 16, g=g), _rand(1, 2, 400, 16, g=g)
    pat(_rand(1, 4, 1, 16, g=g), k[:, :, :300], v[:, :, :300])     # the full path
    for L in (300, 301, 301, 300, 399, 300):
        q = _rand(1, 4, 1, 16, g=g)
        _close(f"L{L}", pat(q, k[:, :, :L], v[:, :, :L]),
               _fast_ref(pat, q, k[:, :, :L], v[:, :, :L]))
        assert _plan(pat)._last_step[0] == L
    monkeypatch.setattr(dec, "VIEW_BYTES", 0)
    q = _rand(1, 4, 1, 16, g=g)
    assert dec.fast_step(pat, q, k[:, :, :300], v[:, :, :300]) is None   # another signature
    _close("views", pat(q, k[:, :, :300], v[:, :, :300]),
           _fast_ref(pat, q, k[:, :, :300], v[:, :, :300]))
    o = dec.fast_step(pat, q, k[:, :, :300], v[:, :, :300])
    assert o is not None and _plan(pat)._last_step[1] == 0
    _close("views, fast", o, _fast_ref(pat, q, k[:, :, :300], v[:, :, :300]))


def _variants(g):
    """``(name, (q, k, v), call keywords)`` of calls that differ from the base call of
    :func:`test_fast_path_serves_only_its_step` (q [2, 4, 1, 32], a [2, 2, 300, 32]
    cache, ``causal & window(100)``) in one thing each."""
    q, k, v = _rand(2, 4, 1, 32, g=g), _rand(2, 2, 301, 32, g=g), _rand(2, 2, 301, 32, g=g)
    wide_k, wide_v = _rand(2, 2, 300, 64, g=g), _rand(2, 2, 300, 64, g=g)
    return [
        ("a longer cache, one bucket", (q, k, v), {}),
        ("a shorter cache", (q, k[:, :, :299], v[:, :, :299]), {}),
        ("another bucket", (q, k[:, :, :256], v[:, :, :256]), {}),
        ("q_offset", (q, k[:, :, :300], v[:, :, :300]), {"q_offset": 150}),
        ("scale", (q, k[:, :, :300], v[:, :, :300]), {"scale": 0.05}),
        ("D-strided", (q, wide_k[..., ::2], wide_v[..., 1::2]), {}),
        ("bf16", (q.bfloat16(), k[:, :, :300].bfloat16(), v[:, :, :300].bfloat16()), {}),
        ("fp16", (q.half(), k[:, :, :300].half(), v[:, :, :300].half()), {}),
        ("return_lse", (q, k[:, :, :300], v[:, :, :300]), {"return_lse": True}),
        ("two query rows", (_rand(2, 4, 2, 32, g=g), k[:, :, :300], v[:, :, :300]), {}),
        ("fewer query heads", (q[:, :2], k[:, :, :300], v[:, :, :300]), {}),
    ]


_SERVED = ("a longer cache, one bucket", "a shorter cache", "D-strided")


def test_fast_path_serves_only_its_step():
    """After a call left its plan's fast entry, a call that differs in its bucket, position,
    scale, dtype, query shape or results is not served from it (``fast_step`` refuses it);
    one at another length of the bucket or with other strides (non-unit along D too) is,
    with the step of its own length; each is right."""
    pat = spattn.compile("causal & window(100)", backend="torch")
    g = torch.Generator().manual_seed(42)
    for name, (q, k, v), kw in _variants(g):
        dec.DECODE_PLANS.clear()
        bq, bk, bv = _rand(2, 4, 1, 32, g=g), _rand(2, 2, 300, 32, g=g), _rand(2, 2, 300, 32, g=g)
        pat(bq, bk, bv)
        assert dec.fast_step(pat, bq, bk, bv) is not None
        if not kw:      # any length of the bucket, any strides: served
            served = dec.fast_step(pat, q, k, v)
            assert (served is not None) == (name in _SERVED), name
            if served is not None:
                _close(f"{name} (fast_step)", served,
                       _fast_ref(pat, q.double(), k.double(), v.double()))
        got = pat(q, k, v, **kw)
        if kw.get("return_lse"):
            got = got[0]
        L = k.shape[2]
        if "q_offset" in kw:
            want = attention_reference(q, k, v, pat.mask(1, L, q_offset=kw["q_offset"]))[0]
        else:
            want = _fast_ref(pat, q.double(), k.double(), v.double(), scale=kw.get("scale"))
        _close(name, got, want, rtol=2e-3 if q.dtype == torch.float32 else 3e-2)


def test_fast_path_reads_seq_lens_every_step():
    """pat.decode with ``seq_lens``: the fast path reads the lengths every call; writing the
    tensor in place (a decode loop) or passing other values is a new step of the memo,
    values out of range are left to the full path (refused with ``check=True``, clamped with
    ``check=False``), unequal lengths run the step's groups."""
    dec.DECODE_PLANS.clear()
    pat = spattn.compile("causal & window(50)", backend="torch")
    g = torch.Generator().manual_seed(43)
    q, k, v = _rand(2, 2, 1, 16, g=g), _rand(2, 2, 400, 16, g=g), _rand(2, 2, 400, 16, g=g)
    lens = torch.tensor([300, 300])
    for step in range(3):
        lens += step                        # in place: the same tensor, new values
        want = _fast_ref(pat, q, k, v, lens.tolist())
        _close(f"step {step}", pat.decode(q, k, v, seq_lens=lens), want)
        _close(f"step {step} again", pat.decode(q, k, v, seq_lens=lens), want)
        assert dec.fast_step(pat, q, k, v, None, lens, False) is not None
    _close("int32", dec.fast_step(pat, q, k, v, None, lens.to(torch.int32), False),
           _fast_ref(pat, q, k, v, lens.tolist()))
    for bad in (lens.float(), lens[:1], lens.view(2, 1), torch.tensor([500, 300]),
                torch.tensor([300, 0])):
        assert dec.fast_step(pat, q, k, v, None, bad, False) is None
    bad = torch.tensor([500, 500])
    _close("clamped", pat.decode(q, k, v, seq_lens=bad, check=False),
           _fast_ref(pat, q, k, v, [400, 400]))
    with pytest.raises(SpattnValueError, match="seq_lens holds values 500..500"):
        pat.decode(q, k, v, seq_lens=bad)
    # unequal lengths: two groups (run_torch), served from the entry
    unequal = torch.tensor([200, 300])
    want = _fast_ref(pat, q, k, v, [200, 300])
    _close("unequal", pat.decode(q, k, v, seq_lens=unequal), want)
    _close("unequal (fast_step)", dec.fast_step(pat, q, k, v, None, unequal, False), want)


def test_fast_path_per_pattern_and_refusals():
    """Each pattern object has its own remembered plan (Gemma's alternating local and global
    layers); tensors needing grad, subclasses, other devices' or mixed dtypes are refused;
    an evicted plan leaves no entry behind."""
    dec.DECODE_PLANS.clear()
    local = spattn.compile("causal & window(40)", backend="torch")
    glob = spattn.compile("causal", backend="torch")
    g = torch.Generator().manual_seed(44)
    q, k, v = _rand(1, 2, 1, 16, g=g), _rand(1, 2, 300, 16, g=g), _rand(1, 2, 300, 16, g=g)
    for _ in range(2):
        _close("local", local(q, k, v), _fast_ref(local, q, k, v))
        _close("global", glob(q, k, v), _fast_ref(glob, q, k, v))
    assert dec.fast_step(local, q, k, v) is not None and dec.fast_step(glob, q, k, v) is not None
    same_source = spattn.compile("causal", backend="torch")
    assert dec.fast_step(same_source, q, k, v) is None
    qg = q.clone().requires_grad_()
    assert dec.fast_step(glob, qg, k, v) is None
    o = glob(qg, k, v)
    o.sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()
    assert dec.fast_step(glob, torch.nn.Parameter(q), k, v) is None
    assert dec.fast_step(glob, q, k.double(), v) is None
    assert dec.fast_step(glob, q, k.to("meta"), v) is None
    assert dec.fast_step(glob, q, k.to_sparse(), v) is None
    assert dec.fast_step(glob, q, k.tolist(), v) is None
    for i in range(dec.DECODE_PLANS.size + 1):         # evict both plans
        kk = _rand(1, 2, 300, 16, g=g)
        spattn.compile(f"causal & window({i + 1})", backend="torch")(q, kk, kk)
    assert dec.fast_step(glob, q, k, v) is None and dec.fast_step(local, q, k, v) is None
    assert all(p in dec.DECODE_PLANS._plans.values() for _, p in
               dec.DECODE_PLANS._last.values())
    assert len(dec.DECODE_PLANS._last) <= dec.DECODE_PLANS.size


# ------------------------------------------------------------------ argument checks

def _bad_cases():
    q, k = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 300, 32)
    return {
        "q 3-D": (q[0], k, k),
        "v shorter": (q, k, k[:, :, :299]),
        "batch": (q, torch.randn(2, 2, 300, 32), torch.randn(2, 2, 300, 32)),
        "heads not a multiple": (torch.randn(1, 3, 1, 32), k, k),
        "D of k": (q, torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)),
        "D too small": (torch.randn(1, 4, 1, 8), torch.randn(1, 2, 300, 8),
                        torch.randn(1, 2, 300, 8)),
        "dtype": (q, k.double(), k.double()),
        "fp64": (q.double(), k.double(), k.double()),
        "meta": (q, k.to("meta"), k.to("meta")),
        "empty heads": (torch.randn(1, 0, 1, 32), k, k),
        "not a tensor": (q, k.tolist(), k),
        "sparse": (q, k, k.to_sparse()),
    }


@pytest.mark.parametrize("name", list(_bad_cases()))
def test_fast_accept_refuses_what_validate_refuses(name):
    q, k, v = _bad_cases()[name]
    assert not api._valid(q, k, v)
    with pytest.raises(SpattnInputError):
        api.validate(q, k, v)
    pat = spattn.compile("causal", backend="torch")
    if name == "empty heads":           # a call returns SDPA's empty answer (docs/usage.md)
        assert pat(q, k, v).shape == (1, 0, 1, 32)
    elif name == "fp64":                # the torch backend computes float64 calls
        assert pat(q, k, v).dtype == torch.float64
    elif name == "D too small":         # and takes any head dim (not a decode step)
        assert pat(q, k, v).shape == q.shape
    else:
        with pytest.raises(SpattnInputError):
            pat(q, k, v)
    with pytest.raises(SpattnInputError):
        pat.decode(q, k, v)


def test_fast_accept_takes_what_validate_takes():
    g = torch.Generator().manual_seed(5)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for Hq, Hk, D in ((4, 2, 16), (8, 8, 256), (6, 1, 64)):
            q, k = _rand(2, Hq, 1, D, g=g, dtype=dt), _rand(2, Hk, 300, D, g=g, dtype=dt)
            assert api._valid(q, k, k.transpose(2, 3).contiguous().transpose(2, 3))
            api.validate(q, k, k)


@pytest.mark.parametrize("keyword,value,why", [
    ("layout", "bshd", r"transpose\(1, 2\)"), ("plan", None, "its own plans"),
    ("order", None, "order of keys"), ("deterministic", True, "inference only")])
def test_call_keywords_decode_does_not_take(keyword, value, why):
    """A keyword of pat(q, k, v) given to pat.decode is refused by name (not read as a
    runtime input, nor met first as a shape error of [B, L, H, D] tensors)."""
    pat = spattn.compile("causal & window(8)", backend="torch")
    g = torch.Generator().manual_seed(14)
    q, k, v = _rand(1, 1, 4, 16, g=g), _rand(1, 40, 2, 16, g=g), _rand(1, 40, 2, 16, g=g)
    with pytest.raises(SpattnParamError, match=f"decode takes no {keyword}=.*{why}"):
        pat.decode(q, k, v, **{keyword: value})
