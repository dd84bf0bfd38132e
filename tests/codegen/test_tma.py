"""TMA tensor-descriptor kernels (``config.tma``) under the interpreter.

On Hopper the launchers pass TMA descriptors for Q, K, V, O (and dO, dQ, dK, dV) by
default; here ``SPATTN_TMA=1`` forces them under the interpreter, whose descriptor
loads zero-fill out-of-bounds rows and head-dim columns and whose stores clip, as the
hardware does.  Every case checks every output element against the float64
reference and that the descriptors were really built (or, for tensors TMA cannot
address, that the pointer kernels ran instead).
"""
import pytest
import torch

from spattn.runtime import cache
from spattn.runtime import triton_backend as tb

from tests.helpers.kernels import doc_ids, record_descriptors, window_cf, window_sink_cf
from tests.codegen.test_triton_bwd import run_bwd
from tests.codegen.test_triton_fwd import run_fwd

STRATEGIES = ("ranges", "table")


@pytest.fixture
def tma(monkeypatch):
    """Force TMA on; yields the list of (rows, block_d) of every descriptor built."""
    built = record_descriptors(monkeypatch)
    monkeypatch.setenv("SPATTN_TMA", "1")
    cache.clear_memory()
    yield built
    cache.clear_memory()


FWD_CASES = [
    # (id, source, inputs, closed form, kwargs)
    ("window_sink", "causal & (window(13) | sink(4))", None, lambda: window_sink_cf(13, 4), {}),
    ("documents", "causal & same(doc)", lambda g, B, H, Lq, Lk: {"doc": doc_ids(Lk, 4, g)},
     None, {}),
    ("gqa", "causal & (window(13) | sink(4))", None, lambda: window_sink_cf(13, 4),
     dict(Bn=2, Hq=4, Hk=2, Lq=40)),
    ("Lq37-Lk70-off-5", "causal & window(13)", None, lambda: window_cf(13),
     dict(Lq=37, Lk=70, q_offset=-5)),
    ("D24", "causal & window(13)", None, lambda: window_cf(13), dict(D=24, Lq=45)),
    ("strided-layout", "causal & window(13)", None, lambda: window_cf(13),
     dict(Bn=2, layout="blhd")),
]


def _fid(c):
    kw = c[4]
    return (f"B{kw.get('Bn', 1)}-H{kw.get('Hq', 2)}-L{kw.get('Lq', 50)}-D{kw.get('D', 32)}"
            f"-fp32-{c[0]}")


@pytest.mark.parametrize("loop", ["split", "fused", "persistent"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name,src,inputs_fn,cf_factory,kw", FWD_CASES,
                         ids=[_fid(c) for c in FWD_CASES])
def test_forward(tma, monkeypatch, name, src, inputs_fn, cf_factory, kw, strategy, loop):
    monkeypatch.setenv("SPATTN_FWD_LOOP", loop)
    kw = dict(kw)
    run_fwd(src, strategy=strategy, inputs_fn=inputs_fn, cf_factory=cf_factory,
            q_offset=kw.pop("q_offset", None), seed=sum(map(ord, name)), **kw)
    D = kw.get("D", 32)
    block_d = max(16, 1 << (D - 1).bit_length())
    if loop == "persistent":    # pointer loads (Triton 3.6 cannot compile TMA there)
        assert tma == []
    else:
        assert sorted(tma) == sorted([(32, block_d)] * 2 + [(16, block_d)] * 2)


BWD_CASES = [
    ("window_sink", "causal & (window(13) | sink(4))", None, lambda: window_sink_cf(13, 4), {}),
    ("documents", "causal & same(doc)", lambda g, *a: {"doc": doc_ids(45, 4, g)}, None, {}),
    ("gqa", "causal & (window(13) | sink(4))", None, lambda: window_sink_cf(13, 4),
     dict(Bn=2, Hq=4, Hk=2)),
    ("Lq55-Lk30-off-7", "causal & window(13)", None, lambda: window_cf(13),
     dict(Lq=55, Lk=30, q_offset=-7)),
    ("D80", "causal & window(13)", None, lambda: window_cf(13), dict(D=80, Lq=33)),
    ("strided-layout", "causal & window(13)", None, lambda: window_cf(13),
     dict(Bn=2, layout="blhd")),
]


@pytest.mark.parametrize("loop", ["split", "fused"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name,src,inputs_fn,cf_factory,kw", BWD_CASES,
                         ids=[_fid(c).replace("-L50-", "-L45-") for c in BWD_CASES])
def test_backward(tma, monkeypatch, name, src, inputs_fn, cf_factory, kw, strategy, loop):
    monkeypatch.setenv("SPATTN_BWD_LOOP", loop)
    run_bwd(src, strategy=strategy, inputs_fn=inputs_fn, cf_factory=cf_factory,
            seed=sum(map(ord, name)) + 1, **kw)
    # forward 4 descriptors, dQ 6 (q, k, v, dO, O, dQ), dK/dV 6 (q, k, v, dO, dK, dV)
    assert len(tma) == 4 + 6 + 6


def test_fully_masked_rows(tma):
    """Rows that see no key: O = 0, LSE = -inf, zero gradients, through TMA stores."""
    dq, dk, dv, m = run_bwd("causal & k >= 20", strategy="table", Lq=50, seed=17)
    dead = ~m.any(-1)
    assert dead.any()
    assert torch.count_nonzero(dq[dead.expand(dq.shape[:3])]) == 0
    assert tma


def test_unaligned_falls_back_to_pointers(tma):
    """D = 36 in fp16: rows of 72 bytes break TMA's 16-byte stride rule, so the
    pointer kernels run (correctly) even with TMA forced on."""
    run_fwd("causal & window(13)", strategy="ranges", D=36, dtype=torch.float16,
            cf_factory=lambda: window_cf(13), tol=2e-2)
    assert tma == []


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("t,ok", [
    (_t(1, 2, 64, 128, dtype=torch.bfloat16), True),
    (_t(2, 64, 3, 32).transpose(1, 2), True),               # [B, L, H, D] view
    (_t(1, 2, 64, 36, dtype=torch.float16), False),          # 72-byte rows
    (_t(1, 2, 64, 32).transpose(2, 3), False),               # D not contiguous
    (_t(1, 2, 64, 33)[..., :32], False),                     # 132-byte rows
    (_t(1, 2, 65, 32).flatten()[4:4 + 2 * 64 * 32].view(1, 2, 64, 32), True),  # base + 16 B
    (_t(1, 2, 65, 32).flatten()[1:1 + 2 * 64 * 32].view(1, 2, 64, 32), False),  # base + 4 B
    (_t(2, 64, 32), False),                                  # not 4-D
    (_t(1, 2, 64, 40, dtype=torch.float16)[..., :20], False),  # outputs' rows of 40 B
], ids=["bf16-contiguous", "blhd-view", "fp16-D36", "D-strided", "D32-of-33", "base+16B",
        "base+4B", "3-D", "fp16-D20-of-40"])
def test_tma_ok(t, ok):
    assert tb.tma_ok(t) is ok


def test_strided_inputs_whose_outputs_tma_cannot_address(tma):
    """q, k, v that TMA could read (80-byte rows of a wider tensor) but whose fresh
    outputs (40-byte rows, D = 20 in fp16) it could not: the pointer kernels run."""
    import spattn
    from spattn.runtime.reference import attention_reference
    pat = spattn.compile("causal & window(13)", backend="triton")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 40, 40, generator=g).half()[..., :20] for _ in range(3))
    out = pat(q, k, v)
    ref, _ = attention_reference(q.double(), k.double(), v.double(),
                                 pat.mask(40, 40, num_heads=2))
    assert torch.allclose(out.double(), ref, atol=2e-2)
    assert tma == []


def test_descriptors_hold_what_triton_checks():
    """The launchers' descriptors (made without TensorDescriptor's checks) carry the same
    fields as TensorDescriptor's own constructor makes."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    t = _t(2, 64, 3, 32).transpose(1, 2)
    d = tb._desc(t, 64, 32)
    want = TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 64, 32])
    assert type(d) is TensorDescriptor and d.base is t
    assert (d.shape, d.strides, d.block_shape, d.padding) == (
        want.shape, want.strides, want.block_shape, want.padding)


def test_tma_option_resolution(monkeypatch):
    from spattn.runtime.settings import current
    q = _t(1, 2, 64, 32)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")   # no CUDA needed: not touched
    monkeypatch.delenv("SPATTN_TMA", raising=False)

    def tma(want, kind, dev, t=q):
        return tb.tma_choice(want, kind, dev, current(), t)
    assert tma(None, "fwd", cpu) is False            # auto: CUDA only
    assert tma(None, "fwd", cuda) is True            # (the interpreter has TMA)
    assert tma(None, "bwd", cuda) is False           # auto: forward only
    assert tma(True, "bwd", cpu) is True
    monkeypatch.setenv("SPATTN_TMA", "1")
    assert tma(None, "bwd", cpu) is True
    assert tma(False, "fwd", cpu) is False           # the option wins
    assert tma(None, "fwd", cpu, q.transpose(2, 3)) is False   # layout rules win
    monkeypatch.setenv("SPATTN_TMA", "0")
    assert tma(None, "fwd", cuda) is False
    monkeypatch.setenv("SPATTN_TMA", "maybe")
    with pytest.raises(ValueError, match="SPATTN_TMA"):
        current()


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rendered_tma_kernels_have_no_pointer_tiles(kind, strategy):
    """The TMA variants load and store every [rows, D] tile through descriptors: no
    pointer tiles or head-dim masks are left, only the 1-D LSE / delta vectors."""
    from spattn.codegen.kernels import render
    from spattn.codegen.config import analysis_strategy, get_closed_form, pick
    from tests.helpers.kernels import compile_pattern
    pat = compile_pattern("causal & (window(13) | sink(4))")
    cf = get_closed_form(pat) if strategy == "ranges" else None
    for loop in ("split", "fused"):
        cfg = pick(pat, kind, head_dim=64, dtype="bf16", strategy=strategy, loop=loop,
                   closed_form=cf, tma=True)
        assert cfg.tma and analysis_strategy(pat, cf) == "ranges"
        text = render(pat, kind, cfg, "0" * 32, closed_form=cf)
        assert "Loads: TMA tensor descriptors" in text
        text = text[text.index("@triton.jit\ndef _" + ("fwd" if kind == "fwd" else "dkdv")):]
        for ptr in ("p_kt", "p_v ", "p_qt", "p_q ", "p_do ", "p_o ", "m_d", "o_d", "p_k, p_v"):
            assert ptr not in text, (loop, ptr)
        inner = 2 if strategy == "table" and loop == "fused" else 1   # + the CSR lists' loop
        if kind == "fwd":   # Q once; K, V per tile in each loop function; O stored once
            assert (text.count(".load(["), text.count(".store([")) == (1 + 2 * inner, 1)
        else:   # K, V / Q, dO, O once; Q, dO / K, V per step; dK, dV, dQ stored
            assert (text.count(".load(["), text.count(".store([")) == (5 + 4 * inner, 3)
