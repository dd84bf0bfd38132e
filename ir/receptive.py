"""Receptive field of a pattern stacked ``layers`` deep (the analysis PowerAttention makes).

The attention graph has a node per position and an edge ``q -> k`` when query ``q`` may see
key ``k`` (``k != q``, union over heads, batch entry 0). After ``n`` layers position ``p`` has
received information from every node within distance ``n`` of it. Reported: per position, the
fraction of the earlier positions it reaches after ``layers`` layers; for the last position,
the fraction after each layer and the smallest layer count at which it reaches every earlier
position (its eccentricity over the earlier positions, by BFS with networkx; None if some
earlier position is never reached).

Large graphs are coarsened: when ``L > max_nodes`` (or the exact graph would have more than
``max_edges`` edges) nodes are tiles of ``tile`` positions and there is an edge ``i -> j``
when tile ``(i, j)`` of :func:`spattn.ir.tiles.classify` is not EMPTY. That is an upper
bound (a tile edge says *some* pair connects); the result says so (``coarsened=True``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch

from ..dsl.errors import SpattnValueError
from .evaluate import mask
from .inputs import validate_inputs


@dataclass
class ReceptiveField:
    L: int
    layers: int
    fraction: torch.Tensor          # float [nodes]: fraction of earlier nodes reached
    last_fraction_per_layer: list   # after 1..layers layers, for the last node
    layers_to_full: int | None      # smallest layer count at which the last node reaches all
    coarsened: bool
    tile: int                       # positions per node (1 when not coarsened)
    nodes: int
    edges: int
    notes: list = field(default_factory=list)

    @property
    def mean_fraction(self) -> float:
        return float(self.fraction[1:].mean()) if self.fraction.numel() > 1 else 1.0

    @property
    def last_fraction(self) -> float:
        return float(self.fraction[-1])

    def to_dict(self) -> dict:
        return {"L": self.L, "layers": self.layers, "mean_fraction": self.mean_fraction,
                "last_fraction": self.last_fraction,
                "last_fraction_per_layer": list(self.last_fraction_per_layer),
                "layers_to_full": self.layers_to_full, "coarsened": self.coarsened,
                "tile": self.tile, "nodes": self.nodes, "edges": self.edges,
                "notes": list(self.notes)}

    def __str__(self) -> str:
        where = (f"tile-coarsened graph ({self.nodes} nodes of {self.tile} positions; an upper bound)"
                 if self.coarsened else f"exact graph ({self.nodes} nodes)")
        full = ("never (within the graph)" if self.layers_to_full is None
                else f"{self.layers_to_full} layer{'s' if self.layers_to_full != 1 else ''}")
        return (f"receptive field, L={self.L}, {self.layers} layers, {where}, {self.edges:,} edges\n"
                f"  mean fraction of the past reached: {100 * self.mean_fraction:.2f}%\n"
                f"  last position: {100 * self.last_fraction:.2f}% "
                f"(per layer: {', '.join(f'{100 * x:.1f}%' for x in self.last_fraction_per_layer)})\n"
                f"  last position reaches all earlier positions after: {full}")


def _adjacency(pattern, L, tile, num_heads, inputs):
    ir = pattern.ir if hasattr(pattern, "ir") else pattern
    if tile == 1:
        declared = getattr(pattern, "inputs", {}) or {}
        ins = validate_inputs(declared, inputs, batch=1, num_heads=num_heads)
        A = mask(ir, L, L, num_heads=num_heads, q_offset=0, inputs=ins)[0].any(0)
    else:
        from .tiles import classify
        A = classify(pattern, L, L, tile, tile, num_heads=num_heads, q_offset=0,
                     inputs=inputs)[0].ne(0).any(0)
    A = A.clone()
    A.fill_diagonal_(False)
    return A


def receptive_field(pattern, L: int, layers: int, *, max_nodes: int = 4096,
                    max_edges: int = 2_000_000, num_heads: int = 1, **inputs) -> ReceptiveField:
    """How much of the past each position reaches with the pattern stacked ``layers`` deep."""
    for name, v in (("L", L), ("layers", layers), ("max_nodes", max_nodes),
                    ("num_heads", num_heads)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise SpattnValueError(f"{name} must be a positive integer, got {v!r}")
    tile = 1 if L <= max_nodes else -(-L // max_nodes)
    notes = []
    while True:
        A = _adjacency(pattern, L, tile, num_heads, inputs)
        E = int(A.sum())
        if E <= max_edges or A.shape[0] <= 2:
            break
        tile *= 2
        notes.append(f"more than {max_edges:,} edges: coarsened to tiles of {tile}")
    N = A.shape[0]
    G = nx.DiGraph()
    G.add_nodes_from(range(N))
    src, dst = A.nonzero(as_tuple=True)
    G.add_edges_from(zip(src.tolist(), dst.tolist()))
    # last node: BFS distances
    dist = nx.single_source_shortest_path_length(G, N - 1)
    earlier = N - 1
    per_layer = []
    for n in range(1, layers + 1):
        reached = sum(1 for v, d in dist.items() if v < N - 1 and d <= n)
        per_layer.append(reached / earlier if earlier else 1.0)
    far = [d for v, d in dist.items() if v < N - 1]
    layers_to_full = (max(far) if far else 0) if len(far) == earlier else None
    # every node: propagate reach sets, R <- R | A R  (sparse A, dense R)
    Af = A.to(torch.float32).to_sparse_csr()
    R = torch.eye(N, dtype=torch.float32)
    for _ in range(layers):
        nxt = ((Af @ R) + R) > 0
        nxt = nxt.to(torch.float32)
        if torch.equal(nxt, R):
            break
        R = nxt
    Rb = R > 0
    tri = torch.tril(torch.ones(N, N, dtype=torch.bool), diagonal=-1)
    counts = (Rb & tri).sum(1).to(torch.float64)
    denom = torch.arange(N, dtype=torch.float64)
    frac = torch.where(denom > 0, counts / denom.clamp(min=1), torch.ones_like(counts))
    return ReceptiveField(L=L, layers=layers, fraction=frac, last_fraction_per_layer=per_layer,
                          layers_to_full=layers_to_full, coarsened=tile > 1, tile=tile, nodes=N,
                          edges=E, notes=notes)
