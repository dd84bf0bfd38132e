"""The warp-specialised forward (``runtime/ws_fwd.py``, Gluon, Hopper).

On the CPU: the key-tile lists it reads (every non-EMPTY 128 x 128 tile of each batch
element, head and query tile; a PARTIAL tile's materialised mask; why a call's tiles are
refused, and what ``SPATTN_WS_FWD=auto`` takes) against the dense mask, ragged lengths
and Lq != Lk included, and the kernel compiled for sm_90a (register split, a product in
flight, 5-D TMA) for rows, 2-D and 3-D boxes, with and without masks. On an sm_90 GPU
(marker ``gpu``): the plans that take it, outputs, the lse and gradients (the generated
backward on its lse) against the float64 reference on fresh random inputs, every
element, rows without keys included; and the calls it must leave to the generated
forward.
"""
import ast
import math

import pytest
import torch

import spattn
from spattn.runtime import settings as S
from spattn.runtime import ws_fwd
from spattn.runtime.plan import Call
from tests.helpers.kernels import doc_ids
from tests.helpers.uninterpreted import run_script


def _call(src, B, H, Lq, inputs=None, Lk=None):
    pat = spattn.compile(src)
    q, k = torch.empty(B, H, Lq, 64), torch.empty(B, H, Lk or Lq, 64)
    return pat, Call.of(pat, q, k, scale=0.125, q_offset=None, inputs=inputs or {},
                        settings=S.current(), backend="torch")


def _tile_mask(kl, mi):
    """PARTIAL tile ``mi``'s mask as the kernel reads it: the mask, or each row's run."""
    if kl.masks.dtype == torch.int16:
        lo, hi = kl.masks[mi].long().unbind(-1)
        c = torch.arange(ws_fwd.TILE)
        return (c >= lo[:, None]) & (c < hi[:, None])
    return kl.masks[mi].bool()


def _lists_against_mask(pat, call, B, H, Lq, Lk, inputs):
    """Every (batch, head, query tile)'s list against the dense mask: every tile with an
    allowed pair listed, in order; a FULL one allowed throughout, a PARTIAL one's mask (or
    its rows' runs) equal to the dense mask's tile (0 past the keys' end)."""
    kl = ws_fwd.key_lists(call)
    LB, LH = kl.strides
    T = ws_fwd.TILE
    n_q, n_k = -(-Lq // T), -(-Lk // T)
    m = torch.as_tensor(pat.mask(Lq, Lk, num_heads=H, batch=B, **inputs)).expand(B, H, Lq, Lk)
    m = torch.nn.functional.pad(m, (0, n_k * T - Lk, 0, n_q * T - Lq))
    tiles = m.reshape(B, H, n_q, T, n_k, T).permute(0, 1, 2, 4, 3, 5)
    assert kl.n_q == n_q and kl.n_partial == int((kl.midx >= 0).sum())
    for b in range(B):
        for h in range(H):
            for t in range(n_q):
                i = b * LB + h * LH + t
                rows = slice(0, min(T, Lq - t * T))
                got = kl.cols[kl.start[i]:kl.start[i] + kl.count[i]].tolist()
                want = [c for c in range(n_k) if tiles[b, h, t, c, rows].any()]
                assert got == want, (b, h, t)
                for j, c in enumerate(got):
                    mi = int(kl.midx[kl.start[i] + j])
                    tile = tiles[b, h, t, c]
                    if mi < 0:
                        assert tile[rows].all() and (c + 1) * T <= Lk, (b, h, t, c)
                    else:
                        assert torch.equal(_tile_mask(kl, mi)[rows], tile[rows]), (b, h, t, c)
    return LB, LH


LIST_CASES = [  # id, source, B, H, Lq, Lk, inputs
    ("B1-H2-L1024-full", "full", 1, 2, 1024, 1024, {}),
    ("B1-H2-L1000-full", "full", 1, 2, 1000, 1000, {}),
    ("B1-H2-L1024-causal", "causal", 1, 2, 1024, 1024, {}),
    ("B1-H2-Lq300-Lk1100-causal", "causal", 1, 2, 300, 1100, {}),
    ("B1-H3-L1024-per-head-blocks", "(q // 256 == k // 256) | (h == 1)", 1, 3, 1024, 1024, {}),
    ("B2-H2-L1024-aligned-documents", "same(doc)", 2, 2, 1024, 1024,
     {"doc": torch.stack([torch.arange(1024) // 384, torch.arange(1024) // 256])}),
    ("B2-H2-L777-documents", "causal & same(doc)", 2, 2, 777, 777,
     {"doc": torch.sort(torch.randint(0, 9, (2, 777)), dim=-1).values}),
    ("B1-H2-L600-causal-holes", "causal & k % 3 != 1", 1, 2, 600, 600, {}),
    ("B1-H1-L900-window", "window(200)", 1, 1, 900, 900, {}),
]


@pytest.mark.parametrize("src,B,H,Lq,Lk,inputs", [c[1:] for c in LIST_CASES],
                         ids=[c[0] for c in LIST_CASES])
def test_key_lists_hold_every_tile(src, B, H, Lq, Lk, inputs, monkeypatch):
    monkeypatch.setenv("SPATTN_WS_FWD", "1")       # (small calls: auto leaves them)
    pat, call = _call(src, B, H, Lq, inputs, Lk)
    LB, LH = _lists_against_mask(pat, call, B, H, Lq, Lk, inputs)
    assert (LB > 0) == ("doc" in inputs) and (LH > 0) == ("h" in src)


@pytest.mark.parametrize("src,H,L,why", [
    ("(q < 128) & (k < 128)", 2, 512, "without keys"),
    ("full", 2, 4096, "2048 tiles in all"),
    ("q // 256 == k // 256", 8, 16384, "2048 tiles in all"),
    ("window(64)", 1, 8192 * 64, "PARTIAL tiles (their masks are kept up to 4096)"),
    ("causal", 1, 4096 * 2, "tiles in all"),
    ("causal & k % 3 != 1", 8, 4096, "tiles PARTIAL (auto takes 5%)"),
], ids=["keyless-rows", "full-H2-L4096", "blocks-H8-L16384", "many-partial-tiles",
        "causal-H1-L8192", "holes-H8-L4096"])
def test_key_lists_refuse(src, H, L, why):
    got = ws_fwd.key_lists(_call(src, 1, H, L)[1])
    assert isinstance(got, str) and why in got, got


@pytest.mark.parametrize("src,H,L", [("full", 1, 8192), ("q // 256 == k // 256", 32, 16384),
                                     ("causal", 1, 16384)],
                         ids=["full-H1-L8192", "blocks-H32-L16384", "causal-H1-L16384"])
def test_key_lists_auto_takes_enough_work(src, H, L):
    kl = ws_fwd.key_lists(_call(src, 1, H, L)[1])
    assert int(kl.count.sum()) * (H if kl.strides[1] == 0 else 1) >= ws_fwd.MIN_WORK


#: calls around auto's PARTIAL shares: rows' runs (causal, windows, documents at random cuts)
#: and masks (holes in the rows), B = 1
SHARE_CASES = [("causal", 8, 4096, 0), ("causal", 16, 16384, 0), ("window(200)", 16, 16384, 0),
               ("causal & same(doc)", 16, 16384, 4), ("causal & same(doc)", 16, 16384, 20),
               ("causal & same(doc)", 16, 16384, 100), ("causal & same(doc)", 8, 65536, 1000),
               ("causal & k % 3 != 1", 8, 4096, 0), ("causal & (k < 64 | k >= 70)", 8, 8192, 0)]
SHARE_IDS = ["causal-H8-L4096", "causal-H16-L16384", "window-H16-L16384", "docs4-H16-L16384",
             "docs20-H16-L16384", "docs100-H16-L16384", "docs1000-H8-L65536", "holes-H8-L4096",
             "one-hole-H8-L8192"]


def share_rule(lists_of, src, H, L, n_docs, setting, limits, monkeypatch):
    """The lists ``lists_of(call)`` under ``setting=auto`` against the same call's forced
    lists: refused for its share of PARTIAL tiles exactly where that share passes the limit
    for what the kernel reads (``limits``: masks', runs')."""
    inputs = {"doc": doc_ids(L, n_docs, torch.Generator().manual_seed(0), batch=1)} \
        if n_docs else {}
    monkeypatch.setenv(setting, "1")
    forced = lists_of(_call(src, 1, H, L, inputs)[1])
    runs = forced.masks.dtype == torch.int16
    share = forced.n_partial / int(forced.count.sum())
    monkeypatch.setenv(setting, "auto")
    got = lists_of(_call(src, 1, H, L, inputs)[1])
    limit = limits[1] if runs else limits[0]
    if share > limit:
        assert isinstance(got, str), (share, limit)
        read = "rows' runs" if runs else "masks"
        assert (f"their {read} read: auto takes {limit:.0%}" if share <= max(limits) else
                f"auto takes {limits[1]:.0%}") in got, got
    else:
        assert not isinstance(got, str), got
        assert got.n_partial == forced.n_partial and torch.equal(got.masks, forced.masks)
    return runs


@pytest.mark.parametrize("src,H,L,n_docs", SHARE_CASES, ids=SHARE_IDS)
def test_auto_share_of_partial_tiles_by_what_is_read(src, H, L, n_docs, monkeypatch):
    """``SPATTN_WS_FWD=auto`` takes a call whose PARTIAL tiles are read as rows' runs up to
    :data:`MAX_RUNS_SHARE` of its tiles, one whose masks are read up to
    :data:`MAX_PARTIAL_SHARE`."""
    runs = share_rule(ws_fwd.key_lists, src, H, L, n_docs, "SPATTN_WS_FWD",
                      (ws_fwd.MAX_PARTIAL_SHARE, ws_fwd.MAX_RUNS_SHARE), monkeypatch)
    assert runs == ("%" not in src and "|" not in src)


@pytest.mark.parametrize("src,runs", [("causal", True), ("causal & same(doc)", True),
                                      ("window(200)", True), ("prefix_lm(300)", True),
                                      ("causal & k % 3 != 1", False), ("dilated(64, 3)", False)],
                         ids=["causal", "documents", "window", "prefix-lm", "holes", "dilated"])
def test_partial_tiles_as_rows_runs(src, runs, monkeypatch):
    """Where every row of every PARTIAL tile allows one run of keys the lists carry the
    runs (int16 ``[n, 128, 2]``, 4 bytes a row), else the masks (uint8 ``[n, 128, 128]``)."""
    monkeypatch.setenv("SPATTN_WS_FWD", "1")
    L = 1000
    inputs = {"doc": torch.sort(torch.randint(0, 6, (L,))).values} if "doc" in src else {}
    pat, call = _call(src, 1, 2, L, inputs)
    kl = ws_fwd.key_lists(call)
    assert kl.masks.dtype == (torch.int16 if runs else torch.uint8)
    assert kl.masks.shape[1:] == ((128, 2) if runs else (128, 128))
    _lists_against_mask(pat, call, 1, 2, L, L, inputs)


def test_tile_runs_round_trip():
    """``tile_runs`` of random masks: rows of one run (or none) come back as runs that
    rebuild the masks exactly; one row with a hole keeps the masks."""
    g = torch.Generator().manual_seed(5)
    n, T = 40, ws_fwd.TILE
    lo = torch.randint(0, T + 1, (n, T), generator=g)
    hi = torch.minimum(lo + torch.randint(0, T + 1, (n, T), generator=g), torch.tensor(T))
    c = torch.arange(T)
    masks = ((c >= lo[..., None]) & (c < hi[..., None])).to(torch.uint8)
    runs = ws_fwd.tile_runs(masks)
    assert runs.dtype == torch.int16 and runs.shape == (n, T, 2)
    back = (c >= runs[..., :1].long()) & (c < runs[..., 1:].long())
    assert torch.equal(back, masks.bool())
    assert torch.equal(runs[..., 0] == runs[..., 1], masks.sum(-1) == 0)
    holed = masks.clone()
    holed[7, 9].zero_()
    holed[7, 9, [3, 5]] = 1                      # keys 3 and 5, not 4
    assert ws_fwd.tile_runs(holed) is holed


@pytest.mark.parametrize("src,L,each", [("full", 1000, 8), ("q // 256 == k // 256", 4096, 2),
                                        ("causal", 4096, 0), ("window(256)", 4096, 0)],
                         ids=["full-L1000", "blocks-L4096", "causal-L4096", "window-L4096"])
def test_key_lists_say_when_work_is_equal(src, L, each, monkeypatch):
    """Persistent programs take equal work items only: every query tile with as many key
    tiles as every other (``each``), else 0."""
    monkeypatch.setenv("SPATTN_WS_FWD", "1")
    kl = ws_fwd.key_lists(_call(src, 1, 2, L)[1])
    assert kl.each == each


def _rule_call(src="full", *, dtype=torch.bfloat16, D=128, Lq=1024, Lk=1024, offset=0,
               score=None):
    """q, k, v on the CPU (bf16, ``[1, 2, L, D]``; ``offset``: elements into their storage)
    and the triton backend's call of ``src`` on them."""
    pat = spattn.compile(src, score=score)

    def t(L):
        return torch.randn(2 * L * D + offset, dtype=dtype)[offset:].view(1, 2, L, D)
    q, k, v = t(Lq), t(Lk), t(Lk)
    return Call.of(pat, q, k, scale=D ** -0.5, q_offset=None, inputs={},
                   settings=S.current(), backend="triton", v=v), q, k, v


def test_call_rules(monkeypatch):
    """What the kernel refuses whatever the device (``ws_fwd.call_why_not``), each rule on
    its own, and a call it takes."""
    from spattn.runtime.triton_backend import BoxRows, RowTables

    def why(*a, options=None, rows=None, **kw):
        call, q, k, v = _rule_call(*a, **kw)
        return ws_fwd.call_why_not(call, q, k, v, options, rows)
    assert why() is None
    assert why(Lq=300, Lk=1100) is None
    assert "float32" in why(dtype=torch.float32)
    assert "head dimension 96" in why(D=96)
    assert "a score" in why(score="s * s")
    assert "a score" in why(score="softcap(30.0) + 0.1 * float(k - q)")
    assert why(score="30 * tanh(s / 30)") is None
    assert why(score="softcap(30.0)", rows=BoxRows((1, 32, 32), (1, 16, 8), False)) is None
    assert why(score="alibi(alibi_slope)") is None
    assert "a score in a layout" in why(score="alibi(alibi_slope)",
                                        rows=BoxRows((1, 32, 32), (1, 16, 8), False))
    assert "(block_m, num_warps)" in why(options={"block_m": 64, "num_warps": 4, "dq": "x"})
    assert "fewer than 128" in why(Lq=100)
    assert "TMA cannot read" in why(offset=1)
    assert "rows through tables" in why(rows=RowTables.of(torch.arange(1024),
                                                          torch.arange(1024), 1024, 1024))
    assert why(rows=BoxRows((1, 32, 32), (1, 16, 8), False)) is None
    assert "other than 128 cells" in why(rows=BoxRows((1, 32, 32), (1, 16, 16), False))
    assert "do not divide" in why(rows=BoxRows((1, 36, 32), (1, 16, 8), False))
    call, q, k, v = _rule_call()
    call.int64 = True
    assert "64-bit" in ws_fwd.call_why_not(call, q, k, v, None, None)
    for name, val in (("SPATTN_BLOCK_M", "64"), ("SPATTN_TMA", "0"), ("SPATTN_STRATEGY", "table")):
        with monkeypatch.context() as m:
            m.setenv(name, val)
            assert "SPATTN_* settings" in why(), name
    monkeypatch.setenv("SPATTN_WS_FWD", "0")
    call, q, k, v = _rule_call()
    assert ws_fwd.why_not(call, q, k, v, None, None) == "SPATTN_WS_FWD=0"
    monkeypatch.setenv("SPATTN_WS_FWD", "1")
    call, q, k, v = _rule_call()
    assert ws_fwd.why_not(call, q, k, v, None, None) == "not on a CUDA device"


def test_setting_parses(monkeypatch):
    for raw, want in (("0", False), ("1", True), ("auto", None)):
        monkeypatch.setenv("SPATTN_WS_FWD", raw)
        assert S.current().ws_fwd is want
    monkeypatch.setenv("SPATTN_WS_FWD", "sometimes")
    with pytest.raises(spattn.SpattnError, match="SPATTN_WS_FWD"):
        S.current()


def test_kernel_compiles_for_sm90():
    """Every configuration of tests/helpers/compile_ws.py builds for sm_90a: consumers at
    240 registers and the loader at 24, one product kept in flight (a wait of 1), Q, K, V
    read and O written through 5-D TMA; PARTIAL tiles by masks in one, by rows' runs in
    another; an additive score (its slope alone, and with terms of the key) in three, a
    capped one in three (rows, rows' runs, a layout's boxes)."""
    r = run_script("tests/helpers/compile_ws.py")
    lines = r.stdout.splitlines()
    assert len(lines) == 13, r.stdout
    assert [sum(f"'masked': {m}," in ln for ln in lines) for m in (0, 1, 2)] == [8, 2, 3]
    assert [sum(f"'scored': {c}," in ln for ln in lines) for c in (0, 1, 2, 3)] == [7, 1, 2, 3]
    for ln in lines:
        label, ok, rest = ln.partition(" OK ")
        assert ok, ln
        facts = ast.literal_eval(rest)
        assert {"240", "24"} <= set(facts["setmaxnreg"]) and "1" in facts["waits"], ln
        assert facts["loads5d"] >= 3 and facts["stores5d"] >= 1, ln


# ---------------------------------------------------------------- on the GPU

def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def hopper(test):
    """A test of the GPU (marker ``gpu``) that needs an sm_90 one."""
    return pytest.mark.gpu(pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU")(test))


def _rand(shape, dtype, g, bshd=False):
    if bshd:
        B, H, L, D = shape
        t = torch.randn(B, L, H, D, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    else:
        t = torch.randn(*shape, device="cuda", dtype=dtype, generator=g)
    return t.requires_grad_()


def _check(pat, q, k, v, inputs, tol=1e-2, plan=None, lse_tol=1e-3):
    """o, lse and the gradients of a fresh dO against the float64 reference (a row with no
    allowed key: o 0, lse -inf in both), through ``plan`` where given (it holds the
    inputs). ``pat`` may have a score."""
    from spattn.runtime.reference import pattern_reference
    o, lse = (pat(q, k, v, return_lse=True, **inputs) if plan is None
              else pat(q, k, v, return_lse=True, plan=plan))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = pattern_reference(pat, q64, k64, v64, **inputs)
    do = torch.randn_like(o)
    (o.float() * do.float()).sum().backward()
    (ro * do.double()).sum().backward()
    keyless = rl == float("-inf")
    assert torch.isfinite(o).all() and torch.equal(lse == float("-inf"), keyless)
    assert float((o.detach().double() - ro.detach()).abs().max()) < 2e-2
    assert float((lse.detach().double() - rl.detach())[~keyless].abs().max()) < lse_tol
    for name, a, b in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        err = float((a.grad.double() - b.grad).norm() / b.grad.norm())
        assert err < tol, f"{name}: rel. error {err:.2e}"


def checked_plan(mask, score, params, B, H, Hk, Lq, Lk, D, dtype, seed, *, bshd=False,
                 lse_tol=1e-3):
    """The plan of ``mask`` with ``score`` (None: none) on fresh random q ``[B, H, Lq,
    D]``, k and v ``[B, Hk, Lk, D]`` (``bshd``: in ``[B, L, H, D]`` memory; ``doc`` in the
    mask: documents at random cuts), its o, lse and gradients checked against the float64
    reference (:func:`_check`)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = _rand((B, H, Lq, D), dtype, g, bshd)
    k, v = (_rand((B, Hk, Lk, D), dtype, g, bshd) for _ in range(2))
    inputs = {}
    if "doc" in mask:
        inputs = {"doc": (torch.rand(B, Lq, device="cuda", generator=g) < 0.004).cumsum(-1)}
    pat = spattn.compile(mask, score=score, **params)
    plan = pat.plan(q, k, v, **inputs)
    _check(pat, q, k, v, inputs, plan=plan, lse_tol=lse_tol)
    return plan


ROW_CASES = [  # source, B, H, Hk, Lq, Lk, D, dtype, [B, L, H, D] memory, inputs
    ("full", 2, 4, 2, 1024, 1024, 64, torch.float16, False, None),
    ("full", 1, 2, 2, 2048, 2048, 128, torch.bfloat16, True, None),
    ("(q // 256 == k // 256) | (h == 1)", 1, 2, 1, 2048, 2048, 128, torch.bfloat16, False,
     None),
    ("same(doc)", 2, 2, 2, 2048, 2048, 128, torch.bfloat16, False, "aligned"),
    ("causal", 1, 4, 2, 2048, 2048, 128, torch.bfloat16, False, None),
    ("causal", 2, 2, 2, 1000, 1000, 64, torch.float16, True, None),
    ("causal", 1, 2, 1, 333, 1500, 128, torch.bfloat16, False, None),
    ("causal & same(doc)", 2, 2, 1, 1900, 1900, 128, torch.bfloat16, False, "random"),
    ("k + 100 < q", 1, 2, 2, 1024, 1024, 64, torch.bfloat16, False, None),
]
ROW_IDS = [f"B{c[1]}-H{c[2]}-Hk{c[3]}-Lq{c[4]}-Lk{c[5]}-D{c[6]}-{str(c[7])[6:]}"
           + ("-bshd" if c[8] else "") + f"-{c[0].split('(')[0].split(' ')[0]}"
           for c in ROW_CASES]


@pytest.mark.parametrize("src,B,H,Hk,Lq,Lk,D,dtype,bshd,ins", ROW_CASES, ids=ROW_IDS)
@hopper
def test_rows_forward_gpu(src, B, H, Hk, Lq, Lk, D, dtype, bshd, ins, monkeypatch):
    monkeypatch.setenv("SPATTN_WS_FWD", "1")       # (small calls: auto leaves them)
    g = torch.Generator(device="cuda").manual_seed(Lq + Lk + B + H)
    q = _rand((B, H, Lq, D), dtype, g, bshd)
    k, v = (_rand((B, Hk, Lk, D), dtype, g, bshd) for _ in range(2))
    inputs = {}
    if ins == "aligned":    # 128-aligned documents, different per batch element
        cuts = torch.stack([torch.arange(Lq) // 384, torch.arange(Lq) // 640])
        inputs = {"doc": cuts.to("cuda")}
    elif ins == "random":   # documents at random cuts, different per batch element
        cuts = torch.rand(B, Lq, device="cuda", generator=g) < 0.004
        inputs = {"doc": cuts.cumsum(-1)}
    pat = spattn.compile(src)
    plan = pat.plan(q, k, v, **inputs)
    assert getattr(plan.forward_stage, "gluon", False), plan
    _check(pat, q, k, v, inputs)


LAYOUT_CASES = [  # shape, kernel, stride, heads
    ((32, 64), (16, 16), (16, 16), 2),
    ((64, 64), (48, 48), (16, 16), 2),
    ((16, 16, 32), (8, 8, 16), (8, 8, 8), 2),
    ((64, 128), (48, 48), (16, 16), 24),        # 1536 items of 9 tiles: persistent
]


@pytest.mark.parametrize("shape,kernel,stride,H", LAYOUT_CASES,
                         ids=["x".join(map(str, c[0])) + "-k" + "x".join(map(str, c[1]))
                              + "-s" + "x".join(map(str, c[2])) for c in LAYOUT_CASES])
@hopper
def test_layout_forward_gpu(shape, kernel, stride, H, monkeypatch):
    monkeypatch.setenv("SPATTN_LAYOUT", "on")      # (small grids: auto may keep the sequence)
    monkeypatch.setenv("SPATTN_WS_FWD", "1")
    N = math.prod(shape)
    g = torch.Generator(device="cuda").manual_seed(N)
    q, k, v = (_rand((1, H, N, 128), torch.bfloat16, g) for _ in range(3))
    pat = spattn.neighborhood(shape, kernel, stride=stride)
    plan = pat.plan(q, k, v)
    stage = plan.forward_stage
    assert getattr(stage, "gluon", False) and stage.box is not None, plan
    assert stage.persistent and stage.grid[0] == min(   # (every item 9 or fewer tiles)
        stage.n_work, torch.cuda.get_device_properties(0).multi_processor_count)
    _check(pat, q, k, v, {})


@pytest.mark.parametrize("src,runs", [("causal & k % 3 != 1", False), ("window(300)", True),
                                      ("prefix_lm(200)", True)],
                         ids=["holes-masks", "window-runs", "prefix-lm-runs"])
@hopper
def test_partial_tiles_by_masks_and_runs_gpu(src, runs, monkeypatch):
    """PARTIAL tiles read as 128 x 128 masks, or as each row's run of keys, give the
    reference's answer (a ragged end, GQA)."""
    monkeypatch.setenv("SPATTN_WS_FWD", "1")
    g = torch.Generator(device="cuda").manual_seed(len(src))
    q = _rand((1, 4, 1000, 128), torch.bfloat16, g)
    k, v = (_rand((1, 2, 1000, 128), torch.bfloat16, g) for _ in range(2))
    pat = spattn.compile(src)
    plan = pat.plan(q, k, v)
    stage = plan.forward_stage
    assert getattr(stage, "gluon", False) and stage.n_masks > 0 and stage.runs is runs, plan
    _check(pat, q, k, v, {}, plan=plan)


@pytest.mark.parametrize("src,B,H,L,grid", [
    ("full", 2, 4, 1024, 1), ("full", 1, 3, 2048, 7), ("causal", 1, 2, 2000, 5),
    ("causal & same(doc)", 2, 2, 1900, 3)],
    ids=["B2-H4-L1024-full-grid1", "B1-H3-L2048-full-grid7", "B1-H2-L2000-causal-grid5",
         "B2-H2-L1900-documents-grid3"])
@hopper
def test_programs_take_work_items_in_turn_gpu(src, B, H, L, grid, monkeypatch):
    """Any grid gives the same answer: each program takes the items ``pid, pid + grid,
    ...`` with its Q buffers, K/V ring and ping-pong turns running on from one item to
    the next (FULL and PARTIAL items, unequal lists, rows past a ragged end)."""
    monkeypatch.setenv("SPATTN_WS_FWD", "1")
    g = torch.Generator(device="cuda").manual_seed(L + grid)
    q, k, v = (_rand((B, H, L, 128), torch.bfloat16, g) for _ in range(3))
    inputs = {}
    if "doc" in src:
        inputs = {"doc": (torch.rand(B, L, device="cuda", generator=g) < 0.004).cumsum(-1)}
    pat = spattn.compile(src)
    plan = pat.plan(q, k, v, **inputs)
    stage = plan.forward_stage
    assert getattr(stage, "gluon", False), plan
    stage.grid = (grid,)
    _check(pat, q, k, v, inputs, plan=plan)


@pytest.mark.parametrize("src,L,env,dtype", [
    ("causal", 1024, {}, torch.float32),
    ("full", 1024, {"SPATTN_WS_FWD": "0"}, torch.bfloat16),
    ("full", 1024, {"SPATTN_BLOCK_M": "64"}, torch.bfloat16),
    ("full", 1024, {"SPATTN_WS_FWD": "auto"}, torch.bfloat16),
], ids=["fp32", "setting-off", "tiles-fixed", "auto-little-work"])
@hopper
def test_left_to_the_generated_forward_gpu(src, L, env, dtype, monkeypatch):
    monkeypatch.setenv("SPATTN_WS_FWD", "1")
    for n, val in env.items():
        monkeypatch.setenv(n, val)
    g = torch.Generator(device="cuda").manual_seed(L)
    q, k, v = (_rand((1, 2, L, 64), dtype, g) for _ in range(3))
    pat = spattn.compile(src)
    plan = pat.plan(q, k, v)
    assert not getattr(plan.forward_stage, "gluon", False), plan
    _check(pat, q, k, v, {})


@hopper
def test_auto_takes_enough_work_gpu(monkeypatch):
    monkeypatch.delenv("SPATTN_WS_FWD", raising=False)
    g = torch.Generator(device="cuda").manual_seed(7)
    q, k, v = (_rand((1, 2, 8192, 64), torch.bfloat16, g) for _ in range(3))
    pat = spattn.compile("full")
    assert getattr(pat.plan(q, k, v).forward_stage, "gluon", False)
    _check(pat, q, k, v, {})


@pytest.mark.skipif(not ws_fwd.GLUON, reason="a Triton without Gluon's Hopper modules")
def test_descriptors_and_launch_keys_as_the_jit_makes_them():
    """``ws_fwd.descriptor`` (made without the descriptor's checks) equals the checked
    ``TensorDescriptor`` field for field, and ``ws_fwd.launch_key`` tells two heads apart
    exactly where Triton's specialiser does: descriptors by dtype, block and layout (not
    by base, shape or strides: runtime values), tensors by dtype and 16-byte alignment,
    ints by Triton's classes of them."""
    from triton.experimental.gluon import language as gl

    from spattn.runtime.triton_backend import _launch_key
    TD = ws_fwd.TensorDescriptor
    lay = {b: gl.NVMMASharedLayout.get_default_for([1, 1, b, 64], gl.bfloat16)
           for b in (64, 128)}
    lay16 = gl.NVMMASharedLayout.get_default_for([1, 1, 64, 64], gl.float16)
    g = torch.Generator().manual_seed(0)

    def t(L=256, dtype=torch.bfloat16):
        return torch.randn(1, 2, L, 64, generator=g).to(dtype)

    def desc(x, b=64, layout=None):
        args = (x, list(x.shape), list(x.stride()), [1, 1, b, 64], layout or lay[b])
        fast = ws_fwd.descriptor(*args)
        assert type(fast) is TD and fast == TD(*args)
        return fast

    base, lse = t(), torch.randn(2, 256, generator=g)
    heads = {
        "a": (desc(base), lse, 7),
        "other tensors, same layout": (desc(t()), torch.randn(2, 256, generator=g), 7),
        "another length": (desc(t(512)), lse, 7),
        "another block": (desc(t(), 128), lse, 7),
        "fp16": (desc(t(dtype=torch.float16), layout=lay16), lse, 7),
        "unaligned tensor": (desc(base), lse.reshape(-1)[1:257], 7),
        "int 1": (desc(base), lse, 1),
        "int of 16": (desc(base), lse, 32),
    }
    jit = {k: _launch_key(h) for k, h in heads.items()}
    ours = {k: ws_fwd.launch_key(h) for k, h in heads.items()}
    if jit["a"] is None:
        pytest.skip("Triton does not expose its specialiser")
    for a in heads:
        for b in heads:
            assert (ours[a] == ours[b]) == (jit[a] == jit[b]), (a, b)
    assert ours["a"] == ours["other tensors, same layout"] == ours["another length"]
    assert len(set(ours.values())) == 6
