"""The decode path (``runtime/decode.py``): a few query rows against a long KV cache.

Every case draws fresh random q and caches, runs ``Pattern.decode`` (or ``Pattern.__call__``
where it routes to decode) on the torch backend and on the generated Triton kernels under
the interpreter (tiny shapes), and compares every output element and log-sum-exp with the
float64 reference on the pattern's dense mask of each batch element's own length:
contiguous and paged caches (shuffled page tables), grouped-query heads, per-batch lengths,
closed-form and scanned patterns, fully masked rows, and the reuse of one plan and one
kernel across a growing cache.
"""
import os
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import spattn
from spattn.dsl.errors import SpattnError, SpattnInputError, SpattnParamError, SpattnValueError
from spattn.runtime import cache, decode as dec
from spattn.runtime.reference import attention_reference

from tests.helpers.kernels import paged_cache
from tests.helpers.sources import bool_exprs

PATTERNS = {
    "causal": ("causal", {}),
    "window": ("causal & window(W)", {"W": 37}),
    "streaming": ("causal & (window(W) | sink(4))", {"W": 24}),
    "documents": ("input doc\npattern documents = causal & same(doc)", {}),
    "per-head": ("causal & q - k < [8, 20, 40, 70][h]", {}),
    "odd-rows-masked": ("causal & q % 2 == 0", {}),
    "stripes": ("causal & (q - k < 20 | k % H == h)", {}),
    "s2-stripes": ("causal & (window(16) | (k // 4) % H == h)", {}),
    "left-padding": ("causal & k >= first[b]", {}),
    "padding-mask": ("causal & keep[k]", {}),
}


def _close(name, got, want, rtol=2e-3):
    got, want = got.to(torch.float64), want.to(torch.float64)
    assert got.shape == want.shape, f"{name}: {tuple(got.shape)} != {tuple(want.shape)}"
    assert not torch.isnan(got).any(), f"{name} has NaN"
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf), f"{name}: -inf in different places"
    scale = max(float(want[~inf].abs().max()) if (~inf).any() else 1.0, 1e-2)
    torch.testing.assert_close(got[~inf], want[~inf], rtol=rtol, atol=rtol * scale,
                               msg=lambda m: f"{name}: {m}")


def _inputs(name, B, cap, g):
    if name == "documents":
        return {"doc": (torch.rand(B, cap, generator=g) < 0.05).cumsum(-1)}
    if name == "left-padding":
        return {"first": torch.randint(0, cap // 2, (B,), generator=g).to(torch.int32)}
    if name == "padding-mask":
        return {"keep": torch.rand(B, cap, generator=g) > 0.2}
    return {}


def _reference(pat, q, k, v, lens, ins, scale=None, q_offset=None):
    """Per batch element: attention over its first lens[b] keys, rows bottom-right aligned
    (or from ``q_offset``)."""
    B, Hq, Lq, _ = q.shape
    outs, lses = [], []
    for b in range(B):
        L = lens[b]
        m = pat.mask(Lq, L, num_heads=Hq, batch=B, q_offset=q_offset, **ins)[b:b + 1]
        o, lse = attention_reference(q[b:b + 1], k[b:b + 1, :, :L], v[b:b + 1, :, :L], m,
                                     scale=scale)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _paged(k, v, page_size, g):
    """A contiguous cache [B, Hk, cap, D] as pools of shuffled pages, with spare pages of
    noise: (k_pool, v_pool, page_table)."""
    kp, vp, table = paged_cache(k, v, page_size, g, spare=3)
    return kp, vp, table.to(torch.int32)


def _case(name, backend, *, B=2, Hq=4, Hk=2, Lq=1, cap=96, D=16, lens=None, paged=0,
          seed=0, num_splits=None, via_call=False, view=None):
    """One decode step against the float64 reference; ``view`` (optional) turns the
    ``seq_lens`` and page table tensors into other tensors of the same values."""
    src, params = PATTERNS[name]
    pat = spattn.compile(src, backend=backend, **params)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k = torch.randn(B, Hk, cap, D, generator=g)
    v = torch.randn(B, Hk, cap, D, generator=g)
    ins = _inputs(name, B, cap, g)
    seq = None if lens is None else torch.tensor(lens)
    if via_call:
        o, lse = pat(q, k, v, return_lse=True, **ins)
    elif paged:
        kp, vp, table = _paged(k, v, paged, g)
        if view is not None:
            seq, table = view(seq), view(table)
        o, lse = pat.decode(q, kp, vp, seq_lens=seq, page_table=table, return_lse=True,
                            num_splits=num_splits, **ins)
    else:
        o, lse = pat.decode(q, k, v, seq_lens=seq, return_lse=True, num_splits=num_splits,
                            **ins)
    want_o, want_lse = _reference(pat, q, k, v, lens or [cap] * B, ins)
    _close(f"{name} o", o, want_o)
    _close(f"{name} lse", lse, want_lse)
    return pat, o, lse


# ------------------------------------------------------------------ torch backend

@pytest.mark.parametrize("Lq", [1, 5], ids=lambda n: f"Lq{n}")
@pytest.mark.parametrize("name", list(PATTERNS))
def test_torch_decode(name, Lq):
    _case(name, "torch", B=2, Hq=4, Hk=2, Lq=Lq, cap=300, D=32, lens=[300, 211])


@pytest.mark.parametrize("Lq", [1, 7], ids=lambda n: f"Lq{n}")
@pytest.mark.parametrize("name", ["streaming", "documents", "per-head", "odd-rows-masked"])
def test_torch_decode_one_call_per_run(monkeypatch, name, Lq):
    """Every key run its own kernel call (views), merged through the log-sum-exps."""
    monkeypatch.setattr(dec, "VIEW_BYTES", 0)
    _case(name, "torch", B=2, Hq=4, Hk=2, Lq=Lq, cap=300, D=32, lens=[300, 163])


@pytest.mark.parametrize("lens", [None, [300, 163]], ids=["equal", "ragged"])
@pytest.mark.parametrize("via_call", [False, True], ids=["decode", "call"])
@pytest.mark.parametrize("name", ["stripes", "s2-stripes", "head-empty", "per-head"])
def test_torch_decode_gathers_each_heads_keys(monkeypatch, name, via_call, lens):
    """One query row whose keys differ per head and are scattered: each head's keys
    gathered (``decode._HeadGather``), one call per head, against the float64 reference;
    a head that sees no key gets 0 and -inf."""
    monkeypatch.setattr(dec, "GATHER_MIN_KEYS", 64)
    monkeypatch.setattr(dec, "GATHER_RATIO", 1)
    monkeypatch.setitem(PATTERNS, "head-empty", ("causal & k % H == h & h != 1", {}))
    dec.DECODE_PLANS.clear()
    pat, o, lse = _case(name, "torch", B=2, Hq=4, Hk=2, Lq=1, cap=300, D=32, lens=lens,
                        via_call=via_call and lens is None)
    plan = next(p for p in dec.DECODE_PLANS._plans.values() if p.pattern == pat)
    kinds = {type(segs).__name__ for step in plan._steps.values()
             for _, _, segs in step.groups}
    assert kinds == {"_HeadGather"}, kinds
    if name == "head-empty":
        assert torch.all(o[:, 1] == 0) and torch.all(torch.isneginf(lse[:, 1]))


@pytest.mark.parametrize("src,gathers", [
    ("causal & (q - k < 256 | k % H == h)", True),
    ("causal & (window(256) | (k // 8) % H == h)", True),
    ("causal & window(256)", False),
    ("causal & q - k < [64, 128, 256, 512, 64, 128, 256, 512][h]", False),
], ids=["stripes", "s2-stripes", "window", "window-per-head"])
def test_torch_decode_gathers_by_default_where_keys_scatter(src, gathers):
    """At 4096 keys and 8 heads the default thresholds gather head stripes (each head sees
    about a quarter of the keys) and leave windows to runs; both match float64."""
    dec.DECODE_PLANS.clear()
    pat = spattn.compile(src, backend="torch")
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 8, 1, 16, generator=g)
    k, v = (torch.randn(1, 8, 4096, 16, generator=g) for _ in range(2))
    o = pat(q, k, v)
    from spattn.runtime.reference import pattern_reference
    _close(src, o, pattern_reference(pat, q.double(), k.double(), v.double())[0])
    plan = next(p for p in dec.DECODE_PLANS._plans.values() if p.pattern == pat)
    steps = list(plan._steps.values()) + ([plan._last_step[2]] if plan._last_step[2] else [])
    found = any(isinstance(segs, dec._HeadGather) for st in steps for _, _, segs in st.groups)
    assert found == gathers


@pytest.mark.parametrize("name", ["causal", "streaming", "documents"])
def test_torch_decode_paged(name):
    _case(name, "torch", B=3, Hq=8, Hk=2, Lq=2, cap=160, D=32, lens=[160, 37, 99], paged=16)


def test_torch_decode_batched_equal_lengths():
    """Equal lengths and a batch-uniform pattern: one call for the whole batch."""
    _case("window", "torch", B=3, Hq=8, Hk=8, Lq=3, cap=400, D=64)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("name", ["causal", "streaming"])
def test_call_routes_to_decode(name, backend):
    dec.DECODE_PLANS.clear()
    _case(name, backend, B=1, Hq=8, Hk=2, Lq=1, cap=dec.ROUTE_MIN_LK + 40, D=16,
          via_call=True)
    assert len(dec.DECODE_PLANS) == 1


def test_grad_takes_the_normal_path():
    pat = spattn.compile("causal & window(W)", W=50, backend="torch")
    q = torch.randn(1, 2, 1, 16, requires_grad=True)
    k, v = torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    dec.DECODE_PLANS.clear()
    pat(q, k, v).sum().backward()
    assert len(dec.DECODE_PLANS) == 0 and q.grad is not None
    want = attention_reference(q.detach(), k, v, pat.mask(1, 300))[0]
    with torch.no_grad():
        _close("o", pat(q, k, v), want)
    assert len(dec.DECODE_PLANS) == 1


def test_fully_masked_rows_are_zero():
    pat = spattn.compile("causal & q - k > 1000", backend="torch")
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 300, 16), torch.randn(2, 2, 300, 16)
    o, lse = pat.decode(q, k, v, return_lse=True)
    assert torch.equal(o, torch.zeros_like(o)) and bool(torch.isneginf(lse).all())


def test_bucket_reuse_torch():
    """A growing cache: one plan per length bucket."""
    dec.DECODE_PLANS.clear()
    pat = spattn.compile("causal & (window(W) | sink(4))", W=64, backend="torch")
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, 2, 512, 32, generator=g), torch.randn(1, 2, 512, 32, generator=g)
    for L in (257, 300, 411, 512):
        q = torch.randn(1, 4, 1, 32, generator=g)
        o = pat(q, k[:, :, :L], v[:, :, :L])
        _close(f"L{L}", o, attention_reference(q, k[:, :, :L], v[:, :, :L], pat.mask(1, L))[0])
    assert len(dec.DECODE_PLANS) == 1
    assert dec.bucket(257) == dec.bucket(512) == 512


# ------------------------------------------------------------------ errors

def _qkv(B=1, Hq=4, Hk=2, Lq=1, L=64, D=16):
    return torch.randn(B, Hq, Lq, D), torch.randn(B, Hk, L, D), torch.randn(B, Hk, L, D)


def test_errors():
    pat = spattn.compile("causal", backend="torch")
    q, k, v = _qkv(Lq=17)
    with pytest.raises(SpattnInputError, match="at most 16 query rows"):
        pat.decode(q, k, v)
    q, k, v = _qkv()
    with pytest.raises(SpattnValueError, match="seq_lens holds values"):
        pat.decode(q, k, v, seq_lens=torch.tensor([65]))
    with pytest.raises(SpattnInputError, match=r"seq_lens must be an integer tensor \[B\]"):
        pat.decode(q, k, v, seq_lens=torch.tensor([3.0]))
    with pytest.raises(SpattnParamError, match="q_offset cannot be given with seq_lens"):
        pat.decode(q, k, v, seq_lens=torch.tensor([64]), q_offset=3)
    pool = torch.randn(6, 16, 2, 16)
    with pytest.raises(SpattnParamError, match="paged cache needs seq_lens"):
        pat.decode(q, pool, pool, page_table=torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(SpattnValueError, match="page_table holds page 6"):
        pat.decode(q, pool, pool, seq_lens=torch.tensor([40]),
                   page_table=torch.tensor([[0, 1, 6, 9]]))
    with pytest.raises(SpattnInputError, match=r"page_table must be an integer tensor"):
        pat.decode(q, pool, pool, seq_lens=torch.tensor([40]), page_table=torch.zeros(2, 4))
    with pytest.raises(SpattnInputError, match="pools' head dim"):
        pat.decode(q, torch.randn(6, 16, 2, 32), torch.randn(6, 16, 2, 32),
                   seq_lens=torch.tensor([40]), page_table=torch.zeros(1, 4, dtype=torch.int32))
    for D in (8, 512):          # on either backend, with a pointer to the call
        qd = torch.randn(1, 2, 1, D)
        with pytest.raises(SpattnInputError, match=r"decode takes head dims 16\.\.256 on "
                                                   r"either backend.*pat\(q, k, v\)"):
            pat.decode(qd, torch.randn(1, 2, 64, D), torch.randn(1, 2, 64, D))
        with pytest.raises(SpattnInputError, match="decode takes head dims"):
            pat.decode(qd, torch.randn(6, 16, 2, D), torch.randn(6, 16, 2, D),
                       seq_lens=torch.tensor([40]),
                       page_table=torch.zeros(1, 4, dtype=torch.int32))
    for args, kw in (((k, v), {}), ((pool, pool), dict(seq_lens=torch.tensor([40]),
                                  page_table=torch.zeros(1, 4, dtype=torch.int32)))):
        with pytest.raises(SpattnInputError, match=r"torch.float64; .* for decode; call the "
                                                   r"pattern, pat\(q, k, v\)"):
            pat.decode(q.double(), *(t.double() for t in args), **kw)
    doc_pat = spattn.compile("causal & same(doc)", backend="torch")
    with pytest.raises(SpattnInputError, match=r"'doc' \(shape \(40,\)\) is too short: .* "
                                               r"over the cache's 64 positions"):
        doc_pat.decode(q, k, v, doc=torch.zeros(40, dtype=torch.long))
    qg = q.clone().requires_grad_()
    with pytest.raises(SpattnInputError, match="inference only"):
        pat.decode(qg, pool, pool, seq_lens=torch.tensor([40]),
                   page_table=torch.zeros(1, 4, dtype=torch.int32))
    assert issubclass(SpattnInputError, SpattnError)


# ------------------------------------------------------------------ Triton (interpreter)

interp = pytest.mark.interpreter


@interp
@pytest.mark.parametrize("name", list(PATTERNS))
def test_triton_decode(name):
    _case(name, "triton", B=2, Hq=4, Hk=2, Lq=2, cap=96, D=16, lens=[96, 51], num_splits=4)


@interp
@pytest.mark.parametrize("name,page", [("causal", 16), ("streaming", 8), ("documents", 32)],
                         ids=["causal-page16", "streaming-page8", "documents-page32"])
def test_triton_decode_paged(name, page):
    _case(name, "triton", B=2, Hq=4, Hk=1, Lq=1, cap=64, D=16, lens=[64, 29], paged=page,
          num_splits=2)


def _strided(t):
    """``t``'s values in a tensor of stride 2 along its first dim, and -1 in the gaps."""
    wide = torch.full((2 * t.shape[0], *t.shape[1:]), -1, dtype=t.dtype)
    wide[::2] = t
    return wide[::2]


_VIEWS = {
    "seq-strided": lambda t: _strided(t) if t.dim() == 1 else t,
    "seq-expanded": lambda t: t[:1].clone().expand(t.shape[0]) if t.dim() == 1 else t,
    "table-column-major": lambda t: t.t().contiguous().t() if t.dim() == 2 else t,
    "table-strided-rows": lambda t: _strided(t) if t.dim() == 2 else t,
}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interp)])
@pytest.mark.parametrize("view", list(_VIEWS))
def test_decode_takes_strided_lengths_and_page_tables(backend, view):
    """``seq_lens`` and the page table as strided, expanded or column-major tensors give
    the step of their values (the Triton kernel reads them as contiguous copies where
    their strides are not its own)."""
    lens = [64, 64] if view == "seq-expanded" else [64, 29]
    _case("streaming", backend, B=2, Hq=4, Hk=2, Lq=2, cap=64, D=16, lens=lens, paged=8,
          num_splits=2, view=_VIEWS[view])


@interp
@pytest.mark.parametrize("Hq,Hk,Lq,splits", [(8, 1, 3, 2), (2, 2, 1, 16), (6, 2, 5, 1)],
                         ids=["G8-Lq3-rows24", "G1-splits16", "G3-Lq5-one-split"])
def test_triton_decode_packing_and_splits(Hq, Hk, Lq, splits):
    """Packed tiles of 24 rows (BLOCK_M 32), more splits than key tiles (empty splits),
    one split; D = 24 (BLOCK_D 32, masked head dim)."""
    _case("window", "triton", B=1, Hq=Hq, Hk=Hk, Lq=Lq, cap=80, D=24, lens=[77],
          num_splits=splits)


@interp
@pytest.mark.parametrize("fails,want,prec,error", [
    (1, (32, 1), None, "resources"), (2, (16, 2), None, "resources"),
    (4, (32, 2), "ieee", "resources"), (8, None, None, "resources"),
    (1, (32, 1), None, "ptxas")],
    ids=["one-stage-fewer", "half-the-key-tile", "exact-fp32-products", "nothing-fits",
         "assembler-fails"])
def test_triton_decode_shrinks_a_kernel_that_does_not_fit(monkeypatch, fails, want, prec,
                                                          error):
    """A decode kernel that does not fit shared memory (Triton's OutOfResources at its
    first launch) or that the assembler fails on (PTXASError) is run with one stage fewer,
    then half the key tile, then (a float32 cache) in its first configuration with exact
    fp32 products, and the step is right; when nothing fits, a SpattnConfigError says so
    (never Triton's error)."""
    from triton.runtime.errors import OutOfResources, PTXASError
    real_config, real_launch = dec.default_config, dec._launch
    monkeypatch.setattr(dec, "default_config", lambda *a, **kw: dec.DecodeConfig(
        **{**real_config(*a, **kw).as_dict(), "block_n": 32, "num_stages": 2}))
    left = [fails]
    dec.DECODE_PLANS.clear()        # (a plan of this case's own, not one an earlier left)

    def launch(bound, kernel, grid, args, free, meta):
        if meta.get("num_stages") is not None and left[0] > 0:
            left[0] -= 1
            raise OutOfResources(300000, 232448, "shared memory") if error == "resources" \
                else PTXASError("PTXAS error: `ptxas` failed with error code -11")
        return real_launch(bound, kernel, grid, args, free, meta)
    monkeypatch.setattr(dec, "_launch", launch)
    if want is None:
        with pytest.raises(spattn.SpattnConfigError, match="no configuration of the decode"):
            _case("window", "triton", B=1, Hq=2, Hk=1, Lq=2, cap=80, D=16, lens=[77],
                  num_splits=fails)
        return
    pat = _case("window", "triton", B=1, Hq=2, Hk=1, Lq=2, cap=80, D=16, lens=[77],
                num_splits=fails)[0]
    plans = [p for p in dec.DECODE_PLANS._plans.values()
             if p.pattern is pat and p.splits == fails]
    assert [(p.config.block_n, p.config.num_stages, p.dot_prec) for p in plans] == \
        [(*want, prec)]
    assert left == [0]


@interp
def test_triton_decode_q_offset_and_rows_without_keys():
    """A contiguous cache with an explicit q_offset moving the rows before the keys."""
    pat = spattn.compile("causal & window(W)", W=8, backend="triton")
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 3, 16, generator=g)
    k, v = torch.randn(1, 2, 48, 16, generator=g), torch.randn(1, 2, 48, 16, generator=g)
    o, lse = pat.decode(q, k, v, q_offset=-1, return_lse=True, num_splits=2)
    want_o, want_lse = attention_reference(q, k, v, pat.mask(3, 48, q_offset=-1))
    assert bool(torch.isneginf(lse[:, :, 0]).all())                 # row at position -1
    assert torch.equal(o[:, :, 0], torch.zeros_like(o[:, :, 0]))
    _close("o", o, want_o)
    _close("lse", lse, want_lse)


@interp
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(src=st.sampled_from(["causal & k >= first[b]", "k >= first[b] & k < first[b] + 40",
                            "q - k >= first[b] | k < 3", "causal & k >= first[b] + lim[h]"]),
       Lq=st.integers(1, 3), cap=st.integers(40, 120), ragged=st.booleans(),
       shift=st.integers(-30, 0), paged=st.sampled_from([0, 16]), seed=st.integers(0, 2**31 - 1))
def test_triton_decode_ranges_read_uniform_inputs(src, Lq, cap, ragged, shift, paged, seed):
    """Inputs read at uniform indices (``first[b]``, ``lim[h]``) enter the decode kernel's
    closed form (``ir.ranges.closed_form_with_loads``): the ``ranges`` strategy, its tiles
    from one load per program, FULL tiles without the predicate. Rows whose padding covers
    their keys, ragged lengths, a q_offset, paged caches; every output and lse element
    against the float64 reference."""
    pat = spattn.compile(src, backend="triton")
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hk, D = 3, 4, 2, 16
    if paged:
        cap = -(-cap // paged) * paged
    lens = [int(x) for x in torch.randint(Lq, cap + 1, (B,), generator=g)] if ragged or paged \
        else None
    ins = {"first": torch.randint(0, cap + 1, (B,), generator=g).to(torch.int32)}
    if "lim" in src:
        ins["lim"] = torch.randint(-3, 20, (Hq,), generator=g)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k, v = torch.randn(B, Hk, cap, D, generator=g), torch.randn(B, Hk, cap, D, generator=g)
    dec.DECODE_PLANS.clear()
    kw = {} if lens is not None else {"q_offset": cap - Lq + shift}
    if paged:
        kp, vp, table = _paged(k, v, paged, g)
        o, lse = pat.decode(q, kp, vp, seq_lens=torch.tensor(lens), page_table=table,
                            return_lse=True, num_splits=3, **ins)
    else:
        o, lse = pat.decode(q, k, v, seq_lens=None if lens is None else torch.tensor(lens),
                            return_lse=True, num_splits=3, **kw, **ins)
    want_o, want_lse = _reference(pat, q, k, v, lens or [cap] * B, ins,
                                  q_offset=kw.get("q_offset"))
    _close("o", o, want_o)
    _close("lse", lse, want_lse)
    plan = next(iter(dec.DECODE_PLANS._plans.values()))
    assert plan.config.strategy == "ranges"


@interp
def test_triton_bucket_reuse_one_kernel():
    """A growing cache within one bucket: one plan, one kernel module, one kernel file."""
    dec.DECODE_PLANS.clear()
    cache.clear_memory()
    pat = spattn.compile("causal & (window(W) | sink(4))", W=20, backend="triton")
    g = torch.Generator().manual_seed(7)
    k, v = torch.randn(1, 2, 80, 16, generator=g), torch.randn(1, 2, 80, 16, generator=g)
    seen = set()
    before = set(os.listdir(cache.cache_dir()))
    for L in (33, 50, 80):
        q = torch.randn(1, 4, 1, 16, generator=g)
        o = pat.decode(q, k, v, seq_lens=torch.tensor([L]), num_splits=2)
        _close(f"L{L}", o, attention_reference(q, k[:, :, :L], v[:, :, :L], pat.mask(1, L))[0])
        plan = next(iter(dec.DECODE_PLANS._plans.values()))
        seen.add(id(plan.module))
    assert len(dec.DECODE_PLANS) == 1 and len(seen) == 1
    files = set(os.listdir(cache.cache_dir())) - before
    assert len(files) == 1 and next(iter(files)).startswith("attn_decode_"), files


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interp)])
def test_fast_entry_serves_repeated_routed_steps(backend):
    """A routed step with runtime inputs (or any on Triton) that repeats its plan's last
    call (same q shape, scale and inputs, unchanged) skips the full path's checks
    (``decode.fast_routed``) while the cache grows within the bucket; a new or rewritten input, another scale or another bucket takes
    the full path again; an input that covers only the capacity it was checked at is
    checked again past it. Every output element against the float64 reference."""
    dec.DECODE_PLANS.clear()
    pat = spattn.compile("causal & k >= first[b] & keep[k] != 0", backend=backend)
    g = torch.Generator().manual_seed(8)
    B, H, D = 2, 2, 16
    k, v = torch.randn(B, H, 600, D, generator=g), torch.randn(B, H, 600, D, generator=g)
    first = torch.tensor([3, 100], dtype=torch.int32)
    keep = torch.rand(B, 600, generator=g) > 0.1      # covers every step (bucket 512 too)
    full = []
    real = dec._step

    def counted(*a, **kw):
        full.append(a[2].shape[2])            # (pattern, q, k_cache, ...): the capacity
        return real(*a, **kw)

    def step(L, scale=None, **ins):
        q = torch.randn(B, H, 1, D, generator=g)
        with mock.patch.object(dec, "_step", counted):
            o = pat(q, k[:, :, :L], v[:, :, :L], scale=scale, **ins)
        m = pat.mask(1, L, batch=B, **ins)
        _close(f"L{L}", o, attention_reference(q, k[:, :, :L], v[:, :, :L], m,
                                                scale=scale)[0])

    for L in (300, 301, 340, 299):
        step(L, first=first, keep=keep)
    assert full == [300]                               # then the fast entry
    step(302, first=first.clone(), keep=keep)          # a new tensor
    step(303, first=first, keep=keep)                  # the first one again
    first[1] = 50                                      # written in place
    step(304, first=first, keep=keep)
    step(305, scale=0.3, first=first, keep=keep)       # another scale
    step(520, first=first, keep=keep)                  # another bucket
    assert full == [300, 302, 303, 304, 305, 520]
    short = keep[:, :310].clone()                      # covers capacities up to 310 only
    step(305, first=first, keep=short)
    step(310, first=first, keep=short)
    assert full[-2:] == [305, 310]
    step(306, first=first, keep=short)                 # below the capacity checked: fast
    assert len(full) == 8
    with pytest.raises(SpattnInputError):
        pat(torch.randn(B, H, 1, D), k[:, :, :311], v[:, :, :311], first=first, keep=short)


@pytest.mark.parametrize("score", ["softcap(20)", "s + rel[h, clamp(q - k, 0, 511)]"],
                         ids=["softcap", "rel-bias"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interp)])
def test_fast_entry_serves_scored_routed_steps(backend, score):
    """The routed entry of a pattern with a score: repeated steps skip the full path; a
    table written in place, or one that requires grad (its gradients come from the score
    path), takes the full path again. Every output element against the float64 reference
    of the mask and the score."""
    from spattn.runtime.reference import pattern_reference
    dec.DECODE_PLANS.clear()
    pat = spattn.compile("causal & k >= first[b]", score=score, backend=backend)
    g = torch.Generator().manual_seed(9)
    B, H, D = 2, 2, 16
    k, v = torch.randn(B, H, 400, D, generator=g), torch.randn(B, H, 400, D, generator=g)
    ins = {"first": torch.tensor([3, 90])}
    if "rel" in score:
        ins["rel"] = torch.randn(H, 512, generator=g)
    full = []
    real = dec._step

    def counted(*a, **kw):
        full.append(a[2].shape[2])
        return real(*a, **kw)

    def step(L):
        q = torch.randn(B, H, 1, D, generator=g)
        with mock.patch.object(dec, "_step", counted):
            o = pat(q, k[:, :, :L], v[:, :, :L], **ins)
        want = pattern_reference(pat, q.double(), k[:, :, :L].double(), v[:, :, :L].double(),
                                 **{n: t.detach().double() if t.is_floating_point() else t
                                    for n, t in ins.items()})[0]
        _close(f"L{L}", o.detach(), want)

    with torch.no_grad():
        for L in (300, 301, 320):
            step(L)
    assert full == [300]
    if "rel" in score:
        with torch.no_grad():
            ins["rel"][0, :5] += 1.0                     # written in place
            step(321)
            step(322)
        assert full == [300, 321]
        ins["rel"].requires_grad_()
        step(323)                                       # the score path, not decode
        assert full[-1] == 323


_SPECS: dict = {}


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.integers(-2 ** 40, 2 ** 40), st.sampled_from([0, 1, 16, -16, 2 ** 31 - 1,
                                                                2 ** 31, -2 ** 31,
                                                                -2 ** 31 - 1, 2 ** 32])),
       st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.int32,
                        torch.int64]), st.integers(0, 7), st.booleans())
def test_launch_spec_decides_what_triton_specialises(value, dtype, offset, free):
    """A bound decode launch serves every later launch of its ``decode._launch_spec``: two
    arguments with one spec must get one specialisation from Triton's own
    ``native_specialize_impl`` (ints: width, divisibility by 16, equality to 1, only the
    width for ``do_not_specialize``; tensors: dtype and 16-byte alignment)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    t = torch.empty(16, dtype=dtype)[offset:]
    for arg in (value, t):
        spec = dec._launch_spec((arg,), 1 if free else 0)
        native = native_specialize_impl(BaseBackend, arg, False, not free, True)
        native = (str(native[0]), str(native[1]))
        seen = _SPECS.setdefault((free, spec), native)
        assert seen == native, f"{arg!r}: spec {spec} has {seen} and {native}"


@interp
def test_triton_refuses_64_bit_patterns_and_routing_falls_back():
    """A pattern whose integers need 64 bits: decode says so; pat(q, k, v) runs it on the
    normal path (64-bit kernels) with the reference's result."""
    pat = spattn.compile("input doc\npattern documents = causal & same(doc)",
                         backend="triton")
    q, k, v = _qkv(L=300)
    doc = (torch.arange(300) // 7) * (1 << 33)          # ids 2**33 apart: 32 bits alias them
    with pytest.raises(SpattnValueError, match="64-bit integer arithmetic"):
        pat.decode(q, k, v, num_splits=2, doc=doc)
    _close("o", pat(q, k, v, doc=doc), attention_reference(q, k, v, pat.mask(1, 300, doc=doc))[0])


@interp
@pytest.mark.parametrize("length", [500, 2 ** 31, 2 ** 40 + 7, -5],
                         ids=["500", "2p31", "2p40", "negative"])
def test_triton_unchecked_lengths_are_clamped(length):
    """check=False: a length beyond the cache is clamped to it (below Lq, to Lq), never
    read out of bounds; at the width of seq_lens (2**31 read as 32 bits was negative: the
    step ran at Lq keys)."""
    pat = spattn.compile("causal", backend="triton")
    q, k, v = _qkv(L=32)
    o = pat.decode(q, k, v, seq_lens=torch.tensor([length]), check=False, num_splits=2)
    L = min(max(length, 1), 32)
    _close("o", o, attention_reference(q, k[:, :, :L], v[:, :, :L], pat.mask(1, L))[0])


# ------------------------------------------------------------------ random patterns

def _random_case(src, backend, Hk, group, Lq, L, lens, seed, **kw):
    L = max(L, Lq)
    lens = [Lq + x % (L - Lq + 1) for x in lens]
    try:
        pat = spattn.compile(src, backend=backend)
    except SpattnError:
        return
    g = torch.Generator().manual_seed(seed)
    H = Hk * group
    q = torch.randn(len(lens), H, Lq, 16, generator=g)
    k = torch.randn(len(lens), Hk, L, 16, generator=g)
    v = torch.randn(len(lens), Hk, L, 16, generator=g)
    try:
        o, lse = pat.decode(q, k, v, seq_lens=torch.tensor(lens), return_lse=True, **kw)
    except SpattnError:
        event("refused")
        return
    plan = next(p for p in dec.DECODE_PLANS._plans.values() if p.pattern == pat)
    event("closed form" if plan.closed_form is not None else "predicate")
    want_o, want_lse = _reference(pat, q, k, v, lens, {})
    _close("o", o, want_o)
    _close("lse", lse, want_lse)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(src=bool_exprs(), Hk=st.integers(1, 2), group=st.integers(1, 3), Lq=st.integers(1, 16),
       L=st.integers(16, 300), lens=st.lists(st.integers(0, 300), min_size=2, max_size=2),
       seed=st.integers(0, 2 ** 31 - 1), views=st.booleans())
def test_random_patterns_decode_torch(src, Hk, group, Lq, L, lens, seed, views):
    """The CPU step's key runs (closed form or predicate), masks and merges against the
    reference, with per-batch lengths: no allowed key is dropped, no masked key is used."""
    with mock.patch.object(dec, "VIEW_BYTES", 0 if views else dec.VIEW_BYTES):
        _random_case(src, "torch", Hk, group, Lq, L, lens, seed)


@interp
@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(src=bool_exprs(), group=st.integers(1, 2), Lq=st.integers(1, 4), L=st.integers(8, 48),
       lens=st.lists(st.integers(0, 48), min_size=1, max_size=2),
       seed=st.integers(0, 2 ** 31 - 1))
def test_random_patterns_decode_triton(src, group, Lq, L, lens, seed):
    """The decode kernel's emitted closed form (or scan) on random patterns."""
    _random_case(src, "triton", 1, group, Lq, L, lens, seed, num_splits=2)


def test_example_decode_loop_runs():
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "decode_loop.py"
    spec = importlib.util.spec_from_file_location("decode_loop", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--steps", "8"]) == 0


@pytest.mark.parametrize("groups,keys,sms,want", [
    (128, 131072, 132, 2),    # B = 16, GQA 32/8: 256 programs, not the 512 of rounding up
    (8, 131072, 132, 32),     # B = 1: 256 programs
    (8, 4096, 132, 16),       # a window of 4096 keys: at least 256 keys per split
    (8, 8192, 132, 32),
    (1, 10 ** 8, 132, 128),   # at most 128
    (4096, 131072, 132, 1),   # enough groups to fill the device alone
    (8, 200, 132, 1),         # fewer keys than one split's
    (8, 131072, None, 4),     # no CUDA device (the interpreter)
    (8, 200, None, 2),        # the interpreter: at least 64 keys per split
], ids=lambda x: str(x))
def test_split_count(groups, keys, sms, want):
    """The default split count is a power of two rounded down from about two programs per
    SM, each split at least SPLIT_KEYS keys (docs/decode.md, "Launch configuration")."""
    from spattn.runtime.decode import split_count
    n = split_count(groups, keys, sms)
    assert n == want and n & (n - 1) == 0


def test_default_config_gpu_tiles():
    """GPU decode tiles: 128 keys and 2 stages up to D = 128 in 16 bits (64 keys and 3
    stages in fp32, whose 128-key tiles in two stages exceed shared memory), 32 keys
    beyond; 16 keys under the interpreter."""
    from spattn.runtime.decode import default_config
    c = default_config(None, 128, torch.bfloat16, interpret=False)
    assert (c.block_n, c.num_warps, c.num_stages, c.strategy) == (128, 4, 2, "scan")
    assert default_config(None, 64, torch.float16, interpret=False).block_n == 128
    c = default_config(None, 128, torch.float32, interpret=False)
    assert (c.block_n, c.num_stages) == (64, 3)
    assert default_config(None, 256, torch.float32, interpret=False).block_n == 32
    assert default_config(None, 256, torch.bfloat16, interpret=False).block_n == 32
    assert default_config(None, 128, torch.bfloat16, interpret=True).block_n == 16


@pytest.fixture
def gpu_decode_config(monkeypatch):
    """The GPU's 16-bit decode tiles (128 keys, 2 stages) under the interpreter."""
    import dataclasses
    real = dec.default_config
    gpu = real(None, 128, torch.bfloat16, False)
    monkeypatch.setattr(dec, "default_config", lambda *a, **kw: dataclasses.replace(
        real(*a, **kw), block_n=gpu.block_n, num_stages=gpu.num_stages))
    dec.DECODE_PLANS.clear()
    yield
    dec.DECODE_PLANS.clear()


@interp
@pytest.mark.parametrize("name,paged,splits", [
    ("streaming", 0, None), ("documents", 16, None), ("per-head", 0, 4), ("causal", 32, 2)],
    ids=["streaming", "documents-page16", "per-head-splits4", "causal-page32-splits2"])
def test_triton_decode_gpu_tiles(gpu_decode_config, name, paged, splits):
    """At the GPU's 128-key tiles: a tile spanning several pages, lengths no tile divides
    and shorter than one tile, splits with no tile of their own (the default count at
    the bucket, or forced), against the float64 reference."""
    _case(name, "triton", B=3, Hq=4, Hk=2, Lq=2, cap=320, D=16, lens=[320, 77, 200],
          paged=paged, num_splits=splits)
    plan = next(iter(dec.DECODE_PLANS._plans.values()))
    assert plan.config.block_n == 128, plan
