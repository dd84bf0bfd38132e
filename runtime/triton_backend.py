"""Launchers of the generated Triton kernels: a plan's forward and backward stages.

A stage is everything one kernel launch needs that does not change from call to call:
the compiled module and its :class:`~spattn.codegen.config.KernelConfig`, the grid, the
tables and work order, and every scalar argument. A plan (:mod:`spattn.runtime.plan`)
builds its stages once::

    build_fwd(call, q, k, v, options) -> FwdStage      run_fwd(stage, q, k, v) -> (o, lse)
    build_bwd(call, q, k, v, o, do, options) -> BwdStage
                                  run_bwd(stage, q, k, v, o, lse, do) -> (dq, dk, dv)

and a call runs them: it allocates the outputs, makes the TMA descriptors (they hold the
tensors' addresses) and launches, nothing else. ``fwd`` and ``bwd`` build and run in one
go (tests and tools that pass explicit options).

q ``[B, Hq, Lq, D]``, k, v ``[B, Hk, Lk, D]`` with any strides (no copies), o in q's
dtype, lse fp32 ``[B, Hq, Lq]`` (natural log; ``-inf`` for a fully masked row).

Options (keyword, all optional): ``strategy`` ("ranges" | "table"), ``block_m``,
``block_n``, ``num_warps``, ``num_stages``, ``loop``, ``closed_form``; backward:
``block_m1``, ``block_n1`` (dK/dV tile), ``block_m2``, ``block_n2`` (dQ tile) --
``block_m``/``block_n`` set both backward tiles; ``tables`` (:data:`TABLE_MODES`),
``tma``, ``int64``. Explicit options beat the ``SPATTN_*`` settings the plan was built
under, which beat the defaults.

``tma`` (bool) picks the block loads and stores of Q, K, V, O (and dO, dQ, dK, dV)
through TMA tensor descriptors. By default (``SPATTN_TMA`` unset or ``auto``) it is on for
the forward on CUDA, where it measured faster, and off for the backward, whose 12
descriptors per call cost more host time than its kernels gain (:data:`TMA_AUTO`);
``SPATTN_TMA`` = ``1`` / ``0`` turns it on for both (also under the interpreter, which
emulates descriptors: how the CPU tests cover these kernels) or off. It is used only where
TMA exists (CUDA compute capability 9 or more, or the interpreter) and every tensor meets
its layout rules (:func:`tma_ok`); otherwise the pointer kernels run.

``int64`` selects kernels whose integer arithmetic is 64-bit: positions, lengths, head and
batch ids, runtime-input values (passed as int64 tensors), closed-form bounds and the
in-head element offsets. The plan decides it from the static range analysis
(:func:`spattn.ir.bounds.kernel_int64`) and the tensors' extents; it is a field of the
kernel config, so an int64 kernel is a file of its own.

On CUDA, a stage that sets no tile, warps or stages (neither as an option nor through the
environment) is autotuned once per (pattern, kind, head-dim block, dtype, device,
strategy, power-of-two buckets of the lengths and of batch x heads, the row bucket of
:func:`rows_bucket`, TMA, int64), and the choice persisted (``runtime/tune.py``).
"""
from __future__ import annotations

import contextlib
import io
import re
import sys
from dataclasses import dataclass

import torch

from ..codegen.config import BWD_DQ, choice
from ..dsl.errors import SpattnConfigError, SpattnValueError
from ..ir import bounds as _bounds
from . import cache as _cache
from .settings import launch_guard
from . import tune as _tune
from .tables import TABLE_MODES, bwd_tables, fwd_tables, ranges_order, row_bucket

LOG2E = 1.4426950408889634
#: The smallest normal fp32 number (2**-126).
FP32_TINY = 2.0 ** -126

OPTION_NAMES = ("strategy", "block_m", "block_n", "num_warps", "num_stages", "closed_form",
                "block_m1", "block_n1", "block_m2", "block_n2", "loop", "tables", "tma",
                "int64", "score_load", "score_index", "fast_tanh", "dq", "lse_grad")

#: The smallest tile: a score's index proof at this grain is necessary for any tiling (the
#: tiles are powers of two, so larger ones pad further); a stage proves again with its own
#: tiles once they are known (:func:`_checked_free`).
SCORE_PROOF_TILE = 16

#: TMA by default (``SPATTN_TMA`` unset or ``auto``) on CUDA, per kernel kind.
TMA_AUTO = {"fwd": True, "bwd": False}
#: Programs of a persistent kernel under the interpreter: fewer than the work items of
#: any but the smallest test shapes, so every test exercises the work-item loop.
INTERPRET_PROGRAMS = 3


def tma_ok(*tensors) -> bool:
    """Every tensor can be read through a TMA descriptor over its 4-D [B, heads, L, D]
    layout: contiguous last dim, other strides positive multiples of 16 bytes, base
    16-byte aligned (``cuTensorMapEncodeTiled``'s rules)."""
    return all(t.dim() == 4 and _tma_strides_ok(t, t.stride()) for t in tensors)


def _tma_strides_ok(t, strides) -> bool:
    """TMA's layout rules for a view of ``t``'s memory with ``strides`` (elements, the last
    one the D axis): contiguous D, the other strides positive multiples of 16 bytes, the
    base 16-byte aligned, rows of D a multiple of 16 bytes (the outputs: contiguous)."""
    e = t.element_size()
    return (strides[-1] == 1 and t.data_ptr() % 16 == 0
            and all(s > 0 and (s * e) % 16 == 0 for s in strides[:-1])
            and (t.shape[-1] * e) % 16 == 0)


def _tma_device(device, settings) -> bool:
    """TMA exists: the interpreter (which emulates descriptors) or CUDA capability >= 9."""
    if settings.interpret:
        return True
    return device.type == "cuda" and (_cache.capability(device) or (0,))[0] >= 9


def tma_choice(want, kind: str, device, settings, *tensors) -> bool:
    """Whether a ``kind`` stage loads through TMA: the option ``want`` (True / False), else
    ``SPATTN_TMA``, else :data:`TMA_AUTO` on CUDA; never where TMA does not exist or a
    tensor breaks its layout rules (module docstring)."""
    if want is None:
        want = settings.tma
    if want is None:
        want = device.type == "cuda" and TMA_AUTO[kind]
    return bool(want) and _tma_device(device, settings) and tma_ok(*tensors)


def _desc(t, rows: int, block_d: int, view=None):
    """A TMA descriptor over ``t`` [B, heads, L, D] with block [1, 1, rows, block_d]
    (``view``: ``(shape, strides, block)`` of another view of ``t``'s memory instead:
    :meth:`BoxRows.view`).

    Made without ``TensorDescriptor``'s own checks (a third of a launch's host time on
    the GPU): the stage chose TMA only for tensors that pass them (:func:`tma_ok`, a
    power-of-two block), and every call's tensors are laid out, typed and aligned as
    those (the plan's check, or the signature of a pattern's last call); the outputs are
    fresh contiguous tensors of those shapes."""
    cls, fast = _TENSOR_DESCRIPTOR or _descriptor_class()
    shape, strides, block = view or (list(t.shape), list(t.stride()), [1, 1, rows, block_d])
    if not fast:
        return cls(t, shape, strides, block)
    d = cls.__new__(cls)
    d.__dict__.update(base=t, shape=shape, strides=strides, block_shape=block,
                      padding="zero")
    return d


#: ``(TensorDescriptor, whether its fields are the five this module fills)``.
_TENSOR_DESCRIPTOR = None
_DESCRIPTOR_FIELDS = ["base", "shape", "strides", "block_shape", "padding"]


def _descriptor_class():
    global _TENSOR_DESCRIPTOR
    from triton.tools.tensor_descriptor import TensorDescriptor
    _TENSOR_DESCRIPTOR = (TensorDescriptor, fillable(TensorDescriptor, _DESCRIPTOR_FIELDS))
    return _TENSOR_DESCRIPTOR


def fillable(cls, fields: list[str]) -> bool:
    """Whether a descriptor class is a dataclass without slots whose fields are ``fields``,
    in order: one whose instances can be made by filling their ``__dict__``, without the
    class's own checks (:func:`_desc`, ``ws_fwd.descriptor``)."""
    import dataclasses
    return dataclasses.is_dataclass(cls) and not hasattr(cls, "__slots__") and \
        [f.name for f in dataclasses.fields(cls)] == fields


def _scale_log2(scale: float) -> float:
    """The kernels' ``sm_scale_log2`` (fp32): ``scale * log2(e)``, at least
    :data:`FP32_TINY`.

    A smaller positive value would reach the kernel as 0 (fp32 underflow: ``scale=1e-300``)
    or as a subnormal that the GPU flushes to 0, and the masked scores' ``-inf * 0`` are
    NaN.  The floor changes nothing else: below it every ``|s| * scale * log2(e)`` of a
    finite fp32 score ``|s| < 2**100`` is under ``2**-26``, so each softmax weight is 1
    to fp32 precision (``exp2(x) = 1 + 0.69 x``) with the true scale and with the floor
    alike, and the lse is the log of the allowed keys' count either way.
    """
    return max(scale * LOG2E, FP32_TINY)


def _dot_prec(dtype) -> str:
    """``tl.dot``'s ``input_precision``: fp32 inputs as three tf32 products ("tf32x3", the
    operands split into a tf32 high part and a tf32 remainder), within 1e-6 of float64 as
    "ieee" is but on the tensor cores: up to 2.9x faster forward, 2.3-3.9x faster
    forward+backward and 2-4x shorter compilation than "ieee" on an H200
    (``benchmarks/fp32_dot.py``); one tf32 product loses ~3 decimal digits. 16-bit inputs:
    the tensor cores' own products (the argument is ignored)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _upcast(call) -> bool:
    """Triton 3.6's interpreter feeds bf16 bits to numpy's matmul unconverted (wrong
    products): under the interpreter bf16 calls run in fp32 and are cast back."""
    return call.settings.interpret and call.dtype == torch.bfloat16


def _table_args(t: torch.Tensor, nd: int) -> list:
    """Kernel arguments of one input table ``t`` whose last ``nd`` dims are indexed: the
    tensor, its batch and head strides (0 where broadcast), then its strides and sizes."""
    lead = t.dim() - nd
    sb = t.stride(0) if lead >= 1 and t.shape[0] > 1 else 0
    sh = t.stride(1) if lead >= 2 and t.shape[1] > 1 else 0
    return ([t, sb, sh] + [t.stride(lead + d) for d in range(nd)]
            + [t.shape[lead + d] for d in range(nd)])


def _input_args(pattern, inputs: dict, int64: bool) -> list:
    """Kernel arguments of the runtime inputs, in the order of ``pattern.inputs``: int32
    tensors (cheaper loads; the plan proved the values fit), int64 tensors for an
    ``int64`` kernel."""
    dtype = torch.int64 if int64 else torch.int32
    return [a for name, nd in pattern.inputs.items()
            for a in _table_args(inputs[name].to(dtype), nd)]


def _score_args(pattern, tables: dict) -> list:
    """Kernel arguments of a score's float tables, in the order of ``pattern.score_inputs``
    (leading arguments of every launch: a learnable table changes every step). Tables are
    contiguous (``runtime.scores`` makes them so) so that their gradients share strides."""
    return [a for name, nd in pattern.score_inputs.items()
            for a in _table_args(tables[name], nd)]


def _grad_args(pattern, tables: dict, grads: dict | None, partials: dict | None = None) -> list:
    """The dQ kernel's table-gradient arguments: per table its fp32 gradient buffer (shaped
    and laid out like the table) and whether to write it (atomic adds into the buffer,
    or with the kernel's constexpr ``DETERMINISTIC`` the per-tile sums of its loads into
    its partial buffer ``partials[name]``, fp32 :func:`partial_shape`, zeroed:
    ``codegen.kernels.partial_slots``); then, for a table that has one, the partial buffer
    (the table itself where unused)."""
    from ..codegen.kernels import partial_slots
    slots = partial_slots(pattern)
    args = []
    for name in pattern.score_inputs:
        g = (grads or {}).get(name)
        part = (partials or {}).get(name)
        args += [tables[name], 0] if g is None else [g, 1]
        if name in slots:
            args.append(tables[name] if part is None else part)
    return args


def _check_options(options: dict) -> dict:
    bad = set(options) - set(OPTION_NAMES)
    if bad:
        raise SpattnConfigError(f"unknown option(s) {sorted(bad)}; expected some of "
                                f"{', '.join(OPTION_NAMES)}")
    return {k: v for k, v in options.items() if v is not None}


def resolve_options(call, kind: str, options: dict, tensors: tuple, run, compile_only,
                    rows=None, tune: bool = True) -> dict:
    """The options a ``kind`` stage is built with: the explicit ``options``, the TMA
    decision, the 64-bit decision and the autotuner's choice (``rows``: the stage's
    :class:`RowTables`: kernels that address rows through them, never through TMA;
    ``tune`` False: the defaults, never the autotuner's)."""
    opts = _check_options(options)
    if isinstance(rows, BoxRows):
        opts["rows"] = "box"
    elif rows is not None:
        opts["rows"], opts["tma"] = "table", False
    if not call.ranges_ok and opts.get("closed_form") is None:    # (a given one is trusted)
        wanted = opts.get("strategy") or call.settings.strategy
        if wanted == "ranges":
            raise SpattnConfigError(
                "the ranges strategy cannot run this call: its closed forms treat query "
                "positions beyond +-2**30 as unbounded, or their bounds leave the 64-bit "
                f"integers here (q_offset {call.positions.q_offset}, Lq {call.Lq}, Lk "
                f"{call.Lk}); use the strategy 'table' (or leave "
                "it unset: the table strategy is then picked)")
        opts["strategy"] = "table"
    given = opts.get("closed_form")
    if given is not None and not _bounds.closed_form_exact(
            given, call.Lq, call.Lk, num_heads=call.H, batch=call.B,
            q_offset=call.positions.q_offset):
        raise SpattnValueError(
            "the given closed_form has key-range bounds beyond the 64-bit integers for "
            f"Lq={call.Lq}, Lk={call.Lk}, q_offset={call.positions.q_offset}: a kernel cannot "
            "compute them exactly; leave closed_form unset (the table strategy is then used)")
    if opts.get("rows") == "box":     # (the plan chose it: BoxRows.of checked the tensors)
        opts["tma"] = True
    else:
        opts["tma"] = tma_choice(opts.get("tma"), kind, call.device, call.settings, *tensors)
    opts.setdefault("int64", call.int64)
    if kind == "bwd":
        opts["dq"] = dq_choice(opts.get("dq"), call)
    else:
        opts.pop("dq", None)        # (a plan's options serve both kinds)
        opts.pop("lse_grad", None)
    opts["tables"] = choice(opts.get("tables"), "tables", TABLE_MODES,
                            default=call.settings.tables)
    q = tensors[0]
    if getattr(call.pattern, "score", None) is not None:
        _score_options(call, opts, q.dtype)
    if kind == "fwd" and call.tile_prior:
        _layout_tiles(call, opts, q)
    if not tune:
        return opts
    return _tune.tuned_options(
        call.pattern, kind, head_dim=q.shape[-1], dtype=q.dtype, device=q.device,
        Lq=call.Lq, Lk=call.Lk, BH=q.shape[0] * q.shape[1], options=opts, run=run,
        compile_only=compile_only, settings=call.settings, rows=lambda: rows_bucket(call))


def dq_choice(want, call) -> str:
    """How a backward stage computes dQ (``codegen.config.BWD_DQ``): the option ``want``,
    else ``SPATTN_BWD_DQ``, else "kernel"; always "kernel" while
    ``torch.are_deterministic_algorithms_enabled()`` (the atomic additions' order varies
    between runs) and for a pattern with float score tables (whose gradients the dQ kernel
    accumulates)."""
    dq = choice(want, "dq", BWD_DQ, default=call.settings.bwd_dq)
    if dq == "atomic" and (torch.are_deterministic_algorithms_enabled()
                           or getattr(call.pattern, "score_inputs", None)):
        return "kernel"
    return dq


def _layout_tiles(call, opts: dict, q) -> None:
    """A token layout's forward tiles (:func:`spattn.runtime.tables.layout_tiles`, measured
    for 16-bit inputs with D = 65..128 on an H200) where neither the call, the settings nor
    the autotuner choose them."""
    if q.dtype not in (torch.float16, torch.bfloat16) or not 64 < q.shape[-1] <= 128 \
            or call.settings.interpret or _tune.enabled(q.device, call.settings) \
            or _tune.explicit("fwd", opts, call.settings):
        return
    from .tables import layout_tiles
    tiles = layout_tiles(call.analysis)
    if tiles is not None:
        opts.update(zip(("block_m", "block_n", "num_warps", "num_stages"), tiles))


def _score_options(call, opts: dict, dtype) -> None:
    """A score's kernel flags (``codegen.config.SCORE_LOADS``, ``SCORE_INDEX``, fast tanh)
    from the options, else the settings: ``score_index`` "auto" is "free" where
    :func:`spattn.runtime.scores.indices_in_range` may prove every computed index in range
    (it does for tiles of :data:`SCORE_PROOF_TILE`; :func:`_checked_free` decides with the
    stage's tiles), else "clamp"; ``fast_tanh`` "auto" is on for
    16-bit q, k, v on CUDA (never under the interpreter, which cannot run inline PTX)."""
    st = call.settings
    opts.setdefault("score_load", st.score_load)
    idx = opts.get("score_index") or st.score_index
    if idx in ("auto", "free"):
        proven = _proven(call, SCORE_PROOF_TILE, SCORE_PROOF_TILE)
        if idx == "free" and not proven:
            raise SpattnConfigError(
                "score_index='free' reads the score's tables without a bounds check, but "
                "their indices are not proven in range over the tiles this call computes "
                f"(Lq={call.Lq}, Lk={call.Lk}, tables "
                f"{ {n: tuple(t.shape) for n, t in call.tables.items()} }): use 'clamp'")
        idx = "free" if proven else "clamp"
    opts["score_index"] = idx
    if opts.get("fast_tanh") is None:
        fast = st.fast_tanh
        if fast is None:
            fast = call.device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
        opts["fast_tanh"] = bool(fast) and not st.interpret


def _proven(call, pad_q: int, pad_k: int) -> bool:
    from .scores import indices_in_range
    return indices_in_range(call.pattern, call.tables, call.Lq, call.Lk, num_heads=call.H,
                            batch=call.B, q_offset=call.positions.q_offset, pad_q=pad_q,
                            pad_k=pad_k)


def _checked_free(call, kind: str, D: int, dtype, opts: dict, loaded):
    """``loaded`` (module, config, closed form), or the same kernel with clamped indices
    when its indices are not proven in range over its own tiles (every stage, tuning
    candidates included, passes here: no unchecked load runs without its proof)."""
    cfg = loaded[1]
    if cfg.score_index != "free":
        return loaded
    pad_q = max(cfg.block_m, cfg.block_m2)          # (block_m2 / n2: 0 in a forward config)
    pad_k = max(cfg.block_n, cfg.block_n2)
    if _proven(call, pad_q, pad_k):
        return loaded
    return _load(call, kind, D, dtype, {**opts, "score_index": "clamp"})


def rows_bucket(call) -> int:
    """The call's row bucket for the tuning key (:func:`spattn.runtime.tables.row_bucket`
    of :meth:`~spattn.runtime.tables.Analysis.row_span`, from the closed form where the
    ranges strategy can run the call)."""
    from ..codegen.config import get_closed_form
    cf = get_closed_form(call.pattern) if call.ranges_ok else None
    return row_bucket(*call.analysis.row_span(cf))


def _load(call, kind: str, D: int, dtype, opts: dict):
    kopts = {k: v for k, v in opts.items() if k != "tables"}
    return _cache.load_with_form(call.pattern, kind, head_dim=D, dtype=dtype,
                                 device=call.device, settings=call.settings, **kopts)


# ---------------------------------------------------------------- launches

class BoundLaunch:
    """A compiled kernel with its arguments bound once: later launches pass only the
    per-call tensors (Triton's own launch path, without re-binding, re-specialising and
    looking the kernel up by its arguments, ~20 us of host time per launch).

    Built after a first launch through the JIT function, from what that launch bound;
    valid for arguments laid out as those (the plan checks it), on the same device. Not
    built under the interpreter or off CUDA (``of`` returns None there). The first
    launch's ``n_head`` leading (per-call) arguments are not kept: every launch passes its
    own, and kept they would hold that call's tensors (q, k, v, o, dO, the gradients) for
    as long as the stage lives.

    Where Triton's launcher has the form :func:`raw_launcher` reads, a launch calls its C
    launcher directly, each TMA descriptor argument expanded through a
    :class:`TensorMaps` of its position (the encoded map reused while the tensor's address,
    shape and strides repeat) instead of Triton's per-launch expansion, which encodes
    every descriptor again (docs/codegen.md, "TMA loads and stores")."""

    __slots__ = ("compiled", "grid", "values", "device", "n_head", "raw", "tails")

    def __init__(self, compiled, grid, values, device, n_head: int = 0, raw=None):
        self.compiled, self.grid, self.values, self.device = compiled, grid, values, device
        self.n_head, self.raw, self.tails = n_head, raw, {}

    @classmethod
    def of(cls, kernel, compiled, grid, args, meta, device, n_head: int = 0):
        """``None`` off CUDA, under the interpreter, or without Triton's launch API."""
        if device.type != "cuda" or compiled is None or not hasattr(compiled, "packed_metadata"):
            return None
        from triton.runtime import driver
        dev = driver.active.get_current_device()
        bound, _, _ = kernel.device_caches[dev][4](*args, **meta)    # the JIT's own binder
        values = kept_values(tuple(bound.values()), n_head)
        return cls(compiled, tuple(grid) + (1,) * (3 - len(grid)), values, dev, n_head,
                   raw_launcher(compiled.run, len(values)))

    def __call__(self, *head) -> bool:
        """Launch with ``head`` as the leading (per-call) arguments; False (nothing done)
        when the current device is not the one the kernel was launched on, or ``head`` is
        shorter than the leading arguments the launch did not keep."""
        runtime, driver = _TRITON_RUNTIME or _triton_runtime()
        active = driver.active
        if active.get_current_device() != self.device or len(head) < self.n_head:
            return False
        c = self.compiled
        stream = active.get_current_stream(self.device)
        g = self.grid
        enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
        raw = self.raw
        if raw is not None and RAW_LAUNCH and not (enter.calls or leave.calls):
            launch, maps, coop, pdl = raw
            out = []
            for a, m in zip(head, maps):
                if m is None:
                    out.append(a)
                else:
                    out += m(a)
            n = len(head)
            tail = self.tails.get(n)
            if tail is None:
                tail = self.tails[n] = _tail(self.values, maps, n)
            for a, m in tail:
                if m is None:
                    out += a
                else:
                    out += m(a)
            launch(g[0], g[1], g[2], stream, c.function, coop, pdl, None, None,
                   c.packed_metadata, None, None, None, *out)
            return True
        args = head + self.values[len(head):]
        if enter.calls or leave.calls:         # a profiler listens: what Triton's launch passes
            c.run(g[0], g[1], g[2], stream, c.function, c.packed_metadata,
                  c.launch_metadata(g, stream, *args), enter, leave, *args)
        else:
            c.run(g[0], g[1], g[2], stream, c.function, c.packed_metadata, None, None, None,
                  *args)
        return True


#: Bound launches call Triton's C launcher directly where they can (:func:`raw_launcher`);
#: False sends every launch through Triton's launcher object (benchmarks time both).
RAW_LAUNCH = True

#: Encoded TMA maps a :class:`TensorMaps` keeps before it starts again.
TENSOR_MAPS = 16


class TensorMaps:
    """The launcher's arguments for one TMA descriptor argument of a kernel (Triton's
    ``make_tensordesc_arg``: the encoded ``CUtensorMap``, then the shape and strides),
    kept by the descriptor's base address, shape, strides and padding, which with the
    kernel's own descriptor metadata (block, swizzle, element type: fixed per compiled
    kernel) are all the map encodes. A later launch on the same memory reuses the map (a
    training loop's tensors come back at the caching allocator's addresses); any other
    descriptor is encoded as Triton would. Keeps addresses, never tensors. Without
    metadata (descriptors Triton passes unencoded) every launch expands afresh."""

    __slots__ = ("make", "meta", "maps")

    def __init__(self, make, meta):
        self.make, self.meta, self.maps = make, meta, {}

    def __call__(self, d) -> list:
        if self.meta is None:
            return self.make(d, None)
        key = (d.base.data_ptr(), *d.shape, *d.strides, d.padding)
        got = self.maps.get(key)
        if got is None:
            got = self.make(d, self.meta)
            if len(self.maps) >= TENSOR_MAPS:
                self.maps.clear()
            self.maps[key] = got
        return got


def raw_launcher(run, n_args: int):
    """``(C launcher, TensorMaps or None per argument, cooperative, pdl)`` of Triton's
    launcher object ``run`` for a kernel of ``n_args`` arguments, or None where its form
    is not the one this reads (triton 3.6's ``CudaLauncher``: no scratch memory to
    allocate per launch, its ``launch`` the C function itself or the closure
    ``wrap_handle_tensordesc`` makes around it), so that the launch takes Triton's path."""
    try:
        from triton.backends.nvidia.driver import make_tensordesc_arg
        if run.global_scratch_size or run.profile_scratch_size:
            return None
        launch, coop, pdl = run.launch, run.launch_cooperative_grid, run.launch_pdl
    except (ImportError, AttributeError):
        return None
    maps = [None] * n_args
    code = getattr(launch, "__code__", None)
    if code is not None:
        cells = dict(zip(code.co_freevars, (c.cell_contents for c in launch.__closure__ or ())))
        try:
            launch, at, meta = (cells["launcher"], sorted(cells["tensordesc_indices"]),
                                list(cells["tensordesc_meta"]))
        except KeyError:
            return None
        if len(meta) != len(at) or (at and at[-1] >= n_args) \
                or getattr(launch, "__code__", None) is not None:
            return None
        for i, m in zip(at, meta):
            maps[i] = TensorMaps(make_tensordesc_arg, m)
    return launch, tuple(maps), coop, pdl


def _tail(values: tuple, maps: tuple, n: int) -> tuple:
    """The kept arguments after a head of ``n``, in runs for :meth:`BoundLaunch.__call__`:
    ``(tuple of plain values, None)`` or ``(descriptor, TensorMaps)``."""
    out, run = [], []
    for a, m in zip(values[n:], maps[n:]):
        if m is None:
            run.append(a)
            continue
        if run:
            out.append((tuple(run), None))
            run = []
        out.append((a, m))
    if run:
        out.append((tuple(run), None))
    return tuple(out)


def kept_values(values: tuple, n_head: int) -> tuple:
    """A first launch's bound arguments as a :class:`BoundLaunch` keeps them: the
    ``n_head`` leading ones (each launch's own) as None."""
    return (None,) * n_head + values[n_head:]


#: ``(triton.knobs.runtime, triton.runtime.driver)``, imported at the first bound launch
#: (an import statement costs ~1 us per launch).
_TRITON_RUNTIME = None


def _triton_runtime():
    global _TRITON_RUNTIME
    from triton import knobs
    from triton.runtime import driver
    _TRITON_RUNTIME = (knobs.runtime, driver)
    return _TRITON_RUNTIME


#: Bound launches a stage with a score keeps, one per specialisation of its tables.
SCORED_LAUNCHES = 8


def _launch_key(score_args, *tensors):
    """The specialisation of a scored launch's per-call arguments, as Triton's JIT computes
    it (a tensor's dtype and 16-byte alignment; an int's width, divisibility by 16 and
    equality to 1), with the alignment of ``tensors`` (q, k, v; the backward adds o, lse and
    dO): a bound launch runs only arguments of its key (a table's gradient flag of 1 is a
    constant of the compiled kernel). None when
    Triton does not expose it (then the JIT's dispatch runs every launch)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        return None
    return (tuple(native_specialize_impl(BaseBackend, a, False, True, True)
                  for a in score_args),
            tuple(t.data_ptr() % 16 == 0 for t in tensors))


def _bwd_launch_key(score_args, q, k, v, o, lse, do):
    """The key of a scored backward's bound launches: :func:`_launch_key` of the tables'
    arguments with the alignment of every per-call tensor the two kernels read, q, k, v and
    also o, lse and dO (the JIT specialises on each pointer's 16-byte alignment: a launch
    bound for an aligned dO must not serve a dO at an odd offset, as a slice of a larger
    gradient is), and o's dtype (16-bit, or the fp32 output a table gradient's delta reads:
    ``runtime.scores``)."""
    key = _launch_key(score_args, q, k, v, o, lse, do)
    return None if key is None else key + (o.dtype,)


def _bindable(stage, *tensors, same: bool = False) -> bool:
    """Whether this launch's compiled kernel may serve every later call of the stage: the
    JIT specialised it on the tensors' 16-byte alignment, so a stage whose calls may be
    unaligned (``stage.aligned`` False: a plan built with unaligned q, k, v) binds only a
    launch whose tensors are all unaligned (its kernel assumes nothing of them).
    ``same``: tensors the stage's key holds as "all aligned or not" (a backward stage's o
    and do): all aligned binds too."""
    aligned = [t.data_ptr() % 16 == 0 for t in tensors]
    if same:
        return all(aligned) or not any(aligned)
    return stage.aligned or not any(aligned)


def _scored_launch(launches: dict, key):
    return None if key is None else launches.get(key)


def _keep(launches: dict, key, bound) -> None:
    if key is not None and bound is not None:
        if len(launches) >= SCORED_LAUNCHES:
            launches.pop(next(iter(launches)))
        launches[key] = bound


# ---------------------------------------------------------------- row tables

@dataclass(frozen=True)
class RowTables:
    """Where a permuted plan's slots live in the caller's tensors (``KernelConfig.rows``
    "table"): ``q`` int32 ``[Lq]`` (or ``[B, Lq]``, one per batch element) the row of q,
    o, lse, dO and dQ of each query slot, ``k`` the same for the key slots (rows of k, v,
    dK, dV); ``-1`` marks a padding slot (it reads row 0 and is stored nowhere).
    ``n_q``, ``n_k``: the caller's query and key rows (``[B, H, n_q, D]`` tensors)."""

    q: torch.Tensor
    k: torch.Tensor
    n_q: int
    n_k: int

    @classmethod
    def of(cls, q_rows: torch.Tensor, k_rows: torch.Tensor, n_q: int, n_k: int) -> "RowTables":
        """Tables from int tensors ``[L]`` or ``[B, L]`` (int32 copies, contiguous)."""
        as32 = (lambda t: t.to(torch.int32).contiguous())
        return cls(as32(q_rows), as32(k_rows), int(n_q), int(n_k))

    def args(self, with_n_q: bool = True) -> tuple:
        """The kernels' arguments ``Q_ROWS, K_ROWS, stride_qr_b, stride_kr_b(, Nq)``."""
        sq = self.q.stride(0) if self.q.dim() == 2 else 0
        sk = self.k.stride(0) if self.k.dim() == 2 else 0
        return (self.q, self.k, sq, sk) + ((self.n_q,) if with_n_q else ())


@dataclass(frozen=True)
class BoxRows:
    """Where a token layout's slots live in the caller's tensors when its forward reads
    them through multi-dimensional TMA (``KernelConfig.rows`` "box"): the grid ``shape``
    and the layout's ``box``, both as three axes (leading axes of 1 for a 1-D or 2-D
    grid), and ``fold``: the descriptors view q, k, v, o ``[B, H, N, D]`` as ``[B * H, A0,
    A1, A2, D]`` (a 3-D grid; B and H must fold into one stride), else as ``[B, H, A1, A2,
    D]``. A tile of slots is a sub-box of one box (:func:`spattn.ir.layout.sub_box`)."""

    shape: tuple
    box: tuple
    fold: bool

    @property
    def n(self) -> int:
        """The caller's tokens (the grid's cells)."""
        return self.shape[0] * self.shape[1] * self.shape[2]

    @property
    def tiles(self) -> tuple:
        """Boxes per axis."""
        return tuple(-(-a // b) for a, b in zip(self.shape, self.box))

    @classmethod
    def of(cls, layout, *tensors) -> "BoxRows | None":
        """The box description of ``layout`` (:class:`spattn.ir.layout.Layout`) for these
        ``[B, heads, N, D]`` tensors, or None where the forward cannot read its boxes
        through TMA: residue classes, extra tokens, more than 3 axes, a 3-D grid over
        tensors whose batch and head strides do not fold, a view TMA cannot describe."""
        from ..ir.layout import boxes_readable
        g = layout.grid
        if not boxes_readable(layout):
            return None
        pad = (1,) * (3 - len(g.shape))
        rows = cls(pad + tuple(g.shape), pad + tuple(layout.box), len(g.shape) == 3)
        if rows.fold and not all(t.shape[0] == 1 or t.stride(0) == t.shape[1] * t.stride(1)
                                 for t in tensors):
            return None
        return rows if all(rows._tma_ok(t) for t in tensors) else None

    def view(self, t, block: tuple) -> tuple:
        """``(shape, strides, block shape)`` of the 5-D view of ``t`` [B, H, N, D] whose
        blocks are ``block`` (a sub-box, three axes) x ``t``'s D rounded up (BLOCK_D)."""
        B, H, _, D = t.shape
        sb, sh, sl, sd = t.stride()
        A0, A1, A2 = self.shape
        if self.fold:
            shape = [B * H, A0, A1, A2, D]
            strides = [sh, A1 * A2 * sl, A2 * sl, sl, sd]
            blk = [1, *block]
        else:
            shape = [B, H, A1, A2, D]
            strides = [sb, sh, A2 * sl, sl, sd]
            blk = [1, 1, block[1], block[2]]
        return shape, strides, blk

    def _tma_ok(self, t) -> bool:
        return t.dim() == 4 and t.shape[2] == self.n and \
            _tma_strides_ok(t, self.view(t, (1, 1, 1))[1])

    def sub(self, block: int) -> tuple:
        """The sub-box of a tile of ``block`` slots (the outer axes cut)."""
        from ..ir.layout import sub_box
        return sub_box(self.box, block)

    def meta(self, block_m: int, block_n: int) -> dict:
        """The kernel's box constexprs for these tiles."""
        T = self.box[0] * self.box[1] * self.box[2]
        if T % block_m or T % block_n:
            raise SpattnConfigError(f"tiles {block_m}x{block_n} do not divide the layout's "
                                    f"boxes of {T} cells ({self.box}): the box forward needs "
                                    "tiles that do")
        qb, kb = self.sub(block_m), self.sub(block_n)
        return dict(NT1=self.tiles[1], NT2=self.tiles[2], BOX0=self.box[0],
                    BOX1=self.box[1], BOX2=self.box[2], KB0=kb[0], KB1=kb[1], KB2=kb[2],
                    QB0=qb[0], QB1=qb[1], QB2=qb[2], FOLD=self.fold)


# ---------------------------------------------------------------- forward

@dataclass
class FwdStage:
    """One forward launch, resolved: ``kernel[grid](q, k, v, o, lse, *static, **meta)``."""

    config: object
    kernel: object
    grid: tuple
    static: tuple
    meta: dict
    out_shape: tuple
    dtype: torch.dtype
    upcast: bool
    persistent: bool = False
    n_work: int = 0
    occupancy: int | None = None
    tables: str = "-"
    launch: object = None      # the compiled kernel with its arguments bound (CUDA)
    pattern: object = None     # the pattern, where it has a score (its tables lead the args)
    score_tables: dict = None  # the tables the stage was built with (warm-up, tuning)
    launches: dict = None      # with a score: bound launches by _launch_key
    aligned: bool = True       # q, k, v of every call are 16-byte aligned (the plan's check)
    box: BoxRows = None        # a token layout's boxes, read through 5-D descriptors
    gluon = False              # (runtime.ws_fwd.WsFwdStage: the warp-specialised forward)

    def __repr__(self) -> str:
        c = self.config
        what = f"{c.strategy}" + (f" ({self.tables})" if c.strategy == "table" else "")
        return (f"fwd {self.kernel.__name__}: {what}, tiles {c.block_m}x{c.block_n}, "
                f"{c.num_warps} warps, {c.num_stages} stages, loop {c.loop}"
                f"{', TMA' if c.tma else ''}{', int64' if c.int64 else ''}"
                f"{', rows through tables' if c.rows == 'table' else ''}"
                f"{', boxes through 5-D TMA' if c.rows == 'box' else ''}"
                f"{_score_flags(self.pattern, c)}, grid {self.grid}")


def build_fwd(call, q, k, v, options: dict | None = None,
              rows: "RowTables | BoxRows | None" = None) -> FwdStage:
    """The forward stage of ``call`` (a :class:`spattn.runtime.plan.Call`) for tensors
    laid out like ``q``, ``k``, ``v`` (autotuned on CUDA with them: the runs write only
    fresh outputs). ``rows``: the kernels run the call's ``Lq`` x ``Lk`` slots on the
    caller's q ``[B, Hq, rows.n_q, D]``, k, v ``[B, Hk, rows.n_k, D]`` through the row
    tables (:class:`RowTables`), or a token layout's slots on the caller's q, k, v ``[B,
    heads, N, D]`` through 5-D TMA descriptors over its boxes (:class:`BoxRows`); o and lse
    are in the caller's order. On Hopper the stage is the warp-specialised Gluon forward
    (:class:`spattn.runtime.ws_fwd.WsFwdStage`) wherever that runs the call
    (:func:`spattn.runtime.ws_fwd.build`)."""
    training = call.learnable or any(t.requires_grad for t in (q, k, v))
    if _upcast(call):
        q, k, v = q.float(), k.float(), v.float()
    if training:
        call.analysis.expect(_step_tiles(call, q, options))
    if _gluon_may_run(call, q):
        from . import ws_fwd
        stage, why = ws_fwd.build(call, q, k, v, options, rows)
        if stage is not None:
            return stage
        _tune.log.debug("spattn: the warp-specialised forward does not run this call: %s", why)

    def run(t):
        return run_fwd(_build_fwd(call, q, k, v, t, rows=rows), q, k, v)

    def compile_only(t):
        _build_fwd(call, q, k, v, t, warmup=True, rows=rows)
    opts = resolve_options(call, "fwd", dict(options or {}), (q, k, v), run, compile_only,
                           rows=rows)
    return _fitted(call, "fwd", q, opts, explicit=dict(options or {}),
                   build=lambda o, warmup: _build_fwd(call, q, k, v, o, warmup=warmup,
                                                      rows=rows))


def _step_tiles(call, q, options) -> tuple:
    """The dQ and dK/dV tiles ``((m2, n2), (m1, n1))`` the backward of a training step is
    built with unless its autotuner chooses others: the forward classifies its tiles at
    their common divisor with these (:meth:`~spattn.runtime.tables.Analysis.expect`), one
    classification for the step. ``()`` where the options do not make a backward
    configuration (the backward reports that itself)."""
    from ..codegen.config import pick
    tiles = {n: v for n, v in (options or {}).items() if n in _TILE_OPTIONS}
    try:
        c = pick(call.pattern, "bwd", head_dim=q.shape[-1], dtype=q.dtype, strategy="table",
                 interpret=call.settings.interpret, overrides=call.settings.overrides("bwd"),
                 **tiles)
    except (SpattnConfigError, ValueError, TypeError):
        return ()
    return (c.block_m2, c.block_n2), (c.block_m, c.block_n)


#: Tile options halved, in this order, when a configuration does not fit shared memory at
#: one pipeline stage (per kind: the key tiles first, they are the ones staged).
_SHRINK = {"fwd": ("block_n", "block_m"), "bwd": ("block_n2", "block_m1", "block_n1", "block_m2")}


def _fitted(call, kind: str, q, opts: dict, *, explicit: dict, build):
    """The stage ``build(opts, warmup)`` makes, compiled on CUDA before its first launch so
    that a configuration which does not fit the device's shared memory (a default's three
    pipeline stages with a score's gradient tiles, say) or that the assembler fails on
    (:func:`unfit`) is replaced, not raised at the call: fewer stages first, then halved
    tiles (:data:`_SHRINK`), each logged. A
    configuration the caller fixed (options or ``SPATTN_*`` tiles, warps or stages) is
    not changed: it is a :class:`SpattnConfigError` naming what to lower."""
    if call.device.type != "cuda" or call.settings.interpret:
        return build(opts, False)
    fixed = {k: v for k, v in explicit.items() if k in _TILE_OPTIONS} or (
        call.settings.overrides(kind) if call.settings.tiles_set(kind) else {})
    opts = dict(opts)
    while True:
        try:
            with assembler_quiet():
                return build(opts, True)
        except Exception as e:      # noqa: BLE001 -- a refusal (unfit) is stepped down from
            why = unfit(e)
            if why is None:
                raise
            cfg = _load(call, kind, q.shape[-1], q.dtype, opts)[1]
            if fixed:
                raise SpattnConfigError(
                    f"the {kind} kernel's configuration does not fit this device "
                    f"({_describe(kind, cfg)}): {why}; lower "
                    f"num_stages or the tiles ({', '.join(sorted(fixed))} set)") from None
            smaller = _smaller(kind, cfg)
            if smaller is None:
                raise SpattnConfigError(f"no configuration of the {kind} kernel fits this "
                                        f"device: {why}") from None
            _tune.log.info("spattn: %s kernel %s: %s; using %s",
                           kind, _describe(kind, cfg), why, smaller)
            opts.update(smaller)


def unfit(error: Exception) -> str | None:
    """Why Triton refused to build a configuration that a smaller one may pass, or None
    for any other error: ``OutOfResources`` (shared memory or registers, checked when the
    compiled kernel is loaded) and ``PTXASError``, the assembler failing on the kernel
    (ptxas 12.8, bundled with Triton 3.6, dies with SIGSEGV on some forward kernels at
    three pipeline stages and assembles them at two: docs/codegen.md). Both are properties
    of one configuration, not of the pattern."""
    from triton.runtime import errors
    if isinstance(error, errors.OutOfResources):
        return str(error).splitlines()[0]
    if isinstance(error, getattr(errors, "PTXASError", ())):     # (Triton >= 3.2)
        return ("Triton's assembler (ptxas) failed on it: "
                + " ".join(str(error).split())[:160])
    return None


#: What Triton prints on stdout before it raises ``PTXASError``: the whole PTX between two
#: rules of ``=`` (thousands of lines), then a request to report it.
_REPRODUCER = re.compile(r"\n\n={20,}\n.*?\n={20,}\nplease share the reproducer above with "
                         r"Triton project\.\n\n?", re.S)


@contextlib.contextmanager
def assembler_quiet():
    """Compile under this: Triton prints a kernel's whole PTX on stdout when its assembler
    fails (:func:`unfit`), before it raises, and spattn then compiles a smaller
    configuration, so that print would be thousands of lines about a failure the user
    never sees. It goes to the debug log instead; anything else printed meanwhile (by
    Triton or another thread) is written to stdout when the block ends."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        kept, dropped = _REPRODUCER.subn("", buf.getvalue())
        if dropped:
            _tune.log.debug("spattn: Triton's assembler output:%s", buf.getvalue())
        if kept:
            sys.stdout.write(kept)


def _loaded(compiled) -> None:
    """Load a kernel compiled by ``warmup`` onto the device now: Triton checks its shared
    memory against the device's when it loads it (``OutOfResources``), lazily, at the first
    launch otherwise. Not under the interpreter (nothing is compiled)."""
    init = getattr(compiled, "_init_handles", None)
    if init is not None and not isinstance(compiled, (list, tuple)):
        init()


_TILE_OPTIONS = ("block_m", "block_n", "block_m1", "block_n1", "block_m2", "block_n2",
                 "num_warps", "num_stages")


def _describe(kind: str, cfg) -> str:
    tiles = (f"{cfg.block_m}x{cfg.block_n}" if kind == "fwd" else
             f"{cfg.block_m}x{cfg.block_n} / {cfg.block_m2}x{cfg.block_n2}")
    return f"tiles {tiles}, {cfg.num_warps} warps, {cfg.num_stages} stages"


def _smaller(kind: str, cfg) -> dict | None:
    """The next configuration to try: one stage fewer, or at one stage the next tile of
    :data:`_SHRINK` halved (two stages again); None when every tile is at 16."""
    names = {"block_m": cfg.block_m, "block_n": cfg.block_n}
    if kind == "bwd":
        names = {"block_m1": cfg.block_m, "block_n1": cfg.block_n,
                 "block_m2": cfg.block_m2, "block_n2": cfg.block_n2}
    return shrink_step(cfg.num_stages, {n: names[n] for n in _SHRINK[kind]})


def shrink_step(num_stages: int, tiles: dict) -> dict | None:
    """One step down from a configuration that does not fit shared memory, as updates of
    it: one stage fewer, or at one stage the first of ``tiles`` (name -> size, in the
    order to shrink them) above 16 halved, with two stages again; None when every tile is
    at 16. The forward's and backward's fitting (:func:`_fitted`) and the decode plan's
    (``DecodePlan._shrink``) step this way."""
    if num_stages > 1:
        return {"num_stages": num_stages - 1}
    for name, size in tiles.items():
        if size > 16:
            return {name: size // 2, "num_stages": 2}
    return None


def _form_kw(form: str) -> dict:
    """The launch constexprs of a table's form (``runtime.tables.TABLE_FORMS``)."""
    return {"SPANS": form == "spans", "RUNS": form == "runs"}


def _build_fwd(call, q, k, v, opts, warmup=False, rows=None) -> FwdStage:
    B, H, _, D = q.shape
    HK = k.shape[1]
    Lq, Lk = call.Lq, call.Lk                   # slots (the tensors' rows without tables)
    box = rows if isinstance(rows, BoxRows) else None
    rows = None if box is not None else rows
    Nq = box.n if box is not None else Lq if rows is None else rows.n_q
    mod, cfg, cf = _checked_free(call, "fwd", D, q.dtype, opts,
                                 _load(call, "fwd", D, q.dtype, opts))
    bm, bn = cfg.block_m, cfg.block_n
    box_meta = {} if box is None else box.meta(bm, bn)
    nq = -(-Lq // bm)
    q_offset = call.positions.q_offset
    in_args = _input_args(call.pattern, call.inputs, cfg.int64)
    mode = opts.get("tables", "auto")
    if cfg.strategy == "table":
        tab, order, mode = fwd_tables(call.pattern, Lq, Lk, bm, bn, B=B, H=H, q_offset=q_offset,
                                      device=q.device, inputs=call.inputs, tables=mode,
                                      analysis=call.analysis)
        table_kw = _form_kw(mode)
    else:
        tab, table_kw, mode = [], {}, "-"
        order = ranges_order(cf.rows, n_tiles=nq, block=bm, other_len=Lk, other_block=bn,
                             length=Lq, shift=q_offset, query=True, device=q.device, H=H, B=B)
    persistent = cfg.loop == "persistent"
    n_work = B * H * nq
    o_stride = (H * Nq * D, Nq * D, D, 1)
    scored = getattr(call.pattern, "score", None) is not None
    # with a score the kernel scales q·k by sm_scale itself, then the softmax works on the
    # modified score in log2 units
    scales = (LOG2E, call.scale) if scored else (_scale_log2(call.scale),)
    row_args = box.shape if box is not None else () if rows is None else rows.args()
    static = (*q.stride(), *k.stride(), *v.stride(), *o_stride, *row_args, *in_args, *tab, order,
              *scales, H, H // HK, Lq, Lk, q_offset,
              *((B * H, n_work) if persistent else ()))
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg.block_d, HEAD_DIM=D,
                DOT_PREC=_dot_prec(q.dtype), num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, **table_kw, **box_meta,
                **({"EXACT_PV": False} if scored else {}))
    stage = FwdStage(cfg, mod.KERNEL, (n_work,), static, meta, (B, H, Nq, D), q.dtype,
                     _upcast(call), persistent, n_work, tables=mode, box=box)
    if scored:
        stage.pattern, stage.score_tables, stage.launches = call.pattern, call.tables, {}
    if persistent:
        stage.grid = (_persistent_programs(call, n_work, None),)
    if warmup:
        qa, ka, va, oa, lse, _ = _fwd_tensors(stage, q, k, v)
        head = _score_args(stage.pattern, stage.score_tables) if scored else []
        _loaded(stage.kernel.warmup(qa, ka, va, oa, lse, *head, *static, grid=stage.grid,
                                    **meta))
    return stage


def _fwd_tensors(stage: FwdStage, q, k, v, out_dtype=None):
    o = torch.empty(stage.out_shape, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty(stage.out_shape[:3], dtype=torch.float32, device=q.device)
    cfg = stage.config
    box = stage.box
    if box is not None:
        m, bd = stage.meta, cfg.block_d
        qb, kb = (m["QB0"], m["QB1"], m["QB2"]), (m["KB0"], m["KB1"], m["KB2"])

        def at(t, sub):
            shape, strides, block = box.view(t, sub)
            return _desc(t, 0, bd, (shape, strides, block + [bd]))
        return at(q, qb), at(k, kb), at(v, kb), at(o, qb), lse, o
    if cfg.tma:
        bm, bn, bd = cfg.block_m, cfg.block_n, cfg.block_d
        return _desc(q, bm, bd), _desc(k, bn, bd), _desc(v, bn, bd), _desc(o, bm, bd), lse, o
    return q, k, v, o, lse, o


def run_fwd(stage: FwdStage, q, k, v, tables: dict | None = None, out_dtype=None):
    """``(o [B, Hq, Lq, D], lse fp32 [B, Hq, Lq])`` of the stage for these tensors (laid out
    as those it was built for); ``tables``: a score's float tables (default: those the
    stage was built with). ``out_dtype``: o's dtype (default q's); ``torch.float32`` gives
    the output of 16-bit inputs before its rounding to 16 bits (the kernel casts the fp32
    accumulator to o's element type: the same kernel, specialised on o's pointer type)."""
    if stage.gluon:
        return stage.run(q, k, v, tables, out_dtype)
    dtype = q.dtype
    out_dtype = out_dtype or dtype
    if stage.upcast:
        q, k, v = q.float(), k.float(), v.float()
    qa, ka, va, oa, lse, o = _fwd_tensors(stage, q, k, v,
                                          torch.float32 if stage.upcast else out_dtype)
    head = (qa, ka, va, oa, lse)
    launch, key = (stage.launch if out_dtype == dtype else None), None
    if stage.pattern is not None:
        # a score's tables change per call, with their alignment and sizes, which the JIT
        # specialises on: one bound launch per specialisation (and per dtype of o)
        sc = tuple(_score_args(stage.pattern, tables or stage.score_tables))
        head += sc
        key = _launch_key(sc, q, k, v) if q.device.type == "cuda" else None
        key = None if key is None else key + (o.dtype,)
        launch = _scored_launch(stage.launches, key)
    meta = stage.meta
    if "EXACT_PV" in meta and out_dtype == torch.float32 and dtype != torch.float32:
        meta = dict(meta, EXACT_PV=True)    # (P's rounding added back: scores.exact_delta)
    if launch is None or not launch(*head):
        args = (*head, *stage.static)
        with launch_guard(q.device.type):
            compiled = stage.kernel[stage.grid](*args, **meta)
        if stage.persistent and stage.occupancy is None and q.device.type == "cuda":
            stage.occupancy = _occupancy(stage.config, compiled)
            stage.grid = (_persistent_programs(None, stage.n_work, stage.occupancy, q.device),)
        elif stage.pattern is None and out_dtype == dtype and _bindable(stage, q, k, v):
            stage.launch = BoundLaunch.of(stage.kernel, compiled, stage.grid, args, meta,
                                          q.device, len(head))
        elif key is not None:
            _keep(stage.launches, key, BoundLaunch.of(stage.kernel, compiled, stage.grid, args,
                                                      meta, q.device, len(head)))
    return (o.to(out_dtype) if stage.upcast else o), lse


def _persistent_programs(call, n_work: int, per_sm, device=None) -> int:
    """Programs to launch for ``n_work`` work items: one per resident slot of the device
    (SMs x programs per SM, learnt from the compiled kernel's registers and shared memory
    after its first launch; 1 per SM until then), never more than the work."""
    device = device if device is not None else call.device
    if device.type != "cuda" or (call is not None and call.settings.interpret):
        return max(1, min(n_work, INTERPRET_PROGRAMS))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_work, sms * (per_sm or 1)))


def _occupancy(cfg, compiled) -> int:
    """How many programs of ``compiled`` fit on one SM (registers, shared memory,
    threads), as the CUDA occupancy calculator counts them."""
    try:
        import triton
        props = triton.runtime.driver.active.utils.get_device_properties(
            torch.cuda.current_device())
        threads = 32 * cfg.num_warps
        regs = max(1, int(compiled.n_regs)) * threads
        smem = max(1, int(compiled.metadata.shared))
        return max(1, min(props["max_num_regs"] // regs, props["max_shared_mem"] // smem,
                          2048 // threads))
    except Exception:   # no compiled-kernel metadata (other Triton versions): one per SM
        return 1


# --------------------------------------------------------------- backward

@dataclass
class BwdStage:
    """One backward pass, resolved: the dQ kernel (which also writes each row's delta and
    log2-unit lse), then the dK/dV kernel. With ``config.dq`` "atomic", ``dq_kernel`` is
    the row-statistics kernel (delta and lse only) and the dK/dV kernel adds dQ into an
    fp32 accumulator, scaled by ``scale`` and cast after it."""

    config: object
    dq_kernel: object
    dkdv_kernel: object
    grid_q: tuple
    grid_k: tuple
    static_q: tuple
    static_k: tuple
    meta_q: dict
    meta_k: dict
    shapes: tuple          # (B, H, HK, Lq, Lk, D)
    upcast: bool
    tables: tuple = ("-", "-")
    launch_q: object = None    # the compiled kernels with their arguments bound (CUDA)
    launch_k: object = None
    pattern: object = None     # the pattern, where it has a score (its tables lead the args)
    score_tables: dict = None  # the tables the stage was built with (warm-up, tuning)
    launches: dict = None      # with a score: (dQ, dK/dV) bound launches by _launch_key
    aligned: bool = True       # q, k, v of every call are 16-byte aligned (the plan's check)
    out_rows: tuple = None     # (rows of dq, rows of dk and dv): the caller's, with row tables
    scale: float = 1.0         # sm_scale (the atomic dQ accumulator's, applied after it)
    ws: object = None          # runtime.ws_bwd.WsBwd: the dK/dV launch instead of dkdv_kernel
    ws_dq: object = None       # runtime.ws_dq.WsDq: the dQ launch instead of dq_kernel (with ws)

    def __repr__(self) -> str:
        c = self.config
        if self.ws_dq is not None:
            return f"bwd {self.ws_dq!r}; {self.ws!r}"
        if self.ws is not None:
            return (f"bwd {self.dq_kernel.__name__}: dQ tiles {c.block_m2}x{c.block_n2}, "
                    f"{c.num_warps} warps, {c.num_stages} stages; {self.ws!r}")
        what = c.strategy + (f" ({'/'.join(self.tables)})" if c.strategy == "table" else "")
        dq = (f"dQ atomic (row statistics {c.block_m2} rows per program)" if c.dq == "atomic"
              else f"dQ tiles {c.block_m2}x{c.block_n2}")
        return (f"bwd {self.dq_kernel.__name__} + {self.dkdv_kernel.__name__}: {what}, "
                f"{dq}, dK/dV tiles {c.block_m}x{c.block_n}, "
                f"{c.num_warps} warps, {c.num_stages} stages, loop {c.loop}"
                f"{', TMA' if c.tma else ''}{', int64' if c.int64 else ''}"
                f"{', rows through tables' if c.rows == 'table' else ''}"
                f"{_score_flags(self.pattern, c)}")


def _score_flags(pattern, c) -> str:
    """A stage's score flags, for its repr (nothing without a score)."""
    if pattern is None:
        return ""
    return (f", score tables {c.score_load}/{c.score_index}"
            f"{', tanh.approx' if c.fast_tanh else ''}")


def build_bwd(call, q, k, v, o, do, options: dict | None = None,
              rows: RowTables | None = None) -> BwdStage:
    """The backward stage of ``call`` for tensors laid out like these (``o`` and ``do``:
    the forward's output and its gradient; ``rows``: as for :func:`build_fwd`, dq, dk, dv
    in the caller's order)."""
    if _upcast(call):
        q, k, v, o, do = q.float(), k.float(), v.float(), o.float(), do.float()
    gluon = _gluon_may_run(call, q)
    # With the autotuner on, the generated kernels are first built with their defaults:
    # where the Gluon dQ and dK/dV kernels both take the stage, the generated ones run only
    # for a later call whose tensors TMA cannot read, and are not worth tuning.
    tuning = gluon and _tune.enabled(q.device, call.settings)
    stage = _bwd_stage(call, q, k, v, o, do, options, rows, tune=not tuning)
    if gluon:
        _attach_gluon(call, stage, q, k, v, o, do, options, rows)
    if tuning and (stage.ws is None or stage.ws_dq is None):
        # (the Gluon kernels' rules do not read the generated kernels' tiles: kept as built)
        tuned = _bwd_stage(call, q, k, v, o, do, options, rows, tune=True)
        tuned.ws, tuned.ws_dq = stage.ws, stage.ws_dq
        stage = tuned
    return stage


def _gluon_may_run(call, q) -> bool:
    """Whether a Gluon kernel may replace a generated one for this call (CUDA, not
    interpreted; each kernel's ``build`` decides the rest)."""
    return q.device.type == "cuda" and not call.settings.interpret


def _bwd_stage(call, q, k, v, o, do, options, rows, tune: bool) -> BwdStage:
    """:func:`build_bwd`'s generated kernels, with the autotuner's options (``tune``) or
    the defaults."""
    def run(t):
        lse = torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device)
        return run_bwd(_build_bwd(call, q, k, v, o, do, t, rows=rows), q, k, v, o, lse, do)

    def compile_only(t):
        _build_bwd(call, q, k, v, o, do, t, warmup=True, rows=rows)
    opts = resolve_options(call, "bwd", dict(options or {}), (q, k, v, do, o), run,
                           compile_only, rows=rows, tune=tune)
    return _fitted(call, "bwd", q, opts, explicit=dict(options or {}),
                   build=lambda o_, warmup: _build_bwd(call, q, k, v, o, do, o_,
                                                       warmup=warmup, rows=rows))


def _attach_gluon(call, stage, q, k, v, o, do, options, rows) -> None:
    """The Gluon dK/dV and dQ launches that take ``stage`` over, where they run the call
    (``stage.ws``, ``stage.ws_dq``; None with the reason in the debug log)."""
    from . import ws_bwd
    stage.ws, why = ws_bwd.build(call, stage, q, k, v, o, do, options, rows)
    if why is not None:
        _tune.log.debug("spattn: the warp-specialised dK/dV kernel does not run this "
                        "call: %s", why)
    from . import ws_dq
    stage.ws_dq, why = ws_dq.build(call, stage, q, k, v, o, do)
    if why is not None:
        _tune.log.debug("spattn: the warp-specialised dQ kernel does not run this "
                        "call: %s", why)


def _build_bwd(call, q, k, v, o, do, opts, warmup=False, rows=None) -> BwdStage:
    B, H, _, D = q.shape
    HK = k.shape[1]
    Lq, Lk = call.Lq, call.Lk                   # slots (the tensors' rows without tables)
    Nq, Nk = (Lq, Lk) if rows is None else (rows.n_q, rows.n_k)
    G = H // HK
    dev = q.device
    mod, cfg, cf = _checked_free(call, "bwd", D, q.dtype, opts,
                                 _load(call, "bwd", D, q.dtype, opts))
    m1, n1 = cfg.block_m, cfg.block_n          # dK/dV: BLOCK_M1 queries per step, BLOCK_N1 keys
    m2, n2 = cfg.block_m2, cfg.block_n2        # dQ: BLOCK_M2 queries, BLOCK_N2 keys per step
    nq2, nk1 = -(-Lq // m2), -(-Lk // n1)
    atomic = cfg.dq == "atomic"
    q_offset = call.positions.q_offset
    kw = dict(BLOCK_D=cfg.block_d, HEAD_DIM=D, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
              DOT_PREC=_dot_prec(q.dtype))
    in_args = _input_args(call.pattern, call.inputs, cfg.int64)
    mode = opts.get("tables", "auto")
    forms = ("-", "-")
    if cfg.strategy == "table":
        tq, (tab_k, order_k, form_k) = bwd_tables(
            call.pattern, Lq, Lk, (m1, n1, m2, n2), B=B, H=H, q_offset=q_offset, device=dev,
            inputs=call.inputs, tables=mode, HK=HK, analysis=call.analysis, dq=not atomic)
        tab_q, order_q, form_q = tq or ([], None, None)
        kw_k, kw_q = _form_kw(form_k), ({} if form_q is None else _form_kw(form_q))
        forms = ("-" if form_q is None else form_q, form_k)
    else:
        tab_q = tab_k = []
        kw_k = kw_q = {}
        order_q = None if atomic else ranges_order(
            cf.rows, n_tiles=nq2, block=m2, other_len=Lk, other_block=n2, length=Lq,
            shift=q_offset, query=True, device=dev, H=H, B=B)
        order_k = ranges_order(cf.cols, n_tiles=nk1, block=n1, other_len=Lq, other_block=m1,
                               length=Lk, shift=q_offset, query=False, device=dev, H=HK, B=B)
    dq_stride = (H * Nq * D, Nq * D, D, 1)
    dk_stride = (HK * Nk * D, Nk * D, D, 1)
    rows_q = () if rows is None else rows.args()
    rows_k = () if rows is None else rows.args(with_n_q=False)
    scored = getattr(call.pattern, "score", None) is not None
    log2 = LOG2E if scored else _scale_log2(call.scale)
    static_q = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *o.stride(), *dq_stride,
                *rows_q, *in_args, *tab_q, order_q, call.scale, log2, H, G, Lq, Lk, q_offset)
    static_k = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk_stride, *dk_stride,
                *(dq_stride[:3] if atomic else ()),
                *rows_k, *in_args, *tab_k, order_k, call.scale, log2, H, HK, G, Lq, Lk, q_offset)
    meta_q = dict(BLOCK_M2=m2, BLOCK_N2=n2, **kw, **kw_q)
    grid_q = (nq2 * B * H,)
    if atomic:      # the row-statistics kernel: O, dO and LSE in, DELTA and LSE2 out
        static_q = (*o.stride(), *do.stride(), *rows_q, H, Lq)
        meta_q = dict(BLOCK_M2=m2, BLOCK_D=cfg.block_d, HEAD_DIM=D, num_warps=4,
                      num_stages=1)
    stage = BwdStage(cfg, mod.ROWSTATS if atomic else mod.DQ, mod.DKDV, grid_q,
                     (nk1 * B * HK,), static_q, static_k, meta_q,
                     dict(BLOCK_M1=m1, BLOCK_N1=n1, **kw, **kw_k), (B, H, HK, Lq, Lk, D),
                     _upcast(call), forms)
    stage.out_rows = (Nq, Nk)
    stage.scale = call.scale
    if scored:
        stage.pattern, stage.score_tables, stage.launches = call.pattern, call.tables, {}
        if "DETERMINISTIC" in stage.dq_kernel.arg_names:  # the partial-buffer variant: per call
            stage.meta_q["DETERMINISTIC"] = False
    if warmup:
        lse = torch.zeros((B, H, Nq), dtype=torch.float32, device=dev)
        args_q, args_k, _ = _bwd_tensors(stage, q, k, v, o, lse, do)
        # with every table's gradient written: the variant with the most live tiles
        grads = None if not scored else {
            n: torch.zeros(t.shape, dtype=torch.float32, device=dev)
            for n, t in stage.score_tables.items() if n in call.pattern.score_inputs}
        args_q, args_k = _score_heads(stage, args_q, args_k, None, grads)
        _loaded(stage.dq_kernel.warmup(*args_q, *static_q, grid=stage.grid_q, **stage.meta_q))
        _loaded(stage.dkdv_kernel.warmup(*args_k, *static_k, grid=stage.grid_k, **stage.meta_k))
    return stage


def _score_heads(stage, args_q, args_k, tables, grads, partials=None):
    """The leading arguments of the dQ and dK/dV launches, with a score's tables (and, in
    dQ, the table gradients) after the tensors."""
    if stage.pattern is None:
        return args_q, args_k
    tables = tables or stage.score_tables
    sc = tuple(_score_args(stage.pattern, tables))
    return (*args_q, *sc, *_grad_args(stage.pattern, tables, grads, partials)), (*args_k, *sc)


def _bwd_outputs(stage: BwdStage, q, k, v) -> tuple:
    """``(delta, lse2, dk, dv)``: the rows' statistics the dQ kernel writes for the dK/dV
    kernel (delta = rowsum(dO * O), the lse in log2 units; fp32 ``[B, H, Lq]``, per slot)
    and the key side's gradients ``[B, HK, Nk, D]``."""
    B, H, HK, Lq, Lk, D = stage.shapes
    Nk = stage.out_rows[1] if stage.out_rows else Lk
    delta, lse2 = torch.empty((2, B, H, Lq), dtype=torch.float32, device=q.device).unbind(0)
    dk = torch.empty((B, HK, Nk, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, HK, Nk, D), dtype=v.dtype, device=q.device)
    return delta, lse2, dk, dv


def _bwd_tensors(stage: BwdStage, q, k, v, o, lse, do, dlse=None):
    B, H, HK, Lq, Lk, D = stage.shapes
    Nq = stage.out_rows[0] if stage.out_rows else Lq
    dev = q.device
    delta, lse2, dk, dv = _bwd_outputs(stage, q, k, v)
    cfg = stage.config
    # the lse output's gradient, read beside the lse (an lse_grad stage only), contiguous
    # and 16-byte aligned as the lse is (bound launches are specialised on alignment)
    lse_in = (lse,)
    if cfg.lse_grad:
        d = torch.zeros_like(lse) if dlse is None else dlse.to(torch.float32).contiguous()
        lse_in = (lse, d if d.data_ptr() % 16 == 0 else d.clone())
    if cfg.dq == "atomic":
        # the fp32 dQ accumulator (dS K summed unscaled: :func:`_dq_of` finishes it); the
        # row-statistics kernel reads O and dO through pointers
        acc = torch.zeros((B, H, Nq, D), dtype=torch.float32, device=dev)
        args_q = (o, do, *lse_in, lse2, delta)
        if cfg.tma:
            m1, n1, bd = cfg.block_m, cfg.block_n, cfg.block_d
            args_k = (_desc(q, m1, bd), _desc(k, n1, bd), _desc(v, n1, bd), _desc(do, m1, bd),
                      lse2, delta, _desc(dk, n1, bd), _desc(dv, n1, bd), acc)
        else:
            args_k = (q, k, v, do, lse2, delta, dk, dv, acc)
        return args_q, args_k, (acc, dk, dv)
    dq = torch.empty((B, H, Nq, D), dtype=q.dtype, device=dev)
    if cfg.tma:   # per kernel: the descriptors' blocks are that kernel's tiles
        m1, n1, m2, n2, bd = cfg.block_m, cfg.block_n, cfg.block_m2, cfg.block_n2, cfg.block_d
        args_k = (_desc(q, m1, bd), _desc(k, n1, bd), _desc(v, n1, bd), _desc(do, m1, bd),
                  lse2, delta, _desc(dk, n1, bd), _desc(dv, n1, bd))
        args_q = (_desc(q, m2, bd), _desc(k, n2, bd), _desc(v, n2, bd), _desc(do, m2, bd),
                  _desc(o, m2, bd), *lse_in, lse2, delta, _desc(dq, m2, bd))
    else:
        args_k = (q, k, v, do, lse2, delta, dk, dv)
        args_q = (q, k, v, do, o, *lse_in, lse2, delta, dq)
    return args_q, args_k, (dq, dk, dv)


def _dq_of(acc, scale: float, dtype):
    """dQ from the atomic accumulator: ``acc * scale`` in ``dtype`` (one pass; in place for
    fp32)."""
    if dtype == torch.float32:
        return acc.mul_(scale)
    return torch.mul(acc, scale, out=torch.empty(acc.shape, dtype=dtype, device=acc.device))


def partial_shape(stage: BwdStage, kind: str, slots: int) -> tuple:
    """The shape of a table's partial buffer for deterministic gradients: ``[dQ programs,
    key tiles of BLOCK_N2, width]`` (program ``(b * H + h) * query tiles + query tile``;
    ``width``: ``slots`` loads of ``kind`` "all", or ``slots`` times the tile's diagonals
    for "diag": ``codegen.kernels.TableGrad``)."""
    from ..codegen.kernels import diagonals
    B, H, _, Lq, Lk, _ = stage.shapes
    c = stage.config
    width = slots * (diagonals(c.block_m2, c.block_n2) if kind == "diag" else 1)
    return (B * H * -(-Lq // c.block_m2), -(-Lk // c.block_n2), width)


def run_bwd(stage: BwdStage, q, k, v, o, lse, do, tables: dict | None = None,
            table_grads: dict | None = None, partials: dict | None = None, dlse=None):
    """``(dq, dk, dv)`` of the stage (dk, dv summed over the query heads of each key head).
    ``dlse``: the gradient of the lse output ``[B, H, Nq]``, for a stage built with the
    option ``lse_grad`` (which reads zeros without one); ignored by other stages.
    ``tables``: a score's float tables; ``table_grads``: fp32 buffers, shaped like the
    tables they name, that the dQ kernel adds those tables' gradients to (atomically);
    ``partials``: for some of those tables, zeroed fp32 buffers of :func:`partial_shape`
    that receive their per-tile gradient sums instead (each slot written by one tile of
    one program: no order to depend on)."""
    dtypes = (q.dtype, k.dtype, v.dtype)
    atomic = stage.config.dq == "atomic"
    if atomic and torch.are_deterministic_algorithms_enabled():
        raise SpattnConfigError(
            "this backward stage adds dQ atomically (dq='atomic'), which is not "
            "deterministic, and torch.are_deterministic_algorithms_enabled() is on: build "
            "the stage with dq='kernel' (plans do so while deterministic algorithms are on)")
    if stage.upcast:
        q, k, v, o, do = q.float(), k.float(), v.float(), o.float(), do.float()
    if stage.ws_dq is not None and o.stride(-1) == 1 and tma_ok(q, k, v, do):
        # the Gluon dQ kernel (which writes the rows' delta and lse2), then the Gluon
        # dK/dV: no generated launch, so none of its arguments or descriptors
        delta, lse2, dk, dv = _bwd_outputs(stage, q, k, v)
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        stage.ws_dq.run(q, k, v, o, lse.contiguous(), do, dq, lse2, delta)
        stage.ws.run(q, k, v, do, lse2, delta, dk, dv)
        return dq, dk, dv
    args_q, args_k, grads = _bwd_tensors(stage, q, k, v, o, lse.contiguous(), do, dlse)
    n_q = len(args_q)
    args_q, args_k = _score_heads(stage, args_q, args_k, tables, table_grads, partials)
    launch_q, launch_k, key = stage.launch_q, stage.launch_k, None
    meta_q = {**stage.meta_q, "DETERMINISTIC": True} if partials else stage.meta_q
    if stage.ws is not None and not tma_ok(q, k, v, do):
        launch_q = None     # (tensors TMA cannot read: both generated kernels, bound anew)
    elif stage.ws is not None:
        # the dQ kernel (which writes the rows' delta and lse2), then the Gluon dK/dV
        if launch_q is None or not launch_q(*args_q):
            aq = (*args_q, *stage.static_q)
            with launch_guard(q.device.type):
                cq = stage.dq_kernel[stage.grid_q](*aq, **meta_q)
            launch_q = BoundLaunch.of(stage.dq_kernel, cq, stage.grid_q, aq, meta_q, q.device,
                                      len(args_q))
            if _bindable(stage, q, k, v) and _bindable(stage, o, do, same=True):
                stage.launch_q = launch_q
        stage.ws.run(q, k, v, do, args_k[4], args_k[5], grads[1], grads[2])
        return grads
    if stage.pattern is not None:      # per-call tables: bound launches by key (run_fwd)
        key = _bwd_launch_key(args_q[n_q:], q, k, v, o, lse, do) \
            if q.device.type == "cuda" else None
        key = None if key is None else key + (bool(partials),)
        launch_q, launch_k = _scored_launch(stage.launches, key) or (None, None)
    if launch_q is None or not (launch_q(*args_q) and launch_k(*args_k)):
        aq, ak = (*args_q, *stage.static_q), (*args_k, *stage.static_k)
        with launch_guard(q.device.type):
            cq = stage.dq_kernel[stage.grid_q](*aq, **meta_q)
            ck = stage.dkdv_kernel[stage.grid_k](*ak, **stage.meta_k)
        launch_q = BoundLaunch.of(stage.dq_kernel, cq, stage.grid_q, aq, meta_q, q.device,
                                  len(args_q))
        launch_k = launch_q and BoundLaunch.of(stage.dkdv_kernel, ck, stage.grid_k, ak,
                                               stage.meta_k, q.device, len(args_k))
        if stage.pattern is None:
            # (o and do: the plan keeps a stage per "both aligned or not", so a mixed pair
            # binds nothing either)
            if _bindable(stage, q, k, v) and _bindable(stage, o, do, same=True):
                stage.launch_q, stage.launch_k = launch_q, launch_k
        elif launch_k is not None:
            _keep(stage.launches, key, (launch_q, launch_k))
    if atomic:
        grads = (_dq_of(grads[0], stage.scale, q.dtype),) + grads[1:]
    if stage.upcast:
        return tuple(g.to(dt) for g, dt in zip(grads, dtypes))
    return grads


# ------------------------------------------------------- build and run at once

def fwd(pattern, q, k, v, *, scale: float, q_offset: int, inputs: dict | None = None,
        **options):
    """Forward attention with explicit options (a stage built for this call alone)."""
    from .plan import Call
    call = Call.of(pattern, q, k, scale=scale, q_offset=q_offset, inputs=inputs)
    return run_fwd(build_fwd(call, q, k, v, options), q, k, v)


def bwd(pattern, q, k, v, o, lse, do, *, scale: float, q_offset: int,
        inputs: dict | None = None, **options):
    """Gradients ``(dq, dk, dv)`` with explicit options (a stage built for this call)."""
    from .plan import Call
    call = Call.of(pattern, q, k, scale=scale, q_offset=q_offset, inputs=inputs)
    return run_bwd(build_bwd(call, q, k, v, o, do, options), q, k, v, o, lse, do)
