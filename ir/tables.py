"""Tile tables: CSR lists of PARTIAL and FULL key tiles per query tile, and the transpose.

Built from the tile classes of :func:`spattn.ir.tiles.classify` on their device, fully
vectorised (no Python loop over tiles).

Layout (int32 throughout): rows are the ``(b, h, i)`` triples in row-major order; the row
pointers ``*_ptr`` have shape ``[B, H, n + 1]`` and hold *global* offsets into the one column
array: the columns of row ``(b, h, i)`` are ``idx[ptr[b, h, i] : ptr[b, h, i + 1]]``
(so ``ptr[b, h, n] == ptr[b, h + 1, 0]``), sorted ascending.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .tiles import FULL, PARTIAL


@dataclass(frozen=True)
class TileTable:
    partial_ptr: torch.Tensor      # [B, H, nq + 1]
    partial_idx: torch.Tensor      # key tile indices
    full_ptr: torch.Tensor         # [B, H, nq + 1]
    full_idx: torch.Tensor
    t_partial_ptr: torch.Tensor    # [B, H, nk + 1] per key tile: PARTIAL query tiles
    t_partial_idx: torch.Tensor
    t_full_ptr: torch.Tensor       # [B, H, nk + 1]
    t_full_idx: torch.Tensor
    counts: torch.Tensor           # [B, H, nq] int32: non-empty key tiles per query tile
    order: torch.Tensor            # [B, H, nq] int32: query tiles of each (b, h), heaviest first
    order_flat: torch.Tensor       # [B*H*nq] int32: flat row ids (b*H + h)*nq + i, heaviest first
    shape: tuple                   # (B, H, nq, nk)

    @property
    def num_partial(self) -> int:
        return int(self.partial_idx.numel())

    @property
    def num_full(self) -> int:
        return int(self.full_idx.numel())

    def row(self, b: int, h: int, i: int) -> tuple[list, list]:
        """(partial, full) key tiles of query tile i (for inspection and tests)."""
        p0, p1 = int(self.partial_ptr[b, h, i]), int(self.partial_ptr[b, h, i + 1])
        f0, f1 = int(self.full_ptr[b, h, i]), int(self.full_ptr[b, h, i + 1])
        return self.partial_idx[p0:p1].tolist(), self.full_idx[f0:f1].tolist()

    def to(self, device) -> "TileTable":
        return TileTable(*(getattr(self, f).to(device) if isinstance(getattr(self, f), torch.Tensor)
                           else getattr(self, f) for f in self.__dataclass_fields__))


def csr(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of a bool ``[B, H, n, m]``: (ptr int32 ``[B, H, n + 1]``, column indices int32)."""
    Bn, Hn, n, m = sel.shape
    counts = sel.sum(dim=3, dtype=torch.int64).reshape(-1)            # [B*H*n]
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    starts = starts.view(Bn, Hn, n)
    last = ends.view(Bn, Hn, n)[..., -1:]
    ptr = torch.cat([starts, last], dim=2).to(torch.int32)
    idx = sel.reshape(-1, m).nonzero()[:, 1].to(torch.int32)          # row-major: sorted
    return ptr.contiguous(), idx.contiguous()


def tile_table(tiles: torch.Tensor) -> TileTable:
    """CSR lists of the tile classes ``int8 [B, H, nq, nk]`` (see the module docstring)."""
    if tiles.dim() != 4:
        raise ValueError(f"tile classes must be [B, H, nq, nk], got shape {tuple(tiles.shape)}")
    partial = tiles == PARTIAL
    full = tiles == FULL
    pp, pi = csr(partial)
    fp, fi = csr(full)
    tpartial, tfull = partial.transpose(2, 3), full.transpose(2, 3)
    tpp, tpi = csr(tpartial)
    tfp, tfi = csr(tfull)
    Bn, Hn, nq, nk = tiles.shape
    counts = (tiles != 0).sum(dim=3, dtype=torch.int32)
    order = torch.sort(counts, dim=2, descending=True, stable=True).indices.to(torch.int32)
    order_flat = torch.sort(counts.reshape(-1), descending=True, stable=True).indices.to(torch.int32)
    return TileTable(pp, pi, fp, fi, tpp, tpi, tfp, tfi, counts, order.contiguous(),
                     order_flat.contiguous(), (Bn, Hn, nq, nk))
