"""The ``SPATTN_*`` environment settings, read and checked in one place.

Every setting a call depends on comes from :func:`current`, which reads the environment
(and ``TRITON_INTERPRET``) and returns a frozen :class:`Settings`. The raw strings are
read on every call without a plan (a changed environment takes effect at the next call;
the read costs ~15 ns per variable, :func:`getenv`); they are parsed and checked only
when they differ from the last ones seen, and a bad value is a
:class:`~spattn.SpattnConfigError` naming the variable and what it accepts. A call with a
plan (``pat.plan(...)``) reads nothing: the plan holds the settings it was built under.

==========================  ============================================================
``SPATTN_STRATEGY``         ``ranges`` or ``table``
``SPATTN_BLOCK_M`` / ``_N`` forward tile (queries / keys), powers of two in 16..256
``SPATTN_FWD_WARPS``        forward ``num_warps`` (fallback ``SPATTN_NUM_WARPS``)
``SPATTN_FWD_STAGES``       forward ``num_stages`` (fallback ``SPATTN_NUM_STAGES``)
``SPATTN_FWD_LOOP``         forward loop: ``split``, ``fused`` or ``persistent``
``SPATTN_BWD_BLOCK_M1``...  dK/dV tile (``_M1``, ``_N1``) and dQ tile (``_M2``, ``_N2``)
``SPATTN_BWD_WARPS``        backward ``num_warps`` (fallback ``SPATTN_NUM_WARPS``)
``SPATTN_BWD_STAGES``       backward ``num_stages`` (fallback ``SPATTN_NUM_STAGES``)
``SPATTN_BWD_LOOP``         backward loops: ``split`` or ``fused``
``SPATTN_BWD_DQ``           how the backward computes dQ: ``kernel`` (default: the dQ
                            kernel) or ``atomic`` (the dK/dV kernel adds dS K atomically
                            into an fp32 accumulator; never while
                            ``torch.are_deterministic_algorithms_enabled()``;
                            docs/codegen.md); autotuning still picks the tiles
``SPATTN_TMA``              ``1`` / ``0`` / ``auto``: TMA descriptor loads (Hopper)
``SPATTN_TABLES``           ``auto``, ``csr``, ``spans`` or ``runs``: the table strategy's form
``SPATTN_AUTOTUNE``         ``1`` / ``0``: autotune launch configurations on CUDA
``SPATTN_TUNE_REPS``        the autotuner's re-timing rounds of its finalists (default 5)
``SPATTN_TUNE_MARGIN``      how much faster (a fraction, default 0.03) a candidate must be
                            than the default configuration to replace it
``SPATTN_CACHE_DIR``        the kernel cache directory (default ``~/.cache/spattn``)
``SPATTN_LAYOUT``           ``auto``, ``off`` or ``on``: token layouts and per-head key
                            orders (docs/layouts.md)
``SPATTN_LAYOUT_GATHER``    ``auto`` (default), ``copy``, ``kernel`` or ``box``: how a layout's
                            or a caller's token order reaches the Triton kernels (copies in
                            slot order, row tables the kernels address rows through, or a
                            layout's boxes read by the forward through 5-D TMA, the backward
                            by row tables or copies as the cost model prices them; ``auto``:
                            ``box`` on CUDA where it can run, else the cheaper by the cost
                            model; docs/layouts.md)
``SPATTN_SCORE_LOAD``       ``ahead`` (default), ``pair``, ``early`` or ``gather``: how a
                            score's tables are read in the kernels (docs/backends.md, Scores)
``SPATTN_SCORE_INDEX``      ``auto``, ``clamp`` or ``mask``: how a score's table indices
                            are kept in range (``auto``: unchecked where proven, else clamped)
``SPATTN_FAST_TANH``        ``auto`` / ``1`` / ``0``: a score's tanh as one
                            ``tanh.approx.f32`` (``auto``: on CUDA for 16-bit q, k, v)
``SPATTN_SCORE_COMPOSE``    ``auto`` / ``1`` / ``0``: a table read at a costly function of
                            ``q - k`` gathered along the distances once per call, the
                            kernels reading the composed table (``auto``: index functions
                            of ``ir.compose.COMPOSE_MIN_OPS`` operations or more;
                            docs/backends.md, Scores)
``SPATTN_WS_FWD``           ``auto`` / ``1`` / ``0``: the warp-specialised Gluon forward on
                            Hopper (``auto``: calls with enough work and few PARTIAL
                            tiles; ``runtime.ws_fwd``)
``SPATTN_WS_BWD``           ``auto`` / ``1`` / ``0``: the warp-specialised Gluon dK/dV
                            kernel on Hopper (``auto``: calls with enough work and few
                            PARTIAL tiles; ``runtime.ws_bwd``)
``SPATTN_WS_DQ``            ``auto`` / ``1`` / ``0``: the warp-specialised Gluon dQ kernel
                            on Hopper, before the Gluon dK/dV kernel (``auto``: calls
                            with enough work and few PARTIAL tiles; ``runtime.ws_dq``)
``SPATTN_PROGRESS``         ``auto`` / ``1`` / ``0``: show long plan builds and explain()
                            runs (:func:`progress`; not part of :class:`Settings`)
``TRITON_INTERPRET``        ``1``: run the Triton kernels on the CPU (Triton's variable)
==========================  ============================================================
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from dataclasses import dataclass, field

from ..codegen.config import MAX_BLOCK, is_block, is_stages, is_warps
from ..dsl.errors import SpattnConfigError

__all__ = ["Settings", "current", "getenv", "progress", "VARIABLES", "FLAG_ON", "FLAG_OFF"]

#: Spellings of a switched-on / switched-off flag.
FLAG_ON = ("1", "true", "on", "yes")
FLAG_OFF = ("0", "false", "off", "no")

#: Every variable :func:`current` reads, in a fixed order (the raw tuple follows it).
VARIABLES = (
    "SPATTN_STRATEGY",
    "SPATTN_BLOCK_M", "SPATTN_BLOCK_N", "SPATTN_FWD_WARPS", "SPATTN_FWD_STAGES",
    "SPATTN_FWD_LOOP",
    "SPATTN_BWD_BLOCK_M1", "SPATTN_BWD_BLOCK_N1", "SPATTN_BWD_BLOCK_M2", "SPATTN_BWD_BLOCK_N2",
    "SPATTN_BWD_WARPS", "SPATTN_BWD_STAGES", "SPATTN_BWD_LOOP", "SPATTN_BWD_DQ",
    "SPATTN_NUM_WARPS", "SPATTN_NUM_STAGES",
    "SPATTN_TMA", "SPATTN_TABLES", "SPATTN_AUTOTUNE", "SPATTN_TUNE_REPS",
    "SPATTN_TUNE_MARGIN", "SPATTN_CACHE_DIR",
    "SPATTN_LAYOUT", "SPATTN_LAYOUT_GATHER", "SPATTN_SCORE_LOAD", "SPATTN_SCORE_INDEX", "SPATTN_FAST_TANH",
    "SPATTN_SCORE_COMPOSE", "SPATTN_WS_FWD", "SPATTN_WS_BWD", "SPATTN_WS_DQ",
    "TRITON_INTERPRET",
)

#: The autotuner's defaults: re-timing rounds of its finalists, and the fraction by which a
#: candidate must beat the default configuration to be chosen (``runtime/tune.py``).
TUNE_REPS = 5
TUNE_MARGIN = 0.03

_STRATEGIES = ("ranges", "table")
_FWD_LOOPS = ("split", "fused", "persistent")
_BWD_LOOPS = ("split", "fused")
_BWD_DQ = ("kernel", "atomic")
_TABLES = ("auto", "csr", "spans", "runs")
_LAYOUTS = ("auto", "off", "on")
#: How a permuted plan's tokens reach the Triton kernels (``SPATTN_LAYOUT_GATHER``).
LAYOUT_GATHERS = ("auto", "copy", "kernel", "box")
_SCORE_LOADS = ("pair", "early", "gather", "ahead")
_SCORE_INDEX = ("auto", "clamp", "mask")

#: ``os.environ``'s own dict (bytes names and values) where it has one: POSIX CPython, whose
#: ``os.environ[...] = ...``, ``del`` and ``putenv`` through the mapping all update it.
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
if not (isinstance(_ENV_DATA, dict) and all(type(k) is bytes for k in list(_ENV_DATA)[:1])):
    _ENV_DATA = None
_ENV_KEYS = {name: os.fsencode(name) for name in VARIABLES}


def getenv(name: str, default=None):
    """``os.environ.get(name, default)``, read the way the per-call path can afford: on
    POSIX CPython the mapping's underlying dict (~15 ns instead of ~0.5 us for an unset
    name, which ``os.environ.get`` encodes and looks up through a raised ``KeyError``)."""
    if _ENV_DATA is None:
        return os.environ.get(name, default)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.fsencode(name)
    v = _ENV_DATA.get(key)
    return default if v is None else os.fsdecode(v)


def _raw() -> tuple:
    return tuple(getenv(n) for n in VARIABLES)


@dataclass(frozen=True)
class Settings:
    """The checked ``SPATTN_*`` settings (``None``: unset, the default applies).

    ``fwd`` and ``bwd`` are the launch overrides of each kernel kind as keyword options of
    :func:`spattn.codegen.config.pick` (only those set); ``raw`` the variables' strings in
    :data:`VARIABLES` order (what keys depend on)."""

    raw: tuple
    strategy: str | None = None
    fwd: dict = field(default_factory=dict)
    bwd: dict = field(default_factory=dict)
    tma: bool | None = None
    tables: str = "auto"
    autotune: bool = True
    tune_reps: int = TUNE_REPS
    tune_margin: float = TUNE_MARGIN
    cache_dir: str | None = None
    interpret: bool = False
    layout: str = "auto"
    layout_gather: str = "auto"
    score_load: str = "ahead"
    score_index: str = "auto"
    fast_tanh: bool | None = None
    score_compose: bool | None = None
    ws_fwd: bool | None = None
    ws_bwd: bool | None = None
    ws_dq: bool | None = None
    bwd_dq: str | None = None

    def __hash__(self):
        return hash(self.raw)

    def __eq__(self, other):
        return isinstance(other, Settings) and self.raw == other.raw

    def overrides(self, kind: str) -> dict:
        """The launch overrides of ``kind`` ("fwd" or "bwd"), strategy (and the backward's
        dQ mode) included."""
        out = dict(self.fwd if kind == "fwd" else self.bwd)
        if self.strategy is not None:
            out["strategy"] = self.strategy
        if kind == "bwd" and self.bwd_dq is not None:
            out["dq"] = self.bwd_dq
        return out

    def tiles_set(self, kind: str) -> bool:
        """True when the environment fixes a tile, warps, stages or loop of ``kind``
        (autotuning then leaves the kind alone; ``SPATTN_BWD_DQ`` does not: the tiles are
        tuned for the dQ mode it sets)."""
        return bool(self.fwd if kind == "fwd" else self.bwd)


def _choice(name: str, v: str | None, allowed: tuple):
    if v is None or v == "":
        return None
    s = v.strip().lower()
    if s not in allowed:
        raise SpattnConfigError(f"{name}={v!r}: expected one of {', '.join(map(repr, allowed))} "
                                "(or unset it for the default)")
    return s


def _flag(name: str, v: str | None, *, auto: bool):
    if v is None or v.strip() == "":
        return None
    s = v.strip().lower()
    if s in FLAG_ON:
        return True
    if s in FLAG_OFF:
        return False
    if auto and s == "auto":
        return None
    want = ", ".join(FLAG_ON + FLAG_OFF + (("auto",) if auto else ()))
    raise SpattnConfigError(f"{name}={v!r}: expected one of {want} (or unset it)")


#: ``TRITON_INTERPRET`` as Triton reads it since 3.4 (``triton.knobs``: these spellings, any
#: case, are on; anything else off): the values spattn takes for on and for off.
INTERPRET_ON = ("1", "true", "yes", "on", "y")
INTERPRET_OFF = ("", "0", "false", "no", "off", "n")


@functools.lru_cache(maxsize=1)
def _interpret_spellings() -> tuple[tuple, tuple]:
    """(on, off) spellings of ``TRITON_INTERPRET`` for the installed Triton: before
    ``triton.knobs`` (3.2, 3.3) only exactly ``1`` was on."""
    try:
        import triton.knobs  # noqa: F401
    except ImportError:
        return ("1",), ("", "0")
    return INTERPRET_ON, INTERPRET_OFF


def interpreting(v: str | None) -> bool:
    """Whether ``TRITON_INTERPRET=v`` runs Triton's kernels in its CPU interpreter, read as
    the installed Triton reads it. A value it reads as off without spelling it so (``2``,
    `` 1``; ``true`` before Triton 3.4) is a :class:`SpattnConfigError`: one who set it
    likely meant on, and spattn and Triton must agree (kernels keyed as interpreted but
    compiled, or CPU tensors sent to a GPU compiler)."""
    if v is None:
        return False
    on, off = _interpret_spellings()
    s = v.lower()
    if s in on:
        return True
    if s in off:
        return False
    raise SpattnConfigError(f"TRITON_INTERPRET={v!r}: expected {' or '.join(on)} to run the "
                            f"Triton kernels on the CPU, or {', '.join(map(repr, off))} not "
                            f"to; the installed Triton reads any other value as off")


def _int(name: str, v: str | None):
    if v is None or v.strip() == "":
        return None
    try:
        n = int(v.strip())
    except ValueError:
        n = None
    if name.endswith("_WARPS"):
        ok, want = is_warps(n), "1, 2, 4, 8, 16 or 32"
    elif name.endswith("_STAGES"):
        ok, want = is_stages(n), "an integer in 1..8"
    else:
        ok = is_block(n)
        want = f"a power of two in 16..{MAX_BLOCK} (16, 32, 64, 128, 256)"
    if not ok:
        raise SpattnConfigError(f"{name}={v!r}: expected {want} (or unset it for the default)")
    return n


def _reps(name: str, v: str | None):
    if v is None or v.strip() == "":
        return None
    s = v.strip()
    if not (s.isascii() and s.isdigit() and len(s) <= 3 and int(s) <= 100):
        raise SpattnConfigError(f"{name}={v!r}: expected an integer in 0..100 (or unset it "
                                "for the default)")
    return int(s)


def _fraction(name: str, v: str | None):
    if v is None or v.strip() == "":
        return None
    try:
        x = float(v.strip())
    except ValueError:
        x = None
    if x is None or not 0.0 <= x < 1.0:    # (NaN fails the comparison too)
        raise SpattnConfigError(f"{name}={v!r}: expected a fraction in [0, 1), e.g. 0.03 "
                                "(or unset it for the default)")
    return x


def parse(raw: tuple) -> Settings:
    """:class:`Settings` of the raw strings ``raw`` (in :data:`VARIABLES` order)."""
    env = dict(zip(VARIABLES, raw))

    def pick(pairs):
        return {opt: val for opt, val in pairs if val is not None}

    nw, ns = _int("SPATTN_NUM_WARPS", env["SPATTN_NUM_WARPS"]), \
        _int("SPATTN_NUM_STAGES", env["SPATTN_NUM_STAGES"])
    fwd_w, fwd_s = _int("SPATTN_FWD_WARPS", env["SPATTN_FWD_WARPS"]), \
        _int("SPATTN_FWD_STAGES", env["SPATTN_FWD_STAGES"])
    bwd_w, bwd_s = _int("SPATTN_BWD_WARPS", env["SPATTN_BWD_WARPS"]), \
        _int("SPATTN_BWD_STAGES", env["SPATTN_BWD_STAGES"])
    fwd = pick((("block_m", _int("SPATTN_BLOCK_M", env["SPATTN_BLOCK_M"])),
                ("block_n", _int("SPATTN_BLOCK_N", env["SPATTN_BLOCK_N"])),
                ("num_warps", fwd_w or nw), ("num_stages", fwd_s or ns),
                ("loop", _choice("SPATTN_FWD_LOOP", env["SPATTN_FWD_LOOP"], _FWD_LOOPS))))
    bwd = pick((("block_m1", _int("SPATTN_BWD_BLOCK_M1", env["SPATTN_BWD_BLOCK_M1"])),
                ("block_n1", _int("SPATTN_BWD_BLOCK_N1", env["SPATTN_BWD_BLOCK_N1"])),
                ("block_m2", _int("SPATTN_BWD_BLOCK_M2", env["SPATTN_BWD_BLOCK_M2"])),
                ("block_n2", _int("SPATTN_BWD_BLOCK_N2", env["SPATTN_BWD_BLOCK_N2"])),
                ("num_warps", bwd_w or nw), ("num_stages", bwd_s or ns),
                ("loop", _choice("SPATTN_BWD_LOOP", env["SPATTN_BWD_LOOP"], _BWD_LOOPS))))
    autotune = _flag("SPATTN_AUTOTUNE", env["SPATTN_AUTOTUNE"], auto=False)
    interp = env["TRITON_INTERPRET"]
    reps = _reps("SPATTN_TUNE_REPS", env["SPATTN_TUNE_REPS"])
    margin = _fraction("SPATTN_TUNE_MARGIN", env["SPATTN_TUNE_MARGIN"])
    return Settings(
        raw=tuple(raw),
        strategy=_choice("SPATTN_STRATEGY", env["SPATTN_STRATEGY"], _STRATEGIES),
        fwd=fwd, bwd=bwd,
        tma=_flag("SPATTN_TMA", env["SPATTN_TMA"], auto=True),
        tables=_choice("SPATTN_TABLES", env["SPATTN_TABLES"], _TABLES) or "auto",
        autotune=True if autotune is None else autotune,
        tune_reps=TUNE_REPS if reps is None else reps,
        tune_margin=TUNE_MARGIN if margin is None else margin,
        cache_dir=env["SPATTN_CACHE_DIR"] or None,
        interpret=interpreting(interp),
        layout=_choice("SPATTN_LAYOUT", env["SPATTN_LAYOUT"], _LAYOUTS) or "auto",
        layout_gather=_choice("SPATTN_LAYOUT_GATHER", env["SPATTN_LAYOUT_GATHER"],
                              LAYOUT_GATHERS) or "auto",
        score_load=_choice("SPATTN_SCORE_LOAD", env["SPATTN_SCORE_LOAD"],
                           _SCORE_LOADS) or "ahead",
        score_index=_choice("SPATTN_SCORE_INDEX", env["SPATTN_SCORE_INDEX"],
                            _SCORE_INDEX) or "auto",
        fast_tanh=_flag("SPATTN_FAST_TANH", env["SPATTN_FAST_TANH"], auto=True),
        score_compose=_flag("SPATTN_SCORE_COMPOSE", env["SPATTN_SCORE_COMPOSE"], auto=True),
        ws_fwd=_flag("SPATTN_WS_FWD", env["SPATTN_WS_FWD"], auto=True),
        ws_bwd=_flag("SPATTN_WS_BWD", env["SPATTN_WS_BWD"], auto=True),
        ws_dq=_flag("SPATTN_WS_DQ", env["SPATTN_WS_DQ"], auto=True),
        bwd_dq=_choice("SPATTN_BWD_DQ", env["SPATTN_BWD_DQ"], _BWD_DQ),
    )


#: The last distinct environment and its settings (one tuple: replaced whole, so a reader
#: in another thread sees a consistent pair).
_LAST: tuple = (None, None)


#: :data:`VARIABLES`' names as ``os.environ``'s own dict spells them (bytes).
_RAW_KEYS = tuple(_ENV_KEYS[n] for n in VARIABLES)


def _raw_bytes():
    """The variables' values as the environment's dict holds them (bytes or None), in one
    C-level pass (~0.5 us for all: what every call without a plan reads); None where there
    is no such dict (then :func:`_raw` is compared)."""
    return None if _ENV_DATA is None else tuple(map(_ENV_DATA.get, _RAW_KEYS))


def current() -> Settings:
    """The settings of the environment now (parsed once per distinct environment: the
    undecoded values are compared with the last ones seen)."""
    global _LAST
    raw = _raw_bytes()
    if raw is None:
        raw = _raw()
    last = _LAST
    if last[0] == raw:
        return last[1]
    s = parse(_raw())
    _LAST = (raw, s)
    return s


def progress() -> bool | None:
    """``SPATTN_PROGRESS``: True (always show the progress of long work), False (never) or
    None (``auto``, the default: when stderr is a terminal). A display setting, so not part
    of :class:`Settings` (which keys plans and kernels): changing it rebuilds nothing."""
    return _flag("SPATTN_PROGRESS", getenv("SPATTN_PROGRESS"), auto=True)


#: Triton's interpreter keeps the launch it interprets in globals (the grid, the patched
#: ``triton.language``), so two threads' launches at once break each other. Launches on
#: CPU tensors, which only the interpreter runs, take this lock (:func:`launch_guard`).
_INTERPRETER_LOCK = threading.RLock()
_UNGUARDED = contextlib.nullcontext()


def launch_guard(device_type: str):
    """The context a Triton launch on a ``device_type`` tensor runs in: the interpreter's
    lock on the CPU, nothing on a GPU."""
    return _INTERPRETER_LOCK if device_type == "cpu" else _UNGUARDED
