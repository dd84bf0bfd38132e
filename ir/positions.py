"""Where query and key rows sit in the pattern's position space: one object, passed as data.

A pattern speaks of positions ``q`` and ``k``; a call holds rows ``0 .. Lq - 1`` of queries
and ``0 .. Lk - 1`` of keys. :class:`Positions` maps one to the other. Today the map is an
offset: key row ``j`` is position ``j`` and query row ``i`` is position ``i + q_offset``
(by default ``Lk - Lq``: the last query and the last key share a position, as with a KV
cache). The analysis (tile boxes), the kernels (``o_q = o_m + q_offset``) and every cache
key take this object instead of a loose integer, so that richer maps (per-row position
inputs, global lengths for context parallelism) extend it in one place.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Positions"]


@dataclass(frozen=True, slots=True)
class Positions:
    """Query row ``i`` sits at position ``i + q_offset``; key row ``j`` at position ``j``."""

    q_offset: int = 0

    @classmethod
    def of(cls, Lq: int, Lk: int, q_offset: int | None = None) -> "Positions":
        """Bottom-right aligned (``q_offset = Lk - Lq``) unless ``q_offset`` is given."""
        return cls(Lk - Lq if q_offset is None else int(q_offset))

    def queries(self, Lq: int) -> tuple[int, int]:
        """First and last query position of ``Lq`` rows."""
        return self.q_offset, self.q_offset + Lq - 1

    @staticmethod
    def keys(Lk: int) -> tuple[int, int]:
        """First and last key position of ``Lk`` rows."""
        return 0, Lk - 1

    def kernel_args(self) -> tuple[int]:
        """The kernels' runtime arguments of this map (``q_offset``)."""
        return (self.q_offset,)

    def key(self) -> tuple:
        """What a cache key of a call depends on."""
        return ("offset", self.q_offset)

    def __str__(self) -> str:
        return f"q = row + {self.q_offset}, k = row"
