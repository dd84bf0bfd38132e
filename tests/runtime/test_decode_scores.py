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
