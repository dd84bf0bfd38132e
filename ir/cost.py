"""Strategy choice and the cost model.

``pick_strategy(ir)``: ``"ranges"`` (the kernel computes its own loop bounds from the closed
form of :mod:`spattn.ir.ranges`, no metadata) when the pattern has a closed form, else
``"table"`` (CSR tile lists of :mod:`spattn.ir.tables`, built at call time).

Cost model, in units of one FULL tile of the target's kernel: a FULL tile costs
``full_tile`` (1), a PARTIAL tile ``partial_tile`` (the predicate is evaluated on it), each
query tile ``per_row_tile`` (prologue and epilogue: loading Q, writing O and the lse), each
visited tile of the table strategy ``table_tile`` (reading its column list), and each call
``per_call`` (launch and host work). The dense baseline is, on ``cuda``, the same kernel
over every tile (``dense_tile`` each); on ``cpu``, dense SDPA with a boolean mask:
``sdpa_pair`` per (query, key) pair plus ``sdpa_call``.

``COSTS`` holds one model per target, fitted by ``benchmarks/calibrate.py`` to measured
forward times (recorded with their date, commit and device in ``benchmarks/RESULTS.md``,
"Cost model"). A model predicts the forward's speed from tile counts only: it does not know
the tuner's tile sizes, memory-bound short calls or a busy CPU.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Mapping

COSTS = {
    # benchmarks/calibrate.py on the H200 forwards of commit 3b014d0 (2026-11-22)
    "cuda": dict(full_tile=1.0, partial_tile=0.6976, per_row_tile=6.658, table_tile=0.237,
                 per_call=3850.0, dense_tile=1.0, gather_token=0.09, rows_factor=0.28),
    # benchmarks/calibrate.py on the 2-core CPU forwards of commit 278091c (2026-12-02)
    "cpu": dict(full_tile=1.0, partial_tile=2.289, per_row_tile=0.0, table_tile=0.0,
                per_call=104.8, dense_tile=0.0, sdpa_pair=0.0002444, sdpa_call=87.45,
                gather_token=0.0),
}
#: ``gather_token`` (``ir.layout.layout_cost``): a layout's gathers into box order and back
#: (q, k, v in; o and the lse out) per token and head, in FULL tiles. Measured on the H200
#: (``benchmarks/layout_cost.py``): with ``index_select`` the gathers took 0.45 ms at 16K
#: tokens and 16 heads, 0.22-0.28 of sequence order's cost units per token (0.25); the
#: row-gather kernel (``runtime/gather_kernel.py``) takes 0.36 of that time at 16K (3.5
#: against 1.2 TB/s), hence 0.25 x 0.36 = 0.09. D cancels (both sides scale with it). The
#: CPU's copies are small against its tiles' time: 0.
#: ``rows_factor`` (``ir.layout.resolve_gathers``): what addressing the rows through row
#: tables (``SPATTN_LAYOUT_GATHER=kernel``: pointer loads, no TMA) adds to a layout's kernel,
#: as a fraction of its cost. Measured on the H200 (``benchmarks/layout_cost.py --rows``,
#: 16K tokens, five layouts): 22-35% over the same kernel on copied tensors (0.28).
#: The tile shape each model was fitted on (the GPU's on 128 x 64 tiles; the GPU forward's
#: default is 64 x 64, codegen.config.default_tiles), the CPU plan's. explain() and the
#: layout choice count tiles at these shapes, the model's.
TILES = {"cuda": (128, 64), "cpu": (64, 64)}
TARGETS = tuple(COSTS)
COST = COSTS["cuda"]

STRATEGIES = ("ranges", "table")


@contextmanager
def constants(target: str, **values: float):
    """``COSTS[target]`` with ``values`` in place of its entries inside the block, the entries
    restored after (one absent before removed again): to drive a choice the constants make
    (a layout's gathers, say) each way in a benchmark or a search. Plans keep what they were
    built with; ``PLANS`` does not key them on the constants."""
    costs = COSTS[target]
    saved = {n: costs[n] for n in values if n in costs}
    costs.update(values)
    try:
        yield
    finally:
        for n in values:
            if n in saved:
                costs[n] = saved[n]
            else:
                costs.pop(n, None)


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
         + counts["rows"] * cost["per_row_tile"] + cost.get("per_call", 0.0))
    if strategy == "table":
        c += tiles * cost["table_tile"]
    return c


def dense_cost(counts: Mapping[str, int], cost: Mapping[str, float] = COST, *,
               pairs: int | None = None) -> float:
    """Cost of dense attention: the kernel over every tile of the grid, no mask
    (``dense_tile``), or SDPA over ``pairs`` (query, key) pairs (``sdpa_pair``, the CPU)."""
    if cost.get("sdpa_pair"):
        if pairs is None:
            raise ValueError("this cost model's dense baseline needs the number of pairs")
        return pairs * cost["sdpa_pair"] + cost.get("sdpa_call", 0.0)
    total = counts["full"] + counts["partial"] + counts["empty"]
    return (total * cost["dense_tile"] + counts["rows"] * cost["per_row_tile"]
            + cost.get("per_call", 0.0))


def predicted_speedup(counts: Mapping[str, int], strategy: str, cost: Mapping[str, float] = COST,
                      *, pairs: int | None = None) -> float:
    """Predicted speedup of the sparse kernel over dense attention."""
    return dense_cost(counts, cost, pairs=pairs) / max(predicted_cost(counts, strategy, cost), 1e-9)


#: tiles per slab of :func:`tile_counts`
COUNT_SLAB = 1 << 24


def tile_counts(tiles) -> dict:
    """``{"empty", "partial", "full", "rows"}`` of a tile-class tensor ``[B, H, nq, nk]``."""
    from .tiles import row_slabs
    # counted by slabs of rows, without a sum (its int64 copy of a comparison is 8x the
    # grid: 10 GB at three million tokens), so that the count adds O(slab) to the grid
    full = partial = 0
    for _, part in row_slabs(tiles, COUNT_SLAB):
        full += int((part == 2).count_nonzero())
        partial += int((part == 1).count_nonzero())
    n = (tiles.numel() - full - partial, partial, full)
    return {"empty": n[0], "partial": n[1], "full": n[2],
            "rows": tiles.shape[0] * tiles.shape[1] * tiles.shape[2]}
