"""The warp-specialised dK/dV kernel (``runtime/ws_bwd.py``, Gluon, Hopper).

On the CPU: the query-tile lists it reads (every non-EMPTY 64 x 128 tile of each batch
element, head and key tile; a PARTIAL tile's materialised mask, 0 past either end; what
``SPATTN_WS_BWD=auto`` refuses) against the dense mask, ragged lengths and Lq != Lk
included; the call rules; and the kernel compiled for sm_90a (register split, 4-D and
1-D TMA). On an sm_90 GPU (marker ``gpu``): the backward stages that take it, gradients
against the float64 reference on fresh random inputs (GQA, batches, ragged lengths,
documents, rows without keys, key tiles without queries), and the calls it leaves to the
generated kernel.
"""
import ast

import pytest
import torch

import spattn
from spattn.runtime import settings as S
from spattn.runtime import ws_bwd
from tests.helpers.uninterpreted import run_script
from tests.runtime.test_ws_fwd import (SHARE_CASES, SHARE_IDS, _call, _check, _rand, checked_plan,
                                      hopper, share_rule)


def _lists_against_mask(pat, call, B, H, Lq, Lk, inputs):
    """Every (batch, head, key tile)'s list against the dense mask: every query tile with
    an allowed pair listed, in order; a FULL one allowed throughout and inside both ends,
    a PARTIAL one's mask equal to the dense mask's tile, 0 past either end."""
    ql = ws_bwd.query_lists(call)
    LB, LH = ql.strides
    M, N = ws_bwd.BLOCK_M, ws_bwd.BLOCK_N
    n_q, n_k = -(-Lq // M), -(-Lk // N)
    m = torch.as_tensor(pat.mask(Lq, Lk, num_heads=H, batch=B, **inputs)).expand(B, H, Lq, Lk)
    m = torch.nn.functional.pad(m, (0, n_k * N - Lk, 0, n_q * M - Lq))
    tiles = m.reshape(B, H, n_q, M, n_k, N).permute(0, 1, 4, 2, 3, 5)    # b, h, c, t, ...
    assert ql.n_k == n_k and ql.n_partial == int((ql.midx >= 0).sum())
    for b in range(B):
        for h in range(H):
            for c in range(n_k):
                i = b * LB + h * LH + c
                got = ql.rows[ql.start[i]:ql.start[i] + ql.count[i]].tolist()
                want = [t for t in range(n_q) if tiles[b, h, c, t].any()]
                assert got == want, (b, h, c)
                for j, t in enumerate(got):
                    mi = int(ql.midx[ql.start[i] + j])
                    tile = tiles[b, h, c, t]
                    if mi < 0:
                        assert tile.all() and (c + 1) * N <= Lk and (t + 1) * M <= Lq, \
                            (b, h, c, t)
                    else:
                        assert torch.equal(_tile_mask(ql, mi), tile), (b, h, c, t)
    return LB, LH


def _tile_mask(ql, mi):
    """PARTIAL tile ``mi``'s mask ``[64 queries, 128 keys]`` as the kernel reads it: the
    mask, or each key's run of queries."""
    if ql.masks.dtype == torch.int16:
        lo, hi = ql.masks[mi].long().unbind(-1)
        r = torch.arange(ws_bwd.BLOCK_M)
        return ((r[:, None] >= lo[None, :]) & (r[:, None] < hi[None, :]))
    return ql.masks[mi].bool()


LIST_CASES = [  # id, source, B, H, Lq, Lk, inputs
    ("B1-H2-L1024-full", "full", 1, 2, 1024, 1024, {}),
    ("B1-H2-L1000-full", "full", 1, 2, 1000, 1000, {}),
    ("B1-H2-L1024-causal", "causal", 1, 2, 1024, 1024, {}),
    ("B1-H2-Lq300-Lk1100-causal", "causal", 1, 2, 300, 1100, {}),
    ("B1-H3-L1024-per-head-blocks", "(q // 256 == k // 256) | (h == 1)", 1, 3, 1024, 1024, {}),
    ("B2-H2-L777-documents", "causal & same(doc)", 2, 2, 777, 777,
     {"doc": torch.sort(torch.randint(0, 9, (2, 777)), dim=-1).values}),
    ("B1-H2-L600-causal-holes", "causal & k % 3 != 1", 1, 2, 600, 600, {}),
    ("B1-H1-L900-keys-without-queries", "k < 300", 1, 1, 900, 900, {}),
]


@pytest.mark.parametrize("src,B,H,Lq,Lk,inputs", [c[1:] for c in LIST_CASES],
                         ids=[c[0] for c in LIST_CASES])
def test_query_lists_hold_every_tile(src, B, H, Lq, Lk, inputs, monkeypatch):
    monkeypatch.setenv("SPATTN_WS_BWD", "1")       # (small calls: auto leaves them)
    pat, call = _call(src, B, H, Lq, inputs, Lk)
    LB, LH = _lists_against_mask(pat, call, B, H, Lq, Lk, inputs)
    assert (LB > 0) == ("doc" in inputs) and (LH > 0) == ("h" in src)


@pytest.mark.parametrize("src,runs", [("causal", True), ("causal & same(doc)", True),
                                      ("causal & q - k < 300", True),
                                      ("causal | (k < 100)", True),
                                      ("causal & k % 3 != 1", True),
                                      ("causal & q % 3 != 1", False),
                                      ("(q // 7 + k // 5) % 2 == 0", False)],
                         ids=["causal", "documents", "window", "prefix-lm", "keys-holes",
                              "queries-holes", "checks"])
def test_partial_tiles_as_keys_runs(src, runs, monkeypatch):
    """Where every key of every PARTIAL tile allows one run of the tile's queries the lists
    carry the runs (int16 ``[n, 128, 2]``), else the masks (uint8 ``[n, 64, 128]``), and
    either reads as the dense mask's tile."""
    monkeypatch.setenv("SPATTN_WS_BWD", "1")
    L = 1000
    inputs = {"doc": torch.sort(torch.randint(0, 6, (L,))).values} if "doc" in src else {}
    pat, call = _call(src, 1, 2, L, inputs)
    ql = ws_bwd.query_lists(call)
    assert ql.n_partial > 0
    assert ql.masks.dtype == (torch.int16 if runs else torch.uint8)
    assert ql.masks.shape[1:] == ((128, 2) if runs else (64, 128))
    _lists_against_mask(pat, call, 1, 2, L, L, inputs)


@pytest.mark.parametrize("src,H,L,why", [
    ("full", 2, 4096, "tiles in all"),
    ("window(64)", 1, 8192 * 64, "PARTIAL tiles (their masks are kept up to 8192)"),
    ("causal & q % 3 != 1", 16, 8192,
     "tiles PARTIAL (auto takes 50% where rows' runs are read, 20% masks)"),
], ids=["full-H2-L4096", "many-partial-tiles", "holes-H16-L8192"])
def test_query_lists_refuse(src, H, L, why):
    got = ws_bwd.query_lists(_call(src, 1, H, L)[1])
    assert isinstance(got, str) and why in got, got


@pytest.mark.parametrize("src,H,L,n_docs", SHARE_CASES, ids=SHARE_IDS)
def test_auto_share_of_partial_tiles_by_what_is_read(src, H, L, n_docs, monkeypatch):
    """``SPATTN_WS_BWD=auto`` over 64 x 128 tiles: rows' runs here are the keys' runs of
    queries (every key of a PARTIAL tile allows one run of them). (``MIN_WORK`` lowered: the
    rule under test is the share's; some of the forward's cases hold fewer tiles.)"""
    monkeypatch.setattr(ws_bwd, "MIN_WORK", 1)
    share_rule(ws_bwd.query_lists, src, H, L, n_docs, "SPATTN_WS_BWD",
               (ws_bwd.MAX_PARTIAL_SHARE, ws_bwd.MAX_RUNS_SHARE), monkeypatch)


@pytest.mark.parametrize("src,H,L", [("full", 4, 8192), ("causal", 16, 16384)],
                         ids=["full-H4-L8192", "causal-H16-L16384"])
def test_query_lists_auto_takes_enough_work(src, H, L):
    ql = ws_bwd.query_lists(_call(src, 1, H, L)[1])
    assert not isinstance(ql, str), ql
    assert int(ql.count.sum()) * (H if ql.strides[1] == 0 else 1) >= ws_bwd.MIN_WORK


@pytest.mark.parametrize("src,B,H,L", [("full", 1, 3, 8192), ("causal", 1, 16, 4096)],
                         ids=["full-H3-L8192", "causal-H16-L4096"])
def test_auto_leaves_calls_below_min_work(src, B, H, L, monkeypatch):
    """Fewer than ``MIN_WORK`` computed tiles (24576 and 16896 here): ``auto`` leaves the
    call to the generated backward, which the host issues in half the time;
    ``SPATTN_WS_BWD=1`` still lists them."""
    why = ws_bwd.query_lists(_call(src, B, H, L)[1])
    assert isinstance(why, str) and f"auto takes {ws_bwd.MIN_WORK} or more" in why, why
    monkeypatch.setenv("SPATTN_WS_BWD", "1")
    ql = ws_bwd.query_lists(_call(src, B, H, L)[1])
    assert not isinstance(ql, str), ql


@pytest.mark.parametrize("B,Lq,Lk", [(64, 1024, 1024), (8, 4096, 1024), (8, 1024, 4096)],
                         ids=["B64-L1024", "B8-Lq4096-Lk1024", "B8-Lq1024-Lk4096"])
def test_auto_leaves_short_calls(B, Lq, Lk, monkeypatch):
    """``auto`` leaves calls of fewer than ``MIN_LENGTH`` queries or keys to the generated
    backward, however much work they hold in all; ``SPATTN_WS_BWD=1`` still lists them."""
    call = _call("full", B, 16, Lq, Lk=Lk)[1]
    why = ws_bwd.query_lists(call)
    assert why == f"{min(Lq, Lk)} queries or keys (auto takes {ws_bwd.MIN_LENGTH} or more)"
    monkeypatch.setenv("SPATTN_WS_BWD", "1")
    ql = ws_bwd.query_lists(_call("full", B, 16, Lq, Lk=Lk)[1])
    assert not isinstance(ql, str), ql


def test_device_rules(monkeypatch):
    """On the CPU the kernel never runs; ``SPATTN_WS_BWD=0`` says so first."""
    from types import SimpleNamespace
    from spattn.runtime.plan import Call

    def why():
        pat = spattn.compile("full")
        q = torch.randn(1, 2, 1024, 128, dtype=torch.bfloat16)
        call = Call.of(pat, q, q, scale=0.1, q_offset=None, inputs={}, settings=S.current(),
                       backend="triton", v=q)
        stage = SimpleNamespace(upcast=False, pattern=None,
                                config=SimpleNamespace(dq="kernel", lse_grad=False))
        return ws_bwd.why_not(call, stage, q, q, q, q, q, None, None)
    monkeypatch.setenv("SPATTN_WS_BWD", "1")
    assert why() == "not on a CUDA device"
    monkeypatch.setenv("SPATTN_WS_BWD", "0")
    assert why() == "SPATTN_WS_BWD=0"


def _rules(**kw):
    """The call's own rules (``why_not`` past the device checks), on CPU tensors."""
    from types import SimpleNamespace
    from spattn.runtime.plan import Call
    src = kw.pop("src", "full")
    dtype, D = kw.pop("dtype", torch.bfloat16), kw.pop("D", 128)
    Lq, Lk, offset = kw.pop("Lq", 1024), kw.pop("Lk", 1024), kw.pop("offset", 0)
    pat = spattn.compile(src, score=kw.pop("score", None))

    def t(L):
        return torch.randn(2 * L * D + offset, dtype=dtype)[offset:].view(1, 2, L, D)
    q, k, v, do = t(Lq), t(Lk), t(Lk), t(Lq)
    call = Call.of(pat, q, k, scale=D ** -0.5, q_offset=None, inputs={},
                   settings=S.current(), backend="triton", v=v)
    stage = SimpleNamespace(upcast=kw.pop("upcast", False), pattern=None,
                            config=SimpleNamespace(dq=kw.pop("dq", "kernel"),
                                                   lse_grad=kw.pop("lse_grad", False)))
    return ws_bwd.call_why_not(call, stage, q, k, v, do, kw.pop("options", None),
                               kw.pop("rows", None))


def test_call_own_rules(monkeypatch):
    from spattn.runtime.triton_backend import RowTables
    assert _rules() is None
    assert _rules(Lq=300, Lk=1100) is None
    assert "float32" in _rules(dtype=torch.float32)
    assert "float16" in _rules(upcast=True, dtype=torch.float16)
    assert "head dimension 96" in _rules(D=96)
    assert "a score" in _rules(score="30 * tanh(s / 30)")
    assert _rules(score="alibi(alibi_slope)") is None
    assert "atomic dQ" in _rules(dq="atomic") and "atomic dQ" in _rules(lse_grad=True)
    assert "(block_m1, num_warps)" in _rules(options={"block_m1": 32, "num_warps": 4,
                                                      "layout": "on"})
    assert "fewer than 128" in _rules(Lq=100)
    assert "TMA cannot read" in _rules(offset=1)
    assert "rows through tables" in _rules(rows=RowTables.of(
        torch.arange(1024), torch.arange(1024), 1024, 1024))
    for name, val in (("SPATTN_BWD_BLOCK_M1", "32"), ("SPATTN_STRATEGY", "table")):
        with monkeypatch.context() as m:
            m.setenv(name, val)
            assert "SPATTN_* settings" in _rules(), name


def test_setting_parses(monkeypatch):
    for raw, want in (("0", False), ("1", True), ("auto", None)):
        monkeypatch.setenv("SPATTN_WS_BWD", raw)
        assert S.current().ws_bwd is want
    monkeypatch.setenv("SPATTN_WS_BWD", "sometimes")
    with pytest.raises(spattn.SpattnError, match="SPATTN_WS_BWD"):
        S.current()


def test_kernel_compiles_for_sm90():
    """Every configuration of tests/helpers/compile_ws_bwd.py builds for sm_90a: consumers
    at 240 registers and the loader at 24, Q, dO, K, V read through 4-D TMA and the rows'
    statistics through 1-D, dK and dV stored through 4-D; three with an additive score;
    PARTIAL tiles by masks and by keys' runs."""
    r = run_script("tests/helpers/compile_ws_bwd.py")
    lines = r.stdout.splitlines()
    assert len(lines) == 7, r.stdout
    assert sum("'scored': 1," in ln for ln in lines) == 3
    assert [sum(f"'masked': {m}," in ln for ln in lines) for m in (0, 1, 2)] == [2, 3, 2]
    for ln in lines:
        label, ok, rest = ln.partition(" OK ")
        assert ok, ln
        facts = ast.literal_eval(rest)
        assert {"240", "24"} <= set(facts["setmaxnreg"]) and "1" in facts["waits"], ln
        assert facts["loads4d"] >= 4 and facts["loads1d"] >= 2 and facts["stores4d"] >= 2, ln


@pytest.mark.parametrize("Lq,copied", [(1000, False), (333, True), (130, True)],
                         ids=["Lq1000-in-place", "Lq333-copied", "Lq130-copied"])
def test_rows_statistics_start_on_16_bytes(Lq, copied):
    """A TMA box starts on 16 bytes: each head's lse and delta rows are read in place where
    ``Lq`` is a multiple of 4, else copied into rows of ``Lq`` rounded up to 4 (zeros
    after), the kernel's ``LQS``."""
    from types import SimpleNamespace
    B, H, D = 2, 3, 64
    q = torch.empty(B, H, Lq, D, dtype=torch.bfloat16)
    lists = ws_bwd.QueryLists(*(torch.zeros(1, dtype=torch.int32) for _ in range(4)),
                              torch.zeros(1, 64, 128, dtype=torch.uint8), (0, 0), 1)
    ws = ws_bwd.WsBwd(SimpleNamespace(Lq=Lq, Lk=Lq, scale=0.1,
                                      positions=SimpleNamespace(q_offset=0)), q, q, lists)
    assert ws.lq_rows == -(-Lq // 4) * 4 and ws.static[9] == ws.lq_rows
    delta, lse2 = torch.randn(2, B, H, Lq).unbind(0)
    got_l, got_d = ws.rows(lse2, delta)
    for got, want in ((got_l, lse2), (got_d, delta)):
        rows = got.view(B * H, ws.lq_rows)
        assert torch.equal(rows[:, :Lq], want.reshape(B * H, Lq))
        assert not rows[:, Lq:].any() and got.data_ptr() % 16 == 0
        assert (got.data_ptr() == want.data_ptr()) is not copied


# ---------------------------------------------------------------- on the GPU

def _ws_stages(plan):
    return [s for s in plan._bwd.values() if getattr(s, "ws", None) is not None]


GPU_CASES = [  # source, B, H, Hk, Lq, Lk, D, dtype, [B, L, H, D] memory, inputs
    ("full", 1, 2, 2, 1024, 1024, 128, torch.bfloat16, False, None),
    ("full", 2, 4, 2, 1000, 1000, 64, torch.float16, True, None),
    ("causal", 1, 4, 1, 2048, 2048, 128, torch.bfloat16, False, None),
    ("causal", 1, 2, 2, 333, 1500, 128, torch.bfloat16, False, None),
    ("causal & same(doc)", 2, 2, 1, 1900, 1900, 128, torch.bfloat16, False, "random"),
    ("causal & k % 3 != 1", 1, 2, 2, 700, 700, 64, torch.bfloat16, False, None),
    ("(q // 256 == k // 256) | (h == 1)", 1, 2, 1, 1024, 1024, 128, torch.bfloat16, False,
     None),
    ("k < 300", 1, 2, 2, 900, 900, 128, torch.bfloat16, False, None),
    ("k + 100 < q", 1, 2, 2, 1024, 1024, 64, torch.bfloat16, False, None),
]
GPU_IDS = [f"B{c[1]}-H{c[2]}-Hk{c[3]}-Lq{c[4]}-Lk{c[5]}-D{c[6]}-{str(c[7])[6:]}"
           + ("-bshd" if c[8] else "") + f"-{c[0].split('(')[0].split(' ')[0]}"
           for c in GPU_CASES]


@pytest.mark.parametrize("src,B,H,Hk,Lq,Lk,D,dtype,bshd,ins", GPU_CASES, ids=GPU_IDS)
@hopper
def test_gradients_gpu(src, B, H, Hk, Lq, Lk, D, dtype, bshd, ins, monkeypatch):
    """The warp-specialised dK/dV kernel's gradients (after the generated dQ kernel)
    against the float64 reference: GQA (the key head's program takes each query head's
    list), batches, ragged lengths, documents at random cuts (masks), rows without keys
    and key tiles without queries."""
    monkeypatch.setenv("SPATTN_WS_BWD", "1")       # (small calls: auto leaves them)
    plan = checked_plan(src, None, {}, B, H, Hk, Lq, Lk, D, dtype, Lq + Lk + B + H + D,
                        bshd=bshd)
    assert _ws_stages(plan), plan._bwd


@pytest.mark.parametrize("src,L,env,dtype", [
    ("causal", 1024, {}, torch.float32),
    ("full", 1024, {"SPATTN_WS_BWD": "0"}, torch.bfloat16),
    ("full", 1024, {"SPATTN_BWD_BLOCK_M1": "32"}, torch.bfloat16),
    ("full", 1024, {"SPATTN_WS_BWD": "auto"}, torch.bfloat16),
], ids=["fp32", "setting-off", "tiles-fixed", "auto-little-work"])
@hopper
def test_left_to_the_generated_kernel_gpu(src, L, env, dtype, monkeypatch):
    monkeypatch.setenv("SPATTN_WS_BWD", "1")
    for n, val in env.items():
        monkeypatch.setenv(n, val)
    g = torch.Generator(device="cuda").manual_seed(L)
    q, k, v = (_rand((1, 2, L, 64), dtype, g) for _ in range(3))
    pat = spattn.compile(src)
    plan = pat.plan(q, k, v)
    _check(pat, q, k, v, {}, plan=plan)
    assert not _ws_stages(plan), plan._bwd
