"""Autograd and ``torch.compile`` integration.

Two thin layers over one pair of dispatchers, :func:`_fwd` and :func:`_bwd`
(which pick the Triton launchers or the torch backend):

* :class:`AttentionFunction`, a ``torch.autograd.Function`` used in eager mode;
* the custom ops ``spattn::attention`` and ``spattn::attention_bwd``
  (``torch.library.custom_op``) with fake (meta) implementations and a
  registered autograd formula, used under ``torch.compile`` so that a model
  calling spattn traces with ``fullgraph=True``, forward and backward. The
  kernels are opaque inside the op.

A custom op takes only tensors and simple values, so the pattern travels as its
canonical source (``Pattern.source``, a plain str attribute, so tracing needs no
hashing) and is looked up in :data:`_REGISTRY`, filled when a pattern is first
called; a source not in the registry (a graph saved and run in another process)
is compiled again from the source, which round-trips to the same IR. Runtime
inputs travel as a list of tensors in sorted input-name order.

Gradients flow to q, k and v only (runtime inputs are integer tensors). The
gradient of the returned lse (``return_lse=True``) is supported: the torch
backend takes it directly; with the Triton backend a non-zero lse gradient
falls back to the torch backend's backward for that call (with a warning).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ..dsl.errors import SpattnError

__all__ = ["AttentionFunction", "register", "lookup", "attention_op", "attention_bwd_op"]

#: canonical source -> Pattern, for the custom op (which only carries the source).
_REGISTRY: dict = {}


def register(pattern) -> str:
    """Record ``pattern`` so the custom op can find it; returns its key (the canonical source)."""
    key = pattern.source
    _REGISTRY.setdefault(key, pattern)
    return key


def lookup(key: str):
    """The pattern registered under ``key``, or compiled again from it (a canonical source)."""
    pat = _REGISTRY.get(key)
    if pat is None:
        from spattn.pattern import compile as _compile
        try:
            pat = _compile(key)
        except SpattnError as e:
            raise SpattnError(f"no pattern is registered under {key!r} and it does not compile "
                              f"as a pattern source: {e.message}") from None
        _REGISTRY[key] = pat
    return pat


# ------------------------------------------------------------ dispatchers

#: Shapes whose input bounds were checked (bounded FIFO): when no index contains a load,
#: the index ranges depend on the shapes alone, so a shape checked once stays valid.
_BOUNDS_CHECKED: "dict[tuple, None]" = {}
_BOUNDS_CHECKED_SIZE = 256


def _indices_read_inputs(ir) -> bool:
    from ..ir.nodes import Load, loads, walk
    return any(isinstance(n, Load) for ld in loads(ir) for i in ld.index for n in walk(i))


def _check_bounds(pattern, inputs, q, k, q_offset) -> None:
    """Input index bounds (``ir.intervals.check_input_bounds``), run where tensors are real.

    The check evaluates index intervals over the whole domain (with range summaries of the
    inputs on their device): milliseconds on a GPU. Unless an index reads an input itself
    (``doc[doc[q]]``), its result depends only on the shapes, so it runs once per shape.
    """
    if not inputs:
        return
    from ..ir.intervals import check_input_bounds
    B, Hq, Lq, _ = q.shape
    key = (pattern.source, B, Hq, Lq, k.shape[2], q_offset,
           tuple(sorted((n, tuple(t.shape)) for n, t in inputs.items())))
    if key in _BOUNDS_CHECKED:
        return
    check_input_bounds(pattern, inputs, Lq, k.shape[2], num_heads=Hq, batch=B,
                       q_offset=q_offset)
    if not _indices_read_inputs(pattern.ir):
        _BOUNDS_CHECKED[key] = None
        if len(_BOUNDS_CHECKED) > _BOUNDS_CHECKED_SIZE:
            _BOUNDS_CHECKED.pop(next(iter(_BOUNDS_CHECKED)))


def _fwd(pattern, backend: str, q, k, v, *, scale: float, q_offset: int, inputs):
    """``(o, lse)`` from the chosen backend ("torch" or "triton")."""
    _check_bounds(pattern, inputs, q, k, q_offset)
    if backend == "torch":
        from . import torch_backend
        return torch_backend.fwd(pattern, q, k, v, scale=scale, q_offset=q_offset, inputs=inputs)
    from . import triton_backend
    return triton_backend.fwd(pattern, q, k, v, scale=scale, q_offset=q_offset, inputs=inputs)


def _bwd(pattern, backend: str, q, k, v, o, lse, do, *, scale: float, q_offset: int, inputs,
         dlse=None):
    """``(dq, dk, dv)``; ``dlse`` is the gradient of the lse output (None if unused)."""
    if do is None:
        do = torch.zeros_like(o)
    if backend == "torch":
        from . import torch_backend
        return torch_backend.bwd(pattern, q, k, v, o, lse, do, scale=scale, q_offset=q_offset,
                                 inputs=inputs, dlse=dlse)
    if dlse is not None and bool((dlse != 0).any()):
        warnings.warn("spattn: the Triton backward does not take a gradient of lse; this call's "
                      "backward runs on the torch backend", stacklevel=3)
        from . import torch_backend
        return torch_backend.bwd(pattern, q, k, v, o, lse, do, scale=scale, q_offset=q_offset,
                                 inputs=inputs, dlse=dlse)
    from . import triton_backend
    return triton_backend.bwd(pattern, q, k, v, o, lse, do, scale=scale, q_offset=q_offset,
                              inputs=inputs)


def _inputs_dict(pattern, tensors) -> dict:
    return dict(zip(sorted(pattern.inputs), tensors))


# ------------------------------------------------------------ eager autograd

class AttentionFunction(torch.autograd.Function):
    """``apply(pattern, backend, scale, q_offset, inputs, q, k, v) -> (o, lse)``."""

    @staticmethod
    def forward(ctx, pattern, backend, scale, q_offset, inputs, q, k, v):
        o, lse = _fwd(pattern, backend, q, k, v, scale=scale, q_offset=q_offset, inputs=inputs)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.spattn = (pattern, backend, scale, q_offset, inputs)
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        pattern, backend, scale, q_offset, inputs = ctx.spattn
        if do is None and dlse is None:
            return (None,) * 8
        dq, dk, dv = _bwd(pattern, backend, q, k, v, o, lse, do, scale=scale,
                          q_offset=q_offset, inputs=inputs, dlse=dlse)
        return None, None, None, None, None, dq, dk, dv


# ------------------------------------------------------------ custom ops

@torch.library.custom_op("spattn::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: list[torch.Tensor],
                 key: str, scale: float, q_offset: int, backend: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    pattern = lookup(key)
    o, lse = _fwd(pattern, backend, q, k, v, scale=scale, q_offset=q_offset,
                  inputs=_inputs_dict(pattern, inputs))
    # The fake gives contiguous outputs; a backend's outputs are made to agree.
    return o.contiguous(), lse.contiguous()


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@attention_op.register_fake
def _attention_fake(q, k, v, inputs, key, scale, q_offset, backend):
    B, Hq, Lq, _ = q.shape
    o = q.new_empty((B, Hq, Lq, v.shape[-1]))
    lse = q.new_empty((B, Hq, Lq), dtype=_lse_dtype(q))
    return o, lse


@torch.library.custom_op("spattn::attention_bwd", mutates_args=())
def attention_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                     lse: torch.Tensor, do: torch.Tensor, dlse: Optional[torch.Tensor],
                     inputs: list[torch.Tensor], key: str, scale: float, q_offset: int,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pattern = lookup(key)
    dq, dk, dv = _bwd(pattern, backend, q, k, v, o, lse, do, scale=scale, q_offset=q_offset,
                      inputs=_inputs_dict(pattern, inputs), dlse=dlse)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_bwd_op.register_fake
def _attention_bwd_fake(q, k, v, o, lse, do, dlse, inputs, key, scale, q_offset, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, ins, key, scale, q_offset, backend = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, *ins)
    ctx.n_inputs = len(ins)
    ctx.spattn = (key, scale, q_offset, backend)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, *ins = ctx.saved_tensors
    key, scale, q_offset, backend = ctx.spattn
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = attention_bwd_op(q, k, v, o, lse, do, dlse, list(ins), key, scale, q_offset,
                                  backend)
    return dq, dk, dv, [None] * ctx.n_inputs, None, None, None, None


torch.library.register_autograd("spattn::attention", _backward, setup_context=_setup_context)
