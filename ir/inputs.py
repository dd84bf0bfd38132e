"""The arguments of a call, as the IR sees them: lengths, the query offset, runtime inputs.

``validate_inputs`` checks runtime input tensors against a pattern's declaration (names, index
dimensions, optional leading ``[B]`` / ``[B, H]`` dimensions, dtype) and returns int64 tensors,
the form every pass of ``ir`` computes with. It copies by default; the runtime's call path
passes a ``convert`` that returns the tensors as given (its plan cache keys on the caller's
tensors, and a plan converts them once).
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..dsl.errors import SpattnInputError, SpattnValueError

#: dtypes a runtime input may have (elements are integers; bool means 0/1)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)


def query_offset(Lq: int, Lk: int, q_offset: int | None) -> int:
    """Position of query row 0: bottom-right aligned (``Lk - Lq``) unless given."""
    return Lk - Lq if q_offset is None else int(q_offset)


def check_lengths(Lq, Lk, *, num_heads=1, batch=1) -> None:
    """Raise :class:`SpattnValueError` unless every length is a positive int."""
    for name, v in (("Lq", Lq), ("Lk", Lk), ("num_heads", num_heads), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise SpattnValueError(f"{name} must be a positive integer, got {v!r}")


def _copy(t: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    return (t.to(device) if device is not None else t).to(dtype)


def check_shape(name: str, t: torch.Tensor, nd: int, *, batch: int, num_heads: int,
                reader: str = "the pattern") -> None:
    """SpattnInputError unless runtime input ``name`` has ``nd`` index dims, optionally led by
    a batch and a head dim (each the call's size or 1), and no empty dim; ``reader``: who
    indexes it (the pattern, the score)."""
    if t.dim() not in (nd, nd + 1, nd + 2):
        raise SpattnInputError(
            f"runtime input {name!r} has shape {tuple(t.shape)}, but {reader} indexes it "
            f"with {nd} index dimension{'s' if nd != 1 else ''}: expected {nd} dims, "
            f"[B, ...] ({nd + 1} dims) or [B, H, ...] ({nd + 2} dims)")
    lead = t.shape[: t.dim() - nd]
    for axis, (size, want, what) in enumerate(zip(lead, (batch, num_heads), ("batch", "heads"))):
        if size not in (1, want):
            raise SpattnInputError(f"runtime input {name!r} has shape {tuple(t.shape)}: "
                                   f"its {what} dimension ({axis}) is {size}, expected "
                                   f"{want if want == 1 else f'{want} or 1'} (the call's "
                                   f"{'batch size' if what == 'batch' else 'number of heads'})")
    if any(s == 0 for s in t.shape):
        raise SpattnInputError(f"runtime input {name!r} is empty (shape {tuple(t.shape)})")


def check_names(declared: Mapping[str, int], given: Mapping[str, object]) -> None:
    """SpattnInputError for a declared input not given, or a given one not declared
    (``declared``: name -> number of index dimensions)."""
    missing = [n for n in declared if n not in given]
    if missing:
        raise SpattnInputError(
            "missing runtime input" + ("s " if len(missing) > 1 else " ")
            + ", ".join(repr(n) for n in missing)
            + f": the pattern indexes {', '.join(f'{n}[{_dims(declared[n])}]' for n in missing)}")
    extra = [n for n in given if n not in declared]
    if extra:
        known = ", ".join(repr(n) for n in declared) or "none"
        raise SpattnInputError(f"unexpected runtime input {', '.join(repr(n) for n in extra)}: "
                               f"the pattern's inputs are {known}")


def validate_inputs(declared: Mapping[str, int], given: Mapping[str, object], *,
                    batch: int, num_heads: int, device=None,
                    convert: Callable[[torch.Tensor, object, torch.dtype], torch.Tensor] = _copy
                    ) -> dict[str, torch.Tensor]:
    """Check runtime inputs against the pattern's declaration; returns int64 tensors.

    ``declared`` maps each input name to its number of index dimensions. ``convert(t,
    device, dtype)`` makes the int64 copy on ``device`` (by default ``.to``, which returns a
    tensor that already is one as it is).
    Raises :class:`SpattnInputError` naming the argument and its shape.
    """
    check_names(declared, given)
    out = {}
    for name, nd in declared.items():
        t = given[name]
        if not isinstance(t, torch.Tensor):
            raise SpattnInputError(f"runtime input {name!r} must be a torch.Tensor, "
                                   f"got {type(t).__name__}")
        if t.dtype not in INT_DTYPES:
            raise SpattnInputError(f"runtime input {name!r} must have an integer or bool dtype, "
                                   f"got {t.dtype} (shape {tuple(t.shape)})")
        check_shape(name, t, nd, batch=batch, num_heads=num_heads)
        out[name] = convert(t, device, torch.int64)
    return out


def _dims(n: int) -> str:
    return ", ".join("·" for _ in range(n))


#: The most elements a runtime input may have to be read into a pattern as a list
#: (:func:`loads_as_lists`).
LIST_INPUT_MAX = 4096


def uniform_loads(ir) -> list | None:
    """The loads of runtime inputs in ``ir`` (sorted, each once) when every one is at
    uniform indices (``b``, ``h``, constants: one value per program, as ``first[b]``); None
    when some load is at another index."""
    from . import build as B
    from .nodes import Load, walk
    loads = sorted({n for n in walk(ir) if isinstance(n, Load)}, key=repr)
    if not all(B.is_uniform(i) for ld in loads for i in ld.index):
        return None
    return loads


def loads_as_lists(ir, inputs: Mapping[str, torch.Tensor]):
    """``ir`` with every load of a runtime input replaced by a constant list of the input's
    values (``Table``) indexed by the load's index, where each index is uniform (``b``,
    ``h``, constants: one value per batch element and head, as ``first[b]``), the input has
    no leading dims and at most :data:`LIST_INPUT_MAX` elements; None where the IR loads
    nothing or some load is of another kind.

    The result is the pattern at these inputs' values (for as long as they keep them), with
    no loads: the closed form and the host functions of the interval analysis take it, where
    they take no loads. The indices must have been checked in range (``ir.bounds``)."""
    from . import build as B
    from .intervals import replace
    loads = uniform_loads(ir)
    if not loads:
        return None
    out = ir
    for ld in loads:
        t = inputs.get(ld.name)
        if t is None or t.dim() != len(ld.index) or t.numel() > LIST_INPUT_MAX:
            return None
        flat, stride = B.const(0), 1
        for i, n in reversed(list(zip(ld.index, t.shape))):
            flat = B.add(flat, B.mul(i, B.const(stride)))
            stride *= n
        out = replace(out, ld, B.table(t.reshape(-1).tolist(), flat, name=ld.name))
    return out
