"""Strategy and launch configuration of a generated kernel.

Thin on purpose: *which* strategy a pattern gets is decided by the analysis
(:func:`spattn.ir.strategy.pick_strategy`); this module maps that choice to a
template and picks tile sizes, warps and pipeline stages per head dim, dtype and
device.  Everything in a :class:`KernelConfig` is part of the kernel cache key.

Overrides, in order: explicit arguments (``kernel_file(..., strategy="table",
block_m=32)``), then the environment (``SPATTN_STRATEGY=ranges|table``,
``SPATTN_BLOCK_M``, ``SPATTN_BLOCK_N``, ``SPATTN_NUM_WARPS``, ``SPATTN_NUM_STAGES``),
then the defaults below.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

STRATEGIES = ("ranges", "table")

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

    def as_dict(self) -> dict:
        return asdict(self)


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


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def default_tiles(head_dim: int, dtype: str, kind: str = "fwd", *, interpret: bool = False):
    """(block_m, block_n, num_warps, num_stages) defaults.

    GPU (Hopper) defaults follow the FlashAttention-2 Triton kernels: 128x64 tiles for
    D <= 128 in 16-bit, 8 warps for D = 128 (4 for D <= 64), 3 pipeline stages; smaller
    tiles for D > 128 (shared memory) and for fp32 (twice the bytes).  The backward uses
    64x64 (it holds dK, dV and K, V of one key tile in registers).  Under the interpreter
    (CPU tests) tiles are small: the interpreter's cost is per program and per element.
    """
    if interpret:
        return 32, 32, 4, 1
    if kind == "bwd":
        if dtype == "fp32" or head_dim > 128:
            return 32, 32, 4, 1
        return 64, 64, (4 if head_dim <= 64 else 8), 2
    if dtype == "fp32":
        return (64, 32, 4, 2) if head_dim <= 128 else (32, 32, 4, 1)
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        return 128, 64, 8, 3
    return 64, 32, 8, 2


def _env_int(name: str):
    v = os.environ.get(name)
    return int(v) if v else None


def pick(pattern, kind: str = "fwd", *, head_dim: int = 128, dtype="bf16", strategy=None,
         block_m=None, block_n=None, num_warps=None, num_stages=None, closed_form=None,
         interpret=None, **_ignored) -> KernelConfig:
    """The :class:`KernelConfig` of ``pattern``'s ``kind`` kernel for a head dim and dtype."""
    dt = dtype_name(dtype)
    interpret = interpret_mode() if interpret is None else interpret
    strategy = strategy or os.environ.get("SPATTN_STRATEGY") or None
    if strategy is None:
        strategy = analysis_strategy(pattern, closed_form)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: expected one of {STRATEGIES}")
    bm, bn, nw, ns = default_tiles(head_dim, dt, kind, interpret=interpret)
    bm = block_m or _env_int("SPATTN_BLOCK_M") or bm
    bn = block_n or _env_int("SPATTN_BLOCK_N") or bn
    nw = num_warps or _env_int("SPATTN_NUM_WARPS") or nw
    ns = num_stages or _env_int("SPATTN_NUM_STAGES") or ns
    for name, v in (("block_m", bm), ("block_n", bn)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    return KernelConfig(strategy, int(bm), int(bn), next_pow2(head_dim), int(nw), int(ns), dt)


def analysis_strategy(pattern, closed_form=None) -> str:
    """The analysis's choice, downgraded to "table" when the closed form is unusable."""
    try:
        from ..ir.strategy import pick_strategy
    except ImportError:
        choice = "ranges" if not pattern.inputs else "table"
    else:
        try:
            choice = pick_strategy(pattern.ir)
        except TypeError:      # a signature taking the Pattern
            choice = pick_strategy(pattern)
    if choice == "ranges":
        cf = closed_form if closed_form is not None else get_closed_form(pattern)
        if cf is None or not ranges_ok(cf):
            return "table"
    return choice if choice in STRATEGIES else "table"


def ranges_ok(cf) -> bool:
    return 0 < len(cf.rows) <= MAX_INTERVALS and 0 < len(cf.cols) <= MAX_INTERVALS


def get_closed_form(pattern):
    """``ir.ranges.closed_form`` of the pattern (None if not affine or not available)."""
    try:
        from ..ir.ranges import closed_form
    except ImportError:
        return None
    try:
        try:
            return closed_form(pattern.ir)
        except TypeError:   # an older signature taking the tile sizes
            return closed_form(pattern.ir, 64, 64)
    except Exception as e:  # the analysis failing must not stop the table strategy
        import warnings
        warnings.warn(f"spattn: closed_form failed for {pattern.source!r} ({e!r}); "
                      "using the tile table", RuntimeWarning, stacklevel=3)
        return None
