"""Strategy choice and the cost model.

``pick_strategy(ir)``: ``"ranges"`` (the kernel computes its own loop bounds from the closed
form of :mod:`spattn.ir.ranges`, no metadata) when the pattern has a closed form, else
``"table"`` (CSR tile lists of :mod:`spattn.ir.tables`, built at call time).

Cost model, in units of one dense tile: a FULL tile costs ``full_tile``, a PARTIAL tile
``partial_tile`` (the predicate is evaluated on the tile), each query tile ``per_row_tile``
(prologue/epilogue: loading Q, writing O and the lse), and the dense baseline
``dense_tile`` per tile plus the same per-row overhead. THE CONSTANTS ARE PLACEHOLDERS, to be
calibrated on the GPU (see benchmarks/); the table strategy adds a small per-tile cost for
reading its column list (``table_tile``).
"""
from __future__ import annotations

from typing import Mapping

COST = dict(full_tile=1.0, partial_tile=1.35, per_row_tile=0.5, dense_tile=1.0, table_tile=0.02)

STRATEGIES = ("ranges", "table")


def pick_strategy(ir) -> str:
    """``"ranges"`` when the pattern has closed-form key ranges, else ``"table"``."""
    from .ranges import closed_form
    ir = ir.ir if hasattr(ir, "ir") else ir
    return "ranges" if closed_form(ir) is not None else "table"


def predicted_cost(counts: Mapping[str, int], strategy: str, cost: Mapping[str, float] = COST) -> float:
    """Cost of the sparse kernel: ``counts`` has ``full``, ``partial`` (tiles) and ``rows``
    (query tiles, over batch and heads)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    tiles = counts["full"] + counts["partial"]
    c = (counts["full"] * cost["full_tile"] + counts["partial"] * cost["partial_tile"]
         + counts["rows"] * cost["per_row_tile"])
    if strategy == "table":
        c += tiles * cost["table_tile"]
    return c


def dense_cost(counts: Mapping[str, int], cost: Mapping[str, float] = COST) -> float:
    """Cost of dense attention over the same grid: every tile, no mask."""
    total = counts["full"] + counts["partial"] + counts["empty"]
    return total * cost["dense_tile"] + counts["rows"] * cost["per_row_tile"]


def predicted_speedup(counts: Mapping[str, int], strategy: str, cost: Mapping[str, float] = COST) -> float:
    """Predicted speedup of the sparse kernel over dense attention (same tile grid)."""
    return dense_cost(counts, cost) / max(predicted_cost(counts, strategy, cost), 1e-9)


def tile_counts(tiles) -> dict:
    """``{"empty", "partial", "full", "rows"}`` of a tile-class tensor ``[B, H, nq, nk]``."""
    import torch
    n = torch.bincount(tiles.reshape(-1).to(torch.int64), minlength=3).tolist()
    return {"empty": n[0], "partial": n[1], "full": n[2],
            "rows": tiles.shape[0] * tiles.shape[1] * tiles.shape[2]}
