"""Decode: a few query rows (``Lq <= 16``) against a long, growing, optionally paged KV cache.

``Pattern.decode(q, k_cache, v_cache, seq_lens=..., page_table=...)`` lands in
:func:`decode`; ``Pattern.__call__`` lands in :func:`call_routed` when :func:`routes` says
so (``docs/decode.md`` has the rule). Both backends run the same semantics as a call of the
pattern: query row ``i`` of batch ``b`` sits at position ``len_b - Lq + i`` (bottom-right
alignment; with a contiguous cache and no ``seq_lens`` a ``q_offset`` may move it), key
``j < len_b`` at position ``j``, and a row with no allowed key gives 0 (lse ``-inf``).

Caches:

* contiguous: ``k_cache``, ``v_cache`` ``[B, Hk, L, D]`` (any strides); every batch element
  uses its first ``seq_lens[b]`` keys (``L`` when ``seq_lens`` is None);
* paged: pools ``[num_pages, page_size, Hk, D]`` and ``page_table`` ``[B, max_pages]``
  (int32 or int64): key ``j`` of batch ``b`` is slot ``j % page_size`` of page
  ``page_table[b, j // page_size]``; ``seq_lens`` ``[B]`` is required.

A :class:`DecodePlan` is keyed by a *length bucket* (the next power of two of the cache's
capacity, at least 256) instead of the length: the lengths are runtime arguments, so a
growing cache reuses one plan, one kernel file and one compiled kernel per bucket. On the
Triton backend a step is two launches (the split-K kernel and the combine) on buffers the
plan holds, with no host synchronisation (``check=False``) and no allocation that depends on
the length: it can be captured in a CUDA graph (lengths then come from ``seq_lens``, a
device tensor, since scalar arguments are frozen at capture). On the CPU a step computes
the allowed key runs of the rows (closed form, or the predicate over the keys: O(Lq * Lk),
tiny for decode) and runs one fused attention call on those keys; a call like one its plan
served before takes the plan's fast entry (:func:`fast_step`), without the checks.
"""
from __future__ import annotations

import hashlib
import itertools
import threading
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch.autograd import forward_ad as _fwad

from ..dsl.errors import (SpattnConfigError, SpattnError, SpattnInputError, SpattnParamError,
                          SpattnValueError)
from ..ir.evaluate import evaluate
from ..ir.inputs import validate_inputs
from . import api as _api
from .tune import log as _log
from .plan import INT32_OFFSET, data_version
from .settings import launch_guard
from .cpu_ops import copy_ as _copy_, fill as _fill
from .usage import check_flags, overlapping as _overlapping

__all__ = ["decode", "routes", "call_routed", "fast_step", "fast_routed", "one_call",
           "DecodePlan",
           "DecodeConfig",
           "DECODE_PLANS",
           "MAX_DECODE_Q", "ROUTE_MIN_LK", "bucket"]

#: Most query rows the decode path takes.
MAX_DECODE_Q = 16
#: ``Pattern.__call__`` routes to the decode path from this many keys on.
ROUTE_MIN_LK = 256
#: The smallest length bucket.
MIN_BUCKET = 256
#: Capacities past which positions leave the kernels' 32-bit closed forms.
MAX_CAPACITY = 1 << 30
#: CPU: a key run of at least this many bytes of K and V gets its own kernel call (a view);
#: shorter runs are copied together into one.
VIEW_BYTES = 1 << 18
#: CPU: a step whose allowed keys lie in more than this many short runs reads them through
#: one index (a gather) instead of a copy per run, or, where they are at least
#: :data:`SPAN_DENSITY` of the keys between the first and the last and the mask stays under
#: :data:`SPAN_MASK_CELLS` cells, as one view of that span under an additive mask.
COPY_RUNS = 8
SPAN_DENSITY = 0.25
SPAN_MASK_CELLS = 1 << 22
#: CPU: the largest buffer for gathered K and V kept per thread (:class:`GatherBuffers`; a
#: larger gather reads its keys as one masked span instead, where the mask fits), and the
#: threads.
GATHER_KEEP_BYTES = 1 << 28
GATHER_THREADS = 4
#: CPU: a gather whose share per batch element and head is below this many elements is one
#: ``index_select`` call for all of them (a call per head costs more than its rows).
GATHER_ONE_CALL = 1 << 15
#: Bound launches a Triton plan keeps per kernel (one per specialisation of its arguments).
BOUND_LAUNCHES = 8
#: Streams a Triton plan keeps the split kernel's partial outputs for.
PART_STREAMS = 4
#: Plans kept by :data:`DECODE_PLANS`.
DECODE_PLANS_SIZE = 32
#: Runtime inputs whose int64 copies :data:`DECODE_PLANS` keeps (:meth:`DecodePlanCache.int64`).
INT64_COPIES = 16
#: CPU, one query row whose allowed keys differ per head and are scattered (head stripes,
#: dilations): each head's keys gathered (:class:`_HeadGather`) when the runs they lie in
#: hold at least this many keys and at least :data:`GATHER_RATIO` times the most any head
#: sees (a gather reads and writes a key once more; a call per head).
GATHER_MIN_KEYS = 2048
GATHER_RATIO = 3
#: CPU steps a plan remembers (:meth:`DecodePlan.cpu_step`): the layers of a model decode
#: at the same lengths, one step after the other.
CPU_STEPS = 4
#: CPU: batch elements whose allowed keys differ run as one kernel call over the union of
#: their keys (:meth:`DecodePlan._batched_step`) while that computes at most this many times
#: the keys they see, plus this many keys for each call saved (a call's own cost).
BATCH_MERGE_RATIO = 1.25
BATCH_MERGE_KEYS = 128
#: CPU: mask buffers a plan keeps (:meth:`DecodePlan._mask_tail`), and the most cells
#: (rows times partial keys) of one built on the host.
MASK_BUFFERS = 4
MASK_TAIL_CELLS = 1 << 16

_sdpa = torch.nn.functional.scaled_dot_product_attention
#: ATen's CPU flash-attention forward (the kernel dense SDPA runs on the CPU): ``(o, lse)``.
_FLASH_CPU = getattr(getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu",
                             None), "default", None)


#: Most splits of the keys a caller may ask for (the default takes at most 128).
MAX_SPLITS = 1024


def bucket(length: int) -> int:
    """The length bucket of a cache of ``length`` keys: the next power of two, >= 256."""
    return max(MIN_BUCKET, 1 << max(0, int(length) - 1).bit_length())


@dataclass(frozen=True)
class DecodeConfig:
    """What the decode module is rendered for (part of its cache key)."""

    strategy: str       # "ranges" (closed form of the decode rows) or "scan"
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int
    dtype: str
    int64: bool = False
    # a score's flags (None without one): how its tables' indices are kept in range
    # (always "clamp": codegen.config.SCORE_INDEX) and tanh as one tanh.approx.f32
    score_index: Optional[str] = None
    fast_tanh: Optional[bool] = None

    def as_dict(self) -> dict:
        """The fields, a score's flags only where set (the keys of modules without a
        score do not change)."""
        return {n: x for n, x in asdict(self).items() if x is not None}


# ------------------------------------------------------------------ arguments

def _is_int_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex() \
        and t.dtype != torch.bool


def _check_layout(q, k_cache, v_cache, page_table):
    """``(B, Hq, Hk, Lq, D, capacity, page_size, num_pages)`` of checked arguments."""
    if isinstance(q, torch.Tensor) and q.dim() == 4 and q.layout is torch.strided \
            and not _api.MIN_HEAD_DIM <= q.shape[3] <= _api.MAX_HEAD_DIM:
        raise SpattnInputError(
            f"decode takes head dims {_api.MIN_HEAD_DIM}..{_api.MAX_HEAD_DIM} on either "
            f"backend, got D = {q.shape[3]} (q has shape {tuple(q.shape)}): call the pattern, "
            f"pat(q, k, v), which runs any head dim on the torch backend")
    if page_table is None:
        _api.validate(q, k_cache, v_cache, float64=None)
        B, Hq, Lq, D = q.shape
        Hk, cap = k_cache.shape[1], k_cache.shape[2]
        page_size, num_pages = 0, 0
    else:
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.layout is not torch.strided \
                    or t.is_nested or t.is_meta:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                want = "[B, Hq, Lq, D]" if name == "q" else "[num_pages, page_size, Hk, D]"
                raise SpattnInputError(f"{name} must be a dense 4-D tensor {want} with data, "
                                       f"got {shape}")
            _api.refuse_wrapped(name, t)
        B, Hq, Lq, D = q.shape
        if tuple(v_cache.shape) != tuple(k_cache.shape):
            raise SpattnInputError(f"k_cache and v_cache must have the same shape "
                                   f"[num_pages, page_size, Hk, D]: k_cache has "
                                   f"{tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
        num_pages, page_size, Hk, Dk = k_cache.shape
        if min(B, Hq, Lq, num_pages, page_size, Hk) < 1:
            raise SpattnInputError(f"empty tensors: q has shape {tuple(q.shape)}, the pools "
                                   f"{tuple(k_cache.shape)}")
        if Dk != D:
            raise SpattnInputError(f"the pools' head dim must be q's: q has shape "
                                   f"{tuple(q.shape)}, k_cache {tuple(k_cache.shape)}")
        if Hq % Hk:
            raise SpattnInputError(f"the number of query heads must be a multiple of the number "
                                   f"of key/value heads: q has {Hq} (shape {tuple(q.shape)}), the "
                                   f"pools {Hk} (shape {tuple(k_cache.shape)})")
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            if t.device != q.device or t.dtype != q.dtype:
                raise SpattnInputError(f"{name} ({t.dtype} on {t.device}) must have q's dtype "
                                       f"and device ({q.dtype} on {q.device})")
        _api.check_dtype(q, float64=None)
        if not _is_int_tensor(page_table) or page_table.dim() != 2 \
                or page_table.shape[0] != B or page_table.shape[1] < 1:
            what = (f"shape {tuple(page_table.shape)}, dtype {page_table.dtype}"
                    if isinstance(page_table, torch.Tensor) else type(page_table).__name__)
            raise SpattnInputError(f"page_table must be an integer tensor [B, max_pages] with "
                                   f"B = {B} (q has shape {tuple(q.shape)}), got {what}")
        if page_table.device != q.device:
            raise SpattnInputError(f"page_table is on {page_table.device} but q is on "
                                   f"{q.device}")
        _api.refuse_wrapped("page_table", page_table)
        cap = page_table.shape[1] * page_size
    if Lq > MAX_DECODE_Q:
        raise SpattnInputError(f"decode takes at most {MAX_DECODE_Q} query rows, q has {Lq} "
                               f"(shape {tuple(q.shape)}): call the pattern (pat(q, k, v)) "
                               "for longer queries")
    if cap >= MAX_CAPACITY:
        raise SpattnValueError(f"the cache holds {cap} positions; decode takes fewer than "
                               f"2**30")
    return B, Hq, Hk, Lq, D, cap, page_size, num_pages


def _check_seq_lens(seq_lens, B, Lq, cap, device, check: bool):
    if seq_lens is None:
        return None
    if not _is_int_tensor(seq_lens) or tuple(seq_lens.shape) != (B,):
        what = (f"shape {tuple(seq_lens.shape)}, dtype {seq_lens.dtype}"
                if isinstance(seq_lens, torch.Tensor) else type(seq_lens).__name__)
        raise SpattnInputError(f"seq_lens must be an integer tensor [B] with B = {B}, got {what}")
    if seq_lens.device != device:
        raise SpattnInputError(f"seq_lens is on {seq_lens.device} but q is on {device}")
    _api.refuse_wrapped("seq_lens", seq_lens)
    if check:
        if device.type == "cpu":
            vals = seq_lens.tolist()
            lo, hi = min(vals), max(vals)
        else:
            lo, hi = (int(x) for x in torch.stack([seq_lens.min(), seq_lens.max()]).tolist())
        if lo < Lq or hi > cap:
            raise SpattnValueError(f"seq_lens holds values {lo}..{hi}; each must be in "
                                   f"[Lq, capacity] = [{Lq}, {cap}] (the cache holds the "
                                   "queries' own keys)")
    return seq_lens


def _check_pages(page_table, seq_lens, page_size, num_pages):
    """Every page a sequence uses is in [0, num_pages) (one host synchronisation)."""
    used = torch.arange(page_table.shape[1], device=page_table.device).view(1, -1) \
        < ((seq_lens.to(torch.int64) + page_size - 1) // page_size).view(-1, 1)
    if not bool(used.any()):
        return
    vals = page_table[used]
    lo, hi = (int(x) for x in torch.stack([vals.min(), vals.max()]).tolist())
    if lo < 0 or hi >= num_pages:
        raise SpattnValueError(f"page_table holds page {lo if lo < 0 else hi} among the pages "
                               f"the sequences use; the pools have pages 0..{num_pages - 1}")


def _check_positions(pattern, ins, B, Hq, Lq, cap, q_shift):
    """The runtime inputs cover every position of the step (queries and keys in
    ``[0, cap)``, or the rows at ``q_offset`` when one is given), and the pattern's integers
    stay exact there (a host-only check for affine input indices)."""
    from ..ir import bounds
    from ..ir.intervals import check_input_bounds
    if ins:
        check_input_bounds(pattern, ins, cap, cap, num_heads=Hq, batch=B, q_offset=0,
                           where=f"over the cache's {cap} positions, where a decode step's "
                                 "queries and keys lie")
    if q_shift:
        off = cap - Lq + q_shift
        if ins:
            check_input_bounds(pattern, ins, Lq, cap, num_heads=Hq, batch=B, q_offset=off)
        bounds.check_call(pattern, Lq, cap, num_heads=Hq, batch=B, q_offset=off, inputs=ins)


# ------------------------------------------------------------------ plans


def _exact_intervals(vals, L: int):
    """The non-empty intervals ``[lo, hi]`` within ``[0, L)`` of a row's closed-form values
    ``vals`` (``lo, hi, flo, fhi`` per interval, None unbounded), or None when some
    interval's FULL part is not the whole interval (the predicate decides those keys)."""
    out = []
    for i in range(0, len(vals), 4):
        lo, hi, flo, fhi = vals[i:i + 4]
        lo = 0 if lo is None else max(0, int(lo))
        hi = L - 1 if hi is None else min(L - 1, int(hi))
        if hi < lo:
            continue
        if flo is None or max(0, int(flo)) != lo or min(L - 1, int(fhi)) != hi:
            return None
        out.append((lo, hi))
    return out


def _affine(node, Lq: int, H: int):
    """``(c0, cL, cp)`` with ``node = c0 + cL * Lk + cp * p`` at a decode row ``p``
    (``qs = qe = p``; ``Lq`` and ``H`` are the plan's), or None when ``node`` is not an
    affine form of ``qs``, ``qe``, ``Lk``, ``Lq`` and ``H``."""
    from ..ir.nodes import Const, Sum, Var
    if isinstance(node, Const) and type(node.value) is int:
        return (node.value, 0, 0)
    if isinstance(node, Var):
        return {"qs": (0, 0, 1), "qe": (0, 0, 1), "Lk": (0, 1, 0), "Lq": (Lq, 0, 0),
                "H": (H, 0, 0)}.get(node.name)
    if isinstance(node, Sum):
        c0, cL, cp = node.const, 0, 0
        for t, c in node.terms:
            f = _affine(t, Lq, H)
            if f is None:
                return None
            c0, cL, cp = c0 + c * f[0], cL + c * f[1], cp + c * f[2]
        return (c0, cL, cp)
    return None


def _row_form(node, Lq: int, H: int):
    """A closed-form bound as a function of the decode row, for :func:`_form_values`:
    ``("aff", c0, cL, cp)``, ``("min" | "max", affine args)`` (one level), None for an
    unbounded side; raises LookupError for any other node."""
    from ..ir.nodes import Max, Min
    if node is None:
        return None
    f = _affine(node, Lq, H)
    if f is not None:
        return ("aff", *f)
    if isinstance(node, (Min, Max)):
        args = tuple(_affine(a, Lq, H) for a in node.args)
        if all(a is not None for a in args):
            return ("min" if isinstance(node, Min) else "max", args)
    raise LookupError(type(node).__name__)


def _aff_reduce(form, L: int, p0: int, n1: int):
    """``(value at the first row p0, slope)`` of a :func:`_row_form` that is one affine
    form over the rows ``p0 .. p0 + n1`` of a cache of ``L`` keys, else None: a min (max)
    is its argument that is lowest (highest) at the first and at the last row, since the
    difference of two affine forms keeps its sign between the two."""
    if form[0] == "aff":
        _, c0, cL, cp = form
        return c0 + cL * L + cp * p0, cp
    args = form[1]
    first = [c0 + cL * L + cp * p0 for c0, cL, cp in args]
    last = [x + a[2] * n1 for x, a in zip(first, args)]
    pick = min if form[0] == "min" else max
    m0, mN = pick(first), pick(last)
    for x, y, a in zip(first, last, args):
        if x == m0 and y == mN:
            return x, a[2]
    return None


def _form_values(form, p0: int, L: int, Lq: int) -> list:
    """The values of a :func:`_row_form` at the rows ``p0 .. p0 + Lq - 1`` of a cache of
    ``L`` keys: Python ints, exactly the closed form's values there."""
    if form[0] == "aff":
        _, c0, cL, cp = form
        base = c0 + cL * L + cp * p0
        return list(range(base, base + cp * Lq, cp)) if cp else [base] * Lq
    cols = [_form_values(("aff", *a), p0, L, Lq) for a in form[1]]
    pick = min if form[0] == "min" else max
    return [pick(t) for t in zip(*cols)]


class DecodePlan:
    """A decode step's resolved work for one length bucket: the checks on the pattern's
    integers and inputs over the bucket, the closed form, the query-head packing, and on the
    Triton backend the kernel module, the number of splits and the split buffers
    ``[B * Hq // pack, splits, BLOCK_M, BLOCK_D]`` (fp32) and ``[..., BLOCK_M]``.

    Attributes: ``pattern``, ``backend``, ``bucket`` (the capacity it serves: any length up
    to it), ``pack`` (query heads per tile), ``splits``, ``config``, ``module``.
    """

    def __init__(self, pattern, backend, *, B, Hq, Hk, Lq, D, dtype, device, bucket_len,
                 paged, inputs, num_splits=None, tables=None, gathers=None):
        from ..codegen.config import get_closed_form, ranges_ok
        from ..ir import bounds
        from ..ir.intervals import check_list_bounds
        self.pattern, self.backend = pattern, backend
        self.B, self.Hq, self.Hk, self.Lq, self.D = B, Hq, Hk, Lq, D
        self.dtype, self.device = dtype, device
        self.bucket, self.paged = bucket_len, paged
        # positions of any step in the bucket: queries and keys in [0, bucket)
        ins64 = {n: t.to(torch.int64) for n, t in inputs.items()}
        bounds.check_call(pattern, bucket_len, bucket_len, num_heads=Hq, batch=B, q_offset=0,
                          inputs=ins64)
        if backend == "triton":
            self.closed_form = _kernel_closed_form(pattern)
        else:
            cf = get_closed_form(pattern)
            self.closed_form = cf if cf is not None and ranges_ok(cf) else None
            if self.closed_form is None and inputs:
                self.closed_form = _closed_form_at(pattern, ins64)
        self.uses = uses = _variables(pattern.ir)
        per_head = any(t.dim() - nd >= 2 and t.shape[1] > 1
                       for (n, nd), t in ((x, inputs[x[0]]) for x in pattern.inputs.items()))
        G = Hq // Hk
        self.scored = getattr(pattern, "score", None) is not None
        self.tables_ok = True
        if self.scored:
            from ..ir.nodes import free_vars
            tables = dict(tables or {})
            #: whether a step's batch elements differ beyond their lengths (the torch
            #: backend's scored step then takes them one at a time); the kernel reads the
            #: score's head per row, so that a score of h keeps the packing
            leading = [(inputs[n], nd) for n, nd in pattern.inputs.items()] \
                + [(t, pattern.score_inputs[n]) for n, t in tables.items()]
            self.per_batch = "b" in (uses | free_vars(pattern.score)) or any(
                t.dim() > nd and t.shape[0] > 1 for t, nd in leading)
            #: whether the tables' indices are in range at every step of the bucket (queries
            #: and keys anywhere in [0, bucket), any length): else each step is checked at
            #: its own lengths (:meth:`check_tables`)
            self.tables_ok = _tables_in_range(pattern, ins64, tables, bucket_len, bucket_len, 0,
                                              B, Hq)
            self._checked: OrderedDict = OrderedDict()
            #: the score is ``s`` plus a bias (d score / d s = 1): the torch backend's step
            #: runs it as one fused attention call with the bias as an additive mask
            from ..ir.nodes import FConst
            from ..ir.score import grads
            ds = grads(pattern.score).ds
            self.additive = isinstance(ds, FConst) and ds.value == 1.0
            #: the additive score reads the positions only as ``q - k`` (and not ``Lk``):
            #: its bias at any step is a slice of its bias at the bucket's last rows
            #: (:meth:`scored_fast`)
            self.shift_free = self.additive and _shift_free(pattern.score)
            #: the torch backend's additive masks of the last steps (:meth:`_additive_mask`)
            self._bias_memo: OrderedDict = OrderedDict()
        #: a routed step of this plan may run as one fused call with an additive mask
        #: (:meth:`scored_fast`): an additive score, float32 on the CPU, one group of batch
        #: elements
        one = self.scored and backend == "torch" and torch.device(device).type == "cpu" \
            and (B == 1 or not self.per_batch)
        self.one_call = one and self.additive and dtype == torch.float32
        #: ... and any other score there: its variables kept per length (:meth:`score_env`)
        self.env_call = one and not self.one_call
        if self.scored:
            from ..ir.nodes import float_loads, free_vars, loads
            #: the score reads only ``s`` and the shape's ints (no tensor in its variables)
            self._score_scalar = not (free_vars(pattern.score) & {"q", "k", "h", "b"}) \
                and not float_loads(pattern.score) and not loads(pattern.score)
        self.pack = 1 if ("h" in uses or "H" in uses or per_head) else G
        #: the fast entries: :func:`fast_step`'s (CPU, set by ``_init_torch``' steps) and
        #: :func:`fast_routed`'s (the routed call this plan last served, with what its
        #: checks found); None until a call leaves one
        self.fast = self.fast_routed = None
        self.config = self.module = None
        self.splits = 1
        if backend == "triton":
            # the kernel selects list entries unchecked (the torch backend's evaluator checks)
            check_list_bounds(pattern, bucket_len, bucket_len, num_heads=Hq, batch=B,
                              q_offset=0, inputs=ins64)
            if bounds.kernel_int64(pattern, bucket_len, bucket_len, num_heads=Hq, batch=B,
                                   q_offset=0, inputs=ins64, closed_form=self.closed_form,
                                   block_m=16, block_n=256):
                raise SpattnValueError(
                    f"pattern {pattern.source!r} needs 64-bit integer arithmetic at the "
                    f"positions of a cache of up to {bucket_len} keys (its constants or its "
                    "runtime inputs' values): the decode kernel computes in 32 bits; call the "
                    "pattern (pat(q, k, v)) or use the torch backend")
            self._build_triton(num_splits)
        else:
            #: Where a CPU step's gathered K and V are written (shared by a cache's plans).
            self.gathers = GatherBuffers() if gathers is None else gathers
            self._init_torch()

    def __repr__(self):
        return (f"DecodePlan({self.pattern.source!r}, {self.backend}, B={self.B}, "
                f"Hq={self.Hq}, Hk={self.Hk}, Lq={self.Lq}, D={self.D}, bucket={self.bucket}, "
                f"paged={self.paged}, pack={self.pack}, splits={self.splits}, "
                f"strategy={self.config.strategy if self.config else 'cpu'})")

    # -- Triton --------------------------------------------------------------
    def check_tables(self, tables: dict, inputs: dict, lens, q_shift: int) -> None:
        """The score's table indices in range at a step of these lengths (``lens``: one
        int per batch element) where the bucket-wide proof failed (:attr:`tables_ok`); a
        SpattnInputError naming the table otherwise. The last checks are remembered."""
        if self.tables_ok:
            return
        from .scores import check_score_bounds
        shapes = tuple((n, tuple(t.shape)) for n, t in sorted(tables.items()))
        ins64 = {n: t.to(torch.int64) for n, t in inputs.items()}
        for L in sorted(set(lens)):
            key = (L, q_shift, shapes, tuple((n, id(t), data_version(t))
                                             for n, t in sorted(inputs.items())))
            if key in self._checked:
                continue
            check_score_bounds(self.pattern, ins64, tables, self.Lq, L, num_heads=self.Hq,
                               batch=self.B, q_offset=L - self.Lq + q_shift)
            self._checked[key] = None
            while len(self._checked) > CPU_STEPS:
                self._checked.popitem(last=False)

    def _build_triton(self, num_splits):
        from .settings import current
        self.config = default_config(self.closed_form, self.D, self.dtype, _api._interpret(),
                                     scored=self.scored, fast_tanh=current().fast_tanh,
                                     device_type=self.device.type)
        #: the configuration before any shrink, and ``tl.dot``'s precision when it is not
        #: the dtype's default (:meth:`_shrink`)
        self._config0, self.dot_prec = self.config, None
        self.module = load_module(self.pattern, self.config, self.closed_form, self.device)
        self.block_m = max(16, 1 << (self.pack * self.Lq - 1).bit_length())
        groups = self.B * self.Hq // self.pack
        if num_splits is None:
            sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                   if self.device.type == "cuda" else None)
            self.splits = split_count(groups, self._tiles_at_bucket() * self.config.block_n,
                                      sms)
        else:
            self.splits = 1 << max(0, int(num_splits) - 1).bit_length()
        self.groups = groups
        #: ``(ids of the inputs, their kernel arguments)`` (int32 copies), made at the first
        #: step; and the launches of the two kernels with their arguments bound, by the
        #: specialisation of the step's arguments (:func:`_launch_spec`; CUDA only)
        self._input_args = None
        self._launches: dict = {False: {}, True: {}}     # by WIDE
        self._combines: dict = {}
        #: the split kernel's partial outputs, which the combine kernel reads: one pair per
        #: stream (steps on two streams run at once), each step's two launches enqueued
        #: under the lock (two threads' steps on one stream would otherwise interleave
        #: them: one step's combine reading the other's partials)
        self._parts: dict = {}
        self._parts_lock = threading.Lock()

    def _tiles_at_bucket(self) -> int:
        """Key tiles the rows of a step at the bucket's full length visit (for sizing the
        splits; the kernel computes the real count per step)."""
        n = -(-self.bucket // self.config.block_n)
        cf = self.closed_form
        if cf is None:
            return n
        qe = self.bucket - 1
        env = {"qs": qe - self.Lq + 1, "qe": qe, "Lq": self.Lq, "Lk": self.bucket,
               "H": self.Hq, "h": 0, "b": 0}
        total = 0
        try:
            for iv in cf.rows:
                lo = 0 if iv.lo is None else max(0, int(evaluate(iv.lo, env)))
                hi = self.bucket - 1 if iv.hi is None else min(self.bucket - 1,
                                                               int(evaluate(iv.hi, env)))
                if hi >= lo:
                    total += hi // self.config.block_n - lo // self.config.block_n + 1
        except Exception:       # a bound the host cannot evaluate alone: size for all tiles
            return n
        return max(1, min(n, total))

    def run_triton(self, q, k, v, *, lk: int, q_shift: int, seq_lens, page_table, page_size,
                   num_pages, scale: float, inputs: dict, tables=None):
        B, Hq, Lq, D = q.shape
        o = torch.empty((B, Hq, Lq, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
        with self._parts_lock:
            o_part, lse_part = self._stream_parts(q.device)
            self._run_triton(q, k, v, o, lse, o_part, lse_part, lk=lk, q_shift=q_shift,
                             seq_lens=seq_lens, page_table=page_table, page_size=page_size,
                             num_pages=num_pages, scale=scale, inputs=inputs, tables=tables)
        return o, lse

    def _stream_parts(self, device) -> tuple:
        """The partial outputs of the current stream (made on it at its first step; the
        pairs of at most :data:`PART_STREAMS` streams are kept)."""
        stream = (torch._C._cuda_getCurrentRawStream(device.index
                                                     if device.index is not None else
                                                     torch.cuda.current_device())
                  if device.type == "cuda" else None)
        parts = self._parts.get(stream)
        if parts is None:
            while len(self._parts) >= PART_STREAMS:
                self._parts.pop(next(iter(self._parts)))
            c = self.config
            parts = self._parts[stream] = (
                torch.empty((self.groups, self.splits, self.block_m, c.block_d),
                            dtype=torch.float32, device=device),
                torch.empty((self.groups, self.splits, self.block_m), dtype=torch.float32,
                            device=device))
        return parts

    def _run_triton(self, q, k, v, o, lse, o_part, lse_part, *, lk, q_shift, seq_lens,
                    page_table, page_size, num_pages, scale, inputs, tables):
        from .triton_backend import LOG2E, _dot_prec, _input_args, _scale_log2, _score_args
        B, Hq, Lq, D = q.shape
        if page_table is None:
            ks = (k.stride(0), k.stride(1), k.stride(2), k.stride(3))
            vs = (v.stride(0), v.stride(1), v.stride(2), v.stride(3))
            pages, stride_pages = lse_part, 0
        else:   # pools [num_pages, page_size, Hk, D]: page, head, slot, dim
            ks = (k.stride(0), k.stride(2), k.stride(1), k.stride(3))
            vs = (v.stride(0), v.stride(2), v.stride(1), v.stride(3))
            if page_table.shape[1] > 1 and page_table.stride(1) != 1:
                page_table = page_table.contiguous()    # the kernel steps along a row by 1
            pages, stride_pages = page_table, page_table.stride(0)
        if seq_lens is None:
            seq = lse_part
        else:   # read as seq_lens[b]: a strided or expanded tensor as a contiguous copy
            seq = seq_lens if seq_lens.is_contiguous() else seq_lens.contiguous()
        cap = k.shape[2] if page_table is None else page_table.shape[1] * page_size
        rows = k.shape[2] if page_table is None else page_size     # a slice, or a page
        wide = max((Lq - 1) * abs(q.stride(2)) + (D - 1) * abs(q.stride(3)),
                   (rows - 1) * abs(ks[2]) + (D - 1) * abs(ks[3]),
                   (rows - 1) * abs(vs[2]) + (D - 1) * abs(vs[3])) > INT32_OFFSET
        ids = tuple(map(id, inputs.values()))
        if self._input_args is None or self._input_args[0] != ids:
            # the plan is keyed by its inputs (identity, version): converted once
            self._input_args = (ids, _input_args(self.pattern, inputs, False))
        head = _score_args(self.pattern, tables) if self.scored else []
        args = (q, k, v, o_part, lse_part, *head, *q.stride(), *ks, *vs,
                pages, stride_pages, max(1, num_pages), seq, *self._input_args[1],
                *((LOG2E, scale) if self.scored else (_scale_log2(scale),)),
                Hq, Hq // self.Hk, Lq, lk, q_shift, cap)
        while True:
            try:
                _launch(self._launches[wide], self.module.KERNEL, (self.groups, self.splits),
                        args, 3, dict(PACK=self.pack, NUM_SPLITS=self.splits,
                                PAGE_SIZE=max(1, page_size), PAGED=page_table is not None,
                                HAS_SEQ=seq_lens is not None, BLOCK_M=self.block_m,
                                BLOCK_N=self.config.block_n, BLOCK_D=self.config.block_d,
                                HEAD_DIM=D, DOT_PREC=self.dot_prec or _dot_prec(q.dtype),
                                WIDE=wide, num_warps=self.config.num_warps,
                                num_stages=self.config.num_stages))
                break
            except Exception as e:      # noqa: BLE001 -- Triton's OutOfResources, else raised
                self._shrink(e)
        _launch(self._combines, self.module.COMBINE, (self.groups, self.pack * Lq),
                (o_part, lse_part, o, lse, *o.stride(), Hq, Lq), 0,
                dict(PACK=self.pack, NUM_SPLITS=self.splits, BLOCK_M=self.block_m,
                     BLOCK_D=self.config.block_d, HEAD_DIM=D, num_warps=4))

    def _shrink(self, error: Exception) -> None:
        """After the decode kernel did not fit the device's shared memory (Triton checks
        when it loads a compiled kernel, at its first launch, before it runs) or did not
        assemble (``triton_backend.unfit``): one stage
        fewer, or at one stage half the key tile (two stages again), with the module
        rendered for it. At 16-key tiles a float32 cache's kernel goes back to its first
        configuration with exact fp32 products ("ieee", which hold each operand once in
        shared memory where three tf32 products hold it twice: 128 packed rows at D = 256
        fit no tile otherwise); after that a :class:`SpattnConfigError`. The defaults fit
        an H200's 227 KiB for 16-bit caches and for float32 ones with up to 32 packed rows
        (docs/decisions.md); more packed float32 rows or a smaller device need less."""
        from .triton_backend import shrink_step, unfit
        why = unfit(error)
        if why is None:
            raise error
        cfg = self.config
        step = shrink_step(cfg.num_stages, {"block_n": cfg.block_n})
        if step is not None:
            smaller = replace(cfg, **step)
        elif cfg.dtype == "fp32" and self.dot_prec is None:
            self.dot_prec, smaller = "ieee", self._config0
            _log.info("spattn: decode kernel does not fit shared memory with three tf32 "
                      "products; using exact fp32 products")
        else:
            raise SpattnConfigError(f"no configuration of the decode kernel fits this device "
                                    f"({self.block_m} packed query rows, head dim {self.D}, "
                                    f"{cfg.dtype}): {why}") from None
        _log.info("spattn: decode kernel (%d-key tiles, %d stages): %s; using %d-key "
                  "tiles, %d stages", cfg.block_n, cfg.num_stages, why, smaller.block_n,
                  smaller.num_stages)
        self.config = smaller
        self.module = load_module(self.pattern, smaller, self.closed_form, self.device)
        self._launches = {False: {}, True: {}}

    # -- CPU -----------------------------------------------------------------
    def _init_torch(self):
        """The CPU step's state: the closed form's row intervals as one host function of
        ``(qs, qe, Lq, Lk, H, b)`` (``ir.hostfn``), and the memo of steps."""
        from ..ir.hostfn import host_function
        cf = self.closed_form
        self._rows_fn = None
        if cf is not None and "h" not in self.uses:
            nodes = []
            for iv in cf.rows:
                both = iv.flo is not None and iv.fhi is not None
                nodes += [iv.lo, iv.hi, iv.flo if both else None, iv.fhi if both else None]
            self._rows_fn = host_function(nodes, ("qs", "qe", "Lq", "Lk", "H", "b"))
        #: The closed form's bounds as affine forms of the row (or a min / max of them),
        #: four per interval: :meth:`_row_intervals` with int arithmetic on whole columns
        #: of rows; None where some bound is another node (the host function serves).
        self._row_forms = None
        if self._rows_fn is not None and "b" not in self.uses:
            try:
                self._row_forms = tuple(
                    (_row_form(iv.lo, self.Lq, self.Hq), _row_form(iv.hi, self.Lq, self.Hq),
                     *((_row_form(iv.flo, self.Lq, self.Hq),
                        _row_form(iv.fhi, self.Lq, self.Hq))
                       if iv.flo is not None and iv.fhi is not None else (None, None)))
                    for iv in cf.rows)
            except LookupError:
                self._row_forms = None
        #: The intervals' ``(lo, hi)`` row forms where each interval is its own FULL part
        #: (the same forms), for :meth:`_aff1_step`; else None.
        self._aff1 = None
        f = self._row_forms
        if f is not None and all(None not in iv and iv[0] == iv[2] and iv[1] == iv[3]
                                 for iv in f):
            self._aff1 = tuple((iv[0], iv[1]) for iv in f)
        self._aff_masks: dict = {}
        #: One query row, no ``b``: :meth:`_row1_step` builds a step from the row's
        #: intervals alone.
        self._row1 = self._rows_fn if (self._rows_fn is not None and self.Lq == 1
                                       and "b" not in self.uses and not self.paged) else None
        self._steps: dict = {}
        #: ``(L, VIEW_BYTES, step)``: :func:`fast_step`'s last step over every key of a
        #: cache of ``L`` keys (a step is a function of its key, so this copy of a memo
        #: entry stays right after the memo drops it).
        self._last_step = (-1, None, None)
        #: One query row whose keys are one interval ``[lo, q + c]``, ``lo`` not moving
        #: with the row (:func:`_grows_by_one`): the next position's grown step is the last
        #: one's with one more key (:meth:`_next_grown`).
        self._grows = self.Lq == 1 and not self.paged and "h" not in self.uses \
            and _grows_by_one(self.closed_form)
        #: ``(lens, q_shift, VIEW_BYTES, rel, cap, a0, z0)`` of the last grown step
        #: :meth:`cpu_step` kept (one tuple, replaced whole: threads may share the plan).
        self._last_grown = None
        self._masks: dict = {}
        self._steps_lock = threading.Lock()
        #: ``(signature, scale, grouped)``: the :func:`_signature` of the calls
        #: :func:`fast_step` serves from this plan, their scale (None: SDPA's default,
        #: ``1 / sqrt(D)``) and q's grouped shape ``[B, Hk, G * Lq, D]`` (None when
        #: ``G = 1``); None until a call leaves it.
        self.fast = None

    def cpu_step(self, lens: tuple, q_shift: int, page_size: int, inputs: dict):
        """What a CPU step at the lengths ``lens`` (one per batch element) and ``q_shift``
        runs (:meth:`_build_step`), memoised in the plan: the layers of a model decode at
        the same lengths, so all but the first find it. The plan is keyed by the runtime
        inputs' identity and version, so a memo never outlives the inputs it read; the key
        holds everything else a step depends on."""
        key = (lens, q_shift, page_size, VIEW_BYTES)
        step = self._steps.get(key)
        if step is None:
            step = self._next_grown(lens, q_shift, page_size) if self._grows else None
            if step is None:
                step = self._build_step(lens, q_shift, page_size, inputs)
            self._last_grown = None if step.grown is None else \
                (lens, q_shift, VIEW_BYTES, *step.grown)
            self._keep_step(key, step)
        return step

    def _next_grown(self, lens: tuple, q_shift: int, page_size: int):
        """The grown step (:meth:`_grown_step`) of the position after the last one's, from
        it: where the plan's row keys are one interval ``[lo, q + c]`` whose ``lo`` the row
        does not move (:func:`_grows_by_one`, checked once per plan), the query one position
        further on (every length one longer at the same ``q_shift``, or the same lengths
        one ``q_shift`` later) sees the keys it saw and the next one, so the step reads one
        more column of the same mask buffer. None where that does not hold (then
        :meth:`_build_step` decides)."""
        last = self._last_grown
        if last is None or page_size:
            return None
        lens0, shift0, view, rel, cap, a0, z0 = last
        if view != VIEW_BYTES or len(lens) != len(lens0) or len(set(lens)) != 1:
            return None
        L0, L = lens0[0], lens[0]
        end0, end = L0 - 1 + shift0, L - 1 + q_shift             # the row's position
        if end != end0 + 1 or (L, q_shift) not in ((L0 + 1, shift0), (L0, shift0 + 1)):
            return None
        c = z0 - 1 - end0                                         # keys up to q + c
        if end + c > L - 1 or z0 + 1 - a0 > cap:
            return None
        mask = self._mask_head(rel, cap).narrow(-1, 0, z0 + 1 - a0)
        seg = _Segment(((a0, z0 + 1),), z0 + 1 - a0, mask, True, None, None)
        return _Step(((0, self.B, (seg,)),), (a0, z0 + 1, mask), (rel, cap, a0, z0 + 1))

    def _keep_step(self, key, step, memo: Optional[dict] = None, size: int = CPU_STEPS) -> None:
        """Put ``step`` in ``memo`` (the plan's memo of steps by default; a routed entry's
        ``steps``; the mask buffers) under ``key``, the oldest leaving past ``size``."""
        memo = self._steps if memo is None else memo
        with self._steps_lock:
            while len(memo) >= size:
                memo.pop(next(iter(memo)))
            memo[key] = step

    def _row1_step(self, L: int):
        """The step of one query row at position ``L - 1`` of a contiguous cache of ``L``
        keys (every batch element; the pattern reads no ``b``) when the closed form's
        intervals are exact at the row (each its own FULL part, as :meth:`_row_intervals`
        requires) and form one run: one call on those keys, no mask; else None. The step
        :meth:`_build_step` would build, with a few int operations."""
        fn = self._row1
        if fn is None:
            return None
        try:
            vals = fn(L - 1, L - 1, 1, L, self.Hq, 0)
        except (TypeError, ValueError, KeyError):
            return None
        ivs = _exact_intervals(vals, L)
        if ivs is None:
            return None
        a = z = None
        for lo, hi in ivs:
            if a is None:
                a, z = lo, hi + 1
            elif lo <= z and hi + 1 >= a:               # overlaps or touches: one run
                a, z = min(a, lo), max(z, hi + 1)
            else:
                return None                             # two runs: the general build
        if a is None:
            return None                                 # no key: the general build
        seg = _Segment(((a, z),), z - a, None, True, None, None)
        return _Step(((0, self.B, (seg,)),), (a, z, None))

    def _build_step(self, lens: tuple, q_shift: int, page_size: int, inputs: dict):
        """The :class:`_Step`: per group of batch elements (one group for the batch when
        the lengths are equal, the cache is contiguous and the pattern reads neither ``b``
        nor per-batch inputs) the :class:`_Segment` s of its allowed keys."""
        B, Lq, G, dev = self.B, self.Lq, self.Hq // self.Hk, self.device
        shared = (not self.paged and len(set(lens)) == 1 and "b" not in self.uses
                  and all(inputs[n].dim() == nd for n, nd in self.pattern.inputs.items()))
        if shared:
            off = lens[0] - Lq + q_shift
            step = self._aff1_step(lens[0], off)
            if step is None:
                step = self._one_run_step(lens[0], off)
            if step is not None:
                return step
        keyed = None
        if not shared and len(set(lens)) == 1 and (self.closed_form is None
                                                   or "h" in self.uses):
            keyed = self._keys_batch(lens[0], lens[0] - Lq + q_shift, inputs)
        if keyed is None:
            keyed = [(b0, b1, self._keys(lens[b0], lens[b0] - Lq + q_shift, b0, inputs))
                     for b0, b1 in ([(0, B)] if shared else [(b, b + 1) for b in range(B)])]
        if not shared:
            step = self._batched_step(keyed, lens)
            if step is not None:
                return step
        out = []
        for b0, b1, (runs, part, m_part) in keyed:
            if not runs:
                out.append((b0, b1, None))
                continue
            gather = self._head_gather(runs, part, m_part)
            if gather is not None:
                out.append((b0, b1, gather))
                continue
            spread = self._span_segment(runs, part, m_part)
            if spread is not None:
                out.append((b0, b1, (spread,)))
                continue
            segs = self._segments(runs)
            order = [r for seg in segs for r in seg]
            n = sum(z - a for a, z in order)
            add = None
            if m_part is not None:
                mk = self._grouped_rows(m_part)
                add = _fill((1, mk.shape[0], G * Lq, n), 0.0, self.dtype, dev)
                add[0, :, :, _columns(order, part, dev)] = \
                    torch.where(mk, 0.0, float("-inf")).to(self.dtype)
            pieces, c0 = [], 0
            for seg in segs:
                w = sum(z - a for a, z in seg)
                mask = None if add is None else add[..., c0:c0 + w]
                full = _overlap(seg, part) < w
                empty = None
                if mask is not None and not full:
                    e = torch.isneginf(mask).all(-1)             # [1, Hk or 1, G * Lq]
                    empty = e if bool(e.any()) else None
                gather = index = None
                if self.paged:
                    idx = _positions(seg, dev)
                    gather = (idx // page_size, idx % page_size)
                elif len(seg) > COPY_RUNS:
                    index = _positions(seg, dev)
                pieces.append(_Segment(tuple(seg), w, mask, full, empty, gather, index))
                c0 += w
            out.append((b0, b1, tuple(pieces)))
        one = None
        if len(out) == 1 and out[0][2] is not None and len(out[0][2]) == 1 \
                and not isinstance(out[0][2], _HeadGather):
            s = out[0][2][0]
            if s.gather is None and len(s.runs) == 1 and s.empty is None:
                one = (*s.runs[0], s.mask)
        return _Step(tuple(out), one)

    def _segments(self, runs):
        """The kernel calls of a step's key ``runs``: on a contiguous cache each run of at
        least :data:`VIEW_BYTES` of K and V a call of its own (a view), the others one call
        copied together; on a paged cache one call (gathered)."""
        if self.paged:
            return [runs]
        per_key = self.Hk * self.D * self.dtype.itemsize * 2
        big = [r for r in runs if len(runs) == 1 or (r[1] - r[0]) * per_key >= VIEW_BYTES]
        small = [r for r in runs if r not in big]
        return [[r] for r in big] + ([small] if small else [])

    def _span_segment(self, runs, part, m_part):
        """The one :class:`_Segment` of a contiguous cache's keys in more than
        :data:`COPY_RUNS` runs that are at least :data:`SPAN_DENSITY` of the keys from the
        first to the last (``(q - k) % 2 == 0``, ``k % 3 != 0``): a view of that span under an
        additive mask (``[1, 1, 1, span]`` where every row sees the same keys), which reads
        the keys between the runs rather than gathering the runs; else None."""
        if self.paged or len(runs) <= COPY_RUNS:
            return None
        a0, z0, dev = runs[0][0], runs[-1][1], self.device
        pos = _positions(runs, dev)
        span, n = z0 - a0, pos.numel()
        gathered = 2 * self.B * self.Hk * n * self.D * self.dtype.itemsize
        if n < SPAN_DENSITY * span and gathered <= GATHER_KEEP_BYTES:
            return None
        if m_part is None:
            allow = torch.zeros((1, 1, 1, span), dtype=torch.bool, device=dev)
        else:
            mk = self._grouped_rows(m_part)                   # [Hk or 1, G * Lq, n_part]
            if mk.shape[0] * mk.shape[1] * span > SPAN_MASK_CELLS:
                return None
            allow = torch.zeros((1, *mk.shape[:2], span), dtype=torch.bool, device=dev)
        allow[..., pos - a0] = True
        if m_part is not None:
            allow[0, :, :, _positions(part, dev) - a0] = mk
        mask = torch.where(allow, 0.0, float("-inf")).to(self.dtype)
        full = _overlap(runs, part) < n
        empty = None
        if not full:
            e = ~allow.any(-1)                                  # [1, Hk or 1, G * Lq]
            empty = e if bool(e.any()) else None
        return _Segment(((a0, z0),), span, mask, full, empty, None)

    def _grouped_rows(self, m_part):
        """The pattern ``[1 or Hq, Lq, n]`` at a step's partial keys as the kernel's rows
        ``[Hk or 1, G * Lq, n]`` (the query heads of a key head folded into its rows)."""
        G, Lq, n = self.Hq // self.Hk, self.Lq, m_part.shape[-1]
        if m_part.shape[0] > 1:
            return m_part.reshape(self.Hk, G * Lq, n)
        return m_part.unsqueeze(1).expand(1, G, Lq, n).reshape(1, G * Lq, n)

    def _batched_step(self, keyed, lens: tuple):
        """The step of batch elements whose allowed keys differ (a per-batch input such as
        a padding mask, or a pattern of ``b``) as one group: one kernel call per segment of
        the union of their key runs, each element's keys outside its own runs masked,
        where that computes at most :data:`BATCH_MERGE_RATIO` times the keys the elements
        see (plus :data:`BATCH_MERGE_KEYS` per call saved); else None (a group per
        element). Equal lengths and a contiguous cache only: a key past an element's length
        may hold anything, and a masked score must still be finite."""
        if self.paged or len(set(lens)) != 1 or len(keyed) < 2:
            return None
        if any(runs and self._head_gather(runs, part, m) is not None
               for _, _, (runs, part, m) in keyed):
            return None
        union = _merge([r for _, _, (runs, _, _) in keyed for r in runs])
        width = sum(z - a for a, z in union)
        seen = sum(z - a for _, _, (runs, _, _) in keyed for a, z in runs)
        B, Lq, Hk, G, dev = self.B, self.Lq, self.Hk, self.Hq // self.Hk, self.device
        if not union or B * width > BATCH_MERGE_RATIO * seen + (B - 1) * BATCH_MERGE_KEYS:
            return None
        grown = self._grown_step(keyed, union)
        if grown is not None:
            return grown
        heads = Hk if any(m is not None and m.shape[0] > 1 for _, _, (_, _, m) in keyed) else 1
        span = union[-1][1] - union[0][0]
        if len(union) > COPY_RUNS and width >= SPAN_DENSITY * span \
                and B * heads * G * Lq * span <= SPAN_MASK_CELLS:
            union, width = [(union[0][0], union[-1][1])], span   # one view, the gaps masked
        segs = self._segments(union)
        order = [r for seg in segs for r in seg]
        allow = torch.zeros((B, heads, G * Lq, width), dtype=torch.bool, device=dev)
        for b, _, (runs, part, m_part) in keyed:
            if runs:
                allow[b, :, :, _columns(order, runs, dev)] = True
            if m_part is not None:
                allow[b, :, :, _columns(order, part, dev)] = self._grouped_rows(m_part)
        add = torch.where(allow, 0.0, float("-inf")).to(self.dtype)
        pieces, c0 = [], 0
        for seg in segs:
            w = sum(z - a for a, z in seg)
            e = ~allow[..., c0:c0 + w].any(-1)                  # [B, heads, G * Lq]
            empty = e if bool(e.any()) else None
            index = _positions(seg, dev) if len(seg) > COPY_RUNS else None
            pieces.append(_Segment(tuple(seg), w, add[..., c0:c0 + w], empty is None, empty,
                                   None, index))
            c0 += w
        s = pieces[0]
        one = (*s.runs[0], s.mask) if (len(pieces) == 1 and len(s.runs) == 1
                                       and s.empty is None) else None
        return _Step(((0, B, tuple(pieces)),), one)

    def _grown_step(self, keyed, union):
        """:meth:`_batched_step`'s step where its mask is a view of one a growing cache
        keeps: the union of the elements' keys is one run, every element's last run ends
        where it ends and all rows of an element see the same keys (a left padding under
        one causal query row). The mask's columns are then fixed relative to the run's
        start, and a cache one key longer adds a column every row sees, so the steps of a
        generation take longer views of one buffer (:meth:`_mask_head`) instead of
        building their masks; else None."""
        if len(union) != 1 or len(keyed) != self.B:
            return None
        a0, z0 = union[0]
        rel = [None] * self.B
        for b, _, (runs, _, m_part) in keyed:
            if m_part is not None or not runs or runs[-1][1] != z0:
                return None
            rel[b] = tuple((a - a0, z - a0) for a, z in runs[:-1]) + ((runs[-1][0] - a0,),)
        cap = self.bucket - a0
        if self.B * cap > SPAN_MASK_CELLS:
            return None
        mask = self._mask_head(tuple(rel), cap).narrow(-1, 0, z0 - a0)
        seg = _Segment(((a0, z0),), z0 - a0, mask, True, None, None)
        return _Step(((0, self.B, (seg,)),), (a0, z0, mask), (tuple(rel), cap, a0, z0))

    def _mask_head(self, rel: tuple, cap: int) -> torch.Tensor:
        """The additive mask buffer ``[B, 1, 1, cap]`` (0 or -inf, the plan's dtype) in which
        element ``b`` sees the columns of ``rel[b]``: runs ``(lo, hi)`` and, last, ``(lo,)``
        open to the end; kept with :meth:`_mask_tail`'s buffers (:data:`MASK_BUFFERS`)."""
        key = ("head", rel, cap)
        buf = self._masks.get(key)
        if buf is not None:
            return buf
        allow = torch.zeros((self.B, cap), dtype=torch.bool)
        for b, runs in enumerate(rel):
            for r in runs:
                allow[b, r[0]:r[1] if len(r) == 2 else cap] = True
        buf = torch.where(allow, 0.0, float("-inf")).to(self.dtype).to(self.device) \
            .view(self.B, 1, 1, cap)
        self._keep_step(key, buf, self._masks, MASK_BUFFERS)
        return buf

    def _head_gather(self, runs, part, m_part):
        """The :class:`_HeadGather` of a one-row step whose keys differ per head and are
        scattered over their runs (:data:`GATHER_MIN_KEYS`, :data:`GATHER_RATIO`), else
        None: each head then reads only its own keys instead of every key of the runs
        under a mask."""
        if self.paged or self.Lq != 1 or m_part is None or m_part.shape[0] != self.Hq \
                or self.Hq == 1:
            return None
        n = sum(z - a for a, z in runs)
        if n < GATHER_MIN_KEYS:
            return None
        seen = m_part[:, 0]                                   # [Hq, n_part]
        full = _subtract(runs, part)
        n_full = sum(z - a for a, z in full)
        if (n_full + int(seen.sum(-1).max())) * GATHER_RATIO > n:
            return None
        pos = _positions(part, self.device)
        base = _positions(full, self.device) if full else None
        idx = []
        for h in range(self.Hq):
            mine = pos[seen[h]]
            idx.append(mine if base is None else torch.cat([base, mine]))
        return _HeadGather(tuple(idx))

    def _aff1_step(self, L: int, q_off: int):
        """:meth:`_one_run_step` in O(number of intervals) where every row's keys are one
        interval whose bounds are affine and nondecreasing along the step's rows, or None
        (then :meth:`_one_run_step` decides). Serves causal, windows, gaps, offsets from
        either end, and sinks beside a window while the two touch.

        Each bound reduces to one affine form over the rows (:func:`_aff_reduce`: a min or
        max whose winner is the same at the first and last row is that form at every
        row). Row ``i`` then sees ``[max(0, A + sl * i), min(L - 1, B + sh * i)]`` of each
        interval: the width is concave in ``i``, the gap between two intervals and the gap
        to the next row's first key convex, so the first and last rows decide whether
        every row sees a key of each interval, whether a row's intervals touch (then their
        union is the interval of the lower first and the higher last bound) and whether the
        keys form one run; the run is ``[lo_0, hi_last]``, every row sees ``[lo_last,
        hi_0]``. Within the partial keys ``[p0, z)`` the rows' intervals relative to ``z``
        depend only on the slopes, ``A - z``, ``B - z``, ``p0 - z`` and ``L - 1 - z`` (the
        clamp at 0 lies below ``p0``; ``A`` counts only up to ``p0 - sl * (Lq - 1)``,
        ``B`` up to ``L - 1``): the mask buffer's key (:meth:`_mask_tail` builds it once).
        A growing cache of causal or window rows keeps one key."""
        ivs = self._aff1
        if ivs is None:
            return None
        top, n1 = L - 1, self.Lq - 1
        run = None
        for lo_f, hi_f in ivs:
            lo, hi = _aff_reduce(lo_f, L, q_off, n1), _aff_reduce(hi_f, L, q_off, n1)
            if lo is None or hi is None:
                return None
            (A, sl), (Bh, sh) = lo, hi
            if sl < 0 or sh < 0 or min(top, Bh) < max(0, A) \
                    or min(top, Bh + sh * n1) < max(0, A + sl * n1):
                return None                     # not monotone, or a row sees none of it
            if run is not None:
                A2, sl2, B2, sh2 = run
                for i in ((0, n1) if n1 else (0,)):
                    if max(0, A + sl * i) > min(top, B2 + sh2 * i) + 1 \
                            or max(0, A2 + sl2 * i) > min(top, Bh + sh * i) + 1:
                        return None             # a row's intervals apart: two runs
                A0, AN, B0, BN = A + sl * n1, A2 + sl2 * n1, Bh + sh * n1, B2 + sh2 * n1
                if A <= A2 and A0 <= AN:
                    pass
                elif A2 <= A and AN <= A0:
                    A, sl = A2, sl2
                else:
                    return None
                if not (Bh >= B2 and B0 >= BN):
                    if B2 >= Bh and BN >= B0:
                        Bh, sh = B2, sh2
                    else:
                        return None
            run = (A, sl, Bh, sh)
        if run is None:
            return None
        A, sl, Bh, sh = run
        lo0, loN, hi0, hiN = max(0, A), max(0, A + sl * n1), min(top, Bh), min(top, Bh + sh * n1)
        if n1 and (max(0, A + sl) > hi0 + 1 or loN > min(top, Bh + sh * (n1 - 1)) + 1):
            return None                                 # a gap: two runs
        a, z = lo0, hiN + 1
        n = z - a
        if loN > hi0:
            p0 = a                                      # no key seen by every row
        else:
            p0 = a if a < loN else hi0 + 1
        mask = None
        if p0 < z:
            Lq = n1 + 1
            if (z - p0) * Lq > MASK_TAIL_CELLS:
                return None
            # the first bounds clamped where no row's reaches p0, the last ones at L - 1
            key = (sl, sh, max(A, p0 - sl * n1) - z, min(Bh, top) - z, p0 - z, top - z)
            buf = self._aff_masks.get(key)
            if buf is None:
                rel = [(max(A + sl * i, p0) - z, min(top, Bh + sh * i) - z)
                       for i in range(Lq)]
                buf = self._mask_tail(tuple(((x,) if x[1] >= x[0] else ()) for x in rel),
                                      z - p0)
                with self._steps_lock:
                    while len(self._aff_masks) >= MASK_BUFFERS:
                        self._aff_masks.pop(next(iter(self._aff_masks)))
                    self._aff_masks[key] = buf
            mask = buf.narrow(-1, self.bucket - n, n)
        seg = _Segment(((a, z),), n, mask, loN <= hi0, None, None)
        return _Step(((0, self.B, (seg,)),), (a, z, mask))

    def _one_run_step(self, L: int, q_off: int):
        """The :class:`_Step` of a contiguous cache whose rows' keys are one run ``[a, z)``
        with every row seeing some key, from the rows' exact intervals
        (:meth:`_row_intervals`), or None (the general build decides). Its mask is a view
        of a buffer ``[1, 1, G * Lq, bucket]`` the plan keeps per shape of the partial
        keys relative to the run's end (:meth:`_mask_tail`): the steps of a growing cache
        whose partial keys keep their place relative to the last key (causal, a window, a
        gap ``q - k >= c``) slice one buffer instead of building a mask."""
        rows = self._row_intervals(q_off, L, 0)
        if rows is None or not all(rows):
            return None
        if not all(len(r) == 1 for r in rows):     # a row's touching intervals: one
            rows = [r if len(r) == 1 else _merge_closed(r) for r in rows]
        if all(len(r) == 1 for r in rows):         # one interval per row: no interval lists
            ivs = sorted([r[0] for r in rows])
            a, top = ivs[0]
            for lo, hi in ivs:
                if lo > top + 1:
                    return None                     # a gap: two runs
                if hi > top:
                    top = hi
            z, n = top + 1, top + 1 - a
            inner_lo, inner_hi = ivs[-1][0], min([hi for _, hi in ivs])  # seen by every row
            part = [(a, z)] if inner_lo > inner_hi else \
                [x for x in ((a, inner_lo), (inner_hi + 1, z)) if x[0] < x[1]]
            mask = None
            if part:
                p0 = part[0][0]
                if (z - p0) * len(rows) > MASK_TAIL_CELLS:
                    return None
                tail = tuple([(((lo if lo > p0 else p0) - z, hi - z),) if hi >= p0 else ()
                              for (lo, hi), in rows])
                mask = self._mask_tail(tail, z - p0).narrow(-1, self.bucket - n, n)
            seg = _Segment(((a, z),), n, mask, _overlap([(a, z)], part) < n, None, None)
            return _Step(((0, self.B, (seg,)),), (a, z, mask))
        else:
            runs = _merge([(lo, hi + 1) for r in rows for lo, hi in r])
            if len(runs) != 1:
                return None
            (a, z), n = runs[0], runs[0][1] - runs[0][0]
            part = _merge([x for r in rows for x in _subtract([(a, z)], [(lo, hi + 1)
                                                                          for lo, hi in r])])
        mask = None
        if part:
            p0 = part[0][0]
            if (z - p0) * len(rows) > MASK_TAIL_CELLS:
                return None
            # the rows' intervals within [p0, z), relative to z: the buffer's key
            tail = tuple(tuple((max(lo, p0) - z, hi - z) for lo, hi in r if hi >= p0)
                         for r in rows)
            mask = self._mask_tail(tail, z - p0)[..., self.bucket - n:]
        seg = _Segment(((a, z),), n, mask, _overlap([(a, z)], part) < n, None, None)
        return _Step(((0, self.B, (seg,)),), (a, z, mask))

    def _mask_tail(self, tail: tuple, width: int) -> torch.Tensor:
        """The additive mask buffer ``[1, 1, G * Lq, bucket]`` (0 or -inf, the plan's dtype)
        that is 0 except in its last ``width`` columns, where row ``i`` (of each query head
        of a key head) sees the keys of ``tail[i]`` (intervals ``[lo, hi]`` relative to the
        end) and not the others; kept per ``(tail, width)`` (:data:`MASK_BUFFERS` of them)."""
        buf = self._masks.get((tail, width))
        if buf is not None:
            return buf
        G, bk = self.Hq // self.Hk, self.bucket
        ninf = float("-inf")
        block = []
        for ivs in tail:
            row = [ninf] * width
            for lo, hi in ivs:
                row[width + lo:width + hi + 1] = [0.0] * (hi - lo + 1)
            block.append(row)
        buf = torch.zeros((1, 1, G * self.Lq, bk), dtype=self.dtype, device=self.device)
        buf[0, 0, :, bk - width:] = torch.tensor(block * G, dtype=self.dtype,
                                                 device=self.device)
        self._keep_step((tail, width), buf, self._masks, MASK_BUFFERS)
        return buf

    def run_torch(self, q, k, v, lens: tuple, q_shift: int, page_table, page_size: int,
                  scale: float, inputs: dict, need_lse: bool = True):
        """Per group of batch elements (:meth:`cpu_step`): one fused attention call per long
        key run of a contiguous cache (a view, no copy) and one for the other runs copied
        together (or, paged, gathered through the page table), each with the query heads
        of a key head folded into its rows (``[nb, Hk, G * Lq, D]``: K and V are read once
        per key head) and an additive mask only where some key is not allowed to every
        row; the calls' results merged through their log-sum-exps. Returns ``(o, lse)``,
        lse None when not ``need_lse`` and one call of dense SDPA ran the step (the
        kernel SDPA runs, without its log-sum-exp).

        Copies and fills run below ATen's parallel grain (``runtime/cpu_ops.py``): the
        parallel regions of a step are its kernel calls."""
        B, Hq, Lq, D = q.shape
        Hk = self.Hk
        M = Hq // Hk * Lq
        step = self.cpu_step(lens, q_shift, page_size, inputs)
        if step.one is not None and not need_lse and q.is_cpu:
            a, z, mask = step.one               # one call on a view: the kernel SDPA runs
            if a or z != k.shape[2]:
                k, v = k[:, :, a:z], v[:, :, a:z]
            qb = q if M == Lq else q.reshape(B, Hk, M, D)
            o = _sdpa(*_unit_last(qb, k, v), attn_mask=mask, scale=scale)
            return (o if M == Lq else o.view(B, Hq, Lq, D)), None
        groups = step.groups
        outs, lses = [], []
        for b0, b1, segs in groups:
            nb = b1 - b0
            if segs is None:
                outs.append(torch.zeros((nb, Hq, Lq, D), dtype=q.dtype, device=q.device))
                lses.append(torch.full((nb, Hq, Lq), float("-inf"), device=q.device))
                continue
            whole = nb == B
            if isinstance(segs, _HeadGather):
                ob, lb = _attend_heads(q if whole else q[b0:b1], k[b0:b1], v[b0:b1], segs,
                                       scale)
                outs.append(ob)
                lses.append(lb)
                continue
            qb = (q if whole else q[b0:b1]).reshape(nb, Hk, M, D)
            pieces = []
            for s in segs:
                kb, vb = _segment(k, v, s, b0, b1, whole, page_table, self.gathers.get)
                pieces.append(_attend(qb, kb, vb, s, scale))
            ob, lb = pieces[0] if len(pieces) == 1 else \
                _merge_pieces(pieces, finite=all(s.full for s in segs))
            outs.append(ob.view(nb, Hq, Lq, D))
            lses.append(lb.reshape(nb, Hq, Lq))
        if len(outs) == 1:
            return outs[0], lses[0]
        return torch.cat(outs), torch.cat(lses)

    def run_scored_torch(self, q, k, v, lens: tuple, q_shift: int, page_table, page_size: int,
                         scale: float, inputs: dict, tables: dict, need_lse: bool = True):
        """A step of a pattern with a score on the torch backend: per group of batch
        elements of one length (each element alone where the pattern or its score reads
        ``b``), the rows' scores against the keys from the first to the last one some row
        may see (:meth:`_keys`), the score and the mask evaluated there as a call of the
        pattern evaluates them (``ir.score``), the softmax in fp32 (fp64 for fp64 caches);
        the query heads of a key head folded into its rows (K and V read once, not
        expanded); a score that is ``s`` plus a bias, on float32 caches, as one fused
        attention call with the bias and the mask as its additive mask. Returns
        ``(o, lse)``; lse None when not ``need_lse`` and every group's rows see every key
        of their span (one softmax call, no log-sum-exp)."""
        from .scores import _acc
        B, Hq, Lq, D = q.shape
        Hk, Dv = self.Hk, v.shape[-1]
        M = Hq // Hk * Lq
        acc = _acc(q.dtype)
        o = lse = None

        def blank():                                        # rows 0 / -inf
            return (torch.zeros((B, Hq, Lq, Dv), dtype=q.dtype, device=q.device),
                    torch.full((B, Hq, Lq), -math.inf, dtype=acc, device=q.device))
        groups: dict = {}
        for b, L in enumerate(lens):
            groups.setdefault((b, L) if self.per_batch else L, []).append(b)
        every = {**inputs, **tables}
        for idx in groups.values():
            L = lens[idx[0]]
            q_off = L - Lq + q_shift
            runs, part, _ = self._keys(L, q_off, idx[0], inputs)
            if not runs:
                continue                                    # no key: rows stay 0 / -inf
            a, z = runs[0][0], runs[-1][1]
            nb = len(idx)
            # (every element in order where nb == B)
            bi = None if nb == B else torch.tensor(idx, dtype=torch.int64, device=q.device)
            if page_table is None:
                kb = (k if nb == B else k.index_select(0, bi))[:, :, a:z]
                vb = (v if nb == B else v.index_select(0, bi))[:, :, a:z]
            else:           # pools [num_pages, page_size, Hk, D]: the keys a..z-1 gathered
                pos = torch.arange(a, z, device=q.device)
                pages = (page_table if bi is None else page_table.index_select(0, bi))[
                    :, pos // page_size].to(torch.int64)
                kb = k[pages, pos % page_size].transpose(1, 2)
                vb = v[pages, pos % page_size].transpose(1, 2)
            qb = (q if nb == B else q.index_select(0, bi)).reshape(nb, Hk, M, D)

            def env_mask():                     # (called within this group's iteration)
                return self._env_mask(L, q_off, a, z, runs, part, bi, nb, inputs)
            if self.additive and q.dtype == torch.float32:
                # s + bias: the bias (the score at s = 0) and the mask as one additive mask
                # of one fused attention call
                f, empty = self._additive_mask((tuple(idx), L, q_off, a, z), every,
                                               self._bias_fn(env_mask, nb, a, z))
                ob, lb = _kernel(qb, kb, vb, f.view(nb, Hk, M, z - a), scale)
                if empty is not None:
                    ob, lb = ob.masked_fill(empty.unsqueeze(-1), 0.0), \
                        lb.masked_fill(empty, -math.inf)
                ob, lb = ob.reshape(nb, Hq, Lq, Dv), lb.reshape(nb, Hq, Lq)
            else:
                env, m = env_mask()
                ob, lb = self._score_rows(qb, kb, vb, env, m, every, scale,
                                          not need_lse and nb == B)
            if nb == B:
                o, lse = ob.to(q.dtype), lb
                continue
            if o is None:
                o, lse = blank()
            o[bi], lse[bi] = ob.to(q.dtype), lb
        return (o, lse) if o is not None else blank()       # (blank: no row sees a key)

    def _env_mask(self, L: int, q_off: int, a: int, z: int, runs, part, bi, nb: int,
                  inputs: dict):
        """``(env, m)`` of a scored step's group over the keys ``[a, z)`` of a cache of ``L``
        keys (its batch elements ``bi``, None for the whole batch): the score's variables
        (``ir.score.score_env``) and the pattern there as bool (None where every row sees
        every key of the one run)."""
        from ..ir.score import score_env
        dev = self.device
        env = score_env(self.Lq, L, num_heads=self.Hq, batch=nb, q_offset=q_off, device=dev,
                        cols=(a, z))
        env["b"] = (torch.arange(self.B, device=dev) if bi is None else bi) \
            .view(-1, 1, 1, 1)                              # the group's own batch elements
        m = None if len(runs) == 1 and not part else torch.as_tensor(
            evaluate(self.pattern.ir, env, inputs), device=dev).to(torch.bool)
        return env, m

    def _bias_fn(self, env_mask, nb: int, a: int, z: int):
        """The ``make`` of :meth:`_additive_mask`: the bias (the additive score at ``s = 0``)
        ``[nb, Hq, Lq, z - a]`` and the mask of ``env_mask()``."""
        from ..ir.score import score_values
        from .scores import _acc

        def bias(every):
            env, m = env_mask()
            zero = torch.zeros((nb, self.Hq, self.Lq, z - a), dtype=_acc(self.dtype),
                               device=self.device)
            return score_values(self.pattern.score, zero, env, every), m
        return bias

    def _score_rows(self, qb, kb, vb, env, m, every: dict, scale: float, no_lse: bool):
        """A group's rows with any score: ``(o [nb, Hq, Lq, Dv], lse [nb, Hq, Lq] or None)``
        of ``qb [nb, Hk, G * Lq, D]`` against ``kb``, ``vb [nb, Hk, n, D]``, the score
        evaluated over ``env`` and the mask ``m`` (None: every row sees every key), the
        softmax in fp32 (fp64 for fp64 caches). With ``no_lse`` and no mask on the CPU, one
        softmax call, no lse: unless some row's scores are all -inf (a score that excludes
        pairs) or NaN, where :func:`runtime.scores.softmax_rows` gives 0 / NaN."""
        from ..ir.score import score_values
        from .scores import _acc, softmax_rows
        nb, Hk, M, _ = qb.shape
        Hq, Lq, n, Dv = self.Hq, self.Lq, kb.shape[2], vb.shape[-1]
        acc = _acc(qb.dtype)
        s = torch.matmul(qb.to(acc), kb.to(acc).transpose(-1, -2)) * scale
        s = s.view(nb, Hq, Lq, n)
        f = score_values(self.pattern.score, s, env, every)
        if m is not None:
            f = torch.where(m.expand(s.shape), f,
                            torch.full((), -math.inf, dtype=acc, device=f.device))
        p = lb = None
        if m is None and no_lse and f.is_cpu:
            p = torch.softmax(f, -1)
            if bool(p.sum().isnan()):
                p = None
        if p is None:
            p, lb = softmax_rows(f)
        return torch.matmul(p.view(nb, Hk, M, n), vb.to(acc)).view(nb, Hq, Lq, Dv), lb

    def _row_runs(self, L: int, q_off: int, inputs: dict) -> tuple:
        """``(runs, part)`` of a routed CPU step of ``L`` keys (batch element 0's, which a
        routed step's one group shares): the key runs ``[(a, z), ...]`` and the partial
        ones, from :meth:`_aff1_step` where every row sees every key of one run, else from
        :meth:`_keys`."""
        step = self._aff1_step(L, q_off)
        if step is not None and step.one[2] is None:
            return ((step.one[0], step.one[1]),), ()
        runs, part, _ = self._keys(L, q_off, 0, inputs)
        return runs, part

    def score_env(self, L: int, shift: int, inputs: dict):
        """The step of a routed call of a score that :meth:`scored_fast` does not run (not
        additive, or not float32) on a contiguous CPU cache of ``L`` keys, one group of
        batch elements (:attr:`env_call`), where its rows see every key of one run
        ``[a, z)``: ``(a, z, env)``, the score's variables there (``ir.score.score_env``);
        else None (:meth:`run_scored_torch` runs it). :func:`fast_routed` keeps it in the
        routed entry by ``L``, as :meth:`scored_fast`'s steps."""
        q_off = L - self.Lq + shift
        runs, part = self._row_runs(L, q_off, inputs)
        if len(runs) != 1 or part:
            return None
        (a, z), = runs
        if self._score_scalar:          # (softcap: no position, head, batch or table read)
            return a, z, {"Lq": self.Lq, "Lk": L, "H": self.Hq}
        return a, z, self._env_mask(L, q_off, a, z, ((a, z),), (), None, self.B, inputs)[0]

    def scored_fast(self, L: int, shift: int, inputs: dict, tables: dict, held: list):
        """The one fused attention call of a routed additive step on a contiguous float32
        CPU cache of ``L`` keys (query rows at ``L - Lq + shift``; one group of batch
        elements: ``B = 1`` or a step that does not read ``b``): ``(a, z, f)``, the keys
        ``[a, z)`` and the additive mask ``f [1 or B, Hk, G * Lq, z - a]`` (the bias, and
        ``-inf`` where the pattern excludes a pair), or None where the step has a row
        without keys or no key at all (:meth:`run_scored_torch` then runs it).

        Called by :func:`fast_routed`, which keeps the result in the routed entry
        (:class:`_RoutedEntry`) by ``L``: its tables and inputs are the same objects at the
        same versions at every call that reads it, and ``shift`` is the entry's. Where the
        score reads the positions only as ``q - k`` (:attr:`shift_free`) and the rows see
        every key of one run, the mask is a slice of one buffer, the bias at the bucket's
        last rows ``[1, Hk, G * Lq, bucket]`` (built once per entry, held in ``held[0]``):
        the column of key ``k`` at a step of ``L`` keys is ``k + bucket - L - shift``, so a
        new length evaluates no score. Else the plan's :meth:`_additive_mask` builds it."""
        Lq, Hk, Hq = self.Lq, self.Hk, self.Hq
        q_off = L - Lq + shift
        runs, part = self._row_runs(L, q_off, inputs)
        if not runs:
            return None
        a, z = runs[0][0], runs[-1][1]
        if self.shift_free and len(runs) == 1 and not part:
            buf = held[0]
            if buf is None:
                buf = held[0] = self._shift_bias({**inputs, **tables})
            c = self.bucket - L - shift
            if buf is not False and a + c >= 0 and z + c <= self.bucket:
                return a, z, buf[..., a + c:z + c]
        nb = self.B
        env_mask = lambda: self._env_mask(L, q_off, a, z, runs, part, None, nb,  # noqa: E731
                                          inputs)
        f, empty = self._additive_mask((tuple(range(nb)), L, q_off, a, z),
                                       {**inputs, **tables}, self._bias_fn(env_mask, nb, a, z))
        if empty is not None:
            return None
        return a, z, f.view(nb, Hk, Hq // Hk * Lq, z - a)

    def _shift_bias(self, every: dict):
        """The bias of a :attr:`shift_free` score at the rows ``bucket - Lq .. bucket - 1``
        against every key below the bucket, ``[1, Hk, G * Lq, bucket]`` float32
        (:meth:`scored_fast`); False where it would hold more than ``16 x``
        :data:`MASK_TAIL_CELLS` cells, holds a ``-inf`` (a row might have no key: the
        general step finds it) or cannot be evaluated there (a list indexed out of range
        at pairs no step reads)."""
        from ..ir.score import score_env, score_values
        Lq, Hq, n = self.Lq, self.Hq, self.bucket
        if Hq * Lq * n > 16 * MASK_TAIL_CELLS:
            return False
        env = score_env(Lq, n, num_heads=Hq, batch=1, q_offset=n - Lq, device=self.device)
        zero = torch.zeros((1, Hq, Lq, n), dtype=torch.float32, device=self.device)
        try:
            f = score_values(self.pattern.score, zero, env, every).contiguous()
        except SpattnError:
            return False
        if bool((f == -math.inf).any()):
            return False
        return f.view(1, self.Hk, Hq // self.Hk * Lq, n)

    def _additive_mask(self, key: tuple, every: dict, make):
        """``(f, empty)`` of an additive score's step on the torch backend: ``f [nb, Hq, Lq,
        n]`` the bias plus ``-inf`` where the mask excludes a pair (``make(every)`` gives the
        bias and the mask or None), ``empty [nb, Hk, G * Lq]`` the rows with no key (None
        where every row has one). Kept for
        the last :data:`MASK_BUFFERS` steps of at most :data:`MASK_TAIL_CELLS` x 16 cells
        each, by ``key`` (the batch elements, the length, the query offset, the keys'
        span) and the identity and version of every input and table (held, so that no
        other tensor takes their identity): the layers of a model's token repeat the step
        with the same tables, and all but the first read it back."""
        tabs = tuple((n, t, data_version(t)) for n, t in sorted(every.items()))
        with self._steps_lock:          # (the routed entry reaches it from any thread)
            hit = self._bias_memo.get(key)
            if hit is not None and len(hit[0]) == len(tabs) and all(
                    n == n0 and t is t0 and v == v0
                    for (n, t, v), (n0, t0, v0) in zip(tabs, hit[0])):
                self._bias_memo.move_to_end(key)
                return hit[1], hit[2]
        f, m = make(every)
        if m is not None:
            f = torch.where(m.expand(f.shape), f, torch.full((), -math.inf, dtype=f.dtype,
                                                             device=f.device))
        else:
            f = f.contiguous()
        nb, Hq, Lq = f.shape[:3]
        empty = (f.amax(-1) == -math.inf).view(nb, self.Hk, Hq // self.Hk * Lq)
        if not bool(empty.any()):
            empty = None
        if f.numel() <= 16 * MASK_TAIL_CELLS:
            with self._steps_lock:
                self._bias_memo[key] = (tabs, f, empty)
                while len(self._bias_memo) > MASK_BUFFERS:
                    self._bias_memo.popitem(last=False)
        return f, empty

    def _keys(self, L: int, q_off: int, b: int, inputs: dict):
        """``(runs, part, m_part)``: the key runs ``[a, z)`` some row may see (sorted,
        disjoint), the runs within them where not every row sees every key, and the pattern
        there as bool ``[1 or Hq, Lq, n_part]`` (None when ``part`` is empty)."""
        Lq, Hq = self.Lq, self.Hq
        cf = self.closed_form
        runs = full = None
        if cf is not None and "h" not in self.uses:
            try:
                if self._rows_fn is not None:
                    vals = self._rows_fn(q_off, q_off + Lq - 1, Lq, L, Hq, b)
                else:
                    env = {"qs": q_off, "qe": q_off + Lq - 1, "Lq": Lq, "Lk": L, "H": Hq,
                           "b": b}
                    vals = []
                    for iv in cf.rows:
                        both = iv.flo is not None and iv.fhi is not None
                        vals += [None if x is None else evaluate(x, env) for x in
                                 (iv.lo, iv.hi, iv.flo if both else None,
                                  iv.fhi if both else None)]
                runs, full = [], []
                for i in range(0, len(vals), 4):
                    lo, hi, flo, fhi = vals[i:i + 4]
                    lo = 0 if lo is None else max(0, int(lo))
                    hi = L - 1 if hi is None else min(L - 1, int(hi))
                    if hi >= lo:
                        runs.append((lo, hi + 1))
                    if flo is not None:
                        flo, fhi = max(0, int(flo)), min(L - 1, int(fhi))
                        if fhi >= flo:
                            full.append((flo, fhi + 1))
                runs, full = _merge(runs), _merge(full)
            except (TypeError, ValueError, KeyError):
                runs = full = None
        if runs is None:                     # the predicate over all keys: O(Lq * L)
            m = self._predicate(torch.arange(L, device=self.device), q_off, L, b, inputs)
            runs = _runs(m.any(0).any(0))
            if not runs:
                return [], [], None
            m = m[..., _positions(runs, self.device)]
            return (runs, [], None) if bool(m.all()) else (runs, runs, m)
        part = _subtract(runs, full)
        if not part:
            return runs, [], None
        pos = _positions(part, self.device)
        rows = self._row_intervals(q_off, L, b)
        if rows is None:
            m = self._predicate(pos, q_off, L, b, inputs)
        else:                   # [1, Lq, n_part]: one comparison against the rows' bounds
            width = max(1, max(len(r) for r in rows))
            pad = [(1, 0)] * width
            bounds = torch.tensor([(r + pad)[:width] for r in rows], dtype=torch.int64,
                                  device=self.device)                 # [Lq, width, 2]
            m = ((pos >= bounds[..., :1]) & (pos <= bounds[..., 1:])).any(1).unsqueeze(0)
        return (runs, [], None) if bool(m.all()) else (runs, part, m)

    def _keys_batch(self, L: int, q_off: int, inputs: dict):
        """:meth:`_keys` of every batch element at one length where it evaluates the
        predicate over all keys: one evaluation for the batch (``b`` a tensor) and one read
        on the host. ``[(b, b + 1, (runs, part, m_part))]``."""
        m = self._predicate(torch.arange(L, device=self.device), q_off, L,
                            torch.arange(self.B, device=self.device).view(-1, 1, 1, 1),
                            inputs, batched=True)           # [B or 1, Hq or 1, Lq, L]
        seen, every = m.any(1).any(1), m.all(1).all(1)      # [B or 1, L]
        f = seen.to(torch.int8)
        zero = f.new_zeros((f.shape[0], 1))
        d = torch.diff(f, dim=-1, prepend=zero, append=zero)
        edges = torch.nonzero(d).tolist()                   # (b, position), row-major
        signs = d[d != 0].tolist()
        partial = (seen & ~every).any(-1).tolist()
        runs = [[] for _ in range(f.shape[0])]
        for (b, x), sign in zip(edges, signs):
            if sign > 0:
                runs[b].append([x, None])
            else:
                runs[b][-1][1] = x
        out = []
        for b in range(self.B):
            i = b if m.shape[0] > 1 else 0
            r = [tuple(x) for x in runs[i]]
            if not r:
                out.append((b, b + 1, ([], [], None)))
            elif not partial[i]:
                out.append((b, b + 1, (r, [], None)))
            else:
                out.append((b, b + 1, (r, r, m[i][..., _positions(r, self.device)])))
        return out

    def _row_intervals(self, q_off: int, L: int, b: int):
        """Per decode row, its allowed keys as closed intervals ``[lo, hi]`` within
        ``[0, L)``: the closed form evaluated at the row alone (``qs = qe``), where each
        interval's FULL part is the whole interval (then the row sees exactly these keys).
        None where some is not (the predicate decides those keys) or the host cannot
        evaluate a bound."""
        if self._row_forms is not None:
            return self._rows_affine(q_off, L)
        return self._rows_host(q_off, L, b)

    def _rows_host(self, q_off: int, L: int, b: int):
        """:meth:`_row_intervals` through the host function, one call per row."""
        fn, Lq, Hq = self._rows_fn, self.Lq, self.Hq
        if fn is None:
            return None
        rows = []
        try:
            for p in range(q_off, q_off + Lq):
                ivs = _exact_intervals(fn(p, p, Lq, L, Hq, b), L)
                if ivs is None:
                    return None
                rows.append(ivs)
        except (TypeError, ValueError, KeyError):
            return None
        return rows

    def _rows_affine(self, q_off: int, L: int):
        """:meth:`_row_intervals` from the bounds' row forms (``_row_forms``): each bound's
        values at all rows at once (int ranges), then the clamps to ``[0, L)`` and the
        exactness test of :func:`_exact_intervals` per row, on Python ints only."""
        Lq, top = self.Lq, L - 1
        rows = [[] for _ in range(Lq)]
        zeros, tops = [0] * Lq, [top] * Lq
        for lo, hi, flo, fhi in self._row_forms:
            los = zeros if lo is None else [x if x > 0 else 0
                                            for x in _form_values(lo, q_off, L, Lq)]
            his = tops if hi is None else [x if x < top else top
                                           for x in _form_values(hi, q_off, L, Lq)]
            if flo is None:
                if any(h >= a for a, h in zip(los, his)):
                    return None             # keys without a FULL part: not exact
                continue
            flos = [x if x > 0 else 0 for x in _form_values(flo, q_off, L, Lq)]
            fhis = [x if x < top else top for x in _form_values(fhi, q_off, L, Lq)]
            for r, a, h, fa, fh in zip(rows, los, his, flos, fhis):
                if h >= a:
                    if fa != a or fh != h:
                        return None
                    r.append((a, h))
        return rows

    def _predicate(self, keys, q_off: int, L: int, b, inputs: dict, batched: bool = False):
        """The pattern at the decode rows and ``keys``: bool ``[1 or Hq, Lq, n]`` for batch
        element ``b``; ``batched``: ``b`` the batch ids ``[B, 1, 1, 1]``, the result
        ``[B or 1, 1 or Hq, Lq, n]``."""
        Lq, Hq, dev = self.Lq, self.Hq, self.device
        env = {"q": (torch.arange(Lq, device=dev) + q_off).view(1, 1, Lq, 1),
               "k": keys.view(1, 1, 1, -1),
               "h": torch.arange(Hq, device=dev).view(1, Hq, 1, 1),
               "b": b if batched else torch.full((1, 1, 1, 1), b, dtype=torch.int64,
                                                 device=dev),
               "Lq": Lq, "Lk": L, "H": Hq}
        m = torch.as_tensor(evaluate(self.pattern.ir, env, inputs), device=dev).to(torch.bool)
        while m.dim() < 4:
            m = m.unsqueeze(0)
        heads = Hq if m.shape[1] > 1 else 1
        if batched:
            return m.expand(m.shape[0], heads, Lq, keys.numel())
        return m[0].expand(heads, Lq, keys.numel())


class _Step(NamedTuple):
    """What a CPU step runs (:meth:`DecodePlan.cpu_step`): ``groups``, one
    ``(b0, b1, segments)`` per group of batch elements (``segments`` None: no row of the
    group sees a key), and ``one``, ``(a, z, mask)`` when the step is one kernel call on the
    keys ``[a, z)`` of every batch element of a contiguous cache and no row is empty (else
    None); ``grown``, ``(rel, cap, a0, z0)`` for a step that reads a kept mask buffer
    (:meth:`DecodePlan._grown_step`), from which the next position's step follows
    (:meth:`DecodePlan._next_grown`)."""

    groups: tuple
    one: Optional[tuple]
    grown: Optional[tuple] = None


class _HeadGather(NamedTuple):
    """A one-row CPU step that reads, for each query head, only the keys it may see:
    ``idx[h]`` their positions (int64, those every head sees first)."""

    idx: tuple


def _attend_heads(q, k, v, g: _HeadGather, scale: float):
    """``(o [nb, Hq, 1, D], lse [nb, Hq, 1])`` of a :class:`_HeadGather` step: per query
    head one kernel call on its gathered keys of its key head; a head with no key gets 0
    and ``-inf``."""
    nb, Hq, _, D = q.shape
    G = Hq // k.shape[1]
    o = torch.zeros((nb, Hq, 1, D), dtype=q.dtype, device=q.device)
    lse = torch.full((nb, Hq, 1), float("-inf"), dtype=torch.float32, device=q.device)
    for h, ix in enumerate(g.idx):
        if ix.numel() == 0:
            continue
        kb = torch.empty((nb, 1, ix.numel(), D), dtype=k.dtype, device=k.device)
        vb = torch.empty_like(kb)
        for b in range(nb):             # [L, D] rows: the contiguous gather's fast path
            torch.index_select(k[b, h // G], 0, ix, out=kb[b, 0])
            torch.index_select(v[b, h // G], 0, ix, out=vb[b, 0])
        o[:, h:h + 1], lse[:, h:h + 1] = _kernel(q[:, h:h + 1], kb, vb, None, scale)
    return o, lse


class _RoutedEntry(NamedTuple):
    """What a routed call's full path checked (``DecodePlan.fast_routed``, read by
    :func:`fast_routed`): the call's signature (q's shape, dtype and device, the cache's
    batch, heads and head dim, the scale as given), the scale's value, the inputs and
    tables as given and their versions, the plan's int64 copies of the inputs, the largest
    capacity their bounds were checked at, whether Triton ran interpreted (None on the
    torch backend, which runs the same either way), the score's tables, what the CPU steps
    of a score keep (the inputs and tables are the entry's at every call that reads them):
    ``steps``, by cache length, :meth:`DecodePlan.scored_fast`'s or
    :meth:`DecodePlan.score_env`'s step (the last :data:`MASK_BUFFERS`; False: the full
    step), and ``bias``, ``[the buffer of DecodePlan._shift_bias]`` (None until built), and
    ``at``: ``(cache length, q_offset)`` of a call with a ``q_offset`` (its checks hold
    there only), else None."""

    sig: tuple
    value: float
    given: tuple
    versions: tuple
    ins: dict
    cap: int
    interpreted: bool
    tables: dict
    steps: dict
    bias: list
    at: Optional[tuple]


class _Segment(NamedTuple):
    """One kernel call of a CPU step: the key runs it reads, their number ``width``, the
    additive mask ``[1, Hk or 1, G * Lq, width]`` (None: every row sees every key), whether
    some key is seen by every row (``full``: no row is empty), the rows that see none
    (bool ``[1, Hk or 1, G * Lq]``, None when there are none), for a paged cache the page
    index and slot of each key (``gather``), and for a contiguous cache's keys in more than
    :data:`COPY_RUNS` runs their positions (``index``: one gather instead of a copy per
    run)."""

    runs: tuple
    width: int
    mask: Optional[torch.Tensor]
    full: bool
    empty: Optional[torch.Tensor]
    gather: Optional[tuple]
    index: Optional[torch.Tensor] = None


def _segment(k, v, s: _Segment, b0: int, b1: int, whole: bool, page_table, out=None):
    """K and V of the segment ``s`` ``[nb, Hk, width, D]``: a view of one run of a
    contiguous cache, the runs copied (below the grain) or gathered through their index
    (into ``out(shape, dtype)``'s two tensors, if given), or gathered from the pages."""
    if s.gather is not None:
        pidx, slot = s.gather
        phys = page_table[b0].to(torch.int64)[pidx].clamp_(0, k.shape[0] - 1)
        return (k[phys, slot].permute(1, 0, 2).unsqueeze(0),     # [1, Hk, n, D]
                v[phys, slot].permute(1, 0, 2).unsqueeze(0))
    if len(s.runs) == 1:
        a, z = s.runs[0]
        if whole and a == 0 and z == k.shape[2]:
            return k, v
        return k[b0:b1, :, a:z], v[b0:b1, :, a:z]
    shape = (b1 - b0, k.shape[1], s.width, k.shape[3])
    if s.index is not None:
        kb, vb = out(shape, k.dtype) if out is not None and k.is_cpu else (None, None)
        return _gather_keys(k, s.index, b0, b1, kb), _gather_keys(v, s.index, b0, b1, vb)
    kb = torch.empty(shape, dtype=k.dtype, device=k.device)
    vb = torch.empty(shape, dtype=v.dtype, device=v.device)
    at = 0
    for a, z in s.runs:
        _copy_(kb[:, :, at:at + z - a], k[b0:b1, :, a:z])
        _copy_(vb[:, :, at:at + z - a], v[b0:b1, :, a:z])
        at += z - a
    return kb, vb


def _gather_keys(x, index, b0: int, b1: int, out=None):
    """``x[b0:b1, :, index]`` ``[nb, Hk, n, D]`` (written to ``out`` if given): one
    ``index_select`` where each head's share is small (its call costs more than its rows),
    else one per batch element and head over ``[L, D]`` rows (ATen's contiguous-row gather,
    faster on large shares)."""
    if out is None:
        out = torch.empty((b1 - b0, x.shape[1], index.numel(), x.shape[3]), dtype=x.dtype,
                          device=x.device)
    if index.numel() * x.shape[3] < GATHER_ONE_CALL:
        return torch.index_select(x[b0:b1], 2, index, out=out)
    for b in range(b0, b1):
        for h in range(x.shape[1]):
            torch.index_select(x[b, h], 0, index, out=out[b - b0, h])
    return out


def _unit_last(q, k, v):
    """q, k, v with unit stride along D (ATen's CPU flash kernel reads the last dim as
    contiguous whatever its stride)."""
    if q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1:
        return q, k, v
    from .torch_backend import _unit_last as unit_last
    return unit_last(q, k, v)


def _kernel(qb, kb, vb, mask, scale: float):
    """One fused attention call with an additive ``mask`` (or None): ATen's CPU flash
    kernel on CPU tensors, else the torch backend's; ``(o, lse)``, lse float32."""
    if qb.is_cpu and _FLASH_CPU is not None:
        return _FLASH_CPU(*_unit_last(qb, kb, vb), 0.0, False, attn_mask=mask, scale=scale)
    from .torch_backend import _attend as attend
    ob, lb = attend(qb, kb, vb, mask, scale, False)
    return ob, lb.to(torch.float32)


def _attend(qb, kb, vb, s: _Segment, scale: float):
    """One kernel call: ``(o [nb, Hk, G * Lq, D], lse [nb, Hk, G * Lq])`` (lse float32),
    with o 0 and lse ``-inf`` for the rows that see no key of the segment."""
    ob, lb = _kernel(qb, kb, vb, s.mask, scale)
    if s.empty is not None:
        ob = ob.masked_fill(s.empty.unsqueeze(-1), 0.0)
        lb = lb.masked_fill(s.empty, float("-inf"))
    return ob, lb


def _positions(runs, device) -> torch.Tensor:
    """The key positions of ``runs`` in their order, int64 ``[n]`` (a few tensor operations
    whatever the number of runs)."""
    if len(runs) == 1:
        return torch.arange(runs[0][0], runs[0][1], device=device)
    if isinstance(runs, _RunList) and runs.pos is not None:
        return runs.pos
    flat = np.fromiter(itertools.chain.from_iterable(runs), dtype=np.int64,
                       count=2 * len(runs))
    t = torch.from_numpy(flat).to(device).view(-1, 2)
    lens = t[:, 1] - t[:, 0]
    shift = t[:, 0] - (torch.cumsum(lens, 0) - lens)
    return torch.arange(int(lens.sum()), device=device) + torch.repeat_interleave(shift, lens)


def _columns(order, runs, device) -> torch.Tensor:
    """The columns of the keys of ``runs`` (each within a run of ``order``) among the keys
    of ``order`` laid side by side, int64 ``[n]``."""
    if list(runs) == list(order):
        return torch.arange(sum(z - a for a, z in runs), device=device)
    at = _positions(order, device)
    lo = min(a for a, _ in order)
    col = torch.empty(max(z for _, z in order) - lo, dtype=torch.int64, device=device)
    col[at - lo] = torch.arange(at.numel(), device=device)
    return col[_positions(runs, device) - lo]


def _subtract(runs, full):
    """``runs`` minus the ``full`` runs, as runs (sorted; one sweep over both)."""
    out, cut, j = [], _merge(full), 0
    for a, z in sorted(runs):
        while j < len(cut) and cut[j][1] <= a:
            j += 1
        i = j
        while a < z:
            if i == len(cut) or cut[i][0] >= z:
                out.append((a, z))
                break
            if cut[i][0] > a:
                out.append((a, cut[i][0]))
            a = max(a, cut[i][1])
            i += 1
    return out


def _overlap(runs, other) -> int:
    """The number of positions in both ``runs`` and ``other`` (each disjoint; one sweep)."""
    if not runs or not other:
        return 0
    xs, ys = sorted(runs), sorted(other)
    i = j = n = 0
    while i < len(xs) and j < len(ys):
        (a, z), (oa, oz) = xs[i], ys[j]
        n += max(0, min(z, oz) - max(a, oa))
        if z <= oz:
            i += 1
        else:
            j += 1
    return n


def _merge_pieces(pieces, finite: bool = False):
    """Attention over the union of disjoint key sets from each set's ``(o, lse)``: weights
    ``exp(lse_i - max)``; a row no set saw a key for stays 0 with lse ``-inf``. ``finite``:
    every row saw a key of every set (every lse is finite: fewer operations)."""
    if finite and len(pieces) == 2:     # o = o2 + w (o1 - o2), w = sigmoid(lse1 - lse2)
        (o1, l1), (o2, l2) = pieces
        w = torch.sigmoid(l1 - l2).unsqueeze_(-1)
        lse = torch.logaddexp(l1, l2)
        if o1.dtype == torch.float32:
            return torch.lerp(o2, o1, w), lse
        return torch.lerp(o2.float(), o1.float(), w).to(o1.dtype), lse
    if finite:
        lse = pieces[0][1]
        for _, lb in pieces[1:]:
            lse = torch.logaddexp(lse, lb)
        o = None
        for ob, lb in pieces:
            w = torch.exp(lb - lse).unsqueeze(-1)
            o = ob * w if o is None else o.addcmul_(ob, w)
        return o.to(pieces[0][0].dtype), lse
    lse = torch.stack([lb for _, lb in pieces])
    m = lse.amax(0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m)
    tot = w.sum(0)
    o = sum(wi.unsqueeze(-1) * ob.to(torch.float32) for wi, (ob, _) in zip(w, pieces))
    o = o / torch.where(tot > 0, tot, torch.ones_like(tot)).unsqueeze(-1)
    out_lse = torch.where(tot > 0, m + torch.log(torch.where(tot > 0, tot, torch.ones_like(tot))),
                          torch.full_like(tot, float("-inf")))
    return o.to(pieces[0][0].dtype), out_lse


def _merge_closed(ivs):
    """Closed intervals ``[lo, hi]`` merged where they overlap or touch, sorted
    (:func:`_merge` on the runs ``[lo, hi + 1)``)."""
    return [(a, z - 1) for a, z in _merge([(lo, hi + 1) for lo, hi in ivs])]


def _launch(bound: dict, kernel, grid, args: tuple, free: int, meta: dict) -> None:
    """Launch ``kernel`` on ``grid``: through the launch ``bound`` keeps for the arguments'
    :func:`_launch_spec` (``free``: its last ints that are ``do_not_specialize``), else
    through Triton's JIT, whose compiled kernel is then bound for that spec (CUDA; at most
    :data:`BOUND_LAUNCHES` specs)."""
    cuda = args[0].is_cuda
    key = _launch_spec(args, free) if cuda else None
    launch = bound.get(key)
    if launch is None or not launch(*args):
        if not cuda:
            with launch_guard("cpu"):
                kernel[grid](*args, **meta)
            return
        from .triton_backend import BoundLaunch, assembler_quiet
        with assembler_quiet():
            compiled = kernel[grid](*args, **meta)
        if len(bound) < BOUND_LAUNCHES:
            bound[key] = BoundLaunch.of(kernel, compiled, grid, args, meta, args[0].device,
                                        len(args))


def _launch_spec(args: tuple, free: int) -> tuple:
    """What Triton's JIT specialises a launch of ``args`` on (``native_specialize_impl``'s
    rules, written out: a tensor's dtype and 16-byte alignment, an int's width, its
    divisibility by 16 and equality to 1; the last ``free`` ints are ``do_not_specialize``,
    their width only): a launch bound for one spec serves every later one of that spec."""
    out = []
    n = len(args) - free
    for i, a in enumerate(args):
        t = type(a)
        if t is int:
            wide = not -0x80000000 <= a <= 0x7fffffff
            out.append(wide if i >= n else (2 if a == 1 else a % 16 == 0) + 4 * wide)
        elif isinstance(a, torch.Tensor):
            out.append((a.dtype, a.data_ptr() % 16 == 0))
        else:
            out.append(t)
    return tuple(out)


def _merge(runs):
    """Runs ``[a, z)`` merged where they overlap or touch, sorted."""
    out = []
    for a, z in sorted(runs):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], z))
        else:
            out.append((a, z))
    return out


class _RunList(list):
    """The runs of a bool tensor (:func:`_runs`), which keeps their positions
    (``nonzero``: :func:`_positions` in one operation)."""

    __slots__ = ("pos",)


def _runs(flags: torch.Tensor):
    """Runs ``[a, z)`` of True in a 1-D bool tensor."""
    f = flags.to(torch.int8)
    d = torch.diff(f, prepend=f.new_zeros(1), append=f.new_zeros(1))
    edges = torch.nonzero(d).flatten().tolist()     # a start, its end, the next start...
    out = _RunList(zip(edges[::2], edges[1::2]))
    out.pos = torch.nonzero(flags).flatten() if len(out) > COPY_RUNS else None
    return out


def _kernel_closed_form(pattern):
    """The closed form the decode kernel computes its key ranges from: the pattern's own,
    else (``ir.ranges.closed_form_with_loads``) one whose bounds read runtime inputs at
    uniform indices, one element per program (``k >= first[b]``: a left padding's tiles
    skipped, the FULL ones without the predicate); None (the ``scan`` strategy) without
    either."""
    from ..codegen.config import get_closed_form, ranges_ok
    from ..ir.ranges import closed_form_with_loads
    cf = get_closed_form(pattern)
    if cf is None and pattern.inputs:
        try:
            cf = closed_form_with_loads(pattern)
        except Exception:       # the analysis failing leaves the scan strategy
            cf = None
    return cf if cf is not None and ranges_ok(cf) else None


def _grows_by_one(cf) -> bool:
    """Whether the closed form ``cf`` gives a query row the keys ``[lo, q + c]``, one
    interval that is exact (its FULL part is itself) with a ``lo`` that reads none of the
    row's position and the lengths (``first[b]``, a constant) and an end a constant away
    from the row: then the row one position on sees the same keys and the next one."""
    from ..ir.nodes import free_vars
    if cf is None or len(cf.rows) != 1:
        return False
    iv = cf.rows[0]
    if iv.lo is None or iv.hi is None or iv.flo != iv.lo or iv.fhi is None \
            or free_vars(iv.lo) & {"qs", "qe", "Lq", "Lk"}:
        return False
    end = _row_end(iv.hi)
    return end is not None and end == _row_end(iv.fhi)


def _row_end(x) -> Optional[int]:
    """``c`` where the expression ``x`` is the row's position plus ``c`` (``qs`` and ``qe``
    are one position in a one-row step), else None."""
    from ..ir.nodes import Sum, Var
    if isinstance(x, Var):
        return 0 if x.name in ("qs", "qe") else None
    if isinstance(x, Sum) and len(x.terms) == 1:
        (t, coeff), = x.terms
        if isinstance(t, Var) and t.name in ("qs", "qe") and coeff == 1:
            return x.const
    return None


def _closed_form_at(pattern, inputs: dict):
    """The closed form of ``pattern`` at the values of its runtime ``inputs`` (int64), where
    it loads them only at uniform indices, as ``first[b]`` (``ir.inputs.loads_as_lists``),
    else None. A CPU plan holds its inputs' values for its lifetime (plans are keyed by
    their inputs' identity and version), so its steps can build from the rows' intervals
    instead of evaluating the pattern over every key."""
    from ..codegen.config import ranges_ok
    from ..ir.inputs import loads_as_lists
    from ..ir.ranges import closed_form
    spec = loads_as_lists(pattern.ir, inputs)
    if spec is None:
        return None
    try:
        cf = closed_form(spec)
    except Exception:       # the analysis failing leaves the predicate's build
        return None
    return cf if cf is not None and ranges_ok(cf) else None


def _shift_free(node) -> bool:
    """Whether an expression reads the positions only as ``q - k``: every ``q`` and ``k``
    is a term of an affine sum whose coefficients of ``q`` and ``k`` cancel, and ``Lk`` is
    not read. Its value is then the same at ``(q + t, k + t)`` for any ``t``."""
    from ..ir.nodes import Sum, Var
    if isinstance(node, Var):
        return node.name not in ("q", "k", "Lk")
    if isinstance(node, Sum):
        c = 0
        for t, w in node.terms:
            if isinstance(t, Var) and t.name in ("q", "k"):
                c += w
            elif not _shift_free(t):
                return False
        return c == 0
    return all(_shift_free(x) for x in node.children())


def _variables(ir) -> frozenset:
    """The variable names an IR mentions."""
    from ..ir.nodes import free_vars
    return free_vars(ir)


def _tables_in_range(pattern, inputs: dict, tables: dict, Lq: int, Lk: int, q_offset: int,
                     B: int, Hq: int) -> bool:
    """Whether every index of the score's table loads is in range for tables of these
    shapes over a call's positions (``runtime.scores.check_score_bounds``)."""
    from .scores import check_score_bounds
    try:
        check_score_bounds(pattern, inputs, tables, Lq, Lk, num_heads=Hq, batch=B,
                           q_offset=q_offset)
    except SpattnError:
        return False
    return True


class GatherBuffers:
    """The buffers CPU steps write gathered K and V to: one per thread (at most
    :data:`GATHER_THREADS`), grown as needed up to :data:`GATHER_KEEP_BYTES`. A buffer fresh
    from the allocator costs its page faults on every call (glibc maps and unmaps large
    blocks), as much as the gather itself; a kept one is written in place. A step's
    gathered keys are read by its kernel call before the call returns, so one buffer per
    thread serves every plan."""

    def __init__(self):
        self._bufs: dict = {}
        self._lock = threading.Lock()

    def get(self, shape: tuple, dtype) -> tuple:
        """Two ``shape`` CPU tensors of ``dtype`` (K's and V's), views of this thread's
        buffer, or new ones past :data:`GATHER_KEEP_BYTES`."""
        n = math.prod(shape)
        if 2 * n * dtype.itemsize > GATHER_KEEP_BYTES:
            return torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
        tid = threading.get_ident()
        buf = self._bufs.get(tid)
        if buf is None or buf.dtype != dtype or buf.numel() < 2 * n:
            room = min(2 * n * 5 // 4, GATHER_KEEP_BYTES // dtype.itemsize)  # a growing cache
            buf = torch.empty(max(room, 2 * n), dtype=dtype)
            with self._lock:
                self._bufs.pop(tid, None)
                while len(self._bufs) >= GATHER_THREADS:
                    self._bufs.pop(next(iter(self._bufs)))
                self._bufs[tid] = buf
        return buf[:n].view(shape), buf[n:2 * n].view(shape)


class DecodePlanCache:
    """A bounded, thread-safe LRU of decode plans keyed by what a plan depends on: the
    pattern, the backend, B, Hq, Hk, Lq, D, dtype, device, the length bucket, paged or not,
    the runtime inputs (identity, version) and whether Triton runs interpreted."""

    def __init__(self, size: int = DECODE_PLANS_SIZE):
        self.size = size
        self._plans: OrderedDict = OrderedDict()
        self._held: dict = {}
        #: ``id(pattern) -> (pattern, plan)``: the plan whose repeated step the pattern's
        #: next CPU call may take without a lookup (:func:`fast_step`); entries leave with
        #: their plan.
        self._last: dict = {}
        #: ``(id, version, device) -> (input, its int64 copy)``: :meth:`int64`'s copies.
        self._int64: OrderedDict = OrderedDict()
        #: Where its plans' CPU steps gather K and V.
        self.gathers = GatherBuffers()
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._plans)

    def clear(self):
        with self._lock:
            self._plans.clear()
            self._held.clear()
            self._last.clear()
            self._int64.clear()
            self.gathers = GatherBuffers()

    def remember(self, pattern, plan) -> None:
        """Make ``plan`` the one :func:`fast_step` tries first for ``pattern`` (a plan of
        this cache; at most :attr:`size` patterns are remembered)."""
        hit = self._last.get(id(pattern))
        if hit is not None and hit[1] is plan:
            return
        with self._lock:
            if not any(p is plan for p in self._plans.values()):
                return                  # evicted meanwhile, or built during a graph capture
            self._last.pop(id(pattern), None)
            self._last[id(pattern)] = (pattern, plan)
            while len(self._last) > self.size:
                self._last.pop(next(iter(self._last)))

    def int64(self, inputs: dict, device) -> dict:
        """The runtime inputs as the int64 tensors on ``device`` that plans and steps read,
        each input converted once while it is unchanged (same object, same version): a
        bool padding mask or an int32 table keeps one copy, so the calls that pass it (the
        layers of a model at one step) find one plan, which is keyed by the copy."""
        out = {}
        for name, t in inputs.items():
            if t.dtype == torch.int64 and t.device == device:
                out[name] = t
                continue
            key = (id(t), data_version(t), device)
            hit = self._int64.get(key)
            if hit is None or hit[0] is not t:
                hit = (t, t.to(device=device, dtype=torch.int64))
                with self._lock:
                    self._int64[key] = hit
                    while len(self._int64) > INT64_COPIES:
                        self._int64.popitem(last=False)
            out[name] = hit[1]
        return out

    def get(self, pattern, backend, q, Hk, bucket_len, paged, inputs, num_splits=None,
            tables=None):
        B, Hq, Lq, D = q.shape
        # a score's tables by name, shape and dtype (a new table every step reuses the plan)
        scored = () if getattr(pattern, "score", None) is None else (
            tuple(sorted(pattern.score_inputs.items())),
            tuple((n, tuple(t.shape), t.dtype) for n, t in sorted((tables or {}).items())))
        key = (pattern.source, scored,
               tuple(sorted(pattern.inputs.items())) if pattern.inputs else (),
               backend, B, Hq, Hk, Lq, D, q.dtype, "cpu" if q.is_cpu else q.device,
               bucket_len, paged,
               backend == "triton" and _api._interpret(), num_splits,
               tuple((n, id(t), data_version(t), tuple(t.shape))
                     for n, t in sorted(inputs.items()))
               if inputs else ())
        plan = self._plans.get(key)
        if plan is not None:
            try:                    # one atomic step under the GIL; a concurrent eviction
                self._plans.move_to_end(key)        # may have taken the entry meanwhile
            except KeyError:
                pass
            return plan
        plan = DecodePlan(pattern, backend, B=B, Hq=Hq, Hk=Hk, Lq=Lq, D=D, dtype=q.dtype,
                          device=q.device, bucket_len=bucket_len, paged=paged, inputs=inputs,
                          num_splits=num_splits, tables=tables, gathers=self.gathers)
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return plan
        with self._lock:
            self._plans[key] = plan
            self._held[key] = inputs          # the inputs' ids stay valid while the entry lives
            while len(self._plans) > self.size:
                old, gone = self._plans.popitem(last=False)
                self._held.pop(old, None)
                for pid in [i for i, (_, p) in self._last.items() if p is gone]:
                    del self._last[pid]
        return plan


#: The decode plans of calls (see :class:`DecodePlanCache`).
DECODE_PLANS = DecodePlanCache()
#: Its fast entries per pattern (:func:`fast_step`'s first read; the dict is never replaced).
_LAST = DECODE_PLANS._last


# ------------------------------------------------------------------ kernel files

def split_count(groups: int, keys: int, sms: int | None) -> int:
    """The splits of the keys of a Triton decode plan: about two programs per SM over the
    ``groups`` (``B * Hq / PACK``) programs of one split, at least :data:`SPLIT_KEYS` of the
    ``keys`` the rows visit (in whole tiles) per split, at most 128, rounded down to a power
    of two (the combine's constexpr); ``sms`` None (no CUDA device, the interpreter): 4
    splits of at least 64 keys (four of its 16-key tiles). About four programs per SM, what
    rounding up gives, was the slowest of the four counts timed for the default tiles on an
    H200 at every shape but the shortest (B = 1, 8K keys; docs/decode.md, "Launch
    configuration")."""
    want = 4 if sms is None else max(1, -(-2 * sms // groups))
    n = min(want, max(1, keys // (64 if sms is None else SPLIT_KEYS)), 128)
    return 1 << (n.bit_length() - 1)


#: The fewest keys a decode split runs (two 128-key tiles): short rows (a window of 4096 at
#: B = 1) keep enough programs to hide the latency of their few loads.
SPLIT_KEYS = 256


def default_config(closed_form, head_dim: int, dtype, interpret: bool, *,
                   scored: bool = False, fast_tanh: Optional[bool] = None,
                   device_type: str = "cuda") -> DecodeConfig:
    """The decode module's configuration: ``ranges`` with a closed form, else ``scan``;
    on the GPU for 16-bit caches 128-key tiles with 2 stages up to D = 128, 4 warps:
    decode streams K and V, and these read them at the rate dense SDPA does
    (``benchmarks/decode_sweep.py``, bf16, docs/decode.md); fp32 caches (twice the bytes
    per key: two stages of 128-key K and V tiles would need 256 KiB of shared memory at
    D = 128) 64-key tiles with 3 stages; 32-key tiles with 3 stages beyond D = 128
    (shared memory); 16-key tiles under the interpreter. ``scored``: the pattern has a
    score, whose tables' indices the kernel clamps into range and whose tanh is one
    ``tanh.approx.f32`` where ``fast_tanh`` (None: for 16-bit caches on CUDA; never under
    the interpreter), as in the forward."""
    from ..codegen.config import dtype_name
    block_d = max(16, 1 << (int(head_dim) - 1).bit_length())
    if interpret:
        block_n, warps, stages = 16, 4, 1
    elif block_d > 128:
        block_n, warps, stages = 32, 4, 3
    elif dtype_name(dtype) == "fp32":
        block_n, warps, stages = 64, 4, 3
    else:
        block_n, warps, stages = 128, 4, 2
    strategy = "ranges" if closed_form is not None else "scan"
    flags = {}
    if scored:
        if fast_tanh is None:
            fast_tanh = device_type == "cuda" and dtype_name(dtype) in ("bf16", "fp16")
        flags = {"score_index": "clamp", "fast_tanh": bool(fast_tanh) and not interpret}
    return DecodeConfig(strategy, block_n, block_d, warps, stages, dtype_name(dtype), **flags)


def _entry(pattern, config: DecodeConfig, closed_form, device):
    """``(file name, key, render)`` of the decode module of ``pattern`` for ``config``."""
    from ..codegen.kernels import CODEGEN_VERSION, render_decode
    from . import cache
    parts = [pattern.source, repr(sorted(pattern.inputs.items())), "decode", CODEGEN_VERSION,
             repr(sorted(config.as_dict().items())), cache._cf_text(closed_form),
             cache._triton_version(), cache.device_tag(device)]
    if getattr(pattern, "score", None) is not None:
        parts.append(repr(sorted(pattern.score_inputs.items())))
    key = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]
    name = cache.file_name(pattern, "decode", key)
    return name, key, lambda: render_decode(pattern, config, key, closed_form)


def load_module(pattern, config: DecodeConfig, closed_form, device):
    """The decode module of ``pattern`` for ``config`` (rendered, cached on disk like the
    other kernels: ``attn_decode_<name>_<hash16>.py``, and imported once per process)."""
    from . import cache
    return cache.load_generated(*_entry(pattern, config, closed_form, device))


def kernel_text(pattern, *, head_dim: int = 128, dtype="bf16", device=None,
                interpret: bool = False) -> tuple[str, str]:
    """``(file name, text)`` of the decode module of ``pattern`` (header line included), as
    a decode step on ``device`` would generate it (GPU defaults unless ``interpret``)."""
    from .cache import HEADER_PREFIX, _digest
    cf = _kernel_closed_form(pattern)
    config = default_config(cf, head_dim, dtype, interpret,
                            scored=getattr(pattern, "score", None) is not None,
                            device_type="cuda" if device is None else torch.device(device).type)
    name, key, render = _entry(pattern, config, cf, device)
    body = render()
    return name, f"{HEADER_PREFIX}key={key} sha256={_digest(body)}\n{body}"


# ------------------------------------------------------------------ the repeated CPU step

def _signature(q, k, scale, routed: bool, has_lens: bool) -> tuple:
    """What a CPU call must share with the call that made its plan's fast entry
    (:func:`fast_step`): q's shape and dtype, the batch, heads and head dim of the cache
    (not its length: any length of the plan's bucket), the ``scale`` as given, the entry (a
    routed call or :func:`decode`), whether ``seq_lens`` is given, and :data:`VIEW_BYTES`
    (part of the memo's key)."""
    ks = k.shape
    return (q.shape, ks[0], ks[1], ks[3], q.dtype, scale, routed, has_lens, VIEW_BYTES)


#: Whether dynamo traces the caller: it folds this to True (tracers that run the Python
#: eagerly pass tensor subclasses, which :func:`fast_step` refuses by type).
_is_dynamo_compiling = torch.compiler.is_dynamo_compiling
_TENSOR, _STRIDED = torch.Tensor, torch.strided
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor   # (_remembered: never traced)
_any_autocast = torch._C._is_any_autocast_enabled
_transforms_active = torch._C._are_functorch_transforms_active


def _remembered(pattern, q, k, v):
    """The plan :data:`DECODE_PLANS` remembers for ``pattern`` (its fast entries' plan),
    or None: under tracing, or for q, k, v not all of the exact type ``torch.Tensor``."""
    if _is_dynamo_compiling():      # first: torch.compile traces none of the rest
        return None
    hit = _LAST.get(id(pattern))
    if hit is None or hit[0] is not pattern:
        return None
    T = _TENSOR
    if type(q) is not T or type(k) is not T or type(v) is not T:
        return None     # subclasses (and the fake tensors of other tracers) take the full path
    if _wrapped(q) or _wrapped(k) or _wrapped(v):
        return None     # a torch.func transform's tensors: the full path (runtime/transforms)
    return hit[1]


def fast_step(pattern, q, k, v, scale=None, seq_lens=None, routed: bool = True,
              describe: bool = False):
    """The output of a CPU step of a plan that served a call like this one, or None.

    A call of a contiguous cache on the torch backend on the CPU (no runtime inputs, no
    ``q_offset``, no ``return_lse``) leaves a fast entry in its plan (``DecodePlan.fast``:
    the call's :func:`_signature`) and the plan with :data:`DECODE_PLANS`, per pattern. A
    later call of the same pattern with the same signature, on strided CPU tensors of the
    exact type ``torch.Tensor`` and one dtype, v shaped like k, none requiring grad, not
    traced, with autocast, forward-mode AD and torch.func transforms off, whose cache
    length lies in the plan's bucket (routed: at least :data:`ROUTE_MIN_LK` and
    ``4 * Lq``) and whose ``seq_lens`` (an integer CPU tensor ``[B]``) lie in ``[Lq, L]``,
    passes every check of the full path (:func:`_step`) for the same reasons; it runs the
    plan's step for its lengths (:meth:`DecodePlan.cpu_step`, built on a miss, through
    :meth:`DecodePlan._row1_step` where that applies) without them: one public SDPA call
    on a view when the step is one call (any strides), else :meth:`DecodePlan.run_torch`.
    Anything else returns None and takes the full path, which checks everything and says
    what is wrong (so ``Pattern.__call__`` tries this first, before its own autocast and
    dual-tensor handling).

    The checks are written out in this one frame: the previous step's kernel streams the
    whole cache through the caches, so this code runs from cold caches, and every function
    call and attribute read costs a miss (docs/decode.md, "The fast entry").

    ``describe``: run nothing; return the step's one kernel call as :func:`one_call`
    describes it, or None where the step is not one call."""
    if _is_dynamo_compiling():      # first: torch.compile traces none of the rest
        return None
    hit = _LAST.get(id(pattern))
    if hit is None or hit[0] is not pattern:
        return None
    plan = hit[1]
    fast = plan.fast
    T = _TENSOR
    if fast is None or type(q) is not T or type(k) is not T or type(v) is not T \
            or _any_autocast() or _transforms_active() or _fwad._current_level >= 0 \
            or _wrapped(q) or _wrapped(k) or _wrapped(v):
        return None     # subclasses, tracers' and transforms' tensors: the full path
    sig, value, grouped = fast
    try:
        ks = k.shape
        dt = q.dtype
        if (q.shape, ks[0], ks[1], ks[3], dt, scale, routed, seq_lens is not None,
                VIEW_BYTES) != sig or v.shape != ks:
            return None         # (the tuple of _signature, written out: the hot path)
    except (RuntimeError, IndexError):
        return None             # nested tensors have no sizes
    S = _STRIDED
    if k.dtype is not dt or v.dtype is not dt or not (q.is_cpu and k.is_cpu and v.is_cpu) \
            or q.layout is not S or k.layout is not S or v.layout is not S \
            or q.requires_grad or k.requires_grad or v.requires_grad \
            or (not q.is_contiguous() and _overlapping(q)):
        return None             # (an overlapping q is copied by the full path)
    L, bk, Lq = ks[2], plan.bucket, sig[0][2]
    if L > bk or (L <= bk >> 1 and bk > MIN_BUCKET) or L < Lq:
        return None                                     # another bucket: another plan
    B = ks[0]
    if seq_lens is None:
        if routed and (L < ROUTE_MIN_LK or L < 4 * Lq):
            return None
        lens = None
        last = plan._last_step                          # the step of every key, length L
        if last[0] == L and last[1] == VIEW_BYTES:
            step = last[2]
        else:
            lens = (L,) * B
            step = _fast_build(plan, lens, L, Lq, True)
            if step is None:
                return None
            plan._last_step = (L, VIEW_BYTES, step)
    else:
        if type(seq_lens) is not _TENSOR or not seq_lens.is_cpu or seq_lens.shape != (B,) \
                or seq_lens.dtype not in _INT_DTYPES:
            return None
        lens = tuple(seq_lens.tolist())
        if min(lens) < Lq or max(lens) > L:
            return None                                 # the full path says what is wrong
        step = _fast_build(plan, lens, L, Lq, False)
        if step is None:
            return None
    if step.one is None:
        if describe:
            return None
        return plan.run_torch(q, k, v, (L,) * B if lens is None else lens, 0, None, 0,
                              1.0 / math.sqrt(ks[3]) if value is None else value, {},
                              False)[0]
    a, z, mask = step.one
    if describe:
        return a, z, mask, value
    if a or z != L:
        k, v = k[:, :, a:z], v[:, :, a:z]
    if grouped is None:
        return _sdpa(q, k, v, mask) if value is None else _sdpa(q, k, v, mask, scale=value)
    o = _sdpa(q.reshape(grouped), k, v, mask) if value is None else \
        _sdpa(q.reshape(grouped), k, v, mask, scale=value)
    return o.view(q.shape)


def fast_routed(pattern, q, k, v, scale=None, inputs=None, q_offset=None,
                describe: bool = False):
    """The output of a routed decode step (``pat(q, k, v, **inputs)``) that repeats the
    call that made its plan's entry (``DecodePlan.fast_routed``: Triton plans, and torch
    plans of calls with runtime inputs or a score, which :func:`fast_step` does not take),
    or None.

    The entry holds what the full path (:func:`_step`) checked: q's shape, dtype and device,
    k's batch, heads and head dim, the scale as given and its value, the runtime inputs and
    a score's tables as given (identity and version: the plan's converted copies stand for
    them; a score's entry only where its tables are in range over the bucket), the
    largest capacity their bounds were checked at and whether Triton ran interpreted. A
    call of exact ``torch.Tensor`` s on that device, none requiring grad, not traced, v
    shaped like k, whose cache lies in the plan's bucket, within the checked capacity, and
    routes (at least :data:`ROUTE_MIN_LK` and ``4 * Lq`` keys) passes every check of the
    full path for the same reasons: the plan's step runs without them (on Triton its two
    launches). A call with a ``q_offset`` repeats one of the same ``q_offset`` and cache
    length (the layers of a token over a static cache). Anything else returns None (the
    full path). ``describe``: run nothing; return the step's one kernel call as
    :func:`one_call` describes it (torch plans without a score, CPU tensors), or None."""
    plan = _remembered(pattern, q, k, v)
    fast = None if plan is None else plan.fast_routed
    if fast is None:
        return None
    sig, value, given, versions, ins, cap_ok, interpreted, tables, steps, held, at = fast
    if q_offset is not None and (at is None or type(q_offset) is not int
                                 or q_offset != at[1]):
        return None
    try:
        ks = k.shape
        dt, dev = q.dtype, q.device
        if (q.shape, ks[0], ks[1], ks[3], dt, dev, scale) != sig or v.shape != ks:
            return None
    except (RuntimeError, IndexError):
        return None
    if k.dtype is not dt or v.dtype is not dt or k.device != dev or v.device != dev \
            or q.layout is not _STRIDED or k.layout is not _STRIDED \
            or v.layout is not _STRIDED or q.requires_grad or k.requires_grad \
            or v.requires_grad:
        return None
    L, bk, Lq = ks[2], plan.bucket, sig[0][2]
    if L > cap_ok or L > bk or (L <= bk >> 1 and bk > MIN_BUCKET) or L < ROUTE_MIN_LK \
            or L < 4 * Lq or (at is not None and (q_offset is None or L != at[0])):
        return None
    if len(inputs or ()) != len(given) or (interpreted is not None
                                           and _api._interpret() != interpreted):
        return None
    grad = torch.is_grad_enabled()
    for (name, t), v0 in zip(given, versions):
        x = inputs.get(name)
        if x is not t or (x._version if type(v0) is int else data_version(x)) != v0 \
                or (grad and x.requires_grad):
            return None             # (a score's table that requires grad: the score path)
    shift = 0 if at is None else at[1] - (L - Lq)
    if describe:
        if plan.backend != "torch" or plan.scored or not q.is_cpu:
            return None
        one = plan.cpu_step((L,) * ks[0], shift, 0, ins).one
        return None if one is None else (*one, value)
    if plan.backend == "triton":
        return plan.run_triton(q, k, v, lk=L, q_shift=shift, seq_lens=None, page_table=None,
                               page_size=0, num_pages=0, scale=value, inputs=ins,
                               tables=tables)[0]
    if plan.scored:
        if plan.one_call:
            hit = steps.get(L)
            if hit is None:             # (False: the step is not one call)
                hit = plan.scored_fast(L, shift, ins, tables, held) or False
                if not hit or hit[2].numel() <= 16 * MASK_TAIL_CELLS:
                    plan._keep_step(L, hit, steps, MASK_BUFFERS)
            if hit:
                a, z, mask = hit
                if a or z != L:
                    k, v = k[:, :, a:z], v[:, :, a:z]
                if sig[0][1] == ks[1]:
                    return _sdpa(q, k, v, mask, scale=value)
                B, Hk = ks[0], ks[1]
                return _sdpa(q.reshape(B, Hk, mask.shape[2], ks[3]), k, v, mask,
                             scale=value).view(q.shape)
        elif plan.env_call:
            hit = steps.get(L)
            if hit is None:
                hit = plan.score_env(L, shift, ins)
                hit = (*hit, {**ins, **tables}) if hit else False
                plan._keep_step(L, hit, steps, MASK_BUFFERS)
            if hit:
                a, z, env, every = hit
                if a or z != L:
                    k, v = k[:, :, a:z], v[:, :, a:z]
                B, Hk = ks[0], ks[1]
                qb = q.reshape(B, Hk, sig[0][1] // Hk * Lq, ks[3])
                return plan._score_rows(qb, k, v, env, None, every, value, True)[0].to(dt)
        return plan.run_scored_torch(q, k, v, (L,) * ks[0], shift, None, 0, value, ins,
                                     tables, need_lse=False)[0]
    return plan.run_torch(q, k, v, (L,) * ks[0], shift, None, 0, value, ins, False)[0]


def one_call(pattern, q, k, v, scale=None, inputs=None, q_offset=None):
    """The one kernel call that a call ``pattern(q, k, v, scale=scale, q_offset=q_offset,
    **inputs)`` like the last one its decode plan served makes on the CPU, or None: ``(a,
    z, mask, scale)``, where the call's output is ``scaled_dot_product_attention(q', k[:, :,
    a:z], v[:, :, a:z], attn_mask=mask, scale=scale)`` with ``q'`` q's query heads of a key
    head folded into its rows (``[B, Hk, Hq // Hk * Lq, D]``; the output read back as
    ``[B, Hq, Lq, D]``). The same checks as the call's fast entries (:func:`fast_step`,
    :func:`fast_routed`) decide, so the description holds for a call that passes them with
    tensors of the same shapes, dtype and device and the same inputs (identity and
    version); ``mask`` (an additive mask or None) stays as it is. A caller that repeats
    such calls (the layers of one forward of a transformers model,
    ``spattn.integrations.transformers``) can make that call itself."""
    if not inputs and q_offset is None:
        one = fast_step(pattern, q, k, v, scale, describe=True)
        if one is not None:
            return one
    return fast_routed(pattern, q, k, v, scale, inputs or {}, q_offset, describe=True)


def _fast_build(plan, lens: tuple, L: int, Lq: int, whole: bool):
    """The step of :func:`fast_step` at the lengths ``lens`` (a cache of ``L`` keys; every
    key of it when ``whole``): from the plan's memo, else built (:meth:`DecodePlan._aff1_step`,
    then :meth:`DecodePlan._row1_step`, then :meth:`DecodePlan.cpu_step`) and kept there;
    None where the build refuses (the full path says why)."""
    key = (lens, 0, 0, VIEW_BYTES)
    step = plan._steps.get(key)
    if step is not None:
        return step
    try:
        if whole:
            step = plan._aff1_step(L, L - Lq)
            if step is None:
                step = plan._row1_step(L)
        if step is None:
            return plan.cpu_step(lens, 0, 0, {})
        plan._keep_step(key, step)
        return step
    except SpattnError:
        return None


#: The integer dtypes ``seq_lens`` may have.
_INT_DTYPES = frozenset({torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8})


# ------------------------------------------------------------------ the entry points

def routes(q, k, v, q_offset=None) -> bool:
    """Whether ``Pattern.__call__`` (without a plan) takes the decode path: ``Lq <= 16``,
    ``Lk >= 256`` and ``Lk >= 4 * Lq``, a ``q_offset`` (if given) within ``2**29`` of the
    bottom-right one, nothing requires grad (with grad enabled), not under
    ``torch.compile``."""
    if torch.compiler.is_compiling() or not _api._valid(q, k, v):
        return False            # the normal path says what is wrong
    Lq, Lk = q.shape[2], k.shape[2]
    if not (Lq <= MAX_DECODE_Q and ROUTE_MIN_LK <= Lk < MAX_CAPACITY // 2 and Lk >= 4 * Lq):
        return False
    if q_offset is not None and (not isinstance(q_offset, int) or isinstance(q_offset, bool)
                                 or abs(q_offset - (Lk - Lq)) >= MAX_CAPACITY // 2):
        return False
    return not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                             or v.requires_grad))


def call_routed(pattern, q, k, v, *, scale, return_lse, q_offset, inputs):
    """``Pattern.__call__`` on the decode path (same arguments and results), or None where
    the decode path refuses the call (the normal path then runs it, or says what is wrong
    in its own words)."""
    try:
        return _step(pattern, q, k, v, None, None, scale, q_offset, return_lse, True, None,
                     inputs or {}, True)
    except SpattnError:
        return None


def routed_plan(pattern, q, k, v, *, scale, q_offset, inputs):
    """The decode plan ``Pattern.__call__`` runs these tensors with (:func:`routes` held),
    or None where it takes the normal path (:func:`call_routed` refuses)."""
    try:
        return _step(pattern, q, k, v, None, None, scale, q_offset, False, True, None,
                     inputs or {}, True, plan_only=True)
    except SpattnError:
        return None


def decode(pattern, q, k_cache, v_cache, *, seq_lens=None, page_table=None, scale=None,
           q_offset=None, return_lse=False, check=True, num_splits=None, **inputs):
    """One decode step of ``pattern``: ``o [B, Hq, Lq, D]`` (and ``lse [B, Hq, Lq]`` fp32).

    See the module docstring for the cache layouts. ``check``: read ``seq_lens`` and the
    used entries of ``page_table`` on the host and refuse values out of range (one device
    synchronisation); with ``check=False`` (CUDA graphs) the kernel clamps lengths to
    ``[Lq, capacity]`` and page numbers to the pools instead. ``num_splits``: the splits of
    the keys (tests; default: enough programs to fill the device).
    """
    index = _api.other_device(q)
    if index is not None:       # Triton launches on the current device: make it q's
        with torch.cuda.device(index):
            return decode(pattern, q, k_cache, v_cache, seq_lens=seq_lens,
                          page_table=page_table, scale=scale, q_offset=q_offset,
                          return_lse=return_lse, check=check, num_splits=num_splits, **inputs)
    if not inputs and page_table is None and q_offset is None and not return_lse \
            and num_splits is None:
        o = fast_step(pattern, q, k_cache, v_cache, scale, seq_lens, False)
        if o is not None:
            return o
    check_flags(return_lse=return_lse, check=check)
    if inputs:
        for name, why in _CALL_ONLY.items():
            if name in inputs and name not in pattern.inputs:
                raise SpattnParamError(f"decode takes no {name}= (a keyword of a call, "
                                       f"pat(q, k, v, {name}=...)): {why}")
    return _step(pattern, q, k_cache, v_cache, seq_lens, page_table, scale, q_offset,
                 return_lse, check, num_splits, inputs, False)


#: Keywords of ``pat(q, k, v)`` that :func:`decode` does not take, and why (no runtime input
#: has these names: ``dsl.resolve.CALL_KEYWORDS``).
_CALL_ONLY = {
    "layout": "q is [B, Hq, Lq, D] and a contiguous cache [B, Hk, L, D]; pass [B, L, H, D] "
              "tensors as t.transpose(1, 2) (a view)",
    "plan": "decode keeps its own plans, one per length bucket (DECODE_PLANS)",
    "order": "decode runs on the cache's order of keys",
    "deterministic": "decode is inference only (no gradients)",
}


def _step(pattern, q, k_cache, v_cache, seq_lens, page_table, scale, q_offset, return_lse,
          check, num_splits, inputs, routed, plan_only=False):
    """:func:`decode` with its arguments positional (the one hot path of both entries);
    ``routed``: q, k_cache and v_cache passed :func:`routes` (dense, valid, no grad);
    ``plan_only``: the step's checks and its plan, which is returned instead of run."""
    scored = getattr(pattern, "score", None) is not None
    if scored:
        from .scores import _table_divisors
        if _table_divisors(pattern.score):
            raise SpattnParamError("the decode path does not run a score that divides by its "
                                   "tables' values: call the pattern (pat(q, k, v)), which "
                                   "checks those values every call")
    T = torch.Tensor
    if not routed and torch.is_grad_enabled() and (
            (isinstance(q, T) and q.requires_grad) or (isinstance(k_cache, T) and
                                                       k_cache.requires_grad)
            or (isinstance(v_cache, T) and v_cache.requires_grad)):
        raise SpattnInputError("decode is inference only: q, k_cache and v_cache must not "
                               "require grad (run under torch.no_grad(), or call the pattern, "
                               "pat(q, k, v), for gradients)")
    if routed:
        B, Hq, Lq, D = q.shape
        Hk, cap = k_cache.shape[1], k_cache.shape[2]
        page_size = num_pages = 0
    else:
        B, Hq, Hk, Lq, D, cap, page_size, num_pages = _check_layout(q, k_cache, v_cache,
                                                                    page_table)
    paged = page_table is not None
    if paged and seq_lens is None:
        raise SpattnParamError("a paged cache needs seq_lens [B]: the number of keys of each "
                               "sequence")
    if seq_lens is not None and q_offset is not None:
        raise SpattnParamError("q_offset cannot be given with seq_lens: query row i of batch b "
                               "sits at position seq_lens[b] - Lq + i")
    if cap < Lq:
        raise SpattnInputError(f"the cache holds {cap} keys, fewer than the {Lq} query rows")
    if num_splits is not None and (not isinstance(num_splits, int) or isinstance(num_splits, bool)
                                   or not 1 <= num_splits <= MAX_SPLITS):
        raise SpattnParamError(f"num_splits must be None or an int in 1..{MAX_SPLITS}, got "
                               f"{num_splits!r}")
    # a pattern on a grid (spattn.neighborhood) means nothing at other lengths: Lq and every
    # sequence's length must be its cell count, as in a call
    if getattr(pattern, "grid", None) is not None:
        _api.check_grid(pattern, Lq, cap,
                        f"q (shape {tuple(q.shape)}) and the cache (capacity {cap})")
    if seq_lens is not None:
        seq_lens = _check_seq_lens(seq_lens, B, Lq, cap, q.device, check)
    if paged and check:
        _check_pages(page_table, seq_lens, page_size, num_pages)
    scale_arg = scale
    scale = 1.0 / math.sqrt(D) if scale is None else _api._check_scale(scale, D)
    q_shift = 0
    if q_offset is not None:
        q_shift = _api.check_q_offset(q_offset, Lq, cap) - (cap - Lq)
        if abs(q_shift) >= MAX_CAPACITY:
            raise SpattnValueError(f"q_offset={q_offset} puts the queries beyond +-2**30")
    ins, floats = {}, {}
    given = inputs
    if scored:
        from .scores import _split_inputs, validate_score_inputs
        inputs, given_float = _split_inputs(pattern, inputs)
        floats = validate_score_inputs(pattern.score_inputs, given_float, batch=B,
                                       num_heads=Hq, device=q.device)
        if torch.is_grad_enabled() and any(t.requires_grad for t in floats.values()):
            raise SpattnInputError("decode is inference only: the score's tables must not "
                                   "require grad (run under torch.no_grad(), or call the "
                                   "pattern, pat(q, k, v), for their gradients)")
    if inputs or pattern.inputs:
        _api.check_runtime_tensors(inputs)
        ins = DECODE_PLANS.int64(validate_inputs(pattern.inputs, inputs, batch=B, num_heads=Hq,
                                                 convert=_api._as_given), q.device)
    if ins or q_shift:
        _check_positions(pattern, ins, B, Hq, Lq, cap, q_shift)
    backend = pattern.backend
    if backend != "torch":
        backend = _api.choose_backend(backend, q.device.type)
    out_dtype = q.dtype
    if backend == "triton" and q.dtype == torch.bfloat16 and _api._interpret():
        # Triton 3.6's interpreter feeds bf16 bits to numpy's matmul unconverted (wrong
        # products, as triton_backend._upcast says): under it bf16 runs in fp32, cast back
        q, k_cache, v_cache = q.float(), k_cache.float(), v_cache.float()
    bucket_len = MIN_BUCKET if cap <= MIN_BUCKET else 1 << (cap - 1).bit_length()  # bucket()
    plan = DECODE_PLANS.get(pattern, backend, q, Hk, bucket_len, paged, ins, num_splits,
                            floats)
    if not plan.tables_ok and seq_lens is not None and not check and backend == "triton":
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in floats.items())
        raise SpattnValueError(
            f"the score's tables ({shapes}) are not in range at every length up to "
            f"{bucket_len} keys, and check=False reads no seq_lens on the host: give "
            "tables that cover the bucket, or decode with check=True")
    lens = None         # the lengths on the host, for the torch backend or the table check
    if backend != "triton" or not plan.tables_ok:
        lens = (cap,) * B if seq_lens is None else \
            tuple(min(max(int(x), Lq), cap) for x in seq_lens.tolist())
    if not plan.tables_ok:          # the tables' indices checked at this step's lengths
        plan.check_tables(floats, ins, lens, q_shift)
    if plan_only:
        return plan
    if backend == "triton":
        o, lse = plan.run_triton(q, k_cache, v_cache, lk=cap, q_shift=q_shift,
                                 seq_lens=seq_lens, page_table=page_table,
                                 page_size=page_size, num_pages=num_pages, scale=scale,
                                 inputs=ins, tables=floats)
    else:
        if scored:
            o, lse = plan.run_scored_torch(q, k_cache, v_cache, lens, q_shift, page_table,
                                           page_size, scale, ins, floats,
                                           need_lse=return_lse)
        else:
            o, lse = plan.run_torch(q, k_cache, v_cache, lens, q_shift, page_table,
                                    page_size, scale, ins, return_lse)
        if not scored and not return_lse and not ins and not pattern.inputs \
                and q_offset is None \
                and not paged and num_splits is None and q.is_cpu \
                and getattr(pattern, "grid", None) is None \
                and (scale_arg is None or type(scale_arg) is float):
            _keep_fast(pattern, plan, q, k_cache, scale_arg, scale, seq_lens is not None,
                       routed)
    if routed and not return_lse and o.dtype == out_dtype \
            and (backend == "triton" or given or scored or q_offset is not None) \
            and plan.tables_ok and (q_offset is None or type(q_offset) is int) \
            and getattr(pattern, "grid", None) is None \
            and (scale_arg is None or type(scale_arg) is float) \
            and not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        _keep_fast_routed(pattern, plan, q, k_cache, scale_arg, scale, given, ins, cap, floats,
                          None if q_offset is None else (cap, q_offset))
    if o.dtype != out_dtype:
        o = o.to(out_dtype)
    return (o, lse) if return_lse else o


def _keep_fast_routed(pattern, plan, q, k, scale_arg, scale, given, ins, cap, tables, at):
    """Leave the entry :func:`fast_routed` reads in ``plan`` (see there), and the plan with
    :data:`DECODE_PLANS` for the pattern; ``at``: ``(cache length, q_offset)`` of a call
    with a ``q_offset`` (its checks hold at that length and offset only), else None."""
    ks = k.shape
    sig = (q.shape, ks[0], ks[1], ks[3], q.dtype, q.device, scale_arg)
    names = tuple(sorted(given))
    items = tuple((n, given[n]) for n in names)
    versions = tuple(data_version(t) for _, t in items)
    old = plan.fast_routed
    if at is not None:
        pass                            # checked at this length and offset: cap stays
    elif old is not None and old.sig == sig and len(old.given) == len(items) \
            and all(n0 == n and t0 is t for (n0, t0), (n, t) in zip(old.given, items)) \
            and old.versions == versions and old.at is None:     # (tensors by identity)
        cap = max(cap, old.cap)         # the inputs' bounds hold below any capacity checked
    elif ins and cap < plan.bucket:
        try:                            # inputs that cover the bucket cover each step of it
            _check_positions(pattern, ins, plan.B, plan.Hq, plan.Lq, plan.bucket, 0)
            cap = plan.bucket
        except SpattnError:
            pass
    elif not ins:
        cap = plan.bucket
    plan.fast_routed = _RoutedEntry(sig, scale, items, versions, ins, cap,
                                    _api._interpret() if plan.backend == "triton" else None,
                                    tables, {}, [None], at)
    DECODE_PLANS.remember(pattern, plan)


def _keep_fast(pattern, plan, q, k, scale_arg, scale, has_lens, routed):
    """Leave a fast entry in ``plan`` for :func:`fast_step`: the call's :func:`_signature`,
    its scale and the grouped shape of q."""
    sig = _signature(q, k, scale_arg, routed, has_lens)
    if plan.fast is None or plan.fast[0] != sig:
        B, Hq, Lq, D = q.shape
        M = Hq // plan.Hk * Lq
        plan.fast = (sig, None if scale_arg is None else scale,
                     None if M == Lq else (B, plan.Hk, M, D))
    DECODE_PLANS.remember(pattern, plan)
