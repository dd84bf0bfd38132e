"""Pictures of a pattern: the mask with the tile grid, tiles coloured by class (matplotlib)."""
from __future__ import annotations

import numpy as np

from .dsl.errors import SpattnError

# EMPTY, PARTIAL, FULL
TILE_COLOURS = ("#f4f4f4", "#f6c28b", "#8fd19e")
MAX_DENSE = 2048 * 2048


def plot_pattern(pat, Lq: int, Lk: int, block_m: int, block_n: int, path, *, head: int = 0,
                 q_offset=None, inputs=None, title: str | None = None) -> None:
    """Write a PNG: tile classes as coloured cells, allowed pairs drawn dark when small enough."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch
    except ImportError:  # pragma: no cover - matplotlib is in the plot extra
        raise SpattnError("--png needs matplotlib: pip install 'spattn[plot]'") from None
    inputs = inputs or {}
    nh = head + 1
    tiles = pat.tiles(Lq, Lk, block_m, block_n, num_heads=nh, q_offset=q_offset, **inputs)[0, head]
    cls = tiles.numpy().astype(np.int64)
    # one cell per tile, stretched to the tile's real extent (ragged last tiles included)
    qe = np.minimum(np.arange(cls.shape[0] + 1) * block_m, Lq)
    ke = np.minimum(np.arange(cls.shape[1] + 1) * block_n, Lk)
    aspect = Lq / Lk
    fig, ax = plt.subplots(figsize=(7, max(2.5, min(7 * aspect, 10))), dpi=110)
    ax.pcolormesh(ke, qe, cls, cmap=ListedColormap(TILE_COLOURS), vmin=0, vmax=2,
                  edgecolors="#999999" if cls.size <= 4096 else "face", linewidth=0.3)
    if Lq * Lk <= MAX_DENSE:
        m = pat.mask(Lq, Lk, num_heads=nh, q_offset=q_offset, **inputs)[0, head].numpy()
        overlay = np.ma.masked_where(~m, np.ones_like(m, dtype=float))
        ax.imshow(overlay, cmap=ListedColormap(["#1f3b73"]), extent=(0, Lk, Lq, 0),
                  interpolation="nearest", alpha=0.55, aspect="auto", zorder=2)
    ax.set_xlim(0, Lk)
    ax.set_ylim(Lq, 0)
    ax.set_xlabel("key position")
    ax.set_ylabel("query row")
    ax.set_title(title or pat.source if len(pat.source) < 70 else pat.name, fontsize=9)
    counts = [int((cls == c).sum()) for c in (0, 1, 2)]
    ax.legend(handles=[Patch(color=TILE_COLOURS[2], label=f"FULL tiles ({counts[2]})"),
                       Patch(color=TILE_COLOURS[1], label=f"PARTIAL tiles ({counts[1]})"),
                       Patch(color=TILE_COLOURS[0], label=f"EMPTY tiles ({counts[0]})"),
                       Patch(color="#1f3b73", label="allowed pairs")],
              loc="upper right", fontsize=7, framealpha=0.9)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")     # (a path without ".png" too: the flag says PNG)
    finally:
        plt.close(fig)
