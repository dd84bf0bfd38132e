"""``spattn.attention``: the functional form, a pattern source compiled (cached) and called.

Keyword arguments whose value is a ``torch.Tensor`` are runtime inputs; the others bind
params (``backend=`` picks the backend). Compiled patterns are kept in a bounded LRU cache
(:data:`COMPILE_CACHE_SIZE` entries) keyed by the source, the backend and the params.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from .dsl.errors import SpattnError, SpattnNameError, SpattnParamError
from .pattern import Pattern, compile as _compile
from .runtime import autograd as _ag
from .runtime.api import call, call_op, pad_value_dim, slice_value_dim, value_dim
from .runtime.usage import check_keywords, output, to_bhsd

COMPILE_CACHE_SIZE = 128
_compiled: "OrderedDict[tuple, Pattern]" = OrderedDict()


def _freeze(value):
    """A param's value, hashable (lists as tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(x) for x in value)
    return value


def _typed(value):
    """A cache key for a param's value: its type too, so that values equal in Python but
    checked apart by the compiler (``True`` and ``1``, ``3.0`` and ``3``, ``-0.0`` and
    ``0.0``) are separate entries, and every call is checked as its first was (a list and a
    tuple of the same entries compile alike: one entry)."""
    if isinstance(value, (list, tuple)):
        return tuple, tuple(_typed(x) for x in value)
    if isinstance(value, float):
        return float, value.hex()
    return type(value), value


def compile_cached(src: str, backend: str = "auto", **params) -> Pattern:
    """``spattn.compile(src, backend=backend, **params)`` through an LRU cache."""
    try:
        key = (src, backend, tuple(sorted((n, _typed(v)) for n, v in params.items())))
        hash(key)
    except TypeError:
        return _compile(src, backend=backend, **params)
    hit = _compiled.get(key)
    if hit is not None:
        _compiled.move_to_end(key)
        return hit
    pat = _compile(src, backend=backend, **params)
    _compiled[key] = pat
    if len(_compiled) > COMPILE_CACHE_SIZE:
        _compiled.popitem(last=False)
    return pat


def _resolve(pattern, kwargs):
    backend = kwargs.pop("backend", None)
    inputs = {n: t for n, t in kwargs.items() if isinstance(t, torch.Tensor)}
    params = {n: x for n, x in kwargs.items() if not isinstance(x, torch.Tensor)}
    if isinstance(pattern, Pattern):
        check_keywords(pattern.inputs, kwargs)
        if params:
            raise SpattnParamError(
                f"params {', '.join(map(repr, sorted(params)))} cannot be bound on an already "
                "compiled Pattern: pass the pattern source as a str, or bind them in "
                "spattn.compile()")
        if backend is not None and backend != pattern.backend:
            pattern = Pattern(pattern.ir, name=pattern.name, params=pattern.params,
                              inputs=pattern.inputs, backend=backend, grid=pattern.grid,
                              grid_offset=pattern.grid_offset,
                              grid_suffix=pattern.grid_suffix,
                              score=pattern.score, score_inputs=pattern.score_inputs)
        return pattern, inputs
    if not isinstance(pattern, str):
        raise SpattnParamError(f"pattern must be a str or a spattn.Pattern, got "
                               f"{type(pattern).__name__}")
    try:
        pat = compile_cached(pattern, backend or "auto", **params)
    except SpattnError as e:
        # a keyword of another attention API: say what to write, unless the pattern has it
        check_keywords({}, {n: x for n, x in params.items()})
        _tensor_as_param(e, inputs)
        raise
    check_keywords(pat.inputs, inputs)
    return pat, inputs


def _tensor_as_param(e: SpattnError, inputs: dict) -> None:
    """A SpattnParamError where the pattern reads a name as a param (unindexed) that the call
    passed as a tensor: the functional form passes tensors as runtime inputs."""
    if not isinstance(e, SpattnNameError) or not e.message.startswith("unknown name"):
        return
    for n, t in inputs.items():
        if f"unknown name {n!r}" in e.message:
            raise SpattnParamError(
                f"{n!r} is given as a tensor (shape {list(t.shape)}), and spattn.attention "
                f"passes tensors as runtime inputs, which a pattern reads indexed "
                f"({n}[h], {n}[q]); the pattern reads {n} as a param: give a Python number "
                f"or list ({n}={n}.tolist())", source=e.source, line=e.line,
                column=e.column) from None


def _functional_meta(src: str, backend: str, params: tuple) -> tuple:
    """Compile (cached) and register; ``(key, ((input, ndims), ...), backend, scored,
    ((score input, ndims), ...))``: constants."""
    pat = compile_cached(src, backend, **dict(params))
    return (_ag.register(pat), tuple(sorted(pat.inputs.items())), pat.backend,
            pat.score is not None, tuple(pat.score_inputs.items()))


_functional_meta_const = torch.compiler.assume_constant_result(_functional_meta)


def attention(q, k, v, *, pattern, scale=None, return_lse=False, q_offset=None, layout=None,
              order=None, deterministic=False, plan=None, **kwargs):
    """Functional form: ``attention(q, k, v, pattern="causal & window(W)", W=1024, doc=doc)``.

    Keyword arguments that name runtime inputs of the pattern are passed at call
    time; the others bind params. Compiled patterns are cached. ``layout``: ``"bhsd"``
    (q ``[B, H, L, D]``, the default) or ``"bshd"`` (q ``[B, L, H, D]``, output likewise).
    Keywords of ``scaled_dot_product_attention`` (``is_causal``, ``attn_mask``,
    ``enable_gqa``, ``dropout_p``) are errors that say what to write instead. ``order``: a
    token order to run in; ``deterministic``: a score's table gradients summed in a fixed order;
    ``plan``: a plan made by :meth:`spattn.Pattern.plan` for this pattern and tensors laid
    out like these, which holds the runtime inputs, scale and offset (all three as for
    :meth:`spattn.Pattern.__call__`: a plan of another pattern, or of other shapes, strides,
    dtype or device, is refused). With a source string the params are given as without a
    plan (the plan's pattern must be the one they compile to); under ``torch.compile`` it
    is not used (the custom op finds its plan in the cache).
    """
    if torch.compiler.is_compiling() and isinstance(pattern, str):
        if order is not None:
            raise SpattnParamError("order= is not available under torch.compile: call with "
                                   "order= outside the compiled region")
        # Parsing is not traceable: the compiled pattern enters the graph as constants.
        backend = kwargs.pop("backend", None) or "auto"
        inputs = {n: t for n, t in kwargs.items() if isinstance(t, torch.Tensor)}
        params = tuple(sorted((n, _freeze(x)) for n, x in kwargs.items()
                              if not isinstance(x, torch.Tensor)))
        key, declared, requested, scored, score_declared = _functional_meta_const(
            pattern, backend, params)
        check_keywords({**dict(declared), **dict(score_declared)}, inputs)
        q, k, v = to_bhsd(layout, q, k, v)
        Dv = v.shape[-1] if value_dim(q, k, v) else None
        if Dv is not None:
            q, k, v, scale = pad_value_dim(q, k, v, scale)
        if scored:
            from .runtime.scores import call_op as score_call_op
            out = score_call_op(key, dict(declared), dict(score_declared), requested, q, k, v,
                                scale=scale, return_lse=return_lse, q_offset=q_offset,
                                inputs=inputs, deterministic=deterministic)
        else:
            out = call_op(key, dict(declared), requested, q, k, v, scale=scale,
                          return_lse=return_lse, q_offset=q_offset, inputs=inputs)
        if Dv is not None:
            out = slice_value_dim(out, Dv, return_lse)
        return output(layout, out, return_lse)
    pat, inputs = _resolve(pattern, dict(kwargs))
    return call(pat, q, k, v, scale=scale, return_lse=return_lse, q_offset=q_offset,
                inputs=inputs, plan=plan, layout=layout, order=order,
                deterministic=deterministic)
