"""The call path: validate arguments, choose a backend, run through autograd.

``Pattern.__call__`` lands in :func:`call`; ``spattn.attention`` in
:func:`functional_attention`.

Argument rules (each violation is a :class:`SpattnInputError` that names the
argument and its shape, or a :class:`SpattnValueError` for scalars):

* q, k, v are 4-D tensors ``[B, H, L, D]`` (the layout of
  ``scaled_dot_product_attention``); any strides, no copies are made for the
  Triton backend.
* the same B for all three; k and v have the same H and L; ``Hq % Hk == 0``
  (grouped-query / multi-query attention: query head h reads key head
  ``h // (Hq // Hk)``).
* q, k and v have the same head dim D, with ``16 <= D <= 256`` (v's head dim
  must equal q's: the kernels assume one D).
* the same device and the same dtype, one of float16, bfloat16, float32.
* ``Lq >= 1`` and ``Lk >= 1``, ``B >= 1``, ``H >= 1``.
* strided (dense) tensors with data: a meta tensor (``device="meta"``), a sparse, nested
  or otherwise non-strided layout is refused.
* ``scale``: a positive finite number of at most ``1e38`` (default ``1 / sqrt(D)``; the
  kernels scale scores in float32, so ``scale * q·k`` must also stay below float32's
  largest value, ~3.4e38, or the row is NaN).
* ``q_offset``: an int with ``|q_offset| <= 2**62`` (default ``Lk - Lq``,
  bottom-right alignment): positions ``q_offset + i`` and their differences with key
  positions stay within signed 64 bits.
* runtime inputs: exactly the pattern's inputs, integer or bool tensors with
  the declared index dims (optionally leading ``[B]`` or ``[B, H]``), long
  enough for every index the pattern uses at these lengths; strided, not on the meta
  device, and not of the unsigned dtypes uint16, uint32, uint64 (torch supports few
  operations on them: convert with ``.to(torch.int64)``).

Values are not inspected: a NaN or an infinity in q, k or v propagates.  A non-finite
query row gives a non-finite output row (that row only); a non-finite key or value
reaches every row that reads its tile, including rows for which the pattern masks
that key but not the whole tile (``0 * inf`` is NaN), and no row whose tiles skip it.

The ``SPATTN_*`` environment overrides are checked where they are read
(``codegen/config.py``); a value outside its allowed set is a
:class:`SpattnConfigError` that names the variable and the values it takes.

Backend choice (``Pattern.backend``): ``"torch"`` always runs the block-sparse
torch backend; ``"triton"`` runs the generated kernels on CUDA tensors, or on
CPU tensors when ``TRITON_INTERPRET=1`` (otherwise :class:`SpattnBackendError`);
``"auto"`` picks triton for CUDA tensors and torch for CPU tensors (triton on
the CPU under ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import math
import numbers
from collections import OrderedDict

import torch

from ..codegen.config import FLAG_OFF, FLAG_ON, getenv
from ..dsl.errors import (MAX_INT, SpattnBackendError, SpattnConfigError, SpattnError,
                          SpattnInputError, SpattnParamError, SpattnValueError, short_repr)
from ..ir.evaluate import query_offset as _query_offset
from . import autograd as _ag
from .inputs import validate_inputs

__all__ = ["call", "functional_attention", "choose_backend", "validate"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
_COMPILE_CACHE_SIZE = 128


def _shape(t) -> str:
    return str(tuple(t.shape))


def _layout(t) -> str:
    return "a nested tensor" if t.is_nested else f"layout {t.layout}"


def validate(q, k, v) -> None:
    """Check q, k, v (rank, batch, heads, head dim, device, dtype); raise SpattnInputError."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise SpattnInputError(f"{name} must be a torch.Tensor [B, H, L, D], "
                                   f"got {type(t).__name__}")
        if t.layout is not torch.strided or t.is_nested:
            raise SpattnInputError(f"{name} must be a dense (strided) tensor, got "
                                   f"{_layout(t)} (convert it with .to_dense())")
        if t.dim() != 4:
            raise SpattnInputError(f"{name} must be a 4-D tensor [B, H, L, D], got shape "
                                   f"{_shape(t)} ({t.dim()}-D)")
        if t.is_meta:
            raise SpattnInputError(f"{name} (shape {_shape(t)}) is a meta tensor, which has no "
                                   "data: spattn computes attention on real tensors (move q, k "
                                   "and v to 'cpu' or 'cuda')")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[0] < 1 or t.shape[1] < 1 or t.shape[2] < 1:
            raise SpattnInputError(f"{name} has shape {_shape(t)}: B, H and L must be >= 1")
    B, Hq, Lq, D = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != B:
            raise SpattnInputError(f"{name} has batch size {t.shape[0]} (shape {_shape(t)}) but "
                                   f"q has {B} (shape {_shape(q)})")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise SpattnInputError(f"k and v must have the same number of heads and length: k has "
                               f"shape {_shape(k)}, v has shape {_shape(v)}")
    Hk = k.shape[1]
    if Hq % Hk != 0:
        raise SpattnInputError(f"the number of query heads must be a multiple of the number of "
                               f"key/value heads: q has {Hq} heads (shape {_shape(q)}), k has "
                               f"{Hk} (shape {_shape(k)})")
    if k.shape[3] != D:
        raise SpattnInputError(f"q and k must have the same head dim: q has shape {_shape(q)}, "
                               f"k has shape {_shape(k)}")
    if v.shape[3] != D:
        raise SpattnInputError(f"v must have the same head dim as q (the kernels assume one D): "
                               f"q has shape {_shape(q)}, v has shape {_shape(v)}")
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise SpattnInputError(f"head dim D must be in {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, got {D} "
                               f"(q has shape {_shape(q)})")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise SpattnInputError(f"{name} (shape {_shape(t)}) is on {t.device} but q "
                                   f"(shape {_shape(q)}) is on {q.device}")
    if q.dtype not in DTYPES:
        raise SpattnInputError(f"q (shape {_shape(q)}) has dtype {q.dtype}; supported dtypes are "
                               "float16, bfloat16 and float32")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise SpattnInputError(f"{name} (shape {_shape(t)}) has dtype {t.dtype} but q "
                                   f"(shape {_shape(q)}) has {q.dtype}; all three must match")


#: Largest scale: the kernels multiply scores by ``scale * log2(e)`` in float32.
MAX_SCALE = 1e38


def _check_scale(scale, D) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and not torch.compiler.is_compiling():
        scale = scale.item()
    if isinstance(scale, (bool, torch.Tensor)) or not isinstance(scale, numbers.Real):
        raise SpattnValueError(f"scale must be a positive finite number, got "
                               f"{type(scale).__name__} {short_repr(scale)}")
    try:
        value = float(scale)
    except OverflowError:       # an int beyond float's range
        value = math.inf
    if not (math.isfinite(value) and 0 < value <= MAX_SCALE):
        raise SpattnValueError(f"scale must be a positive finite number of at most 1e38 (the "
                               f"kernels scale scores in float32), got {short_repr(scale)}")
    return value


def check_q_offset(q_offset, Lq, Lk):
    """``q_offset`` as an int (``Lk - Lq`` when None); SpattnValueError unless it is an integer
    with ``|q_offset| <= 2**62`` (a SymInt while tracing is passed through)."""
    if q_offset is None:
        return _query_offset(Lq, Lk, None)
    if isinstance(q_offset, torch.SymInt):
        return q_offset
    if isinstance(q_offset, bool) or not isinstance(q_offset, int):
        if (hasattr(q_offset, "__index__") and not isinstance(q_offset, (bool, torch.Tensor))
                and type(q_offset).__name__ != "bool_"):
            q_offset = int(q_offset.__index__())   # numpy integers
        else:
            raise SpattnValueError(f"q_offset must be an int (the position of query row 0), "
                                   f"got {type(q_offset).__name__} {short_repr(q_offset)}")
    if abs(q_offset) > MAX_INT:
        raise SpattnValueError(f"q_offset is {short_repr(q_offset)}: it must be an integer with "
                               f"|q_offset| <= 2**62 = {MAX_INT} (positions are 64-bit "
                               "integers)")
    return q_offset


#: Unsigned dtypes torch has few operations for (uint8 is fully supported).
_UNSIGNED = tuple(d for d in (getattr(torch, n, None) for n in ("uint16", "uint32", "uint64"))
                  if d is not None)


def check_runtime_tensors(inputs: dict) -> None:
    """What :func:`~spattn.ir.evaluate.validate_inputs` cannot say clearly about runtime
    input tensors: sparse or nested layouts, meta tensors (no data) and unsigned 16/32/64-bit
    dtypes."""
    for name, t in inputs.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.layout is not torch.strided or t.is_nested:
            raise SpattnInputError(f"runtime input {name!r} must be a dense (strided) tensor, "
                                   f"got {_layout(t)} (convert it with .to_dense())")
        if t.is_meta:
            raise SpattnInputError(f"runtime input {name!r} (shape {tuple(t.shape)}) is a meta "
                                   "tensor, which has no data: pass it on 'cpu' or 'cuda'")
        if t.dtype in _UNSIGNED:
            raise SpattnInputError(f"runtime input {name!r} (shape {tuple(t.shape)}) has dtype "
                                   f"{t.dtype}, an unsigned type torch has few operations for: "
                                   f"convert it with {name}.to(torch.int64) (or int32)")


#: ``SPATTN_*`` settings checked outside ``codegen.config``: the values they take, in words.
_ENV_VALUES = {"SPATTN_TMA": (FLAG_ON + FLAG_OFF + ("auto",),
                              "1, 0 or auto (or true/false, on/off, yes/no)")}


def environment_error() -> SpattnConfigError | None:
    """A :class:`SpattnConfigError` for a ``SPATTN_*`` setting of :data:`_ENV_VALUES`
    outside its allowed values (None if there is none); consulted only when a call fails
    with a ValueError, so the per-call path pays nothing for it."""
    for name, (allowed, words) in _ENV_VALUES.items():
        v = getenv(name)
        if v and v.strip().lower() not in allowed:
            return SpattnConfigError(f"{name}={v!r}: expected {words}, or unset it")
    return None


def _run(pattern, backend, scale, q_offset, ins, q, k, v):
    try:
        return _ag.AttentionFunction.apply(pattern, backend, scale, q_offset, ins, q, k, v)
    except ValueError as e:
        if isinstance(e, SpattnError):
            raise
        bad = environment_error()
        if bad is None:
            raise
        raise bad from None


def _interpret() -> bool:
    return getenv("TRITON_INTERPRET") == "1"


def choose_backend(requested: str, device_type: str) -> str:
    """``"torch"`` or ``"triton"`` for tensors on ``device_type`` (raises SpattnBackendError)."""
    if requested == "torch":
        return "torch"
    if requested == "auto":
        return "triton" if device_type == "cuda" or _interpret() else "torch"
    if requested == "triton":
        if device_type == "cuda" or _interpret():
            return "triton"
        raise SpattnBackendError(
            f"backend 'triton' needs CUDA tensors, but the tensors are on {device_type!r}; "
            "set TRITON_INTERPRET=1 to run the generated kernels on the CPU through Triton's "
            "interpreter (slow), or compile with backend='torch' (or 'auto')")
    raise SpattnBackendError(f"unknown backend {requested!r}: expected 'auto', 'triton' or 'torch'")


@torch.compiler.assume_constant_result
def _backend_for(requested: str, device_type: str) -> str:
    return choose_backend(requested, device_type)


def call(pattern, q, k, v, *, scale=None, return_lse=False, q_offset=None, inputs=None):
    """Attention of ``pattern``: ``o [B, Hq, Lq, D]`` (and ``lse [B, Hq, Lq]`` fp32)."""
    if torch.compiler.is_compiling():
        # The op carries the canonical source (a str attribute: a constant while tracing).
        return _call_op(pattern.source, pattern.inputs, pattern.backend, q, k, v, scale=scale,
                        return_lse=return_lse, q_offset=q_offset, inputs=inputs)
    validate(q, k, v)
    B, Hq, Lq, D = q.shape
    scale = _check_scale(scale, D)
    q_offset = check_q_offset(q_offset, Lq, k.shape[2])
    inputs = dict(inputs or {})
    check_runtime_tensors(inputs)
    ins = validate_inputs(pattern.inputs, inputs, batch=B, num_heads=Hq, device=q.device)
    backend = choose_backend(pattern.backend, q.device.type)
    _ag.register(pattern)
    o, lse = _run(pattern, backend, scale, q_offset, ins, q, k, v)
    return (o, lse) if return_lse else o


def _call_op(key, declared, requested_backend, q, k, v, *, scale, return_lse, q_offset, inputs):
    """The traced path (under ``torch.compile``): the same checks, then the custom op."""
    validate(q, k, v)
    B, Hq, Lq, D = q.shape
    scale = _check_scale(scale, D)
    q_offset = check_q_offset(q_offset, Lq, k.shape[2])
    inputs = dict(inputs or {})
    check_runtime_tensors(inputs)
    ins = validate_inputs(declared, inputs, batch=B, num_heads=Hq, device=q.device)
    backend = _backend_for(requested_backend, q.device.type)
    o, lse = _ag.attention_op(q, k, v, [ins[n] for n in sorted(ins)], key, scale, q_offset,
                              backend)
    return (o, lse) if return_lse else o


# ------------------------------------------------------------ functional form

_compiled: "OrderedDict[tuple, object]" = OrderedDict()


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(x) for x in value)
    return value


def compile_cached(src: str, backend: str = "auto", **params):
    """``spattn.compile(src, backend=backend, **params)`` through an LRU cache."""
    from spattn import compile as _compile
    try:
        key = (src, backend, tuple(sorted((n, _freeze(v)) for n, v in params.items())))
        hash(key)
    except TypeError:
        return _compile(src, backend=backend, **params)
    hit = _compiled.get(key)
    if hit is not None:
        _compiled.move_to_end(key)
        return hit
    pat = _compile(src, backend=backend, **params)
    _compiled[key] = pat
    if len(_compiled) > _COMPILE_CACHE_SIZE:
        _compiled.popitem(last=False)
    return pat


def _resolve(pattern, kwargs):
    from spattn.pattern import Pattern
    backend = kwargs.pop("backend", None)
    inputs = {n: t for n, t in kwargs.items() if isinstance(t, torch.Tensor)}
    params = {n: x for n, x in kwargs.items() if not isinstance(x, torch.Tensor)}
    if isinstance(pattern, Pattern):
        if params:
            raise SpattnParamError(
                f"params {', '.join(map(repr, sorted(params)))} cannot be bound on an already "
                "compiled Pattern: pass the pattern source as a str, or bind them in "
                "spattn.compile()")
        if backend is not None and backend != pattern.backend:
            pattern = Pattern(pattern.ir, name=pattern.name, params=pattern.params,
                              inputs=pattern.inputs, backend=backend)
        return pattern, inputs
    if not isinstance(pattern, str):
        raise SpattnParamError(f"pattern must be a str or a spattn.Pattern, got "
                               f"{type(pattern).__name__}")
    return compile_cached(pattern, backend or "auto", **params), inputs


def _functional_meta(src: str, backend: str, params: tuple) -> tuple:
    """Compile (cached) and register; ``(key, ((input, ndims), ...), backend)``: constants."""
    pat = compile_cached(src, backend, **dict(params))
    return _ag.register(pat), tuple(sorted(pat.inputs.items())), pat.backend


_functional_meta_const = torch.compiler.assume_constant_result(_functional_meta)


def functional_attention(q, k, v, *, pattern, scale=None, return_lse=False, q_offset=None,
                         **kwargs):
    """``spattn.attention``: compile (cached) and call.

    Keyword arguments whose value is a ``torch.Tensor`` are runtime inputs; the
    others bind params (``backend=`` picks the backend).
    """
    if torch.compiler.is_compiling() and isinstance(pattern, str):
        # Parsing is not traceable: the compiled pattern enters the graph as constants.
        backend = kwargs.pop("backend", None) or "auto"
        inputs = {n: t for n, t in kwargs.items() if isinstance(t, torch.Tensor)}
        params = tuple(sorted((n, _freeze(x)) for n, x in kwargs.items()
                              if not isinstance(x, torch.Tensor)))
        key, declared, requested = _functional_meta_const(pattern, backend, params)
        return _call_op(key, dict(declared), requested, q, k, v, scale=scale,
                        return_lse=return_lse, q_offset=q_offset, inputs=inputs)
    pat, inputs = _resolve(pattern, dict(kwargs))
    return call(pat, q, k, v, scale=scale, return_lse=return_lse, q_offset=q_offset,
                inputs=inputs)
