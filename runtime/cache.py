"""The kernel file cache: generated Triton modules on disk and in memory.

``kernel_file(pattern, kind="fwd", **options) -> pathlib.Path`` returns the path of
the generated module for ``pattern`` (``kind`` is "fwd" or "bwd"), writing it if
needed.  Files live in ``$SPATTN_CACHE_DIR`` (default ``~/.cache/spattn``) and are
named after the pattern: ``attn_fwd_<name>_<hash16>.py``.

Key = sha256 of (canonical source, input declarations, kind, codegen version,
:class:`~spattn.codegen.config.KernelConfig` (strategy, tile sizes, head-dim
block, dtype, warps, stages), the closed form used by the "ranges" strategy,
the Triton version, and the device: CUDA capability, or "interpret" under
``TRITON_INTERPRET=1``).  Lengths, batch, heads and ``q_offset`` are kernel
arguments: they never change the key (see docs/caching.md).

The first line of every file is ``# spattn-kernel key=<key> sha256=<digest of the
rest>``.  A file whose header is missing, whose key differs (a foreign file under
our name) or whose content does not match its digest (corrupt, truncated or
edited), and anything at its path that is not a regular file, is regenerated with a
:func:`warnings.warn`.  Files are written atomically (temporary file in the same
directory + ``os.replace``), so concurrent processes never see half a file.

``load(pattern, kind, **options) -> (module, config)`` imports the module from the
text that was verified, compiled directly (:class:`_VerifiedLoader`): no bytecode is
read from or written to ``__pycache__``, so what runs is exactly what the digest
covers.  ``inspect`` and Triton see that text too (it is placed in :mod:`linecache`).

Where files go (:class:`_Store`, one per ``$SPATTN_CACHE_DIR`` setting): the configured
directory when it can be written; otherwise, with a ``RuntimeWarning``, a per-user
directory under the system temporary directory (``spattn-<uid>``, used only when it is
owned by the user and writable by nobody else, since its modules are executed), and
last of all process memory.  A configured directory that cannot be written is still
read (a read-only cache of prebuilt kernels works).  An entry whose own path cannot be
written (a directory in the way) is written to the next location, with a warning.
The tuner's JSON files (``runtime/tune.py``) go through the same store
(:func:`read_entry`, :func:`write_entry`).
"""
from __future__ import annotations

import hashlib
import importlib.abc
import importlib.util
import linecache
import os
import pathlib
import re
import stat
import sys
import tempfile
import threading
import warnings

from ..codegen import config as _config
from . import settings as _settings
from ..codegen.kernels import CODEGEN_VERSION, ident, render
from ..dsl.errors import SpattnCacheError, SpattnConfigError, SpattnValueError

HEADER_PREFIX = "# spattn-kernel "
#: Largest entry the cache reads (a kernel module is tens of kB): anything bigger is not ours.
MAX_ENTRY_BYTES = 16 << 20
#: The pseudo directory of entries held in process memory (a name, never a real path).
MEMORY_DIR = "<spattn memory>"
#: Why an entry cannot be read when a component of its path is a file (``tune`` a file).
BLOCKED = "a file is in the way of its directory"
_lock = threading.RLock()
_modules: dict[str, object] = {}         # path -> imported module
_configs: dict[tuple, tuple] = {}        # (pattern source, inputs, kind, options) -> (config, cf, key)
_paths: dict[tuple, str] = {}            # ($SPATTN_CACHE_DIR, kind, key, name) -> path
_served: dict[tuple, object] = {}        # the same keys -> the module imported for that key
_caps: dict[str, tuple] = {}             # "cuda:<index>" -> (major, minor) or None
_stores: dict = {}                       # $SPATTN_CACHE_DIR setting -> _Store


def configured_dir() -> pathlib.Path | None:
    """The directory the settings name: ``$SPATTN_CACHE_DIR`` (``~`` expanded, made
    absolute), else ``~/.cache/spattn``; None when there is no home directory to put the
    default under."""
    setting = _settings.getenv("SPATTN_CACHE_DIR")
    if setting:
        path = os.path.expanduser(setting)
        try:
            path = os.path.abspath(path)
        except OSError:           # a relative setting and a working directory that is gone
            pass
        return pathlib.Path(path)
    home = os.path.expanduser("~")
    if home.startswith("~"):      # no $HOME and no password-database entry
        return None
    return pathlib.Path(home, ".cache", "spattn")


def cache_dir() -> pathlib.Path:
    """The directory new entries are written to: the configured one (:func:`configured_dir`)
    when it can be written, else the per-user fallback under the temporary directory.
    Raises :class:`SpattnCacheError` when entries can only be kept in memory."""
    with _lock:
        _, loc = next(_store().writing())
    if loc.root is None:
        raise SpattnCacheError(f"{_store_summary()}: kernels are kept in memory. Set "
                               "SPATTN_CACHE_DIR to a writable directory.")
    return loc.root


def device_tag(device=None) -> str:
    """"interpret" under TRITON_INTERPRET=1, else "cuda-sm<major><minor>" (or "cpu")."""
    if _settings.interpreting(_settings.getenv("TRITON_INTERPRET")):
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


# ------------------------------------------------------------------ storage

class _Location:
    """One place entries live: a directory (``root``), or process memory (``root`` None).

    ``writable`` is probed when the location is made (the directory exists or can be
    created, and the process may write in it) and cleared when a write fails for a reason
    that is the directory's rather than one entry's."""

    def __init__(self, root: pathlib.Path | None, why_not: str | None = None,
                 label: str | None = None):
        self.root = root
        self.label = label or ("process memory" if root is None else str(root))
        self.texts: dict[str, str] = {}       # memory only: name -> text
        self.why_not = why_not                # why it cannot be written (None: it can)
        if root is not None and why_not is None:
            self.why_not = _probe(root)

    @property
    def writable(self) -> bool:
        return self.why_not is None

    def path(self, name: str) -> str:
        return f"{MEMORY_DIR}/{name}" if self.root is None else str(self.root / name)

    def read(self, name: str):
        """``(text, None)``, or ``(None, reason)``; reason "missing" when nothing is there."""
        if self.root is None:
            text = self.texts.get(name)
            return (text, None) if text is not None else (None, "missing")
        return _read_regular(self.root / name)

    def write(self, name: str, text: str) -> None:
        if self.root is None:
            self.texts[name] = text
        else:
            _write_atomic(self.root / name, text)


def _probe(root: pathlib.Path) -> str | None:
    """None if ``root`` is (or can be made) a directory this process may write in, else why not."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return "it exists and is not a directory"
    except OSError as e:
        return _os_reason(e)
    if not root.is_dir():
        return "it is not a directory"
    try:    # a real write: permission bits, ACLs, read-only mounts and root alike
        fd, tmp = tempfile.mkstemp(prefix=".probe.", dir=root)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return _os_reason(e)
    return None


def _os_reason(e: OSError) -> str:
    return f"{type(e).__name__}: {e.strerror or e}"


def _user_tmp_dir() -> pathlib.Path | None:
    """The per-user fallback directory under the system temporary directory, created private;
    None (with the reason in a warning) if it cannot be trusted: its modules are executed, so
    it must be a real directory owned by this user that no one else may write."""
    try:
        if hasattr(os, "geteuid"):
            tag = str(os.geteuid())
        else:  # pragma: no cover - not POSIX
            import getpass
            tag = "".join(c for c in getpass.getuser() if c.isalnum() or c in "-_") or "user"
        root = pathlib.Path(tempfile.gettempdir(), f"spattn-{tag}")
    except Exception:  # noqa: BLE001 - no temporary directory, no user name: no fallback
        return None
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return root          # not there and cannot be made: _probe reports it
    try:
        st = os.lstat(root)
    except OSError:
        return root
    if not stat.S_ISDIR(st.st_mode):
        why = "it is not a directory"
    elif hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        why = f"it is owned by another user (uid {st.st_uid})"
    elif hasattr(os, "geteuid") and st.st_mode & 0o022:
        why = f"others may write in it (mode {stat.filemode(st.st_mode)})"
    else:
        return root
    warnings.warn(f"spattn: not using {root} as a kernel cache: {why}; spattn executes the "
                  "modules it finds there", RuntimeWarning, stacklevel=4)
    return None


def _read_regular(path: pathlib.Path):
    """``(text, None)`` for a regular UTF-8 file of at most :data:`MAX_ENTRY_BYTES`, else
    ``(None, reason)``.  Opened without blocking and checked before reading: a FIFO or a
    device at the path is never read from."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None, "missing"
    except NotADirectoryError:
        return None, BLOCKED
    except OSError as e:
        return None, f"unreadable ({_os_reason(e)})"
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            return None, "a directory is in the way"
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file"
        if st.st_size > MAX_ENTRY_BYTES:
            return None, f"too large ({st.st_size} bytes)"
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_ENTRY_BYTES + 1)
    except OSError as e:
        return None, f"unreadable ({_os_reason(e)})"
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "not UTF-8 text"


def _write_atomic(path: pathlib.Path, text: str) -> None:
    """Write ``text`` at ``path`` through a temporary file in the same directory and
    ``os.replace``.  An empty directory in the way is removed; a non-empty one (or anything
    else that stops the write) raises :class:`OSError`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError:
                raise IsADirectoryError(21, "a directory that is not empty is in the way",
                                        str(path)) from None
    except FileNotFoundError:
        pass
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


class _Store:
    """The locations of one ``$SPATTN_CACHE_DIR`` setting, in order: the configured
    directory, the per-user temporary one, process memory.  Each is made when first
    needed: the next one only when the earlier ones cannot be written (or one entry could
    not be written in them)."""

    def __init__(self):
        self.configured = configured_dir()
        self.locations: list[_Location] = []
        self._next = self._candidates()
        self._announced: set[int] = set()

    def _candidates(self):
        if self.configured is not None:
            yield _Location(self.configured)
        else:
            yield _Location(None, "there is no home directory and SPATTN_CACHE_DIR is not set",
                            label="~/.cache/spattn")
        tmp = _user_tmp_dir()
        if tmp is not None and tmp != self.configured:
            yield _Location(tmp)
        yield _Location(None)

    def location(self, i: int) -> _Location | None:
        while len(self.locations) <= i:
            loc = next(self._next, None)
            if loc is None:
                return None
            self.locations.append(loc)
        return self.locations[i]

    def reading(self):
        """``(index, location)`` of the locations an entry is looked up in: up to the first
        writable one (a configured directory that cannot be written is still read)."""
        i = 0
        while (loc := self.location(i)) is not None:
            if loc.root is not None or loc.writable:   # the no-home placeholder holds nothing
                yield i, loc
            if loc.writable:
                return
            i += 1

    def writing(self):
        """``(index, location)`` of the writable locations, in order."""
        i = 0
        while (loc := self.location(i)) is not None:
            if loc.writable:
                yield i, loc
            i += 1

    def announce(self, i: int, *, quiet: bool = False) -> None:
        """Warn, once per store, that entries go to location ``i`` because none of the earlier
        ones can be written (``quiet``: the caller has warned already)."""
        earlier = self.locations[:i]
        if i in self._announced or not earlier or any(loc.writable for loc in earlier):
            return
        self._announced.add(i)
        if quiet:
            return
        skipped = "; ".join(f"{loc.label}: {loc.why_not}" for loc in earlier)
        warnings.warn(f"spattn: cannot write to the kernel cache ({skipped}); "
                      f"{self.locations[i].label} is used instead. Set SPATTN_CACHE_DIR to a "
                      "writable directory to keep kernels across runs.", RuntimeWarning,
                      stacklevel=4)


def _store() -> _Store:
    setting = _settings.getenv("SPATTN_CACHE_DIR")
    store = _stores.get(setting)
    if store is None:
        store = _stores[setting] = _Store()
    return store


def read_entry(name: str, check, on_invalid):
    """``(path, text)`` of the entry ``name`` (e.g. ``"tune/<key>.json"``), or None.

    ``check(text)`` returns None when the text is a valid entry, else the reason it is not.
    An invalid entry (a corrupt file, a directory, a FIFO) is reported as
    ``on_invalid(path, reason, instead)``, ``instead`` being the path of the valid copy used
    in its place, or None when there is none (the caller makes the entry again).  The
    lookup ends at the first writable location, unless it found an invalid entry: then the
    later locations are searched too (an entry routed around an obstacle lives there), and
    a valid copy found later is written back over the invalid one where that works."""
    with _lock:
        store = _store()
        bad = None              # (location, reason) of the first invalid entry
        i = 0
        while (loc := store.location(i)) is not None:
            if loc.root is not None or loc.writable:   # the no-home placeholder holds nothing
                text, reason = loc.read(name)
                if reason == BLOCKED and not loc.writable:
                    reason = "missing"    # the whole directory is unusable: said once, by announce
                if reason is None:
                    reason = check(text)
                if reason is None:
                    if bad is not None:
                        on_invalid(bad[0].path(name), bad[1], loc.path(name))
                        if bad[0].writable:
                            try:
                                bad[0].write(name, text)
                            except OSError:
                                pass
                    store.announce(i)
                    return loc.path(name), text
                if reason != "missing" and bad is None:
                    bad = (loc, reason)
            if loc.writable and bad is None:
                return None
            i += 1
        if bad is not None:
            on_invalid(bad[0].path(name), bad[1], None)
    return None


def write_entry(name: str, text: str, what: str = "cache file") -> str:
    """Write the entry ``name`` (atomically) to the first location that takes it; its path
    (under :data:`MEMORY_DIR` when only memory took it).  Every write that failed on the
    way is a ``RuntimeWarning``; a directory that cannot be written is not tried again."""
    with _lock:
        store = _store()
        failed = []
        for i, loc in store.writing():
            try:
                loc.write(name, text)
            except OSError as e:
                if loc.root is not None:
                    loc.why_not = _probe(loc.root)   # the directory's fault, or this entry's
                failed.append(f"{loc.path(name)} ({_os_reason(e)})")
                continue
            if failed:
                warnings.warn(f"spattn: could not write {what} {'; '.join(failed)}; "
                              f"wrote {loc.path(name)} instead", RuntimeWarning, stacklevel=3)
            store.announce(i, quiet=bool(failed))
            return loc.path(name)
    raise AssertionError("process memory always takes an entry")  # pragma: no cover


# ------------------------------------------------------------------ kernels

def _tables_part(pattern) -> str:
    """A score's declared float tables where its canonical source does not name them all
    (a table the score's simplification dropped, ``if (q + 3000000000) % 7 > -2 then s else
    rel[h, 0]``): the kernels take every declared table (their parameters, the tile
    defaults), so two patterns of one source that declare different tables are two
    kernels. Empty otherwise, which keeps every other key as it was."""
    tables = getattr(pattern, "score_inputs", None) or {}
    if all(re.search(rf"\b{re.escape(n)}\[", pattern.source) for n in tables):
        return ""
    return repr(sorted(tables.items()))


def resolve(pattern, kind: str = "fwd", **options):
    """(config, closed_form, key) for a pattern and options, memoised per process."""
    if kind not in ("fwd", "bwd"):
        raise SpattnValueError(f"unknown kernel kind {kind!r}: expected 'fwd' (forward) or "
                               "'bwd' (backward)")
    cf = options.pop("closed_form", None)
    device = options.pop("device", None)
    settings = options.pop("settings", None) or _settings.current()
    # the environment's overrides are part of the memo key (through the settings' raw strings)
    memo_key = (pattern.source, tuple(sorted(pattern.inputs.items())),
                tuple(sorted((getattr(pattern, "score_inputs", None) or {}).items())),
                kind, device_tag(device),
                settings.raw, tuple(sorted((k, str(v)) for k, v in options.items())),
                None if cf is None else _cf_text(cf))
    with _lock:
        hit = _configs.get(memo_key)
    if hit is not None:
        return hit
    _check_options(options)
    env = settings.overrides(kind)
    if cf is None and options.get("strategy", env.get("strategy")) in (None, "ranges"):
        cf = _config.get_closed_form(pattern)
    config = _config.pick(pattern, kind, closed_form=cf, interpret=settings.interpret,
                          overrides=env, **options)
    if config.strategy == "ranges":
        if cf is None:
            where = ("strategy='ranges'" if options.get("strategy")
                     else "SPATTN_STRATEGY=ranges")
            raise SpattnConfigError(f"pattern {pattern.source!r} has no closed form (its key "
                                    "ranges are not affine in the positions), so the ranges "
                                    f"strategy ({where}) cannot run it: use strategy 'table' "
                                    "(or leave the strategy unset and the analysis picks)")
    else:
        cf = None
    tables = _tables_part(pattern)
    parts = [pattern.source, repr(sorted(pattern.inputs.items())), kind, CODEGEN_VERSION,
             repr(sorted(config.as_dict().items())), _cf_text(cf), _triton_version(),
             device_tag(device)] + ([tables] if tables else [])
    key = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]
    out = (config, cf, key)
    with _lock:
        _configs[memo_key] = out
    return out


def _check_options(options) -> None:
    """The arguments a user can give :meth:`Pattern.kernel_source` that ``strategy.pick``
    takes on trust: the head dim, the dtype, tiles (a 0 would read as unset), warps and
    stages."""
    hd = options.get("head_dim", 128)
    if isinstance(hd, bool) or not isinstance(hd, int) or not 16 <= hd <= 256:
        raise SpattnValueError(f"head_dim must be an integer in 16..256, got {hd!r}")
    try:
        _config.dtype_name(options.get("dtype", "bf16"))
    except ValueError:
        raise SpattnValueError(f"dtype must be float16, bfloat16 or float32 (a torch dtype or "
                               f"its name), got {options.get('dtype')!r}") from None
    _config.check_blocks(**{n: options[n] for n in ("block_m", "block_n", "block_m1",
                                                    "block_n1", "block_m2", "block_n2")
                            if options.get(n) is not None})
    nw, ns = options.get("num_warps"), options.get("num_stages")
    if nw is not None and not _config.is_warps(nw):
        raise SpattnConfigError(f"num_warps must be 1, 2, 4, 8, 16 or 32, got {nw!r}")
    if ns is not None and not _config.is_stages(ns):
        raise SpattnConfigError(f"num_stages must be an integer in 1..8, got {ns!r}")


#: Hex digits of the key in a kernel file's name: 16 (64 bits), so that two kernels of one
#: pattern name share a file only by a collision of 64 bits (with 6, the random search met
#: one among a few thousand kernels of one process).
FILE_KEY_DIGITS = 16


def file_name(pattern, kind: str, key: str) -> str:
    return f"attn_{kind}_{ident(pattern.name)}_{key[:FILE_KEY_DIGITS]}.py"


def _digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def _check(text: str, key: str) -> str | None:
    """None if ``text`` is the intact kernel file of ``key``, else the reason it is not."""
    first, _, body = text.partition("\n")
    if not first.startswith(HEADER_PREFIX):
        return "no spattn header"
    fields = dict(f.split("=", 1) for f in first[len(HEADER_PREFIX):].split() if "=" in f)
    if fields.get("key") != key:
        return f"foreign file (key {fields.get('key')!r}, expected {key!r})"
    if fields.get("sha256") != _digest(body):
        return "corrupt file (content does not match its sha256)"
    return None


def _entry(pattern, kind: str, options: dict):
    """``(config, closed_form, key, path, text)`` of the kernel: found intact, or rendered
    and written."""
    config, cf, key = resolve(pattern, kind, **options)
    path, text = _stored(file_name(pattern, kind, key), key,
                         lambda: render(pattern, kind, config, key, closed_form=cf))
    return config, cf, key, path, text


def _stored(name: str, key: str, render) -> tuple[str, str]:
    """``(path, text)`` of the kernel file ``name`` of ``key``: found intact, or ``render()``
    (its text without the header) written with its header."""
    def invalid(path, reason, instead):
        warnings.warn(f"spattn: kernel cache file {path} is invalid ({reason}); "
                      + (f"using {instead}" if instead else "regenerating it"), RuntimeWarning,
                      stacklevel=6)
        _modules.pop(path, None)

    with _lock:
        found = read_entry(name, lambda text: _check(text, key), invalid)
        if found is not None:
            return found[0], found[1]
        body = render()
        text = f"{HEADER_PREFIX}key={key} sha256={_digest(body)}\n{body}"
        return write_entry(name, text, "kernel cache file"), text


def _imported(spath: str, text: str, fast: tuple):
    """The module of the kernel file ``spath`` with this ``text`` (imported once),
    remembered under ``fast`` (the caller's per-call key). Called with ``_lock`` held.

    A file name holds :data:`FILE_KEY_DIGITS` hex digits of the key: two kernels of one
    pattern name whose keys share them would take turns in one file. A module serves only the text it was imported from,
    and a per-call key only the module it was given (:func:`_fast_module`)."""
    mod = _modules.get(spath)
    if mod is None or getattr(mod, "__spattn_text__", None) != text:
        mod = _import(f"spattn_kernels.{pathlib.PurePath(spath).stem}", spath, text)
        mod.__spattn_text__ = text
        _modules[spath] = mod
    _paths[fast] = spath
    _served[fast] = mod
    return mod


def _fast_module(fast: tuple):
    """The module remembered under the per-call key ``fast``, while its path still holds
    it (None once another kernel's text took the path over). Called with ``_lock`` held."""
    spath, mod = _paths.get(fast), _served.get(fast)
    if spath is None or mod is None or _modules.get(spath) is not mod:
        return None
    return mod


def kernel_file(pattern, kind: str = "fwd", **options) -> pathlib.Path:
    """Path of the generated ``kind`` module of ``pattern``, (re)generated when needed.

    ``options``: ``head_dim`` (default 128), ``dtype`` (default bf16), ``strategy``,
    ``block_m``, ``block_n``, ``num_warps``, ``num_stages``, ``closed_form`` (an
    ``ir.ranges.ClosedForm`` to use instead of the analysis's), ``device``.
    Raises :class:`SpattnCacheError` when no directory could take the file (it is then
    held in memory: :func:`kernel_text` and :func:`load` still work).
    """
    path = _entry(pattern, kind, options)[3]
    if path.startswith(MEMORY_DIR):
        raise SpattnCacheError(f"the {kind} kernel of {pattern.source!r} has no file: "
                               f"{_store_summary()}. Set SPATTN_CACHE_DIR to a writable "
                               "directory.")
    return pathlib.Path(path)


def kernel_text(pattern, kind: str = "fwd", **options) -> str:
    """The text of the generated ``kind`` module (header line included), wherever it is kept."""
    return _entry(pattern, kind, options)[4]


def _store_summary() -> str:
    return "no kernel cache directory can be written (" + "; ".join(
        f"{loc.label}: {loc.why_not}" for loc in _store().locations if loc.why_not) + ")"


class _VerifiedLoader(importlib.abc.InspectLoader):
    """Loads a generated module from the text that was verified, compiled directly: no
    bytecode is read or written, so a stale or corrupt ``__pycache__`` entry can never run."""

    def __init__(self, path: str, text: str):
        self.path, self.text = path, text

    def get_source(self, fullname):
        return self.text

    def get_code(self, fullname):
        return compile(self.text, self.path, "exec", dont_inherit=True)

    def is_package(self, fullname):
        return False


def _import(name: str, path: str, text: str):
    loader = _VerifiedLoader(path, text)
    spec = importlib.util.spec_from_loader(name, loader, origin=path)
    spec.has_location = True            # __file__ is the path
    mod = importlib.util.module_from_spec(spec)
    # inspect (and so Triton) reads the source through linecache: give it the verified text;
    # an entry without mtime is never invalidated by linecache.checkcache
    linecache.cache[path] = (len(text), None, text.splitlines(keepends=True), path)
    sys.modules[name] = mod
    try:
        loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


def load(pattern, kind: str = "fwd", **options):
    """``(module, config)``: the imported generated module (kept in memory) and its config."""
    mod, config, _ = load_with_form(pattern, kind, **options)
    return mod, config


def load_with_form(pattern, kind: str = "fwd", **options):
    """``(module, config, closed_form)``: :func:`load` plus the closed form the module was
    rendered with (None for the table strategy), from one :func:`resolve`."""
    config, cf, key = resolve(pattern, kind, **dict(options))
    # per-call fast path: the module by (cache directory setting, key), no path building
    fast = (_settings.getenv("SPATTN_CACHE_DIR"), kind, key, pattern.name)
    with _lock:
        mod = _fast_module(fast)
        if mod is not None:
            return mod, config, cf
    with _lock:
        _, _, _, spath, text = _entry(pattern, kind, dict(options))
        return _imported(spath, text, fast), config, cf


def load_generated(name: str, key: str, render):
    """The module of another generated kernel family (``name``: its file name, ``key``: its
    32-hex key, ``render()``: its text without the header), kept like the attention kernels:
    verified on disk, rendered and written when missing or invalid, imported once."""
    fast = (_settings.getenv("SPATTN_CACHE_DIR"), "generated", key, name)
    with _lock:
        mod = _fast_module(fast)
        if mod is not None:
            return mod

    with _lock:
        return _imported(*_stored(name, key, render), fast)


def clear_memory() -> None:
    """Forget imported modules, memoised configurations and the cache locations chosen (the
    files stay on disk; the next lookup probes the directories again, and reads ``$HOME``
    again for the default directory)."""
    with _lock:
        _modules.clear()
        _configs.clear()
        _paths.clear()
        _served.clear()
        _stores.clear()
