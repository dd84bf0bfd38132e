"""Runtime inputs on their way to the kernels: device copies that keep their identity.

The launchers key their tile tables on the identity of the (validated) input tensors, so an
input of another dtype or device must convert to the same tensor object on every call while
it is unchanged: :func:`converted` caches the copies (a few, FIFO), and this module's
:func:`validate_inputs` is :func:`spattn.ir.inputs.validate_inputs` converting through it.
"""
from __future__ import annotations

from functools import partial

import torch

from ..ir import inputs as _ir_inputs

__all__ = ["converted", "validate_inputs"]

#: (id, version, data pointer, device, dtype) of a source tensor -> (source, converted).
_CONVERTED: dict = {}
_CONVERTED_SIZE = 8


def converted(t: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(device).to(dtype)``, the same tensor object on every call while ``t`` is
    unchanged (same object, no in-place write since): the launchers key their tile
    tables on the inputs' identity, so a fresh copy per call would rebuild them."""
    if t.dtype == dtype and (device is None or t.device == torch.device(device)):
        return t
    if torch.compiler.is_compiling():    # traced: fake tensors have no data pointer
        return (t.to(device) if device is not None else t).to(dtype)
    key = (id(t), t._version, t.data_ptr(), str(device), dtype)
    hit = _CONVERTED.get(key)
    if hit is not None and hit[0] is t:
        return hit[1]
    out = t.to(device) if device is not None else t
    out = out.to(dtype)
    if len(_CONVERTED) >= _CONVERTED_SIZE:
        _CONVERTED.pop(next(iter(_CONVERTED), None), None)   # oldest (another thread may race)
    _CONVERTED[key] = (t, out)      # holds ``t``: its id cannot be reused while cached
    return out


#: :func:`spattn.ir.inputs.validate_inputs` whose int64 copies come from :func:`converted`.
validate_inputs = partial(_ir_inputs.validate_inputs, convert=converted)
