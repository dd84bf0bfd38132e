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
block_m=32)``; for the backward ``block_m1``, ``block_n1``, ``block_m2``,
``block_n2`` per kernel, or ``block_m``/``block_n`` for both), then the
environment, then the defaults below.  On CUDA, when neither arguments nor the
environment set a tile, warps or stages, the launchers autotune and pass the chosen
configuration as explicit arguments (``runtime/tune.py``; ``SPATTN_AUTOTUNE=0`` turns
it off).  Environment (all optional):

=====================  ==========================================================
``SPATTN_STRATEGY``    ``ranges`` or ``table``
``SPATTN_BLOCK_M/N``   forward tile (queries / keys)
``SPATTN_FWD_WARPS``   forward ``num_warps`` (fallback ``SPATTN_NUM_WARPS``)
``SPATTN_FWD_STAGES``  forward ``num_stages`` (fallback ``SPATTN_NUM_STAGES``)
``SPATTN_BWD_BLOCK_M1`` / ``_N1``   dK/dV tile: queries per step / keys per program
``SPATTN_BWD_BLOCK_M2`` / ``_N2``   dQ tile: queries per program / keys per step
``SPATTN_BWD_WARPS``   backward ``num_warps`` (fallback ``SPATTN_NUM_WARPS``)
``SPATTN_BWD_STAGES``  backward ``num_stages`` (fallback ``SPATTN_NUM_STAGES``)
``SPATTN_FWD_LOOP``    forward loop: ``split``, ``fused`` or ``persistent``
``SPATTN_BWD_LOOP``    backward loops: ``split`` or ``fused``
=====================  ==========================================================
"""
from __future__ import annotations

import os
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


#: ``os.environ``'s own dict (bytes names and values) where it has one: POSIX CPython, whose
#: ``os.environ[...] = ...``, ``del`` and ``putenv`` through the mapping all update it.
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
if not (isinstance(_ENV_DATA, dict) and all(type(k) is bytes for k in list(_ENV_DATA)[:1])):
    _ENV_DATA = None
_ENV_KEYS: dict = {}


def getenv(name: str, default=None):
    """``os.environ.get(name, default)``, read the way the per-call path can afford.

    A launch reads a dozen ``SPATTN_*`` settings (and ``TRITON_INTERPRET``) on every call,
    so that a changed environment takes effect at the next call; most are unset, and
    ``os.environ.get`` of an unset name costs ~0.5 us (the name is encoded, a ``KeyError``
    raised and caught). On POSIX CPython this reads the mapping's underlying dict instead
    (~15 ns), which holds exactly what ``os.environ`` holds; elsewhere it is
    ``os.environ.get``.
    """
    if _ENV_DATA is None:
        return os.environ.get(name, default)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.fsencode(name)
    v = _ENV_DATA.get(key)
    return default if v is None else os.fsdecode(v)


#: Spellings of a switched-on / switched-off environment flag (``SPATTN_TMA``,
#: ``SPATTN_AUTOTUNE``).
FLAG_ON = ("1", "true", "on", "yes")
FLAG_OFF = ("0", "false", "off", "no")


def interpret_mode() -> bool:
    return getenv("TRITON_INTERPRET", "0") not in ("", "0")


def default_tiles(head_dim: int, dtype: str, kind: str = "fwd", *, interpret: bool = False):
    """Forward ``(block_m, block_n, num_warps, num_stages)`` defaults
    (``kind="bwd"``: see :func:`default_bwd_tiles`).

    GPU (Hopper) defaults follow the FlashAttention-2 Triton kernels: 128x64 tiles for
    D <= 128 in 16-bit, 8 warps for D = 128 (4 for D <= 64), 3 pipeline stages (measured
    on an H200, bf16, D = 128: the best or within 2% of it for causal; window-like
    patterns prefer 64x64 with 4 warps, which autotuning finds: ``runtime/tune.py``); smaller
    tiles for D > 128 (shared memory) and for fp32 (twice the bytes).  Under the
    interpreter (CPU tests) tiles are small: the interpreter's cost is per program and
    per element.
    """
    if kind == "bwd":
        m1, n1, _, _, nw, ns = default_bwd_tiles(head_dim, dtype, interpret=interpret)
        return m1, n1, nw, ns
    if interpret:
        return 32, 32, 4, 1
    if dtype == "fp32":
        return (64, 32, 4, 2) if head_dim <= 128 else (32, 32, 4, 1)
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        return 128, 64, 8, 3
    return 64, 32, 8, 2


def default_bwd_tiles(head_dim: int, dtype: str, *, interpret: bool = False):
    """Backward ``(block_m1, block_n1, block_m2, block_n2, num_warps, num_stages)``.

    dK/dV keeps ``BLOCK_N1`` keys (K, V, dK, dV) in registers and streams ``BLOCK_M1``
    queries per step; dQ keeps ``BLOCK_M2`` queries (Q, dO, dQ) and streams ``BLOCK_N2``
    keys.  16-bit D <= 128: 64 x 128 / 128 x 64, 8 warps, 3 stages -- the best of
    ``benchmarks/sweep.py`` on an H200 (bf16, D = 128, N = 16384: 413 / 296 / 259 TF/s
    fwd+bwd for causal / window / streaming, against 159 / 123 / 105 for the Triton
    tutorial's 32 x 128 / 128 x 32 with 4 warps and 4 stages, which spills registers).
    16-bit D > 128: 32 x 64 / 64 x 32, 4 warps, 2 stages (sized for shared memory;
    unmeasured).  fp32 keeps small square tiles (registers, shared memory).  The
    interpreter uses small, deliberately different shapes for the two kernels so the
    CPU tests exercise distinct dK/dV and dQ tiles.
    """
    if interpret:
        return 16, 32, 32, 16, 4, 1
    if dtype == "fp32":
        return 32, 32, 32, 32, 4, 1
    if head_dim > 128:
        return 32, 64, 64, 32, 4, 2
    return 64, 128, 128, 64, 8, 3


def _env_int(name: str):
    """The integer value of ``$name`` (None when unset or empty), checked: a positive int;
    ``*_WARPS`` a power of two up to 32 (Triton's rule), ``*_STAGES`` 1..8."""
    v = getenv(name)
    if not v:
        return None
    try:
        n = int(v.strip())
    except ValueError:
        n = None
    if name.endswith("_WARPS"):
        ok, want = n is not None and 1 <= n <= 32 and not n & (n - 1), "1, 2, 4, 8, 16 or 32"
    elif name.endswith("_STAGES"):
        ok, want = n is not None and 1 <= n <= 8, "an integer in 1..8"
    else:
        ok, want = n is not None and n >= 1, "a positive integer"
    if not ok:
        raise SpattnConfigError(f"{name}={v!r}: expected {want} (or unset it for the default)")
    return n


#: Environment overrides read by :func:`pick`, per kernel kind (launchers fold their
#: current values into the config memo key: see :func:`env_overrides`).
ENV_VARS = {
    "fwd": ("SPATTN_BLOCK_M", "SPATTN_BLOCK_N", "SPATTN_FWD_WARPS", "SPATTN_FWD_STAGES",
            "SPATTN_NUM_WARPS", "SPATTN_NUM_STAGES", "SPATTN_FWD_LOOP", "SPATTN_STRATEGY"),
    "bwd": ("SPATTN_BWD_BLOCK_M1", "SPATTN_BWD_BLOCK_N1", "SPATTN_BWD_BLOCK_M2",
            "SPATTN_BWD_BLOCK_N2", "SPATTN_BWD_WARPS", "SPATTN_BWD_STAGES",
            "SPATTN_NUM_WARPS", "SPATTN_NUM_STAGES", "SPATTN_BWD_LOOP", "SPATTN_STRATEGY"),
}


def env_overrides(kind: str = "fwd") -> tuple:
    """The set ``SPATTN_*`` launch overrides of ``kind`` as a hashable tuple."""
    return tuple((n, v) for n in ENV_VARS[kind] if (v := getenv(n)))


def choice(value, name: str, env: str, allowed: tuple) -> str:
    """A named option from its argument, else ``$env``, else ``allowed[0]``; checked
    (a :class:`SpattnConfigError` names the argument or the variable the value came from)."""
    given = value or getenv(env)
    v = str(given or allowed[0]).strip().lower()
    if v not in allowed:
        where = f"{name}={given!r}" if value else f"{env}={given!r}"
        raise SpattnConfigError(f"{where}: expected one of {', '.join(map(repr, allowed))} "
                                f"(the option {name}= or the environment variable {env})")
    return v


#: The environment variable behind each tile option (for messages).
_BLOCK_ENV = {"block_m": "SPATTN_BLOCK_M", "block_n": "SPATTN_BLOCK_N",
              "block_m1": "SPATTN_BWD_BLOCK_M1", "block_n1": "SPATTN_BWD_BLOCK_N1",
              "block_m2": "SPATTN_BWD_BLOCK_M2", "block_n2": "SPATTN_BWD_BLOCK_N2"}


def _pow2_check(**blocks):
    for name, v in blocks.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v & (v - 1):
            raise SpattnConfigError(
                f"{name} must be a power of two >= 16 (16, 32, 64, 128, ...), got {v!r} "
                f"(set by the option {name}= or the environment variable {_BLOCK_ENV[name]})")


def pick(pattern, kind: str = "fwd", *, head_dim: int = 128, dtype="bf16", strategy=None,
         block_m=None, block_n=None, num_warps=None, num_stages=None, closed_form=None,
         interpret=None, block_m1=None, block_n1=None, block_m2=None, block_n2=None,
         loop=None, tma=None, int64=None, **_ignored) -> KernelConfig:
    """The :class:`KernelConfig` of ``pattern``'s ``kind`` kernel for a head dim and dtype.

    Backward: ``block_m1``/``block_n1`` (dK/dV) and ``block_m2``/``block_n2`` (dQ);
    ``block_m``/``block_n`` set both kernels' tiles at once.  ``int64``: 64-bit integer
    arithmetic in the kernel (for positions, input values or bounds beyond int32).
    """
    dt = dtype_name(dtype)
    interpret = interpret_mode() if interpret is None else interpret
    strategy = strategy or getenv("SPATTN_STRATEGY") or None
    if strategy is None:
        strategy = analysis_strategy(pattern, closed_form)
    if strategy not in STRATEGIES:
        raise SpattnConfigError(f"unknown strategy {strategy!r} (the option strategy= or the "
                                "environment variable SPATTN_STRATEGY): expected one of "
                                f"{', '.join(map(repr, STRATEGIES))}")
    if kind == "bwd":
        m1, n1, m2, n2, nw, ns = default_bwd_tiles(head_dim, dt, interpret=interpret)
        m1 = block_m1 or block_m or _env_int("SPATTN_BWD_BLOCK_M1") or m1
        n1 = block_n1 or block_n or _env_int("SPATTN_BWD_BLOCK_N1") or n1
        m2 = block_m2 or block_m or _env_int("SPATTN_BWD_BLOCK_M2") or m2
        n2 = block_n2 or block_n or _env_int("SPATTN_BWD_BLOCK_N2") or n2
        nw = (num_warps or _env_int("SPATTN_BWD_WARPS") or _env_int("SPATTN_NUM_WARPS") or nw)
        ns = (num_stages or _env_int("SPATTN_BWD_STAGES") or _env_int("SPATTN_NUM_STAGES")
              or ns)
        _pow2_check(block_m1=m1, block_n1=n1, block_m2=m2, block_n2=n2)
        loop = choice(loop, "loop", "SPATTN_BWD_LOOP", BWD_LOOPS)
        return KernelConfig(strategy, int(m1), int(n1), next_pow2(head_dim), int(nw), int(ns),
                            dt, int(m2), int(n2), loop=loop, tma=bool(tma), int64=bool(int64))
    bm, bn, nw, ns = default_tiles(head_dim, dt, kind, interpret=interpret)
    bm = block_m or _env_int("SPATTN_BLOCK_M") or bm
    bn = block_n or _env_int("SPATTN_BLOCK_N") or bn
    nw = num_warps or _env_int("SPATTN_FWD_WARPS") or _env_int("SPATTN_NUM_WARPS") or nw
    ns = num_stages or _env_int("SPATTN_FWD_STAGES") or _env_int("SPATTN_NUM_STAGES") or ns
    _pow2_check(block_m=bm, block_n=bn)
    loop = choice(loop, "loop", "SPATTN_FWD_LOOP", FWD_LOOPS)
    # The persistent kernel keeps pointer loads: Triton 3.6 fails to compile TMA loads in
    # its flattened loop nest on Hopper (TritonNvidiaGPUTMALoweringPass: an scf.if yields
    # a mutable and an immutable shared-memory descriptor).
    return KernelConfig(strategy, int(bm), int(bn), next_pow2(head_dim), int(nw), int(ns), dt,
                        loop=loop, tma=bool(tma) and loop != "persistent", int64=bool(int64))


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
