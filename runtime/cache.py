"""The kernel file cache: generated Triton modules on disk and in memory.

``kernel_file(pattern, kind="fwd", **options) -> pathlib.Path`` returns the path of
the generated module for ``pattern`` (``kind`` is "fwd" or "bwd"), writing it if
needed.  Files live in ``$SPATTN_CACHE_DIR`` (default ``~/.cache/spattn``) and are
named after the pattern: ``attn_fwd_<name>_<hash6>.py``.

Key = sha256 of (canonical source, input declarations, kind, codegen version,
:class:`~spattn.codegen.strategy.KernelConfig` (strategy, tile sizes, head-dim
block, dtype, warps, stages), the closed form used by the "ranges" strategy,
the Triton version, and the device: CUDA capability, or "interpret" under
``TRITON_INTERPRET=1``).  Lengths, batch, heads and ``q_offset`` are kernel
arguments: they never change the key (see docs/caching.md).

The first line of every file is ``# spattn-kernel key=<key> sha256=<digest of the
rest>``.  A file whose header is missing, whose key differs (a foreign file under
our name) or whose content does not match its digest (corrupt, truncated or
edited) is regenerated with a :func:`warnings.warn`.  Files are written
atomically (temporary file in the same directory + ``os.replace``), so concurrent
processes never see half a file.

``load(pattern, kind, **options) -> (module, config)`` imports the file by path
(a real module: ``inspect`` and Triton see its source) and keeps it in memory.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import sys
import tempfile
import threading
import warnings

from ..codegen import strategy as _strategy
from ..codegen.kernels import CODEGEN_VERSION, ident, render

HEADER_PREFIX = "# spattn-kernel "
_lock = threading.RLock()
_modules: dict[str, object] = {}         # path -> imported module
_configs: dict[tuple, tuple] = {}        # (pattern source, inputs, kind, options) -> (config, cf, key)
_checked: dict[str, str] = {}            # path -> key already verified in this process
_paths: dict[tuple, str] = {}            # ($SPATTN_CACHE_DIR, kind, key, name) -> path
_caps: dict[str, tuple] = {}             # "cuda:<index>" -> (major, minor) or None


def cache_dir() -> pathlib.Path:
    d = _strategy.getenv("SPATTN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                            "spattn")
    return pathlib.Path(d)


def device_tag(device=None) -> str:
    """"interpret" under TRITON_INTERPRET=1, else "cuda-sm<major><minor>" (or "cpu")."""
    if _strategy.interpret_mode():
        return "interpret"
    cap = capability(device)
    return "cpu" if cap is None else f"cuda-sm{cap[0]}{cap[1]}"


def capability(device=None):
    """``(major, minor)`` of the CUDA device ``device`` (the current one when it has no
    index), None without CUDA; memoised per indexed device (the launchers ask per call)."""
    if getattr(device, "index", None) is None:   # the current device: may change
        return _capability(device)
    memo = str(device)
    if memo not in _caps:
        _caps[memo] = _capability(device)
    return _caps[memo]


def _capability(device):
    try:
        import torch
        if torch.cuda.is_available():
            idx = None if device is None else getattr(device, "index", None)
            return tuple(torch.cuda.get_device_capability(idx))
    except Exception:  # pragma: no cover - no torch/cuda
        pass
    return None


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception:  # pragma: no cover
        return "none"


def _cf_text(cf) -> str:
    if cf is None:
        return "-"
    from ..ir.printer import to_source

    def iv(i):
        return "[" + ", ".join("-" if getattr(i, f, None) is None else to_source(getattr(i, f))
                               for f in ("lo", "hi", "flo", "fhi")) + "]"
    return "rows:" + ";".join(iv(i) for i in cf.rows) + " cols:" + ";".join(iv(i) for i in cf.cols)


def resolve(pattern, kind: str = "fwd", **options):
    """(config, closed_form, key) for a pattern and options, memoised per process."""
    if kind not in ("fwd", "bwd"):
        raise ValueError(f"unknown kernel kind {kind!r} (expected 'fwd' or 'bwd')")
    cf = options.pop("closed_form", None)
    device = options.pop("device", None)
    # every environment override strategy.pick reads is part of the memo key (the launchers
    # pass the overrides they read as ``_env``, part of the options)
    memo_key = (pattern.source, tuple(sorted(pattern.inputs.items())), kind, device_tag(device),
                _strategy.env_overrides(kind) if "_env" not in options else (),
                tuple(sorted((k, str(v)) for k, v in options.items())),
                None if cf is None else _cf_text(cf))
    with _lock:
        hit = _configs.get(memo_key)
    if hit is not None:
        return hit
    if cf is None and options.get("strategy") in (None, "ranges"):
        cf = _strategy.get_closed_form(pattern)
    config = _strategy.pick(pattern, kind, closed_form=cf, **options)
    if config.strategy == "ranges":
        if cf is None:
            raise ValueError(f"pattern {pattern.source!r} has no closed form: "
                             "use strategy='table'")
    else:
        cf = None
    parts = [pattern.source, repr(sorted(pattern.inputs.items())), kind, CODEGEN_VERSION,
             repr(sorted(config.as_dict().items())), _cf_text(cf), _triton_version(),
             device_tag(device)]
    key = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]
    out = (config, cf, key)
    with _lock:
        _configs[memo_key] = out
    return out


def file_name(pattern, kind: str, key: str) -> str:
    return f"attn_{kind}_{ident(pattern.name)}_{key[:6]}.py"


def _digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def _check(path: pathlib.Path, key: str) -> str | None:
    """None if the file is ours and intact, else the reason it is not."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return "missing"
    except (OSError, UnicodeDecodeError) as e:
        return f"unreadable ({e})"
    first, _, body = text.partition("\n")
    if not first.startswith(HEADER_PREFIX):
        return "no spattn header"
    fields = dict(f.split("=", 1) for f in first[len(HEADER_PREFIX):].split() if "=" in f)
    if fields.get("key") != key:
        return f"foreign file (key {fields.get('key')!r}, expected {key!r})"
    if fields.get("sha256") != _digest(body):
        return "corrupt file (content does not match its sha256)"
    return None


def _write_atomic(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def kernel_file(pattern, kind: str = "fwd", **options) -> pathlib.Path:
    """Path of the generated ``kind`` module of ``pattern``, (re)generated when needed.

    ``options``: ``head_dim`` (default 128), ``dtype`` (default bf16), ``strategy``,
    ``block_m``, ``block_n``, ``num_warps``, ``num_stages``, ``closed_form`` (an
    ``ir.ranges.ClosedForm`` to use instead of the analysis's), ``device``.
    """
    config, cf, key = resolve(pattern, kind, **options)
    path = cache_dir() / file_name(pattern, kind, key)
    spath = str(path)
    with _lock:
        reason = _check(path, key)
        if reason is not None:
            if reason != "missing":
                warnings.warn(f"spattn: kernel cache file {spath} is invalid ({reason}); "
                              "regenerating it", RuntimeWarning, stacklevel=2)
                _modules.pop(spath, None)
            body = render(pattern, kind, config, key, closed_form=cf)
            _write_atomic(path, f"{HEADER_PREFIX}key={key} sha256={_digest(body)}\n{body}")
        _checked[spath] = key
    return path


def load(pattern, kind: str = "fwd", **options):
    """``(module, config)``: the imported generated module (kept in memory) and its config."""
    mod, config, _ = load_with_form(pattern, kind, **options)
    return mod, config


def load_with_form(pattern, kind: str = "fwd", **options):
    """``(module, config, closed_form)``: :func:`load` plus the closed form the module was
    rendered with (None for the table strategy), from one :func:`resolve`."""
    config, cf, key = resolve(pattern, kind, **dict(options))
    # per-call fast path: the module by (cache directory setting, key), no path building
    fast = (_strategy.getenv("SPATTN_CACHE_DIR"), kind, key, pattern.name)
    with _lock:
        spath = _paths.get(fast)
        mod = None if spath is None else _modules.get(spath)
        if mod is not None:
            return mod, config, cf
    spath = str(cache_dir() / file_name(pattern, kind, key))
    with _lock:
        mod = _modules.get(spath)
        if mod is not None:
            _paths[fast] = spath
            return mod, config, cf
    path = kernel_file(pattern, kind, **options)
    with _lock:
        name = f"spattn_kernels.{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        _modules[spath] = mod
        _paths[fast] = spath
    return mod, config, cf


def clear_memory() -> None:
    """Forget imported modules and verified paths (the files stay on disk)."""
    with _lock:
        _modules.clear()
        _configs.clear()
        _checked.clear()
        _paths.clear()
