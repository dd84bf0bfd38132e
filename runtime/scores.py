"""Attention with a score modification: validation, the torch backend, autograd.

A pattern with a score (``Pattern.score``, ``docs/language.md`` §13) runs here:
:func:`call` validates the call (the mask's int inputs as for every pattern; the score's
float inputs: floating dtype, q's device, index dims, and every index in range,
``ir.intervals.check_input_bounds``), then runs the backend through
:class:`ScoreFunction`, whose inputs are q, k, v *and* the float inputs, so that a
learnable bias table that requires grad gets ``.grad``.

Backends. ``"triton"`` runs the generated kernels through the call's plan
(``runtime.plan.PLANS``; the tables are leading kernel arguments of every launch, not
part of the plan): the forward applies the score to every computed pair, the dQ kernel
adds the tables' gradients with ``tl.atomic_add`` into float32 buffers.

The torch backend (:func:`fwd`, :func:`bwd`) computes by query row chunks, each against
the keys of its non-EMPTY tiles (:func:`_chunks`): scores ``q·k * scale`` in float32
(float64 for float64 inputs), the score applied by :func:`spattn.ir.score.score_values`,
the mask evaluated from the IR, then a masked softmax. Its backward uses the compiler's
derivatives (:func:`spattn.ir.score.grads`): ``dS' = P * (dP - delta)`` is the gradient
of the modified score, ``dS = dS' * f'(s)`` gives dq and dk, and a table's gradient is
``dS' * d f / d load`` scattered into the table with ``index_put_(accumulate=True)``
(deterministic on the CPU; on CUDA with ``deterministic=True`` or under
``torch.use_deterministic_algorithms(True)``).
"""
from __future__ import annotations

import math

import torch

from ..dsl.errors import SpattnBackendError, SpattnInputError, SpattnParamError
from ..ir import build
from ..ir.evaluate import evaluate
from ..ir.inputs import check_shape, validate_inputs
from ..ir.score import grads, score_env, score_values

__all__ = ["call", "fwd", "bwd", "ScoreFunction", "validate_score_inputs", "FLOAT_DTYPES"]

#: dtypes a float runtime input (a score's table) may have
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: score elements per row chunk of the torch backend (bounds its memory)
CHUNK_SCORES = 1 << 22


def validate_score_inputs(declared: dict, given: dict, *, batch: int, num_heads: int,
                          device) -> dict:
    """Check the float runtime inputs of a score (tensors returned as given)."""
    out = {}
    for name, nd in declared.items():
        if name not in given:
            raise SpattnInputError(f"missing runtime input {name!r}: the score reads it as a "
                                   f"float table with {nd} index dimension"
                                   f"{'s' if nd != 1 else ''}")
        t = given[name]
        if not isinstance(t, torch.Tensor):
            raise SpattnInputError(f"runtime input {name!r} must be a torch.Tensor, got "
                                   f"{type(t).__name__}")
        if t.layout is not torch.strided or t.is_nested or t.is_meta:
            raise SpattnInputError(f"runtime input {name!r} must be a dense tensor with data")
        if t.dtype not in FLOAT_DTYPES:
            raise SpattnInputError(f"runtime input {name!r} (shape {tuple(t.shape)}) has dtype "
                                   f"{t.dtype}, but the score reads it as a float table: pass "
                                   "a float16, bfloat16, float32 or float64 tensor")
        if t.device != torch.device(device):
            raise SpattnInputError(f"runtime input {name!r} (shape {tuple(t.shape)}) is on "
                                   f"{t.device}, but q is on {device}: the score's tables "
                                   "must be on q's device")
        check_shape(name, t, nd, batch=batch, num_heads=num_heads, reader="the score")
        out[name] = t
    return out


def check_score_bounds(pattern, int_inputs: dict, float_inputs: dict, Lq: int, Lk: int, *,
                       num_heads: int, batch: int, q_offset: int) -> None:
    """Every index of the score's loads in range (as for the mask's inputs)."""
    from ..ir.intervals import check_input_bounds
    from ..ir.nodes import FLoad, Load, walk
    loads = {}
    for n in walk(pattern.score):
        if isinstance(n, (Load, FLoad)):
            loads[Load(n.name, n.index)] = None
    if not loads:
        return
    probe = build.and_(*(build.range_(ld, 0, 0) for ld in loads))
    check_input_bounds(probe, {**int_inputs, **float_inputs}, Lq, Lk, num_heads=num_heads,
                       batch=batch, q_offset=q_offset)


# ------------------------------------------------------------------ torch backend

def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(B, H, Lk) -> int:
    return max(1, CHUNK_SCORES // max(1, B * H * Lk))


def _expand_kv(t, Hq):
    Hk = t.shape[1]
    return t if Hk == Hq else t.repeat_interleave(Hq // Hk, dim=1)


#: key tile of the torch backend's key spans (the analysis skips EMPTY tiles at this grain)
SPAN_BLOCK = 64


def _chunks(pattern, B, H, Lq, Lk, off, ins, device):
    """``[(r0, r1, c0, c1)]``: the row chunks and, for each, the keys its rows may see —
    the span of its non-EMPTY key tiles (tile classes of the mask: EMPTY is a proof)."""
    from ..ir.tiles import EMPTY, classify
    step = _rows(B, H, Lk)
    tiles = classify(pattern, Lq, Lk, step, SPAN_BLOCK, num_heads=H, batch=B, q_offset=off,
                     device=device, inputs={n: t for n, t in ins.items()
                                            if n in pattern.inputs})
    live = (tiles != EMPTY).flatten(0, 1).any(0)            # [row chunks, key tiles]
    out = []
    for i, r0 in enumerate(range(0, Lq, step)):
        cols = torch.nonzero(live[i]).flatten().tolist()
        if not cols:
            continue                                          # no key: rows stay 0 / -inf
        out.append((r0, min(Lq, r0 + step), cols[0] * SPAN_BLOCK,
                    min(Lk, (cols[-1] + 1) * SPAN_BLOCK)))
    return out


def _chunk(pattern, s, r0, r1, c0, c1, Lq, Lk, B, H, off, ins):
    """(env, mask, modified score) of rows r0..r1 against keys c0..c1 (masked scores
    -inf)."""
    env = score_env(Lq, Lk, num_heads=H, batch=B, q_offset=off, device=s.device,
                    rows=(r0, r1), cols=(c0, c1))
    m = evaluate(pattern.ir, env, ins)
    m = torch.as_tensor(m, device=s.device).to(torch.bool).expand(s.shape)
    f = score_values(pattern.score, s, env, ins)
    f = torch.where(m, f, torch.full((), -math.inf, dtype=f.dtype, device=f.device))
    return env, m, f


def fwd(pattern, q, k, v, *, scale: float, q_offset: int, inputs: dict):
    """``(o [B, Hq, Lq, D] q.dtype, lse [B, Hq, Lq] float32 or float64)``."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    acc = _acc(q.dtype)
    kk, vv = _expand_kv(k, H).to(acc), _expand_kv(v, H).to(acc)
    o = torch.zeros(q.shape[:3] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    lse = torch.full((B, H, Lq), -math.inf, dtype=acc, device=q.device)
    for r0, r1, c0, c1 in _chunks(pattern, B, H, Lq, Lk, q_offset, inputs, q.device):
        s = torch.matmul(q[:, :, r0:r1].to(acc), kk[:, :, c0:c1].transpose(-1, -2)) * scale
        _, _, f = _chunk(pattern, s, r0, r1, c0, c1, Lq, Lk, B, H, q_offset, inputs)
        mx = f.amax(-1, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        p = torch.exp(f - mx)
        l = p.sum(-1, keepdim=True)
        has = l > 0
        l1 = torch.where(has, l, torch.ones_like(l))
        o[:, :, r0:r1] = torch.matmul(p / l1, vv[:, :, c0:c1]).to(q.dtype)
        lse[:, :, r0:r1] = torch.where(has, mx + torch.log(l1),
                                       torch.full((), -math.inf, dtype=acc,
                                                  device=q.device)).squeeze(-1)
    return o, lse


def _scatter(grad: torch.Tensor, load, env, ins, g: torch.Tensor,
             deterministic: bool = False) -> None:
    """``grad[b, h, *index] += g`` over the pairs (``grad`` shaped like the table).
    ``deterministic``: on CUDA, torch's sorted (deterministic) accumulation is used for
    this call whatever the global setting (the CPU's is deterministic already)."""
    nd = len(load.index)
    full = grad
    if grad.dim() == nd + 1:
        full = grad.unsqueeze(1)
    elif grad.dim() == nd:
        full = grad.reshape(1, 1, *grad.shape)
    shape = g.shape
    idx = []
    for i in load.index:
        v = evaluate(i, env, ins)
        idx.append(torch.as_tensor(v, dtype=torch.int64, device=g.device).expand(shape))
    bi = env["b"].expand(shape) if full.shape[0] > 1 else torch.zeros(shape, dtype=torch.int64,
                                                                       device=g.device)
    hi = env["h"].expand(shape) if full.shape[1] > 1 else torch.zeros(shape, dtype=torch.int64,
                                                                       device=g.device)
    if deterministic and g.device.type == "cuda" and \
            not torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(True)
        try:
            full.index_put_((bi, hi, *idx), g.to(full.dtype), accumulate=True)
        finally:
            torch.use_deterministic_algorithms(False)
        return
    full.index_put_((bi, hi, *idx), g.to(full.dtype), accumulate=True)


def bwd(pattern, q, k, v, o, lse, do, *, scale: float, q_offset: int, inputs: dict,
        dlse=None, table_grads: tuple = (), deterministic: bool = False):
    """``(dq, dk, dv, {table name: grad})``; ``table_grads``: the float inputs to
    differentiate (each gets a gradient shaped like it, float32 or float64)."""
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    acc = _acc(q.dtype)
    g = grads(pattern.score)
    kk, vv = _expand_kv(k, H).to(acc), _expand_kv(v, H).to(acc)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dkk = torch.zeros(kk.shape, dtype=acc, device=q.device)
    dvv = torch.zeros(vv.shape, dtype=acc, device=q.device)
    tg = {n: torch.zeros(inputs[n].shape, dtype=_acc(inputs[n].dtype), device=q.device)
          for n in table_grads}
    for r0, r1, c0, c1 in _chunks(pattern, B, H, Lq, Lk, q_offset, inputs, q.device):
        qc = q[:, :, r0:r1].to(acc)
        kc, vc = kk[:, :, c0:c1], vv[:, :, c0:c1]
        s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
        env, m, f = _chunk(pattern, s, r0, r1, c0, c1, Lq, Lk, B, H, q_offset, inputs)
        lr = lse[:, :, r0:r1].to(acc).unsqueeze(-1)
        lr = torch.where(torch.isfinite(lr), lr, torch.full((), math.inf, dtype=acc,
                                                             device=q.device))
        p = torch.exp(f - lr)
        doc = do[:, :, r0:r1].to(acc)
        dp = torch.matmul(doc, vc.transpose(-1, -2))
        delta = (doc * o[:, :, r0:r1].to(acc)).sum(-1, keepdim=True)
        if dlse is not None:
            delta = delta - dlse[:, :, r0:r1].to(acc).unsqueeze(-1)
        dsm = p * (dp - delta)                       # gradient of the modified score
        zero = torch.zeros((), dtype=acc, device=q.device)
        # only pairs of weight P > 0 contribute (the kernels' rule): a score of -inf excludes
        # its pair like the mask, even where its derivative is infinite (0 * inf)
        m = m & (p != 0)
        d = torch.where(m, dsm * score_values(g.ds, s, env, inputs), zero)
        dq[:, :, r0:r1] = torch.matmul(d, kc) * scale
        dkk[:, :, c0:c1] += torch.matmul(d.transpose(-1, -2), qc) * scale
        dvv[:, :, c0:c1] += torch.matmul(p.transpose(-1, -2), doc)
        for name in table_grads:
            for load, dl in g.of(name):
                gl = torch.where(m, dsm * score_values(dl, s, env, inputs), zero)
                _scatter(tg[name], load, env, inputs, gl, deterministic)
    if Hk != H:
        dkk = dkk.view(B, Hk, H // Hk, Lk, D).sum(2)
        dvv = dvv.view(B, Hk, H // Hk, Lk, -1).sum(2)
    return dq.to(q.dtype), dkk.to(k.dtype), dvv.to(v.dtype), tg


# ------------------------------------------------------------------ autograd

class _Ctx:
    """What a call's forward and backward share (not a tensor: kept off the autograd graph).
    ``int_inputs``: the mask's inputs as int64 tensors (torch backend); ``plan``: the
    Triton backend's plan of the call (its mask, tiles and kernels)."""

    def __init__(self, pattern, backend, scale, q_offset, int_inputs, names, *,
                 plan=None, deterministic=False):
        self.pattern, self.backend, self.scale = pattern, backend, scale
        self.q_offset, self.int_inputs, self.names = q_offset, int_inputs, names
        self.plan, self.deterministic = plan, deterministic


def _tables(c: _Ctx, ins: dict) -> dict:
    return {n: ins[n].contiguous() for n in c.names}


def _run_fwd(c: _Ctx, q, k, v, ins):
    if c.backend == "triton":
        from . import triton_backend
        return triton_backend.run_fwd(c.plan.forward_stage, q, k, v, tables=_tables(c, ins))
    return fwd(c.pattern, q, k, v, scale=c.scale, q_offset=c.q_offset, inputs=ins)


def _run_bwd(c: _Ctx, q, k, v, o, lse, do, ins, dlse, table_grads):
    triton = c.backend == "triton" and (dlse is None or not bool((dlse != 0).any())) \
        and not (c.deterministic and table_grads)
    if triton:
        from . import triton_backend
        tables = _tables(c, ins)
        bufs = {n: torch.zeros(tables[n].shape, dtype=torch.float32, device=q.device)
                for n in table_grads}
        stage = c.plan.backward_stage(q, k, v, o, do)
        dq, dk, dv = triton_backend.run_bwd(stage, q, k, v, o, lse, do, tables=tables,
                                            table_grads=bufs)
        return dq, dk, dv, bufs
    return bwd(c.pattern, q, k, v, o, lse, do, scale=c.scale, q_offset=c.q_offset,
               inputs=ins, dlse=dlse, table_grads=table_grads, deterministic=c.deterministic)


class ScoreFunction(torch.autograd.Function):
    """``apply(ctx, q, k, v, *tables) -> (o, lse)``; gradients to q, k, v and to the float
    tables (in ``ctx.names`` order) that require grad."""

    @staticmethod
    def forward(ctx, c: _Ctx, q, k, v, *tables):
        ins = {**c.int_inputs, **dict(zip(c.names, tables))}
        o, lse = _run_fwd(c, q, k, v, ins)
        ctx.save_for_backward(q, k, v, o, lse, *tables)
        ctx.c = c
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, *tables = ctx.saved_tensors
        c = ctx.c
        nt = len(tables)
        if do is None and dlse is None:
            return (None,) * (4 + nt)
        if do is None:
            do = torch.zeros_like(o)
        want = tuple(n for n, need in zip(c.names, ctx.needs_input_grad[4:]) if need)
        ins = {**c.int_inputs, **dict(zip(c.names, tables))}
        dq, dk, dv, tg = _run_bwd(c, q, k, v, o, lse, do, ins, dlse, want)
        dt = tuple(tg[n].to(t.dtype) if n in tg else None for n, t in zip(c.names, tables))
        return (None, dq, dk, dv) + dt


def call(pattern, q, k, v, *, scale=None, return_lse=False, q_offset=None, inputs=None,
         plan=None, deterministic=False):
    """Attention of a pattern with a score: ``o`` (and ``lse`` when ``return_lse``).

    ``deterministic``: learnable tables get their gradients without atomic adds (the
    torch backend's backward runs that call's backward); q, k, v gradients are
    deterministic either way."""
    from .api import _check_scale, check_q_offset, check_runtime_tensors, choose_backend, \
        validate
    if plan is not None:
        raise SpattnParamError("plan= is not available for a pattern with a score: call "
                               "without it")
    if torch.compiler.is_compiling():
        raise SpattnBackendError("a pattern with a score does not run under torch.compile "
                                 "yet: call it eagerly (outside the compiled region)")
    validate(q, k, v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = _check_scale(scale, D)
    off = check_q_offset(q_offset, Lq, Lk)
    inputs = dict(inputs or {})
    extra = [n for n in inputs if n not in pattern.inputs and n not in pattern.score_inputs]
    if extra:
        known = ", ".join(repr(n) for n in pattern.all_inputs) or "none"
        raise SpattnInputError(f"unexpected runtime input {', '.join(map(repr, extra))}: the "
                               f"pattern's inputs are {known}")
    given_int = {n: t for n, t in inputs.items() if n in pattern.inputs}
    given_float = {n: t for n, t in inputs.items() if n in pattern.score_inputs}
    check_runtime_tensors(given_int)
    given = validate_inputs(pattern.inputs, given_int, batch=B, num_heads=H, device=q.device,
                            convert=lambda t, device, dtype: t)
    ints = {n: t.to(device=q.device, dtype=torch.int64) for n, t in given.items()}
    floats = validate_score_inputs(pattern.score_inputs, given_float, batch=B, num_heads=H,
                                   device=q.device)
    from ..ir import bounds
    from ..ir.intervals import check_input_bounds
    if ints:
        check_input_bounds(pattern, ints, Lq, Lk, num_heads=H, batch=B, q_offset=off)
    bounds.check_call(pattern, Lq, Lk, num_heads=H, batch=B, q_offset=off, inputs=ints)
    check_score_bounds(pattern, ints, floats, Lq, Lk, num_heads=H, batch=B, q_offset=off)
    backend = choose_backend(pattern.backend, q.device.type)
    names = tuple(pattern.score_inputs)
    tables = [floats[n] for n in names]
    plan = None
    if backend == "triton":
        from .plan import PLANS
        plan = PLANS.get(pattern, "triton", q, k, v, scale=scale, q_offset=off, inputs=given,
                         tables={n: t.detach().contiguous() for n, t in floats.items()})
    c = _Ctx(pattern, backend, scale, off, ints, names, plan=plan,
             deterministic=bool(deterministic))
    need = torch.is_grad_enabled() and (any(t.requires_grad for t in (q, k, v))
                                        or any(t.requires_grad for t in tables))
    if need:
        o, lse = ScoreFunction.apply(c, q, k, v, *tables)
    else:
        o, lse = _run_fwd(c, q, k, v, {**ints, **floats})
    return (o, lse) if return_lse else o
