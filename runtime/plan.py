"""Plans: everything one attention call needs, built once, reusable and inspectable.

``pat.plan(q, k, v, **inputs)`` returns a :class:`Plan` (the role of FlexAttention's
``BlockMask``, built in microseconds to milliseconds): the backend, the positions, the
runtime inputs (converted for the device), the settings it was built under, the analysis
(tile classes and tables where the pattern needs them) and the resolved stages (compiled
kernels, configurations, grids, work orders, scalar arguments). ``pat(q, k, v, plan=plan)``
checks that the tensors are laid out as the plan's and launches: no analysis, no
environment read, no lookup, no device synchronisation. A training loop that reuses a plan
can capture forward and backward in one CUDA graph once a first step has built the
backward's stage (or ``pat.plan(..., backward=True)`` built it).

A call without a plan goes through :data:`PLANS`, one bounded, thread-safe LRU cache of
plans keyed by what a plan depends on: the pattern, the tensors' shapes, strides, dtype,
device and 16-byte alignment, the scale, the positions, the runtime inputs by identity and
version (an in-place write to an input is a new key), the settings' raw strings and the
autotuner's generation. It holds :data:`PLANS_SIZE` plans. Before it, each pattern
remembers its last call's plan under a signature of cheap attributes
(:func:`spattn.runtime.api._signature`; docs/caching.md).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..dsl.errors import SpattnError, SpattnInputError
from ..ir.positions import Positions
from . import settings as _settings
from .tables import Analysis

__all__ = ["Call", "Plan", "PermutedPlan", "RemappedPlan", "OrderedPlan", "HeadOrderedPlan",
           "build_plan",
           "PlanCache", "PLANS", "PLANS_SIZE"]

#: Plans kept for calls without one (:data:`PLANS`).
PLANS_SIZE = 64
#: Offsets and lengths past which closed-form kernels are not used: their column ranges
#: treat query positions beyond +-2**30 as unbounded (``ir.ranges.Q_UNBOUNDED``).
RANGES_LIMIT = 1 << 30
#: The largest element offset the kernels compute in 32-bit arithmetic.
INT32_OFFSET = (1 << 31) - 1


@dataclass
class Call:
    """What the stages of a plan are built for (shared by its forward and backward)."""

    pattern: object
    B: int
    H: int
    HK: int
    Lq: int
    Lk: int
    D: int
    dtype: torch.dtype
    device: torch.device
    scale: float
    positions: Positions
    inputs: dict                      # validated runtime inputs, int64 on the device
    settings: object                  # runtime.settings.Settings
    analysis: Analysis = None
    int64: bool = False
    ranges_ok: bool = True
    tables: dict = None               # a score's float tables (as given to the first call)
    learnable: bool = False           # one of them required grad: a training step's tiles
    tile_prior: bool = False          # a token layout's call: tables.layout_tiles applies

    @classmethod
    def of(cls, pattern, q, k, *, scale: float, q_offset, inputs, settings=None,
           backend: str = "triton", tables: dict | None = None, v=None) -> "Call":
        """The call of ``pattern`` on tensors shaped like ``q`` ``[B, Hq, Lq, D]`` and ``k``
        ``[B, Hk, Lk, D]`` (and ``v``, whose offsets the kernels compute too): inputs
        converted, their index bounds checked, the integer arithmetic proven exact (64-bit;
        the kernels' 32- or 64-bit choice), the lists' indices in range (the kernels select
        list entries unchecked; the torch backend refuses the same calls, with the same
        message)."""
        from ..ir import bounds
        from ..ir.intervals import check_input_bounds, check_list_bounds
        B, H, Lq, D = q.shape
        Lk = k.shape[2]
        positions = Positions.of(Lq, Lk, q_offset)
        # a copy: a plan answers for the inputs it was built with, whatever happens to them
        ins = {n: t.to(device=q.device, dtype=torch.int64, copy=True)
               for n, t in (inputs or {}).items()}
        if ins:
            check_input_bounds(pattern, ins, Lq, Lk, num_heads=H, batch=B,
                               q_offset=positions.q_offset)
        checked = bounds.check_call(pattern, Lq, Lk, num_heads=H, batch=B,
                                    q_offset=positions.q_offset, inputs=ins)
        check_list_bounds(pattern, Lq, Lk, num_heads=H, batch=B,
                          q_offset=positions.q_offset, inputs=ins, checked=checked)
        call = cls(pattern, B, H, k.shape[1], Lq, Lk, D, q.dtype, q.device, float(scale),
                   positions, ins, settings or _settings.current())
        call.tables = {n: t.detach().contiguous() for n, t in (tables or {}).items()}
        call.learnable = any(t.requires_grad for t in (tables or {}).values())
        call.analysis = Analysis(pattern, Lq, Lk, B=B, H=H, positions=positions,
                                 device=q.device, inputs=ins)
        call.ranges_ok = True
        if backend == "triton":
            call.ranges_ok, cf = ranges_closed_form(pattern, Lq, Lk, num_heads=H, batch=B,
                                                    positions=positions)
            widest = max(_extent(t) for t in (q, k, v) if t is not None)
            call.int64 = widest > INT32_OFFSET or bounds.kernel_int64(
                pattern, Lq, Lk, num_heads=H, batch=B, q_offset=positions.q_offset,
                inputs=ins, closed_form=cf, block_m=256, block_n=256)
        return call


def ranges_closed_form(pattern, Lq: int, Lk: int, *, num_heads: int, batch: int,
                       positions: Positions) -> tuple:
    """``(ranges_ok, closed form or None)`` of a Triton call: the ranges strategy can run
    it where the query positions and Lk lie within ``RANGES_LIMIT`` (the closed forms treat
    positions beyond as unbounded) and the closed form's bounds are exact in 64 bits."""
    from ..codegen.config import get_closed_form
    from ..ir import bounds
    lo, hi = positions.queries(Lq)
    if max(abs(lo), abs(hi)) >= RANGES_LIMIT or Lk >= RANGES_LIMIT:
        return False, None
    cf = get_closed_form(pattern)
    if cf is not None and not bounds.closed_form_exact(
            cf, Lq, Lk, num_heads=num_heads, batch=batch, q_offset=positions.q_offset):
        return False, None          # its bounds leave int64: the table strategy
    return True, cf


def forward_strategy(pattern, Lq: int, Lk: int, *, num_heads: int = 1, batch: int = 1,
                     q_offset=None, settings=None) -> str:
    """The strategy a Triton forward of such a call runs by default (no ``strategy=``
    option): ``SPATTN_STRATEGY``, else the analysis's (``codegen.config.analysis_strategy``),
    "table" where the ranges strategy cannot run the call (:func:`ranges_closed_form`)."""
    from ..codegen.config import analysis_strategy
    ok, cf = ranges_closed_form(pattern, Lq, Lk, num_heads=num_heads, batch=batch,
                                positions=Positions.of(Lq, Lk, q_offset))
    if not ok:
        return "table"
    return (settings or _settings.current()).strategy or analysis_strategy(pattern, cf)


def _extent(t: torch.Tensor) -> int:
    """The largest element offset within one (batch, head) slice of ``t`` [B, H, L, D]
    (what the kernels compute from row and column indices)."""
    return (t.shape[2] - 1) * abs(t.stride(2)) + (t.shape[3] - 1) * abs(t.stride(3))


def bwd_operands(call: Call, o: torch.Tensor, do: torch.Tensor) -> tuple:
    """``(o, do)`` for the backward kernels: contiguous where the plan's kernels are 32-bit
    and an offset into the given ones would not be (an output gradient of any strides
    reaches the backward; q, k and v decided the kernels' width)."""
    if not call.int64 and max(_extent(do), _extent(o)) > INT32_OFFSET:
        return o.contiguous(), do.contiguous()
    return o, do


def _layout(*tensors) -> tuple:
    return tuple((tuple(t.shape), t.stride()) for t in tensors)


def _aligned(*tensors) -> bool:
    """Every tensor's data starts at a 16-byte boundary."""
    bits = 0
    for t in tensors:
        bits |= t.data_ptr()
    return bits & 15 == 0


class Plan:
    """One attention call's resolved work, for tensors laid out like the ones it was built
    with. Build it with :meth:`spattn.Pattern.plan`; run it with ``pat(q, k, v, plan=plan)``.

    Attributes: ``pattern``, ``backend`` ("triton" or "torch"), ``call`` (the shapes,
    positions, scale, inputs and settings: :class:`Call`), ``forward_stage`` and the
    backward stages built so far (the Triton backend's :class:`~spattn.runtime.
    triton_backend.FwdStage` / ``BwdStage``, or the torch backend's plan).
    """

    #: The row tables the kernels address q, k, v and the outputs through
    #: (:class:`~spattn.runtime.triton_backend.RowTables`: the inner plan of a permuted plan
    #: whose tokens are not gathered, ``SPATTN_LAYOUT_GATHER=kernel``), or None.
    rows = None

    def __init__(self, pattern, backend: str, call: Call, q, k, v, options=None, rows=None):
        self._bind(pattern, backend, q, k, v, options)
        self.call = call
        self.rows = rows
        self.table_layout = {n: (tuple(t.shape), t.dtype) for n, t in (call.tables or {}).items()}
        if backend == "torch" and getattr(pattern, "score", None) is not None:
            from . import scores
            self.forward_stage = scores.torch_stage(call)
        elif backend == "torch":
            from . import torch_backend
            self.forward_stage = torch_backend.make_plan(
                pattern, q, k, q_offset=call.positions.q_offset, inputs=call.inputs)
        else:
            from . import triton_backend
            self.forward_stage = triton_backend.build_fwd(call, q, k, v, self.options,
                                                          rows=rows)
            self.forward_stage.aligned = self.aligned

    def _bind(self, pattern, backend: str, q, k, v, options) -> None:
        """What every plan records of its pattern and of the tensors it is made for."""
        self.pattern = pattern
        self.backend = backend
        self.options = dict(options or {})
        self.layout = _layout(q, k, v)
        self.dtype, self.device = q.dtype, q.device
        self.aligned = _aligned(q, k, v)
        self._lock = threading.Lock()
        self._bwd: dict = {}
        self.table_layout: dict = {}

    # -- use ------------------------------------------------------------------------
    def check(self, q, k, v) -> None:
        """Raise :class:`SpattnInputError` unless q, k, v are laid out as this plan's."""
        (sq, tq), (sk, tk), (sv, tv) = self.layout
        if (q.dtype is not self.dtype or k.dtype is not self.dtype
                or v.dtype is not self.dtype or q.shape != sq or k.shape != sk
                or v.shape != sv or q.stride() != tq or k.stride() != tk or v.stride() != tv
                or q.device != self.device or k.device != self.device
                or v.device != self.device):
            got = ", ".join(f"{n} {tuple(t.shape)} strides {t.stride()} {t.dtype} {t.device}"
                            for n, t in (("q", q), ("k", k), ("v", v)))
            want = ", ".join(f"{n} {s} strides {st}" for n, (s, st) in zip("qkv", self.layout))
            raise SpattnInputError(f"the plan was built for {want} ({self.dtype} on "
                                   f"{self.device}); this call has {got}: build a plan for "
                                   "these tensors (pat.plan(q, k, v, ...)) or call without one")
        if self.aligned and self.backend == "triton" and not _aligned(q, k, v):
            raise SpattnInputError("the plan was built for 16-byte aligned q, k, v (TMA "
                                   "loads, specialised kernels); this call's are not: build a "
                                   "plan for them")

    def check_tables(self, tables: dict, skip: tuple = ()) -> None:
        """Raise :class:`SpattnInputError` unless a score's float tables are shaped, typed and
        placed as those this plan was built with (its bounds proofs and kernels are for
        those): each call passes its own tables (a learnable table changes every step).
        ``skip``: tables the caller does not pass (composed ones: ``runtime.compose``)."""
        check_table_layout({n: s for n, s in self.table_layout.items() if n not in skip},
                           tables, self.device)

    def forward(self, q, k, v):
        """``(o, lse)``: the forward of this plan (a pattern without a score: a score's
        plan runs through :func:`spattn.runtime.scores.call`, which passes its tables)."""
        _unscored(self)
        if self.backend == "torch":
            from . import torch_backend
            c = self.call
            return torch_backend.fwd(self.pattern, q, k, v, scale=c.scale,
                                     q_offset=c.positions.q_offset, inputs=c.inputs,
                                     plan=self.forward_stage)
        return (_TRITON or _triton()).run_fwd(self.forward_stage, q, k, v)

    def backward_stage(self, q, k, v, o, do, deterministic=False, lse_grad=False):
        """The backward stage for gradients laid out like ``do`` (and outputs like ``o``),
        built on first use and kept; ``deterministic`` (or torch's deterministic switch):
        one that computes dQ without atomics (``dq="kernel"``); ``lse_grad``: one whose
        kernels take the gradient of the lse output."""
        det = deterministic or torch.are_deterministic_algorithms_enabled()
        key = (do.stride(), o.stride(), _aligned(do, o), det, lse_grad)
        stage = self._bwd.get(key)
        if stage is None:
            with self._lock:
                stage = self._bwd.get(key)
                if stage is None:
                    from . import triton_backend
                    opts = dict(self.options, dq="kernel") if det else self.options
                    if lse_grad:
                        opts = dict(opts, lse_grad=True)
                    stage = triton_backend.build_bwd(self.call, q, k, v, o, do, opts,
                                                     rows=self.rows)
                    stage.aligned = self.aligned
                    self._bwd[key] = stage
        return stage

    def prepare_backward(self, q, k, v, lse_grad: bool = False) -> None:
        """Build the backward stage now, for outputs and gradients laid out contiguously
        (what a loss's gradient usually is): nothing is then built inside the backward,
        which a CUDA graph capture needs. ``lse_grad``: the stage of a loss that also
        reads the returned lse (:meth:`backward_stage`)."""
        if self.backend == "triton":
            o = torch.empty(q.shape[:3] + (v.shape[-1],), dtype=q.dtype, device=q.device)
            self.backward_stage(q, k, v, o, torch.empty_like(o), lse_grad=lse_grad)

    def backward(self, q, k, v, o, lse, do, dlse=None, deterministic=False):
        """``(dq, dk, dv)``; ``dlse``: the gradient of the lse output, or None (on Triton a
        stage whose kernels read it: :meth:`backward_stage`); ``deterministic``: no atomic
        dQ."""
        _unscored(self)
        c = self.call
        if self.backend == "torch":
            from . import torch_backend
            return torch_backend.bwd(self.pattern, q, k, v, o, lse, do, scale=c.scale,
                                     q_offset=c.positions.q_offset, inputs=c.inputs,
                                     dlse=dlse, plan=self.forward_stage)
        o, do = bwd_operands(c, o, do)
        stage = self.backward_stage(q, k, v, o, do, deterministic, lse_grad=dlse is not None)
        return (_TRITON or _triton()).run_bwd(stage, q, k, v, o, lse, do, dlse=dlse)

    def __reduce_ex__(self, protocol):
        raise SpattnError(
            "a Plan is not pickled or copied (copy, deepcopy, pickle, torch.save): it holds "
            "compiled kernels, tables on its device and the runtime inputs it was built with; "
            "build one where it is used, with pat.plan(q, k, v, ...), and keep it out of "
            "objects that are copied (docs/caching.md, Plans)")

    def __repr__(self) -> str:
        c = self.call
        lines = [f"Plan for {self.pattern.name!r}: {self.pattern.source}",
                 f"  backend {self.backend}; q [B={c.B}, H={c.H}, Lq={c.Lq}, D={c.D}], "
                 f"k, v [Hk={c.HK}, Lk={c.Lk}]; {self.dtype} on {self.device}",
                 f"  positions: {c.positions}; scale {c.scale:.6g}"
                 + ("; 64-bit integers" if c.int64 else "")]
        if c.inputs:
            lines.append("  inputs: " + ", ".join(f"{n} {tuple(t.shape)}"
                                                   for n, t in c.inputs.items()))
        if self.table_layout:
            lines.append("  score tables (passed at each call): " + ", ".join(
                f"{n} {shape} {str(dt).replace('torch.', '')}"
                for n, (shape, dt) in self.table_layout.items()))
        lay = getattr(self, "layout_run", None)
        if lay is not None:
            lines.append(f"  in the token layout of {self.layout_origin.name!r}: "
                         f"{lay.remap.layout!r} (q, k, v gathered into its slot order, o "
                         f"and the lse back)")
        lines.append(f"  forward: {self.forward_stage!r}")
        for stage in self._bwd.values():
            lines.append(f"  backward: {stage!r}")
        if self.backend == "triton" and not self._bwd:
            lines.append("  backward: built at the first backward (or prepare_backward())")
        if c.analysis is not None and c.analysis.fine:
            lines.append(f"  analysis: {c.analysis!r}")
        return "\n".join(lines)


#: ``runtime.triton_backend``, imported at the first use (it imports Triton; an import
#: statement on the per-call path costs about a microsecond).
_TRITON = None


def _triton():
    global _TRITON
    from . import triton_backend
    _TRITON = triton_backend
    return _TRITON


#: ``runtime.gather_kernel.gather_rows``, imported at the first gather of a CUDA tensor (it
#: imports Triton, which a CPU-only process need not load) and kept: no import statement on
#: the per-call path.
_GATHER_ROWS = None


def _gather_rows():
    global _GATHER_ROWS
    if _GATHER_ROWS is None:
        from .gather_kernel import gather_rows
        _GATHER_ROWS = gather_rows
    return _GATHER_ROWS


def check_table_layout(layout: dict, tables: dict, device) -> None:
    """:class:`SpattnInputError` unless each table of ``layout`` (name -> ``(shape,
    dtype)``, what a plan was built for) is shaped and typed so in ``tables`` and on
    ``device``."""
    for name, (shape, dtype) in layout.items():
        t = tables[name]
        if tuple(t.shape) != shape or t.dtype != dtype or t.device != device:
            raise SpattnInputError(
                f"runtime input {name!r} has shape {tuple(t.shape)}, {t.dtype} on "
                f"{t.device}, but the plan was built for {name!r} of shape {shape}, "
                f"{dtype} on {device}: pass a table like the plan's or build a plan "
                f"for this one (pat.plan(q, k, v, {name}=...))")


def gather_tokens(t, index):
    """``t [B, H, N(, D)]`` (any strides) at ``index`` along the tokens: ``[M]`` for every
    batch element, ``[B, M]`` one row each; None for None. The row-copy kernel on CUDA."""
    if t is None:
        return None
    if t.is_cuda:
        return (_GATHER_ROWS or _gather_rows())(t, index)
    if index.dim() == 1:
        return t.index_select(2, index)
    at = index[:, None, :] if t.dim() == 3 else index[:, None, :, None]
    return t.gather(2, at.expand(t.shape[:2] + index.shape[1:] + t.shape[3:]))


def _unscored(plan) -> None:
    if getattr(plan.pattern, "score", None) is not None:
        from ..dsl.errors import SpattnBackendError
        raise SpattnBackendError("the plan of a pattern with a score runs through "
                                 "runtime.scores (its forward and backward take the tables)")


class PermutedPlan(Plan):
    """A plan that runs its pattern on the tokens in another order (``order``: the original
    token of each slot; ``inverse``: the slot of each token), through an ordinary
    :class:`Plan` (``inner``) of the pattern over slots. ``gather`` says how the tokens
    reach it: "copy" gathers q, k and v into slot order (``[B, H, Np, D]`` tensors), runs
    the inner plan on the copies and gathers the outputs (and in the backward the
    gradients) back into the caller's order, the gathers' time part of the call's;
    "kernel" (Triton only) runs the inner plan's kernels on the caller's tensors, every row
    addressed through the row tables ``rows`` (the caller's row of each slot, ``-1`` for a
    padding slot): no gathers; "box" (Triton, a :class:`RemappedPlan` whose layout allows
    it) runs the forward on the caller's tensors through 5-D TMA descriptors over the
    layout's boxes (``forward_stage``, :class:`~spattn.runtime.triton_backend.BoxRows`)
    and the backward through the inner plan as ``backward_gather`` says: "kernel" (row
    tables) or "copy" (docs/layouts.md, "How the kernels reach the rows").
    :class:`RemappedPlan` (a layout the compiler chose) and :class:`OrderedPlan` (an order
    the caller gave) differ only in where the order and the pattern over slots come from."""

    gather = "copy"
    #: How the backward reaches the rows: "copy" or "kernel" (the forward's way, except
    #: after a "box" forward, which has either).
    backward_gather = "copy"
    #: The inner call's forward tiles follow :func:`spattn.runtime.tables.layout_tiles`
    #: when nothing else chooses them (a layout the compiler chose, whose tiles it knows).
    tile_prior = False

    def _build_inner(self, inner, backend, q, k, v, *, scale, inputs, settings, options,
                     gather="copy", backward="copy"):
        qs, ks, vs = (self._stand_in(t) for t in (q, k, v))
        if backend == "triton" and (gather == "kernel"
                                    or (gather == "box" and backward == "kernel")):
            from .triton_backend import RowTables
            from .usage import warn_if_empty
            self.gather = self.backward_gather = "kernel"
            slots = torch.arange(self.order.shape[-1], device=self.order.device)
            # a padding slot reads token 0 in ``order``; its table entry is -1
            real = self.inverse.gather(-1, self.order) == slots
            table = torch.where(real, self.order, torch.full_like(self.order, -1))
            N = q.shape[2]
            self.rows = RowTables.of(table, table, N, N)
            call = Call.of(inner, qs, ks, scale=scale, q_offset=None, inputs=inputs,
                           settings=settings, backend=backend, v=vs)
            call.tile_prior = self.tile_prior
            # the kernels compute element offsets in the caller's tensors
            call.int64 = call.int64 or max(_extent(t) for t in (q, k, v)) > INT32_OFFSET
            self.inner = Plan(inner, backend, call, q, k, v, options, rows=self.rows)
            warn_if_empty(call)
        else:
            self.inner = build_plan(inner, backend, qs, ks, vs, scale=scale, q_offset=None,
                                    inputs=inputs, settings=settings, options=options,
                                    layouts=False, tile_prior=self.tile_prior)
        self.call = self.inner.call
        self.forward_stage = self.inner.forward_stage
        if gather == "box" and backend == "triton":
            self._build_box(q, k, v)

    def _build_box(self, q, k, v) -> None:
        """The forward through the layout's boxes on the caller's tensors (``gather`` "box"),
        or, where the tensors or the tiles do not allow it (tiles that do not divide the
        box), the inner plan's own forward (copies, or row tables for a "kernel"
        backward)."""
        from ..dsl.errors import SpattnConfigError
        from .triton_backend import BoxRows, build_fwd
        layout = getattr(getattr(self, "remap", None), "layout", None)
        box = None if layout is None else BoxRows.of(layout, q, k, v)
        if box is None:
            return
        try:
            stage = build_fwd(self.call, q, k, v, self.options, rows=box)
        except SpattnConfigError:
            return
        stage.aligned = self.aligned
        self.gather, self.forward_stage = "box", stage

    def _stand_in(self, t):
        """An empty ``t`` at the layout's slot count (requiring gradients as ``t`` does: the
        inner forward then classifies for the backward's tiles too)."""
        return t.new_empty(t.shape[:2] + (self.order.shape[-1], t.shape[3])) \
            .requires_grad_(t.requires_grad)

    def _gather(self, t, index):
        return gather_tokens(t, index)

    def forward(self, q, k, v):
        if self.gather == "box":
            return (_TRITON or _triton()).run_fwd(self.forward_stage, q, k, v)
        if self.gather == "kernel":
            return self.inner.forward(q, k, v)
        o, lse = self.inner.forward(*(self._gather(t, self.order) for t in (q, k, v)))
        return self._gather(o, self.inverse), self._gather(lse, self.inverse)

    def prepare_backward(self, q, k, v, lse_grad: bool = False) -> None:
        if self.backward_gather == "kernel":
            return self.inner.prepare_backward(q, k, v, lse_grad)
        self.inner.prepare_backward(*(self._stand_in(t) for t in (q, k, v)), lse_grad)

    def backward_stage(self, q, k, v, o, do, deterministic=False, lse_grad=False):
        """The inner plan's backward stage for tensors shaped like these (gathered ones,
        unless the kernels address the rows through tables)."""
        if self.backward_gather != "kernel":
            q, k, v, o, do = (self._stand_in(t) for t in (q, k, v, o, do))
        return self.inner.backward_stage(q, k, v, o, do, deterministic, lse_grad)

    def backward(self, q, k, v, o, lse, do, dlse=None, deterministic=False):
        if self.backward_gather == "kernel":    # (the lse, its gradient: the caller's order)
            return self.inner.backward(q, k, v, o, lse, do, dlse, deterministic=deterministic)
        g = [self._gather(t, self.order) for t in (q, k, v, o, lse, do, dlse)]
        grads = self.inner.backward(*g, deterministic=deterministic)
        return tuple(self._gather(t, self.inverse) for t in grads)


class RemappedPlan(PermutedPlan):
    """A plan that runs its pattern in a token layout (docs/layouts.md): the order is the
    layout's box order (padding slots read token 0 and are masked out) and the pattern over
    slots the remapped pattern."""

    tile_prior = True

    def __init__(self, pattern, backend: str, remap, q, k, v, *, scale, settings, options,
                 gather="copy", backward="copy"):
        self._bind(pattern, backend, q, k, v, options)
        self.remap = remap
        self.order, self.inverse = remap.layout.permutation(q.device)
        # the caller's pattern class (the torch backend's plan calls its analysis methods)
        inner = type(pattern)(remap.ir, name=f"{pattern.name}@layout",
                              backend=getattr(pattern, "backend", "auto"))
        self._build_inner(inner, backend, q, k, v, scale=scale, inputs={}, settings=settings,
                          options=options, gather=gather, backward=backward)

    def __repr__(self) -> str:
        r = self.remap
        head = [f"Plan for {self.pattern.name!r}: {self.pattern.source}",
                f"  layout: {r.layout} ({r.layout.padded_size} slots); computed pairs "
                f"{r.computed_layout:,} (sequence order {r.computed_sequence:,}); "
                f"{_gather_words(self)}"]
        if self.gather == "box":
            head.append(f"  forward on the caller's tensors: {self.forward_stage!r}")
        return "\n".join(head + ["  " + line for line in repr(self.inner).splitlines()])


def permutation(order: torch.Tensor, N: int) -> torch.Tensor:
    """An int64 copy of ``order`` (a dense integer tensor ``[N]``, or ``[R, N]``: one order
    per batch element; ``[1, N]`` becomes ``[N]``), after checking that each row is a
    permutation of ``0 .. N-1`` (SpattnInputError naming the slot, and the row of a 2-D
    order). Checked where an :class:`OrderedPlan` is built, once per plan: a call that finds
    its plan (keyed by the order's identity and version) reads no value of it."""
    o = order.to(torch.int64, copy=True).contiguous()
    if o.dim() == 2 and o.shape[0] == 1:
        o = o[0].clone()
    rows = o.reshape(-1, N)
    lo, hi = int(rows.min()), int(rows.max())
    if lo < 0 or hi >= N:
        bad = lo if lo < 0 else hi
        r, slot = ((rows == bad).nonzero()[0]).tolist()
        at = f"order[{slot}]" if o.dim() == 1 else f"order[{r}, {slot}]"
        raise SpattnInputError(f"order is not a permutation of 0..{N - 1}: {at} = "
                               f"{bad} is out of range")
    counts = torch.zeros(rows.shape, dtype=torch.int64, device=o.device).scatter_add_(
        1, rows, torch.ones_like(rows))
    if int(counts.max()) > 1:
        r, dup = ((counts > 1).nonzero()[0]).tolist()
        slots = (rows[r] == dup).nonzero()[:2, 0].tolist()
        missing = int((counts[r] == 0).nonzero()[0, 0])
        of = "" if o.dim() == 1 else f" (row {r})"
        raise SpattnInputError(f"order is not a permutation of 0..{N - 1}{of}: token {dup} "
                               f"is in slots {slots[0]} and {slots[1]} (and token {missing} "
                               "in none)")
    return o


class OrderedPlan(PermutedPlan):
    """A plan that runs its pattern in the caller's token order (``order=`` of a call or
    of ``pat.plan``; docs/layouts.md, "A caller's token order"): slot ``i`` holds token
    ``order[i]``. The mask stays defined over the original positions; the inner pattern
    reads it through the order (:func:`spattn.ir.layout.ordered`: the grid coordinates of
    each slot's token are int inputs of the inner plan, so its tiles are classified from
    them as any runtime input's are). ``inputs``: the pattern's own runtime inputs, already
    validated (indexed by original positions, as without an order)."""

    def __init__(self, pattern, backend: str, order, q, k, v, *, scale, inputs, settings,
                 options, gather="copy"):
        from ..ir.layout import ordered
        self._bind(pattern, backend, q, k, v, options)
        N = q.shape[2]
        # the plan's own copy: its inverse and coordinate tables are of this order, so a
        # later in-place write to the caller's tensor must not reach its gathers
        self.order = order = permutation(order, N)
        slots = torch.arange(N, dtype=order.dtype, device=order.device)
        self.inverse = torch.empty_like(order).scatter_(-1, order, slots.expand_as(order))
        self.ordered = ordered(pattern.ir, N, taken=pattern.inputs)
        inner = type(pattern)(self.ordered.ir, name=f"{pattern.name}@order",
                              inputs={**pattern.inputs,
                                      **{n: 1 for n in self.ordered.names}},
                              backend=getattr(pattern, "backend", "auto"))
        tables = self.ordered.tables(order)
        self._build_inner(inner, backend, q, k, v, scale=scale,
                          inputs={**(inputs or {}), **tables}, settings=settings,
                          options=options, gather=gather)

    def __repr__(self) -> str:
        per = "" if self.order.dim() == 1 else ", one order per batch element"
        head = [f"Plan for {self.pattern.name!r}: {self.pattern.source}",
                f"  token order: the caller's ({self.order.shape[-1]} slots{per}), the "
                f"pattern read through it on the {self.ordered.grid}; "
                f"{_gather_words(self)}"]
        return "\n".join(head + ["  " + line for line in repr(self.inner).splitlines()])


def gather_heads(t, index, group: int = 1):
    """``t [B, Hk, N(, D)]`` read per output head through ``index [G, M]``: ``out[b, g, j]
    = t[b, g // group, index[g, j]]``, ``[B, G, M(, D)]`` with ``G = Hk * group`` (a head
    order's keys and values per query head, GQA's kv heads repeated; ``group`` 1 scatters
    a per-head result back through the inverse order)."""
    if t.is_cuda:
        return (_GATHER_ROWS or _gather_rows())(t, index, per_head=True, group=group)
    if group > 1:
        t = t.repeat_interleave(group, dim=1)
    at = index[None] if t.dim() == 3 else index[None, :, :, None]
    return t.gather(2, at.expand(t.shape[:2] + index.shape[1:] + t.shape[3:]))


class HeadOrderedPlan(PermutedPlan):
    """A plan that runs its pattern with a key order per query head
    (:mod:`spattn.ir.headorder`, docs/layouts.md, "Per-head key orders"): ``order [Hq,
    N]`` holds, per head, the keys of that head's class first and every other key after
    them; queries keep their order. k and v are gathered per query head into
    ``[B, Hq, N, D]`` slot order (GQA: every query head of a group reads its kv head
    through its own order), the inner plan runs the pattern over slots (which reads
    ``order`` as its runtime input ``kpos``), and o and the lse need no gather; the
    backward gathers k and v again, and gathers dk and dv back through the inverse order,
    summed over each GQA group. The tokens are always copied (``SPATTN_LAYOUT_GATHER=
    kernel`` has no per-head row tables: such a plan copies)."""

    def __init__(self, pattern, backend: str, head, q, k, v, *, scale, q_offset, inputs,
                 settings, options):
        from ..ir.headorder import declared_inputs, tables
        self._bind(pattern, backend, q, k, v, options)
        self.head = head
        N = k.shape[2]
        self.group = q.shape[1] // k.shape[1]
        self.order = head.order(N, q.device)
        slots = torch.arange(N, dtype=self.order.dtype, device=self.order.device)
        self.inverse = torch.empty_like(self.order).scatter_(
            -1, self.order, slots.expand_as(self.order))
        inner = type(pattern)(head.ir, name=f"{pattern.name}@heads",
                              inputs=declared_inputs(head),
                              backend=getattr(pattern, "backend", "auto"))
        ks, vs = (self._stand_in(t) for t in (k, v))
        self.inner = build_plan(inner, backend, q, ks, vs, scale=scale, q_offset=q_offset,
                                inputs={**(inputs or {}), **tables(head, N, order=self.order)},
                                settings=settings,
                                options=options, layouts=False)
        self.call = self.inner.call
        self.forward_stage = self.inner.forward_stage

    def _stand_in(self, t):
        return t.new_empty((t.shape[0], self.order.shape[0]) + t.shape[2:])

    def _kv(self, k, v):
        return (gather_heads(k, self.order, self.group), gather_heads(v, self.order, self.group))

    def forward(self, q, k, v):
        return self.inner.forward(q, *self._kv(k, v))

    def prepare_backward(self, q, k, v, lse_grad: bool = False) -> None:
        self.inner.prepare_backward(q, self._stand_in(k), self._stand_in(v), lse_grad)

    def backward_stage(self, q, k, v, o, do, deterministic=False, lse_grad=False):
        return self.inner.backward_stage(q, self._stand_in(k), self._stand_in(v), o, do,
                                         deterministic, lse_grad)

    def backward(self, q, k, v, o, lse, do, dlse=None, deterministic=False):
        dq, dk, dv = self.inner.backward(q, *self._kv(k, v), o, lse, do, dlse,
                                         deterministic=deterministic)
        B, Hk, N = k.shape[0], k.shape[1], k.shape[2]

        def back(g, like):
            g = gather_heads(g, self.inverse)
            if self.group > 1:      # the group's query heads' sum, in float32 or wider
                acc = torch.promote_types(like.dtype, torch.float32)
                g = g.view(B, Hk, self.group, N, g.shape[-1]).sum(2, dtype=acc)
            return g.to(like.dtype)
        return dq, back(dk, k), back(dv, v)

    def __repr__(self) -> str:
        h = self.head
        head = [f"Plan for {self.pattern.name!r}: {self.pattern.source}",
                f"  {h} ({self.order.shape[0]} query heads, "
                f"{self.order.shape[1]} key slots); computed pairs {h.computed_order:,} "
                f"(sequence order {h.computed_sequence:,}); k and v gathered per head into "
                "slot order, dk and dv back"]
        return "\n".join(head + ["  " + line for line in repr(self.inner).splitlines()])


#: How a permuted plan's repr says its tokens reach the kernels.
_GATHER_WORDS = {"copy": "tokens gathered into slot order and back",
                 "kernel": "rows addressed through row tables in the kernels (no gathers)"}


def _gather_words(plan) -> str:
    if plan.gather != "box":
        return _GATHER_WORDS[plan.gather]
    return ("forward reads the layout's boxes through 5-D TMA (no gathers); backward: "
            + _GATHER_WORDS[plan.backward_gather])


def choose_layout(pattern, q, k, q_offset, inputs, settings, gather="copy"):
    """The :class:`~spattn.ir.layout.Gathers` of a call of ``pattern``: the
    :class:`~spattn.ir.layout.Remap` it runs in, or None (the ``SPATTN_LAYOUT`` setting:
    ``auto`` when it pays and the call has at least ``ir.layout.AUTO_MIN_TOKENS`` tokens,
    ``on`` whenever a grid is found, ``off`` never; patterns with runtime inputs run in
    sequence order), and how its tokens reach the forward's and the backward's kernels
    (``gather``: the setting, which the cost model prices and resolves)."""
    from ..ir.layout import AUTO_MIN_TOKENS, Gathers, choose, declared
    Lq, Lk = q.shape[2], k.shape[2]
    if settings.layout == "off" or inputs or (settings.layout == "auto"
                                              and Lq < AUTO_MIN_TOKENS):
        return Gathers(None, gather, gather)
    from ..ir.layout import resolve_gathers
    target, force = "cuda" if q.is_cuda else "cpu", settings.layout == "on"
    r = choose(pattern.ir, Lq, Lk, Positions.of(Lq, Lk, q_offset).q_offset,
               num_heads=q.shape[1], force=force,
               declared=declared(pattern), target=target, gathers=gather == "copy")
    return resolve_gathers(r, gather, target, force, box=_box_test(q, k, settings, gather))


def _box_test(q, k, settings, gather):
    """Whether a layout's forward can read its boxes through TMA on these tensors (the
    ``box`` of :func:`spattn.ir.layout.resolve_gathers`): for "box", and for "auto" on
    CUDA with TMA when ``ir.layout.AUTO_BOX``; None otherwise."""
    from ..ir import layout as _layout
    if gather not in ("auto", "box") or (gather == "auto" and not _layout.AUTO_BOX):
        return None
    from .triton_backend import BoxRows, _tma_device
    if not _tma_device(q.device, settings) or (gather == "auto" and not q.is_cuda):
        return None
    # on CUDA the forward's tiles are up to 128 slots (defaults, layout tiles, autotuner),
    # which must divide the box (a smaller box, of a grid too small for 128 cells, copies)
    cells = 128 if q.is_cuda else 1
    return lambda layout: layout.tokens % cells == 0 and BoxRows.of(layout, q, k) is not None


def _reads_head(pattern) -> bool:
    from ..ir.nodes import free_vars
    return "h" in free_vars(pattern.ir)


def choose_head_order(pattern, q, k, q_offset, inputs, settings):
    """The :class:`~spattn.ir.headorder.HeadOrder` a call of ``pattern`` runs in, or None
    (``SPATTN_LAYOUT`` as for a layout: ``auto`` when it pays and the call has at least
    ``ir.layout.AUTO_MIN_TOKENS`` keys, ``on`` whenever a class atom splits some head's
    keys, ``off`` never; queries keep their order, so any ``Lq``, ``Lk`` and
    ``q_offset``; the pattern's runtime ``inputs``, validated, are read through the
    order where they are indexed by ``k``)."""
    from ..ir.headorder import choose_head_order as choose
    from ..ir.layout import AUTO_MIN_TOKENS
    Lq, Lk = q.shape[2], k.shape[2]
    if settings.layout == "off" or q.shape[1] < 2 \
            or (settings.layout == "auto" and Lk < AUTO_MIN_TOKENS):
        return None
    ins = {n: t.to(torch.int64) for n, t in (inputs or {}).items()}
    return choose(pattern.ir, Lq, q.shape[1], Lk=Lk,
                  q_offset=Positions.of(Lq, Lk, q_offset).q_offset,
                  force=settings.layout == "on", target="cuda" if q.is_cuda else "cpu",
                  inputs=ins, declared=pattern.inputs, batch=q.shape[0])


#: The torch backend on the CPU runs a pattern in sequence order instead of the token layout
#: the layout chooser picked where its own plan prices sequence order at most this fraction
#: of the layout (plan and gathers): the two orders' estimates err by about that much
#: (``strided(64)`` at 4096 tokens, priced 0.76 of its layout, ran 8% slower in sequence
#: order; columns beside a window at 1024, priced 0.69, ran 1.6x faster).
CPU_SEQUENCE_MARGIN = 0.75


def build_plan(pattern, backend: str, q, k, v, *, scale: float, q_offset, inputs,
               settings=None, options=None, layouts: bool = True, tables=None,
               order=None, tile_prior: bool = False) -> Plan:
    """A new :class:`Plan` (arguments already validated: ``api.validate``); an
    :class:`OrderedPlan` for a caller's token ``order`` (its values checked there:
    :func:`permutation`), else a :class:`RemappedPlan` when the pattern runs in a token
    layout, or a :class:`HeadOrderedPlan` when it runs in per-head key orders
    (:func:`choose_head_order`) (``layouts``; never for a pattern with a score, whose
    calls run in a layout through ``runtime.scores.LayoutRun`` instead). ``tables``: a score's float tables, which the stages are built
    (and tuned) with; each call passes its own (``runtime.scores``). The option
    ``layout_gather`` ("auto", "copy", "kernel" or "box", default the setting
    ``SPATTN_LAYOUT_GATHER``)
    says how a permuted plan's tokens reach the Triton kernels (:class:`PermutedPlan`).
    ``tile_prior``: the call is a token layout's (:attr:`Call.tile_prior`)."""
    from .api import check_grid
    from .progress import progress
    from .usage import warn_if_empty
    check_grid(pattern, q.shape[2], k.shape[2], f"q (shape {tuple(q.shape)}) and k (shape "
                                                 f"{tuple(k.shape)})")
    settings = settings or _settings.current()
    options = dict(options or {})
    gather = layout_gather(options.pop("layout_gather", None), settings, backend)
    with progress(f"building the {backend} plan of {pattern.name!r} for q "
                  f"{list(q.shape)} {str(q.dtype).replace('torch.', '')} (kernels, tables)"):
        if order is not None:
            _check_lists(pattern, q, k, q_offset, inputs)
            # a caller's order has no cost model to price its gathers: copies unless asked
            return OrderedPlan(pattern, backend, order, q, k, v, scale=scale, inputs=inputs,
                               settings=settings, options=options,
                               gather="copy" if gather in ("auto", "box") else gather)
        remap = None
        if layouts and getattr(pattern, "score", None) is None:
            remap, gather, backward = choose_layout(pattern, q, k, q_offset, inputs, settings,
                                                    gather)
        if remap is not None:
            _check_lists(pattern, q, k, q_offset, inputs)
            permuted = RemappedPlan(pattern, backend, remap, q, k, v, scale=scale,
                                    settings=settings, options=options, gather=gather,
                                    backward=backward)
            if backend != "torch" or not q.is_cpu or settings.layout != "auto":
                return permuted
            from .cpu_plan import COPY_COST
            # the CPU plan prices both orders with its own model (the layout chooser counts
            # whole tiles; the CPU plan's keys strategy computes fewer pairs than that in
            # sequence order); the layout pays its gathers on top
            plain = build_plan(pattern, backend, q, k, v, scale=scale, q_offset=q_offset,
                               inputs=inputs, settings=settings, options=options,
                               layouts=False, tables=tables)
            B, Hq, Lq = q.shape[:3]
            moved = B * (2 * Hq * Lq + 2 * k.shape[1] * k.shape[2]) * 64    # q, o; k, v
            priced = permuted.forward_stage.cost + COPY_COST * moved
            return plain if plain.forward_stage.cost <= CPU_SEQUENCE_MARGIN * priced \
                else permuted
        if layouts and getattr(pattern, "score", None) is None and _reads_head(pattern):
            head = choose_head_order(pattern, q, k, q_offset, inputs, settings)
            if head is not None:
                _check_lists(pattern, q, k, q_offset, inputs)
                return HeadOrderedPlan(pattern, backend, head, q, k, v, scale=scale,
                                       q_offset=q_offset, inputs=inputs, settings=settings,
                                       options=options)
        call = Call.of(pattern, q, k, scale=scale, q_offset=q_offset, inputs=inputs,
                       settings=settings, backend=backend, tables=tables, v=v)
        call.tile_prior = tile_prior
        plan = Plan(pattern, backend, call, q, k, v, options)
    warn_if_empty(call)
    return plan


def _check_lists(pattern, q, k, q_offset, inputs) -> None:
    """The lists of ``pattern`` in range over the call (``ir.intervals.check_list_bounds``,
    as :meth:`Call.of` checks them), for a plan over slots: its inner call checks the lists
    of the rewritten pattern, where a term may have simplified away, and the same calls
    must be refused in any token order."""
    from ..ir.intervals import check_list_bounds
    B, H, Lq = q.shape[:3]
    Lk = k.shape[2]
    ins = {n: t.to(device=q.device, dtype=torch.int64) for n, t in (inputs or {}).items()}
    check_list_bounds(pattern, Lq, Lk, num_heads=H, batch=B,
                      q_offset=Positions.of(Lq, Lk, q_offset).q_offset, inputs=ins)


def layout_gather(value, settings, backend: str) -> str:
    """How a permuted plan's tokens reach the kernels: ``value`` (the plan option
    ``layout_gather``), else the setting ``SPATTN_LAYOUT_GATHER``; always "copy" on the
    torch backend (its row chunks gather anyway)."""
    from ..codegen.config import choice
    from .settings import LAYOUT_GATHERS
    g = choice(value, "layout_gather", LAYOUT_GATHERS, default=settings.layout_gather)
    return g if backend == "triton" else "copy"


# ------------------------------------------------------------------ the cache

def data_version(t: torch.Tensor):
    """What a plan cache keys a data tensor's contents by: its version counter (an in-place
    write bumps it). An inference tensor (made under ``torch.inference_mode``) has none and
    may still be written in place there: it is keyed by its contents, as bytes (numpy has
    no bfloat16)."""
    if t.is_inference():
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        return ("contents", t.dtype, raw.numpy().tobytes())
    return t._version


class PlanCache:
    """A bounded, thread-safe LRU cache of plans for calls without one (module docstring)."""

    def __init__(self, size: int = PLANS_SIZE):
        self.size = size
        self._lock = threading.Lock()
        self._plans: OrderedDict = OrderedDict()
        #: Bumped by :meth:`clear`: part of a pattern's last-call memo (``runtime.api``),
        #: so that no plan built before a clear is served after it.
        self.epoch = 0

    @staticmethod
    def key(pattern, backend, q, k, v, scale, q_offset, inputs, settings,
            order=None) -> tuple:
        from . import tune
        ins = tuple((n, id(t), data_version(t), t.data_ptr(), tuple(t.shape), t.stride(),
                     t.dtype, str(t.device)) for n, t in sorted((inputs or {}).items()))
        if order is not None:       # data, like an input: by identity and version
            ins += (("order()", id(order), data_version(order), order.data_ptr()),)
        return (pattern.source, getattr(pattern, "grid", None), getattr(pattern, "grid_offset", 0),
                getattr(pattern, "grid_suffix", 0),
                tuple(sorted(pattern.inputs.items())), backend, _layout(q, k, v),
                q.dtype, k.dtype, str(q.device), _aligned(q, k, v), scale, q_offset, ins,
                settings.raw, tune.generation())

    def get(self, pattern, backend, q, k, v, *, scale, q_offset, inputs, tables=None,
            order=None) -> Plan:
        """The cached plan of this call, built on a miss (``tables``: a score's float
        tables: every call passes its own to the stages, so only their shapes and dtypes
        are part of the key -- the plan's kernels may rely on them, e.g. indices proven in
        range for a table of that size; ``order``: a caller's token order, keyed like a
        runtime input)."""
        settings = _settings.current()
        key = self.key(pattern, backend, q, k, v, scale, q_offset, inputs, settings, order)
        if tables:
            key = key[:-1] + (tuple((n, tuple(t.shape), t.dtype)
                                    for n, t in sorted(tables.items())),) + key[-1:]
        with self._lock:
            entry = self._plans.get(key)
            if entry is not None:
                self._plans.move_to_end(key)
                return entry[0]
        plan = build_plan(pattern, backend, q, k, v, scale=scale, q_offset=q_offset,
                          inputs=inputs, settings=settings, tables=tables, order=order)
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return plan
        from . import tune
        key = key[:-1] + (tune.generation(),)      # a first call's own tuning is its answer
        with self._lock:
            # the entry holds the input tensors: their ids stay theirs while it lives
            self._plans[key] = (plan, tuple((inputs or {}).values()) + (order,))
            while len(self._plans) > self.size:
                self._plans.popitem(last=False)
        return plan

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
            self.epoch += 1

    def __len__(self) -> int:
        return len(self._plans)


#: The plans of calls without one.
PLANS = PlanCache()
