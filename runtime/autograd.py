"""Autograd and ``torch.compile`` integration.

Two thin layers over a :class:`~spattn.runtime.plan.Plan` (whose forward and backward run
the Triton stages or the torch backend):

* :class:`AttentionFunction`, a ``torch.autograd.Function`` used in eager mode: it runs
  the plan it is given, forward and backward;
* the custom ops ``spattn::attention`` and ``spattn::attention_bwd``
  (``torch.library.custom_op``) with fake (meta) implementations and a
  registered autograd formula, used under ``torch.compile`` so that a model
  calling spattn traces with ``fullgraph=True``, forward and backward. The
  kernels are opaque inside the op, which takes its plan from the plan cache
  (:data:`spattn.runtime.plan.PLANS`).

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

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ..dsl.errors import SpattnError
from .plan import PLANS

__all__ = ["AttentionFunction", "register", "lookup", "attention_op", "attention_bwd_op"]

#: canonical source -> Pattern, for the custom op (which only carries the source).
_REGISTRY: dict = {}


def register(pattern) -> str:
    """Record ``pattern`` so the custom op can find it; returns its key: the canonical source,
    preceded by the pattern's grid declaration when it has one (``grid (8, 8) after 5 ...``:
    a bare expression that compiles to a pattern with that grid, so that two patterns of one
    mask with and without a grid are two keys)."""
    key = pattern.source
    grid = getattr(pattern, "grid", None)
    if grid is not None:
        offset = getattr(pattern, "grid_offset", 0)
        key = (f"grid ({', '.join(map(str, grid))})" + (f" after {offset}" if offset else "")
               + f" {key}")
    _REGISTRY.setdefault(key, pattern)
    return key


def lookup(key: str):
    """The pattern registered under ``key``, or compiled again from it (a canonical source)."""
    pat = _REGISTRY.get(key)
    if pat is None:
        from ..ir.pattern import CompiledPattern
        try:
            pat = CompiledPattern.from_source(key)
        except SpattnError as e:
            raise SpattnError(f"no pattern is registered under {key!r} and it does not compile "
                              f"as a pattern source: {e.message}") from None
        _REGISTRY[key] = pat
    return pat


def _no_score(pattern) -> None:
    """The custom ops carry no float tables: a pattern with a score is refused there."""
    if getattr(pattern, "score", None) is not None:
        from ..dsl.errors import SpattnBackendError
        raise SpattnBackendError("a pattern with a score does not run under torch.compile "
                                 "yet: call it eagerly (outside the compiled region)")


def _inputs_dict(pattern, tensors) -> dict:
    return dict(zip(sorted(pattern.inputs), tensors))


# ------------------------------------------------------------ eager autograd

class AttentionFunction(torch.autograd.Function):
    """``apply(plan, q, k, v) -> (o, lse)``: the plan's forward, and its backward."""

    @staticmethod
    def forward(ctx, plan, q, k, v):
        o, lse = plan.forward(q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        if do is None and dlse is None:
            return None, None, None, None
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = ctx.plan.backward(q, k, v, o, lse, do, dlse)
        return None, dq, dk, dv


# ------------------------------------------------------------ custom ops

@torch.library.custom_op("spattn::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: list[torch.Tensor],
                 key: str, scale: float, q_offset: int, backend: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    pattern = lookup(key)
    _no_score(pattern)
    plan = PLANS.get(pattern, backend, q, k, v, scale=scale, q_offset=q_offset,
                     inputs=_inputs_dict(pattern, inputs))
    o, lse = plan.forward(q, k, v)
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
    plan = PLANS.get(pattern, backend, q, k, v, scale=scale, q_offset=q_offset,
                     inputs=_inputs_dict(pattern, inputs))
    dq, dk, dv = plan.backward(q, k, v, o, lse, do, dlse)
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
