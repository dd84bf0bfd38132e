"""The CPU backend's plans: which calls cover a pattern, and the properties the backend relies on.

Strategy choices are checked on the patterns the plan module documents (causal: one dense
call with the kernel's causal flag and no mask; windows: one band call over strided views;
documents: segments; sinks with windows: gathered tiles). Every numeric check compares
with the float64 dense reference on fresh random inputs.
"""
import threading

import pytest
import torch

import spattn
from spattn.runtime import cpu_ops, cpu_plan, torch_backend
from spattn.runtime.reference import attention_reference


def _docs(L, n, g):
    cuts = torch.randperm(L - 1, generator=g)[: n - 1] + 1
    ids = torch.zeros(L, dtype=torch.int64)
    ids[cuts] = 1
    return ids.cumsum(0)


def _plan(src, L=1024, H=8, Hk=None, Lq=None, strategy=None, **ins):
    pat = spattn.compile(src, backend="torch")
    q = torch.empty(1, H, Lq or L, 64)
    k = torch.empty(1, Hk or H, L, 64)
    return torch_backend.make_plan(pat, q, k, q_offset=None, inputs=ins, strategy=strategy)


# ------------------------------------------------------------ strategies

def test_causal_is_one_unmasked_causal_call():
    plan = _plan("causal")
    assert plan.strategy == "dense" and len(plan.calls) == 1 and plan.covers
    c = plan.calls[0]
    assert c.is_causal and c.mask is None


def test_window_is_one_band_call_over_views():
    plan = _plan("causal & window(256)")
    assert plan.strategy == "band" and len(plan.calls) == 1
    c = plan.calls[0]
    assert c.row_step is not None and c.col_step is not None      # strided views, no gathers
    assert c.W <= 256 + 2 * cpu_plan.BLOCK
    assert plan.pairs() < 0.4 * 8 * 1024 * 1024


def test_documents_are_segments_with_the_causal_flag():
    g = torch.Generator().manual_seed(0)
    plan = _plan("causal & same(doc)", L=2048, doc=_docs(2048, 10, g))
    assert plan.strategy == "segments" and plan.partition
    assert all(c.is_causal and c.mask is None for c in plan.calls)
    assert len(plan.calls) <= 8
    assert plan.pairs() < 0.3 * 8 * 2048 * 2048


def test_sink_and_window_gathers_keys():
    plan = _plan("causal & (window(128) | sink(4))", L=4096)
    assert plan.strategy == "keys"
    assert plan.pairs() < 0.1 * 8 * 4096 * 4096
    assert _plan("causal & (window(128) | sink(4))", L=4096, strategy="tiles").strategy == "tiles"


def test_decode_reads_only_its_key_range():
    plan = _plan("causal & window(256)", L=8192, Lq=16, H=32, Hk=8)
    assert len(plan.calls) == 1 and plan.covers
    c = plan.calls[0]
    assert c.W <= 256 + 2 * cpu_plan.BLOCK and c.R == 16
    assert c.mask.shape[2] == 4 * 16                               # GQA heads folded into rows


def test_predicate_is_evaluated_on_partial_tiles_only(monkeypatch):
    """Masks and the planner's checks evaluate the pattern on PARTIAL tiles' pairs only."""
    L, B = 1024, cpu_plan.BLOCK
    pat = spattn.compile("causal & window(200)", backend="torch")
    cls = pat.tiles(L, L, B, B)[0, 0]
    partial = int((cls == 1).sum())
    evaluated = []
    real = cpu_plan.evaluate

    def spy(ir, env, inputs):
        evaluated.append(torch.broadcast_shapes(env["q"].shape, env["k"].shape).numel())
        return real(ir, env, inputs)

    monkeypatch.setattr(cpu_plan, "evaluate", spy)
    q = torch.empty(1, 2, L, 32)
    for strategy in ("band", "dense", "tiles"):
        evaluated.clear()
        torch_backend.make_plan(pat, q, q, q_offset=None, inputs={}, strategy=strategy)
        assert sum(evaluated) <= 2 * partial * B * B, strategy


# ------------------------------------------------------------ properties

@pytest.mark.parametrize("src,strategy", [("causal & same(doc)", "segments"),
                                          ("causal & (window(40) | sink(3))", "tiles"),
                                          ("causal & window(70)", "band")],
                         ids=["segments", "tiles", "band"])
def test_backward_is_deterministic(src, strategy):
    g = torch.Generator().manual_seed(1)
    pat = spattn.compile(src, backend="torch")
    B, H, L, D = 2, 4, 300, 32
    q, k, v, do = (torch.randn(B, H, L, D, generator=g) for _ in range(4))
    ins = {"doc": _docs(L, 6, g)} if "doc" in src else {}
    plan = torch_backend.make_plan(pat, q, k, q_offset=None, inputs=ins, strategy=strategy)
    o, lse = torch_backend.fwd_planned(plan, q, k, v, scale=0.2)
    a = torch_backend.bwd_planned(plan, q, k, v, o, lse, do, scale=0.2)
    b = torch_backend.bwd_planned(plan, q, k, v, o, lse, do, scale=0.2)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_plans_are_thread_safe():
    """Calls from several threads through the plan cache (runtime/plan.py) agree."""
    pat = spattn.compile("causal & window(24)", backend="torch")
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 130, 16, generator=g) for _ in range(3))
    want = torch_backend.fwd(pat, q, k, v, scale=0.25, q_offset=None, inputs={})[0]
    errors = []

    def work(i):
        try:
            for L in (130, 97 + i, 130):
                o = pat(q[:, :, :L], k[:, :, :L], v[:, :, :L], scale=0.25)
                if L == 130:
                    assert torch.equal(o, want)
        except Exception as e:                   # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_generic_primitive_matches_the_kernel(monkeypatch):
    """The matmul-softmax primitive (used off the CPU) gives the reference's results."""
    monkeypatch.setattr(torch_backend, "_use_flash", lambda x: False)
    g = torch.Generator().manual_seed(3)
    pat = spattn.compile("causal & same(doc) & q - k < 60", backend="torch")
    B, Hq, Hk, L, D = 2, 4, 2, 200, 16
    q = torch.randn(B, Hq, L, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hk, L, D, generator=g, dtype=torch.float64) for _ in range(2))
    ins = {"doc": _docs(L, 4, g)}
    mask = pat.mask(L, L, num_heads=Hq, batch=B, **ins)
    for strategy in ("band", "dense", "segments", "tiles"):
        plan = torch_backend.make_plan(pat, q, k, q_offset=None, inputs=ins, strategy=strategy)
        o, lse = torch_backend.fwd_planned(plan, q, k, v, scale=0.25)
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        ro, rl = attention_reference(qr, kr, vr, mask, scale=0.25)
        torch.testing.assert_close(o, ro.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse, rl.detach(), rtol=1e-10, atol=1e-10)
        do = torch.randn(o.shape, generator=g, dtype=torch.float64)
        (ro * do).sum().backward()
        got = torch_backend.bwd_planned(plan, q, k, v, o, lse, do, scale=0.25)
        for a, b in zip(got, (qr.grad, kr.grad, vr.grad)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _against_reference(pat, plan, q, k, v, ins, g, scale=0.25, dlse=False):
    """Forward and backward of ``plan`` (float64) against the reference on the pattern's
    mask: o, the lse of rows with a key (-inf and 0 for the others), and the gradients of
    q, k, v (with an lse gradient where ``dlse``). Returns the gathers the calls made."""
    gathers = []
    real = torch_backend._gather
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch_backend, "_gather", lambda *a: gathers.append(1) or real(*a))
        o, lse = torch_backend.fwd_planned(plan, q, k, v, scale=scale)
        do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)
        dl = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(o.device) \
            if dlse else None
        got = torch_backend.bwd_planned(plan, q, k, v, o, lse, do, scale=scale, dlse=dl)
    B, Hq, Lq, _ = q.shape
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    mask = pat.mask(Lq, k.shape[2], num_heads=Hq, batch=B, **ins)
    ro, rl = attention_reference(qr, kr, vr, mask, scale=scale)
    torch.testing.assert_close(o, ro.detach(), rtol=1e-10, atol=1e-10)
    seen = mask.to(o.device).expand(B, Hq, Lq, k.shape[2]).any(-1)
    torch.testing.assert_close(lse[seen], rl.detach()[seen], rtol=1e-10, atol=1e-10)
    assert bool(torch.isneginf(lse[~seen]).all()) and not bool(o[~seen].any())
    loss = (ro * do).sum()
    if dlse:
        loss = loss + (rl.masked_fill(~seen, 0.0) * dl).sum()
    loss.backward()
    for name, a, b in zip("qkv", got, (qr.grad, kr.grad, vr.grad)):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    return gathers


_KEYS_CASES = {
    # name: (source, B, Hq, Hk, Lq, Lk, inputs(B, L, g))
    "columns-beside-window": ("causal & (window(40) | k % 64 == 0)", 1, 4, 4, 300, 300, None),
    "keep-mask": ("causal & keep[k]", 2, 4, 2, 257, 257,
                  lambda B, L, g: {"keep": torch.rand(L, generator=g) < 0.1}),
    "keep-per-batch": ("keep[b, k] & q - k >= -5", 2, 2, 2, 130, 200,
                       lambda B, L, g: {"keep": torch.rand(B, L, generator=g) < 0.2}),
    "fixed-per-head": ("fixed(64, 4 + h)", 1, 4, 2, 333, 333, None),
    "strided-decode": ("causal & k % 16 < 2", 2, 4, 1, 7, 500, None),
    "rows-without-keys": ("k % 50 == 0 & q % 3 != 0", 1, 2, 2, 200, 200, None),
    # the last item's rows end before the first element's padded rows do
    "padded-rows-per-batch": ("k - q <= 64 & q - k <= 10 & k < first[b]", 3, 1, 1, 646, 700,
                              lambda B, L, g: {"first": torch.tensor([702, 699, 428])}),
}


@pytest.mark.parametrize("name", sorted(_KEYS_CASES))
def test_keys_strategy_against_the_reference(name):
    """The ``keys`` strategy (per row block only the keys some of its rows may see,
    gathered) is exact in float64, forward and backward, over GQA, batches whose keys
    differ, head-dependent patterns, bottom-right rows and rows that see no key."""
    src, B, Hq, Hk, Lq, Lk, make = _KEYS_CASES[name]
    g = torch.Generator().manual_seed(len(name))
    pat = spattn.compile(src, backend="torch")
    q = torch.randn(B, Hq, Lq, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hk, Lk, 16, generator=g, dtype=torch.float64) for _ in range(2))
    ins = make(B, Lk, g) if make else {}
    plan = torch_backend.make_plan(pat, q, k, q_offset=None, inputs=ins, strategy="keys")
    assert plan.strategy == "keys"
    _against_reference(pat, plan, q, k, v, ins, g)


@pytest.mark.parametrize("src", ["causal & (window(64) | k % 64 == 0)", "causal & keep[k]",
                                 "fixed(128, 8)"], ids=["columns", "keep", "fixed"])
def test_keys_strategy_is_chosen_for_few_keys_in_partial_tiles(src):
    """Where the PARTIAL tiles hold few allowed keys the cost model picks the ``keys``
    strategy, which computes a small part of the pairs the tiles hold."""
    L = 2048
    ins = {"keep": torch.rand(L, generator=torch.Generator().manual_seed(0)) < 0.05} \
        if "keep" in src else {}
    plan = _plan(src, L=L, **ins)
    assert plan.strategy == "keys", plan.strategy
    assert plan.pairs() < 0.2 * 8 * L * L


def _qkv(g, B, Hq, Hk, Lq, Lk, bshd):
    """Fresh float64 q ``[B, Hq, Lq, 16]``, k and v ``[B, Hk, Lk, 16]``; ``bshd``: views of
    ``[B, L, H, D]`` storage."""
    def rand(H, L):
        if bshd:
            return torch.randn(B, L, H, 16, generator=g, dtype=torch.float64).transpose(1, 2)
        return torch.randn(B, H, L, 16, generator=g, dtype=torch.float64)
    return rand(Hq, Lq), rand(Hk, Lk), rand(Hk, Lk)


_BATCH_ITEMS = {
    # name: (source, B, Hq, Hk, Lq, Lk, inputs(B, Hq, L, g), bshd, one mask row)
    "left-padding-B4-H4/4": ("causal & k >= first[b]", 4, 4, 4, 200, 200,
                             lambda B, H, L, g: {"first": torch.tensor([0, 17, 150, 3])},
                             False, True),
    "left-padding-GQA-B3-H6/2-bshd": ("causal & k >= first[b]", 3, 6, 2, 200, 200,
                                      lambda B, H, L, g: {"first": torch.tensor([40, 0, 9])},
                                      True, False),
    "all-padding-row-B2-H2/1": ("causal & k >= first[b]", 2, 2, 1, 130, 130,
                                lambda B, H, L, g: {"first": torch.tensor([0, 131])}, False,
                                False),
    "keep-per-head-B2-H4/2": ("keep[b, h, k] & q - k >= -3", 2, 4, 2, 150, 160,
                              lambda B, H, L, g: {"keep": torch.rand(B, H, L, generator=g)
                                                  < 0.7}, True, False),
    "causal-keep-per-head-B2-H3/3-bshd": (
        "causal & keep[b, h, k] & k % 5 != 1", 2, 3, 3, 140, 140,
        lambda B, H, L, g: {"keep": torch.rand(B, H, L, generator=g) < 0.6}, True, True),
    "bottom-right-B2-H2/2": ("causal & k >= first[b]", 2, 2, 2, 70, 190,
                             lambda B, H, L, g: {"first": torch.tensor([5, 100])}, False,
                             False),
    "late-keys-B2-H4/2": ("causal & k >= first[b]", 2, 4, 2, 200, 200,
                          lambda B, H, L, g: {"first": torch.tensor([70, 130])}, False, False),
    "late-keys-B2-H2/2": ("causal & (k >= first[b] | k < 2)", 2, 2, 2, 200, 200,
                          lambda B, H, L, g: {"first": torch.tensor([70, 201])}, False, True),
    "head-without-keys-B1-H2/2": ("causal & keep[h, k]", 1, 2, 2, 200, 200,
                                  lambda B, H, L, g: {"keep": torch.arange(L).expand(H, L)
                                                      < torch.tensor([[100], [0]])},
                                  False, True),
    "element-without-keys-B2-H2/2": ("causal & k < n[b]", 2, 2, 2, 300, 300,
                                     lambda B, H, L, g: {"n": torch.tensor([100, 0])},
                                     False, True),
    "shared-keep-B3-H2/2": ("causal & keep[k]", 3, 2, 2, 150, 150,
                            lambda B, H, L, g: {"keep": torch.rand(L, generator=g) < 0.5},
                            False, True),
}


@pytest.mark.parametrize("name", sorted(_BATCH_ITEMS))
def test_one_item_per_batch_element_reads_views(name):
    """A pattern that depends on the batch (a padding) in one dense item per batch
    element: the call reads q, k and v as views (no gather), and is exact in float64,
    forward and backward, over grouped heads, [B, L, H, D] storage, per-head masks, a
    row of an element that sees no key and bottom-right rows. Where the pattern is causal
    and a predicate of the keys, the kernel's causal flag and one mask row per item and
    head do (a batch that shares its items too)."""
    src, B, Hq, Hk, Lq, Lk, make, bshd, column = _BATCH_ITEMS[name]
    g = torch.Generator().manual_seed(len(name))
    pat = spattn.compile(src, backend="torch")
    q, k, v = _qkv(g, B, Hq, Hk, Lq, Lk, bshd)
    ins = make(B, Hq, Lk, g)
    plan = torch_backend.make_plan(pat, q, k, q_offset=None, inputs=ins, strategy="dense")
    (c,) = plan.calls
    assert plan.covers and (c.batch_items and c.n == B) == (B > 1 and "shared" not in name)
    assert (c.is_causal and c.mask.shape[2] == 1) == column, plan
    assert c.col0 > 0 or "late" not in name or column
    gathers = _against_reference(pat, plan, q, k, v, ins, g)
    if Hq == Hk or not bshd:
        assert not gathers                   # (grouped heads of [B, L, H, D] are gathered)


@pytest.mark.parametrize("src,B,Hq,Hk,Lq,Lk,bshd", [
    ("causal & window(100) & k >= first[b]", 3, 4, 4, 700, 700, False),
    ("causal & window(100) & k >= first[b]", 2, 6, 2, 700, 700, True),
    ("q - k <= 70 & k - q <= 30 & k >= first[b]", 2, 2, 1, 650, 650, False),
    ("causal & window(90) & k >= first[b]", 3, 4, 2, 500, 620, False)],
    ids=["window-B3-H4/4", "window-GQA-B2-H6/2-bshd", "two-sided-B2-H2/1",
         "bottom-right-B3-H4/2"])
def test_band_per_batch_element_over_views(src, B, Hq, Hk, Lq, Lk, bshd):
    """A band of a pattern that depends on the batch (a sliding window over a padded
    batch) as a call per batch element over strided views of that element (``Call.batch0``),
    windows reaching past either end of the keys included; exact in float64, forward and
    backward."""
    g = torch.Generator().manual_seed(Lq + Hq + B)
    pat = spattn.compile(src, backend="torch")
    q, k, v = _qkv(g, B, Hq, Hk, Lq, Lk, bshd)
    ins = {"first": torch.tensor([0, 150, 9][:B])}
    plan = torch_backend.make_plan(pat, q, k, q_offset=None, inputs=ins, strategy="band")
    assert [c.batch0 for c in plan.calls] == list(range(B)), plan
    assert all(c.row_step is not None and c.col_step is not None for c in plan.calls)
    gathers = _against_reference(pat, plan, q, k, v, ins, g)
    assert bshd or Hq != Hk or not gathers     # (grouped rows of a band: gathered queries)


def test_padded_window_is_a_band_call_per_element():
    """A sliding window over a left-padded batch of four at 2048 tokens: a band call per
    batch element over views, not the items gathered."""
    pat = spattn.compile("causal & window(256) & k >= first[b]", backend="torch")
    q = torch.empty(4, 8, 2048, 64)
    plan = torch_backend.make_plan(pat, q, q, q_offset=None,
                                   inputs={"first": torch.tensor([0, 170, 682, 7])})
    assert plan.strategy == "band" and [c.batch0 for c in plan.calls] == [0, 1, 2, 3], plan
    assert plan.pairs() < 0.2 * 4 * 8 * 2048 * 2048


@pytest.mark.parametrize("src,B,Hq,Hk,L,make", [
    ("causal", 1, 8, 2, 1100, None),
    ("causal", 2, 6, 3, 1030, None),
    ("causal & k >= first[b]", 3, 4, 1, 1024, lambda B, L: {"first": torch.tensor([0, 60, 3])}),
    ("causal & keep[k] & k % 4 != 2", 1, 4, 2, 1090,
     lambda B, L: {"keep": torch.arange(L) % 7 != 3})],
    ids=["causal-B1-H8/2-L1100", "causal-B2-H6/3-L1030", "padding-B3-H4/1-L1024",
         "keep-B1-H4/2-L1090"])
def test_grouped_heads_run_ungrouped_for_the_causal_flag(src, B, Hq, Hk, L, make):
    """Causal attention with grouped-query heads: each key head repeated for its query
    heads (``CpuPlan.expand``), one item with the kernel's causal flag instead of grouped
    rows under a mask (from about a thousand keys on: below ATen's kv split of 512 the flag
    skips nothing); exact in float64, forward and backward (with an lse gradient), the
    repeated heads' gradients summed back."""
    g = torch.Generator().manual_seed(L + Hq)
    pat = spattn.compile(src, backend="torch")
    q = torch.randn(B, Hq, L, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hk, L, 16, generator=g, dtype=torch.float64) for _ in range(2))
    ins = make(B, L) if make else {}
    plan = torch_backend.make_plan(pat, q, k, q_offset=None, inputs=ins)
    assert plan.expand == Hq // Hk and plan.Hk == Hq, plan
    assert all(c.is_causal for c in plan.calls), plan
    _against_reference(pat, plan, q, k, v, ins, g, scale=0.3, dlse=True)


_CUDA_FORMS = {
    # name: (source, B, Hq, Hk, Lq, Lk, inputs(B, L), strategy, the plan's form)
    "batch-items-column-B4-H4/4": ("causal & k >= first[b]", 4, 4, 4, 200, 200,
                                   lambda B, L: {"first": torch.tensor([0, 17, 150, 3])},
                                   "dense", lambda p: p.calls[0].batch_items),
    "batch-items-keep-B2-H4/2": ("keep[b, h, k] & q - k >= -3", 2, 4, 2, 150, 160,
                                 lambda B, L: {"keep": torch.arange(B * 4 * L).view(B, 4, L)
                                               % 7 != 2}, "dense",
                                 lambda p: p.calls[0].batch_items),
    "batch0-window-B3-H4/2": ("causal & window(90) & k >= first[b]", 3, 4, 2, 500, 620,
                              lambda B, L: {"first": torch.tensor([0, 150, 9])}, "band",
                              lambda p: [c.batch0 for c in p.calls] == [0, 1, 2]),
    "expand-padding-B3-H4/1": ("causal & k >= first[b]", 3, 4, 1, 1024, 1024,
                               lambda B, L: {"first": torch.tensor([0, 60, 3])}, None,
                               lambda p: p.expand == 4),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(_CUDA_FORMS))
def test_plan_forms_on_cuda_tensors(name):
    """The torch backend runs the CPU plan's call forms on CUDA tensors too (one item per
    batch element as views, one mask row per item, a band per batch element, K and V
    repeated per query head): exact in float64 there, forward and backward."""
    src, B, Hq, Hk, Lq, Lk, make, strategy, form = _CUDA_FORMS[name]
    g = torch.Generator().manual_seed(Lq + Hq)
    pat = spattn.compile(src, backend="torch")
    q, k, v = (t.cuda() for t in _qkv(g, B, Hq, Hk, Lq, Lk, False))
    ins = {n: t.cuda() for n, t in make(B, Lk).items()}
    plan = torch_backend.make_plan(pat, q, k, q_offset=None, inputs=ins, strategy=strategy)
    assert form(plan), plan
    _against_reference(pat, plan, q, k, v, ins, g, dlse=True)


def test_grouped_heads_keep_their_rows_where_the_flag_does_not_help():
    """A window with grouped-query heads stays one band over grouped rows (no copy of K
    and V): the repeated heads pay only where the causal flag saves the mask."""
    q = torch.empty(1, 32, 2048, 64)
    k = torch.empty(1, 8, 2048, 64)
    plan = torch_backend.make_plan(spattn.compile("causal & window(256)", backend="torch"),
                                   q, k, q_offset=None, inputs={})
    assert plan.expand == 1 and plan.strategy == "band", plan


def test_grouped_heads_are_repeated_only_where_the_copy_fits(monkeypatch):
    """K and V with repeated heads must fit twice in the free memory; else the plan keeps
    the grouped rows."""
    q, k = torch.empty(1, 32, 2048, 64), torch.empty(1, 8, 2048, 64)
    pat = spattn.compile("causal", backend="torch")
    copy = 2 * 32 * 2048 * 64 * 4
    monkeypatch.setattr(cpu_plan, "available_memory", lambda dev: 2 * copy + 1)
    assert torch_backend.make_plan(pat, q, k, q_offset=None, inputs={}).expand == 4
    monkeypatch.setattr(cpu_plan, "available_memory", lambda dev: 2 * copy - 1)
    assert torch_backend.make_plan(pat, q, k, q_offset=None, inputs={}).expand == 1


def test_padded_batch_is_one_dense_item_per_element():
    """Causal attention over a left-padded batch: the cost model takes one dense item per
    batch element, with the kernel's causal flag and one mask row per element, read as
    views (at 4096 tokens a full mask would be 256 MiB)."""
    B, L = 4, 4096
    pat = spattn.compile("causal & k >= first[b]", backend="torch")
    q = torch.empty(B, 8, L, 64)
    plan = torch_backend.make_plan(pat, q, q, q_offset=None,
                                   inputs={"first": torch.tensor([0, 85, 341, 7])})
    assert plan.strategy == "dense" and plan.covers, plan
    (c,) = plan.calls
    assert c.batch_items and c.is_causal and c.mask.shape == (B, 1, 1, L)


@pytest.mark.parametrize("Lq", [1, 5, 16])
@pytest.mark.parametrize("src", ["causal", "causal & window(100)"], ids=["causal", "window"])
def test_decode_gqa_against_the_reference(src, Lq):
    """Bottom-right aligned decode steps with grouped-query heads, fwd and bwd, fp32."""
    g = torch.Generator().manual_seed(Lq)
    pat = spattn.compile(src, backend="torch")
    Hq, Hk, Lk, D = 8, 2, 700, 32
    q = torch.randn(1, Hq, Lq, D, generator=g, requires_grad=True)
    k, v = (torch.randn(1, Hk, Lk, D, generator=g, requires_grad=True) for _ in range(2))
    o, lse = pat(q, k, v, return_lse=True)
    mask = pat.mask(Lq, Lk, num_heads=Hq)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = attention_reference(q64, k64, v64, mask)
    torch.testing.assert_close(o.double(), ro, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), rl, rtol=1e-4, atol=1e-5)
    do = torch.randn(o.shape, generator=g)
    (o * do).sum().backward()
    (ro * do.double()).sum().backward()
    for a, b in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_bookkeeping_pieces_stay_below_the_grain():
    t = torch.empty(3, 70, 129, 40)
    seen = torch.zeros(t.shape, dtype=torch.int32)
    for ix in cpu_ops.pieces(t):
        assert t[ix].numel() < cpu_ops.GRAIN
        seen[ix] += 1
    assert bool((seen == 1).all())
    src = torch.randn(5, 9, 1000, 8).transpose(1, 2)
    dst = torch.empty(src.shape)
    assert torch.equal(cpu_ops.copy_(dst, src), src)


@pytest.mark.parametrize("L,w", [(832, 200), (896, 100), (1024, 128)],
                         ids=["L832-W200", "L896-W100", "L1024-W128"])
def test_band_key_gradients_of_overlapping_items(L, w):
    """Band items overlap: key gradients are added in phases, the first filling the buffer
    (with what it does not reach zeroed); exact in float64."""
    g = torch.Generator().manual_seed(L)
    pat = spattn.compile(f"causal & window({w})", backend="torch")
    q, k, v = (torch.randn(1, 2, L, 16, generator=g, dtype=torch.float64) for _ in range(3))
    plan = torch_backend.make_plan(pat, q, k, q_offset=None, inputs={}, strategy="band")
    assert plan.calls[0].n > 1
    o, lse = torch_backend.fwd_planned(plan, q, k, v, scale=0.25)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ro, _ = attention_reference(qr, kr, vr, pat.mask(L, L), scale=0.25)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64)
    (ro * do).sum().backward()
    got = torch_backend.bwd_planned(plan, q, k, v, o, lse, do, scale=0.25)
    for a, b in zip(got, (qr.grad, kr.grad, vr.grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("src,L,layout", [
    ("q < 64 & k >= 128 & k < 192 | q >= 128 & q < 192 & k < 64", 256, "off"),
    ("(q - k) % 2 == 1 & q < k", 128, "on"),
    ("grid (t: 3, y: 7, x: 6) after 2 ~((q - k) % 2 == 0 | causal)", 128, "on")],
    ids=["anti-diagonal", "residues-above-layout", "grid-after-layout"])
def test_items_whose_tiles_go_back_are_gathered(monkeypatch, src, L, layout):
    """Items whose query or key tiles step backwards (tiles on an anti-diagonal; a layout's
    residue boxes) take no view (views have no negative strides): forward and gradients
    equal the float64 reference."""
    monkeypatch.setenv("SPATTN_LAYOUT", layout)
    g = torch.Generator().manual_seed(L)
    pat = spattn.compile(src, backend="torch")
    q, k, v = (torch.randn(2, 2, L, 16, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    o = pat(q, k, v)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(o, (q, k, v), do)
    ro, _ = attention_reference(q, k, v, pat.mask(L, L), scale=0.25)
    want = torch.autograd.grad(ro, (q, k, v), do)
    torch.testing.assert_close(o, ro, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_masks_too_big_to_keep_are_built_per_call(monkeypatch):
    """When every strategy's masks exceed the budget, the tiles strategy remains: its calls,
    split into chunks, build their masks as they run. Exact in float64, backward included."""
    monkeypatch.setattr(cpu_plan, "MASK_BUDGET", 1 << 14)
    g = torch.Generator().manual_seed(5)
    pat = spattn.compile("strided(16) & ~(q - k == 3)", backend="torch")
    B, H, L, D = 1, 2, 300, 16
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for _ in range(3))
    plan = torch_backend.make_plan(pat, q, k, q_offset=None, inputs={})
    assert plan.strategy == "tiles" and len(plan.calls) > 2
    assert any(c.build_mask is not None for c in plan.calls)
    assert all(c.mask is None for c in plan.calls)
    o, lse = torch_backend.fwd_planned(plan, q, k, v, scale=0.25)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ro, rl = attention_reference(qr, kr, vr, pat.mask(L, L, num_heads=H), scale=0.25)
    torch.testing.assert_close(o, ro.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, rl.detach(), rtol=1e-10, atol=1e-10)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64)
    (ro * do).sum().backward()
    got = torch_backend.bwd_planned(plan, q, k, v, o, lse, do, scale=0.25)
    for a, b in zip(got, (qr.grad, kr.grad, vr.grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_repr_summarises_tensors_by_dtype_and_shape():
    """A torch-backend plan's ``repr`` (and the :class:`spattn.runtime.plan.Plan` around it)
    names each index and mask tensor by dtype and shape, never by its values, and lists a
    few kernel calls."""
    import dataclasses
    pat = spattn.compile("causal & window(8) & same(doc)", backend="torch")
    q = torch.randn(1, 2, 300, 16)
    text = repr(pat.plan(q, q, q, doc=torch.arange(300) // 40))
    assert "tensor(" not in text and "-inf" not in text and len(text) < 1200, text
    assert "rows=int64 [" in text and "mask=float32 [" in text and "Lq=300" in text
    plan = _plan("causal & window(100)", L=1000)
    many = dataclasses.replace(plan, calls=plan.calls * (cpu_plan.MAX_REPR_CALLS + 3))
    text = repr(many)
    assert text.count("Call(slot=") == cpu_plan.MAX_REPR_CALLS and "... 3 more" in text
    assert f"{len(many.calls)} call(s)" in text and "tensor(" not in text


# ------------------------------------------------------------ memory

def test_plans_that_cannot_fit_say_so(monkeypatch):
    """A plan's grid analysis (about ``PLAN_TILE_BYTES`` a tile) and the tiles strategy's key
    lists (int64 per allowed key of every row of tiles: all-PARTIAL patterns) are checked
    against the free memory before they are made: a SpattnValueError naming the plan, not
    an allocator error or a kill while they are written."""
    import spattn.ir.memory as memory
    from spattn.dsl.errors import SpattnValueError
    monkeypatch.setattr(memory, "available_memory", lambda device: 1 << 30)
    pat = spattn.compile("causal & window(4096)", backend="torch")
    L = 1 << 18                                          # 2^24 tiles: 512 MiB of analysis
    q = torch.empty(1, 2, L, 8)
    monkeypatch.setattr(memory, "available_memory", lambda device: 1 << 28)
    with pytest.raises(SpattnValueError, match=r"the CPU plan of \[1, 2, 262144, D\] queries "
                       r"over 262144 keys \(32 bytes a 64x64 tile\) does not fit in memory: "
                       r"it needs 0\.5 GiB and cpu has 0\.2 GiB available"):
        pat(q, q, q)
    pat = spattn.compile("(q - k) % 8 == 0", backend="torch")
    q = torch.empty(1, 1, 1 << 16, 8)       # all PARTIAL: 1024 tile rows x 65536 int64 keys
    with pytest.raises(SpattnValueError, match=r"the CPU plan's key lists for 65536 queries "
                       r"over 65536 keys .* does not fit in memory: it needs 0\.6 GiB"):
        torch_backend.make_plan(pat, q, q, q_offset=None, inputs={})   # (in sequence order)


@pytest.mark.parametrize("n,nk,w", [(5, 9, 9), (7, 40, 12), (1, 1, 1), (64, 300, 100)],
                         ids=lambda x: str(x))
def test_first_true_lists_each_rows_trues(n, nk, w):
    """``_first_true``: the indices of each row's True entries in order, -1 past them."""
    g = torch.Generator().manual_seed(n * nk)
    sel = torch.rand(n, nk, generator=g) < 0.3
    sel[:, w:] &= sel[:, :nk - w].cumsum(1)[:, -1:] < 0       # at most w per row
    sel[0] = False
    got = cpu_plan._first_true(sel, w)
    for r in range(n):
        want = sel[r].nonzero().flatten().tolist()
        assert got[r].tolist() == want + [-1] * (w - len(want))
