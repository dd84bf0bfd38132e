"""Generated forward kernels under TRITON_INTERPRET=1: o and lse vs the float64 reference.

Every prelude pattern and compositions, runtime inputs (documents, a random block
table, per-batch and per-head inputs), per-head list params, GQA/MQA, Lq != Lk,
q_offset, fully masked rows, both strategies ("ranges" with closed forms, "table"
with CSR tile lists), ragged lengths, D = 80, non-contiguous inputs, fp16.
Every element of o and lse is checked (relative error < 1e-3 in fp32).
"""

import pytest
import torch

import spattn
from spattn.runtime import triton_backend as tb

from tests.helpers.kernels import (analysis_cf, block_table, chunked_cf, check_close,
                              check_lse, compile_pattern, doc_ids, global_local_cf, rand_qkv,
                              reference, trivial_cf, window_cf, window_sink_cf)

pytestmark = pytest.mark.interpreter

TOL = 1e-3
STRATEGIES = ("ranges", "table")


def _docs(gen, Bn, H, Lq, Lk):
    return {"doc": doc_ids(max(Lq, Lk), 4, gen)}


def _blocks(gen, Bn, H, Lq, Lk):
    return {"blocks": block_table(-(-Lq // 16), -(-Lk // 16), gen)}


# (id, source, runtime-input factory, hand-written closed form or None, q_offset)
PATTERNS = [
    ("full", "full", None, None, None),
    ("causal", "causal", None, lambda: window_cf(10 ** 5), None),
    ("window", "window(13)", None, lambda: window_cf(13), None),
    ("window_sink", "causal & (window(13) | sink(4))", None, lambda: window_sink_cf(13, 4), None),
    ("local", "local(5, 9)", None, None, None),
    ("sink", "sink(3)", None, None, None),
    ("global_local", "global_tokens(4) | local(3, 5)", None, lambda: global_local_cf(4, 3, 5),
     None),
    ("prefix_lm", "prefix_lm(11)", None, None, None),
    ("dilated", "dilated(5, 3)", None, None, None),
    ("strided", "strided(7)", None, None, None),
    ("fixed", "fixed(8, 3)", None, None, None),
    ("chunked", "chunked(12)", None, lambda: chunked_cf(12), None),
    ("power2", "power2(4)", None, None, None),
    ("per_head", "causal & q - k < [6, 20][h]", None, None, None),
    ("documents", "causal & same(doc)", _docs, None, None),
    ("blocks", "blocks[q // 16, k // 16]", _blocks, None, None),
    ("floor_neg_q", "(q - k) % 3 == 0 | q // 8 == k // 8", None, None, -21),
    ("abs_minmax", "abs(q - k) <= max(2, min(k // 4, 6)) | (if q < 10 then k < 3 else k > 40)",
     None, None, None),
]


def _cf_for(strategy, pattern, cf_factory):
    if strategy != "ranges":
        return None
    if cf_factory is not None:
        return cf_factory()
    return analysis_cf(pattern) or trivial_cf()


def run_fwd(src, *, strategy, Bn=1, Hq=2, Hk=None, Lq=50, Lk=None, D=32, bm=32, bn=16,
            dtype=torch.float32, inputs_fn=None, cf_factory=None, q_offset=None, seed=0,
            layout="bhld", tol=TOL):
    Hk = Hk or Hq
    Lk = Lk or Lq
    pattern = compile_pattern(src)
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = inputs_fn(gen, Bn, Hq, Lq, Lk) if inputs_fn else {}
    q, k, v = rand_qkv(Bn, Hq, Hk, Lq, Lk, D, dtype=dtype, seed=seed, layout=layout)
    off = Lk - Lq if q_offset is None else q_offset
    scale = D ** -0.5
    cf = _cf_for(strategy, pattern, cf_factory)
    o, lse = tb.fwd(pattern, q, k, v, scale=scale, q_offset=off, inputs=inputs,
                    strategy=strategy, block_m=bm, block_n=bn, closed_form=cf)
    ref_o, ref_lse, m = reference(pattern, q, k, v, scale=scale, q_offset=off, inputs=inputs)
    assert o.shape == (Bn, Hq, Lq, D) and o.dtype == dtype
    assert lse.shape == (Bn, Hq, Lq) and lse.dtype == torch.float32
    check_close("o", o, ref_o, tol)
    check_lse(lse, ref_lse, tol)
    return o, lse, m


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name,src,inputs_fn,cf_factory,q_offset", PATTERNS,
                         ids=[f"B1-H2-L50-D32-fp32-{p[0]}" for p in PATTERNS])
def test_patterns(name, src, inputs_fn, cf_factory, q_offset, strategy):
    run_fwd(src, strategy=strategy, inputs_fn=inputs_fn, cf_factory=cf_factory,
            q_offset=q_offset, seed=hash(name) % 1000)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("Hk", [2, 1], ids=["gqa-Hk2", "mqa-Hk1"])
def test_gqa(Hk, strategy):
    run_fwd("causal & (window(13) | sink(4))", strategy=strategy, Bn=2, Hq=4, Hk=Hk, Lq=40,
            cf_factory=lambda: window_sink_cf(13, 4), seed=3)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("Lq,Lk,q_offset", [(37, 70, None), (37, 70, -5), (70, 37, 10),
                                            (21, 45, 30)],
                         ids=["Lq37-Lk70-bottomright", "Lq37-Lk70-off-5", "Lq70-Lk37-off10",
                              "Lq21-Lk45-off30"])
def test_lengths_and_offsets(Lq, Lk, q_offset, strategy):
    run_fwd("causal & (window(13) | sink(4))", strategy=strategy, Lq=Lq, Lk=Lk,
            q_offset=q_offset, cf_factory=lambda: window_sink_cf(13, 4), seed=Lq + Lk)


def check_dead_rows(strategy):
    """Rows with q < 20 see no key (k <= q < 20 contradicts k >= 20), rows q >= 20 see some:
    a dead row gives o = 0 and lse = -inf, never NaN."""
    o, lse, m = run_fwd("causal & k >= 20", strategy=strategy, Lq=50, seed=7)
    dead = ~m.any(-1)
    assert dead.any()
    assert torch.equal(o[dead.expand_as(o[..., 0])], torch.zeros_like(o[dead.expand_as(
        o[..., 0])]))
    assert torch.isneginf(lse[dead.expand_as(lse)]).all()
    assert not torch.isnan(o).any()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fully_masked_rows(strategy):
    check_dead_rows(strategy)


def test_negative_positions_all_masked_tile():
    # q_offset pushes every query of the first tiles to negative positions: whole tiles dead
    run_fwd("causal", strategy="table", Lq=60, Lk=30, q_offset=-40, seed=11)
    run_fwd("causal", strategy="ranges", Lq=60, Lk=30, q_offset=-40,
            cf_factory=lambda: window_cf(10 ** 5), seed=11)


@pytest.mark.parametrize("D", [80, 16], ids=["D80", "D16"])
def test_head_dims(D):
    strategy = "ranges" if D == 80 else "table"
    run_fwd("causal & window(13)", strategy=strategy, D=D, Lq=33,
            cf_factory=lambda: window_cf(13), seed=D)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_non_contiguous(strategy):
    # q, k, v made by transposing [B, L, H, D]: strides passed as they are
    run_fwd("causal & window(13)", strategy=strategy, Bn=2, Hq=2, Lq=45, layout="blhd",
            cf_factory=lambda: window_cf(13), seed=5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(dtype):
    # bf16 runs in fp32 under the interpreter (its bf16 tl.dot is not emulated): see launcher
    run_fwd("causal & (window(13) | sink(4))", strategy="ranges", dtype=dtype,
            cf_factory=lambda: window_sink_cf(13, 4), tol=1e-2, seed=9)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inputs_per_batch_and_head(strategy):
    Bn, H, L = 2, 2, 48

    def per_batch(gen, *_):
        return {"doc": doc_ids(L, 3, gen, batch=Bn)}                 # [B, L]

    def per_head(gen, *_):
        return {"doc": doc_ids(L, 3, gen, batch=Bn * H).view(Bn, H, L)}  # [B, H, L]

    run_fwd("causal & same(doc)", strategy=strategy, Bn=Bn, Hq=H, Lq=L, inputs_fn=per_batch,
            seed=13)
    run_fwd("causal & same(doc)", strategy=strategy, Bn=Bn, Hq=H, Lq=L, inputs_fn=per_head,
            seed=14)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.bool], ids=str)
def test_narrow_int_inputs_tables_built_once(monkeypatch, dtype):
    """Runtime inputs of another integer dtype: the plan (cached per input tensor and
    version) builds the tables once while the input is unchanged, and again after an
    in-place write (with the new result)."""
    builds = []
    real = tb.fwd_tables
    monkeypatch.setattr(tb, "fwd_tables", lambda *a, **k: builds.append(1) or real(*a, **k))
    for var, val in (("SPATTN_STRATEGY", "table"), ("SPATTN_BLOCK_M", "16"),
                     ("SPATTN_BLOCK_N", "16")):
        monkeypatch.setenv(var, val)
    gen = torch.Generator().manual_seed(21)
    L = 40
    pat = spattn.compile("causal & same(doc)", backend="triton")
    q, k, v = rand_qkv(1, 2, 2, L, L, 32, seed=22)
    doc = doc_ids(L, 3, gen).to(dtype) if dtype != torch.bool else torch.arange(L) >= 17
    scale = 32 ** -0.5
    for _ in range(3):
        o = pat(q, k, v, scale=scale, doc=doc)
    assert len(builds) == 1
    want, want_lse, _ = reference(pat, q, k, v, scale=scale, q_offset=0, inputs={"doc": doc})
    check_close("o", o, want, TOL)
    doc[: L // 2] = 0 if dtype != torch.bool else True      # in place: tables rebuilt
    o = pat(q, k, v, scale=scale, doc=doc)
    assert len(builds) == 2
    want, _, _ = reference(pat, q, k, v, scale=scale, q_offset=0, inputs={"doc": doc})
    check_close("o after the in-place write", o, want, TOL)


def test_default_pick_runs():
    """No strategy given: the analysis's choice (or the fallback) runs and is correct."""
    pattern = compile_pattern("causal & window(9)")
    q, k, v = rand_qkv(1, 1, 1, 40, 40, 32, seed=21)
    o, lse = tb.fwd(pattern, q, k, v, scale=0.2, q_offset=0, inputs={}, block_m=16, block_n=16)
    ref_o, ref_lse, _ = reference(pattern, q, k, v, scale=0.2, q_offset=0, inputs={})
    check_close("o", o, ref_o, TOL)
    check_lse(lse, ref_lse)


# ------------------------------------------- fused forward loop (SPATTN_FWD_LOOP=fused)

@pytest.fixture
def fused_loop(monkeypatch):
    """The "fused" forward loop variant (``loop`` of the kernel config; here through its
    environment override, which the config memo and the cache key both see)."""
    from spattn.runtime import cache
    monkeypatch.setenv("SPATTN_FWD_LOOP", "fused")
    cache.clear_memory()
    yield cache
    cache.clear_memory()


def _assert_fused(cache):
    mods = list(cache._modules.values())
    assert mods and all(any(n.startswith("_fwd_fused_") for n in vars(m)) for m in mods)
    assert not any(any(n.startswith("_fwd_range_") for n in vars(m)) for m in mods)


FUSED_PATTERNS = [p for p in PATTERNS if p[0] in ("causal", "window", "window_sink", "prefix_lm",
                                                  "local", "global_local")]


@pytest.mark.parametrize("name,src,inputs_fn,cf_factory,q_offset", FUSED_PATTERNS,
                         ids=[f"fused-{p[0]}" for p in FUSED_PATTERNS])
def test_fused_patterns(fused_loop, name, src, inputs_fn, cf_factory, q_offset):
    run_fwd(src, strategy="ranges", inputs_fn=inputs_fn, cf_factory=cf_factory,
            q_offset=q_offset, seed=hash(name) % 1000)
    _assert_fused(fused_loop)


def test_fused_fully_masked_rows(fused_loop):
    # a dead row's first tiles are FULL-free; a live row's later tiles mix: guard every tile
    check_dead_rows("ranges")
    run_fwd("causal", strategy="ranges", Lq=60, Lk=30, q_offset=-40,
            cf_factory=lambda: window_cf(10 ** 5), seed=11)
    _assert_fused(fused_loop)


@pytest.mark.parametrize("Lq,Lk,q_offset", [(37, 70, None), (37, 70, -5), (70, 37, 10),
                                            (21, 45, 30)],
                         ids=["Lq37-Lk70-bottomright", "Lq37-Lk70-off-5", "Lq70-Lk37-off10",
                              "Lq21-Lk45-off30"])
def test_fused_ragged_lengths_and_offsets(fused_loop, Lq, Lk, q_offset):
    # Lk = 37, 45, 70 with BLOCK_N = 16: a ragged last key tile (bounds mask on a FULL-range tile)
    run_fwd("causal & (window(13) | sink(4))", strategy="ranges", Lq=Lq, Lk=Lk,
            q_offset=q_offset, cf_factory=lambda: window_sink_cf(13, 4), seed=Lq + Lk)
    run_fwd("full", strategy="ranges", Lq=Lq, Lk=Lk, q_offset=q_offset, cf_factory=trivial_cf,
            seed=Lq)
    _assert_fused(fused_loop)


@pytest.mark.parametrize("Hk", [2, 1], ids=["gqa-Hk2", "mqa-Hk1"])
def test_fused_gqa(fused_loop, Hk):
    run_fwd("causal & (window(13) | sink(4))", strategy="ranges", Bn=2, Hq=4, Hk=Hk, Lq=40,
            cf_factory=lambda: window_sink_cf(13, 4), seed=3)
    _assert_fused(fused_loop)


def test_fused_head_dim_80(fused_loop):
    run_fwd("causal & window(13)", strategy="ranges", D=80, Lq=33,
            cf_factory=lambda: window_cf(13), seed=80)
    _assert_fused(fused_loop)


# -------------------------------- persistent forward kernel (SPATTN_FWD_LOOP=persistent)

@pytest.fixture
def persistent_loop(monkeypatch):
    """The "persistent" forward kernel: under the interpreter it launches
    ``tb.INTERPRET_PROGRAMS`` (3) programs, each looping over many query tiles."""
    from spattn.runtime import cache
    monkeypatch.setenv("SPATTN_FWD_LOOP", "persistent")
    cache.clear_memory()
    yield cache
    cache.clear_memory()


def _assert_persistent(cache):
    import pathlib
    srcs = [pathlib.Path(p).read_text() for p in cache._modules]
    assert srcs and all("for i_p in tl.range(tl.program_id(0), N_WORK, tl.num_programs(0)"
                        in s and "Forward loop: persistent" in s for s in srcs)


PERSISTENT_PATTERNS = [p for p in PATTERNS if p[0] in ("full", "causal", "window", "window_sink",
                                                       "prefix_lm", "documents", "blocks",
                                                       "per_head", "floor_neg_q")]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name,src,inputs_fn,cf_factory,q_offset", PERSISTENT_PATTERNS,
                         ids=[f"persistent-{p[0]}" for p in PERSISTENT_PATTERNS])
def test_persistent_patterns(persistent_loop, name, src, inputs_fn, cf_factory, q_offset,
                             strategy):
    # B2 x H2 x 4 query tiles = 16 work items over 3 programs; Lk != Lq where no input
    # is indexed by both
    run_fwd(src, strategy=strategy, Bn=2, Lq=100, Lk=100 if inputs_fn else 90, bm=32,
            inputs_fn=inputs_fn,
            cf_factory=cf_factory, q_offset=q_offset, seed=hash(name) % 1000 + 5)
    _assert_persistent(persistent_loop)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_persistent_gqa_offsets_and_masked_rows(persistent_loop, strategy):
    run_fwd("causal & (window(13) | sink(4))", strategy=strategy, Bn=2, Hq=4, Hk=1, Lq=37,
            Lk=70, q_offset=-5, cf_factory=lambda: window_sink_cf(13, 4), seed=9)
    check_dead_rows(strategy)
    _assert_persistent(persistent_loop)
    # one work item fewer than the programs: the loop runs zero times for some programs
    run_fwd("window(13)", strategy=strategy, Bn=1, Hq=1, Lq=20, bm=32, seed=4,
            cf_factory=(lambda: window_cf(13)) if strategy == "ranges" else None)


# ----------------------- the online rescale: row maxima that jump after the first tile

def _growing_qkv(Bn, H, L, D, seed, dtype=torch.float32):
    """Keys whose norm grows along the sequence: a row's max grows by more than a
    factor 2**16 from one key tile to the next (the test asserts it), so acc and l_i
    are rescaled by large factors after the first tile, in PARTIAL and FULL tiles
    alike; random normal scores move it by a few units, where a wrong rescale hides."""
    q, k, v = rand_qkv(Bn, H, H, L, L, D, seed=seed)
    growth = 1.0 + torch.arange(L, dtype=torch.float32) / 3.0
    return q.to(dtype), (k * growth[:, None]).to(dtype), v.to(dtype)


def _max_jump_log2(q, k, scale, bn, allowed):
    """The largest increase of a row's running max (log2 units) after its first key tile."""
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale / torch.log(
        torch.tensor(2.0, dtype=torch.float64))
    s = s.masked_fill(~allowed, float("-inf"))
    tiles = s.split(bn, dim=-1)
    run = tiles[0].amax(-1)
    jump = torch.tensor(0.0, dtype=torch.float64)
    for t in tiles[1:]:
        new = torch.maximum(run, t.amax(-1))
        live = torch.isfinite(run)
        if live.any():
            jump = torch.maximum(jump, (new - run)[live].max())
        run = new
    return float(jump)


@pytest.mark.parametrize("loop", ["split", "fused", "persistent"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("src", ["causal & (window(40) | sink(4))", "full"],
                         ids=["window_sink", "full"])
def test_online_rescale_growing_scores(monkeypatch, loop, strategy, src):
    from spattn.runtime import cache
    monkeypatch.setenv("SPATTN_FWD_LOOP", loop)
    cache.clear_memory()
    try:
        pattern = compile_pattern(src)
        Bn, H, L, D, bn = 1, 2, 100, 32, 16
        q, k, v = _growing_qkv(Bn, H, L, D, seed=31)
        scale = D ** -0.5
        cf = (analysis_cf(pattern) or trivial_cf()) if strategy == "ranges" else None
        o, lse = tb.fwd(pattern, q, k, v, scale=scale, q_offset=0, inputs={},
                        strategy=strategy, block_m=32, block_n=bn, closed_form=cf)
        ref_o, ref_lse, m = reference(pattern, q, k, v, scale=scale, q_offset=0, inputs={})
        assert _max_jump_log2(q, k, scale, bn, m) > 16
        check_close("o", o, ref_o, TOL)
        check_lse(lse, ref_lse, TOL)
    finally:
        cache.clear_memory()
