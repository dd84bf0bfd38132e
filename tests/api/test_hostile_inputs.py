"""Hostile tensors through the public call: only a SpattnError may escape, and a call that
succeeds on finite inputs is right.

Each example starts from a valid call (random B, heads with GQA, lengths, head dim, dtype,
runtime inputs) and applies up to three mutations: wrong ranks, shapes, dtypes, layouts and
devices (meta), empty dims, non-contiguous or broadcast (stride 0) views, NaN/inf values,
non-tensors, bad scales, huge or ill-typed q_offset, broken runtime inputs.  A call that
returns is checked for shape and dtype and, when its inputs are finite, against the float64
reference element by element (an empty batch, head count or length: o 0 and lse -inf);
with a gradient asked for, the backward runs too.
"""
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import spattn
from spattn.dsl.errors import MAX_INT, SpattnError
from spattn.runtime.reference import attention_reference

SOURCES = {
    "window": "causal & window(12)",
    "doc": "causal & same(doc)",
    "blocks": "blocks[q // 16, k // 16] | q == k",
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}

TENSOR_MUTATIONS = ["rank", "empty", "head-dim", "batch", "heads", "kv-length", "dtype",
                    "meta", "all-meta", "transposed", "strided", "broadcast", "nan", "inf",
                    "sparse", "nested", "not-a-tensor", "head-dim-too-large"]
SCALES = [0.3, 1, 0.0, -1.0, math.nan, math.inf, 1e38, 1e300, 1e-300, 10 ** 400, "0.5", True,
          1 + 1j, torch.tensor(0.25), torch.tensor([1.0, 2.0]), np.float32(0.5)]
Q_OFFSETS = [0, 5, -7, 100, MAX_INT, -MAX_INT, MAX_INT + 1, 2 ** 64, -2 ** 64, 1.5,
             np.int64(3), np.uint64(2 ** 63), "3", True, torch.tensor(3)]
INPUT_MUTATIONS = ["missing", "extra", "float", "uint16", "uint32", "uint64", "meta", "rank",
                   "short", "empty", "negative", "huge", "bool", "non-contiguous", "list"]


@st.composite
def calls(draw):
    """(pattern name, kwargs of the call, the mutations applied)."""
    name = draw(st.sampled_from(sorted(SOURCES)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    B, Hk, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Lq, Lk = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    D = draw(st.sampled_from([16, 32]))
    dtype = draw(st.sampled_from(DTYPES))
    shapes = {"q": [B, Hk * group, Lq, D], "k": [B, Hk, Lk, D], "v": [B, Hk, Lk, D]}
    n_muts = draw(st.sampled_from([0, 0, 1, 1, 2]))      # a valid call two times in five
    muts = [draw(st.sampled_from(TENSOR_MUTATIONS)) for _ in range(n_muts)]
    who = draw(st.sampled_from(["q", "k", "v"]))
    if "rank" in muts:
        shapes[who] = shapes[who][:3] if draw(st.booleans()) else shapes[who] + [1]
    if "empty" in muts:
        shapes[who][draw(st.integers(0, len(shapes[who]) - 1))] = 0
    if "head-dim" in muts:
        shapes[who][-1] = 32 if shapes[who][-1] == 16 else 16
    if "head-dim-too-large" in muts:
        for n in shapes:
            shapes[n][-1] = 264
    if "batch" in muts:
        shapes[who][0] += 1
    if "heads" in muts:
        shapes["q"][1] = 3 if shapes["k"][1] == 2 else shapes["q"][1]
    if "kv-length" in muts:
        shapes["v"][2] = shapes["v"][2] + 1

    def make(n):
        t = torch.randn(*shapes[n], generator=gen).to(dtype)
        return t

    qkv = {n: make(n) for n in ("q", "k", "v")}
    if "dtype" in muts:
        qkv[who] = qkv[who].to(draw(st.sampled_from(
            [torch.float64, torch.int32, torch.bool, torch.complex64, torch.uint8]
            + [d for d in DTYPES if d != dtype])))
    if "transposed" in muts and qkv[who].dim() == 4:   # same shape, non-contiguous layout
        qkv[who] = qkv[who].transpose(2, 3).contiguous().transpose(2, 3)
    if "strided" in muts and qkv[who].dim() == 4:      # every other row of a bigger tensor
        s = list(qkv[who].shape)
        s[2] *= 2
        qkv[who] = torch.randn(*s, generator=gen).to(qkv[who].dtype)[:, :, ::2]
    if "broadcast" in muts and qkv[who].dim() == 4:    # one row repeated by a stride of 0
        qkv[who] = qkv[who][:, :, :1].expand(qkv[who].shape)
    if "nan" in muts or "inf" in muts:
        t = qkv[who].clone()
        if t.numel() and t.is_floating_point():
            at = np.unravel_index(draw(st.integers(0, t.numel() - 1)), tuple(t.shape))
            t[tuple(int(i) for i in at)] = math.nan if "nan" in muts else -math.inf
        qkv[who] = t
    if "meta" in muts:
        qkv[who] = qkv[who].to("meta")
    if "all-meta" in muts:
        qkv = {n: t.to("meta") for n, t in qkv.items()}
    if "sparse" in muts and qkv[who].device.type != "meta":
        qkv[who] = qkv[who].to_sparse()
    if "nested" in muts and qkv[who].dim() >= 2 and qkv[who].layout == torch.strided \
            and qkv[who].device.type != "meta":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # nested tensors are a prototype
            qkv[who] = torch.nested.nested_tensor(list(qkv[who].unbind(0)))
    if "not-a-tensor" in muts:
        qkv[who] = draw(st.sampled_from([None, [1.0, 2.0], qkv[who].numpy()
                                         if qkv[who].dtype == torch.float32
                                         and qkv[who].device.type == "cpu"
                                         and qkv[who].layout == torch.strided
                                         and not qkv[who].is_nested else 3.0]))

    kw = dict(qkv)
    if draw(st.integers(0, 3)) == 0:
        kw["scale"] = draw(st.sampled_from(SCALES))
        muts.append("scale")
    if draw(st.integers(0, 2)) == 0:
        kw["q_offset"] = draw(st.sampled_from(Q_OFFSETS))
        muts.append("q_offset")
    kw["return_lse"] = draw(st.booleans())
    L = max(Lq, Lk) + 8 + (kw.get("q_offset") if isinstance(kw.get("q_offset"), int)
                           and 0 <= kw.get("q_offset", 0) <= 100 else 0)
    if name == "doc":
        kw["doc"] = torch.sort(torch.randint(0, 4, (L,), generator=gen)).values
    elif name == "blocks":
        n = L // 16 + 1
        kw["blocks"] = (torch.rand(n, n, generator=gen) < 0.4).to(torch.int32)
    if name != "window" and draw(st.integers(0, 2)) == 0:
        m = draw(st.sampled_from(INPUT_MUTATIONS))
        muts.append(f"input-{m}")
        n = "doc" if name == "doc" else "blocks"
        t = kw[n]
        if m == "missing":
            del kw[n]
        elif m == "extra":
            kw["other"] = t.clone()
        elif m == "float":
            kw[n] = t.float()
        elif m in ("uint16", "uint32", "uint64"):
            kw[n] = t.to(getattr(torch, m))
        elif m == "meta":
            kw[n] = t.to("meta")
        elif m == "rank":
            kw[n] = t[None, None, None]
        elif m == "short":
            kw[n] = t[..., :1]
        elif m == "empty":
            kw[n] = t[..., :0]
        elif m == "negative":
            kw[n] = t - 2
        elif m == "huge":      # ids beyond int32 on the torch backend only (see the note below)
            kw[n] = t * 2 ** 40 if draw(st.booleans()) else t + 2 ** 20
        elif m == "bool":
            kw[n] = t.bool()
        elif m == "non-contiguous":
            kw[n] = torch.stack([t, t], -1)[..., 0]
        else:
            kw[n] = t.tolist()
    grad = draw(st.integers(0, 3)) == 0
    return name, kw, muts, grad


def _finite(kw):
    for n in ("q", "k", "v"):
        t = kw[n]
        if not (isinstance(t, torch.Tensor) and t.layout == torch.strided
                and t.device.type == "cpu" and t.is_floating_point() and torch.isfinite(t).all()):
            return False
    s = kw.get("scale")
    return s is None or (isinstance(s, (int, float)) and not isinstance(s, bool)
                         and 1e-3 <= s <= 10)


def _check_call(backend, name, kw, grad):
    pat = spattn.compile(SOURCES[name], backend=backend)
    if grad:
        for n in ("q", "k", "v"):
            t = kw[n]
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
                kw[n] = t.detach().requires_grad_()
    try:
        out = pat(**kw)
    except SpattnError as e:
        str(e)                         # the message renders
        event(type(e).__name__)
        return "error"
    o = out[0] if kw["return_lse"] else out
    q, v = kw["q"], kw["v"]
    assert o.shape == (*q.shape[:3], v.shape[-1]) and o.dtype == q.dtype
    if kw["return_lse"]:
        assert out[1].shape == q.shape[:3] and out[1].dtype == torch.float32
    if 0 in (*q.shape[:3], *kw["k"].shape[:3]):
        # no query row, or none with a key: SDPA's answer (o 0, lse -inf), zero gradients
        event("returned empty")
        assert not o.any() and (not kw["return_lse"] or bool(torch.isneginf(out[1]).all()))
    elif _finite(kw):
        event("returned, checked against the reference")
        inputs = {n: t for n, t in kw.items() if n in ("doc", "blocks")}
        qo = kw.get("q_offset")
        qo = None if qo is None else int(qo)
        m = pat.mask(q.shape[2], kw["k"].shape[2], num_heads=q.shape[1], batch=q.shape[0],
                     q_offset=qo, **inputs)
        scale = kw.get("scale")
        ref, _ = attention_reference(q.detach().double(), kw["k"].detach().double(),
                                     v.detach().double(), m,
                                     scale=None if scale is None else float(scale))
        tol = TOL[q.dtype]
        torch.testing.assert_close(o.detach().double(), ref, atol=tol, rtol=tol)
        assert torch.isfinite(o).all()
    else:
        event("returned")
    if grad and o.requires_grad:
        o.float().sum().backward()
        for n in ("q", "k", "v"):
            assert kw[n].grad is not None and kw[n].grad.shape == kw[n].shape
    return "ok"


_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                       HealthCheck.data_too_large])


@settings(max_examples=120, **_SETTINGS)
@given(calls())
def test_torch_backend_raises_only_spattn_errors(case):
    name, kw, muts, grad = case
    _check_call("torch", name, kw, grad)


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
@settings(max_examples=30, **_SETTINGS)
@given(calls())
def test_triton_backend_raises_only_spattn_errors(case):
    """Under the interpreter, with runtime-input values of the whole int64 range (the plan
    picks 64-bit kernels where 32 bits would not be exact)."""
    name, kw, muts, grad = case
    _check_call("triton", name, kw, grad)
