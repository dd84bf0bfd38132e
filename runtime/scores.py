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
adds the tables' gradients with ``tl.atomic_add`` into float32 buffers. With a 16-bit q
and a table that needs a gradient, the backward's row correction reads an fp32 copy of
the output (:func:`exact_delta`). ``deterministic=True``: partial buffers summed in a
fixed order for tables read at entries of neither q nor k, or along ``q - k``
(:func:`deterministic_on_triton`), the torch backward for other tables.

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

import functools
import math

import torch
from torch.autograd.function import once_differentiable

from ..dsl.errors import SpattnInputError, SpattnParamError
from ..ir import build
from ..ir.evaluate import evaluate
from ..ir.inputs import check_shape, validate_inputs
from ..ir.score import grads, score_env, score_values
from .plan import gather_tokens
from .usage import plain

__all__ = ["call", "fwd", "bwd", "ScoreFunction", "validate_score_inputs", "FLOAT_DTYPES"]

#: dtypes a float runtime input (a score's table) may have
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: score elements per row chunk of the torch backend (bounds its memory)
CHUNK_SCORES = 1 << 22


def validate_score_inputs(declared: dict, given: dict, *, batch: int, num_heads: int,
                          device, transformed: bool = False) -> dict:
    """Check the float runtime inputs of a score (tensors returned as given);
    ``transformed``: they may be a torch.func transform's tensors."""
    from .api import refuse_wrapped
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
        if not transformed:
            refuse_wrapped(f"runtime input {name!r}", t)
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
    """Every index of the score's loads in range (as for the mask's inputs), and of its
    float lists (a list param indexed by ``h`` needs an entry per head of the call: a
    SpattnInputError naming the list, its index's values and the call's shapes)."""
    from ..ir.intervals import check_input_bounds
    from ..ir.nodes import FLoad, FTable, Load, walk
    loads, lists = {}, {}
    for n in walk(pattern.score):
        if isinstance(n, (Load, FLoad)):
            loads[Load(n.name, n.index)] = None
        elif isinstance(n, FTable):
            lists[n] = None
    if lists:
        from ..ir import bounds
        from ..ir.printer import to_source
        domain = bounds.call_domain(Lq, Lk, num_heads=num_heads, batch=batch,
                                    q_offset=q_offset,
                                    input_ranges=bounds.input_ranges(int_inputs, measure=True))
        of = bounds.bounds_of(domain)
        for n in lists:
            lo, hi = of(n.index)
            if lo < 0 or hi >= len(n.values):
                raise SpattnInputError(
                    f"the score's list {list(n.values)} has {len(n.values)} entries, but its "
                    f"index {to_source(n.index)} takes values {lo}..{hi} in this call (Lq={Lq}, "
                    f"Lk={Lk}, q_offset={domain.q_offset}, H={num_heads}, B={batch}): give "
                    f"a list with an "
                    f"entry for each (e.g. a slope per head), or guard the index")
    if loads:
        probe = build.and_(*(build.range_(ld, 0, 0) for ld in loads))
        check_input_bounds(probe, {**int_inputs, **float_inputs}, Lq, Lk, num_heads=num_heads,
                           batch=batch, q_offset=q_offset)
    check_score_divisors(pattern, int_inputs, float_inputs, Lq, Lk, num_heads=num_heads,
                         batch=batch, q_offset=q_offset)


def indices_in_range(pattern, tables: dict, Lq: int, Lk: int, *, num_heads: int, batch: int,
                     q_offset: int, pad_q: int, pad_k: int) -> bool:
    """True when every index of every float-table load of the score is in range for tables
    of these shapes over every pair a kernel with ``pad_q`` x ``pad_k`` tiles computes:
    query positions ``q_offset .. q_offset + ceil(Lq / pad_q) * pad_q - 1`` and keys
    ``0 .. ceil(Lk / pad_k) * pad_k - 1`` (the last tiles reach beyond the lengths), all
    heads and batch elements -- not only the pattern's pairs (PARTIAL tiles compute the
    others). The kernels then read the tables without a bounds check (``score_index``
    "free"). False where it cannot be shown: an index reading a runtime input, an interval
    bound that is not exact, or one out of range (the kernels then clamp the index)."""
    from ..ir.intervals import IntervalEval, domain_env
    from ..ir.nodes import FLoad, Load, walk
    loads = list(dict.fromkeys(n for n in walk(pattern.score) if isinstance(n, FLoad)))
    if any(isinstance(x, (Load, FLoad)) for ld in loads for ix in ld.index for x in walk(ix)):
        return False
    env = domain_env(Lq, Lk, num_heads=num_heads, batch=batch, q_offset=q_offset)
    hi_q = q_offset + -(-Lq // pad_q) * pad_q - 1
    hi_k = -(-Lk // pad_k) * pad_k - 1
    env["q"] = (torch.tensor(q_offset, dtype=torch.int64), torch.tensor(hi_q, dtype=torch.int64))
    env["k"] = (torch.tensor(0, dtype=torch.int64), torch.tensor(hi_k, dtype=torch.int64))
    try:
        ev = IntervalEval(env, {})
        for ld in loads:
            t = tables[ld.name]
            sizes = tuple(t.shape[t.dim() - len(ld.index):])
            for ix, size in zip(ld.index, sizes):
                lo, hi = ev.int_(ix)
                if int(lo.min()) < 0 or int(hi.max()) >= size:
                    return False
    except Exception:   # an index the interval pass cannot bound: no proof, the kernels clamp
        return False
    return True


@functools.lru_cache(maxsize=256)
def _table_divisors(score) -> tuple:
    """The divisors of ``score`` that read a float table or a float list and vary with no
    pair (no ``q``, ``k`` or ``s``): ``softcap(cap[h])``'s ``cap[h]``, ``s / temp[h]``'s
    ``temp[h]``, ``softcap([30.0, 0.0][h])``'s list."""
    from ..ir.nodes import FDiv, FLoad, FTable, Score, Var, walk
    out = {}
    for n in walk(score):
        if isinstance(n, FDiv):
            kids = list(walk(n.b))
            if any(isinstance(x, (FLoad, FTable)) for x in kids) and not any(
                    isinstance(x, Score) or (isinstance(x, Var) and x.name in ("q", "k"))
                    for x in kids):
                out[n.b] = None
    return tuple(out)


def _capturing(device) -> bool:
    """Whether work on ``device`` is being captured into a CUDA graph (a read of a value
    on the host would end the capture with an error)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_score_divisors(pattern, int_inputs: dict, float_inputs: dict, Lq: int, Lk: int, *,
                         num_heads: int, batch: int, q_offset: int) -> None:
    """A SpattnInputError when a divisor of the score read from the call's tables is 0 for
    some batch element and head (:func:`_table_divisors`; evaluated in float32, the
    kernels' precision, over ``[B, H]``: one device read). A divisor that varies with the
    pair is not checked (docs/language.md §13). Not while a CUDA graph is being captured
    (:func:`_capturing`): the check's one device read would end the capture; the calls
    before it, which a capture needs as warm-up, are checked."""
    divisors = _table_divisors(pattern.score)
    if not divisors:
        return
    from ..ir.printer import to_source
    given = [*float_inputs.values(), *int_inputs.values()]
    device = given[0].device if given else torch.device("cpu")
    if _capturing(device):
        return      # no value can be read while a CUDA graph is captured (its warm-up is)
    env = score_env(Lq, Lk, num_heads=num_heads, batch=batch, q_offset=q_offset,
                    device=device, rows=(0, 1), cols=(0, 1))
    s = torch.zeros((batch, num_heads, 1, 1), dtype=torch.float32, device=device)
    with torch.no_grad():
        vals = torch.stack([score_values(d, s, env, {**int_inputs, **float_inputs}) == 0
                            for d in divisors]).flatten(1).any(1).tolist()
    for d, zero in zip(divisors, vals):
        if zero:
            raise SpattnInputError(
                f"the score divides by {to_source(d)}, which is 0 for some batch element or "
                f"head of this call (B={batch}, H={num_heads}): the score would be infinite "
                "or NaN there (softcap(c) needs c > 0)")


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


class TorchScoreStage:
    """The torch backend's stage of a plan with a score: the row chunks of the call and the
    key span of each (:func:`_chunks`), found once from the mask's tiles."""

    def __init__(self, chunks: list, Lq: int, Lk: int):
        self.chunks, self.Lq, self.Lk = chunks, Lq, Lk

    def __repr__(self) -> str:
        pairs = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in self.chunks)
        return (f"torch score: {len(self.chunks)} row chunks, {pairs:,} of "
                f"{self.Lq * self.Lk:,} pairs computed")


def torch_stage(call) -> TorchScoreStage:
    """The :class:`TorchScoreStage` of a plan's :class:`~spattn.runtime.plan.Call`."""
    return TorchScoreStage(_chunks(call.pattern, call.B, call.H, call.Lq, call.Lk,
                                   call.positions.q_offset, call.inputs, call.device),
                           call.Lq, call.Lk)


def _no_autocast(fn):
    """``fn(pattern, q, ...)`` in its inputs' dtypes whatever ``torch.autocast`` says, as the
    kernels and the unscored torch backend compute (docs/usage.md)."""
    @functools.wraps(fn)
    def run(pattern, q, *args, **kwargs):
        device = q.device.type
        if torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return fn(pattern, q, *args, **kwargs)
        return fn(pattern, q, *args, **kwargs)
    return run


@_no_autocast
def fwd(pattern, q, k, v, *, scale: float, q_offset: int, inputs: dict, chunks=None):
    """``(o [B, Hq, Lq, D] q.dtype, lse [B, Hq, Lq] float32 or float64)``; ``chunks``: a
    plan's (:class:`TorchScoreStage`), found now when None."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    acc = _acc(q.dtype)
    kk, vv = _expand_kv(k, H).to(acc), _expand_kv(v, H).to(acc)
    o = torch.zeros(q.shape[:3] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    lse = torch.full((B, H, Lq), -math.inf, dtype=acc, device=q.device)
    if chunks is None:
        chunks = _chunks(pattern, B, H, Lq, Lk, q_offset, inputs, q.device)
    for r0, r1, c0, c1 in chunks:
        s = torch.matmul(q[:, :, r0:r1].to(acc), kk[:, :, c0:c1].transpose(-1, -2)) * scale
        _, _, f = _chunk(pattern, s, r0, r1, c0, c1, Lq, Lk, B, H, q_offset, inputs)
        p, lse[:, :, r0:r1] = softmax_rows(f)
        o[:, :, r0:r1] = torch.matmul(p, vv[:, :, c0:c1]).to(q.dtype)
    return o, lse


def softmax_rows(f: torch.Tensor) -> tuple:
    """``(p, lse)`` of modified scores ``f [..., n]`` (masked pairs -inf): the row's
    probabilities and its natural log-sum-exp ``[...]``; a row with no allowed key gets
    ``p = 0`` and ``lse = -inf`` (a NaN score keeps its NaN)."""
    lse = torch.logsumexp(f, -1, keepdim=True)
    # (a row with no key: lse -inf, p = exp(-inf - 0) = 0; a NaN score's row keeps its NaN)
    p = torch.exp(f - torch.where(lse == -math.inf, 0.0, lse))
    return _normalised(p), lse.squeeze(-1)


def _normalised(p: torch.Tensor) -> torch.Tensor:
    """``p [..., n]`` divided by its row sums (rows of 0 kept): ``exp(f - lse)`` sums to 1
    only where float32 holds the lse's ``log`` of the row's sum beside its largest score;
    past about 1e7 in magnitude it rounds away, and the row would weigh every key as 1."""
    total = p.sum(-1, keepdim=True)
    return p / torch.where(total == 0, 1.0, total)


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


@_no_autocast
def bwd(pattern, q, k, v, o, lse, do, *, scale: float, q_offset: int, inputs: dict,
        dlse=None, table_grads: tuple = (), deterministic: bool = False, chunks=None):
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
    if chunks is None:
        chunks = _chunks(pattern, B, H, Lq, Lk, q_offset, inputs, q.device)
    for r0, r1, c0, c1 in chunks:
        qc = q[:, :, r0:r1].to(acc)
        kc, vc = kk[:, :, c0:c1], vv[:, :, c0:c1]
        s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
        env, m, f = _chunk(pattern, s, r0, r1, c0, c1, Lq, Lk, B, H, q_offset, inputs)
        lr = lse[:, :, r0:r1].to(acc).unsqueeze(-1)
        lr = torch.where(torch.isfinite(lr), lr, torch.full((), math.inf, dtype=acc,
                                                             device=q.device))
        p = _normalised(torch.exp(f - lr))      # (a chunk holds its rows' every key)
        doc = do[:, :, r0:r1].to(acc)
        dp = torch.matmul(doc, vc.transpose(-1, -2))
        # rowsum(dO * O) as sum_j P dP: the same in exact arithmetic, but from the
        # float32 P rather than the 16-bit output, whose rounding a table gradient with a
        # positional factor (w[h] * float(q - k)) multiplies by up to L
        delta = (p * dp).sum(-1, keepdim=True)
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

class Ctx:
    """What a call's forward and backward share (not a tensor: kept off the autograd graph).
    ``int_inputs``: the mask's inputs as int64 tensors (torch backend); ``plan``: the
    plan of the call (Triton: its mask, tiles and kernels; torch: its row chunks), or None
    (the torch backend finds its chunks per call). ``names``: the caller's tables, in the
    order the autograd function takes them. ``recipe``: the call's composed tables
    (:mod:`spattn.runtime.compose`), or None; with one, ``pattern`` is the pattern that
    reads them (the plan's) and the stages below translate tables and gradients."""

    def __init__(self, pattern, backend, scale, q_offset, int_inputs, names, *,
                 plan=None, deterministic=False, recipe=None):
        self.pattern, self.backend, self.scale = pattern, backend, scale
        self.q_offset, self.int_inputs, self.names = q_offset, int_inputs, names
        self.plan, self.deterministic, self.recipe = plan, deterministic, recipe
        self.run_names = names if recipe is None else recipe.names


def _run_inputs(c: Ctx, ins: dict) -> dict:
    """The tables the run pattern reads, from the caller's."""
    return ins if c.recipe is None else c.recipe.inputs(ins)


def _run_wanted(c: Ctx, table_grads) -> tuple:
    return tuple(table_grads) if c.recipe is None else c.recipe.wanted(table_grads)


def _tables(c: Ctx, ins: dict) -> dict:
    return {n: ins[n].contiguous() for n in c.run_names}


def _torch_chunks(c: Ctx):
    stage = None if c.plan is None else c.plan.forward_stage
    return stage.chunks if isinstance(stage, TorchScoreStage) else None


#: q, k, v dtypes whose Triton output is rounded to 16 bits: a table gradient's row
#: correction then reads an fp32 copy of the output (:func:`exact_delta`)
ROUNDED = (torch.float16, torch.bfloat16)


def exact_delta(c: Ctx, q, table_grads) -> bool:
    """Whether the Triton backward of this call needs the fp32 output: some table needs a
    gradient and q is 16-bit. Its row correction ``delta = rowsum(dO * O)`` from the
    16-bit O carries O's rounding (relative 2^-9 in bf16), which a table gradient with a
    positional factor (``w[h] * float(q - k)``) multiplies by up to L instead of
    cancelling; from the fp32 O, delta is that of the float32 torch path. Not where the
    call's backward runs on the torch backend anyway (``deterministic`` with a table
    :func:`deterministic_on_triton` refuses), which reads no output."""
    return c.backend == "triton" and bool(table_grads) and q.dtype in ROUNDED and \
        not (c.deterministic and not deterministic_on_triton(c.pattern, table_grads))


def run_fwd(c: Ctx, q, k, v, ins):
    """``(o, lse)``; ``ins``: the caller's int inputs and tables."""
    ins = _run_inputs(c, ins)
    if c.backend == "triton":
        from . import triton_backend
        return triton_backend.run_fwd(c.plan.forward_stage, q, k, v, tables=_tables(c, ins))
    return fwd(c.pattern, q, k, v, scale=c.scale, q_offset=c.q_offset, inputs=ins,
               chunks=_torch_chunks(c))


def run_fwd_saving(c: Ctx, q, k, v, ins, table_grads) -> tuple:
    """``(o, lse, the output the backward reads)``: the fp32 output where
    :func:`exact_delta` asks for it (``o`` is then its 16-bit cast), else ``o`` itself."""
    if not exact_delta(c, q, _run_wanted(c, table_grads)):
        o, lse = run_fwd(c, q, k, v, ins)
        return o, lse, o
    from . import triton_backend
    o32, lse = triton_backend.run_fwd(c.plan.forward_stage, q, k, v,
                                      tables=_tables(c, _run_inputs(c, ins)),
                                      out_dtype=torch.float32)
    return o32.to(q.dtype), lse, o32


def run_bwd(c: Ctx, q, k, v, o, lse, do, ins, dlse, table_grads):
    """``(dq, dk, dv, {table: fp32 gradient})`` for the caller's tables ``table_grads``
    (``ins``: the caller's int inputs and tables). ``o``: the forward's output, or its
    fp32 copy (:func:`exact_delta`); a 16-bit ``o`` where the fp32 one is needed (the
    custom op's backward, whose forward returns only o and lse) is recomputed in fp32 by
    the forward kernel first."""
    run_ins = _run_inputs(c, ins)
    dq, dk, dv, bufs = _run_bwd(c, q, k, v, o, lse, do, run_ins, dlse,
                                _run_wanted(c, table_grads))
    if c.recipe is not None:
        bufs = c.recipe.grads(bufs, ins, table_grads)
    return dq, dk, dv, bufs


def _run_bwd(c: Ctx, q, k, v, o, lse, do, ins, dlse, table_grads):
    """:func:`run_bwd` of the run pattern's tables (``ins``, ``table_grads``)."""
    det = c.deterministic and bool(table_grads)
    triton = c.backend == "triton" \
        and not (det and not deterministic_on_triton(c.pattern, table_grads))
    if triton:
        from . import triton_backend
        from .plan import bwd_operands
        tables = _tables(c, ins)
        o, do = bwd_operands(c.plan.call, o, do)
        if exact_delta(c, q, table_grads) and o.dtype != torch.float32:
            o, _ = triton_backend.run_fwd(c.plan.forward_stage, q, k, v, tables=tables,
                                          out_dtype=torch.float32)
        stage = c.plan.backward_stage(q, k, v, o, do, c.deterministic,
                                      lse_grad=dlse is not None)
        partials = _partials(c.pattern, stage, table_grads, q.device) if det else None
        if not det or partials is not None:
            bufs = {n: torch.zeros(tables[n].shape, dtype=torch.float32, device=q.device)
                    for n in table_grads}
            dq, dk, dv = triton_backend.run_bwd(stage, q, k, v, o, lse, do, tables=tables,
                                                table_grads=bufs, partials=partials, dlse=dlse)
            if partials:
                _reduce_partials(c, q, k, partials, bufs, ins, stage.config)
            return dq, dk, dv, bufs
    return bwd(c.pattern, q, k, v, o, lse, do, scale=c.scale, q_offset=c.q_offset,
               inputs=ins, dlse=dlse, table_grads=table_grads, deterministic=c.deterministic,
               chunks=_torch_chunks(c))


#: The most memory the partial buffers of one deterministic Triton backward may take;
#: a call that needs more runs its backward on the torch backend.
DETERMINISTIC_PARTIAL_BYTES = 256 << 20


def deterministic_on_triton(pattern, table_grads) -> bool:
    """Whether the Triton backward gives these tables deterministic gradients
    (``codegen.kernels.partial_slots``): every load of each reads an entry that depends
    on neither q nor k (``w[h]``, ``temp[b, h]``, ``cap[0]``: the dQ kernel sums a tile's
    contributions with one ``tl.sum``), or every load's last index is a function of
    ``q - k`` and its others of neither (``rel[h, clamp(q - k, 0, W - 1)]``, T5's buckets:
    the tile's sums per diagonal). Each goes to a slot of its own in a partial buffer, and
    the host sums them in a fixed order (:func:`_reduce_partials`). A load whose entry
    varies otherwise within a tile (``qb[q % 5]``, a 2-D position bias) would need its
    pairs grouped by entry in a fixed order (a sort per tile): those tables' deterministic
    gradients come from the torch backward."""
    from ..codegen.kernels import partial_slots
    slots = partial_slots(pattern)
    return all(n in slots for n in table_grads)


def _partials(pattern, stage, table_grads, device) -> dict | None:
    """Zeroed partial buffers (``triton_backend.partial_shape``) of the tables, or None
    when together they would pass :data:`DETERMINISTIC_PARTIAL_BYTES`."""
    from ..codegen.kernels import partial_slots
    from .triton_backend import partial_shape
    slots = partial_slots(pattern)
    shapes = {n: partial_shape(stage, slots[n][0], len(slots[n][1])) for n in table_grads}
    if sum(4 * math.prod(s) for s in shapes.values()) > DETERMINISTIC_PARTIAL_BYTES:
        return None
    return {n: torch.zeros(s, dtype=torch.float32, device=device) for n, s in shapes.items()}


def _reduce_partials(c: Ctx, q, k, partials: dict, bufs: dict, ins: dict,
                     config=None) -> None:
    """The tables' gradients from their partial buffers, in a fixed order. Kind "all":
    each program's key tiles summed (``torch.sum``: no atomics), then its query tiles per
    (batch, head), and the ``[B, H]`` sums scattered to the entries each load reads.
    Kind "diag": each nonzero per-diagonal sum scattered to the entry of its ``q - k``
    (``_diagonal_sums``). Scatters are ``index_put_`` with the deterministic
    accumulation. ``config``: the backward stage's kernel configuration (its dQ tiles)."""
    from ..codegen.kernels import partial_slots
    B, H, Lq, _ = q.shape
    slots = partial_slots(c.pattern)
    env = score_env(Lq, k.shape[2], num_heads=H, batch=B, q_offset=c.q_offset,
                    device=q.device, rows=(0, 1), cols=(0, 1))
    for name, part in partials.items():
        kind, loads = slots[name]
        if kind == "diag":
            _diagonal_sums(c, q, k, part, loads, bufs[name], ins, config)
            continue
        n = part.shape[-1]
        per_bh = part.sum(1).view(B, H, -1, n).sum(2)
        for j, load in enumerate(loads):
            _scatter(bufs[name], load, env, ins, per_bh[..., j].reshape(B, H, 1, 1),
                     deterministic=True)


def _diagonal_sums(c: Ctx, q, k, part, loads, grad, ins, config) -> None:
    """Scatter a "diag" table's partial sums ``[programs, key tiles, loads * T]`` (T
    diagonals per tile): slot ``t`` of query tile ``m`` and key tile ``n`` holds the sum
    over the pairs with ``q - k = q_offset + m * BLOCK_M2 - n * BLOCK_N2 + t - (BLOCK_N2 -
    1)``, whose entry each load's index gives at ``q = q - k``, ``k = 0`` (its last index
    is a function of ``q - k``, the others of neither). Only nonzero sums are scattered
    (a diagonal no allowed pair lies on may index past the table), in row-major order."""
    B, H, Lq, _ = q.shape
    Lk, dev = k.shape[2], q.device
    m2, n2 = config.block_m2, config.block_n2
    n_m, n_k = -(-Lq // m2), -(-Lk // n2)
    vals = part.view(B, H, n_m, n_k, len(loads), -1)
    T = vals.shape[-1]
    ar = lambda n: torch.arange(n, device=dev, dtype=torch.int64)   # noqa: E731
    d = (c.q_offset + ar(n_m) * m2).view(-1, 1, 1) - (ar(n_k) * n2).view(1, -1, 1) \
        + (ar(T) - (n2 - 1)).view(1, 1, -1)
    for j, load in enumerate(loads):
        v = vals[..., j, :]
        nz = v != 0
        bi, hi, mi, ni, ti = nz.nonzero(as_tuple=True)
        env = {"q": d[mi, ni, ti], "k": torch.zeros((), dtype=torch.int64, device=dev),
               "h": hi, "b": bi, "Lq": Lq, "Lk": Lk, "H": H}
        _scatter(grad, load, env, ins, v[nz], deterministic=True)


class ScoreFunction(torch.autograd.Function):
    """``apply(ctx, q, k, v, *tables) -> (o, lse)``; gradients to q, k, v and to the float
    tables (in ``ctx.names`` order) that require grad."""

    @staticmethod
    def forward(ctx, c: Ctx, q, k, v, *tables):
        # the mask's inputs as the forward saw them: a backward that reads them (the torch
        # backend's, and the deterministic fall-back) must not see the caller's later
        # in-place writes (small integer tensors: a copy is cheap)
        ctx.ints = {n: t.clone() if isinstance(t, torch.Tensor) else t
                    for n, t in c.int_inputs.items()}
        ins = {**c.int_inputs, **dict(zip(c.names, tables))}
        # a table that needs a gradient on the Triton backward: the output is kept in fp32
        # for the backward's delta (exact_delta), and returned rounded
        wanted = [n for n, need in zip(c.names, ctx.needs_input_grad[4:]) if need]
        o, lse, saved = run_fwd_saving(c, q, k, v, ins, wanted)
        ctx.save_for_backward(q, k, v, saved, lse, *tables)
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
        want = tuple(n for n, need in zip(c.names, ctx.needs_input_grad[4:]) if need)
        do, dlse = plain(do), plain(dlse)
        ins = {**ctx.ints, **dict(zip(c.names, tables))}
        with torch.no_grad():
            dq, dk, dv, tg = run_bwd(c, q, k, v, o, lse,
                                     torch.zeros(o.shape, dtype=q.dtype, device=q.device)
                                     if do is None else do, ins, dlse, want)
            dt = tuple(tg[n].to(t.dtype) if n in tg else None
                       for n, t in zip(c.names, tables))
        from .autograd import once
        return (None,) + once((dq, dk, dv) + dt, (q, k, v, do, dlse, *tables))


def _split_inputs(pattern, inputs) -> tuple:
    """``(mask's int inputs, score's float inputs)`` as given; an unexpected name is a
    SpattnInputError."""
    inputs = dict(inputs or {})
    extra = [n for n in inputs if n not in pattern.inputs and n not in pattern.score_inputs]
    if extra:
        known = ", ".join(repr(n) for n in pattern.all_inputs) or "none"
        raise SpattnInputError(f"unexpected runtime input {', '.join(map(repr, extra))}: the "
                               f"pattern's inputs are {known}")
    return ({n: t for n, t in inputs.items() if n in pattern.inputs},
            {n: t for n, t in inputs.items() if n in pattern.score_inputs})


def _arguments(pattern, q, k, v, scale, q_offset, inputs) -> tuple:
    """The checked ``(scale, q_offset, int inputs as given, int64 int inputs, float
    tables)`` of a call or plan without a plan: every index of the mask's and the score's
    loads proven in range, the integers exact."""
    from .api import (_check_scale, check_grid, check_q_offset, check_runtime_tensors,
                      f64_ok, validate)
    validate(q, k, v, float64=f64_ok(pattern, q))
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    check_grid(pattern, Lq, Lk, f"q (shape {tuple(q.shape)}) and k (shape {tuple(k.shape)})")
    scale = _check_scale(scale, D)
    off = check_q_offset(q_offset, Lq, Lk)
    given_int, given_float = _split_inputs(pattern, inputs)
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
    return scale, off, given, ints, floats


#: Recipes a pattern keeps (``CompiledPattern._runs``), and layout decisions
#: (``CompiledPattern._layouts``): one per call shape it ran at last.
RUNS_KEPT = 16


def composition_of(pattern):
    """The composition a call of ``pattern`` would run under the current settings, or None
    (:func:`spattn.runtime.compose.composition`)."""
    from .compose import composition
    from .settings import current
    return composition(pattern, current())


def composed(pattern, floats: dict, Lq: int, Lk: int, q_offset, device, settings=None
             ) -> tuple:
    """``(the pattern a call runs, its Recipe or None)``: with the score's tables at a
    costly function of ``q - k`` composed on the host (:mod:`spattn.runtime.compose`)
    where ``settings`` (the current ones by default) ask for it and the call is covered;
    else ``(pattern, None)``. ``floats``: the caller's tables, checked in range. The run
    pattern and the recipe are kept by the pattern, per call shape."""
    from . import compose
    from .settings import current
    comp = compose.composition(pattern, settings or current())
    if comp is None:
        return pattern, None
    layout = tuple((n, tuple(t.shape), t.dtype) for n, t in sorted(floats.items()))
    key = (comp, Lq, Lk, q_offset, str(device), layout)
    hit = pattern._runs.get(key)
    if hit is not None:
        return hit
    run = next((r for (c, *_), (r, rec) in pattern._runs.items()
                if c == comp and rec is not None), None)
    if run is None:
        from ..ir.pattern import CompiledPattern
        run = CompiledPattern(pattern.ir, name=pattern.name, params=pattern.params,
                              inputs=pattern.inputs, backend=pattern.backend,
                              grid=pattern.grid, grid_offset=pattern.grid_offset,
                              grid_suffix=pattern.grid_suffix, score=comp.score,
                              score_inputs=dict(comp.score_inputs))
    recipe = compose.recipe(pattern, run, comp, floats, Lq, Lk, q_offset, device)
    out = (pattern, None) if recipe is None else (run, recipe)
    _keep(pattern._runs, key, out)
    return out


def _keep(memo: dict, key, value) -> None:
    """``memo[key] = value``, the oldest entries dropped past :data:`RUNS_KEPT`."""
    memo[key] = value
    while len(memo) > RUNS_KEPT:
        memo.pop(next(iter(memo)))


def make_plan(pattern, q, k, v, *, scale=None, q_offset=None, inputs=None, options=None,
              layouts: bool = True):
    """The :class:`~spattn.runtime.plan.Plan` of a pattern with a score for these tensors
    and tables (``Pattern.plan``): the mask's inputs held, the tables' shapes and dtypes
    recorded (each call passes its tables: :meth:`~spattn.runtime.plan.Plan.check_tables`),
    the kernels (Triton) or row chunks (torch) resolved. Where a call would run in its
    mask's layout (:func:`layout_run`), the plan is that of the pattern over slots, built on
    q, k, v in slot order, and holds the :class:`LayoutRun` (``plan.layout_run``; the
    caller's pattern as ``plan.layout_origin``): a call with it gathers as the call does."""
    from .api import choose_backend
    from .plan import build_plan
    scale, off, given, _, floats = _arguments(pattern, q, k, v, scale, q_offset, inputs)
    lay = layout_run(pattern, q, k, off, given) if layouts else None
    if lay is not None:
        with torch.no_grad():
            qs, ks, vs = (_Slots.apply(t, lay.order, lay.inverse) for t in (q, k, v))
        plan = make_plan(lay.run, qs, ks, vs, scale=scale, q_offset=off, inputs=floats,
                         options=options, layouts=False)
        plan.layout_run, plan.layout_origin = lay, pattern
        return plan
    backend = choose_backend(pattern.backend, q.device.type)
    run, recipe = composed(pattern, floats, q.shape[2], k.shape[2], off, q.device)
    if recipe is not None:
        floats = recipe.inputs(floats)
    plan = build_plan(run, backend, q, k, v, scale=scale, q_offset=off, inputs=given,
                      options=options, tables=floats)
    if recipe is not None:
        plan.origin, plan.recipe = pattern, recipe
    return plan


def _planned(plan, pattern, q, k, v, scale, q_offset, inputs) -> dict:
    """The float tables of a call with ``plan=``, checked against the plan (which holds
    the mask's inputs, the scale and the positions)."""
    from .api import _check_plan
    given_int, given_float = _split_inputs(pattern, inputs)
    _check_plan(plan, pattern, q, k, v, scale, q_offset, given_int)
    floats = validate_score_inputs(pattern.score_inputs, given_float, batch=q.shape[0],
                                   num_heads=q.shape[1], device=q.device)
    recipe = getattr(plan, "recipe", None)
    if recipe is None:
        plan.check_tables(floats)
    else:
        recipe.check(floats, plan)
    c = plan.call
    check_score_divisors(pattern, c.inputs, floats, c.Lq, c.Lk, num_heads=c.H, batch=c.B,
                         q_offset=c.positions.q_offset)
    return floats


#: The types of a table the memo takes (a module's learnable table is a Parameter; only its
#: shape, strides, dtype and device are read).
_TABLE_TYPES = (torch.Tensor, torch.nn.Parameter)


def _signature(pattern, q, k, v, scale, q_offset, inputs):
    """What a call of a pattern with a score is checked on, for the last-call memo
    (``pattern._last``): the mask's part as :func:`spattn.runtime.api._signature` reads it
    (its int inputs by identity and version), and each float table's shape, strides,
    dtype, device and layout -- not its values or version: the checks and the plan read
    the tables' shapes only (a learnable table written in place between two calls keeps
    the memo). None (the full path) where the mask's signature is None or a table is not
    a plain tensor."""
    from .api import _signature as mask_signature
    inputs = inputs or {}
    ints = {n: t for n, t in inputs.items() if n not in pattern.score_inputs}
    sig = mask_signature(pattern, q, k, v, scale, q_offset, ints, None, None)
    if sig is None or len(inputs) != len(ints) + len(pattern.score_inputs):
        return None
    tables = []
    for n in pattern.score_inputs:
        t = inputs.get(n)
        if type(t) not in _TABLE_TYPES or t.layout is not torch.strided or t.is_nested:
            return None
        tables += (n, t.shape, t.stride(), t.dtype, t.device)
    return ("score", sig, tuple(tables))


def plan_of(pattern, backend, q, k, v, scale, q_offset, given, floats) -> tuple:
    """``(plan, recipe)`` of a checked call without a plan: the cached plan of the pattern
    the call runs (:func:`composed`)."""
    from .plan import PLANS
    run, recipe = composed(pattern, floats, q.shape[2], k.shape[2], q_offset, q.device)
    tables = floats if recipe is None else recipe.inputs(floats)
    plan = PLANS.get(run, backend, q, k, v, scale=scale, q_offset=q_offset, inputs=given,
                     tables=tables)
    return plan, recipe


class _Slots(torch.autograd.Function):
    """``t [B, H, N(, D)]`` gathered along the tokens at ``index``, its gradient gathered
    back at ``back`` (a permutation's inverse: the slots ``index`` does not read get no
    gradient, and those it reads twice, padding reading token 0, only where ``back``
    points)."""

    @staticmethod
    def forward(ctx, t, index, back):
        ctx.save_for_backward(back)
        return gather_tokens(t, index)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (back,) = ctx.saved_tensors
        return gather_tokens(g, back), None, None


class LayoutRun:
    """A scored call run in the token layout its mask would run in (docs/layouts.md,
    "Scores in a layout"): q, k, v gathered into the layout's slot order, the pattern
    over slots (``run``: the remapped mask and :func:`spattn.ir.layout.remap_score` of
    the score) called there, o and the lse gathered back. The gathers are autograd
    functions whose backward gathers through the inverse order, so the gradients of q, k,
    v and of the score's tables are those of the slot call. A padding slot's query row
    allows no key (output 0, no gradient to the keys), and its keys are allowed to no
    query."""

    __slots__ = ("run", "order", "inverse", "remap")

    def __init__(self, run, order, inverse, remap):
        self.run, self.order, self.inverse, self.remap = run, order, inverse, remap

    def __call__(self, q, k, v, *, scale, return_lse, floats, deterministic):
        qs, ks, vs = (_Slots.apply(t, self.order, self.inverse) for t in (q, k, v))
        o, lse = call(self.run, qs, ks, vs, scale=scale, return_lse=True, inputs=floats,
                      deterministic=deterministic, layouts=False)
        o, lse = _Slots.apply(o, self.inverse, self.order), \
            _Slots.apply(lse, self.inverse, self.order)
        return (o, lse) if return_lse else o


def layout_run(pattern, q, k, q_offset, ints, settings=None):
    """The :class:`LayoutRun` of a scored call, or None (sequence order): self-attention at
    ``q_offset`` 0 without mask inputs, where :func:`spattn.runtime.plan.choose_layout`
    picks a layout of the mask (``SPATTN_LAYOUT``) that has no extra tokens. Kept by the
    pattern per call shape and setting (``pattern._layouts``)."""
    from .settings import current
    settings = settings or current()
    Lq, Lk = q.shape[2], k.shape[2]
    if settings.layout == "off" or ints or Lq != Lk or q_offset:
        return None
    key = (tuple(q.shape), k.shape[1], q.device.type, settings.layout)
    if key in pattern._layouts:
        return pattern._layouts[key]
    from .plan import choose_layout
    remap = choose_layout(pattern, q, k, 0, ints, settings, "copy").remap
    run = None
    if remap is not None and not remap.layout.grid.offset and not remap.layout.grid.suffix:
        from ..ir.layout import remap_score
        from ..ir.pattern import CompiledPattern
        run = CompiledPattern(remap.ir, name=pattern.name, backend=pattern.backend,
                              score=remap_score(pattern.score, remap.layout),
                              score_inputs=dict(pattern.score_inputs))
        order, inverse = remap.layout.permutation(q.device)
        run = LayoutRun(run, order, inverse, remap)
    _keep(pattern._layouts, key, run)
    return run


def call(pattern, q, k, v, *, scale=None, return_lse=False, q_offset=None, inputs=None,
         plan=None, deterministic=False, layouts=True):
    """Attention of a pattern with a score: ``o`` (and ``lse`` when ``return_lse``).

    ``plan``: made by :func:`make_plan` for tensors and tables laid out like these (no
    analysis then: the plan's bounds proofs hold for tables of the plan's shapes).
    ``deterministic``: learnable tables get gradients that do not depend on the order of
    additions (on Triton through partial buffers where every load of the table reads an
    entry of neither q nor k, or every one an entry along ``q - k``, else through the
    torch backend's backward); q, k, v gradients are deterministic either way.
    ``layouts``: run in the layout of the mask where one is chosen (:func:`layout_run`;
    with a plan, where the plan was built in one: :func:`_layout_planned`)."""
    from .api import choose_backend
    lay = getattr(plan, "layout_run", None)
    if lay is not None and pattern is not lay.run:
        return _layout_planned(plan, lay, pattern, q, k, v, scale=scale,
                               return_lse=return_lse, q_offset=q_offset, inputs=inputs,
                               deterministic=deterministic)
    if plan is not None:
        floats = _planned(plan, pattern, q, k, v, scale, q_offset, inputs)
        backend, scale, off = plan.backend, plan.call.scale, plan.call.positions.q_offset
        ints, recipe = plan.call.inputs, getattr(plan, "recipe", None)
    else:
        sig = _signature(pattern, q, k, v, scale, q_offset, inputs)
        last = pattern._last
        if sig is not None and last is not None and last[0] == sig:
            floats = {n: inputs[n] for n in pattern.score_inputs}
            if isinstance(last[1][0], str):         # ("layout", LayoutRun, scale)
                return last[1][1](q, k, v, scale=last[1][2], return_lse=return_lse,
                                  floats=floats, deterministic=deterministic)
            plan, backend, scale, off, ints, recipe = last[1]     # checked at that call
            if _table_divisors(pattern.score):      # read from the tables' values
                c0 = plan.call
                check_score_divisors(pattern, ints, floats, c0.Lq, c0.Lk, num_heads=c0.H,
                                     batch=c0.B, q_offset=off)
        else:
            scale, off, given, ints, floats = _arguments(pattern, q, k, v, scale, q_offset,
                                                         inputs)
            lay = layout_run(pattern, q, k, off, ints) if layouts else None
            if lay is not None:
                if sig is not None and not _capturing(q.device):
                    pattern._last = (sig, ("layout", lay, scale), ())
                return lay(q, k, v, scale=scale, return_lse=return_lse, floats=floats,
                           deterministic=deterministic)
            backend = choose_backend(pattern.backend, q.device.type)
            plan, recipe = plan_of(pattern, backend, q, k, v, scale, off, given, floats)
            if sig is not None and not _capturing(q.device):
                # the entry holds the mask's inputs: their ids in ``sig`` stay theirs
                pattern._last = (sig, (plan, backend, scale, off, ints, recipe),
                                 tuple(given.values()))
    names = tuple(pattern.score_inputs)
    tables = [floats[n] for n in names]
    c = Ctx(plan.pattern if recipe is not None else pattern, backend, scale, off, ints,
            names, plan=plan, deterministic=bool(deterministic), recipe=recipe)
    need = torch.is_grad_enabled() and (any(t.requires_grad for t in (q, k, v))
                                        or any(t.requires_grad for t in tables))
    if need:
        o, lse = ScoreFunction.apply(c, q, k, v, *tables)
    else:
        o, lse = run_fwd(c, q, k, v, {**ints, **floats})
    return (o, lse) if return_lse else o


def _layout_planned(plan, lay, pattern, q, k, v, *, scale, return_lse, q_offset, inputs,
                    deterministic):
    """A call with the plan of a scored pattern in its mask's layout (:func:`make_plan`):
    q, k, v gathered into slot order, the slot pattern's call with the plan (which checks
    the rest), o and the lse gathered back."""
    origin = plan.layout_origin
    if origin is not pattern and origin.source != pattern.source:
        raise SpattnParamError(f"the plan is for the pattern {origin.source!r}, not "
                               f"{pattern.source!r}")
    if q_offset:
        raise SpattnParamError(f"q_offset={q_offset!r} was given with plan=: the plan runs at "
                               f"q_offset 0; build a new plan for another offset")
    qs, ks, vs = (_Slots.apply(t, lay.order, lay.inverse) for t in (q, k, v))
    o, lse = call(lay.run, qs, ks, vs, scale=scale, return_lse=True, inputs=inputs,
                  plan=plan, deterministic=deterministic, layouts=False)
    o, lse = _Slots.apply(o, lay.inverse, lay.order), _Slots.apply(lse, lay.inverse, lay.order)
    return (o, lse) if return_lse else o


def call_op(key, declared, score_declared, requested_backend, q, k, v, *, scale, return_lse,
            q_offset, inputs, deterministic=False):
    """The traced path of a pattern with a score (under ``torch.compile``): the checks of
    q, k, v and the mask's inputs, then the custom op ``spattn::score_attention``
    (``runtime/autograd.py``), whose autograd formula gives q, k, v and the tables that
    require grad their gradients. Every tensor input that is not the mask's goes to the op
    as a table, which checks them (names, dtype, device, dims, index bounds) on the real
    tensors. ``declared``: the mask's inputs (name: index dims); ``score_declared``: the
    score's (kept for the signature shared with the functional form)."""
    from .api import traced_arguments
    from .autograd import op_scale, score_attention_op
    inputs = dict(inputs or {})
    ints = {n: t for n, t in inputs.items() if n in declared}
    scale, q_offset, ins, backend = traced_arguments(declared, requested_backend, q, k, v,
                                                     scale, q_offset, ints)
    names = sorted(n for n in inputs if n not in declared)
    for n in names:         # the op's schema takes tensors: say so before it is traced
        if not isinstance(inputs[n], torch.Tensor):
            raise SpattnInputError(f"runtime input {n!r} must be a torch.Tensor, got "
                                   f"{type(inputs[n]).__name__}")
    scale, scale_t = op_scale(scale)
    o, lse = score_attention_op(q, k, v, [ins[n] for n in sorted(ins)],
                                [inputs[n] for n in names], ",".join(names), key, scale, q_offset,
                                backend, bool(deterministic), scale_t)
    return (o, lse) if return_lse else o
