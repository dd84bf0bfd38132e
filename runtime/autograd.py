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

Gradients flow to q, k and v only (runtime inputs are integer tensors). A pattern with a
score traces to ``spattn::score_attention`` / ``spattn::score_attention_bwd`` instead
(the end of this module): they also take the score's float tables, check them on the
real tensors, and give the tables that require grad their gradients. The
gradient of the returned lse (``return_lse=True``) is supported: the torch
backend takes it directly, the Triton backend's kernels read it (a stage with the
option ``lse_grad``: ``delta - dlse`` in their row statistics).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..dsl.errors import SpattnBackendError, SpattnError
from .plan import PLANS
from .usage import plain, plain_qkv

__all__ = ["AttentionFunction", "OnceDifferentiable", "once", "register", "lookup",
           "attention_op", "attention_bwd_op", "score_attention_op", "score_attention_bwd_op"]

#: canonical source -> Pattern, for the custom op (which only carries the source).
_REGISTRY: dict = {}


def register(pattern) -> str:
    """Record ``pattern`` so the custom op can find it; returns its key, ``pattern.op_key``:
    the canonical source, preceded by the pattern's grid declaration when it has one
    (``grid (8, 8) after 5 before 2 ...``: a bare expression that compiles to a pattern
    with that grid), and followed by a comment naming its inputs when it declares some its
    canonical source does not read (``false  # inputs doc[1]``: equal patterns that take
    other inputs are other keys). Every :class:`spattn.Pattern` registers itself when it is
    made, so that a traced call reads only the key (a str) and the op finds this object
    (its class, its grid, its declared inputs)."""
    key = pattern.op_key
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
    """The mask's custom ops carry no float tables: a pattern with a score is refused there
    (its calls trace to ``spattn::score_attention``)."""
    if getattr(pattern, "score", None) is not None:
        from ..dsl.errors import SpattnBackendError
        raise SpattnBackendError("spattn::attention carries no score tables: a pattern "
                                 "with a score runs through spattn::score_attention")


def _inputs_dict(pattern, tensors) -> dict:
    return dict(zip(sorted(pattern.inputs), tensors))


# ------------------------------------------------------------ eager autograd

#: What differentiating a spattn gradient again says.
TWICE = ("spattn's attention is differentiable once: its backward (the kernels, and the torch "
         "backend's fused calls) has no derivative of its own, so a gradient taken with "
         "create_graph=True cannot be differentiated again (a gradient penalty, a Hessian-"
         "vector product, torch.func.hessian); compute that term with "
         "spattn.runtime.reference.pattern_reference (float64, differentiable twice) or "
         "leave it out")


class OnceDifferentiable(torch.autograd.Function):
    """``apply(n, *grads, *inputs) -> grads``: the ``n`` gradients a spattn backward
    computed, returned as outputs of a node over the tensors they depend on (the forward's
    inputs and the incoming gradients), whose own backward raises
    :class:`~spattn.dsl.errors.SpattnBackendError`.

    Why a node over the inputs: a gradient without one (what the backward gives under
    ``create_graph=True`` when it ignores grad mode) is a constant, so a gradient penalty
    added to the loss vanishes from its backward without a word; and
    ``torch.autograd.function.once_differentiable`` ties its error to fresh leaves, which
    ``torch.autograd.grad(..., allow_unused=True)`` never reaches, returning None (read as
    a second derivative of 0). Through this node every path from the gradients to q, k, v
    or a table meets the error."""

    @staticmethod
    def forward(ctx, n, *tensors):
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise SpattnBackendError(TWICE)


def once(grads: tuple, inputs: tuple) -> tuple:
    """``grads`` (None where not computed) as computed, or, where the backward runs with
    ``create_graph=True`` and one of ``inputs`` requires grad, through
    :class:`OnceDifferentiable` (the backward itself runs under ``torch.no_grad()``)."""
    if not torch.is_grad_enabled():
        return grads
    live = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not live:
        return grads
    at = [i for i, g in enumerate(grads) if g is not None]
    if not at:
        return grads
    out = list(grads)
    for i, g in zip(at, OnceDifferentiable.apply(len(at), *(grads[i] for i in at), *live)):
        out[i] = g
    return tuple(out)


def _owned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or where it is a view (the torch backend's outputs are slices and strided
    views of its buffers) a tensor of the same storage that is not one: autograd forbids
    in-place writes to views a Function returns (``o += x`` would raise where SDPA's
    output takes it)."""
    if t._base is None:
        return t
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


class AttentionFunction(torch.autograd.Function):
    """``apply(plan, q, k, v, deterministic=False) -> (o, lse)``: the plan's forward, and
    its backward (``deterministic``: without atomic dQ)."""

    @staticmethod
    def forward(ctx, plan, q, k, v, deterministic=False):
        o, lse = (_owned(t) for t in plan.forward(q, k, v))
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan = plan
        ctx.deterministic = deterministic
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        if do is None and dlse is None:
            return None, None, None, None, None
        do, dlse = plain(do), plain(dlse)
        with torch.no_grad():
            dq, dk, dv = ctx.plan.backward(q, k, v, o, lse,
                                           torch.zeros_like(o) if do is None else do, dlse,
                                           deterministic=ctx.deterministic)
        return (None, *once((dq, dk, dv), (q, k, v, do, dlse)), None)


# ------------------------------------------------------------ custom ops

def _traced_scale(scale: float, q: torch.Tensor, scale_t: list) -> float:
    """The scale a traced call passed, checked here: a scale that varies between calls
    reaches the op as a symbol, which the call could not check (``api._check_scale``);
    read from ``scale_t`` where that holds it (:func:`op_scale`)."""
    from .api import _check_scale
    return _check_scale(_op_scale(scale, scale_t), q.shape[-1])


def _op_scale(scale: float, scale_t: list) -> float:
    return scale_t[0].item() if scale_t else scale


def op_scale(scale) -> tuple:
    """``(scale, scale_t)`` for the ops: under tracing the scale as a 0-d float64 tensor in
    the list ``scale_t`` and 1.0 in its float place, else ``(scale, [])`` (a list: an
    optional tensor that is None does not survive the ops' autograd structure check).
    A scale that varies between calls is traced as a symbol, and Inductor passes a custom
    op's symbolic float argument inside a ``torch.utils.checkpoint`` region as one earlier
    call's value on every later call (torch 2.13), while a tensor computed from the symbol
    arrives right."""
    from .api import _traced_number
    if _traced_number(scale):
        return 1.0, [torch.ones((), dtype=torch.float64) * scale]
    return scale, []


@torch.library.custom_op("spattn::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: list[torch.Tensor],
                 key: str, scale: float, q_offset: int, backend: str,
                 scale_t: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    pattern = lookup(key)
    _no_score(pattern)
    q, k, v = plain_qkv(q, k, v)
    scale = _traced_scale(scale, q, scale_t)
    inputs = [plain(t) for t in inputs]
    plan = PLANS.get(pattern, backend, q, k, v, scale=scale, q_offset=q_offset,
                     inputs=_inputs_dict(pattern, inputs))
    o, lse = plan.forward(q, k, v)
    # The fake gives contiguous outputs; a backend's outputs are made to agree.
    return o.contiguous(), lse.contiguous()


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@attention_op.register_fake
def _attention_fake(q, k, v, inputs, key, scale, q_offset, backend, scale_t):
    B, Hq, Lq, _ = q.shape
    o = q.new_empty((B, Hq, Lq, v.shape[-1]))
    lse = q.new_empty((B, Hq, Lq), dtype=_lse_dtype(q))
    return o, lse


@torch.library.custom_op("spattn::attention_bwd", mutates_args=())
def attention_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                     lse: torch.Tensor, do: torch.Tensor, dlse: Optional[torch.Tensor],
                     inputs: list[torch.Tensor], key: str, scale: float, q_offset: int,
                     backend: str, scale_t: list[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pattern = lookup(key)
    scale = _op_scale(scale, scale_t)
    q, k, v = plain_qkv(q, k, v)
    do, dlse, inputs = plain(do), plain(dlse), [plain(t) for t in inputs]
    plan = PLANS.get(pattern, backend, q, k, v, scale=scale, q_offset=q_offset,
                     inputs=_inputs_dict(pattern, inputs))
    dq, dk, dv = plan.backward(q, k, v, o, lse, do, dlse)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_bwd_op.register_fake
def _attention_bwd_fake(q, k, v, o, lse, do, dlse, inputs, key, scale, q_offset, backend,
                        scale_t):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, ins, key, scale, q_offset, backend, scale_t = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, *ins, *scale_t)
    ctx.n_inputs = len(ins)
    ctx.spattn = (key, scale, q_offset, backend)


def _saved_scale(rest: list, n: int):
    """``(the inputs and tables, scale_t)`` of a context's saved tensors after q, k, v, o,
    lse: ``n`` of them, then ``scale_t``'s (none or one)."""
    return rest[:n], list(rest[n:])


def _backward(ctx, do, dlse):
    q, k, v, o, lse, *rest = ctx.saved_tensors
    ins, scale_t = _saved_scale(rest, ctx.n_inputs)
    key, scale, q_offset, backend = ctx.spattn
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = attention_bwd_op(q, k, v, o, lse, do, dlse, list(ins), key, scale, q_offset,
                                  backend, scale_t)
    return dq, dk, dv, [None] * ctx.n_inputs, None, None, None, None, [None] * len(scale_t)


torch.library.register_autograd("spattn::attention", _backward, setup_context=_setup_context)


# ------------------------------------------------------------ custom ops of scored patterns

def _names(names: str) -> list:
    return names.split(",") if names else []


def _score_ctx(pattern, q, k, v, inputs, tables, names, scale, q_offset, backend,
               deterministic):
    """``(scores.Ctx, {input name: tensor})`` of a traced scored call, from real tensors:
    the float tables (``names``, as given) checked here, not while tracing (an error raised
    in traced code cannot be traced), the plan from :data:`PLANS` (which checks the mask's
    inputs when it is built), the score's indices checked against these tables."""
    from . import scores
    given = dict(zip(_names(names), tables))
    extra = [n for n in given if n not in pattern.score_inputs]
    if extra:
        from ..dsl.errors import SpattnInputError
        known = ", ".join(repr(n) for n in pattern.all_inputs) or "none"
        raise SpattnInputError(f"unexpected runtime input {', '.join(map(repr, extra))}: the "
                               f"pattern's inputs are {known}")
    floats = scores.validate_score_inputs(pattern.score_inputs, given, batch=q.shape[0],
                                          num_heads=q.shape[1], device=q.device)
    given_ints = _inputs_dict(pattern, inputs)
    if scores.composition_of(pattern) is None:
        plan, recipe = PLANS.get(pattern, backend, q, k, v, scale=scale, q_offset=q_offset,
                                 inputs=given_ints, tables=floats), None
        scores.check_score_bounds(pattern, plan.call.inputs, floats, q.shape[2], k.shape[2],
                                  num_heads=q.shape[1], batch=q.shape[0], q_offset=q_offset)
    else:       # the composed tables are gathered at indices checked first
        _, _, given_ints, _, floats = scores._arguments(pattern, q, k, v, scale, q_offset,
                                                        {**given_ints, **floats})
        plan, recipe = scores.plan_of(pattern, backend, q, k, v, scale, q_offset, given_ints,
                                       floats)
    ints = plan.call.inputs
    c = scores.Ctx(pattern if recipe is None else plan.pattern, backend, scale, q_offset, ints,
                   tuple(pattern.score_inputs), plan=plan, deterministic=deterministic,
                   recipe=recipe)
    return c, {**ints, **floats}


@torch.library.custom_op("spattn::score_attention", mutates_args=())
def score_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       inputs: list[torch.Tensor], tables: list[torch.Tensor],
                       names: str, key: str, scale: float, q_offset: int, backend: str,
                       deterministic: bool, scale_t: list[torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)`` of a pattern with a score; ``tables``: the float tables named by
    ``names`` (comma-separated: a schema takes no list of str; ``deterministic`` is for the
    backward)."""
    from . import scores
    q, k, v = plain_qkv(q, k, v)
    scale = _traced_scale(scale, q, scale_t)
    inputs, tables = [plain(t) for t in inputs], [plain(t) for t in tables]
    c, ins = _score_ctx(lookup(key), q, k, v, inputs, tables, names, scale, q_offset, backend,
                        deterministic)
    o, lse = scores.run_fwd(c, q, k, v, ins)
    return o.contiguous(), lse.contiguous()


@score_attention_op.register_fake
def _score_attention_fake(q, k, v, inputs, tables, names, key, scale, q_offset, backend,
                          deterministic, scale_t):
    return _attention_fake(q, k, v, inputs, key, scale, q_offset, backend, scale_t)


@torch.library.custom_op("spattn::score_attention_bwd", mutates_args=())
def score_attention_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                           lse: torch.Tensor, do: torch.Tensor, dlse: Optional[torch.Tensor],
                           inputs: list[torch.Tensor], tables: list[torch.Tensor],
                           names: str, want: list[bool], key: str, scale: float,
                           q_offset: int, backend: str, deterministic: bool,
                           scale_t: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[dq, dk, dv, *table grads]``: a gradient for every table (in ``tables`` order),
    computed for those ``want`` marks (zeros for the others)."""
    from . import scores
    scale = _op_scale(scale, scale_t)
    q, k, v = plain_qkv(q, k, v)
    do, dlse = plain(do), plain(dlse)
    inputs, tables = [plain(t) for t in inputs], [plain(t) for t in tables]
    c, ins = _score_ctx(lookup(key), q, k, v, inputs, tables, names, scale, q_offset, backend,
                        deterministic)
    names = _names(names)
    dq, dk, dv, tg = scores.run_bwd(c, q, k, v, o, lse, do, ins, dlse,
                                    tuple(n for n, w in zip(names, want) if w))
    dt = [tg[n].to(t.dtype) if n in tg else torch.zeros_like(t) for n, t in zip(names, tables)]
    return [dq.contiguous(), dk.contiguous(), dv.contiguous(), *dt]


@score_attention_bwd_op.register_fake
def _score_attention_bwd_fake(q, k, v, o, lse, do, dlse, inputs, tables, names, want, key,
                              scale, q_offset, backend, deterministic, scale_t):
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            *(t.new_empty(t.shape) for t in tables)]


def _score_setup_context(ctx, inputs, output):
    q, k, v, ins, tables, names, key, scale, q_offset, backend, deterministic, scale_t = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, *ins, *tables, *scale_t)
    ctx.n_inputs = len(ins)
    ctx.want = [t.requires_grad for t in tables]
    ctx.spattn = (names, key, scale, q_offset, backend, deterministic)


def _score_backward(ctx, do, dlse):
    q, k, v, o, lse, *rest = ctx.saved_tensors
    rest, scale_t = _saved_scale(rest, ctx.n_inputs + len(ctx.want))
    ins, tables = rest[:ctx.n_inputs], rest[ctx.n_inputs:]
    names, key, scale, q_offset, backend, deterministic = ctx.spattn
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv, *dt = score_attention_bwd_op(q, k, v, o, lse, do, dlse, list(ins),
                                             list(tables), names, list(ctx.want), key, scale,
                                             q_offset, backend, deterministic, scale_t)
    dt = [g if w else None for g, w in zip(dt, ctx.want)]
    return (dq, dk, dv, [None] * ctx.n_inputs, dt, None, None, None, None, None, None,
            [None] * len(scale_t))


torch.library.register_autograd("spattn::score_attention", _score_backward,
                                setup_context=_score_setup_context)
