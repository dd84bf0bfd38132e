"""``spattn.neighborhood``: NATTEN's neighbourhood attention over a grid of tokens.

The semantics (per axis: kernel size, stride, dilation, causal; windows shifted at the
borders) are those of :mod:`spattn.ir.neighborhood`. The result is an ordinary
:class:`~spattn.Pattern` over flattened positions (its source composes with any other
pattern); the runtime recognises the grid and runs it in box tiles (docs/layouts.md).
"""
from __future__ import annotations

from .ir.neighborhood import check_shape, neighborhood_ir
from .pattern import Pattern

__all__ = ["neighborhood"]


def neighborhood(shape, kernel_size, stride=1, dilation=1, is_causal=False, *,
                 extra_before: int = 0, extra_after: int = 0,
                 backend: str = "auto") -> Pattern:
    """Neighbourhood attention over the grid ``shape`` (1 to 4 axes, tokens flattened
    row-major), NATTEN's arguments per axis (an int or bool applies to every axis).
    ``extra_before`` / ``extra_after``: tokens before and after the grid's cells (text
    beside an image, at positions ``0 .. extra_before - 1`` and after the cells): every
    cell also attends to all of them (NATTEN's additional keys) and they attend to every
    token. ``pat.grid`` is the shape: a call's ``Lq`` and ``Lk`` must be its cell count
    plus the extra tokens. Raises :class:`~spattn.SpattnParamError` /
    :class:`~spattn.SpattnValueError` naming the argument that does not fit."""
    ir = neighborhood_ir(shape, kernel_size, stride, dilation, is_causal,
                         extra_before=extra_before, extra_after=extra_after)
    return Pattern(ir, name="neighborhood", backend=backend, grid=check_shape(shape),
                   grid_offset=extra_before, grid_suffix=extra_after)
