"""Decode steps of patterns with a score (``runtime/decode.py``): the split-K Triton kernel
with the score on every computed pair (under the interpreter) and the torch backend's
scored step, against the float64 reference of the pattern at each batch element's own
length. Every case draws fresh random q, caches and tables: softcap, ALiBi by a learned
slope table and by a list, learned relative biases (one whose index reads ``Lk``, so that
the bucket-wide bounds proof fails and each step is checked), a per-(batch, head) table;
a table with leading [B, H] dims, a mask of h beside a score of h; contiguous and paged
caches, grouped heads (packed into one tile, each row reading its own head), per-batch lengths, several query rows,
``q_offset``; the routing of ``pat(q, k, v)``; the errors.
"""
import pytest
import torch

import spattn
from spattn.dsl.errors import SpattnInputError, SpattnParamError, SpattnValueError
from spattn.runtime import decode as dec
from spattn.runtime.reference import pattern_reference

from tests.runtime import test_decode
from tests.runtime.test_decode import _close, _paged

#: the GPU's decode tiles under the interpreter (a fixture of test_decode.py)
gpu_decode_config = test_decode.gpu_decode_config

interp = pytest.mark.interpreter
BACKENDS = ["torch", pytest.param("triton", marks=interp)]

#: name: (mask, score, tables(B, Hq, cap, generator))
SCORES = {
    "softcap": ("causal", "softcap(20)", lambda B, H, cap, g: {}),
    "alibi-table": ("causal & window(W)", "s + slope[h] * float(k - q)",
                    lambda B, H, cap, g: {"slope": torch.rand(H, generator=g)}),
    "alibi-list": ("causal | k < 4", "s - [0.5, 0.25, 0.125, 0.0625][h] * float(q - k)",
                   lambda B, H, cap, g: {}),
    "rel-clamped": ("causal & (window(W) | sink(4))", "s + rel[h, clamp(q - k, 0, 63)]",
                    lambda B, H, cap, g: {"rel": torch.randn(H, 64, generator=g)}),
    "rel-by-length": ("causal", "s + rel[q - k + Lk - 1]",
                      lambda B, H, cap, g: {"rel": torch.randn(2 * cap - 1, generator=g)}),
    "per-batch-head": ("causal & window(W)", "s * temp[b, h] + softcap(8)",
                       lambda B, H, cap, g: {"temp": 0.5 + torch.rand(B, H, generator=g)}),
    "per-head-mask": ("causal & q - k < [8, 20, 40, 70][h]", "s + slope[h] * float(k - q)",
                      lambda B, H, cap, g: {"slope": torch.rand(H, generator=g)}),
    "leading-dims": ("causal", "s + bias[clamp(q - k, 0, 63)]",
                     lambda B, H, cap, g: {"bias": torch.randn(B, H, 64, generator=g)}),
}


def _reference(pat, q, k, v, lens, tables, q_offset=None):
    """Per batch element b: element b of the float64 reference of the whole batch over the
    first lens[b] keys (the heads of k and v repeated for grouped queries; the whole batch,
    so that tables indexed by ``b`` or with a batch dim read element b's entries)."""
    G = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for b, L in enumerate(lens):
        o, lse = pattern_reference(pat, q.double(),
                                   k[:, :, :L].double().repeat_interleave(G, 1),
                                   v[:, :, :L].double().repeat_interleave(G, 1),
                                   q_offset=q_offset,
                                   **{n: t.double() for n, t in tables.items()})
        outs.append(o[b:b + 1])
        lses.append(lse[b:b + 1])
    return torch.cat(outs), torch.cat(lses)


def _draw(name, backend, *, B=2, Hq=4, Hk=2, Lq=1, cap=80, D=16, seed=0):
    src, score, make = SCORES[name]
    pat = spattn.compile(src, score=score, backend=backend, **({"W": 29} if "W" in src else {}))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k = torch.randn(B, Hk, cap, D, generator=g)
    v = torch.randn(B, Hk, cap, D, generator=g)
    return pat, q, k, v, make(B, Hq, cap, g), g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SCORES))
def test_scored_decode_ragged_lengths(name, backend):
    pat, q, k, v, tables, _ = _draw(name, backend, Lq=3)
    lens = [80, 51]
    dec.DECODE_PLANS.clear()
    o, lse = pat.decode(q, k, v, seq_lens=torch.tensor(lens), return_lse=True, **tables)
    want_o, want_lse = _reference(pat, q, k, v, lens, tables)
    _close(f"{name} o", o, want_o)
    _close(f"{name} lse", lse, want_lse)
    plan = next(iter(dec.DECODE_PLANS._plans.values()))
    # a score of h keeps the grouped heads in one tile; a mask of h does not
    assert plan.pack == (1 if name == "per-head-mask" else 2), plan


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["alibi-table", "rel-clamped", "per-batch-head"])
def test_scored_decode_paged(name, backend):
    pat, q, k, v, tables, g = _draw(name, backend, B=2, Hq=4, Hk=4, cap=96, seed=1)
    kp, vp, table = _paged(k, v, 16, g)
    lens = [70, 96]
    o, lse = pat.decode(q, kp, vp, seq_lens=torch.tensor(lens), page_table=table,
                        return_lse=True, **tables)
    want_o, want_lse = _reference(pat, q, k, v, lens, tables)
    _close(f"{name} o", o, want_o)
    _close(f"{name} lse", lse, want_lse)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["softcap", "alibi-list", "rel-by-length"])
def test_scored_call_routes_to_decode(name, backend):
    """``pat(q, k, v)`` with few queries takes the decode path (a decode plan is made) and
    gives the reference; so does a ``q_offset`` that moves the rows up."""
    pat, q, k, v, tables, _ = _draw(name, backend, B=1, Hq=4, Hk=1, Lq=2, cap=300, seed=2)
    dec.DECODE_PLANS.clear()
    o, lse = pat(q, k, v, return_lse=True, **tables)
    assert len(dec.DECODE_PLANS) == 1
    want_o, want_lse = _reference(pat, q, k, v, [300], tables)
    _close(f"{name} o", o, want_o)
    _close(f"{name} lse", lse, want_lse)
    o2 = pat(q, k, v, q_offset=250, **tables)
    want2, _ = _reference(pat, q, k, v, [300], tables, q_offset=250)
    _close(f"{name} o at q_offset", o2, want2)


@interp
def test_scored_decode_reuses_one_plan_as_the_cache_grows():
    """A growing cache keeps one plan per bucket, also with a new table object each step
    (as a model rebuilding its slopes): one compiled kernel serves every step."""
    pat, q, k, v, tables, g = _draw("alibi-table", "triton", B=1, Hq=4, Hk=4, cap=120)
    dec.DECODE_PLANS.clear()
    for L in (70, 90, 120):
        fresh = {"slope": tables["slope"].clone()}
        o = pat.decode(q, k[:, :, :L], v[:, :, :L], **fresh)
        want, _ = _reference(pat, q, k, v, [L], fresh)
        _close(f"L={L}", o, want)
    assert len(dec.DECODE_PLANS) == 1


@pytest.mark.parametrize("name", ["alibi-table", "rel-clamped", "per-head-mask"])
def test_scored_decode_additive_mask_memo(name, monkeypatch):
    """The torch backend's additive step keeps its bias and mask for the steps it repeats
    (a model's layers at one token): the same lengths and the same tables (identity and
    version) read it back without evaluating the score, and each output matches the
    float64 reference; a table written in place, a new table object, or another length
    evaluates again (and the output follows the new values)."""
    from spattn.ir import score as S
    pat, q, k, v, tables, g = _draw(name, "torch", B=2, Hq=4, Hk=2, cap=90, seed=5)
    (tname, tab), = tables.items()
    evals = []
    real = S.score_values

    def counting(*a, **kw):
        evals.append(None)
        return real(*a, **kw)
    monkeypatch.setattr(S, "score_values", counting)
    lens = [90, 61]
    seq = torch.tensor(lens)

    def step(t, L=None):
        """The step's own evaluations of the score (the reference's not counted)."""
        kk, vv = (k, v) if L is None else (k[:, :, :L], v[:, :, :L])
        sl = seq if L is None else None
        n0 = len(evals)
        o = pat.decode(q, kk, vv, seq_lens=sl, **{tname: t})
        n = len(evals) - n0
        want, _ = _reference(pat, q, k, v, lens if L is None else [L] * 2, {tname: t})
        _close(f"{name} evals={n}", o, want)
        return n
    assert step(tab) == 2                           # one per length
    assert step(tab) == step(tab) == 0              # read back: same lengths and table
    with torch.no_grad():
        tab.mul_(1.5).add_(0.25)                    # in place: a new version
    assert step(tab) == 2
    assert step(tab.clone()) == 2                   # another tensor, the same values
    assert step(tab, L=75) == 1                     # another length (one group)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scored_decode_rows_without_keys_are_zero(backend):
    """A score of -inf on every pair of a row (and a mask that allows nothing) gives 0 and
    an lse of -inf, never NaN."""
    pat = spattn.compile("causal & q % 2 == 0", score="s + w[h]", backend=backend)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 2, 16, generator=g)
    k = torch.randn(1, 2, 64, 16, generator=g)
    w = torch.tensor([0.0, float("-inf")])
    o, lse = pat.decode(q, k, k, return_lse=True, w=w)
    assert not torch.isnan(o).any()
    assert torch.equal(o[0, 1], torch.zeros_like(o[0, 1]))
    assert torch.isinf(lse[0, 1]).all() and (lse[0, 1] < 0).all()
    assert torch.equal(o[0, 0, 1], torch.zeros_like(o[0, 0, 1]))     # q = 63: odd
    want, _ = _reference(pat, q, k, k, [64], {"w": w})
    _close("o", o, want)


def test_routed_scored_step_without_lse_rows_without_keys_are_zero():
    """The routed CPU step that returns no lse takes one softmax call where every row sees
    every key of its span: a row whose scores are all -inf (the score excludes them) still
    gives 0, never NaN, and a NaN query gives its row NaN, as the reference does."""
    # (not s plus a bias, which runs as one fused call with an additive mask)
    pat = spattn.compile("causal", score="softcap(20.0) + w[h]", backend="torch")
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 3, 1, 16, generator=g)
    k, v = (torch.randn(1, 3, 600, 16, generator=g) for _ in range(2))
    w = torch.tensor([0.0, float("-inf"), 0.5])
    q[0, 2, 0, 3] = float("nan")
    want, _ = _reference(pat, q, k, v, [600], {"w": w})
    for _ in range(2):              # the full step, then the routed fast entry's
        o = pat(q, k, v, w=w)
        assert torch.equal(o[0, 1], torch.zeros_like(o[0, 1]))
        assert torch.isnan(o[0, 2]).all() and torch.isnan(want[0, 2]).all()
        _close("o", o[:, :2], want[:, :2])


@interp
def test_scored_decode_table_out_of_range():
    """A table too short for the step's positions is refused with its name, on both
    entries; with ``check=False`` a table not covering the bucket is refused up front."""
    pat = spattn.compile("causal", score="s + rel[q - k]", backend="triton")
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 1, 16, generator=g)
    k = torch.randn(1, 2, 300, 16, generator=g)
    rel = torch.randn(100, generator=g)
    with pytest.raises(SpattnInputError, match="rel"):
        pat.decode(q, k, k, rel=rel)
    with pytest.raises(SpattnInputError, match="rel"):
        pat(q, k, k, rel=rel)
    with pytest.raises(SpattnValueError, match="check=False"):
        pat.decode(q, k, k, seq_lens=torch.tensor([50]), check=False, rel=rel)
    ok = pat.decode(q, k, k, seq_lens=torch.tensor([50]), rel=rel)     # in range at 50
    want, _ = _reference(pat, q, k, k, [50], {"rel": rel})
    _close("o", ok, want)


def test_scored_decode_refusals():
    """Tables that require grad take the normal path (their gradient flows); a list too
    short for the heads is refused as a call refuses it; a divisor read from a table is
    refused by decode() and runs through a call."""
    pat = spattn.compile("causal", score="s + w[h]", backend="torch")
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 1, 16, generator=g)
    k = torch.randn(1, 2, 300, 16, generator=g)
    w = torch.randn(2, generator=g, requires_grad=True)
    dec.DECODE_PLANS.clear()
    pat(q, k, k, w=w).sum().backward()
    assert w.grad is not None and len(dec.DECODE_PLANS) == 0
    with pytest.raises(SpattnInputError, match="must not require grad"):
        pat.decode(q, k, k, w=w)
    short = spattn.compile("false", score="s + [0.5, 1.0][h]", backend="torch")
    with pytest.raises(SpattnInputError, match=r"list \[0.5, 1.0\] has 2 entries"):
        short.decode(torch.randn(1, 4, 1, 16), k, k)      # as a call: no pair read, still refused
    div = spattn.compile("causal", score="s / t[h]", backend="torch")
    t = 1.0 + torch.rand(2, generator=g)
    with pytest.raises(SpattnParamError, match="divides by its tables"):
        div.decode(q, k, k, t=t)
    want, _ = _reference(div, q, k, k, [300], {"t": t})
    _close("o", div(q, k, k, t=t), want)


@interp
@pytest.mark.parametrize("name", ["softcap", "rel-by-length", "per-batch-head"])
def test_scored_decode_at_gpu_tiles(gpu_decode_config, name):
    """At the GPU's 128-key tiles: lengths no tile divides and shorter than a tile."""
    pat, q, k, v, tables, _ = _draw(name, "triton", B=3, Hq=4, Hk=2, Lq=2, cap=320, seed=6)
    lens = [320, 77, 200]
    o, lse = pat.decode(q, k, v, seq_lens=torch.tensor(lens), return_lse=True, **tables)
    want_o, want_lse = _reference(pat, q, k, v, lens, tables)
    _close(f"{name} o", o, want_o)
    _close(f"{name} lse", lse, want_lse)
    plan = next(iter(dec.DECODE_PLANS._plans.values()))
    assert plan.config.block_n == 128 and plan.config.score_index == "clamp", plan


class _Counts:
    """Counts, during a test, the routed scored step's fused calls (``decode._sdpa``), its
    full step (``DecodePlan.run_scored_torch``) and the evaluations of the score."""

    def __init__(self, monkeypatch):
        from spattn.ir import score as S
        self.sdpa = self.full = self.evals = 0
        sdpa, full, values = dec._sdpa, dec.DecodePlan.run_scored_torch, S.score_values

        def count_sdpa(*a, **kw):
            self.sdpa += 1
            return sdpa(*a, **kw)

        def count_full(*a, **kw):
            self.full += 1
            return full(*a, **kw)

        def count_evals(*a, **kw):
            self.evals += 1
            return values(*a, **kw)
        monkeypatch.setattr(dec, "_sdpa", count_sdpa)
        monkeypatch.setattr(dec.DecodePlan, "run_scored_torch", count_full)
        monkeypatch.setattr(S, "score_values", count_evals)

    def since(self, before):
        return (self.sdpa - before[0], self.full - before[1], self.evals - before[2])

    def now(self):
        return (self.sdpa, self.full, self.evals)


def _routed(pat, q, k, v, tables, counts, L, want_counts=None, q_offset=None):
    """``pat(q, k[:, :, :L], v[:, :, :L], **tables)`` against the float64 reference; the
    step's own (fused calls, full steps, score evaluations), checked against
    ``want_counts`` where given."""
    before = counts.now()
    o = pat(q, k[:, :, :L], v[:, :, :L], q_offset=q_offset, **tables)
    got = counts.since(before)
    want, _ = _reference(pat, q, k[:, :, :L], v[:, :, :L], [L] * q.shape[0], tables,
                         q_offset=q_offset)
    _close(f"L={L} counts={got}", o, want)
    if want_counts is not None:
        assert got == want_counts, (L, got, want_counts)
    return got


#: (mask, score, tables(B, Hq, generator)): additive scores of ``q - k`` whose rows see
#: every key of one run
SHIFT_FREE = {
    "alibi-window": ("causal & window(29)", "s + slope[h] * float(k - q)",
                     lambda B, H, g: {"slope": torch.rand(H, generator=g)}),
    "rel-window": ("causal & window(100)", "s + rel[h, clamp(q - k, 0, 63)]",
                   lambda B, H, g: {"rel": torch.randn(H, 64, generator=g)}),
    "alibi-causal": ("causal", "s - 0.5 * slope[h] * float(q - k)",
                     lambda B, H, g: {"slope": torch.rand(H, generator=g)}),
}


@pytest.mark.parametrize("name,B,Hq,Hk", [("alibi-window", 1, 4, 4), ("alibi-window", 2, 4, 2),
                                          ("rel-window", 1, 4, 2), ("alibi-causal", 2, 4, 1)])
def test_routed_additive_step_is_one_fused_call(name, B, Hq, Hk, monkeypatch):
    """A routed CPU step of an additive score whose rows see every key of one run (ALiBi,
    a relative bias clamped along ``q - k``; grouped heads, a batch that shares its mask)
    is one public SDPA call with a kept additive mask, no full step and no evaluation of
    the score: at the same length (a model's layers) and at a new length (a slice of the
    entry's bias of the bucket's last rows, built once). A table written in place or a new
    table object takes the full step again, and every output follows the tables' values."""
    src, score, make = SHIFT_FREE[name]
    pat = spattn.compile(src, score=score, backend="torch")
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, Hq, 1, 16, generator=g)
    k, v = (torch.randn(B, Hk, 600, 16, generator=g) for _ in range(2))
    tables = make(B, Hq, g)
    (tname, tab), = tables.items()
    dec.DECODE_PLANS.clear()
    c = _Counts(monkeypatch)
    assert _routed(pat, q, k, v, tables, c, 600)[:2] == (0, 1)      # the full path
    plan = next(iter(dec.DECODE_PLANS._plans.values()))
    assert plan.shift_free and plan.one_call
    assert _routed(pat, q, k, v, tables, c, 600) == (1, 0, 1)        # the bias buffer built
    for L in (600, 599, 520, 600, 513, 1024 - 300):                  # the bucket of 1024
        _routed(pat, q, k, v, tables, c, L, (1, 0, 0))
    with torch.no_grad():
        tab.mul_(-2.0).add_(0.5)                                     # in place
    assert _routed(pat, q, k, v, tables, c, 599)[:2] == (0, 1)
    _routed(pat, q, k, v, tables, c, 599, (1, 0, 1))                 # a new buffer
    _routed(pat, q, k, v, tables, c, 598, (1, 0, 0))
    fresh = {tname: tab.clone()}
    assert _routed(pat, q, k, v, fresh, c, 598)[:2] == (0, 1)        # another object
    _routed(pat, q, k, v, fresh, c, 597, (1, 0, 1))
    with torch.no_grad():
        fresh[tname].copy_(torch.randn(fresh[tname].shape, generator=g))
    assert _routed(pat, q, k, v, fresh, c, 597)[:2] == (0, 1)
    _routed(pat, q, k, v, fresh, c, 597, (1, 0, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_routed_additive_step_memo_follows_inference_tables(dtype, monkeypatch):
    """A table made under ``torch.inference_mode`` has no version counter: the routed
    entry compares its contents (as bytes: numpy has no bfloat16), so a table written in
    place there is seen."""
    pat, q, k, v, tables, g = _draw("alibi-table", "torch", B=1, Hq=4, Hk=4, cap=400, seed=8)
    dec.DECODE_PLANS.clear()
    c = _Counts(monkeypatch)
    with torch.inference_mode():
        slope = tables["slope"].clone().to(dtype)
        for L in (400, 400, 399):
            _routed(pat, q, k, v, {"slope": slope}, c, L)
        assert c.sdpa >= 2
        slope.mul_(3.0)
        for L in (399, 399, 398):
            _routed(pat, q, k, v, {"slope": slope}, c, L)


def test_routed_additive_step_kept_masks(monkeypatch):
    """Steps the bias buffer does not serve keep their additive mask per length in the
    routed entry: a score of ``Lk`` (``rel[q - k + Lk - 1]``), a window's partial keys
    (four query rows), two runs (a window and sinks), a mask of ``h`` repeat as one fused
    call without evaluating the score; a new length evaluates it; a batch whose elements
    read their own tables (a leading batch dim) takes the full step."""
    for name, Lq in (("rel-by-length", 1), ("alibi-table", 4), ("rel-clamped", 1),
                     ("per-head-mask", 1)):
        pat, q, k, v, tables, g = _draw(name, "torch", B=1, Hq=4, Hk=2, Lq=Lq, cap=300, seed=9)
        if name == "rel-by-length":                 # in range over the bucket (512 keys)
            tables = {"rel": torch.randn(2 * 512 - 1, generator=g)}
        dec.DECODE_PLANS.clear()
        c = _Counts(monkeypatch)
        _routed(pat, q, k, v, tables, c, 300)
        plan = next(iter(dec.DECODE_PLANS._plans.values()))
        assert plan.one_call and plan.shift_free == (name != "rel-by-length")
        _routed(pat, q, k, v, tables, c, 300, (1, 0, 0))
        _routed(pat, q, k, v, tables, c, 300, (1, 0, 0))
        _routed(pat, q, k, v, tables, c, 290, (1, 0, 1))
        _routed(pat, q, k, v, tables, c, 290, (1, 0, 0))
        _routed(pat, q, k, v, tables, c, 300, (1, 0, 0))
    pat, q, k, v, tables, g = _draw("leading-dims", "torch", B=2, Hq=4, Hk=2, cap=300, seed=9)
    dec.DECODE_PLANS.clear()
    for L in (300, 300, 299):
        assert _routed(pat, q, k, v, tables, c, L)[:2] == (0, 1)


def test_routed_additive_step_rows_without_keys_and_offsets(monkeypatch):
    """A bias of ``-inf`` (a head that sees no key) keeps the full step, whose rows give 0,
    never NaN; a routed call with a ``q_offset`` (a static cache) repeats as one fused
    call at its offset."""
    pat = spattn.compile("causal", score="s + w[h]", backend="torch")
    g = torch.Generator().manual_seed(10)
    q = torch.randn(1, 2, 1, 16, generator=g)
    k, v = (torch.randn(1, 2, 400, 16, generator=g) for _ in range(2))
    w = torch.tensor([0.25, float("-inf")])
    dec.DECODE_PLANS.clear()
    c = _Counts(monkeypatch)
    for L in (400, 400, 399):
        o = pat(q, k[:, :, :L], v[:, :, :L], w=w)
        assert torch.equal(o[0, 1], torch.zeros_like(o[0, 1]))
        want, _ = _reference(pat, q, k[:, :, :L], v[:, :, :L], [L], {"w": w})
        _close(f"L={L}", o, want)
    assert c.sdpa == 0 and c.full == 3
    src, score, make = SHIFT_FREE["rel-window"]
    pat = spattn.compile(src, score=score, backend="torch")
    q = torch.randn(1, 4, 1, 16, generator=g)
    k, v = (torch.randn(1, 2, 400, 16, generator=g) for _ in range(2))
    tables = make(1, 4, g)
    dec.DECODE_PLANS.clear()
    for off in (250, 399, 120):
        _routed(pat, q, k, v, tables, c, 400, q_offset=off)
        _routed(pat, q, k, v, tables, c, 400, (1, 0, 1), q_offset=off)
        _routed(pat, q, k, v, tables, c, 400, (1, 0, 0), q_offset=off)


def test_shift_free_scores():
    """Scores that read the positions only as ``q - k`` (no ``Lk``)."""
    for score, want in (("s + slope[h] * float(k - q)", True),
                        ("s + rel[h, clamp(q - k, 0, 63)]", True),
                        ("s + 0.5 * float(2 * q - 2 * k + 3)", True),
                        ("s + rel[q - k + Lk - 1]", False),
                        ("s + w[k]", False),
                        ("s + slope[h] * float(k - q) + 0.1 * float(q)", False),
                        ("s + 0.5 * float(q - 2 * k)", False)):
        pat = spattn.compile("causal", score=score, backend="torch")
        assert dec._shift_free(pat.score) is want, score


def test_routed_additive_step_other_dtype_heads_and_scale(monkeypatch):
    """The entry's kept steps serve only calls like the one that made it: bf16 caches,
    another number of query heads, another scale and a longer head dim at the same cache
    length each give their own reference, and the float32 step after them still does."""
    src, score, make = SHIFT_FREE["alibi-causal"]
    pat = spattn.compile(src, score=score, backend="torch")
    g = torch.Generator().manual_seed(12)
    k, v = (torch.randn(1, 2, 300, 16, generator=g) for _ in range(2))
    q = torch.randn(1, 4, 1, 16, generator=g)
    tables = make(1, 4, g)
    dec.DECODE_PLANS.clear()
    c = _Counts(monkeypatch)
    for _ in range(2):
        _routed(pat, q, k, v, tables, c, 300)
    o = pat(q.bfloat16(), k.bfloat16(), v.bfloat16(), **tables)
    want, _ = _reference(pat, q, k, v, [300], tables)
    assert o.dtype == torch.bfloat16
    _close("bf16", o, want, rtol=3e-2)
    q2 = torch.randn(1, 2, 1, 16, generator=g)
    _routed(pat, q2, k, v, {"slope": tables["slope"][:2].clone()}, c, 300)
    o = pat(q, k, v, scale=0.1, **tables)
    want, _ = pattern_reference(pat, q.double(), k.double().repeat_interleave(2, 1),
                                v.double().repeat_interleave(2, 1), scale=0.1,
                                slope=tables["slope"].double())
    _close("scale", o, want)
    _routed(pat, q, k, v, tables, c, 300)


@pytest.mark.parametrize("score,dtype", [("softcap(20)", torch.float32),
                                         ("softcap(20) + slope[h] * float(k - q)",
                                          torch.float32),
                                         ("s + slope[h] * float(k - q)", torch.bfloat16)])
def test_routed_scored_step_keeps_its_variables(score, dtype, monkeypatch):
    """A routed CPU step of any other score (softcap; an additive score on bf16) whose rows
    see every key of one run keeps the score's variables per length in the routed entry
    and runs without the full step, at the same length and at a new one; two runs (a
    window beside sinks) take the full step. Every output against the float64
    reference."""
    g = torch.Generator().manual_seed(13)
    q = torch.randn(1, 4, 1, 16, generator=g)
    k, v = (torch.randn(1, 2, 400, 16, generator=g) for _ in range(2))
    tables = {"slope": torch.rand(4, generator=g)} if "slope" in score else {}
    rtol = 2e-3 if dtype == torch.float32 else 3e-2
    for src, full in (("causal", 0), ("causal & (window(40) | sink(4))", 1)):
        pat = spattn.compile(src, score=score, backend="torch")
        dec.DECODE_PLANS.clear()
        c = _Counts(monkeypatch)
        for i, L in enumerate((400, 400, 399, 400, 398)):
            before = c.now()
            o = pat(q.to(dtype), k[:, :, :L].to(dtype), v[:, :, :L].to(dtype), **tables)
            got = c.since(before)
            want, _ = _reference(pat, q, k[:, :, :L], v[:, :, :L], [L], tables)
            assert o.dtype == dtype
            _close(f"{src} L={L} counts={got}", o, want, rtol=rtol)
            assert got[:2] == (0, 1 if i == 0 else full), (src, L, got)
        if tables:
            with torch.no_grad():
                tables["slope"].mul_(-3.0)          # in place: the full step, then kept again
            for i, L in enumerate((398, 398)):
                before = c.now()
                o = pat(q.to(dtype), k[:, :, :L].to(dtype), v[:, :, :L].to(dtype), **tables)
                want, _ = _reference(pat, q, k[:, :, :L], v[:, :, :L], [L], tables)
                _close(f"{src} L={L} written in place", o, want, rtol=rtol)
                assert c.since(before)[1] == (1 if i == 0 else full)
