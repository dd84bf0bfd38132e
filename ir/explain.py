"""``explain()``: what a pattern costs at a given size, for a person and for programs.

Exact density without N^2 work for affine patterns: each query row's allowed keys are the
union of at most 4 intervals given by the closed form (:mod:`spattn.ir.ranges`) evaluated
at ``qs = qe = q`` (exact per row), so counting is O(Lq * intervals * B * H). Other patterns:
the FULL tiles count their size and only the PARTIAL tiles are evaluated with the reference
semantics, in chunks (memory bounded by ``chunk_elems``).

FLOPs: attention costs ``4 * D`` FLOPs per (query, key) pair (QK^T and PV, 2 each); the kernel
computes every pair of its FULL and PARTIAL tiles (nominal tile size), the useful work is the
allowed pairs. The predicted speedup of the forward comes from the cost model of
:mod:`spattn.ir.cost` for the ``target`` (``"cuda"``: over the same kernel run dense;
``"cpu"``: over dense SDPA with a boolean mask), fitted to measured times and evaluated on
the tile shape it was fitted on.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from ..dsl.errors import SpattnValueError
from .evaluate import evaluate
from .inputs import query_offset, validate_inputs
from .ranges import closed_form, exact_intervals
from .compose import COMPOSE_MIN_OPS, pattern_composition
from .cost import COSTS, TARGETS, TILES, pick_strategy, predicted_speedup, tile_counts
from .tiles import FULL, PARTIAL, SLAB_TILES, classify, row_slabs


@dataclass
class Report:
    pattern: str
    Lq: int
    Lk: int
    num_heads: int
    batch: int
    block_m: int
    block_n: int
    head_dim: int
    allowed_pairs: int
    total_pairs: int
    density: float
    tiles: dict
    tile_density: float
    flops_computed: int
    flops_useful: int
    flops_dense: int
    efficiency: float
    predicted_speedup: float
    strategy: str
    density_method: str
    target: str = "cuda"
    cost_model: dict = field(default_factory=lambda: dict(COSTS["cuda"]))
    layout: Optional[dict] = None
    score: Optional[str] = None
    score_run: Optional[str] = None
    head_order: Optional[dict] = None

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        t = self.tiles
        total = max(t["total"], 1)

        def pct(x):
            return f"{100 * x:.2f}%"

        def tf(x):
            return f"{x / 1e12:.3f} TFLOP" if x >= 1e11 else f"{x / 1e9:.3f} GFLOP"
        lines = [
            f"pattern   {self.pattern}",
            f"shape     B={self.batch} H={self.num_heads} Lq={self.Lq} Lk={self.Lk} D={self.head_dim}"
            f"  tiles {self.block_m}x{self.block_n}",
            f"density   {pct(self.density)} of pairs allowed "
            f"({self.allowed_pairs:,} / {self.total_pairs:,}; {self.density_method})",
            f"tiles     {t['total']:,}: {t['full']:,} full ({pct(t['full'] / total)}), "
            f"{t['partial']:,} partial ({pct(t['partial'] / total)}), "
            f"{t['empty']:,} empty ({pct(t['empty'] / total)})",
            f"flops     computed {tf(self.flops_computed)}, useful {tf(self.flops_useful)}, "
            f"dense {tf(self.flops_dense)}; efficiency {pct(self.efficiency)}",
            f"speedup   {self.predicted_speedup:.2f}x over dense "
            + ("attention on the GPU (forward; cost model fitted to H200 times)"
               if self.target == "cuda" else
               "SDPA with a mask on the CPU (forward; cost model fitted to 2-core times)"),
            f"strategy  {self.strategy}" + _STRATEGY_WORDS.get(self.strategy, ""),
        ]
        if self.layout is not None:
            lay = self.layout
            lines.append(
                f"layout    {lay['layout']}: useful pairs {pct(lay['fraction_layout'])} of "
                f"computed (sequence order {pct(lay['fraction_sequence'])}); predicted cost "
                f"{lay['cost_layout'] / max(lay['cost_sequence'], 1e-9):.2f}x sequence order's "
                + {"copy": "with its gathers; ",
                   "box": "with the forward reading its boxes through TMA (no gathers; the "
                          "backward " + ("addressing rows through row tables"
                                         if lay.get("gather_backward") == "kernel" else
                                         "on gathered copies") + "); "}.get(
                       lay.get("gather", "copy"),
                       "with rows addressed in the kernels (no gathers, "
                       "SPATTN_LAYOUT_GATHER=kernel); ")
                + _used(lay["used"]))
        if self.head_order is not None:
            ho = self.head_order
            lines.append(
                f"head order per-head key order, the class {ho['class']} first "
                f"({ho['class_sizes'][0]}-{ho['class_sizes'][1]} keys per head): useful pairs "
                f"{pct(ho['fraction_order'])} of computed (sequence order "
                f"{pct(ho['fraction_sequence'])}); predicted cost "
                f"{ho['cost_order'] / max(ho['cost_sequence'], 1e-9):.2f}x sequence order's "
                "with the gathers of k and v per head; "
                + _used(ho["used"]))
        if self.score is not None:
            lines.append(f"score     {self.score} (applied to every computed pair; it leaves "
                         "the tile classes as they are)")
        if self.score_run is not None:
            lines.append(f"          runs as {self.score_run}: each table read at a function "
                         "of q - k gathered along the distances once per call "
                         "(SPATTN_SCORE_COMPOSE)")
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle):  # pragma: no cover - IPython
        p.text(str(self))


def _count_closed_form(rows, Lq, Lk, *, num_heads, batch, q_offset, device,
                       chunk=1 << 16) -> int:
    """Allowed pairs, counted per query row from the closed form's ``rows`` (exact)."""
    off = query_offset(Lq, Lk, q_offset)
    total = 0
    for s in range(0, Lq, chunk):
        n = min(chunk, Lq - s)
        qpos = (torch.arange(s, s + n, dtype=torch.int64, device=device) + off).view(1, 1, n)
        env = {"qs": qpos, "qe": qpos,
               "h": torch.arange(num_heads, dtype=torch.int64, device=device).view(1, num_heads, 1),
               "b": torch.arange(batch, dtype=torch.int64, device=device).view(batch, 1, 1),
               "Lq": Lq, "Lk": Lk, "H": num_heads}
        shape = (batch, num_heads, n)
        los, his = [], []
        for iv in rows:
            lo = torch.as_tensor(evaluate(iv.lo, env), dtype=torch.int64, device=device).expand(shape)
            hi = torch.as_tensor(evaluate(iv.hi, env), dtype=torch.int64, device=device).expand(shape)
            los.append(lo.clamp(min=0))
            his.append(hi.clamp(max=Lk - 1))
        if not los:
            continue
        lo = torch.stack(los, -1)
        hi = torch.stack(his, -1)
        order = torch.argsort(lo, dim=-1)
        lo, hi = torch.gather(lo, -1, order), torch.gather(hi, -1, order)
        cur = torch.full(shape, -1, dtype=torch.int64, device=device)   # last covered key
        cnt = torch.zeros(shape, dtype=torch.int64, device=device)
        for j in range(lo.shape[-1]):
            start = torch.maximum(lo[..., j], cur + 1)
            cnt += (hi[..., j] - start + 1).clamp(min=0)
            cur = torch.maximum(cur, hi[..., j])
        total += int(cnt.sum())
    return total


def allowed_pairs(ir, tiles, Lq: int, Lk: int, block_m: int, block_n: int, *, num_heads: int,
                  batch: int, q_offset, inputs) -> tuple[int, str]:
    """The pattern's allowed pairs and how they were counted: per row from the closed form
    where there is one, else from its tile classes ``tiles`` (:func:`classify` at
    ``block_m`` x ``block_n``; None: classified here) by :func:`_count_tiles`. Never a
    dense mask: O(Lq) or O(tiles) memory."""
    cf = closed_form(ir)
    if cf is not None:
        try:
            rows = exact_intervals(cf, Lq, Lk, num_heads=num_heads, batch=batch,
                                   q_offset=q_offset)
        except SpattnValueError:    # a bound beyond int64 at this size: count the tiles
            rows = None
        if rows is not None:
            dev = tiles.device if tiles is not None else None
            return (_count_closed_form(rows, Lq, Lk, num_heads=num_heads, batch=batch,
                                       q_offset=q_offset, device=dev),
                    "exact, per-row closed form")
    if tiles is None:
        tiles = classify(ir, Lq, Lk, block_m, block_n, num_heads=num_heads, batch=batch,
                         q_offset=q_offset, inputs=inputs)
    return _count_tiles(ir, tiles, Lq, Lk, block_m, block_n, q_offset=q_offset, inputs=inputs,
                        device=tiles.device)


#: Pairs of PARTIAL tiles :func:`_count_tiles` evaluates at most (a few seconds on a CPU);
#: beyond it, a seeded sample of the PARTIAL tiles of about this many pairs.
EXACT_PAIRS = 1 << 28


def _count_tiles(ir, tiles, Lq, Lk, bm, bn, *, q_offset, inputs, device, chunk_elems=1 << 22,
                 slab_tiles=SLAB_TILES, exact_pairs=EXACT_PAIRS) -> tuple[int, str]:
    """Allowed pairs and how they were counted: FULL tiles by size, PARTIAL tiles evaluated,
    ``slab_tiles`` tiles of the grid at a time (memory bounded). Where the PARTIAL tiles
    hold more than ``exact_pairs`` pairs (a pattern every tile of which is PARTIAL, such as
    ``k % H == h``, is O(Lq * Lk) to evaluate), each PARTIAL tile is evaluated with
    probability ``exact_pairs`` / their pairs (a fixed seed: the same report every time),
    and the share of allowed pairs in the sampled tiles stands for every PARTIAL tile's."""
    off = query_offset(Lq, Lk, q_offset)
    Bn, Hn, nq, nk = tiles.shape
    rows = torch.clamp(Lq - torch.arange(nq, device=device) * bm, max=bm)
    cols = torch.clamp(Lk - torch.arange(nk, device=device) * bn, max=bn)
    step = max(1, chunk_elems // (bm * bn))
    ar_m = torch.arange(bm, device=device)
    ar_n = torch.arange(bn, device=device)
    n_partial = tile_counts(tiles)["partial"]
    rate = min(1.0, exact_pairs / max(1, n_partial * bm * bn))
    gen = torch.Generator(device="cpu").manual_seed(0)
    total, sampled, sampled_pairs, sampled_allowed, partial_pairs = 0, 0, 0, 0, 0
    # slabs of query-tile rows: the FULL counts' int64 and the PARTIAL tiles' indices stay
    # O(slab), not O(grid)
    for r, part in row_slabs(tiles, slab_tiles):
        size = rows[r:r + part.shape[2], None] * cols[None, :]
        full = (part == FULL).sum((0, 1))                 # [rows of the slab, nk], int64
        total += int((full * size).sum())
        is_partial = part == PARTIAL
        partial_pairs += int((is_partial.sum((0, 1)) * size).sum())
        idx = is_partial.nonzero()
        if rate < 1.0:
            idx = idx[(torch.rand(idx.shape[0], generator=gen) < rate).to(idx.device)]
        sampled += idx.shape[0]
        sampled_pairs += int((rows[idx[:, 2] + r] * cols[idx[:, 3]]).sum())
        sampled_allowed += _count_partial(ir, idx, r, Lq, Lk, bm, bn, off, Hn, inputs,
                                          device, step, ar_m, ar_n)
    if rate == 1.0:
        return total + sampled_allowed, "exact, full tiles + partial tiles evaluated"
    # the sampled tiles' share of allowed pairs, over every PARTIAL pair (a ratio: the
    # sample's own size does not enter)
    estimate = round(partial_pairs * sampled_allowed / max(1, sampled_pairs))
    return total + estimate, (f"estimated, full tiles + a seeded sample of {sampled:,} of "
                              f"the {n_partial:,} partial tiles evaluated")


def _count_partial(ir, idx, r, Lq, Lk, bm, bn, off, Hn, inputs, device, step, ar_m,
                   ar_n) -> int:
    """Allowed pairs of the PARTIAL tiles ``idx [n, 4]`` (batch, head, row - ``r``, column),
    evaluated ``step`` tiles at a time."""
    total = 0
    for s in range(0, idx.shape[0], step):
        bi, hi_, qi, ki = idx[s:s + step].unbind(1)
        qi = qi + r
        qrow = qi.view(-1, 1, 1) * bm + ar_m.view(1, bm, 1)
        kcol = ki.view(-1, 1, 1) * bn + ar_n.view(1, 1, bn)
        valid = (qrow < Lq) & (kcol < Lk)
        env = {"q": qrow.clamp(max=Lq - 1) + off, "k": kcol.clamp(max=Lk - 1),
               "h": hi_.view(-1, 1, 1), "b": bi.view(-1, 1, 1), "Lq": Lq, "Lk": Lk,
               "H": Hn}
        m = torch.as_tensor(evaluate(ir, env, inputs), device=device)
        total += int((m & valid).sum())
    return total


def _score_run(pattern, q_offset: int, compose_ops: Optional[int]) -> Optional[str]:
    """The score a call runs where tables are composed with their distance index
    (:mod:`spattn.ir.compose` at ``compose_ops``; None: nothing composed), as source; None
    otherwise (a negative ``q_offset`` runs the score as written)."""
    from .printer import to_source
    comp = None if q_offset < 0 else pattern_composition(pattern, compose_ops)
    return None if comp is None else to_source(comp.score)


_STRATEGY_WORDS = {
    "ranges": " (closed-form loop bounds, no metadata)",
    "table": " (CSR tile table built at call time)",
    "torch": " backend (fused SDPA calls over bands, segments or tiles of the tile "
             "classes: repr(pat.plan(q, k, v)) names them)",
}


def explain(pattern, Lq: int, Lk: Optional[int] = None, *, num_heads: int = 1,
            block_m: Optional[int] = None, block_n: Optional[int] = None,
            inputs: Optional[dict] = None, batch: int = 1, q_offset: Optional[int] = None,
            head_dim: int = 128, device=None, target: str = "cuda",
            gather: str = "copy", compose_ops: Optional[int] = COMPOSE_MIN_OPS,
            strategy: Optional[str] = None) -> Report:
    """A :class:`Report` on ``pattern`` at the given size (see the module docstring).

    ``target``: ``"cuda"`` or ``"cpu"``, whose cost model predicts the speedup; the tiles
    default to that target's forward tiles (``ir.cost.TILES``). ``gather``: how a layout's
    tokens reach the kernels (``SPATTN_LAYOUT_GATHER``: "copy" prices the gathers,
    "kernel" does not). ``compose_ops``: the threshold of the score's composed tables
    (``SPATTN_SCORE_COMPOSE``: ``runtime.compose.min_ops``; None: none composed).
    ``strategy``: what the call runs, as the runtime decides it (``"ranges"`` or
    ``"table"`` on CUDA, ``"torch"`` for the torch backend's plans); default the
    analysis's choice (:func:`spattn.ir.cost.pick_strategy`)."""
    if target not in TARGETS:
        raise SpattnValueError(f"target={target!r}: expected one of {', '.join(map(repr, TARGETS))}")
    block_m = TILES[target][0] if block_m is None else block_m
    block_n = TILES[target][1] if block_n is None else block_n
    Lk = Lq if Lk is None else Lk
    ir = pattern.ir if hasattr(pattern, "ir") else pattern
    inputs = dict(inputs or {})
    tiles = classify(pattern, Lq, Lk, block_m, block_n, num_heads=num_heads, batch=batch,
                     q_offset=q_offset, device=device, inputs=inputs)
    dev = tiles.device
    counts = tile_counts(tiles)
    declared = getattr(pattern, "inputs", None) or {}
    ins = validate_inputs(declared, inputs, batch=batch, num_heads=num_heads,
                          device=dev) if declared else {}
    allowed, method = allowed_pairs(ir, tiles, Lq, Lk, block_m, block_n, num_heads=num_heads,
                                    batch=batch, q_offset=q_offset, inputs=ins)
    del tiles           # (the cost model's grid below may be as large)
    total_pairs = batch * num_heads * Lq * Lk
    ntiles = counts["empty"] + counts["partial"] + counts["full"]
    per_pair = 4 * head_dim
    computed = (counts["full"] + counts["partial"]) * block_m * block_n * per_pair
    useful = allowed * per_pair
    strategy = strategy or pick_strategy(ir)
    model_counts = counts
    if (block_m, block_n) != TILES[target]:
        model_counts = tile_counts(classify(pattern, Lq, Lk, *TILES[target], num_heads=num_heads,
                                            batch=batch, q_offset=q_offset, device=device,
                                            inputs=inputs))
    speedup = predicted_speedup(model_counts, pick_strategy(ir) if strategy == "torch"
                                else strategy, COSTS[target], pairs=total_pairs)
    layout = None if inputs else _layout(ir, Lq, Lk, q_offset, num_heads, batch, allowed,
                                         block_m, block_n, computed // per_pair, pattern,
                                         target, gather)
    head_order = None if layout is not None else _head_order(
        ir, Lq, Lk, q_offset, num_heads, batch, allowed, block_m, block_n,
        computed // per_pair, target, ins or None, declared or None)
    return Report(
        head_order=head_order,
        score=(None if getattr(pattern, "score", None) is None else str(pattern.score)),
        score_run=_score_run(pattern, query_offset(Lq, Lk, q_offset), compose_ops),
        pattern=getattr(pattern, "source", None) or str(ir), Lq=Lq, Lk=Lk, num_heads=num_heads,
        batch=batch, block_m=block_m, block_n=block_n, head_dim=head_dim,
        allowed_pairs=allowed, total_pairs=total_pairs, density=allowed / total_pairs,
        tiles=dict(counts, total=ntiles),
        tile_density=(counts["full"] + counts["partial"]) / max(ntiles, 1),
        flops_computed=computed, flops_useful=useful, flops_dense=total_pairs * per_pair,
        efficiency=useful / computed if computed else 1.0,
        predicted_speedup=speedup, strategy=strategy, density_method=method, target=target,
        cost_model=dict(COSTS[target]), layout=layout)


def _used(used: bool) -> str:
    """How the report says whether ``SPATTN_LAYOUT=auto`` uses a layout or a head order."""
    return "used (SPATTN_LAYOUT=auto)" if used else \
        "not used (too short, or does not pay by the margin; SPATTN_LAYOUT=on forces it)"


def _head_order(ir, Lq, Lk, q_offset, num_heads, batch, allowed, block_m, block_n,
                computed, target, inputs=None, declared=None):
    """The per-head key order a call would consider (``ir.headorder.choose_head_order``,
    forced; the pattern's runtime ``inputs``, validated, read through the order as a call
    reads them; ``declared``: their declared dimensions), as a dict: the class, its sizes per head, the computed pairs (summed over the
    heads) and useful fraction in sequence order and in the head order, the predicted
    cost of each (the head order's with its gathers of k and v), and whether
    ``SPATTN_LAYOUT=auto`` uses it."""
    from .headorder import choose_head_order
    from .layout import AUTO_MIN_TOKENS
    ho = choose_head_order(ir, Lq, num_heads, Lk=Lk, q_offset=query_offset(Lq, Lk, q_offset),
                           block_m=block_m, block_n=block_n, force=True, target=target,
                           sequence=computed // batch, inputs=inputs, declared=declared,
                           batch=batch)
    if ho is None:
        return None
    useful = allowed // batch
    return {"order": str(ho), "class": str(ho.atom),
            "class_sizes": [min(ho.counts), max(ho.counts)],
            "computed_sequence": ho.computed_sequence, "computed_order": ho.computed_order,
            "fraction_sequence": useful / max(ho.computed_sequence, 1),
            "fraction_order": useful / max(ho.computed_order, 1),
            "cost_sequence": ho.cost_sequence, "cost_order": ho.cost_order,
            "gathered": ["k", "v"], "used": ho.pays and Lk >= AUTO_MIN_TOKENS}


def _layout(ir, Lq, Lk, q_offset, num_heads, batch, allowed, block_m, block_n, computed,
            pattern=None, target="cuda", gather="copy"):
    """The token layout a call would consider (``ir.layout.choose``, forced), as a dict:
    the layout, its box per grid axis, the computed pairs and the useful fraction in
    sequence order and in the layout, the predicted cost of each (``ir.layout.layout_cost``),
    and whether ``SPATTN_LAYOUT=auto`` uses it (it pays by ``ir.layout.MARGIN`` and the call
    has at least ``AUTO_MIN_TOKENS`` tokens); ``gather``: how its tokens reach the kernels
    (the layout's cost includes the gathers for "copy" only; "auto" prices the cheaper of
    "copy" and "kernel" and reports that way, or "box" on the GPU where the layout's boxes
    can be read through TMA, as ``gather``; the backward's way, "copy" or "kernel", as
    ``gather_backward``). The extra tokens before and after the grid are ``extra_before``
    and ``extra_after``."""
    from . import layout as LY
    r = LY.choose(ir, Lq, Lk, query_offset(Lq, Lk, q_offset), num_heads=num_heads,
                  block_m=block_m, block_n=block_n, force=True, declared=LY.declared(pattern),
                  sequence=computed // (batch * num_heads), target=target,
                  gathers=gather == "copy")
    # the boxes through TMA: where asked, or by "auto" on the GPU (the tensors' strides,
    # which a plan also checks, are not known here)
    box = LY.boxes_readable if gather == "box" or (gather == "auto" and target == "cuda"
                                                   and LY.AUTO_BOX) \
        else None
    r, gather, backward = LY.resolve_gathers(r, gather, target, force=True, box=box)
    if r is None:
        return None
    useful = r.useful if r.useful is not None else allowed // (batch * num_heads)
    return {"layout": str(r.layout), "grid": list(r.layout.grid.shape),
            "splits": list(r.layout.grid.splits), "box": list(r.layout.box_by_axis()),
            "extra_before": r.layout.grid.offset, "extra_after": r.layout.grid.suffix,
            "padded_tokens": r.layout.padded_size,
            "computed_sequence": r.computed_sequence, "computed_layout": r.computed_layout,
            "fraction_sequence": useful / max(r.computed_sequence, 1),
            "fraction_layout": useful / max(r.computed_layout, 1),
            "cost_sequence": r.cost_sequence, "cost_layout": r.cost_layout,
            "gather": gather, "gather_backward": backward,
            # a scored call on a grid with extra tokens runs in sequence order
            # (runtime.scores.layout_run)
            "used": r.pays and Lq >= LY.AUTO_MIN_TOKENS and not (
                getattr(pattern, "score", None) is not None
                and (r.layout.grid.offset or r.layout.grid.suffix))}
