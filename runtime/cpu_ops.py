"""Tensor bookkeeping in pieces that stay on the calling thread.

ATen runs an operation of fewer than :data:`GRAIN` elements on the calling thread and a
larger one as a parallel region that ends when every thread has finished its share. On a
machine whose cores are busy with other processes, a thread of the region is often
descheduled, and the region then waits a scheduler slice (milliseconds) however little
work it had. The CPU backend's own copies, fills and scatters are therefore done in
pieces below the grain: one thread, no waiting, and on a quiet machine a copy of a few
megabytes costs about a millisecond either way. The kernel calls themselves stay large.
"""
from __future__ import annotations

import torch

__all__ = ["GRAIN", "pieces", "copy_", "add_", "fill", "contiguous"]

#: ``at::internal::GRAIN_SIZE``: operations on fewer elements run on the calling thread.
GRAIN = 32768


def pieces(t: torch.Tensor):
    """Index tuples splitting ``t`` along its leading dims into pieces of < GRAIN elements
    (each element in exactly one piece)."""
    def rec(dim, prefix):
        inner = 1
        for s in t.shape[dim + 1:]:
            inner *= s
        n = t.shape[dim]
        if n * inner < GRAIN or dim == t.dim() - 1:
            yield prefix + (slice(None),)
            return
        if inner >= GRAIN:
            for i in range(n):
                yield from rec(dim + 1, prefix + (i,))
            return
        step = (GRAIN - 1) // inner
        for s in range(0, n, step):
            yield prefix + (slice(s, s + step),)

    if t.dim() == 0:
        yield ()
        return
    yield from rec(0, ())


def copy_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` (``src`` broadcastable to ``dst``) in pieces."""
    if dst.numel() < GRAIN:
        return dst.copy_(src)
    src = src.expand(dst.shape)
    for ix in pieces(dst):
        dst[ix].copy_(src[ix])
    return dst


def add_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst += src`` (same shapes) in pieces."""
    if dst.numel() < GRAIN:
        return dst.add_(src)
    for ix in pieces(dst):
        dst[ix].add_(src[ix])
    return dst


def fill(shape, value, dtype, device) -> torch.Tensor:
    """A new tensor of ``shape`` filled with ``value``, in pieces."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if t.numel() < GRAIN:
        return t.fill_(value)
    for ix in pieces(t):
        t[ix].fill_(value)
    return t


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t.contiguous()`` in pieces."""
    if t.is_contiguous():
        return t
    return copy_(torch.empty(t.shape, dtype=t.dtype, device=t.device), t)
