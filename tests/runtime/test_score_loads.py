"""How the kernels read a score's tables and compute its tanh (docs/backends.md, Scores):
``score_load`` "pair" / "early" / "gather" / "ahead", ``score_index`` "mask" / "clamp" / "free" (unchecked where
``runtime.scores.indices_in_range`` proves it) and ``fast_tanh``. Every variant's forward,
q, k, v and table gradients against the float64 reference under the interpreter (tiny
shapes, ragged and whole tiles, tables exactly as large as the call's domain needs); the
proof itself; the inline-PTX tanh compiled for sm_90 without a GPU and run on one."""
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import spattn
from spattn.dsl.errors import SpattnConfigError
from spattn.runtime import scores as S
from spattn.runtime.plan import PLANS
from spattn.runtime.reference import pattern_reference

H = 2


def _run(p, L, tables, *, ints=None, q_offset=None, Lk=None, dtype=torch.float32, atol=2e-4,
         seed=0, device="cpu"):
    """Forward and every gradient (q, k, v, tables) of ``p`` against the float64 reference,
    fresh random inputs, every element; returns the plan the call used."""
    g = torch.Generator(device=device).manual_seed(seed)
    Lk = Lk or L
    q = torch.randn(1, H, L, 16, generator=g, device=device, dtype=dtype).requires_grad_(True)
    k, v = (torch.randn(1, H, Lk, 16, generator=g, device=device, dtype=dtype)
            .requires_grad_(True) for _ in range(2))
    tabs = {n: torch.randn(shape, generator=g, device=device).requires_grad_(True)
            for n, shape in tables.items()}
    PLANS.clear()
    o = p(q, k, v, q_offset=q_offset, **(ints or {}), **tabs)
    do = torch.randn(o.shape, generator=g, device=device, dtype=dtype)
    leaves = [q, k, v, *tabs.values()]
    got = torch.autograd.grad(o, leaves, do)
    ref = [t.detach().double().requires_grad_(True) for t in leaves]
    ro, _ = pattern_reference(p, *ref[:3], q_offset=q_offset, **(ints or {}),
                              **dict(zip(tabs, ref[3:])))
    want = torch.autograd.grad(ro, ref, do.double())
    torch.testing.assert_close(o.double(), ro, atol=atol, rtol=1e-3)
    for name, a, b in zip(["dq", "dk", "dv", *tabs], got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, atol=atol * 5, rtol=2e-3, msg=name)
    (plan, _), = PLANS._plans.values()
    return plan


def _flags(plan) -> tuple:
    """(score_load, score_index, fast_tanh) of the plan's forward and backward kernels."""
    cfgs = [plan.forward_stage.config] + [s.config for s in plan._bwd.values()]
    out = {(c.score_load, c.score_index, c.fast_tanh) for c in cfgs}
    assert len(out) == 1, out
    return out.pop()


# (id, mask, score, tables, length, q_offset, index variant under "auto")
CASES = [
    # the index clamped by the pattern: in range at every position, padded ones included
    ("rel1d-clamped-L40", "causal & window(12)", "softcap(5.0) + rel[h, clamp(q - k, 0, 11)]",
     {"rel": (H, 12)}, 40, None, "free"),
    # a table exactly as long as the call's domain needs: the padded keys of the last
    # (ragged) tile index below 0, so the kernels clamp
    ("rel-exact-ragged-L40", "causal & window(12)", "s + rel[h, q - k + 39]",
     {"rel": (H, 79)}, 40, None, "clamp"),
    # the same with whole tiles: nothing beyond L, proven
    ("rel-exact-whole-L32", "causal & window(12)", "s + rel[h, q - k + 31]",
     {"rel": (H, 63)}, 32, None, "free"),
    # 2-D relative position bias, exact size, ragged tiles and a query offset
    ("rpb2d-exact-offset", "abs(q // 8 - k // 8) <= 1 & abs(q % 8 - k % 8) <= 1",
     "s + rpb[h, q // 8 - k // 8 + 4, q % 8 - k % 8 + 7]", {"rpb": (H, 9, 15)}, 36, 0,
     "clamp"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("load", ["pair", "early", "gather", "ahead"])
@pytest.mark.parametrize("index", ["auto", "clamp", "mask"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_variant_matches_the_reference(case, index, load, monkeypatch):
    name, mask, score, tables, L, off, auto = case
    if index == "mask" and load == "pair" and name != CASES[0][0]:
        pytest.skip("today's kernels: test_scores.py covers them")
    if load == "gather" and index == "clamp":
        pytest.skip("a gathered slice is clamped whatever the index variant")
    monkeypatch.setenv("SPATTN_SCORE_LOAD", load)
    monkeypatch.setenv("SPATTN_SCORE_INDEX", index)
    p = spattn.compile(mask, score=score, backend="triton")
    plan = _run(p, L, tables, q_offset=off)
    assert _flags(plan) == (load, auto if index == "auto" else index, False)


#: (id, forward loop, strategy, table form, mask): every tile loop of the forward with
#: the tables a step ahead: one interval, a union of intervals (the merged loop), CSR
#: lists (a loop over tile slots), runs (the FULL tiles from the loop counter: one run, and
#: the dQ kernel's every other key tile) and spans; query tiles with no key tile (rows from 32:
#: a loop of no step), and loops whose last tile is the grid's last (the next step's tile,
#: were it not clamped to the loop, would read past the table): the forward's and dQ's
#: over keys (``k >= q``), dK/dV's over queries (the sink's keys, seen by every row).
AHEAD_LOOPS = [
    ("split-ranges", "split", "ranges", "auto", "k >= q & q < 32"),
    ("fused-ranges", "fused", "ranges", "auto", "k >= q & q < 32"),
    ("fused-merged", "fused", "ranges", "auto", "causal & (window(6) | k < 3)"),
    ("persistent-merged", "persistent", "ranges", "auto", "causal & (window(6) | k < 3)"),
    ("split-csr", "split", "table", "csr", "k >= q & q < 32"),
    ("split-runs", "split", "table", "runs", "k >= q & q < 32"),
    ("split-runs-pitch", "split", "table", "runs", "k % 32 < 16 & q < 48"),
    ("fused-spans", "fused", "table", "spans", "causal & (window(6) | k < 3)"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", AHEAD_LOOPS, ids=[c[0] for c in AHEAD_LOOPS])
def test_tables_a_step_ahead_in_every_tile_loop(case, monkeypatch):
    """``score_load="ahead"``: outputs and gradients against the float64 reference, and no
    load outside its table (guard bands), in each loop the forward and the backward's two
    kernels run."""
    _, loop, strategy, form, mask = case
    bwd_loop = "fused" if loop == "persistent" else loop       # (a forward-only loop)
    for name, value in (("SPATTN_SCORE_LOAD", "ahead"), ("SPATTN_FWD_LOOP", loop),
                        ("SPATTN_BWD_LOOP", bwd_loop), ("SPATTN_STRATEGY", strategy),
                        ("SPATTN_TABLES", form)):
        monkeypatch.setenv(name, value)
    # (unchecked loads: the table holds the domain of 64 queries and keys, no more: a step
    #  past the last tile of either reads outside it)
    score = "softcap(5.0) + rel[h, q - k + 63] + w[k % 7]"
    tables = {"rel": (H, 127), "w": (7,)}
    p = spattn.compile(mask, score=score, backend="triton")
    plan = _run(p, 64, tables, seed=3)
    cfg = plan.forward_stage.config
    assert (cfg.loop, cfg.strategy, cfg.score_load) == (loop, strategy, "ahead")
    assert {(s.config.loop, s.config.score_load) for s in plan._bwd.values()} == \
        {(bwd_loop, "ahead")}
    guard = _GuardedTables(monkeypatch)
    assert _guarded_run(guard, p, tables, L=64, Lk=64) == ("ahead", "free")
    assert guard.hits == []


@pytest.mark.interpreter
@pytest.mark.parametrize("load", ["early", "gather", "ahead"])
def test_far_positions_in_64_bit_kernels(load, monkeypatch):
    """Positions near 2**40: the slice of a gathered table starts at a 64-bit q - k."""
    monkeypatch.setenv("SPATTN_SCORE_LOAD", load)
    p = spattn.compile("k < 20 | q % 3 == k % 3", backend="triton",
                       score="s + rel[h, clamp(q - k - 1099511627776, 0, 7)]")
    plan = _run(p, 24, {"rel": (H, 8)}, q_offset=2 ** 40)
    assert plan.forward_stage.config.int64 and _flags(plan) == (load, "free", False)


@pytest.mark.interpreter
def test_index_from_a_runtime_input_is_clamped():
    """An index read through the mask's input (doc[k]) is never proven: clamped."""
    L = 40
    doc = torch.tensor([0] * 13 + [1] * 17 + [2] * 10)
    p = spattn.compile("causal & same(doc)", score="s + dbias[h, doc[k]]", backend="triton")
    plan = _run(p, L, {"dbias": (H, 3)}, ints={"doc": doc})
    assert _flags(plan)[1] == "clamp"


def test_the_proof_covers_padded_tiles_and_every_head():
    """indices_in_range: the computed pairs reach ceil(L / tile) * tile - 1 in both
    directions; a table one entry short, or short of a head, is not proven."""
    p = spattn.compile("causal", score="s + rel[h, q - k + 39]")
    proof = lambda L, shape, pad, off=0: S.indices_in_range(  # noqa: E731
        p, {"rel": torch.zeros(shape)}, L, L, num_heads=H, batch=1, q_offset=off, pad_q=pad,
        pad_k=pad)
    assert not proof(40, (H, 79), 16)                 # keys 40..47 of the last tile
    assert proof(40, (H, 79), 8) and proof(32, (H, 79), 16)
    assert not proof(32, (H, 70), 16)                 # q - k + 39 reaches 70 at q = 31
    assert not proof(32, (H - 1, 79), 16)             # head H - 1 has no row
    assert not proof(32, (H, 79), 16, off=9)          # q up to 40: index 79
    q = spattn.compile("causal", score="s + rel[h, clamp(q - k, 0, 7)]")
    assert S.indices_in_range(q, {"rel": torch.zeros(H, 8)}, 5, 1000, num_heads=H, batch=3,
                              q_offset=995, pad_q=256, pad_k=256)


def test_settings_and_options_are_checked(monkeypatch):
    from spattn.runtime import settings
    for var, bad in (("SPATTN_SCORE_LOAD", "sideways"), ("SPATTN_SCORE_INDEX", "free"),
                     ("SPATTN_FAST_TANH", "maybe")):
        monkeypatch.setenv(var, bad)
        with pytest.raises(SpattnConfigError, match=var):
            settings.current()
        monkeypatch.delenv(var)
    p = spattn.compile("causal & window(12)", score="s + rel[h, q - k + 39]", backend="triton")
    q = torch.randn(1, H, 40, 16)
    with pytest.raises(SpattnConfigError, match="score_index='free'"):
        S.make_plan(p, q, q, q, inputs={"rel": torch.randn(H, 79)},
                    options={"score_index": "free"})


def test_fast_tanh_is_chosen_for_16_bit_cuda_calls_only(monkeypatch):
    """The runtime's choice (off under the interpreter and for fp32; SPATTN_FAST_TANH
    overrides it), on a stand-in call: the choice needs no device."""
    from types import SimpleNamespace
    from spattn.runtime import settings
    from spattn.runtime.triton_backend import _score_options
    p = spattn.compile("causal", score="softcap(30.0)")

    def chosen(device, dtype, env=None, interpret="0"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        if env is None:
            monkeypatch.delenv("SPATTN_FAST_TANH", raising=False)
        else:
            monkeypatch.setenv("SPATTN_FAST_TANH", env)
        call = SimpleNamespace(pattern=p, settings=settings.current(), tables={}, Lq=64,
                               Lk=64, H=1, B=1, device=torch.device(device),
                               positions=SimpleNamespace(q_offset=0))
        opts = {}
        _score_options(call, opts, dtype)
        return opts["fast_tanh"]
    assert chosen("cuda", torch.bfloat16) and chosen("cuda", torch.float16)
    assert not chosen("cuda", torch.float32) and not chosen("cpu", torch.bfloat16)
    assert not chosen("cuda", torch.bfloat16, interpret="1")
    assert chosen("cuda", torch.float32, env="1") and not chosen("cuda", torch.bfloat16, "0")
    assert not chosen("cuda", torch.float32, env="1", interpret="1")


def test_generated_code_of_each_flag():
    """The kernels show their variant: masked, clamped or unchecked table loads; the loads
    before the dot (early); tanh as inline PTX in the score and in its derivative."""
    from spattn.runtime import cache
    p = spattn.compile("causal & window(64)", score="softcap(30.0) + rel[h, clamp(q - k, 0, 63)]")

    def text(kind="fwd", **kw):
        return cache.kernel_text(p, kind, head_dim=64, dtype="bf16", **kw)
    masked = text(score_index="mask")
    assert "mask=sc_m_rel_1" in masked
    assert "tl.sigmoid(b_s * (sm_scale * 0.06666666666666667))" in masked
    clamped = text()            # codegen's default without a proof
    assert "tl.minimum(tl.maximum(sc_t_1, 0), size_rel_1 - 1) * stride_rel_1" in clamped
    assert "sc_m_rel" not in clamped and "indices clamped into the table" in clamped
    free = text(score_index="free", score_load="early")
    assert "tl.load(p_rel + i_h * stride_rel_0 + sc_t_1 * stride_rel_1).to(tl.float32)" in free
    body = free[free.index("def _fwd_range"):]
    assert body.index("sc_b_rel_1 = tl.load") < body.index("b_s = tl.dot(b_q, b_kt")
    bwd = text("bwd", score_load="early", fast_tanh=True)
    for kernel in ("def _dq_range", "def _dkdv_range"):
        body = bwd[bwd.index(kernel):]
        assert body.index("sc_b_rel_1 = tl.load") < body.index("tl.dot(")
    assert 'tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;"' in bwd
    assert "b_fd = " in bwd and "_tanh_approx(b_s * (sm_scale * 0.03333333333333333))" in bwd
    assert "sigmoid" not in bwd[bwd.index("def _dq_range"):]
    gathered = text("bwd", score_load="gather")
    # (one table gather per kernel; dQ's gradient along the diagonals skews its tile and
    #  reads each diagonal's entry by three more)
    assert gathered.count("tl.gather(") == 5
    assert gathered.count("tl.broadcast_to(sc_s_rel_1[None, :], (") == 2
    assert "i_g0_1 = tl.minimum(tl.maximum(o_q - o_k, 0), 63)" in gathered  # (its gradient)
    plain = spattn.compile("causal & window(64)")
    assert cache.resolve(plain, "fwd", fast_tanh=True, score_load="early")[2] == \
        cache.resolve(plain, "fwd")[2]       # flags of a score only: one kernel without one


def test_gather_form_takes_functions_of_q_minus_k_only():
    from spattn.codegen.emit import gather_form
    from spattn.ir.nodes import FLoad, walk

    def form(score):
        p = spattn.compile("causal", score=score)
        ld, = {n for n in walk(p.score) if isinstance(n, FLoad)}
        g = gather_form(ld)
        return None if g is None else spattn.ir.printer.to_source(g)
    assert form("s + rel[h, clamp(q - k, 0, 7)]") == "min(max(u, 0), 7)"
    assert form("s + rel[h, 2 * (k - q) + Lk]") == "Lk - 2 * u"
    assert form("s + rel[h, q % 8 - k % 8 + 7]") is None      # not of q - k
    assert form("s + rel[q - k + 40, 3]") is None             # the last axis constant
    assert form("s + rel[q, q - k + 40]") is None             # another axis of q


def test_fast_tanh_compiles_to_one_mufu_instruction(tmp_path):
    """The helper the kernels contain, compiled for sm_90 without a GPU (in a process of its
    own: this one runs Triton's interpreter): tanh.approx.f32 in the PTX."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    from spattn.codegen.emit import TANH_HELPER
    from spattn.runtime import cache
    p = spattn.compile("causal", score="softcap(30.0)")
    assert TANH_HELPER in cache.kernel_text(p, "fwd", head_dim=64, fast_tanh=True)
    path = tmp_path / "tanh_probe.py"
    path.write_text("import triton\nimport triton.language as tl\n" + TANH_HELPER + '''

@triton.jit
def probe(X, Y):
    o = tl.arange(0, 16)
    tl.store(Y + o, _tanh_approx(tl.load(X + o)))


from triton.backends.compiler import GPUTarget
src = triton.compiler.ASTSource(fn=probe, signature={"X": "*fp32", "Y": "*fp32"}, constexprs={})
try:
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
except RuntimeError as e:
    print("no toolchain:", e)
else:
    print("tanh.approx.f32" in ptx and "ex2" not in ptx)
''')
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if out.stdout.startswith("no toolchain"):
        pytest.skip(out.stdout.strip())
    assert out.stdout.strip() == "True", out.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("load,fast", [("pair", "1"), ("early", "0"), ("gather", "1")])
def test_variants_on_cuda_bf16(load, fast, monkeypatch):
    """On the GPU: softcap and a 1-D bias (free) and an exact-size table (clamped) with each
    load placement, with and without tanh.approx; bf16 against the float64 reference."""
    monkeypatch.setenv("SPATTN_SCORE_LOAD", load)
    monkeypatch.setenv("SPATTN_FAST_TANH", fast)
    p = spattn.compile("causal & window(100)", score="softcap(20.0) + rel[h, clamp(q - k, 0, 99)]",
                       backend="triton")
    plan = _run(p, 300, {"rel": (H, 100)}, dtype=torch.bfloat16, atol=3e-2, device="cuda")
    assert _flags(plan) == (load, "free", fast == "1")
    p = spattn.compile("causal & window(100)", score="softcap(20.0) + rel[h, q - k + 299]",
                       backend="triton")
    plan = _run(p, 300, {"rel": (H, 599)}, dtype=torch.bfloat16, atol=3e-2, device="cuda")
    assert _flags(plan) == (load, "clamp", fast == "1")


def _index_case(a, b, c, d, clamp):
    """(DSL index text, the same on Python ints): ``(a*q + b*k + c) // d`` (floor), clamped
    into ``clamp`` when given."""
    text = f"({a} * q + {b} * k + {c}) // {d}"
    fn = lambda q, k: (a * q + b * k + c) // d  # noqa: E731
    if clamp is not None:
        lo, hi = clamp
        text = f"clamp({text}, {lo}, {hi})"
        return text, (lambda q, k, f=fn: min(max(f(q, k), lo), hi))
    return text, fn


@given(a=st.integers(-2, 2), b=st.integers(-2, 2), c=st.integers(-40, 80),
       d=st.sampled_from([1, 1, 3, 8]),
       clamp=st.one_of(st.none(), st.tuples(st.integers(-5, 10), st.integers(0, 40))),
       Lq=st.integers(1, 40), Lk=st.integers(1, 40), off=st.integers(0, 30),
       pad_q=st.sampled_from([16, 32]), pad_k=st.sampled_from([16, 32]),
       slack=st.integers(-2, 3), heads=st.integers(1, 3), rows=st.integers(1, 3))
@example(a=1, b=-1, c=39, d=1, clamp=None, Lq=40, Lk=40, off=0, pad_q=16, pad_k=16, slack=0,
         heads=2, rows=2)
def test_the_proof_is_sound(a, b, c, d, clamp, Lq, Lk, off, pad_q, pad_k, slack, heads, rows):
    """Whenever indices_in_range says the kernels may read a table unchecked, every index of
    every pair of the padded tiles (and every head) is in range (on Python ints); a table
    of the exact size the padded domain needs is proven."""
    text, fn = _index_case(a, b, c, d, clamp)
    p = spattn.compile("causal", score=f"s + rel[h, {text}]")
    qs = range(off, off + -(-Lq // pad_q) * pad_q)
    ks = range(0, -(-Lk // pad_k) * pad_k)
    vals = [fn(q, k) for q in qs for k in ks]
    lo, hi = min(vals), max(vals)
    size = max(1, hi + 1 + slack)

    def proof(size, rows):
        return S.indices_in_range(p, {"rel": torch.zeros(rows, size)}, Lq, Lk,
                                  num_heads=heads, batch=1, q_offset=off, pad_q=pad_q,
                                  pad_k=pad_k)
    if proof(size, rows):
        assert lo >= 0 and hi < size and rows >= heads
    if lo >= 0 and clamp is None and d == 1:       # affine: the hull is exact
        assert proof(hi + 1, heads)


class _GuardedTables:
    """Tables placed inside NaN guard bands of their own buffers, and every active lane of
    every interpreted load checked against the bands (Triton's interpreter reads any
    address it is given: an unchecked load out of its table does not crash there)."""

    def __init__(self, monkeypatch, guard=4096):
        import numpy as np
        import triton.runtime.interpreter as interp
        self.bands, self.hits, self.guard = [], [], guard
        real = interp.InterpreterBuilder.create_masked_load

        def load(builder, ptrs, mask, other, *rest):
            addr = ptrs.data.astype(np.int64)
            active = addr[np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)]
            for g0, t0, t1, g1 in self.bands:
                bad = active[((active >= g0) & (active < t0)) | ((active >= t1) & (active < g1))]
                if bad.size:
                    self.hits.append((int(bad.min()) - t0, int(bad.max()) - t0))
            return real(builder, ptrs, mask, other, *rest)
        monkeypatch.setattr(interp.InterpreterBuilder, "create_masked_load", load)

    def table(self, shape, generator):
        n, G = int(torch.tensor(shape).prod()), self.guard
        buf = torch.full((n + 2 * G,), float("nan"))
        t = buf[G:G + n].view(shape)
        t.copy_(torch.randn(shape, generator=generator))
        e = t.element_size()
        self.bands.append((buf.data_ptr(), t.data_ptr(), t.data_ptr() + n * e,
                           buf.data_ptr() + buf.numel() * e))
        return t


def _guarded_run(guard, p, tables, *, L, Lk, B=1, Hq=H, Hk=H, q_offset=None):
    """Forward and backward of ``p`` with guarded tables; the plan's (load, index) flags."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, L, 16, generator=g).requires_grad_(True)
    k, v = (torch.randn(B, Hk, Lk, 16, generator=g).requires_grad_(True) for _ in range(2))
    tabs = {n: guard.table(s, g) for n, s in tables.items()}
    PLANS.clear()
    o = p(q, k, v, q_offset=q_offset, **tabs)
    o.backward(torch.randn(o.shape, generator=g))
    assert torch.isfinite(o).all() and torch.isfinite(q.grad).all()
    (plan, _), = PLANS._plans.values()
    return _flags(plan)[:2]


# (id, mask, score, tables, L, Lk, B, Hq, Hk, q_offset, SPATTN_SCORE_LOAD)
GUARDED = [
    ("gqa-batch-offset", "causal", "s + rel[b, h, clamp(q - k, 0, 7)]", {"rel": (2, 4, 8)},
     20, 48, 2, 4, 2, 28, "pair"),
    ("mod-negative-offset", "causal", "s + rel[h, (q - k) % 5] * w[k // 2]",
     {"rel": (H, 5), "w": (32,)}, 20, 40, 1, H, H, -3, "early"),
    ("gather-query-index", "causal", "s + w[q - 28] + rel[b, clamp(q - k, 0, 7)]",
     {"w": (32,), "rel": (2, 8)}, 20, 48, 2, H, 1, 28, "gather"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", GUARDED, ids=[c[0] for c in GUARDED])
def test_unchecked_loads_stay_in_their_tables(case, monkeypatch):
    """Every table load of the kernels that read without a bounds check ("free"), forward
    and backward, lands inside its table: the proof's padded domain is the pairs the
    kernels compute (GQA, B > 1, per-batch tables, offsets, modulo, floor division)."""
    _, mask, score, tables, L, Lk, B, Hq, Hk, off, load = case
    monkeypatch.setenv("SPATTN_SCORE_LOAD", load)
    guard = _GuardedTables(monkeypatch)
    p = spattn.compile(mask, score=score, backend="triton")
    assert _guarded_run(guard, p, tables, L=L, Lk=Lk, B=B, Hq=Hq, Hk=Hk,
                        q_offset=off) == (load, "free")
    assert guard.hits == []


@pytest.mark.interpreter
def test_the_guard_sees_an_unproven_unchecked_load(monkeypatch):
    """The guard of the test above fails where it should: a table exactly as long as the
    domain needs, ragged tiles, its proof forced: the last tile's padded keys read past
    the table."""
    from spattn.runtime import triton_backend
    monkeypatch.setattr(triton_backend, "_proven", lambda *a: True)
    guard = _GuardedTables(monkeypatch)
    p = spattn.compile("causal & window(12)", score="s + rel[h, q - k + 39]", backend="triton")
    assert _guarded_run(guard, p, {"rel": (H, 79)}, L=40, Lk=40) == ("ahead", "free")
    assert guard.hits
