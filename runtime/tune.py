"""Persisted autotuning of the launch configuration (tiles, warps, stages) on CUDA.

The launchers (``runtime/triton_backend.py``) call :func:`tuned_options` before every
launch.  It returns the options to launch with: unchanged when autotuning does not
apply, else with the tuned tile options added (forward ``block_m``, ``block_n``,
``num_warps``, ``num_stages``, ``loop``; backward ``block_m1``, ``block_n1``, ``block_m2``,
``block_n2``, ``num_warps``, ``num_stages``, ``loop``), passed on exactly like explicit
options.

Autotuning applies when all of these hold:

* the call's tensors are on a CUDA device, ``TRITON_INTERPRET`` is off and
  ``$SPATTN_AUTOTUNE`` is not ``0`` / ``false`` / ``off`` / ``no`` (default on);
* the call sets no tile option (none of the names above, nor ``block_m``/``block_n``
  for the backward) and the environment sets no tile override of that kind
  (``SPATTN_BLOCK_M``, ``SPATTN_BWD_WARPS``, ``SPATTN_NUM_STAGES``, ``SPATTN_FWD_LOOP``...:
  :meth:`spattn.runtime.settings.Settings.tiles_set`).

The choice is keyed by (pattern source and input declarations, kind, head-dim block,
dtype class, device capability, strategy, the backward's dQ mode (``SPATTN_BWD_DQ``), next power of two of Lq, of Lk and of
batch x heads, the row bucket -- ``floor(log2)`` of the mean number of non-EMPTY 64x64
tiles in a non-empty query row, :func:`spattn.runtime.tables.row_bucket`, which separates
20 documents in 16K tokens from 12 --, TMA loads or not, 64-bit integers or not, codegen
version, Triton version, :data:`TUNE_VERSION`; plus the closed form when one is passed
explicitly).  It is looked up in memory, then in ``$SPATTN_CACHE_DIR/tune/<key>.json``;
on a miss, the candidates of :func:`candidates` are first compiled in parallel threads
(:func:`precompile`), then each is run once with the call's real arguments (warm-up; a
candidate that raises -- compile error, out of resources, out of memory -- is skipped) and
timed with ``triton.testing.do_bench`` (median, ``rep`` :data:`REP_MS` ms, ``warmup``
:data:`WARMUP_MS` ms) in :data:`SCREENS` passes of alternating order, the least of each
candidate's timings its screening time.  The :data:`FINALISTS` fastest and the default
configuration (the prior: first in the list) are then timed again in
``$SPATTN_TUNE_REPS`` alternating rounds and judged by the median of those re-timings
(:func:`judged`); another candidate replaces the default only when it is faster by more
than ``$SPATTN_TUNE_MARGIN`` (:func:`select`), so that two processes make the same
choice.  The winner is
kept in memory and written atomically as JSON.  A file that is not valid JSON or does
not hold a valid choice for its key gives a ``RuntimeWarning`` and is re-tuned.  If
every candidate fails, the defaults are used (remembered in memory only).  While a
CUDA graph is being captured nothing is timed: a stored choice is used, else the
defaults.

Tuning never changes results: it only picks the options; the launcher then runs the
call with them, exactly as later calls will.  The runs it times are the launcher's
own (the forward; for the backward the backward launcher only), which write fresh
outputs and never modify their inputs.

``run`` (the launcher with given options) and ``timer`` (``timer(fn) -> ms``) are
arguments, so the tests drive all of this with fakes and no GPU.  Progress and the
result are logged on the ``"spattn"`` logger at INFO:
``autotuned fwd for causal: block_m=128 block_n=64 num_warps=8 num_stages=3 (0.512 ms)``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pathlib
import statistics
import threading
import warnings

from ..codegen import config as _config
from . import cache as _cache
from . import settings as _settings

log = logging.getLogger("spattn")

#: Bumped when the candidate lists, the file format or the way the winner is picked change
#: (part of the key).
TUNE_VERSION = 8
REP_MS = 25
WARMUP_MS = 5
#: Screening passes over all candidates (the second in reverse order); a candidate's
#: screening time is the least of its passes'.
SCREENS = 2
#: The fastest candidates by their screening time that go to the run-off (with the prior).
FINALISTS = 2
#: Challengers' judged times within this fraction of the best are a tie, won by the earlier one.
TIE = 0.005

FIELDS = {
    "fwd": ("block_m", "block_n", "num_warps", "num_stages", "loop"),
    "bwd": ("block_m1", "block_n1", "block_m2", "block_n2", "num_warps", "num_stages", "loop"),
}
#: Options that, passed explicitly, switch autotuning off for the call.
TILE_OPTIONS = frozenset(FIELDS["fwd"] + FIELDS["bwd"])

# (BLOCK_M, BLOCK_N, warps, stages); on the configurations of _FWD_LOOPS also the fused
# loop (one pipelined loop per interval piece or span) and the persistent kernel (programs
# loop over query tiles).  For the table strategy's CSR lists "fused" runs like "split".
_FWD_16 = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3)]
_FWD_LOOPS = {(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)}
_FWD_16_BIG_D = [(64, 32, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2)]
_FWD_32 = [(64, 32, 4, 2), (64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 1)]
_FWD_32_BIG_D = [(32, 32, 4, 1), (32, 32, 4, 2), (32, 64, 4, 1)]
# (M1, N1, M2, N2, warps, stages)
_BWD_16 = [(64, 128, 128, 64, 8, 3), (64, 64, 64, 64, 4, 3), (64, 128, 128, 32, 8, 2),
           (32, 64, 64, 32, 4, 3)]
_BWD_16_BIG_D = [(32, 64, 64, 32, 4, 2), (32, 64, 64, 32, 4, 3), (32, 32, 32, 32, 4, 2)]
_BWD_32 = [(32, 32, 32, 32, 4, 1), (32, 64, 64, 32, 4, 2), (64, 64, 64, 64, 8, 2)]
_BWD_32_BIG_D = [(32, 32, 32, 32, 4, 1), (32, 32, 32, 32, 4, 2)]


_lock = threading.RLock()
_memory: dict[str, dict] = {}     # tune key -> chosen tile options ({} = defaults)
_fast: dict[tuple, str] = {}      # raw call description -> tune key
_generation = 0                   # see generation()


# ------------------------------------------------------------------ policy

def enabled(device, settings=None) -> bool:
    """Autotuning switched on for calls on ``device`` (CUDA, not interpreted, not disabled)."""
    settings = settings or _settings.current()
    if settings.interpret or not settings.autotune:
        return False
    return getattr(device, "type", str(device).split(":")[0]) == "cuda"


def explicit(kind: str, options: dict, settings=None) -> bool:
    """True when the call or the environment fixes a tile, warps, stages or loop itself."""
    if any(options.get(n) is not None for n in TILE_OPTIONS):
        return True
    return (settings or _settings.current()).tiles_set(kind)


def candidates(kind: str, head_dim: int, dtype, *, pair_loads: bool = False,
               tables: bool = False) -> list[dict]:
    """The configurations timed for ``kind`` at a head dim and dtype (the default first;
    ``pair_loads``, ``tables``: the default of a score with per-pair table loads or with
    float tables, :func:`spattn.codegen.config.score_tile_flags`; fp32 with tables keeps the
    forward's and the dQ kernel's common tile shape)."""
    dt = _config.dtype_name(dtype)
    big = head_dim > 128
    if kind == "fwd":
        default = _config.default_tiles(head_dim, dt, "fwd", interpret=False,
                                        pair_loads=pair_loads, tables=tables)
        if dt == "fp32":
            lst = _FWD_32_BIG_D if big else _FWD_32
        else:
            lst = _FWD_16_BIG_D if big else _FWD_16
    elif kind == "bwd":
        default = _config.default_bwd_tiles(head_dim, dt, interpret=False)
        if dt == "fp32":
            lst = _BWD_32_BIG_D if big else _BWD_32
        else:
            lst = _BWD_16_BIG_D if big else _BWD_16
    else:
        raise ValueError(f"unknown kernel kind {kind!r} (expected 'fwd' or 'bwd')")
    if dt == "fp32" and tables:
        # the forward and the dQ kernel keep one tile shape (see default_tiles): only
        # warps, stages and loops are tuned
        tile = slice(0, 2) if kind == "fwd" else slice(2, 4)
        lst = [c for c in lst if c[tile] == tuple(default)[tile]]
    out = []
    for c in [tuple(default)] + [tuple(c) for c in lst]:
        if kind == "fwd":
            variants = [c + ("split",)]
            if c in _FWD_LOOPS:
                variants += [c + ("fused",), c + ("persistent",)]
        else:
            variants = [c + ("split",), c + ("fused",)]
        for v in variants:
            if v not in out:
                out.append(v)
    return [dict(zip(FIELDS[kind], c)) for c in out]


def label(pattern) -> str:
    """The pattern's name for messages (its source when it has no name of its own)."""
    name = getattr(pattern, "name", None)
    return pattern.source if name in (None, "", "pattern") else name


def describe(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


# ------------------------------------------------------------------ timing

def default_timer(fn) -> float:
    """Median milliseconds of ``fn`` (``triton.testing.do_bench``)."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"))


def _capturing() -> bool:
    try:
        import torch
        return bool(torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
    except Exception:  # pragma: no cover
        return False


# --------------------------------------------------------------------- key

def key_fields(pattern, kind: str, *, head_dim: int, dtype, device, Lq: int, Lk: int,
               strategy: str, closed_form=None, tma: bool = False, BH: int = 1,
               int64: bool = False, rows: int | None = None,
               row_tables: bool = False, dq: str = "kernel") -> dict:
    """Everything a tuning choice depends on (its file is named after their hash).
    ``rows``: the call's row bucket (:func:`spattn.runtime.tables.row_bucket`; None where
    the caller has no analysis). ``row_tables``: the kernels address rows through a
    permuted plan's row tables (``KernelConfig.rows`` "table"; a field only when set), or,
    given as "box", a token layout's boxes through TMA (the field ``row_boxes``). ``dq``:
    the backward's dQ mode (``KernelConfig.dq``; the field ``bwd_dq`` only when "atomic",
    so that the dQ kernel's choices keep their keys)."""
    from ..codegen.kernels import CODEGEN_VERSION
    extra = ({"row_boxes": True} if row_tables == "box"
             else {"row_tables": True} if row_tables else {})
    if dq != "kernel":
        extra["bwd_dq"] = dq
    return {**extra,
        "source": pattern.source,
        "inputs": sorted([n, int(d)] for n, d in pattern.inputs.items()),
        "kind": kind,
        "block_d": _config.next_pow2(head_dim),
        "dtype": _config.dtype_name(dtype),
        "device": _cache.device_tag(device),
        "strategy": strategy,
        "tma": bool(tma),
        "int64": bool(int64),
        "lq_bucket": _config.next_pow2(Lq),
        "lk_bucket": _config.next_pow2(Lk),
        "bh_bucket": 1 << max(0, int(BH) - 1).bit_length(),
        "rows_bucket": None if rows is None else int(rows),
        "closed_form": None if closed_form is None else _cache._cf_text(closed_form),
        "codegen": CODEGEN_VERSION,
        "triton": _cache._triton_version(),
        "tune_version": TUNE_VERSION,
    }


def tune_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def tune_dir() -> pathlib.Path:
    """The directory new tuning files are written to: ``tune/`` in the kernel cache's
    (``cache.cache_dir()``: the configured directory, or its fallback)."""
    return _cache.cache_dir() / "tune"


def entry_name(key: str) -> str:
    """The cache entry of a tuning choice: ``tune/<key>.json``."""
    return f"tune/{key}.json"


def tune_path(key: str) -> pathlib.Path:
    return tune_dir() / f"{key}.json"


# ----------------------------------------------------------------- storage

def _valid_config(kind: str, cfg) -> dict:
    if not isinstance(cfg, dict) or set(cfg) != set(FIELDS[kind]):
        raise ValueError(f"config must have exactly the fields {FIELDS[kind]}")
    out = {}
    for n in FIELDS[kind]:
        v = cfg[n]
        if n == "loop":
            loops = _config.FWD_LOOPS if kind == "fwd" else _config.BWD_LOOPS
            if v not in loops:
                raise ValueError(f"loop must be one of {loops}, got {v!r}")
            out[n] = v
            continue
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{n} is not an integer: {v!r}")
        if n.startswith("block_") and not _config.is_block(v):
            raise ValueError(f"{n} must be a power of two in 16..{_config.MAX_BLOCK}, got {v}")
        if n == "num_warps" and not _config.is_warps(v):
            raise ValueError(f"num_warps must be a power of two <= 32, got {v}")
        if n == "num_stages" and not _config.is_stages(v):
            raise ValueError(f"num_stages must be in 1..8, got {v}")
        out[n] = v
    return out


def read(key: str, kind: str):
    """The stored choice for ``key`` (a dict of tile options), or None.

    A missing file gives None silently; an unreadable or invalid one (not JSON, another key
    or kind, an invalid config, a directory or other non-file in its place) a
    ``RuntimeWarning`` and None (the caller re-tunes and overwrites it).  Files are read
    through the kernel cache's store (``cache.read_entry``): the configured directory, or
    its fallback when that cannot be written.
    """
    chosen = {}

    def check(text):
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            if data.get("key") != key:
                raise ValueError(f"key {data.get('key')!r}, expected {key!r}")
            if data.get("kind") != kind:
                raise ValueError(f"kind {data.get('kind')!r}, expected {kind!r}")
            chosen["config"] = _valid_config(kind, data.get("config"))
        except ValueError as e:      # json.JSONDecodeError is a ValueError
            return str(e)
        except RecursionError:       # JSON nested thousands deep
            return "nested too deeply"
        return None

    def invalid(path, reason, instead):
        warnings.warn(f"spattn: autotune file {path} is invalid ({reason}); "
                      + (f"using {instead}" if instead else "re-tuning"), RuntimeWarning,
                      stacklevel=6)

    found = _cache.read_entry(entry_name(key), check, invalid)
    return None if found is None else chosen["config"]


def write(key: str, record: dict) -> None:
    """Write ``record`` as ``tune/<key>.json`` atomically (temporary file + ``os.replace``)
    through the kernel cache's store (``cache.write_entry``): where the configured
    directory cannot take it, the fallback does (or process memory), with a
    ``RuntimeWarning``.
    """
    _cache.write_entry(entry_name(key), json.dumps(record, indent=1, sort_keys=True) + "\n",
                       "autotune file")


# ------------------------------------------------------------------ tuning

def precompile(cands: list[dict], options: dict, compile_only, workers: int | None = None) -> None:
    """Compile the candidates' kernels in parallel threads before they are timed.

    ``compile_only(options)`` does what the launcher does up to the launch and compiles
    the kernels without running them (Triton's ``warmup``); inside Triton's
    ``AsyncCompileMode`` each compilation is submitted to a thread pool (Triton releases
    the GIL while it compiles: ~1.6x on 2 cores, more on the GPU hosts' 16).  Errors are
    ignored here: the candidate's timed run compiles again and reports them.  Without
    that Triton API (other versions) nothing is done and the candidates compile in turn.
    """
    if compile_only is None or len(cands) < 2:
        return
    try:
        from concurrent.futures import ThreadPoolExecutor
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return
    workers = workers or min(len(cands), os.cpu_count() or 1, 16)
    if workers < 2:
        return
    with ThreadPoolExecutor(max_workers=workers) as ex:
        with AsyncCompileMode(ex, ignore_errors=True):
            for cand in cands:
                try:
                    compile_only({**options, **cand})
                except Exception as e:      # bad candidate: its timed run reports it
                    log.debug("  %s: precompile failed (%s)", describe(cand), e)


def tune(pattern, kind: str, *, head_dim: int, dtype, options: dict, run, timer=None,
         fields: dict | None = None, compile_only=None, reps: int | None = None,
         margin: float | None = None, prior: int = 0):
    """Time every candidate with ``run(options)``; ``(best tile options, timings, ms)``,
    ``ms`` the time the winner was judged by (:func:`select`, with ``reps``, ``margin``
    and ``prior``: default the settings' and the default configuration).

    ``compile_only(options)``, when given, compiles a candidate without running it: all
    candidates are then compiled in parallel first (:func:`precompile`).
    ``best`` and ``ms`` are None when every candidate failed.  ``timings`` lists, per candidate,
    ``{"config": ..., "ms": ...}`` or ``{"config": ..., "error": "..."}``.
    """
    timer = timer or default_timer
    settings = _settings.current()
    reps = settings.tune_reps if reps is None else reps
    margin = settings.tune_margin if margin is None else margin
    cands = candidates(kind, head_dim, dtype, **_config.score_tile_flags(pattern))
    where = ""
    if fields:
        where = (f" ({fields['dtype']}, D<={fields['block_d']}, {fields['device']}, "
                 f"{fields['strategy']}, Lq<={fields['lq_bucket']}, Lk<={fields['lk_bucket']}, "
                 f"rows {fields.get('rows_bucket')})")
    log.info("autotuning %s for %s%s: %d candidates", kind, label(pattern), where, len(cands))
    from .triton_backend import assembler_quiet
    with assembler_quiet():
        precompile(cands, options, compile_only)
    timings = [{"config": cand} for cand in cands]      # in the order of cands
    for p in range(SCREENS):
        for i in (range(len(cands)) if p % 2 == 0 else range(len(cands) - 1, -1, -1)):
            if "error" in timings[i]:
                continue
            cand = cands[i]
            opts = {**options, **cand}
            try:
                if p == 0:
                    with assembler_quiet():
                        run(opts)                   # compile, build tables, warm up
                ms = float(timer(lambda: run(opts)))
            except Exception as e:                  # compile error, out of resources, OOM
                msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                log.debug("  %s: skipped (%s)", describe(cand), msg)
                timings[i] = {"config": cand, "error": msg}
                continue
            if not math.isfinite(ms) or ms < 0:
                log.debug("  %s: skipped (time %r)", describe(cand), ms)
                timings[i] = {"config": cand, "error": f"bad time {ms!r}"}
                continue
            log.debug("  %s: %.4f ms", describe(cand), ms)
            timings[i].setdefault("screens", []).append(ms)
            timings[i]["ms"] = min(timings[i]["screens"])
    if not any("ms" in t for t in timings):
        log.warning("autotuning %s for %s: every candidate failed; using the defaults",
                    kind, label(pattern))
        return None, timings, None

    def time_again(cand):
        opts = {**options, **cand}
        return timer(lambda: run(opts))
    i, best_ms = select(timings, time_again, prior=prior, reps=reps, margin=margin)
    best = cands[i]
    log.info("autotuned %s for %s: %s (%.4f ms)", kind, label(pattern), describe(best),
             best_ms)
    return best, timings, best_ms


def select(timings: list[dict], time, *, prior: int = 0, reps: int = _settings.TUNE_REPS,
           margin: float = _settings.TUNE_MARGIN) -> tuple[int, float]:
    """``(index, ms)`` of the winner among ``timings`` (:func:`tune`'s list, with each
    candidate's screening time ``"ms"``: the least of its :data:`SCREENS` timings;
    ``time(config) -> ms`` times one candidate again).

    One ``do_bench`` median per candidate orders near-equal candidates by noise (a few %
    on a GPU: clocks still rising while the first candidates run, the other candidates'
    cache footprint), so a choice made on it flips between processes and moves every
    later call's time by as much.  So:

    * the screening passes run in alternating order (the list, then reversed), and the
      least of a candidate's timings is its screening time, so that neither rising clocks
      nor one slow measurement keep the fastest candidate out of the final;
    * the finalists are the :data:`FINALISTS` fastest by screening time and the
      ``prior`` (the model's choice: the default configuration, first in the list),
      whatever its screening time;
    * they are timed again ``reps`` rounds, alternating (each round in the reverse order
      of the one before, so that drift hits them alike), and each is judged by the
      median of its re-timings (:func:`judged`; a failure while re-timing disqualifies
      it);
    * the best challenger (the earliest within :data:`TIE` of the best judged time among
      the finalists other than the prior) wins only if the prior's time exceeds its time
      by more than ``margin``; otherwise the prior stays (if the prior failed, the best
      challenger wins).

    A candidate truly faster than the prior by more than the margin (plus the noise left
    in a judged time) is then chosen in every process, and one within the margin never is.
    Each finalist's entry gets ``"runoff": [ms, ...]`` (its re-timings) and ``"judged"``.
    """
    timed = [i for i, t in enumerate(timings) if "ms" in t]
    fastest = sorted(timed, key=lambda i: (timings[i]["ms"], i))[:FINALISTS]
    finalists = sorted(set(fastest) | ({prior} & set(timed)))
    times = {i: [timings[i]["ms"]] for i in finalists}
    if len(finalists) > 1:
        for r in range(reps):
            for i in (finalists if r % 2 == 0 else finalists[::-1]):
                try:
                    ms = float(time(timings[i]["config"]))
                except Exception as e:      # noqa: BLE001 -- same policy as the first pass
                    log.debug("  %s: failed on re-timing (%s)", describe(timings[i]["config"]), e)
                    ms = math.inf
                times[i].append(ms if math.isfinite(ms) and ms >= 0 else math.inf)
        for i in finalists:
            timings[i]["runoff"] = times[i][1:]
            timings[i]["judged"] = judged(times[i][1:] or times[i][:1])
            log.debug("  %s: re-timed %s", describe(timings[i]["config"]),
                      " ".join(f"{t:.4f}" for t in times[i][1:]))
    med = {i: judged(times[i][1:] or times[i][:1]) for i in finalists}

    def earliest_best(idx):
        best = min(med[i] for i in idx)
        return next(i for i in idx if med[i] <= best * (1 + TIE))
    others = [i for i in finalists if i != prior]
    if prior not in med:
        winner = earliest_best(finalists)
    elif not others:
        winner = prior
    else:
        challenger = earliest_best(others)
        winner = challenger if med[challenger] * (1 + margin) < med[prior] else prior
    return winner, med[winner]


def judged(times: list) -> float:
    """The time a finalist is judged by: the median of its re-timings (``times``; its
    screening time alone when there are none), infinite if one failed.

    Not the screening time, nor the least of all: the screens run first, while the clocks
    rise and before a long tuning has brought the device to its sustained state, where
    some configurations lose more than others (under an H200's power cap 128x128 tiles
    fell from 2.10 to 2.40 ms on causal while 64x64 held: ``benchmarks/NOTES.md`` row 55).
    The re-timings come after every screen, alternating; their median is what later calls
    see, and one or two slow measurements of five do not move it."""
    if any(math.isinf(t) for t in times):
        return math.inf
    return statistics.median(times)


def tuned_options(pattern, kind: str, *, head_dim: int, dtype, device, Lq: int, Lk: int,
                  options: dict, run, timer=None, compile_only=None, BH: int = 1,
                  settings=None, rows=None) -> dict:
    """The options to launch ``kind`` with: ``options`` plus the tuned tile options when
    autotuning applies (see the module docstring), else ``options`` unchanged.
    ``BH``: batch x query heads (the grid's size beside the tiles: a choice timed on a
    few heads, where small tiles fill the device, is not the one for many).
    ``rows``: the call's row bucket (:func:`spattn.runtime.tables.row_bucket`), or a
    function computing it (called only when autotuning applies), or None.
    ``compile_only``: see :func:`tune`. ``settings``: the environment's
    (:func:`spattn.runtime.settings.current` when None)."""
    settings = settings or _settings.current()
    if not enabled(device, settings) or explicit(kind, options, settings):
        return options
    if callable(rows):
        rows = rows()
    raw = (pattern.source, tuple(sorted(pattern.inputs.items())), kind, int(head_dim),
           str(dtype), str(device), _config.next_pow2(Lq), _config.next_pow2(Lk), int(BH),
           tuple(sorted((k, str(v)) for k, v in options.items())), settings.strategy, rows)
    with _lock:
        key = _fast.get(raw)
        hit = None if key is None else _memory.get(key)
    if hit is not None:
        return {**options, **hit}

    def fields_of():
        config, _, _ = _cache.resolve(pattern, kind, head_dim=head_dim, dtype=dtype,
                                      device=device, settings=settings, **options)
        return key_fields(pattern, kind, head_dim=head_dim, dtype=dtype, device=device,
                          Lq=Lq, Lk=Lk, strategy=config.strategy,
                          closed_form=options.get("closed_form"), tma=config.tma, BH=BH,
                          int64=config.int64, rows=rows,
                          row_tables="box" if config.rows == "box"
                          else config.rows == "table", dq=config.dq)

    with _lock:
        fields = None
        if key is None:
            fields = fields_of()
            key = tune_key(fields)
        hit = _memory.get(key)
        if hit is None:
            hit = read(key, kind)
            if hit is None and not _capturing():
                fields = fields or fields_of()
                best, timings, ms = tune(pattern, kind, head_dim=head_dim, dtype=dtype,
                                         options=options, run=run, timer=timer, fields=fields,
                                         compile_only=compile_only, reps=settings.tune_reps,
                                         margin=settings.tune_margin)
                hit = {} if best is None else dict(best)
                if best is not None:
                    write(key, {"key": key, "kind": kind, "pattern": label(pattern),
                                **{k: v for k, v in fields.items() if k != "kind"},
                                "config": hit, "ms": ms, "timings": timings,
                                "reps": settings.tune_reps, "margin": settings.tune_margin})
            if hit is not None:
                _memory[key] = hit
                _bump()
        if len(_fast) > 4096:
            _fast.clear()
        _fast[raw] = key
    return {**options, **hit} if hit else options


def clear_memory() -> None:
    """Forget the in-memory choices (the files stay; the next call reads them again)."""
    with _lock:
        _memory.clear()
        _fast.clear()
        _bump()


def generation() -> int:
    """A counter that changes whenever the in-memory choices do (a new choice, or
    :func:`clear_memory`): part of the key of the plan cache (``runtime.plan.PlanCache``), so
    that a plan built before a choice changed is not reused after."""
    return _generation


def _bump() -> None:
    global _generation
    _generation += 1
