"""The warp-specialised forward (``runtime/ws_fwd.py``, Gluon, Hopper).

On the CPU: the key-tile lists it reads (every non-EMPTY 128 x 128 tile of each batch
element, head and query tile, and why a call's tiles are refused) against the dense
mask, and the kernel compiled for sm_90a (register split, a product in flight, 5-D TMA)
for rows and for 2-D and 3-D boxes. On an sm_90 GPU (marker ``gpu``): the plans that
take it, outputs, the lse and gradients (the generated backward on its lse) against the
float64 reference on fresh random inputs, every element; and the calls it must leave to
the generated forward.
"""
import ast
import math

import pytest
import torch

import spattn
from spattn.runtime import settings as S
from spattn.runtime import ws_fwd
from spattn.runtime.plan import Call
from tests.helpers.uninterpreted import run_script


def _call(src, B, H, L, inputs=None):
    pat = spattn.compile(src)
    q = torch.empty(B, H, L, 64)
    return pat, Call.of(pat, q, q, scale=0.125, q_offset=None, inputs=inputs or {},
                        settings=S.current(), backend="torch")


def _lists_against_mask(pat, call, B, H, L, inputs):
    start, count, cols, (LB, LH), n_q = ws_fwd.key_lists(call)
    m = pat.mask(L, L, num_heads=H, batch=B, **inputs)
    m = torch.as_tensor(m).expand(B, H, L, L)
    T = ws_fwd.TILE
    tiles = m.reshape(B, H, L // T, T, L // T, T).permute(0, 1, 2, 4, 3, 5)
    for b in range(B):
        for h in range(H):
            for t in range(n_q):
                i = b * LB + h * LH + t
                got = cols[start[i]:start[i] + count[i]].tolist()
                want = [c for c in range(L // T) if tiles[b, h, t, c].any()]
                assert got == want, (b, h, t)
                assert all(tiles[b, h, t, c].all() for c in got), (b, h, t)
    return LB, LH


LIST_CASES = [  # id, source, B, H, L, inputs
    ("B1-H2-L1024-full", "full", 1, 2, 1024, {}),
    ("B1-H3-L1024-per-head-blocks", "(q // 256 == k // 256) | (h == 1)", 1, 3, 1024, {}),
    ("B2-H2-L1024-documents", "same(doc)", 2, 2, 1024,
     {"doc": torch.stack([torch.arange(1024) // 384, torch.arange(1024) // 256])}),
]


@pytest.mark.parametrize("src,B,H,L,inputs", [c[1:] for c in LIST_CASES],
                         ids=[c[0] for c in LIST_CASES])
def test_key_lists_hold_every_full_tile(src, B, H, L, inputs, monkeypatch):
    monkeypatch.setenv("SPATTN_WS_FWD", "1")       # (small calls: auto leaves them)
    pat, call = _call(src, B, H, L, inputs)
    LB, LH = _lists_against_mask(pat, call, B, H, L, inputs)
    assert (LB > 0) == ("doc" in inputs) and (LH > 0) == ("h" in src)


@pytest.mark.parametrize("src,H,L,why", [
    ("causal", 2, 1024, "PARTIAL"),
    ("window(64)", 2, 1024, "PARTIAL"),
    ("(q < 128) & (k < 128)", 2, 512, "without keys"),
    ("full", 2, 4096, "2048 tiles in all"),
    ("q // 256 == k // 256", 8, 16384, "2048 tiles in all"),
], ids=["causal", "window", "keyless-rows", "full-H2-L4096", "blocks-H8-L16384"])
def test_key_lists_refuse(src, H, L, why):
    got = ws_fwd.key_lists(_call(src, 1, H, L)[1])
    assert isinstance(got, str) and why in got, got


@pytest.mark.parametrize("src,H,L", [("full", 1, 8192), ("q // 256 == k // 256", 32, 16384)],
                         ids=["full-H1-L8192", "blocks-H32-L16384"])
def test_key_lists_auto_takes_enough_work(src, H, L):
    start, count, cols, strides, n_q = ws_fwd.key_lists(_call(src, 1, H, L)[1])
    assert int(count.sum()) * (H if strides[1] == 0 else 1) >= ws_fwd.MIN_WORK


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
    read and O written through 5-D TMA."""
    r = run_script("tests/helpers/compile_ws.py")
    lines = r.stdout.splitlines()
    assert len(lines) == 5, r.stdout
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


def _check(pat, q, k, v, inputs, tol=1e-2):
    """o, lse and the gradients of a fresh dO against the float64 reference."""
    from spattn.runtime.reference import attention_reference
    o, lse = pat(q, k, v, return_lse=True, **inputs)
    B, H, L, _ = q.shape
    m = pat.mask(L, k.shape[2], num_heads=H, batch=B, device="cuda", **inputs)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = attention_reference(q64, k64, v64, m)
    do = torch.randn_like(o)
    (o.float() * do.float()).sum().backward()
    (ro * do.double()).sum().backward()
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    assert float((o.detach().double() - ro).abs().max()) < 2e-2
    assert float((lse.detach().double() - rl).abs().max()) < 1e-3
    for name, a, b in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        err = float((a.grad.double() - b.grad).norm() / b.grad.norm())
        assert err < tol, f"{name}: rel. error {err:.2e}"


ROW_CASES = [  # source, B, H, Hk, L, D, dtype, [B, L, H, D] memory, inputs
    ("full", 2, 4, 2, 1024, 64, torch.float16, False, None),
    ("full", 1, 2, 2, 2048, 128, torch.bfloat16, True, None),
    ("(q // 256 == k // 256) | (h == 1)", 1, 2, 1, 2048, 128, torch.bfloat16, False, None),
    ("same(doc)", 2, 2, 2, 2048, 128, torch.bfloat16, False, "doc"),
]
ROW_IDS = [f"B{c[1]}-H{c[2]}-Hk{c[3]}-L{c[4]}-D{c[5]}-{str(c[6])[6:]}"
           + ("-bshd" if c[7] else "") + f"-{i}" for i, c in enumerate(ROW_CASES)]


@pytest.mark.parametrize("src,B,H,Hk,L,D,dtype,bshd,ins", ROW_CASES, ids=ROW_IDS)
@hopper
def test_rows_forward_gpu(src, B, H, Hk, L, D, dtype, bshd, ins, monkeypatch):
    monkeypatch.setenv("SPATTN_WS_FWD", "1")       # (small calls: auto leaves them)
    g = torch.Generator(device="cuda").manual_seed(L + B + H)
    q = _rand((B, H, L, D), dtype, g, bshd)
    k, v = (_rand((B, Hk, L, D), dtype, g, bshd) for _ in range(2))
    inputs = {}
    if ins == "doc":       # 128-aligned documents, different per batch element
        cuts = torch.stack([torch.arange(L) // 384, torch.arange(L) // 640])
        inputs = {"doc": cuts.to("cuda")}
    pat = spattn.compile(src)
    plan = pat.plan(q, k, v, **inputs)
    assert getattr(plan.forward_stage, "gluon", False), plan
    _check(pat, q, k, v, inputs)


LAYOUT_CASES = [  # shape, kernel, stride, heads
    ((32, 64), (16, 16), (16, 16), 2),
    ((64, 64), (48, 48), (16, 16), 2),
    ((16, 16, 32), (8, 8, 16), (8, 8, 8), 2),
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
    _check(pat, q, k, v, {})


@pytest.mark.parametrize("src,L,env", [
    ("causal", 1024, {}),
    ("full", 1000, {}),
    ("full", 1024, {"SPATTN_WS_FWD": "0"}),
    ("full", 1024, {"SPATTN_BLOCK_M": "64"}),
    ("full", 1024, {"SPATTN_WS_FWD": "auto"}),
], ids=["partial-tiles", "L1000", "setting-off", "tiles-fixed", "auto-little-work"])
@hopper
def test_left_to_the_generated_forward_gpu(src, L, env, monkeypatch):
    monkeypatch.setenv("SPATTN_WS_FWD", "1")
    for n, val in env.items():
        monkeypatch.setenv(n, val)
    g = torch.Generator(device="cuda").manual_seed(L)
    q, k, v = (_rand((1, 2, L, 64), torch.bfloat16, g) for _ in range(3))
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
