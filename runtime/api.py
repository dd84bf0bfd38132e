"""The call path: validate arguments, choose a backend, find or build the plan, run it
through autograd.

``Pattern.__call__`` lands in :func:`call`, ``Pattern.plan`` in :func:`make_plan`;
``spattn.attention`` (``spattn/functional.py``) in :func:`call` or, under
``torch.compile``, :func:`call_op`. A call with ``plan=`` skips the validation: it only
checks that the tensors are laid out as the plan's (:meth:`~spattn.runtime.plan.Plan.check`).
A call without one whose arguments match its pattern's last call (:func:`_signature`)
skips the validation and the plan lookup too, and runs that call's plan.

Argument rules (each violation is a :class:`SpattnInputError` that names the
argument and its shape, or a :class:`SpattnValueError` for scalars):

* q, k, v are 4-D tensors ``[B, H, L, D]`` (the layout of
  ``scaled_dot_product_attention``); any strides, no copies are made for the
  Triton backend. ``layout="bshd"`` takes ``[B, L, H, D]`` tensors (transposed views) and
  returns the output likewise; keywords of other attention APIs (``is_causal``,
  ``attn_mask``, ...) are errors that say what to write instead (``runtime/usage.py``).
* the same B for all three; k and v have the same H and L; ``Hq % Hk == 0``
  (grouped-query / multi-query attention: query head h reads key head
  ``h // (Hq // Hk)``).
* q and k have the same head dim D, with ``16 <= D <= 256`` for the kernels (any
  ``D >= 1`` on the torch backend); v's may differ (a call
  then pads the narrower of q/k and v with zeros to the wider and slices the output to
  v's: :func:`call_value_dim`; plans and decode steps take one D).
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
reaches every row that computes with it, including rows for which the pattern masks
that key (``0 * inf`` is NaN): on Triton the rows whose tiles hold the key, on the torch
backend the rows of the band that holds it; never a row whose tiles skip it, nor another
head.

The ``SPATTN_*`` environment settings are read and checked in one place
(``runtime/settings.py``); a value outside its allowed set is a
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

import torch
import torch.nn.functional as F

from ..dsl.errors import (MAX_INT, SpattnBackendError, SpattnInputError, SpattnParamError,
                          SpattnValueError, is_bool, short_repr)
from ..ir.evaluate import query_offset as _query_offset
from . import autograd as _ag
from . import decode as _decode
from . import usage as _usage
from .plan import PLANS, Plan, build_plan, permutation
from . import settings as _settings
from . import tune as _tune
from .settings import getenv, interpreting as _interpreting
from ..ir.inputs import check_names, validate_inputs

__all__ = ["call", "call_op", "make_plan", "choose_backend", "validate", "check_order"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def _shape(t) -> str:
    return str(tuple(t.shape))


def _layout(t) -> str:
    return "a nested tensor" if t.is_nested else f"layout {t.layout}"


_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def wrapped(t) -> bool:
    """Whether ``t`` is a torch.func transform's tensor (vmap's batched tensor, grad's
    tracking tensor): ~0.1 us. False under ``torch.compile``, which cannot trace the check
    (and traces the custom ops, not the kernels, with its own fake tensors)."""
    return not torch.compiler.is_compiling() and _is_functorch_wrapped(t)


def refuse_wrapped(name: str, t) -> None:
    """A SpattnInputError naming ``name`` when ``t`` is a torch.func transform's tensor where
    spattn does not take one: a pattern's call does (:mod:`~spattn.runtime.transforms`);
    ``pat.decode``, ``pat.plan``, an empty call and ``order=`` do not (a bare ``data_ptr``
    error would come from deep inside a plan)."""
    if isinstance(t, torch.Tensor) and wrapped(t):
        raise SpattnInputError(
            f"{name} (shape {_shape(t)}) is a tensor of a torch.func transform (vmap, grad, "
            "jacrev, functional_call under grad): a pattern's call takes them (pat(q, k, v) "
            "under the transform), but pat.decode, pat.plan, an empty call (B, H or L of 0) "
            "and order= read plain tensors' memory. Call the pattern under the transform, or "
            "fold the extra batch dimension into B ([N, B, H, L, D] -> [N * B, H, L, D], "
            "per-batch inputs likewise) outside it")


def transformed(q, k, v, inputs) -> bool:
    """Whether q, k, v or a runtime input is a torch.func transform's tensor (a call that
    :mod:`~spattn.runtime.transforms` runs). Not while torch.compile traces."""
    T, w = _TENSOR, _is_functorch_wrapped
    if (isinstance(q, T) and w(q)) or (isinstance(k, T) and w(k)) or (isinstance(v, T) and w(v)):
        return True
    return bool(inputs) and any(isinstance(t, T) and w(t) for t in inputs.values())


def _valid(q, k, v) -> bool:
    """Whether q, k, v pass every check of :func:`validate`: the accepting path of a call
    (attribute reads and int comparisons, no tensor operation); validate says what is wrong."""
    T, S = torch.Tensor, torch.strided
    if not (isinstance(q, T) and isinstance(k, T) and isinstance(v, T)) or q.layout is not S \
            or k.layout is not S or v.layout is not S or q.is_nested or k.is_nested \
            or v.is_nested:
        return False
    qs, ks = q.shape, k.shape
    if len(qs) != 4 or len(ks) != 4 or ks != v.shape:
        return False
    B, Hq, Lq, D = qs
    if min(B, Hq, Lq, ks[1], ks[2]) < 1 or ks[0] != B or ks[3] != D or Hq % ks[1] \
            or not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        return False
    dt = q.dtype
    if not (dt in DTYPES and k.dtype == dt and v.dtype == dt):
        return False
    if not torch.compiler.is_compiling() and (
            _is_functorch_wrapped(q) or _is_functorch_wrapped(k) or _is_functorch_wrapped(v)):
        return False
    if q.is_cpu:                # no device objects on the common path (they cost more)
        return k.is_cpu and v.is_cpu
    dev = q.device
    return dev.type != "meta" and k.device == dev and v.device == dev


def check_dtype(q, float64: bool | None) -> None:
    """Refuse q's dtype unless the kernels take it (or, ``float64`` True, it is float64);
    ``float64`` as for :func:`validate`, which says where a float64 call runs instead."""
    if q.dtype not in DTYPES and not (float64 and q.dtype == torch.float64):
        hint = ""
        if q.dtype == torch.float64 and float64 is False:
            hint = f" (and float64 on the torch backend: {_torch_hint()})"
        elif q.dtype == torch.float64:
            hint = (" for decode; call the pattern, pat(q, k, v), which runs float64 on the "
                    "torch backend")
        raise SpattnInputError(f"q (shape {_shape(q)}) has dtype {q.dtype}; supported dtypes are "
                               f"float16, bfloat16 and float32{hint}")


def validate(q, k, v, *, empty: bool = False, float64: bool | None = False,
             transformed: bool = False, value_dim: bool = False) -> None:
    """Check q, k, v (rank, batch, heads, head dim, device, dtype); raise SpattnInputError.
    ``empty``: B, H and L may be 0 (:func:`empty_call`), else each must be at least 1.
    ``float64``: True, a call the torch backend runs (:func:`f64_ok`): float64 is accepted
    too, and any head dim from 1 (the kernels' 16..256 bound their tiles; the torch
    backend's SDPA calls take any); False, refused with a pointer to the torch backend;
    None (decode, which takes none), refused. ``transformed``: q, k, v may be a
    torch.func transform's tensors (:mod:`~spattn.runtime.transforms`), checked by their
    logical shapes.
    ``value_dim``: v's head dim may differ from q's, and is checked against the limits of
    a head dim too (:func:`pad_value_dim`)."""
    if not empty and _valid(q, k, v):
        return
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
        if not transformed:
            refuse_wrapped(name, t)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not empty and (t.shape[0] < 1 or t.shape[1] < 1 or t.shape[2] < 1):
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
    if (Hq % Hk != 0) if Hk else Hq != 0:
        raise SpattnInputError(f"the number of query heads must be a multiple of the number of "
                               f"key/value heads: q has {Hq} heads (shape {_shape(q)}), k has "
                               f"{Hk} (shape {_shape(k)})")
    if k.shape[3] != D:
        raise SpattnInputError(f"q and k must have the same head dim: q has shape {_shape(q)}, "
                               f"k has shape {_shape(k)}")
    lo, hi = (1, None) if float64 is True else (MIN_HEAD_DIM, MAX_HEAD_DIM)
    if value_dim and not lo <= v.shape[3] <= (hi or v.shape[3]):
        raise SpattnInputError(f"head dim of v must be in {_dims(lo, hi)}, got {v.shape[3]} "
                               f"(v has shape {_shape(v)}){_wide_hint(v.shape[3], hi)}")
    if v.shape[3] != D and not value_dim:
        raise SpattnInputError(f"v must have the same head dim as q here (the kernels assume one "
                               f"D; a call pat(q, k, v) pads the narrower to the wider): q has "
                               f"shape {_shape(q)}, v has shape {_shape(v)}")
    if not lo <= D <= (hi or D):
        raise SpattnInputError(f"head dim D must be in {_dims(lo, hi)}, got {D} "
                               f"(q has shape {_shape(q)}){_wide_hint(D, hi)}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise SpattnInputError(f"{name} (shape {_shape(t)}) is on {t.device} but q "
                                   f"(shape {_shape(q)}) is on {q.device}")
    check_dtype(q, float64)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise SpattnInputError(f"{name} (shape {_shape(t)}) has dtype {t.dtype} but q "
                                   f"(shape {_shape(q)}) has {q.dtype}; all three must match")


def _dims(lo: int, hi: int | None) -> str:
    return f"{lo}..{hi}" if hi else f"{lo} or more"


def _wide_hint(D: int, hi: int | None) -> str:
    if hi and not MIN_HEAD_DIM <= D <= hi:
        return f" for the Triton kernels; the torch backend takes any head dim ({_torch_hint()})"
    return ""


def _torch_hint() -> str:
    """How a call gets the torch backend (under ``TRITON_INTERPRET=1``, 'auto' on the CPU
    runs the Triton kernels)."""
    return "backend='torch'" if _interpret() else "backend='torch', or 'auto' on the CPU"


#: Largest scale: the kernels multiply scores by ``scale * log2(e)`` in float32.
MAX_SCALE = 1e38


def _check_scale(scale, D) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and not torch.compiler.is_compiling():
        if _is_functorch_wrapped(scale) and not (scale.requires_grad and torch.is_grad_enabled()):
            raise SpattnValueError(
                "scale is a tensor of a torch.func transform (mapped by vmap): spattn takes "
                "the scale as a number; for a scale per sample use a score, compile(..., "
                "score='s * temp[b]') with temp [B] passed as temp=... (mapped like q)")
        if scale.requires_grad and torch.is_grad_enabled():
            raise SpattnValueError(
                "scale is a tensor that requires grad, but spattn takes the scale as a number "
                "and no gradient would reach it: for a learnable temperature use a score, "
                "compile(..., score='s * temp[h]') with temp a learnable table [H] passed "
                "as temp=...")
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


def as_int(v):
    """``v`` as an int when it is a numpy integer (anything with ``__index__`` but a bool, a
    numpy bool or a tensor); anything else as it is, for the checks to name."""
    if isinstance(v, (int, torch.Tensor)) or not hasattr(v, "__index__") or is_bool(v):
        return v
    return int(v.__index__())


def check_q_offset(q_offset, Lq, Lk):
    """``q_offset`` as an int (``Lk - Lq`` when None); SpattnValueError unless it is an integer
    with ``|q_offset| <= 2**62`` (a SymInt while tracing is passed through)."""
    if q_offset is None:
        return _query_offset(Lq, Lk, None)
    if isinstance(q_offset, torch.SymInt):
        return q_offset
    q_offset = as_int(q_offset)
    if isinstance(q_offset, bool) or not isinstance(q_offset, int):
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


def check_runtime_tensors(inputs: dict, *, transformed: bool = False) -> None:
    """What :func:`~spattn.ir.evaluate.validate_inputs` cannot say clearly about runtime
    input tensors: sparse or nested layouts, meta tensors (no data), unsigned 16/32/64-bit
    dtypes, and a torch.func transform's tensors unless ``transformed``."""
    for name, t in inputs.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.layout is not torch.strided or t.is_nested:
            raise SpattnInputError(f"runtime input {name!r} must be a dense (strided) tensor, "
                                   f"got {_layout(t)} (convert it with .to_dense())")
        if t.is_meta:
            raise SpattnInputError(f"runtime input {name!r} (shape {tuple(t.shape)}) is a meta "
                                   "tensor, which has no data: pass it on 'cpu' or 'cuda'")
        if not transformed:
            refuse_wrapped(f"runtime input {name!r}", t)
        if t.dtype in _UNSIGNED:
            raise SpattnInputError(f"runtime input {name!r} (shape {tuple(t.shape)}) has dtype "
                                   f"{t.dtype}, an unsigned type torch has few operations for: "
                                   f"convert it with {name}.to(torch.int64) (or int32)")


def _interpret() -> bool:
    return _interpreting(getenv("TRITON_INTERPRET"))


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


def check_grid(pattern, Lq, Lk: int, what: str = "q and k") -> None:
    """SpattnInputError unless ``Lq`` and ``Lk`` are the cell count of the pattern's grid
    (patterns declared on a grid: ``spattn.neighborhood``); ``Lq=None``: the keys only (an
    analysis of some query rows, placed by ``q_offset``)."""
    grid = getattr(pattern, "grid", None)
    if grid is None:
        return
    extra = getattr(pattern, "grid_offset", 0)
    tail = getattr(pattern, "grid_suffix", 0)
    n = math.prod(grid) + extra + tail
    if (Lq is not None and Lq != n) or Lk != n:
        lengths = f"Lk={Lk}" if Lq is None else f"lengths Lq={Lq}, Lk={Lk}"
        around = " and".join(([f" after {extra}"] if extra else [])
                             + ([f" before {tail}"] if tail else []))
        grid_text = (f"{tuple(grid)}{around} extra tokens, {n} tokens in all" if around
                     else f"{tuple(grid)} of {n} tokens")
        must = "the extra tokens and the grid's cells" if around else "the grid's product"
        raise SpattnInputError(f"the pattern is defined on the grid {grid_text}, but {what} "
                               f"have {lengths}: {must} must equal the sequence length")


def check_order(order, q, k, q_offset) -> torch.Tensor:
    """A caller's token order (``order=``: slot ``i`` holds token ``order[i]``, or of batch
    element ``b`` token ``order[b, i]``) as an int64 ``[L]`` or ``[B, L]`` tensor on q's
    device; SpattnInputError naming ``order`` unless it is an integer tensor on q's device
    whose rows are permutations of ``0 .. L-1`` for a self-attention call (``Lq = Lk = L``,
    ``q_offset`` 0)."""
    _order_tensor(order)
    _order_fits(order, q, k, q_offset)
    return permutation(order, q.shape[2])


def _order_tensor(order) -> None:
    """What ``order`` must be whatever the call: a dense 1-D or 2-D integer tensor."""
    if not isinstance(order, torch.Tensor):
        raise SpattnInputError(f"order must be an integer torch.Tensor [L] or [B, L] (a "
                               f"permutation of 0..L-1: the token in each slot), got "
                               f"{type(order).__name__} {short_repr(order)}")
    if order.layout is not torch.strided or order.is_nested or order.is_meta:
        raise SpattnInputError(f"order must be a dense tensor with data, got "
                               f"{'a meta tensor' if order.is_meta else _layout(order)}")
    refuse_wrapped("order", order)
    if order.dtype is torch.bool or order.is_floating_point() or order.is_complex() \
            or order.dtype in _UNSIGNED:
        raise SpattnInputError(f"order (shape {_shape(order)}) has dtype {order.dtype}: it "
                               "must be an integer tensor (int64, int32, int16, int8 or "
                               "uint8)")
    if order.dim() not in (1, 2):
        raise SpattnInputError(f"order must be [L] (one order for every batch element and "
                               f"head) or [B, L] (one per batch element), got shape "
                               f"{_shape(order)}")


def _order_fits(order, q, k, q_offset) -> None:
    """What ``order`` must be for this call: self-attention at q_offset 0, one slot per
    token, on q's device (the errors that a transposed q, k, v can cause)."""
    Lq, Lk = q.shape[2], k.shape[2]
    if Lq != Lk:
        raise SpattnInputError(f"order= is for self-attention: q (shape {_shape(q)}) and k "
                               f"(shape {_shape(k)}) must have the same length, got Lq={Lq}, "
                               f"Lk={Lk}")
    if q_offset is not None and q_offset != 0:
        raise SpattnInputError(f"order= is for self-attention with q_offset 0 (query slot i "
                               f"and key slot i hold the same token), got q_offset={q_offset}")
    if order.shape[-1] != Lq:
        what = "entries" if order.dim() == 1 else "slots per row"
        raise SpattnInputError(f"order has {order.shape[-1]} {what} (shape {_shape(order)}) "
                               f"but q (shape {_shape(q)}) and k have L={Lq} tokens: it must "
                               "be a permutation of 0..L-1")
    if order.dim() == 2 and order.shape[0] not in (1, q.shape[0]):
        raise SpattnInputError(f"order (shape {_shape(order)}) has {order.shape[0]} rows but "
                               f"q (shape {_shape(q)}) has B={q.shape[0]} batch elements: "
                               "give one order per batch element, or one row for all")
    if order.device != q.device:
        raise SpattnInputError(f"order (shape {_shape(order)}) is on {order.device} but q "
                               f"(shape {_shape(q)}) is on {q.device}")


def f64_ok(pattern, q) -> bool:
    """Whether a call of ``pattern`` on q's device runs on the torch backend, which computes
    float64 inputs in float64 (the kernels take 16- and 32-bit floats)."""
    if not isinstance(q, torch.Tensor):
        return False
    try:
        return choose_backend(pattern.backend, q.device.type) == "torch"
    except SpattnBackendError:
        return False


def _arguments(pattern, q, k, v, scale, q_offset, inputs, layout=None, *,
               transformed: bool = False):
    """The checked ``(scale, q_offset, inputs)`` of a call (inputs as given: the plan
    converts them once); tensors given without ``layout`` that read as more heads than
    any model has warn (:func:`~spattn.runtime.usage.warn_if_transposed`). ``transformed``:
    q, k, v and the inputs may be a torch.func transform's tensors, checked by their
    logical shapes (:mod:`~spattn.runtime.transforms`)."""
    validate(q, k, v, float64=f64_ok(pattern, q), transformed=transformed)
    check_grid(pattern, q.shape[2], k.shape[2], f"q (shape {_shape(q)}) and k (shape "
                                                 f"{_shape(k)})")
    B, Hq, Lq, D = q.shape
    if layout is None and Hq > _usage.MAX_HEADS:
        _usage.warn_if_transposed(q)
    scale = _check_scale(scale, D)
    q_offset = check_q_offset(q_offset, Lq, k.shape[2])
    inputs = dict(inputs or {})
    check_runtime_tensors(inputs, transformed=transformed)
    ins = validate_inputs(pattern.inputs, inputs, batch=B, num_heads=Hq, device=q.device,
                          convert=_as_given)
    return scale, q_offset, ins


def _checked(pattern, q, k, v, scale, q_offset, inputs, layout, order):
    """``(scale, q_offset, inputs, order, backend)`` of an unscored call or plan, checked
    (:func:`_arguments`; the order as a tensor that fits the call: its values are checked
    where its plan is built, :func:`~spattn.runtime.plan.permutation`); a refusal that a
    transposed q, k, v could cause carries the layout hint."""
    if order is not None:       # the order's own faults: no layout of q, k, v cures them
        _order_tensor(order)
    try:
        scale, offset, ins = _arguments(pattern, q, k, v, scale, q_offset, inputs, layout)
        if order is not None:
            _order_fits(order, q, k, q_offset)
    except SpattnInputError as e:
        def retry(q, k, v):
            _arguments(pattern, q, k, v, scale, q_offset, inputs, layout)
            if order is not None:
                _order_fits(order, q, k, q_offset)
        raise _usage.with_layout_hint(e, layout, q, k, v, retry) from None
    return scale, offset, ins, order, choose_backend(pattern.backend, q.device.type)


def _as_given(t, device, dtype):
    return t


def other_device(q) -> int | None:
    """The index of q's CUDA device where it is not the current device, else None.

    Triton launches a kernel on the current device, whatever device its tensors are on,
    so a call on tensors of another GPU (a model spread over GPUs, as HF's
    ``device_map="auto"`` places layers) enters ``torch.cuda.device(index)`` first; without
    that the kernels would run on the wrong GPU's stream. Cheap enough for every call: an
    attribute read on the CPU, one current-device query on CUDA. None while torch.compile
    traces (the compiled graph enters the device of its tensors itself)."""
    if isinstance(q, torch.Tensor) and q.is_cuda and not torch.compiler.is_compiling():
        index = q.get_device()
        if index != torch.cuda.current_device():
            return index
    return None


def make_plan(pattern, q, k, v, *, scale=None, q_offset=None, inputs=None, backward=None,
              layout=None, order=None, **options):
    """``Pattern.plan``: a new :class:`~spattn.runtime.plan.Plan` for these tensors.

    ``backward``: build the backward's stage now (True), not until the first backward
    (False), or when q, k, v or a score's table requires grad (None, the default).
    ``options``: the launcher options of :mod:`spattn.runtime.triton_backend` (tests,
    tuning experiments), and ``layout_gather`` ("auto", "copy", "kernel" or "box": how a layout's
    or an order's tokens reach the Triton kernels, default ``SPATTN_LAYOUT_GATHER``;
    docs/layouts.md).
    ``layout``: of q, k, v (:mod:`spattn.runtime.usage`); the plan keeps it as
    ``plan.tensor_layout`` and calls with it take tensors in that layout. ``order``: a
    token order (:func:`check_order`): the plan is an :class:`~spattn.runtime.plan.
    OrderedPlan` (docs/layouts.md).
    """
    index = other_device(q)
    if index is not None:
        with torch.cuda.device(index):
            return make_plan(pattern, q, k, v, scale=scale, q_offset=q_offset, inputs=inputs,
                             backward=backward, layout=layout, order=order, **options)
    if backward is not None and not isinstance(backward, bool):
        raise SpattnParamError(f"backward must be True, False or None, got "
                               f"{type(backward).__name__} {short_repr(backward)}")
    scored = getattr(pattern, "score", None) is not None
    if inputs:
        _usage.check_keywords({**pattern.inputs, **getattr(pattern, "score_inputs", {})},
                              inputs)
    q, k, v = _usage.to_bhsd(layout, q, k, v)
    if scored:      # the tables' shapes are the plan's; each call passes its tables
        if order is not None:
            _check_order_call(pattern, None)
        from . import scores
        try:
            plan = scores.make_plan(pattern, q, k, v, scale=scale, q_offset=q_offset,
                                    inputs=inputs, options=options)
        except SpattnInputError as e:
            def retry(q, k, v):
                scores._arguments(pattern, q, k, v, scale, q_offset, inputs)
            raise _usage.with_layout_hint(e, layout, q, k, v, retry) from None
    else:
        scale, q_offset, ins, order, backend = _checked(pattern, q, k, v, scale, q_offset,
                                                        inputs, layout, order)
        plan = build_plan(pattern, backend, q, k, v, scale=scale, q_offset=q_offset,
                          inputs=ins, options=options, order=order)
    learnable = scored and any(isinstance(t, torch.Tensor) and t.requires_grad
                               for n, t in (inputs or {}).items() if n in pattern.score_inputs)
    if backward or (backward is None and (learnable or any(t.requires_grad
                                                          for t in (q, k, v)))):
        plan.prepare_backward(q, k, v)
    plan.tensor_layout = layout
    return plan


def _check_plan(plan, pattern, q, k, v, scale, q_offset, inputs) -> None:
    if not isinstance(plan, Plan):
        raise SpattnParamError(f"plan= takes a plan made by pat.plan(q, k, v, ...), got "
                               f"{type(plan).__name__}")
    origin = getattr(plan, "origin", plan.pattern)     # a composed score's plan: its caller's
    if origin is not pattern and origin.source != pattern.source:
        raise SpattnParamError(f"the plan is for the pattern {origin.source!r}, not "
                               f"{pattern.source!r}")
    if inputs:
        held = plan.call.inputs
        raise SpattnParamError(f"runtime inputs {', '.join(map(repr, sorted(inputs)))} were "
                               f"given with plan=: the plan holds its inputs "
                               f"({', '.join(map(repr, sorted(held))) or 'none'}); build a new "
                               "plan for new inputs")
    if scale is not None and float(scale) != plan.call.scale:
        raise SpattnParamError(f"scale={scale!r} differs from the plan's "
                               f"({plan.call.scale!r}): build a plan with this scale")
    if q_offset is not None and q_offset != plan.call.positions.q_offset:
        raise SpattnParamError(f"q_offset={q_offset!r} differs from the plan's "
                               f"({plan.call.positions.q_offset}): build a plan with it")
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        validate(q, k, v)
    plan.check(q, k, v)
    if origin is not pattern:       # an equal pattern's plan: the grid is not in its identity
        check_grid(pattern, q.shape[2], k.shape[2], f"q (shape {_shape(q)}) and k (shape "
                   f"{_shape(k)})")


def is_empty(q, k, v) -> bool:
    """Whether q, k, v are dense 4-D tensors of which one has a batch, head or length of 0
    (:func:`empty_call`). Every call asks: tensors with elements answer after three
    ``numel`` reads (~0.2 us, where the full test costs ~2)."""
    try:
        if q.numel() and k.numel() and v.numel():
            return False
    except (AttributeError, TypeError, RuntimeError):   # not tensors: validate says so
        return False
    return all(isinstance(t, torch.Tensor) and t.layout is torch.strided and not t.is_nested
               and t.dim() == 4 for t in (q, k, v)) \
        and 0 in (*q.shape[:3], *k.shape[:3], *v.shape[:3])


class EmptyAttention(torch.autograd.Function):
    """``apply(o, lse, *tensors) -> (o, lse)``: a call's outputs that depend on none of
    ``tensors`` (a call with no query or no key: :func:`empty_call`), whose gradients are
    zeros of their shapes."""

    @staticmethod
    def forward(ctx, o, lse, *tensors):
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in tensors]
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        return (None, None) + tuple(torch.zeros(s, dtype=d, device=dev)
                                    for s, d, dev in ctx.shapes)


def empty_call(pattern, q, k, v, *, scale, q_offset, inputs, plan):
    """``(o, lse)`` of a call where B, Hq, Lq or Lk is 0 (what SDPA returns there): no
    query row (empty outputs) or none with a key (every row fully masked: o 0, lse -inf).
    The arguments are checked as far as they mean anything at these shapes: q, k and v
    (:func:`validate`), the scale, ``q_offset``, the runtime inputs' names and tensors; a
    plan must be one of these shapes. Gradients are zeros; nothing is compiled."""
    validate(q, k, v, empty=True, float64=f64_ok(pattern, q))
    B, Hq, Lq, D = q.shape
    if not _traced_number(scale):   # (a symbol's value cannot be compared while tracing;
        _check_scale(scale, D)      #  no output of an empty call depends on it)
    check_q_offset(q_offset, Lq, k.shape[2])
    ins = dict(inputs or {})
    if plan is None:
        check_names({**pattern.inputs, **getattr(pattern, "score_inputs", {})}, ins)
    check_runtime_tensors(ins)
    if plan is not None:
        _check_plan(plan, pattern, q, k, v, scale, q_offset, inputs)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    o = torch.zeros((B, Hq, Lq, v.shape[3]), dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, Lq), float("-inf"), dtype=lse_dtype, device=q.device)
    # one of each tensor: the same one twice is a graph break in torch.compile's
    # autograd.Function (self-attention passes x as q, k and v)
    tensors = list({id(t): t for t in (q, k, v, *ins.values())
                    if isinstance(t, torch.Tensor) and t.is_floating_point()}.values())
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        o, lse = EmptyAttention.apply(o, lse, *tensors)
    return o, lse


def value_dim(q, k, v) -> bool:
    """Whether a call's v has another head dim than its q and k (all three 4-D tensors)."""
    try:
        if v.shape[-1] == q.shape[-1]:
            return False                # every call of one head dim: two reads
    except (AttributeError, IndexError, RuntimeError, TypeError):
        return False                    # (the checks of the call say what is wrong)
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
            and isinstance(v, torch.Tensor)) or q.is_nested or k.is_nested or v.is_nested:
        return False                    # (the checks of the call say what is wrong)
    return q.dim() == k.dim() == v.dim() == 4 and q.shape[-1] == k.shape[-1] \
        and v.shape[-1] != q.shape[-1]


def call_value_dim(pattern, q, k, v, *, scale=None, return_lse=False, plan=None, **kw):
    """A call whose v has head dim ``Dv`` other than q and k's ``D`` (as SDPA takes it:
    multi-head latent attention, DeepSeek's 192 against 128): the kernels assume one head
    dim, so the narrower side is padded with zeros to ``max(D, Dv)`` (:func:`pad_value_dim`),
    which changes no score and no output column, and the output ``[..., Dv]`` is sliced
    from the wider one (:func:`slice_value_dim`). A copy of the padded tensors per call;
    gradients flow through the padding."""
    if plan is not None:
        raise SpattnInputError(f"plan= takes tensors of one head dim; v has {v.shape[-1]} "
                               f"(shape {_shape(v)}), q {q.shape[-1]} (shape {_shape(q)}): "
                               "call without the plan, or pad v to q's head dim once")
    Dv = v.shape[-1]
    q, k, v, scale = pad_value_dim(q, k, v, scale, kw.get("layout"))
    out = call(pattern, q, k, v, scale=scale, return_lse=return_lse, **kw)
    return slice_value_dim(out, Dv, return_lse)


def pad_value_dim(q, k, v, scale, layout=None):
    """``(q, k, v, scale)`` of one head dim ``max(D, Dv)``: the narrower side zero-padded,
    the scale ``1 / sqrt(D)`` of the unpadded q unless given (the last dim is the head dim
    in either ``layout``)."""
    D, Dv = q.shape[-1], v.shape[-1]
    # every check but the head dims' equality, on the caller's shapes (the call checks the
    # padded tensors again, the dtype against the backend and the transforms' wrappers too)
    validate(*(_usage.to_bhsd(layout, q, k, v) if layout is not None else (q, k, v)),
             empty=True, float64=True, transformed=True, value_dim=True)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if Dv < D:
        return q, k, F.pad(v, (0, D - Dv)), scale
    return F.pad(q, (0, Dv - D)), F.pad(k, (0, Dv - D)), v, scale


def slice_value_dim(out, Dv: int, return_lse: bool):
    """The output of a padded call (:func:`pad_value_dim`) at v's head dim, contiguous."""
    if return_lse:
        return out[0][..., :Dv].contiguous(), out[1]
    return out[..., :Dv].contiguous()


def call(pattern, q, k, v, *, scale=None, return_lse=False, q_offset=None, inputs=None,
         plan=None, layout=None, deterministic=False, order=None):
    """Attention of ``pattern``: ``o [B, Hq, Lq, D]`` (and ``lse [B, Hq, Lq]`` fp32);
    with ``layout="bshd"`` q, k, v and o are ``[B, L, H, D]`` (lse stays ``[B, Hq, Lq]``).
    ``deterministic``: a score's learnable tables get their gradients without atomics, and
    dQ comes from the dQ kernel whatever ``SPATTN_BWD_DQ`` says (everything else is
    deterministic already). ``order``: run in this token order
    (:func:`check_order`; q, k, v and o stay in the caller's order). A v of another head
    dim than q's: :func:`call_value_dim`."""
    if _usage.autocast_on(q):
        with torch.autocast(q.device.type, enabled=False):
            return call(pattern, q, k, v, scale=scale, return_lse=return_lse,
                        q_offset=q_offset, inputs=inputs, plan=plan, layout=layout,
                        deterministic=deterministic, order=order)
    q, k, v = _usage.plain_qkv(q, k, v)
    if inputs:
        inputs = _usage.plain_inputs(inputs)
    return call_plain(pattern, q, k, v, scale=scale, return_lse=return_lse, q_offset=q_offset,
                      inputs=inputs, plan=plan, layout=layout, deterministic=deterministic,
                      order=order)


def call_plain(pattern, q, k, v, *, scale=None, return_lse=False, q_offset=None, inputs=None,
               plan=None, layout=None, deterministic=False, order=None):
    """:func:`call` for arguments its entry has prepared: autocast off for q's device, and
    q, k, v and the inputs without the negative bit (``Pattern.__call__`` prepares them
    before its decode fast paths, and then calls this)."""
    if value_dim(q, k, v):
        return call_value_dim(pattern, q, k, v, scale=scale, return_lse=return_lse,
                              q_offset=q_offset, inputs=inputs, plan=plan, layout=layout,
                              deterministic=deterministic, order=order)
    _usage.check_flags(return_lse=return_lse, deterministic=deterministic)
    index = other_device(q)
    if index is not None:
        with torch.cuda.device(index):
            return call(pattern, q, k, v, scale=scale, return_lse=return_lse,
                        q_offset=q_offset, inputs=inputs, plan=plan, layout=layout,
                        deterministic=deterministic, order=order)
    if order is not None:
        _check_order_call(pattern, plan)
    if inputs:
        _usage.check_keywords({**pattern.inputs, **getattr(pattern, "score_inputs", {})},
                              inputs)
    if plan is not None and layout is None:
        layout = getattr(plan, "tensor_layout", None)
    if layout is not None:
        q, k, v = _usage.to_bhsd(layout, q, k, v)
    if is_empty(q, k, v):
        out = empty_call(pattern, q, k, v, scale=scale, q_offset=q_offset, inputs=inputs,
                         plan=plan)
        return _usage.output(layout, out if return_lse else out[0], return_lse)
    if getattr(pattern, "score", None) is not None:
        from . import scores
        if torch.compiler.is_compiling():
            out = scores.call_op(pattern.op_key, pattern.inputs, pattern.score_inputs,
                                 pattern.backend, q, k, v, scale=scale, return_lse=return_lse,
                                 q_offset=q_offset, inputs=inputs, deterministic=deterministic)
        elif transformed(q, k, v, inputs):
            from . import transforms
            out = transforms.call(pattern, q, k, v, scale=scale, q_offset=q_offset,
                                  inputs=inputs, plan=plan, deterministic=deterministic,
                                  order=order, layout=layout)
            out = out if return_lse else out[0]
        else:
            out = None
            # few queries, many keys: the decode path (which refuses tables that require
            # grad, so that their gradients come from the path below)
            if plan is None and order is None and _decode.routes(q, k, v, q_offset):
                out = _decode.call_routed(pattern, q, k, v, scale=scale,
                                          return_lse=return_lse, q_offset=q_offset,
                                          inputs=inputs)
            if out is None:
                out = scores.call(pattern, q, k, v, scale=scale, return_lse=return_lse,
                                  q_offset=q_offset, inputs=inputs, plan=plan,
                                  deterministic=deterministic)
        return _usage.output(layout, out, return_lse)
    if torch.compiler.is_compiling():
        # The op carries the pattern's key (a str attribute: a constant while tracing; the
        # pattern registered itself when it was made, _ag.register).
        out = call_op(pattern.op_key, pattern.inputs, pattern.backend, q, k, v, scale=scale,
                      return_lse=return_lse, q_offset=q_offset, inputs=inputs)
        return _usage.output(layout, out, return_lse)
    sig = None
    if plan is None:
        # (a signature is for more than MAX_DECODE_Q rows: never the decode route)
        sig = _signature(pattern, q, k, v, scale, q_offset, inputs, layout, order)
    if sig is None and transformed(q, k, v, inputs):   # (a transform's tensors: no signature)
        from . import transforms
        o, lse = transforms.call(pattern, q, k, v, scale=scale, q_offset=q_offset,
                                 inputs=inputs, plan=plan, deterministic=deterministic,
                                 order=order, layout=layout)
        return _usage.output(layout, (o, lse) if return_lse else o, return_lse)
    if plan is not None:
        _check_plan(plan, pattern, q, k, v, scale, q_offset, inputs)
    else:
        last = pattern._last
        if sig is not None and last is not None and last[0] == sig:
            plan = last[1]          # the same arguments as the last call: checked then
        else:
            # few queries, many keys: docs/decode.md
            if sig is None and order is None and _decode.routes(q, k, v, q_offset):
                out = _decode.call_routed(pattern, q, k, v, scale=scale,
                                          return_lse=return_lse, q_offset=q_offset,
                                          inputs=inputs)
                if out is not None:
                    return _usage.output(layout, out, return_lse)
            plan = _lookup(pattern, q, k, v, scale, q_offset, inputs, layout, order, sig)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        o, lse = _ag.AttentionFunction.apply(plan, q, k, v, deterministic)
    else:                   # nothing to differentiate: the plan alone (no autograd node)
        o, lse = plan.forward(q, k, v)
    return _usage.output(layout, (o, lse) if return_lse else o, return_lse)


def _lookup(pattern, q, k, v, scale, q_offset, inputs, layout, order, sig):
    """The plan of a call without one: its arguments checked (:func:`_checked`), the plan
    from :data:`~spattn.runtime.plan.PLANS`; remembered by the pattern as its last call
    (``pattern._last``) under ``sig`` (:func:`_signature`) when that is not None."""
    scale, q_offset, ins, order, backend = _checked(pattern, q, k, v, scale, q_offset,
                                                    inputs, layout, order)
    _ag.register(pattern)
    # keyed by the caller's order tensor (identity and version), whatever its int dtype;
    # its values are checked where the plan is built
    plan = PLANS.get(pattern, backend, q, k, v, scale=scale, q_offset=q_offset,
                     inputs=ins, order=order)
    if sig is not None and not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        # the entry holds the input tensors: their ids in ``sig`` stay theirs while it lives
        pattern._last = (sig, plan, tuple(inputs.values()) if inputs else ())
    return plan


_TENSOR = torch.Tensor
#: The types of a memoised call's ``scale`` and ``q_offset``: immutable values, compared by
#: value (a 0-d numpy array is an integer by ``__index__`` yet can be written in place
#: between two calls, and equal to itself throughout).
_SCALARS = frozenset({type(None), int, float})


def _signature(pattern, q, k, v, scale, q_offset, inputs, layout, order):
    """What a call without a plan is checked on and its plan chosen by, read from cheap
    attributes (no tensor operation, no string formatting): q, k and v's shapes, strides,
    dtypes, devices and joint 16-byte alignment, the scale and offset as given (with their
    types: ``True`` is not ``1``), the layout, each runtime input's name, identity,
    version, data pointer, shape, strides, dtype and device, the pattern's backend, the
    settings (:func:`~spattn.runtime.settings.current`), the autotuner's generation and
    the plan cache's epoch.

    Two calls with equal signatures pass the same checks and get the same plan from
    :data:`~spattn.runtime.plan.PLANS` (whose key is a function of the signature), so a
    call whose signature equals the pattern's last one reuses that call's plan and skips
    both. None (no memo: the full path every time) where the signature cannot stand for the
    checks: an ``order``, tensors not of the exact type ``torch.Tensor``, a scale or offset
    that is not None, an ``int`` or a ``float`` (a tensor, a numpy value: it may change in
    place), an input that is not a tensor or is an inference tensor (no version counter),
    q with few enough rows for the decode route (which reads ``requires_grad`` and the
    grad mode), or q that the layout warning would warn about (it warns at every call)."""
    if order is not None or type(q) is not _TENSOR or type(k) is not _TENSOR \
            or type(v) is not _TENSOR or type(scale) not in _SCALARS \
            or type(q_offset) not in _SCALARS:
        return None
    try:
        qs = q.shape
        if len(qs) != 4 or qs[2] <= _decode.MAX_DECODE_Q or (
                layout is None and qs[1] > _usage.MAX_HEADS):
            return None
        sig = [qs, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype,
               v.dtype, q.device, k.device, v.device, q.layout, k.layout, v.layout,
               (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15 == 0,
               type(scale), scale, type(q_offset), q_offset, layout, pattern.backend,
               _settings.current(), _tune.generation(), PLANS.epoch]
        if inputs:
            for name, t in inputs.items():
                if type(t) is not _TENSOR:
                    return None
                sig += (name, id(t), t._version, t.data_ptr(), t.shape, t.stride(), t.dtype,
                        t.device, t.layout)
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return None          # sparse, nested, inference tensors: the full path says what
    return tuple(sig)


def _check_order_call(pattern, plan) -> None:
    """SpattnParamError where ``order=`` cannot be taken: with ``plan=`` (the plan holds its
    order), for a pattern with a score, under ``torch.compile``."""
    if plan is not None:
        raise SpattnParamError("order= was given with plan=: the plan holds its token order; "
                               "build the plan with it (pat.plan(q, k, v, order=order)) and "
                               "call with plan= alone")
    if getattr(pattern, "score", None) is not None:
        raise SpattnParamError("order= is not available for a pattern with a score: call it "
                               "without order= (or gather q, k, v yourself)")
    if torch.compiler.is_compiling():
        raise SpattnParamError("order= is not available under torch.compile: call the "
                               "pattern with order= outside the compiled region "
                               "(torch.compiler.disable)")


def _traced_number(scale) -> bool:
    """Whether ``scale`` is a number while dynamo traces: its value may be a symbol (a scale
    that varies between calls) that cannot be compared there."""
    return torch.compiler.is_compiling() and isinstance(scale, (int, float)) \
        and not isinstance(scale, bool)


def traced_arguments(declared, requested_backend, q, k, v, scale, q_offset, ints):
    """``(scale, q_offset, inputs, backend)`` of a traced call (both custom ops' paths):
    q, k, v, the scale, the offset and the mask's int inputs ``ints`` checked."""
    backend = _backend_for(requested_backend, q.device.type) \
        if isinstance(q, torch.Tensor) else None
    validate(q, k, v, float64=backend == "torch")
    B, Hq, Lq, D = q.shape
    if not _traced_number(scale):
        scale = _check_scale(scale, D)
    elif isinstance(scale, int) and abs(scale) > 10 ** 38:
        scale = math.inf if scale > 0 else -math.inf    # (beyond the op's float: refused there)
    # else a number, whose value may be a symbol that cannot be compared while tracing (a
    # scale that varies between calls): the custom op checks it (autograd._traced_scale);
    # an error raised here could not be traced
    q_offset = check_q_offset(q_offset, Lq, k.shape[2])
    check_runtime_tensors(ints)
    ins = validate_inputs(declared, ints, batch=B, num_heads=Hq, device=q.device)
    return scale, q_offset, ins, backend


def call_op(key, declared, requested_backend, q, k, v, *, scale, return_lse, q_offset,
            inputs):
    """The traced path (under ``torch.compile``): the same checks, then the custom op."""
    scale, q_offset, ins, backend = traced_arguments(declared, requested_backend, q, k, v,
                                                     scale, q_offset, dict(inputs or {}))
    scale, scale_t = _ag.op_scale(scale)
    o, lse = _ag.attention_op(q, k, v, [ins[n] for n in sorted(ins)], key, scale, q_offset,
                              backend, scale_t)
    return (o, lse) if return_lse else o
