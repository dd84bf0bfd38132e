"""Block-sparse attention from fused dense calls: the CPU backend (and a CUDA fallback).

Same contract as the Triton launchers (:mod:`spattn.runtime.triton_backend`):

* ``fwd(pattern, q, k, v, *, scale, q_offset, inputs) -> (o, lse)``
* ``bwd(pattern, q, k, v, o, lse, do, *, scale, q_offset, inputs, dlse=None) -> (dq, dk, dv)``

and the same taking a :class:`~spattn.runtime.cpu_plan.CpuPlan` built once per shape
(``make_plan``): ``fwd_planned(plan, q, k, v, *, scale)`` and ``bwd_planned(plan, q, k, v,
o, lse, do, *, scale, dlse=None)``. The runtime's :class:`~spattn.runtime.plan.Plan` holds
one; ``fwd``/``bwd`` without ``plan=`` build one for the call.

How it works. A plan (:mod:`spattn.runtime.cpu_plan`) covers the non-EMPTY tiles of the
attention matrix with a few *calls*, each a batch of equal-shaped items (R query rows of
all heads against W keys). Each call is one fused kernel: on CPU tensors ATen's
flash-attention kernel (``aten::_scaled_dot_product_flash_attention_for_cpu``: tiled
online softmax in float32, float64 for float64, parallel over items and heads, returning
the log-sum-exp), elsewhere an exact matmul-softmax-matmul in torch. The items of a call
reach the kernel as strided views of q, k and v when they are arithmetic (bands: sliding
windows, documents, decode; no copy), else as gathered copies. Rows covered by calls of
several slots get the slots' partial results merged through their log-sum-exps.

The backward runs the kernel's backward on the same items with the *global* output and
log-sum-exp of each row: exactly the full softmax's gradient restricted to those keys.
Query gradients of a row's items add up; key and value gradients of overlapping items are
added in phases of non-overlapping items (or with ``index_add_``), deterministically.
The gradient of the returned lse (``dlse``) enters as ``delta - dlse`` in
``dS = P (dP - delta)``: the kernel computes ``delta = rowsum(dO * O)`` itself, so the
head dim is extended by one column carrying ``-dlse`` in O and 1 in dO (0 in q, k, v).

Bookkeeping (copies, scatters, merges) runs in pieces smaller than ATen's parallel grain,
on the calling thread (:mod:`spattn.runtime.cpu_ops`): on a machine whose cores are busy,
a parallel operation waits for its slowest thread, often a scheduler slice, and a backend
of many such operations would be slow where one kernel call is not.

Fully masked rows give output 0, lse ``-inf`` and zero gradients, never NaN. Inputs may
have any strides. Outputs are dense but not always contiguous: where the kernel's own
output layout already holds the result (a band covering every row), it is returned as a
view of it instead of being copied.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .cpu_ops import GRAIN, add_ as _add_, contiguous as _contiguous, copy_ as _copy_
from .cpu_ops import fill as _fill
from .cpu_plan import BLOCK, CpuPlan, build_plan

__all__ = ["fwd", "bwd", "fwd_planned", "bwd_planned", "make_plan", "BLOCK", "GRAIN"]

_FLASH_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward",
                     None)

#: Score elements per chunk of the generic (non-CPU) primitive: bounds its memory.
_CHUNK_SCORES = 1 << 25

NINF, INF = float("-inf"), float("inf")


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------ the primitive

def _use_flash(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and _FLASH_FWD is not None and _FLASH_BWD is not None


def _unit_last(*ts):
    """The tensors with unit stride along D (ATen's CPU flash kernels read the last dim as
    contiguous whatever its stride: a ``[..., ::2]`` view gave wrong rows)."""
    return tuple(t if t.stride(-1) == 1 or t.shape[-1] == 1 else _contiguous(t) for t in ts)


def _floored(scale: float, q) -> float:
    """The scale, at least float32's smallest normal number below float64, as the Triton
    launcher passes it (docs/codegen.md): a smaller one is 0 in float32, and a masked
    score's ``-inf * 0`` NaN; below that floor every finite score's share of the exponent
    is under ``2**-26``, the same softmax to float32 precision."""
    return scale if q.dtype == torch.float64 else max(scale, torch.finfo(torch.float32).tiny)


def _attend(q, k, v, mask, scale, is_causal):
    """Dense attention of ``q [n, h, M, D]`` over ``k, v [n, h, N, D]`` with an additive
    ``mask`` (``[n, 1 or h, M, N]`` or None): ``(o [n, h, M, D] q.dtype, lse [n, h, M])``.

    ``is_causal``: key j is masked for row i > ... (j > i). A row with no allowed key gets
    o 0 and lse 0 (the caller sets -inf)."""
    scale = _floored(scale, q)
    if _use_flash(q):
        q, k, v = _unit_last(q, k, v)
        return _FLASH_FWD(q, k, v, is_causal=is_causal, attn_mask=mask, scale=scale)
    acc = _accum_dtype(q.dtype)
    M, N = q.shape[2], k.shape[2]
    step = max(1, _CHUNK_SCORES // max(1, q.shape[0] * q.shape[1] * N))
    kt, vt = k.to(acc), v.to(acc)
    outs, lses = [], []
    for r in range(0, M, step):
        s = torch.matmul(q[:, :, r:r + step].to(acc), kt.transpose(-1, -2)) * scale
        s = s + _extra_mask(mask, is_causal, r, s.shape[2], N, s.device, acc)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        l = p.sum(-1, keepdim=True)
        l = torch.where(l > 0, l, torch.ones_like(l))
        outs.append(torch.matmul(p / l, vt).to(q.dtype))
        lses.append((m + torch.log(l)).squeeze(-1))
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _extra_mask(mask, is_causal, r, m, N, device, dtype):
    out = torch.zeros((), dtype=dtype, device=device)
    if mask is not None:                  # (a mask of one row: the same for every row)
        out = out + (mask if mask.shape[2] == 1 else mask[:, :, r:r + m]).to(dtype)
    if is_causal:
        i = torch.arange(r, r + m, device=device).view(-1, 1)
        out = out + torch.where(torch.arange(N, device=device).view(1, -1) > i, NINF, 0.0)
    return out


def _attend_bwd(do, q, k, v, o, lse, mask, scale, is_causal):
    """Gradients ``(dq, dk, dv)`` of :func:`_attend`'s output given each row's ``o`` and
    ``lse`` (those of a larger softmax the item is part of); ``lse`` must be finite or
    ``+inf`` (a row with lse +inf contributes nothing)."""
    scale = _floored(scale, q)
    if _use_flash(q):
        do, q, k, v, o = _unit_last(do, q, k, v, o)
        return _FLASH_BWD(do, q, k, v, o, lse, 0.0, is_causal, attn_mask=mask, scale=scale)
    acc = _accum_dtype(q.dtype)
    M, N = q.shape[2], k.shape[2]
    step = max(1, _CHUNK_SCORES // max(1, q.shape[0] * q.shape[1] * N))
    kt, vt = k.to(acc), v.to(acc)
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for r in range(0, M, step):
        qc, doc = q[:, :, r:r + step].to(acc), do[:, :, r:r + step].to(acc)
        s = torch.matmul(qc, kt.transpose(-1, -2)) * scale
        s = s + _extra_mask(mask, is_causal, r, s.shape[2], N, s.device, acc)
        p = torch.exp(s - lse[:, :, r:r + step, None].to(acc))
        delta = (doc * o[:, :, r:r + step].to(acc)).sum(-1, keepdim=True)
        dv += torch.matmul(p.transpose(-1, -2), doc)
        ds = p * (torch.matmul(doc, vt.transpose(-1, -2)) - delta)
        dq[:, :, r:r + step] = torch.matmul(ds, kt) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qc) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ------------------------------------------------------------------ layouts

def _tm_perm(plan: CpuPlan, nd: int) -> tuple:
    """Permutation of ``[B, H, L, *rest]`` into its token-major order: ``[L, B, H, *rest]``
    when batch elements share items (lanes = B x Hk), else ``[B, L, H, *rest]``."""
    rest = tuple(range(3, nd))
    return (2, 0, 1) + rest if plan.shared else (0, 2, 1) + rest


def _alloc(plan: CpuPlan, H: int, L: int, rest: tuple, dtype, device, fill=None):
    """A ``[B, H, L, *rest]`` tensor stored token-major (the kernel's own layout)."""
    B = plan.B
    shape = ((L, B, H) if plan.shared else (B, L, H)) + rest
    buf = _fill(shape, fill, dtype, device) if fill is not None else \
        torch.empty(shape, dtype=dtype, device=device)
    perm = _tm_perm(plan, 3 + len(rest))
    inv = [perm.index(i) for i in range(len(perm))]
    return buf.permute(*inv)


def _tm(plan: CpuPlan, t: torch.Tensor) -> torch.Tensor:
    """``t [B, H, L, *rest]`` as a token-major 2-D ``[rows, X]`` (rows = positions, or
    batch x positions): a view when the strides allow, else a copy."""
    x = t.permute(*_tm_perm(plan, t.dim()))
    lead = 1 if plan.shared else 2
    rows = 1
    for s in x.shape[:lead]:
        rows *= s
    try:
        return x.view(rows, -1)
    except RuntimeError:
        return _contiguous(x).view(rows, -1)


def _tm_rows(plan: CpuPlan, c, rows: torch.Tensor, L: int) -> torch.Tensor:
    """Token-major row numbers ``[n, R]`` of positions ``rows`` (clamped into ``[0, L)``)."""
    rows = rows.clamp(0, L - 1)
    if plan.shared:
        return rows
    return c.bidx.view(-1, 1) * L + rows


def _gather(tm: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tm[index]`` (rows of a 2-D tensor) in pieces below GRAIN elements."""
    index = index.reshape(-1)
    out = torch.empty((index.numel(), tm.shape[1]), dtype=tm.dtype, device=tm.device)
    step = max(1, (GRAIN - 1) // max(1, tm.shape[1]))
    for s in range(0, index.numel(), step):
        torch.index_select(tm, 0, index[s:s + step], out=out[s:s + step])
    return out


def _scatter(tm: torch.Tensor, index: torch.Tensor, src: torch.Tensor, add: bool) -> None:
    """``tm[index] = src`` (or ``+=``) for rows; ``index`` must not repeat within a call."""
    index = index.reshape(-1)
    step = max(1, (GRAIN - 1) // max(1, tm.shape[1]))
    for s in range(0, index.numel(), step):
        idx, piece = index[s:s + step], src[s:s + step]
        if piece.dtype != tm.dtype:
            piece = piece.to(tm.dtype)
        if add:
            piece = tm.index_select(0, idx).add_(piece)
        tm.index_copy_(0, idx, piece)


# ------------------------------------------------------------------ items

def _lane_strides(plan: CpuPlan, t: torch.Tensor, G: int):
    """Stride of a lane (batch element x key head) in ``t [B, Hk * G, ...]``, or None."""
    if t.shape[0] > 1:
        if not plan.shared or t.stride(0) != plan.Hk * G * t.stride(1):
            return None
    return G * t.stride(1)


def _view(plan: CpuPlan, t: torch.Tensor, start: int, step: int, n: int, R: int, G: int):
    """Items ``[n, lanes, G * R, *rest]`` of ``t [B, Hk * G, L, *rest]`` without a copy:
    item i, lane (b, hk), row (g, r) is ``t[b, hk * G + g, start + i * step + r]``; or None
    when the strides do not allow it."""
    L = t.shape[2]
    st = t.stride()
    if start < 0 or start + (n - 1) * step + R > L or (t.dim() > 3 and st[3] != 1):
        return None
    lane = _lane_strides(plan, t, G)
    if lane is None or (G > 1 and st[1] != R * st[2]):
        return None
    size = (n, plan.lanes, G * R) + tuple(t.shape[3:])
    stride = (step * st[2], lane, st[2]) + tuple(st[3:])
    return t.as_strided(size, stride, t.storage_offset() + start * st[2])


def _batched(plan: CpuPlan, c) -> bool:
    """Whether ``c`` runs with batch elements as the kernel's batch dim (``[B, Hk, M, *]``):
    one item shared by several batch elements (instead of lanes ``[1, B * Hk, M, *]``, so
    that tensors whose batch and head strides do not merge need no copy), or one item per
    batch element over the same rows and keys (``Call.batch_items``: views, not gathers)."""
    return (c.n == 1 and plan.shared and plan.B > 1) or c.batch_items


def _bview(plan: CpuPlan, t: torch.Tensor, start: int, R: int, G: int):
    """``t [B, Hk * G, L, *rest]`` rows ``start .. start + R`` as ``[B, Hk, G * R, *rest]``
    without a copy, or None."""
    st = t.stride()
    if start < 0 or start + R > t.shape[2] or (t.dim() > 3 and st[3] != 1):
        return None
    if G > 1 and st[1] != R * st[2]:
        return None
    size = (plan.B, plan.Hk, G * R) + tuple(t.shape[3:])
    return t.as_strided(size, (st[0], G * st[1], st[2]) + tuple(st[3:]),
                        t.storage_offset() + start * st[2])


def _unbatch(plan: CpuPlan, c, x: torch.Tensor) -> torch.Tensor:
    """A call's result in the lanes layout ``[n, lanes, ...]`` (a view, or a copy in pieces
    when it is in the batched layout with unmergeable strides; batch items are in it)."""
    if not _batched(plan, c) or c.batch_items:
        return x
    if x.stride(0) == plan.Hk * x.stride(1):
        return x.unsqueeze(0).flatten(1, 2)
    out = torch.empty((1, plan.lanes) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
    _copy_(out.view(x.shape), x)
    return out


def _gather_rows(plan: CpuPlan, c, t: torch.Tensor) -> torch.Tensor:
    """Query-side rows of ``c`` gathered from ``t [B, Hq, L, *rest]``: ``[n, lanes, G * R, *rest]``
    (rows past ``L`` read row ``L - 1``)."""
    rest = tuple(t.shape[3:])
    G = plan.G
    x = _gather(_tm(plan, t), _tm_rows(plan, c, c.rows, t.shape[2]))
    x = x.view((c.n, c.R, plan.lanes, G) + rest)                     # token-major items
    if G == 1:
        return x.squeeze(3).transpose(1, 2)
    perm = (0, 2, 3, 1) + tuple(range(4, x.dim()))
    y = torch.empty((c.n, plan.lanes, G, c.R) + rest, dtype=t.dtype, device=t.device)
    return _copy_(y, x.permute(*perm)).flatten(2, 3)


def _own(c, t: torch.Tensor) -> torch.Tensor:
    """``t [B, ...]`` as the call ``c`` views it: batch element ``c.batch0`` alone
    (``[1, ...]``) where its items all belong to it, else the whole batch."""
    return t if c.batch0 is None else t[c.batch0:c.batch0 + 1]


def _put_rows(plan: CpuPlan, c, dst: torch.Tensor, src: torch.Tensor, add: bool = False):
    """Write (or add) ``src [n, lanes, G * R, *rest]`` to the rows of ``c`` in
    ``dst [B, Hq, L, *rest]`` (token-major storage, or any strides on the view path)."""
    src = _unbatch(plan, c, src)
    if c.row_step is not None or c.batch_items:
        v = _bview(plan, dst, c.row0, c.R, plan.G) if c.batch_items else \
            _view(plan, _own(c, dst), c.row0, c.row_step, c.n, c.R, plan.G)
        if v is not None:
            (_add_ if add else _copy_)(v, src)
            return dst
    G = plan.G
    x = src.unflatten(2, (G, c.R))                                    # [n, lanes, G, R, *]
    x = x.permute((0, 3, 1, 2) + tuple(range(4, x.dim())))          # [n, R, lanes, G, *]
    if not x.is_contiguous():
        x = _contiguous(x)
    rows = _tm_rows(plan, c, c.rows.clamp(max=dst.shape[2] - 1), dst.shape[2]).reshape(-1)
    x = x.view(c.n * c.R, -1)
    if c.row_valid is not None:                    # rows owned by another item: not written
        own = c.row_valid.reshape(-1).nonzero().flatten()
        x, rows = _gather(x, own), rows.index_select(0, own)
    _scatter(_tm(plan, dst), rows, x, add)
    return dst


class _Inputs:
    """The tensors of one forward or backward as the calls' items: strided views of the
    caller's tensors where their strides allow; else views of one token-major copy
    (padded with zeros where items reach past the ends), made once per tensor and shared
    by the calls; else (items that are not arithmetic) gathered copies."""

    def __init__(self, plan: CpuPlan):
        self.plan = plan
        self.cache = {}

    def rows(self, c, t: torch.Tensor) -> torch.Tensor:
        """Query-side items ``[n, lanes, G * R, *rest]`` of ``t [B, Hq, L, *rest]`` (batched
        calls: ``[B, Hk, G * R, *rest]``)."""
        if _batched(self.plan, c):
            v = _bview(self.plan, t, c.row0, c.R, self.plan.G)
            if v is not None:
                return v
            return self._rows(c, t) if c.batch_items else \
                self._rows(c, t)[0].unflatten(0, (self.plan.B, -1))
        return self._rows(c, t)

    def keys(self, c, t: torch.Tensor) -> torch.Tensor:
        """Key-side items ``[n, lanes, W, *rest]`` of ``t [B, Hk, Lk, *rest]`` (batched calls:
        ``[B, Hk, W, *rest]``)."""
        if _batched(self.plan, c):
            start = c.col0
            v = _bview(self.plan, t, start, c.W, 1) \
                if c.col_step is not None or c.batch_items else None
            if v is not None:
                return v
            return self._keys(c, t) if c.batch_items else \
                self._keys(c, t)[0].unflatten(0, (self.plan.B, -1))
        return self._keys(c, t)

    def _rows(self, c, t: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        if c.row_step is not None:
            start = c.row0
            v = _view(plan, _own(c, t), start, c.row_step, c.n, c.R, plan.G)
            if v is None and plan.G == 1:
                hi = max(t.shape[2], c.row_end)
                buf = self.cached(("rows", id(t), hi), lambda: self.copy(t, 0, hi))
                v = _view(plan, _own(c, buf), start, c.row_step, c.n, c.R, 1)
            if v is not None:
                return v
        return _gather_rows(plan, c, t)

    def _keys(self, c, t: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        if c.col_step is not None:
            start = c.col0
            v = _view(plan, _own(c, t), start, c.col_step, c.n, c.W, 1)
            if v is not None:
                return v
            lo, hi = self.span()
            buf = self.cached(("keys", id(t)), lambda: self.copy(t, lo, hi))
            return _view(plan, _own(c, buf), start - lo, c.col_step, c.n, c.W, 1)
        tm = self.cached(("tm", id(t)), lambda: _tm(plan, t))
        x = _gather(tm, _tm_rows(plan, c, c.cols, plan.Lk))
        return x.view((c.n, c.W, plan.lanes) + tuple(t.shape[3:])).transpose(1, 2)

    def cached(self, key, make):
        hit = self.cache.get(key)
        if hit is None:
            hit = self.cache[key] = make()
        return hit

    def span(self) -> tuple[int, int]:
        """Key positions ``[lo, hi)`` a padded copy must hold for every arithmetic call."""
        lo, hi = 0, self.plan.Lk
        for d in self.plan.calls:
            if d.col_step is not None:
                lo = min(lo, d.col0)
                hi = max(hi, d.col_end)
        return lo, hi

    def copy(self, t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """``t [B, H, L, *rest]`` as ``[B, H, hi - lo, *rest]`` in token-major storage
        (position p at ``p - lo``), zeros outside ``[0, L)``."""
        B, H, L = t.shape[:3]
        rest = tuple(t.shape[3:])
        buf = _alloc(self.plan, H, hi - lo, rest, t.dtype, t.device)
        for part in (buf[:, :, : -lo], buf[:, :, L - lo:]):
            if part.numel():
                _copy_(part, torch.zeros((), dtype=t.dtype, device=t.device).expand_as(part))
        _copy_(buf[:, :, -lo: L - lo], t)
        return buf


def _tiles_buffer(c, lo: int, hi: int) -> bool:
    """Whether the items of arithmetic ``c`` taken every ``ceil(W / step)``-th (its first
    phase) cover ``[lo, hi)`` exactly, so that copying them fills a key buffer."""
    if c.col_step is None or c.col_step <= 0 or c.W % c.col_step:
        return False
    start = c.col0
    return start == lo and start + (c.n - 1) * c.col_step + c.W == hi


def _add_keys(plan: CpuPlan, c, dst: torch.Tensor, lo: int, src: torch.Tensor,
              first: bool = False):
    """Add key gradients ``src [n, lanes, W, D]`` of ``c`` into ``dst [B, Hk, P, D]``
    (token-major storage; position p at ``p - lo``): in phases of non-overlapping items
    when the items are arithmetic, else item by item; deterministic either way.
    ``first``: ``dst`` is uninitialised and the first phase fills it (``_tiles_buffer``)."""
    src = _unbatch(plan, c, src)
    if c.batch_items:
        v = _bview(plan, dst, c.col0 - lo, c.W, 1)
        if v is not None:
            (_copy_ if first else _add_)(v, src)
            return
    if c.col_step is not None:
        start = c.col0 - lo
        phases = c.n if c.col_step == 0 else min(c.n, -(-c.W // c.col_step))
        parts = [(_view(plan, _own(c, dst), start + p * c.col_step, phases * c.col_step,
                        src[p::phases].shape[0], c.W, 1), src[p::phases])
                 for p in range(phases)]
        if all(v is not None for v, _ in parts):
            if first:                     # phase 0 fills [start, end); zero what follows
                end = start + ((c.n - 1) // phases) * phases * c.col_step + c.W
                tail = dst[:, :, end:]
                if tail.numel():
                    _copy_(tail, torch.zeros((), dtype=dst.dtype, device=dst.device))
            for p, (v, items) in enumerate(parts):
                (_copy_ if first and p == 0 else _add_)(v, items)
            return
    tm = _tm(plan, dst)
    P = dst.shape[2]
    x = src.transpose(1, 2)                                            # [n, W, lanes, D]
    valid = (c.cols >= 0) & (c.cols < plan.Lk)
    rows = _tm_rows(plan, c, c.cols - lo, P)
    if c.col_valid is not None:                    # items own disjoint keys: one scatter
        own = (valid & c.col_valid).reshape(-1).nonzero().flatten()
        x2 = _gather(_contiguous(x).view(c.n * c.W, -1), own)
        _scatter(tm, rows.reshape(-1).index_select(0, own), x2, add=not plan.partition)
        return
    for i in range(c.n):
        keep = valid[i].nonzero().flatten()
        piece = x[i].index_select(0, keep) if keep.numel() < c.W else x[i]
        _scatter(tm, rows[i].index_select(0, keep), _contiguous(piece).view(keep.numel(), -1),
                 add=True)


# ------------------------------------------------------------------ forward

def _repeat_heads(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t [B, H, L, D]`` with each head repeated ``n`` times: ``[B, H * n, L, D]``."""
    B, H = t.shape[:2]
    out = torch.empty((B, H * n) + tuple(t.shape[2:]), dtype=t.dtype, device=t.device)
    _copy_(out.view((B, H, n) + tuple(t.shape[2:])), t.unsqueeze(2).expand(
        (B, H, n) + tuple(t.shape[2:])))
    return out


def fwd_planned(plan: CpuPlan, q, k, v, *, scale: float):
    """Forward of ``plan``: ``o [B, Hq, Lq, D]`` (q's dtype) and ``lse [B, Hq, Lq]``
    (float32; float64 for float64 inputs)."""
    if plan.expand > 1:
        k, v = _repeat_heads(k, plan.expand), _repeat_heads(v, plan.expand)
    Hq, Lq = plan.Hq, plan.Lq
    D = v.shape[-1]
    acc = _accum_dtype(q.dtype)
    ins = _Inputs(plan)
    if plan.covers:
        c = plan.calls[0]
        qin = ins.rows(c, q)
        mask, row_any = c.masks()
        oc, lc = _attend(qin, ins.keys(c, k), ins.keys(c, v), mask, scale, c.is_causal)
        if row_any is not None:
            oc, lc = _no_key_rows(oc, lc, row_any)
        return _out_rows(plan, c, oc, qin, q), _out_rows(plan, c, lc.to(acc), None, None)
    Lp = plan.Lq_pad
    S = max(1, plan.slots)
    odt = acc if S > 1 else q.dtype
    fill = (None, None) if plan.partition else (0.0, NINF)     # else rows may stay unwritten
    obuf = [_alloc(plan, Hq, Lp, (D,), odt, q.device, fill[0]) for _ in range(S)]
    lbuf = [_alloc(plan, Hq, Lp, (), acc, q.device, fill[1]) for _ in range(S)]
    for c in plan.calls:
        mask, row_any = c.masks()
        oc, lc = _attend(ins.rows(c, q), ins.keys(c, k), ins.keys(c, v), mask, scale,
                         c.is_causal)
        if row_any is not None:
            oc, lc = _no_key_rows(oc, lc, row_any)
        _put_rows(plan, c, obuf[c.slot], oc if oc.dtype == odt else oc.to(odt))
        _put_rows(plan, c, lbuf[c.slot], lc.to(acc))
    if S > 1:
        o, lse = _merge(plan, obuf, lbuf)
    else:
        o, lse = obuf[0], lbuf[0]
    return _cast(o[:, :, :Lq], q.dtype), lse[:, :, :Lq]


def _no_key_rows(oc, lc, row_any):
    """A call's output rows that see no key: 0 and ``-inf``, whatever the kernel made of
    them (a NaN in such a query row, NaN plus the mask's ``-inf``, gave NaN)."""
    return oc.masked_fill(~row_any[..., None], 0.0), lc.masked_fill(~row_any, NINF)


def _cast(t: torch.Tensor, dtype) -> torch.Tensor:
    """``t.to(dtype)`` in pieces (token-major storage kept)."""
    if t.dtype == dtype:
        return t
    out = torch.empty_like(t, dtype=dtype)
    return _copy_(out, t)


def _out_rows(plan: CpuPlan, c, x: torch.Tensor, xin, like) -> torch.Tensor:
    """The kernel's ``x [n, lanes, G * R, *rest]`` of a covering call as ``[B, Hq, Lq, *rest]``:
    a view when its layout allows (the output mirrors a dense query view), else a copy."""
    B, Hq, Hk, G, Lq = plan.B, plan.Hq, plan.Hk, plan.G, plan.Lq
    rest = tuple(x.shape[3:])
    if like is not None and xin is not None and x.stride() == xin.stride() and _dense(like) \
            and xin.untyped_storage().data_ptr() == like.untyped_storage().data_ptr():
        # ``xin`` is a view of ``like`` covering it: the output mirrors ``like``'s layout
        return x.as_strided(like.shape, like.stride(), x.storage_offset())
    if _batched(plan, c) and (G == 1 or x.is_contiguous()):
        return x.view((B, Hq, Lq) + rest)         # [B, Hk, G * R, *rest] is [B, Hq, Lq, *rest]
    if c.n == 1 and x.numel() < GRAIN:            # small (a decode step's lse): reshape
        return x.reshape((B, Hk, G, c.R) + rest).reshape((B, Hq, Lq) + rest)
    x = _unbatch(plan, c, x)
    st = x.stride()
    if G == 1 and (c.n == 1 or st[0] == c.R * st[2]):
        lane = st[1]
        shape = (B, Hq, Lq) + rest
        stride = (Hk * lane, lane, st[2]) + tuple(st[3:])
        return x.as_strided(shape, stride, x.storage_offset())
    out = _alloc(plan, Hq, Lq, rest, x.dtype, x.device)
    return _put_rows(plan, c, out, x)


def _dense(t: torch.Tensor) -> bool:
    """``t`` covers its storage span exactly (no gaps, no overlap)."""
    size = 1
    for s, st in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if s == 1:
            continue
        if st != size:
            return False
        size *= s
    return True


def _merge(plan: CpuPlan, obuf: list, lbuf: list):
    """Merge the slots' partial results (token-major ``[B, Hq, L, D]`` and ``[B, Hq, L]``)
    through their log-sum-exps, in pieces of rows."""
    os_ = [_tm(plan, o) for o in obuf]                                 # [rows, Hq' * D]
    ls_ = [_tm(plan, l) for l in lbuf]                                 # [rows, Hq']
    N, X = os_[0].shape
    heads = ls_[0].shape[1]
    D = X // heads
    o = _alloc(plan, plan.Hq, obuf[0].shape[2], (D,), obuf[0].dtype, obuf[0].device)
    lse = _alloc(plan, plan.Hq, obuf[0].shape[2], (), lbuf[0].dtype, lbuf[0].device)
    of, lf = _tm(plan, o), _tm(plan, lse)
    step = max(1, (GRAIN - 1) // (len(os_) * X))
    for s in range(0, N, step):
        li = torch.stack([l[s:s + step] for l in ls_])                 # [S, r, heads]
        m = torch.logsumexp(li, 0)
        w = torch.exp(li - m.masked_fill(torch.isinf(m), 0.0))        # 0 where -inf
        lf[s:s + step] = m
        acc = None
        for j, ob in enumerate(os_):
            part = ob[s:s + step].view(-1, heads, D) * w[j].unsqueeze(-1)
            acc = part if acc is None else acc.add_(part)
        of[s:s + step] = acc.view(-1, X)
    return o, lse


# ------------------------------------------------------------------ backward

def bwd_planned(plan: CpuPlan, q, k, v, o, lse, do, *, scale: float, dlse=None):
    """Backward of ``plan``: ``(dq, dk, dv)`` in the dtypes of q, k, v.

    ``dlse`` (optional, ``[B, Hq, Lq]``) is the gradient flowing into the lse output.
    """
    if plan.expand > 1:              # the repeated heads' gradients summed per key head
        n = plan.expand
        dq, dk, dv = bwd_planned(replace(plan, expand=1), q, _repeat_heads(k, n),
                                 _repeat_heads(v, n), o, lse, do, scale=scale, dlse=dlse)
        return dq, dk.unflatten(1, (-1, n)).sum(2), dv.unflatten(1, (-1, n)).sum(2)
    if dlse is not None and bool((dlse != 0).any()):
        return _bwd_with_dlse(plan, q, k, v, o, lse, do, dlse, scale=scale)
    Hq, Hk, Lq, Lk = plan.Hq, plan.Hk, plan.Lq, plan.Lk
    D = q.shape[-1]
    acc = _accum_dtype(q.dtype)
    do = do if do.dtype == q.dtype else _cast(do, q.dtype)
    o = o if o.dtype == q.dtype else _cast(o, q.dtype)
    lse = lse if lse.dtype == acc else lse.to(acc)
    if any(c.row_any is not None or c.build_mask is not None for c in plan.calls) \
            or not plan.calls:
        lse = lse.masked_fill(torch.isneginf(lse), INF)        # no allowed key: P = 0
    ins = _Inputs(plan)
    if plan.covers:
        c = plan.calls[0]
        qin = ins.rows(c, q)
        dqc, dkc, dvc = _attend_bwd(ins.rows(c, do), qin, ins.keys(c, k), ins.keys(c, v),
                                    ins.rows(c, o), ins.rows(c, lse), c.masks()[0],
                                    scale, c.is_causal)
        dq = _cast(_out_rows(plan, c, dqc, None, None), q.dtype)
        if (c.n == 1 or c.batch_items) and c.col0 == 0 and c.W == Lk:
            return dq, _cast(_keys_out(plan, dkc), k.dtype), _cast(_keys_out(plan, dvc), v.dtype)
        lo, hi = ins.span() if c.col_step is not None else (0, Lk)
        first = _tiles_buffer(c, lo, hi)             # no zero fill: the first phase covers it
        zero = None if first else 0.0
        dk = _alloc(plan, Hk, hi - lo, (D,), acc, q.device, zero)
        dv = _alloc(plan, Hk, hi - lo, (v.shape[-1],), acc, q.device, zero)
        _add_keys(plan, c, dk, lo, dkc, first)
        _add_keys(plan, c, dv, lo, dvc, first)
        return (dq, _cast(dk[:, :, -lo: Lk - lo], k.dtype),
                _cast(dv[:, :, -lo: Lk - lo], v.dtype))
    Lp = plan.Lq_pad
    lse_p = lse
    if Lp > Lq:
        lse_p = _alloc(plan, Hq, Lp, (), acc, q.device, INF)
        _copy_(lse_p[:, :, :Lq], lse)
    lo, hi = ins.span()
    zero = None if plan.partition else 0.0                  # partition: each row written once
    dq = _alloc(plan, Hq, Lp, (D,), acc, q.device, zero)
    dk = _alloc(plan, Hk, hi - lo, (D,), acc, q.device, zero)
    dv = _alloc(plan, Hk, hi - lo, (v.shape[-1],), acc, q.device, zero)
    for c in plan.calls:
        lc = ins.rows(c, lse_p)
        mask = c.masks()[0]
        if c.row_valid is not None and mask is None:        # rows of another item: P = 0
            own = c.row_valid.view(c.n, 1, 1, c.R).expand(c.n, 1, plan.G, c.R)
            lc = lc.masked_fill(~own.reshape(c.n, 1, -1), INF)
        dqc, dkc, dvc = _attend_bwd(ins.rows(c, do), ins.rows(c, q),
                                    ins.keys(c, k), ins.keys(c, v), ins.rows(c, o),
                                    lc, mask, scale, c.is_causal)
        _put_rows(plan, c, dq, dqc if dqc.dtype == acc else dqc.to(acc),
                  add=not plan.partition)
        _add_keys(plan, c, dk, lo, dkc)
        _add_keys(plan, c, dv, lo, dvc)
    return (_cast(dq[:, :, :Lq], q.dtype), _cast(dk[:, :, -lo: Lk - lo], k.dtype),
            _cast(dv[:, :, -lo: Lk - lo], v.dtype))


def _keys_out(plan: CpuPlan, x: torch.Tensor) -> torch.Tensor:
    """Key gradients ``[1, lanes, Lk, D]`` of a one-item call as ``[B, Hk, Lk, D]`` (a view)."""
    if x.shape[0] == plan.B and plan.B > 1:
        return x                                  # batched layout already
    st = x.stride()
    return x.as_strided((plan.B, plan.Hk, plan.Lk, x.shape[-1]),
                        (plan.Hk * st[1], st[1], st[2], st[3]), x.storage_offset())


def _bwd_with_dlse(plan, q, k, v, o, lse, do, dlse, *, scale):
    """The backward with an lse gradient: one extra head-dim column makes the kernel's
    ``rowsum(dO * O)`` equal ``delta - dlse`` (0 in q, k and v leaves scores and dP as
    they are)."""
    def ext(t, col):
        return torch.cat([t, col.to(t.dtype).unsqueeze(-1)], -1)

    zq = q.new_zeros(q.shape[:-1])
    zk = k.new_zeros(k.shape[:-1])
    dl = torch.where(torch.isfinite(lse), dlse.to(lse.dtype), torch.zeros_like(lse))
    dq, dk, dv = bwd_planned(plan, ext(q, zq), ext(k, zk), ext(v, zk), ext(o.to(q.dtype), -dl),
                             lse, ext(do.to(q.dtype), torch.ones_like(zq)), scale=scale)
    return dq[..., :-1], dk[..., :-1], dv[..., :-1]


# ------------------------------------------------------------------ the contract

def fwd(pattern, q, k, v, *, scale: float, q_offset: int | None, inputs, plan=None):
    """Forward: ``o [B, Hq, Lq, D]`` (q's dtype) and ``lse [B, Hq, Lq]`` (float32;
    float64 for float64 inputs)."""
    plan = plan or make_plan(pattern, q, k, q_offset=q_offset, inputs=inputs)
    return fwd_planned(plan, q, k, v, scale=scale)


def bwd(pattern, q, k, v, o, lse, do, *, scale: float, q_offset: int | None, inputs,
        dlse: torch.Tensor | None = None, plan=None):
    """Backward: ``(dq, dk, dv)`` in the dtypes of q, k, v.

    ``dlse`` (optional, ``[B, Hq, Lq]``) is the gradient flowing into the lse output;
    it adds ``p * dlse`` to the score gradients.
    """
    plan = plan or make_plan(pattern, q, k, q_offset=q_offset, inputs=inputs)
    return bwd_planned(plan, q, k, v, o, lse, do, scale=scale, dlse=dlse)


def make_plan(pattern, q, k, *, q_offset: int | None, inputs, **kwargs) -> CpuPlan:
    """A fresh plan for these tensors (no memo): ``build_plan`` with their shapes."""
    B, Hq, Lq, _ = q.shape
    return build_plan(pattern, B, Hq, k.shape[1], Lq, k.shape[2], q_offset=q_offset,
                      inputs=dict(inputs or {}), dtype=q.dtype, device=q.device,
                      head_dim=k.shape[-1], **kwargs)
