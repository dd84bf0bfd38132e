"""How a call is written: the tensor layout, keywords of other attention APIs, and the
warnings about calls that run but are likely not what was meant.

* ``layout``: ``"bhsd"`` (q ``[B, H, L, D]``, the layout of
  ``scaled_dot_product_attention`` and the default) or ``"bshd"`` (q ``[B, L, H, D]``, the
  layout of Hugging Face projections before their transpose and of FlashAttention).
  ``bshd`` tensors are transposed as views (no copy) into ``[B, H, L, D]`` and the output
  transposed back, so forward, backward and both backends are the ``bhsd`` path.
* A call without ``layout=`` whose q reads as more than :data:`MAX_HEADS` heads, and
  more heads than positions, is almost surely ``[B, L, H, D]``: a
  :class:`~spattn.dsl.errors.SpattnLayoutWarning` (passing ``layout="bhsd"`` says it is
  meant and silences it).
* Keywords of ``scaled_dot_product_attention`` (and of FlexAttention / ``nn.
  MultiheadAttention``) that spattn expresses differently are a
  :class:`~spattn.dsl.errors.SpattnParamError` saying what to write instead, unless the
  pattern declares a runtime input of that name.
* A tensor with the negative bit (a lazy negation: ``x.conj().imag`` of a complex ``x``,
  ``torch._neg_view``) holds the negation of its values in memory, and the kernels read
  memory: such tensors are materialised where they enter (:func:`plain`), as torch's own
  operators do.
* A pattern that allows no pair gives an all-zero output: a
  :class:`~spattn.dsl.errors.SpattnEmptyPatternWarning` at compile time where that holds
  for every shape (the canonical IR is ``false``), else when a plan is built for a call
  whose analysis proves every tile EMPTY (:func:`warn_if_empty`).
"""
from __future__ import annotations

import warnings

import torch
from torch.autograd import forward_ad as _fwad

from ..dsl.errors import (SpattnBackendError, SpattnEmptyPatternWarning, SpattnInputError,
                          SpattnLayoutWarning, SpattnParamError, SpattnTypeError,
                          SpattnValueError, is_bool, short_repr)

__all__ = ["LAYOUTS", "MAX_HEADS", "SDPA_KEYWORDS", "check_layout", "to_bhsd", "from_bhsd",
           "warn_if_transposed", "with_layout_hint", "check_keywords", "warn_if_empty",
           "warn_if_false", "kernel_source_for", "plain", "plain_qkv", "plain_inputs",
           "refuse_dual", "FORWARD_MODE", "autocast_on", "KERNEL_OPTIONS", "overlapping",
           "check_flags"]


#: The refusal of forward-mode derivatives (``torch.func.jvp``, ``jacfwd``, dual tensors).
FORWARD_MODE = ("spattn's attention has no forward-mode derivative (torch.func.jvp, jacfwd, "
                "hessian, torch.autograd.forward_ad): take its derivatives in reverse mode "
                "(grad, vjp, jacrev), or compute the term with "
                "spattn.runtime.reference.pattern_reference (float64)")


def refuse_dual(tensors) -> None:
    """A SpattnBackendError where one of ``tensors`` is a dual tensor of
    ``torch.autograd.forward_ad`` (also what ``torch.func.linearize`` passes): one module
    attribute read unless a dual level is open."""
    if getattr(_fwad, "_current_level", -1) < 0:
        return
    for t in tensors:
        if isinstance(t, torch.Tensor) and _fwad.unpack_dual(t).tangent is not None:
            raise SpattnBackendError(FORWARD_MODE)


def autocast_on(q) -> bool:
    """Whether ``torch.autocast`` is on for q's device: spattn then runs its call with it
    off, in its inputs' dtype (docs/usage.md, Autocast). One C call when it is off."""
    return torch._C._is_any_autocast_enabled() and isinstance(q, torch.Tensor) \
        and torch.is_autocast_enabled(q.device.type)


def plain(t):
    """``t`` with its negative bit applied (a copy) where it has one, else ``t`` (anything
    that is not a tensor too: the checks say what is wrong with it). Not while
    ``torch.compile`` traces (dynamo cannot trace ``is_neg``; the custom ops' bodies, which
    run on the real tensors, apply it there)."""
    if isinstance(t, torch.Tensor) and not torch.compiler.is_compiling() and t.is_neg():
        return t.resolve_neg()
    return t


def overlapping(t) -> bool:
    """Whether two elements of the strided tensor ``t`` may share memory (``unfold``, a
    stride smaller than a row): by the sufficient test of strides in increasing order,
    each past the reach of the smaller ones (a zero stride over two or more elements
    overlaps)."""
    if t.is_contiguous():
        return False
    reach = 0
    for stride, size in sorted((abs(st), n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def plain_qkv(q, k, v):
    """q, k and v through :func:`plain`: three flag reads on the common path. A q whose
    elements overlap in memory is copied: outputs are allocated with q's strides (ATen's
    CPU attention writes its output so), and two rows of one output element would race."""
    if torch.compiler.is_compiling():
        return q, k, v
    refuse_dual((q, k, v))
    try:
        if not (q.is_neg() or k.is_neg() or v.is_neg() or q.is_cuda):
            return (q.contiguous() if overlapping(q) else q), k, v
    except (AttributeError, TypeError):
        return q, k, v      # not tensors: the checks say what is wrong with them
    q, k, v = plain(q), plain(k), plain(v)
    if q.is_cuda:
        # the kernels are built and tuned for a unit last stride, and the compiled forward
        # of D = 256 in 32 x 32 tiles that writes a learned table's fp32 output read K and V
        # of last stride 2 wrongly (gpu_fuzz call:479877199; benchmarks/RESULTS.md)
        q, k, v = (t.contiguous() if t.dim() and t.stride(-1) != 1 and t.shape[-1] > 1 else t
                   for t in (q, k, v))
    return (q.contiguous() if overlapping(q) else q), k, v


def plain_inputs(inputs: dict) -> dict:
    """A call's runtime inputs and tables through :func:`plain` (the dict itself when none
    has the bit; a dual tensor is refused, :func:`refuse_dual`)."""
    if inputs and not torch.compiler.is_compiling():
        refuse_dual(inputs.values())
    if not inputs or not any(isinstance(t, torch.Tensor) and not torch.compiler.is_compiling()
                             and t.is_neg() for t in inputs.values()):
        return inputs
    return {n: plain(t) for n, t in inputs.items()}


#: The layouts q, k, v and the output may have.
LAYOUTS = ("bhsd", "bshd")
#: More heads than any released model has (DeepSeek-V3: 128): a "head" count above it, and
#: above the "length", reads as a sequence length in the heads' place.
MAX_HEADS = 256

#: Keywords of other attention APIs -> what to write in spattn instead.
SDPA_KEYWORDS = {
    "is_causal": "spattn takes no is_causal: the pattern says which keys a query sees; write "
                 "causality into it, e.g. spattn.compile(\"causal & window(W)\") or "
                 "spattn.attention(q, k, v, pattern=\"causal\")",
    "attn_mask": "spattn takes no dense attn_mask: write the mask as a pattern; a mask that "
                 "comes with the data enters as a runtime input (e.g. \"causal & same(doc)\" "
                 "called with doc=segment_ids, or \"causal & keep[k]\" with keep=padding "
                 "mask); in Hugging Face models use attn_implementation=\"spattn\" "
                 "(spattn.integrations.transformers), which builds them from the padding",
    "enable_gqa": "spattn takes no enable_gqa: grouped-query attention is automatic when q "
                  "has a multiple of k's heads (query head h reads key head h // (Hq // Hk)); "
                  "drop the keyword",
    "dropout_p": "spattn has no attention dropout: drop dropout_p (with dropout_p=0.0 the "
                 "call is the same without it; for dropout apply it outside attention)",
    "key_padding_mask": "spattn takes no key_padding_mask: pass the mask as a runtime input "
                        "of the pattern, e.g. \"causal & keep[k]\" with keep=mask (1 = a "
                        "real key)",
    "need_weights": "spattn forms no attention weights (its kernels never materialise "
                    "them): drop need_weights; pattern.mask(Lq, Lk) gives the dense mask",
    "block_mask": "spattn takes no block_mask: it derives the block structure from the "
                  "pattern; the reusable object is a plan, plan = pat.plan(q, k, v), "
                  "then pat(q, k, v, plan=plan)",
    "score_mod": "spattn takes no score_mod function: a score is an expression compiled with "
                 "the pattern, spattn.compile(src, score=\"softcap(30.0)\") or "
                 "score=\"s + bias[h, q - k]\" (docs/language.md, scores), its tables passed "
                 "as runtime inputs",
}


def check_layout(layout) -> str | None:
    """``layout`` checked: None, ``"bhsd"`` or ``"bshd"``; SpattnValueError otherwise."""
    if layout is None or (isinstance(layout, str) and layout in LAYOUTS):
        return layout
    raise SpattnValueError(f"layout must be 'bhsd' (q [B, H, L, D], the default) or 'bshd' "
                           f"(q [B, L, H, D]), got {short_repr(layout)}")


def to_bhsd(layout, q, k, v):
    """q, k, v as ``[B, H, L, D]`` views (``layout`` checked)."""
    layout = check_layout(layout)
    if layout == "bshd":
        for name, t in (("q", q), ("k", k), ("v", v)):
            if isinstance(t, torch.Tensor) and t.dim() != 4:
                raise SpattnInputError(f"{name} must be a 4-D tensor [B, L, H, D] "
                                       f"(layout='bshd'), got shape {tuple(t.shape)} "
                                       f"({t.dim()}-D)")
        return tuple(t.transpose(1, 2) if isinstance(t, torch.Tensor) else t
                     for t in (q, k, v))
    return q, k, v


def from_bhsd(layout, o):
    """The output ``[B, H, L, D]`` in the call's layout (a view for ``bshd``)."""
    return o.transpose(1, 2) if layout == "bshd" else o


def output(layout, out, return_lse: bool):
    """A call's result in its layout: ``o`` (:func:`from_bhsd`), or ``(o, lse)`` with
    ``return_lse`` (lse ``[B, H, L]`` stays as it is)."""
    return (from_bhsd(layout, out[0]), out[1]) if return_lse else from_bhsd(layout, out)


def warn_if_transposed(q) -> None:
    """The layout warning for a validated q ``[B, H, L, D]`` given without ``layout=``
    that reads as more than :data:`MAX_HEADS` heads, and more heads than positions.

    Only q is read (the call path already holds its shape): a bshd prefill has q's
    length in the heads' place; a bshd decode (one query, many keys) fails the head
    check instead, whose error says ``layout='bshd'`` (:func:`with_layout_hint`)."""
    if q.shape[1] > MAX_HEADS and q.shape[1] > q.shape[2]:
        warnings.warn(
            f"spattn: q has shape {tuple(q.shape)}, read as [B, H, L, D]: {q.shape[1]} "
            f"heads of length {q.shape[2]}. If it is [B, L, H, D] (e.g. a Hugging Face "
            "projection before its transpose), pass layout='bshd'; if it is meant, pass "
            "layout='bhsd' to silence this warning",
            SpattnLayoutWarning, stacklevel=5)


def check_keywords(declared, given) -> None:
    """SpattnParamError for a keyword of another attention API in ``given`` (a call's
    keyword arguments) that is not a runtime input the pattern ``declared``."""
    for name in given:
        if name in SDPA_KEYWORDS and name not in declared:
            value = given[name]
            shown = (f"<a tensor of shape {tuple(value.shape)}>"
                     if isinstance(value, torch.Tensor) else short_repr(value))
            raise SpattnParamError(f"{name}={shown}: {SDPA_KEYWORDS[name]}")


def check_flags(**flags) -> None:
    """SpattnTypeError for a keyword flag (``return_lse``, ``deterministic``, ...) that is
    not a bool: Python's truth would read ``deterministic="no"`` as true."""
    for name, value in flags.items():
        if not is_bool(value):
            raise SpattnTypeError(f"{name} must be True or False, got {short_repr(value)} "
                                  f"({type(value).__name__})")


def warn_if_false(ir, name: str) -> None:
    """The compile-time warning: the canonical IR is ``false`` (e.g. ``window(0)``)."""
    from ..ir.nodes import BoolConst
    if isinstance(ir, BoolConst) and not ir.value:
        warnings.warn(f"spattn: pattern {name!r} allows no (query, key) pair at any shape "
                      "(it simplifies to 'false'): every output row will be 0",
                      SpattnEmptyPatternWarning, stacklevel=3)


def warn_if_empty(call) -> None:
    """The first-call warning: every tile of this call is EMPTY.

    Without runtime inputs the analysis classifies the whole ``Lq x Lk`` matrix as one tile
    per (batch, head) on the CPU (a few scalar interval evaluations, no device work); with
    inputs it reads the tile classes the plan built (the table strategy), if any. Only a
    proof warns: a tile called EMPTY has no allowed pair."""
    from ..ir.nodes import BoolConst
    from ..ir.tiles import EMPTY, classify
    pattern = call.pattern
    if isinstance(pattern.ir, BoolConst):
        return                          # warned at compile time (false) or trivially not
    if pattern.inputs:
        analysis = call.analysis
        fine = next(iter(analysis.fine.values()), None) if analysis is not None else None
        if fine is None or bool((fine != EMPTY).any()):
            return
    else:
        cls = classify(pattern, call.Lq, call.Lk, call.Lq, call.Lk, positions=call.positions,
                       refine=False, device="cpu",
                       num_heads=call.H if _per(pattern, "h", "H") else 1,
                       batch=call.B if _per(pattern, "b") else 1)
        if bool((cls != EMPTY).any()):
            return
    warnings.warn(f"spattn: pattern {pattern.name!r} ({pattern.source}) allows no (query, key) "
                  f"pair at Lq={call.Lq}, Lk={call.Lk}, {call.positions}: every output row is 0",
                  SpattnEmptyPatternWarning, stacklevel=6)


def _per(pattern, *names) -> bool:
    from ..ir.nodes import free_vars
    return bool(set(names) & free_vars(pattern.ir))


#: The options of :meth:`Pattern.kernel_source`'s configuration form (``kind, **options``).
KERNEL_OPTIONS = ("head_dim", "dtype", "strategy", "block_m", "block_n", "num_warps",
                  "num_stages", "block_m1", "block_n1", "block_m2", "block_n2", "loop", "tma",
                  "score_load", "score_index", "fast_tanh", "rows", "dq")


def kernel_source_for(pattern, q, k, v, *, kind: str = "fwd", scale=None, q_offset=None,
                      layout=None, **inputs) -> str:
    """The text of the generated module that a call with these tensors runs (``kind``
    ``"fwd"`` or ``"bwd"``): a plan is built for them, so the dtype, the head dim, the
    settings and what :func:`spattn.codegen.config.pick` (and on CUDA the autotuner) chose
    are the call's. A scored call that runs in its mask's layout
    (:class:`spattn.runtime.scores.LayoutRun`) shows the kernel of the pattern over slots
    it runs, as its plan does. Tensors that run on the torch backend run no generated kernel: a
    :class:`~spattn.dsl.errors.SpattnBackendError` says so."""
    import sys

    from ..dsl.errors import SpattnBackendError
    from .api import make_plan
    if kind not in ("fwd", "bwd"):
        raise SpattnValueError(f"unknown kernel kind {short_repr(kind)}: expected 'fwd' "
                               "(forward) or 'bwd' (backward)")
    from ..dsl.resolve import CALL_KEYWORDS
    other = sorted(n for n in inputs if n in CALL_KEYWORDS)
    if other:
        from ..dsl.errors import SpattnParamError
        raise SpattnParamError(
            f"kernel_source(q, k, v) takes kind, scale, q_offset, layout and the runtime "
            f"inputs of a call; {', '.join(map(repr, other))} "
            f"({'; '.join(CALL_KEYWORDS[n] for n in other)}): a call keyword it does not "
            "take")
    config = sorted(n for n in inputs if n in KERNEL_OPTIONS
                    and n not in pattern.inputs and n not in getattr(pattern, "score_inputs", {}))
    if config:
        from ..dsl.errors import SpattnParamError
        raise SpattnParamError(
            f"kernel_source(q, k, v) shows the kernel these tensors run, configured as "
            f"their call is; {', '.join(map(repr, config))} "
            f"{'is an option' if len(config) == 1 else 'are options'} of "
            f"kernel_source(kind, **options), the kernel of a configuration")
    if kind == "fwd":
        routed = _routed_source(pattern, q, k, v, scale, q_offset, layout, inputs)
        if routed is not None:
            return routed
    # (a scored call in its mask's layout: the plan is the slots' pattern's, runtime.scores)
    plan = make_plan(pattern, q, k, v, scale=scale, q_offset=q_offset, inputs=inputs,
                     backward=kind == "bwd", layout=layout)
    if plan.backend != "triton":
        raise SpattnBackendError(
            f"tensors on {plan.device} run spattn's torch backend, which runs no generated "
            "kernel: pass CUDA tensors (or set TRITON_INTERPRET=1, or compile with "
            "backend='triton'), or ask for a configuration with "
            "pat.kernel_source(kind, head_dim=..., dtype=...)")
    if kind == "fwd":
        kernel = plan.forward_stage.kernel
    else:
        # (a permuted plan's stages are its inner plan's)
        kernel = next(iter(getattr(plan, "inner", plan)._bwd.values())).dq_kernel
    return _source(sys.modules[getattr(kernel, "fn", kernel).__module__])


def _source(module) -> str:
    """The text of a generated module, as its loader read it."""
    return module.__loader__.get_source(module.__name__)


def _routed_source(pattern, q, k, v, scale, q_offset, layout, inputs) -> str | None:
    """The decode module a call of few queries runs (``Pattern.__call__``'s decode route,
    docs/decode.md), or None where the call takes the normal path."""
    from . import decode
    q, k, v = to_bhsd(layout, q, k, v)
    if not decode.routes(q, k, v, q_offset):
        return None
    plan = decode.routed_plan(pattern, q, k, v, scale=scale, q_offset=q_offset, inputs=inputs)
    if plan is None or plan.backend != "triton":
        return None
    return _source(plan.module)


def with_layout_hint(err, layout, q, k, v, retry=None):
    """``err`` (a SpattnInputError about q, k, v) with what the layout has to do with it:
    tensors that would be valid read as ``[B, L, H, D]`` (no ``layout=`` given) get a hint
    to pass ``layout="bshd"``; with ``layout="bshd"`` the shapes in the message are the
    transposed ones, and it says so. ``retry(q, k, v)``: the checks that raised ``err``;
    when given, the hint needs them to pass on the transposed tensors (an error about a
    missing input or a table's dtype gets none)."""
    from .api import validate
    if layout == "bshd":
        note = " (shapes shown as [B, H, L, D]: layout='bshd' transposed q, k, v)"
    elif layout is None and all(isinstance(t, torch.Tensor) and t.dim() == 4
                                for t in (q, k, v)):
        try:
            validate(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            if retry is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    retry(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        except Exception:       # noqa: BLE001 -- not valid read so either: the error as it is
            return err
        note = (" (read as [B, L, H, D] the tensors would be valid: if that is their "
                "layout, pass layout='bshd')")
    else:
        return err
    return type(err)(err.message + note)
