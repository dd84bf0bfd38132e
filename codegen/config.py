"""Strategy and launch configuration of a generated kernel.

Thin on purpose: *which* strategy a pattern gets is decided by the analysis
(:func:`spattn.ir.cost.pick_strategy`); this module maps that choice to a
template and picks tile sizes, warps and pipeline stages per head dim, dtype and
device.  Everything in a :class:`KernelConfig` is part of the kernel cache key.

The backward has two tile shapes: the dK/dV kernel works on ``BLOCK_N1`` keys
(held in registers) against ``BLOCK_M1`` queries per step, the dQ kernel on
``BLOCK_M2`` queries against ``BLOCK_N2`` keys per step (FlashAttention-2's
32 x 128 / 128 x 32).  In a backward :class:`KernelConfig`, ``block_m``/``block_n``
are (M1, N1) and ``block_m2``/``block_n2`` are (M2, N2); a forward config has
``block_m2 = block_n2 = 0``.

Overrides, in order: explicit arguments (``kernel_file(..., strategy="table",
block_m=32)``; for the backward ``block_m1``, ``block_n1``, ``block_m2``, ``block_n2``
per kernel, or ``block_m``/``block_n`` for both), then ``overrides`` (the runtime passes
the ``SPATTN_*`` environment's, read and checked by :mod:`spattn.runtime.settings`), then
the defaults below. This module reads no environment: everything it depends on is an
argument. On CUDA, when neither arguments nor the environment set a tile, warps or
stages, the launchers autotune and pass the chosen configuration as explicit arguments
(``runtime/tune.py``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..dsl.errors import SpattnConfigError

from ..ir.cost import STRATEGIES

#: Most intervals a closed form may have for the ranges template: interval ``c`` is
#: emitted as ``2**c`` pieces (minus the earlier intervals), each split in three loops.
MAX_INTERVALS = 3


@dataclass(frozen=True)
class KernelConfig:
    strategy: str
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int
    dtype: str          # "fp16" | "bf16" | "fp32"
    block_m2: int = 0   # backward only: dQ tile (queries per program)
    block_n2: int = 0   # backward only: dQ tile (keys per step)
    loop: str = "split"  # "split", "fused" or (forward) "persistent": FWD_LOOPS, BWD_LOOPS
    tma: bool = False    # block loads/stores through TMA tensor descriptors (launcher decides)
    int64: bool = False  # 64-bit integer arithmetic (positions, ids, inputs, bounds, offsets)
    # a score's tables and functions (defaults for a pattern without a score): SCORE_LOADS,
    # SCORE_INDEX, and tanh as one tanh.approx.f32 (GPU only: the interpreter has no asm)
    score_load: str = "pair"
    score_index: str = "clamp"
    fast_tanh: bool = False
    # how rows of q, k, v and the outputs are addressed: ROWS ("table": through the row
    # tables Q_ROWS, K_ROWS of a permuted plan; pointer loads, never TMA; "box": a token
    # layout's boxes through multi-dimensional TMA descriptors, forward only)
    rows: str = "seq"
    # how the backward computes dQ: BWD_DQ ("kernel": the dQ kernel; "atomic": the dK/dV
    # kernel adds dS K into an fp32 accumulator)
    dq: str = "kernel"
    # backward only: the gradient of the forward's lse output, DLSE [B, H, Nq] fp32, enters
    # the row statistics (delta - dlse): a loss on return_lse=True's lse
    lse_grad: bool = False

    def as_dict(self) -> dict:
        """The fields, the cache key's part (``dq`` and ``lse_grad`` only where they are not
        the defaults, so that every other configuration keeps its key and kernel names)."""
        d = asdict(self)
        if d["dq"] == "kernel":
            del d["dq"]
        if not d["lse_grad"]:
            del d["lse_grad"]
        return d


def dtype_name(dtype) -> str:
    """``"fp16"``, ``"bf16"`` or ``"fp32"`` from a torch dtype or a string."""
    s = str(dtype).replace("torch.", "")
    table = {"float16": "fp16", "half": "fp16", "fp16": "fp16",
             "bfloat16": "bf16", "bf16": "bf16",
             "float32": "fp32", "float": "fp32", "fp32": "fp32"}
    if s not in table:
        raise ValueError(f"unsupported dtype {dtype!r}: expected float16, bfloat16 or float32")
    return table[s]


def next_pow2(n: int) -> int:
    return 1 << max(4, (int(n) - 1).bit_length())


def default_tiles(head_dim: int, dtype: str, kind: str = "fwd", *, interpret: bool = False,
                  pair_loads: bool = False, tables: bool = False):
    """Forward ``(block_m, block_n, num_warps, num_stages)`` defaults
    (``kind="bwd"``: see :func:`default_bwd_tiles`).

    GPU defaults: 64x64 tiles with 4 warps and 3 pipeline stages for D <= 128 in 16-bit.
    On an H200 (bf16, TMA loads, ``benchmarks/tiles_ab.py``) they were faster than
    128x64 tiles (8 warps; 4 at D = 64) in all 29 cases measured (13 patterns, N = 1K-64K,
    B = 1 and 8, D = 64 and 128): 3-28% on most, 12% on causal at 16K, 3.5x where a pattern's blocks
    are 64 wide (BigBird), and faster than 128x128 in 28 of them (docs/codegen.md).
    ``pair_loads``: the score reads a float table at an index that varies within a tile
    (:func:`score_pair_loads`: a learned relative bias, T5 buckets): 64 x 32 tiles with
    2 stages. On an H200 (bf16, D = 128, 16K) that forward took 21% less time than the
    64 x 64 / 3-stage default on ``window(1024)`` with ``rel[h, q - k]``, 32% less on a
    13 x 13 neighbourhood with a 2-D relative position bias and 30% less on T5's causal
    buckets, while on scores without such loads (ALiBi, softcap, a per-head temperature)
    it was 8-10% slower (``benchmarks/results/score_tiles_h200_*``).
    Smaller tiles for D > 128 (shared memory) and for fp32 (twice the bytes). ``tables``
    (the score reads float tables, which may be learned) in fp32: the dQ kernel's tile
    shape, so that the forward and the dQ kernel (which sums the tables' gradients) round
    each q·k product alike. A learned slope's gradient amplifies the difference between
    the forward's probabilities (in ``delta = rowsum(dO * O)``) and the backward's: on an
    H200 with scores in the hundreds its error fell from 6.9e-4 to 9.6e-5 of the largest
    entry with matching tiles (``benchmarks/results/table_grad_precision_h200_*``). Under
    the interpreter (CPU tests) tiles are small: the interpreter's cost is per program and
    per element.
    """
    if kind == "bwd":
        m1, n1, _, _, nw, ns = default_bwd_tiles(head_dim, dtype, interpret=interpret)
        return m1, n1, nw, ns
    if interpret:
        return 32, 32, 4, 1
    if dtype == "fp32":
        if tables and head_dim <= 128:
            _, _, m2, n2, _, _ = default_bwd_tiles(head_dim, dtype)
            return m2, n2, 4, 2
        return (64, 32, 4, 2) if head_dim <= 128 else (32, 32, 4, 1)
    if head_dim <= 128:
        return (64, 32, 4, 2) if pair_loads else (64, 64, 4, 3)
    return 64, 32, 8, 2


def score_pair_loads(pattern) -> bool:
    """Whether ``pattern``'s score reads a float table at an index that depends on the
    pair (on anything but the batch and the head): one gather per pair in the kernel."""
    from ..ir.nodes import float_loads, free_vars
    score = getattr(pattern, "score", None)
    if score is None:
        return False
    return any(free_vars(i) - {"b", "h", "Lq", "Lk", "H"}
               for load in float_loads(score) for i in load.index)


def score_tile_flags(pattern) -> dict:
    """The arguments of :func:`default_tiles` that ``pattern``'s score decides:
    ``pair_loads`` (:func:`score_pair_loads`) and ``tables`` (it reads float tables)."""
    return {"pair_loads": score_pair_loads(pattern),
            "tables": bool(getattr(pattern, "score_inputs", None))}


def default_bwd_tiles(head_dim: int, dtype: str, *, interpret: bool = False):
    """Backward ``(block_m1, block_n1, block_m2, block_n2, num_warps, num_stages)``.

    dK/dV keeps ``BLOCK_N1`` keys (K, V, dK, dV) in registers and streams ``BLOCK_M1``
    queries per step; dQ keeps ``BLOCK_M2`` queries (Q, dO, dQ) and streams ``BLOCK_N2``
    keys.  16-bit D <= 128: 32 x 64 / 64 x 32, 4 warps, 3 stages. On an H200 (bf16,
    D = 128, N = 16384, TMA forward, ``benchmarks/tiles_ab.py --kind bwd``) against 64 x
    128 / 128 x 64 with 8 warps it took 6-48% less forward+backward time on windows,
    streaming, documents (20 and 100), Longformer and BigBird, 2% more on causal and 8%
    more on 1000 documents (docs/codegen.md). 16-bit D > 128: 32 x 64 / 64 x 32, 4 warps,
    2 stages (sized for shared memory; unmeasured). fp32 keeps small square tiles
    (registers, shared memory). The interpreter uses small, deliberately different
    shapes for the two kernels so the CPU tests exercise distinct dK/dV and dQ tiles.
    """
    if interpret:
        return 16, 32, 32, 16, 4, 1
    if dtype == "fp32":
        return 32, 32, 32, 32, 4, 1
    if head_dim > 128:
        return 32, 64, 64, 32, 4, 2
    return 32, 64, 64, 32, 4, 3


def choice(value, name: str, allowed: tuple, *, default=None) -> str:
    """A named option (``value``, else ``default``, else ``allowed[0]``), checked."""
    v = str(value or default or allowed[0]).strip().lower()
    if v not in allowed:
        raise SpattnConfigError(f"{name}={value!r}: expected one of "
                                f"{', '.join(map(repr, allowed))}")
    return v


#: The largest tile side a kernel takes (a tile of 256 x 256 fp32 scores is already 256 KiB
#: of registers; past it Triton refuses the block, or its int32 index arithmetic wraps).
MAX_BLOCK = 256


def is_block(v) -> bool:
    """Whether ``v`` is a tile side the kernels take: an int (not a bool), a power of two in
    16..:data:`MAX_BLOCK` (arguments, ``SPATTN_*`` variables and tuning files alike)."""
    return isinstance(v, int) and not isinstance(v, bool) and 16 <= v <= MAX_BLOCK \
        and not v & (v - 1)


def is_warps(v) -> bool:
    """Whether ``v`` is a ``num_warps`` the launchers take: 1, 2, 4, 8, 16 or 32."""
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 32 and not v & (v - 1)


def is_stages(v) -> bool:
    """Whether ``v`` is a ``num_stages`` the launchers take: an int in 1..8."""
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 8


def check_blocks(**blocks):
    """SpattnConfigError naming the first of ``blocks`` (name: tile side) that is no tile
    side the kernels take (:func:`is_block`)."""
    for name, v in blocks.items():
        if not is_block(v):
            raise SpattnConfigError(
                f"{name} must be a power of two in 16..{MAX_BLOCK} (16, 32, 64, 128, 256), "
                f"got {v!r}")


def pick(pattern, kind: str = "fwd", *, head_dim: int = 128, dtype="bf16", strategy=None,
         block_m=None, block_n=None, num_warps=None, num_stages=None, closed_form=None,
         interpret=False, block_m1=None, block_n1=None, block_m2=None, block_n2=None,
         loop=None, tma=None, int64=None, score_load=None, score_index=None, fast_tanh=None,
         rows=None, dq=None, lse_grad=None, overrides=None, **_ignored) -> KernelConfig:
    """The :class:`KernelConfig` of ``pattern``'s ``kind`` kernel for a head dim and dtype.

    Backward: ``block_m1``/``block_n1`` (dK/dV) and ``block_m2``/``block_n2`` (dQ);
    ``block_m``/``block_n`` set both kernels' tiles at once.  ``int64``: 64-bit integer
    arithmetic in the kernel (for positions, input values or bounds beyond int32).
    ``score_load``, ``score_index``, ``fast_tanh``: how a score's tables are read and its
    tanh computed (:data:`SCORE_LOADS`, :data:`SCORE_INDEX`; ignored without a score).
    ``rows``: how token rows are addressed (:data:`ROWS`; "table" turns TMA off).
    ``dq`` (backward): how dQ is computed (:data:`BWD_DQ`; a pattern with float score
    tables keeps "kernel", whose dQ kernel accumulates the tables' gradients).
    ``lse_grad`` (backward): the kernels take the gradient of the lse output (``DLSE``).
    ``interpret``: the tile defaults of Triton's CPU interpreter.  ``overrides``: the
    environment's options of this kind (:meth:`spattn.runtime.settings.Settings.overrides`),
    below the explicit arguments.
    """
    env = overrides or {}
    dt = dtype_name(dtype)
    strategy = strategy or env.get("strategy")
    if strategy is None:
        strategy = analysis_strategy(pattern, closed_form)
    if strategy not in STRATEGIES:
        raise SpattnConfigError(f"unknown strategy {strategy!r} (the option strategy= or the "
                                "environment variable SPATTN_STRATEGY): expected one of "
                                f"{', '.join(map(repr, STRATEGIES))}")
    rows = choice(rows, "rows", ROWS)
    if rows == "table":
        tma = False             # rows addressed one by one: the pointer path
    elif rows == "box" and (kind != "fwd" or not tma):
        raise SpattnConfigError(f"rows='box' is a forward kernel's with tma=True (kind "
                                f"{kind!r}, tma {tma!r})")
    if kind == "bwd":
        m1, n1, m2, n2, nw, ns = default_bwd_tiles(head_dim, dt, interpret=interpret)
        m1 = block_m1 or block_m or env.get("block_m1") or m1
        n1 = block_n1 or block_n or env.get("block_n1") or n1
        m2 = block_m2 or block_m or env.get("block_m2") or m2
        n2 = block_n2 or block_n or env.get("block_n2") or n2
        nw = num_warps or env.get("num_warps") or nw
        ns = num_stages or env.get("num_stages") or ns
        check_blocks(block_m1=m1, block_n1=n1, block_m2=m2, block_n2=n2)
        loop = choice(loop, "loop", BWD_LOOPS, default=env.get("loop"))
        dq = choice(dq, "dq", BWD_DQ, default=env.get("dq"))
        if getattr(pattern, "score_inputs", None):
            dq = "kernel"
        return KernelConfig(strategy, int(m1), int(n1), next_pow2(head_dim), int(nw), int(ns),
                            dt, int(m2), int(n2), loop=loop, tma=bool(tma), int64=bool(int64),
                            rows=rows, dq=dq, lse_grad=bool(lse_grad),
                            **_score_flags(pattern, score_load, score_index, fast_tanh))
    bm, bn, nw, ns = default_tiles(head_dim, dt, kind, interpret=interpret,
                                   **score_tile_flags(pattern))
    bm = block_m or env.get("block_m") or bm
    bn = block_n or env.get("block_n") or bn
    nw = num_warps or env.get("num_warps") or nw
    ns = num_stages or env.get("num_stages") or ns
    check_blocks(block_m=bm, block_n=bn)
    loop = choice(loop, "loop", FWD_LOOPS, default=env.get("loop"))
    if rows == "box" and loop == "persistent":
        loop = "fused"          # (the persistent kernel has no TMA loads: see below)
    # The persistent kernel keeps pointer loads: Triton 3.6 fails to compile TMA loads in
    # its flattened loop nest on Hopper (TritonNvidiaGPUTMALoweringPass: an scf.if yields
    # a mutable and an immutable shared-memory descriptor).
    return KernelConfig(strategy, int(bm), int(bn), next_pow2(head_dim), int(nw), int(ns), dt,
                        loop=loop, tma=bool(tma) and loop != "persistent", int64=bool(int64),
                        rows=rows, **_score_flags(pattern, score_load, score_index, fast_tanh))


#: How the kernels address the rows of q, k, v, the outputs and their gradients: "seq"
#: (row ``i`` of the kernel's slots is row ``i`` of the tensors) or "table" (a permuted
#: plan's row tables: slot ``i`` of the queries is row ``Q_ROWS[i]`` of q, o, lse, dO, dQ,
#: slot ``j`` of the keys row ``K_ROWS[j]`` of k, v, dK, dV; ``-1`` marks a padding slot,
#: which loads row 0 and stores nothing) or "box" (the forward of a token layout: a tile of
#: slots is a sub-box of one of the layout's boxes, read and written through 5-D TMA
#: descriptors over the caller's ``[B*H, A0, A1, A2, D]`` (or ``[B, H, A1, A2, D]``);
#: docs/layouts.md, "How the kernels reach the rows"). The kernels still work in slot order.
ROWS = ("seq", "table", "box")

#: How a score's table loads are placed: "pair" (after the q·k dot, beside the score's
#: arithmetic), "early" (every line that does not read ``s`` -- the indices and the
#: loads, whose addresses depend on positions only -- before the K load and the dot, so
#: that the loads' latency overlaps the MMA), "gather" (early, and a table whose last
#: index is a function of ``q - k`` alone read as one contiguous slice per tile, spread
#: over the tile with ``tl.gather``: ``codegen.emit.gather_form``; other tables as
#: "early"), or "ahead" (the default: each step of a tile loop -- the forward's and dQ's
#: over keys, dK/dV's over queries -- loads the next tile's entries, held in registers
#: for the next step, the loop's first tile's before the loop; kernels through row tables
#: or boxes place them as "pair").
SCORE_LOADS = ("pair", "early", "gather", "ahead")
#: How a score's table index is kept in range: "mask" (a predicated load per pair, an
#: index out of range reads 0), "clamp" (the index clamped into [0, size - 1]: what the
#: softmax uses is unchanged, since every pair of the call's domain has its indices in
#: range -- the call's bounds check -- and the others are masked to -inf or never stored),
#: "free" (no check: only where the runtime proved every index the kernels compute in
#: range, padded tiles included: ``runtime.scores.indices_in_range``).
SCORE_INDEX = ("mask", "clamp", "free")


def _score_flags(pattern, score_load, score_index, fast_tanh) -> dict:
    """The score fields of a :class:`KernelConfig`: the defaults for a pattern without a
    score (one kernel file whatever the options), else the given ones checked."""
    if getattr(pattern, "score", None) is None:
        return {}
    return {"score_load": choice(score_load, "score_load", SCORE_LOADS, default="ahead"),
            "score_index": choice(score_index, "score_index", SCORE_INDEX, default="clamp"),
            "fast_tanh": bool(fast_tanh)}


#: Forward tile-loop variants: "split" runs each interval piece (ranges) or span (table)
#: as three loops (masked, unmasked, masked: each software-pipelined on its own); "fused"
#: runs one loop with a uniform per-tile branch around the predicate (one pipeline fill;
#: faster on short rows, slower on long causal rows: measured in docs/codegen.md);
#: "persistent" launches about one program per resident slot of the device and loops each
#: over query tiles (with the fused key loop), the work-item loop flattened with the key
#: loop so the pipeline stays full across query tiles.  The table strategy's CSR lists
#: are always two loops (PARTIAL, FULL); the variants apply to its spans.
FWD_LOOPS = ("split", "fused", "persistent")
#: Backward tile-loop variants (dK/dV and dQ alike): "split" or "fused", as above.
BWD_LOOPS = ("split", "fused")
#: How the backward computes dQ: "kernel" (the dQ kernel, one program per query tile,
#: recomputing QK^T and dP: 7 tile matmuls per pair in all, deterministic) or "atomic"
#: (FlashAttention-2's: the dK/dV kernel also forms dS K per pair and adds it atomically
#: into an fp32 accumulator; a small kernel writes the row statistics first: 5 matmuls per
#: pair, not deterministic). Patterns with float score tables keep "kernel" (their
#: gradients are accumulated in the dQ kernel).
BWD_DQ = ("kernel", "atomic")


def analysis_strategy(pattern, closed_form=None) -> str:
    """The analysis's choice, downgraded to "table" when the closed form is unusable."""
    from ..ir.cost import pick_strategy
    choice = pick_strategy(pattern.ir)
    if choice == "ranges":
        cf = closed_form if closed_form is not None else get_closed_form(pattern)
        if cf is None or not ranges_ok(cf):
            return "table"
    return choice if choice in STRATEGIES else "table"


def ranges_ok(cf) -> bool:
    return 0 < len(cf.rows) <= MAX_INTERVALS and 0 < len(cf.cols) <= MAX_INTERVALS


def get_closed_form(pattern):
    """``ir.ranges.closed_form`` of the pattern (None if it has none)."""
    from ..ir.ranges import closed_form
    try:
        return closed_form(pattern.ir)
    except Exception as e:  # the analysis failing must not stop the table strategy
        import warnings
        warnings.warn(f"spattn: closed_form failed for {pattern.source!r} ({e!r}); "
                      "using the tile table", RuntimeWarning, stacklevel=3)
        return None
