"""Calls under ``torch.func`` transforms: ``vmap``, ``grad``, ``vjp``, ``jacrev``, and
``functional_call`` under them (per-sample gradients, ensembles of models).

The kernels read plain tensors' memory, and a transform's tensors (vmap's batched tensors,
grad's tracking tensors) have none. A call that is given one runs through two autograd
functions written for the transforms (``setup_context`` form, with a ``vmap`` rule), over
the custom ops' implementations (:mod:`spattn.runtime.autograd`), which plan the plain
tensors they are given as any call does:

* :class:`_Forward` ``(o, lse)``; its backward is :class:`_Backward` ``(dq, dk, dv,
  *table grads)``, whose own backward raises (spattn is differentiable once; jvp and the
  forward-mode transforms raise too);
* both ``vmap`` rules fold the mapped dimension into the batch: ``[N, B, H, L, D] ->
  [N * B, H, L, D]``. A runtime input or score table that is mapped, or has a batch axis
  (a leading ``[B]`` or ``[1]``, or an index the pattern reads at a bare ``b``), gets one
  of ``N * B``; one with neither is shared, as it was. In the backward every table that
  needs a gradient is expanded to ``N * B`` batch elements, and its gradient summed back
  over the ``B`` of each sample: the gradient of sample ``n`` alone, which is what
  ``vmap(grad(f))`` asks for. The folding is exact: batch elements never meet in
  attention. Where the pattern reads ``b`` otherwise (:func:`batch_axes`), the rules call
  once per sample.

The arguments are checked at the call, on the transform's tensors (their logical shapes,
as the user wrote them); index bounds, which may read values, where the plain tensors are
planned.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..dsl.errors import SpattnBackendError, SpattnError, SpattnParamError
from .usage import FORWARD_MODE, plain

__all__ = ["call"]


@dataclass(frozen=True)
class _Call:
    """What a transformed call passes its functions besides tensors: the pattern's key (for
    :func:`~spattn.runtime.autograd.lookup`), the names of its int inputs and float tables
    (sorted), the int inputs' declaration (the pattern's own: a pattern registered under
    the same key may declare others), each one's batch axis for a vmap rule that folds
    (:func:`_fold_input`; None: the rule calls once per sample), the checked scale, the
    query offset resolved (folding keeps the lengths), the backend."""
    key: str
    scored: bool
    ints: tuple
    declared: tuple
    tables: tuple
    axes: tuple | None
    scale: float
    q_offset: int
    backend: str
    deterministic: bool
    folded: bool = False

    def forward(self, q, k, v, tensors):
        from . import autograd as ag
        from .api import traced_arguments
        ints = dict(zip(self.ints, tensors[:len(self.ints)]))
        try:
            scale, q_offset, ins, backend = traced_arguments(dict(self.declared), self.backend,
                                                             q, k, v, self.scale,
                                                             self.q_offset, ints)
            ins = [ins[n] for n in self.ints]
            if self.scored:
                return ag.score_attention_op(q, k, v, ins, list(tensors[len(self.ints):]),
                                             ",".join(self.tables), self.key, scale,
                                             q_offset, backend, self.deterministic, [])
            return ag.attention_op(q, k, v, ins, self.key, scale, q_offset, backend, [])
        except SpattnError as e:
            if not self.folded or e.line is not None:
                raise
            raise type(e)(f"{e.message} (under vmap: the shapes of the call with the mapped "
                          "dimension folded into B)") from None

    def backward(self, want, q, k, v, o, lse, do, dlse, tensors):
        from . import autograd as ag
        ins = list(tensors[:len(self.ints)])
        q_offset = self.q_offset
        if do is None:
            do = torch.zeros_like(o)
        if self.scored:
            return tuple(ag.score_attention_bwd_op(
                q, k, v, o, lse, do, dlse, ins, list(tensors[len(self.ints):]),
                ",".join(self.tables), list(want), self.key, self.scale, q_offset,
                self.backend, self.deterministic, []))
        return ag.attention_bwd_op(q, k, v, o, lse, do, dlse, ins, self.key, self.scale,
                                   q_offset, self.backend, [])


def batch_axes(pattern) -> dict | None:
    """``{input name: the index position where the pattern (mask or score) reads it at a
    bare b, or None}``, or None when ``b`` appears anywhere else (``b % 2``, ``w[b + 1]``,
    a list param at ``b``, a load at ``b`` in two positions or at different positions): a
    call folded to ``N * B`` batch elements would compute another mask or score there."""
    from ..ir.nodes import FLoad, Load, Var, walk
    b = Var("b")
    roots = [getattr(pattern, "ir", None), getattr(pattern, "score", None)]
    if roots[0] is None:
        return None
    axes: dict = {}
    seen = bare = 0
    for root in roots:
        if root is None:
            continue
        for n in walk(root):
            if n == b:
                seen += 1
            elif isinstance(n, (Load, FLoad)):
                at = [i for i, ix in enumerate(n.index) if ix == b]
                if len(at) > 1:
                    return None
                pos = at[0] if at else None
                if axes.setdefault(n.name, pos) != pos:
                    return None
                bare += len(at)
    return axes if seen == bare else None


def _lead(t, d, N):
    """``t`` with the mapped dimension first: moved there (``d``), or ``t`` expanded over
    ``N`` where it is not mapped (``d`` None)."""
    return t.movedim(d, 0) if d is not None else t.expand(N, *t.shape)


def _fold(t, d, N):
    """A mapped q, k, v or gradient ``[N, B, ...]`` (``d``: its mapped dim) as ``[N * B, ...]``."""
    t = _lead(t, d, N)
    return t.reshape(N * t.shape[1], *t.shape[2:])


def _logical(t, d):
    """The shape of ``t`` without its mapped dimension ``d`` (None: not mapped)."""
    return tuple(t.shape) if d is None else tuple(t.shape[:d] + t.shape[d + 1:])


#: The batch axis of an input led by ``[B]`` or ``[1]`` (position 0, broadcast when 1).
LEAD = "lead"


def _fold_input(t, d, axis, N, B, *, expand=False):
    """A runtime input or table for the call folded to ``N * B`` batch elements. ``axis``:
    its batch axis, :data:`LEAD` for a leading ``[B]`` or ``[1]``, the index position the
    pattern reads at ``b``, or None for none. Shared as given where not mapped and without
    a batch axis, or with a leading ``[1]`` (``expand`` False); else sample ``n``'s batch
    element ``b`` at ``n * B + b`` of that axis (a new leading one where there was none)."""
    shape = _logical(t, d)
    if d is None and not expand and (axis is None or (axis == LEAD and shape[0] == 1)):
        return t
    t = _lead(t, d, N)
    if axis is None:
        t = t.unsqueeze(1)
    pos = 0 if axis is None or axis == LEAD else axis
    size = t.shape[pos + 1]
    t = t.narrow(pos + 1, 0, B) if size > B else t.expand(*t.shape[:pos + 1], B,
                                                          *t.shape[pos + 2:])
    return t.movedim(0, pos).flatten(pos, pos + 1)


def _folded(call, tensors, dims, N, B, expand=()):
    """``(call, tensors)`` of the folded call: each input by :func:`_fold_input`, and the
    call's axes updated (an input folded into a new leading axis has one now: a rule of an
    outer vmap reads it there)."""
    out, axes = [], []
    for i, (t, d, ax) in enumerate(zip(tensors, dims, call.axes)):
        f = _fold_input(t, d, ax, N, B, expand=i in expand)
        out.append(f)
        axes.append(ax if f is t or ax is not None else LEAD)
    return replace(call, axes=tuple(axes), folded=True), out


def _unfold_grad(g, t, d, axis, N, B):
    """The gradient of table ``t`` (mapped dim ``d``, batch ``axis`` as for
    :func:`_fold_input` with ``expand``) per sample, ``[N, *t's logical shape]``, from the
    folded call's ``g``: summed over the ``B`` copies of a table without a batch axis or
    with a leading one of size 1, zeros for the entries past ``B`` of an index the call
    reads at b."""
    shape = _logical(t, d)
    pos = 0 if axis is None or axis == LEAD else axis
    g = g.unflatten(pos, (N, B)).movedim(pos, 0)
    if axis is None:
        return g.sum(1)
    if shape[pos] == 1 and B > 1:
        return g.sum(pos + 1, keepdim=True)
    if shape[pos] > B:
        pad = list(g.shape)
        pad[pos + 1] = shape[pos] - B
        g = torch.cat([g, g.new_zeros(pad)], pos + 1)
    return g


def _unbind(t, d, i):
    return t if t is None or d is None else t.select(d, i)


class _Forward(torch.autograd.Function):
    """``apply(call, q, k, v, *tensors) -> (o, lse)``: the call's ints then its tables."""

    @staticmethod
    def forward(call, q, k, v, *tensors):
        return call.forward(q, k, v, tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        call, q, k, v, *tensors = inputs
        ctx.save_for_backward(q, k, v, *output, *tensors)
        ctx.call = call
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, *tensors = ctx.saved_tensors
        call = ctx.call
        if do is None and dlse is None:
            return (None,) * (4 + len(tensors))
        want = tuple(ctx.needs_input_grad[4 + len(call.ints):])
        do, dlse = plain(do), plain(dlse)
        grads = _Backward.apply(call, want, q, k, v, o, lse, do, dlse, *tensors)
        dt = [g if w else None for g, w in zip(grads[3:], want)]
        return (None, *grads[:3], *(None,) * len(call.ints), *dt)

    @staticmethod
    def vmap(info, in_dims, call, q, k, v, *tensors):
        N = info.batch_size
        if call.axes is None:       # one call per sample
            outs = [_Forward.apply(call, *(_unbind(t, d, i) for t, d in
                                           zip((q, k, v, *tensors), in_dims[1:])))
                    for i in range(N)]
            return tuple(torch.stack(o) for o in zip(*outs)), (0, 0)
        B = _logical(q, in_dims[1])[0]
        qf, kf, vf = (_fold(t, d, N) for t, d in zip((q, k, v), in_dims[1:4]))
        folded, tf = _folded(call, tensors, in_dims[4:], N, B)
        o, lse = _Forward.apply(folded, qf, kf, vf, *tf)
        return (o.view(N, B, *o.shape[1:]), lse.view(N, B, *lse.shape[1:])), (0, 0)

    @staticmethod
    def jvp(ctx, *tangents):
        raise SpattnBackendError(FORWARD_MODE)


class _Backward(torch.autograd.Function):
    """``apply(call, want, q, k, v, o, lse, do, dlse, *tensors) -> (dq, dk, dv, *table
    grads)``: the gradients of :class:`_Forward`, a table's zeros where ``want`` is False."""

    @staticmethod
    def forward(call, want, q, k, v, o, lse, do, dlse, *tensors):
        return tuple(call.backward(want, q, k, v, o, lse, do, dlse, tensors))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        from .autograd import TWICE
        raise SpattnBackendError(TWICE)

    @staticmethod
    def jvp(ctx, *tangents):
        raise SpattnBackendError(FORWARD_MODE)

    @staticmethod
    def vmap(info, in_dims, call, want, q, k, v, o, lse, do, dlse, *tensors):
        N = info.batch_size
        n_ints = len(call.ints)
        if call.axes is None:       # one call per sample
            outs = [_Backward.apply(call, want, *(_unbind(t, d, i) for t, d in zip(
                (q, k, v, o, lse, do, dlse, *tensors), in_dims[2:]))) for i in range(N)]
            return tuple(torch.stack(g) for g in zip(*outs)), (0,) * len(outs[0])
        B = _logical(q, in_dims[2])[0]
        f = [_fold(t, d, N) if t is not None else None
             for t, d in zip((q, k, v, o, lse, do, dlse), in_dims[2:9])]
        dims = in_dims[9:]
        folded, tf = _folded(call, tensors, dims, N, B,
                             expand={n_ints + i for i, w in enumerate(want) if w})
        grads = _Backward.apply(folded, want, *f, *tf)
        out = [g.view(N, B, *g.shape[1:]) for g in grads[:3]]
        dims_out = [0, 0, 0]
        for i, (g, w) in enumerate(zip(grads[3:], want)):
            j = n_ints + i
            t, d = tensors[j], dims[j]
            if w:
                out.append(_unfold_grad(g, t, d, call.axes[j], N, B))
                dims_out.append(0)
            else:
                out.append(t.new_zeros(_logical(t, d)))
                dims_out.append(None)
        return tuple(out), tuple(dims_out)


def call(pattern, q, k, v, *, scale, q_offset, inputs, plan, deterministic, order,
         layout=None):
    """``(o, lse)`` of a call given a transform's tensors (q, k, v ``[B, H, L, D]`` as the
    transform shows them), through :class:`_Forward`. ``plan=`` and ``order=`` are refused:
    a plan holds plain tensors' shapes and an order's gather reads memory."""
    from . import api
    from .autograd import register
    from ..ir.inputs import check_names
    if plan is not None:
        raise SpattnParamError("plan= was given with tensors of a torch.func transform (vmap, "
                               "grad): a plan is for the plain tensors it was made with; call "
                               "without plan= under the transform")
    if order is not None:
        raise SpattnParamError("order= is not available under torch.func transforms (vmap, "
                               "grad): call without order= there")
    given = dict(inputs or {})
    scored = getattr(pattern, "score", None) is not None
    declared = dict(pattern.inputs)
    tables = dict(getattr(pattern, "score_inputs", {}) or {}) if scored else {}
    ints = {n: given[n] for n in declared if n in given}
    scale, q_offset, _ = api._arguments(pattern, q, k, v, scale, q_offset, ints, layout,
                                        transformed=True)
    check_names({**declared, **tables}, given)
    B, Hq = q.shape[:2]
    if tables:
        from .scores import validate_score_inputs
        validate_score_inputs(tables, {n: given[n] for n in tables}, batch=B, num_heads=Hq,
                              device=q.device, transformed=True)
    backend = api.choose_backend(pattern.backend, q.device.type)
    int_names, table_names = tuple(sorted(declared)), tuple(sorted(tables))
    names = int_names + table_names
    nds = {**declared, **tables}
    at = batch_axes(pattern)
    axes = None
    if at is not None:
        axes = []
        for n in names:
            lead = given[n].dim() - nds[n]
            if lead and at.get(n) is not None:
                axes = None         # a leading batch dim and an index at b: not folded
                break
            axes.append(LEAD if lead else at.get(n))
    spec = _Call(register(pattern), scored, int_names,
                 tuple((n, declared[n]) for n in int_names), table_names,
                 None if axes is None else tuple(axes), scale, q_offset, backend,
                 bool(deterministic))
    return _Forward.apply(spec, q, k, v, *(given[n] for n in int_names),
                          *(given[n] for n in table_names))
