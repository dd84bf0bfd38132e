"""The kernel cache in directories that cannot be used as they are.

Every case ends in a correct result (the generated forward kernel, run under the
interpreter, against the float64 reference) or a clear SpattnError, with a
RuntimeWarning that names what was wrong.  The fallback directory (``spattn-<uid>`` under
the system temporary directory) is redirected into the test's ``tmp_path``.

Tests run as root here, where permission bits do not stop writes: a read-only directory
is made real by running the check in a child process whose bounding set lacks
CAP_DAC_OVERRIDE (``setpriv``); as another user ``chmod`` is enough.
"""
import hashlib
import importlib.util
import inspect
import json
import marshal
import multiprocessing
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch

import spattn
from spattn.dsl.errors import SpattnCacheError
from spattn.runtime import cache, tune
from spattn.runtime.plan import PLANS
from spattn.runtime.reference import attention_reference

interpreter = pytest.mark.interpreter    # the tests that run the generated kernel

ROOT = pathlib.Path(__file__).resolve().parents[2]
SRC = "causal & window(9)"
SHAPE = dict(B=1, H=2, L=40, D=16)


def forget():
    """Forget every kernel, tuning choice and plan held in memory (what a new process has)."""
    cache.clear_memory()
    tune.clear_memory()
    PLANS.clear()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A clean cache state; the fallback directory's parent (the 'system temporary
    directory') is ``tmp_path/systmp``."""
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    forget()
    tune.clear_memory()
    yield tmp_path
    forget()
    tune.clear_memory()


def fallback(tmp_path) -> pathlib.Path:
    return tmp_path / "systmp" / f"spattn-{os.geteuid()}"


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, L, D = SHAPE.values()
    return [torch.randn(B, H, L, D, generator=g) for _ in range(3)]


def run_checked(pattern=None):
    """The forward through the Triton kernel (interpreter) against the float64 reference."""
    pattern = pattern or spattn.compile(SRC, backend="triton")
    q, k, v = qkv()
    o = pattern(q, k, v)
    m = pattern.mask(SHAPE["L"], SHAPE["L"], num_heads=SHAPE["H"])
    ref, _ = attention_reference(q.double(), k.double(), v.double(), m)
    torch.testing.assert_close(o.double(), ref, atol=1e-4, rtol=1e-4)


class no_spattn_warnings(warnings.catch_warnings):
    """Fail on any spattn warning (others, e.g. numpy's inside Triton's interpreter, pass)."""

    def __enter__(self):
        out = super().__enter__()
        warnings.filterwarnings("error", message="spattn", category=RuntimeWarning)
        return out


def warned(record, text):
    return [str(w.message) for w in record if text in str(w.message)]


def kernel_name(pattern=None):
    pattern = pattern or spattn.compile(SRC, backend="triton")
    _, _, key = cache.resolve(pattern, "fwd", head_dim=SHAPE["D"], dtype=torch.float32)
    return cache.file_name(pattern, "fwd", key)


# ----------------------------------------------------------- unusable directories

@interpreter
@pytest.mark.parametrize("where", ["regular-file", "under-a-file"])
def test_cache_dir_that_is_not_a_directory_falls_back(env, monkeypatch, where):
    blocker = env / "blocker"
    blocker.write_text("not a directory")
    setting = blocker if where == "regular-file" else blocker / "cache"
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(setting))
    with pytest.warns(RuntimeWarning, match="cannot write to the kernel cache") as rec:
        run_checked()
    msg = warned(rec, "cannot write")[0]
    assert str(setting) in msg and str(fallback(env)) in msg and "SPATTN_CACHE_DIR" in msg
    assert (fallback(env) / kernel_name()).is_file()
    assert blocker.read_text() == "not a directory"
    assert oct(fallback(env).stat().st_mode & 0o777) == "0o700"


@interpreter
def test_home_not_writable_without_setting_falls_back(env, monkeypatch):
    blocker = env / "blocker"
    blocker.write_text("x")
    monkeypatch.delenv("SPATTN_CACHE_DIR")
    monkeypatch.setenv("HOME", str(blocker / "home"))
    with pytest.warns(RuntimeWarning, match=r"home/\.cache/spattn.*is used instead"):
        run_checked()
    assert (fallback(env) / kernel_name()).is_file()


@interpreter
def test_nothing_writable_keeps_kernels_in_memory(env, monkeypatch):
    blocker = env / "blocker"
    blocker.write_text("x")
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(blocker / "tmp"))
    p = spattn.compile(SRC, backend="triton")
    with pytest.warns(RuntimeWarning, match="process memory is used instead"):
        run_checked(p)
    assert "@triton.jit" in p.kernel_source(head_dim=16, dtype="fp32")
    with pytest.raises(SpattnCacheError, match="SPATTN_CACHE_DIR"):
        p.kernel_path
    with pytest.raises(SpattnCacheError, match="no kernel cache directory can be written"):
        cache.cache_dir()


@interpreter
@pytest.mark.parametrize("unsafe", ["world-writable", "symlink"])
def test_untrusted_fallback_directory_is_not_used(env, monkeypatch, unsafe):
    """The fallback's modules are executed: one others may write (or a link) is refused."""
    target = fallback(env)
    if unsafe == "world-writable":
        target.mkdir(mode=0o700)
        target.chmod(0o777)
    else:
        (env / "elsewhere").mkdir()
        target.symlink_to(env / "elsewhere")
    blocker = env / "blocker"
    blocker.write_text("x")
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(blocker))
    with pytest.warns(RuntimeWarning) as rec:
        run_checked()
    assert warned(rec, f"not using {target}")
    assert warned(rec, "process memory is used instead")
    if unsafe == "symlink":
        assert not list((env / "elsewhere").iterdir())


READ_ONLY_CHILD = r"""
import json, os, sys, warnings
import torch
import spattn
from spattn.runtime import cache
from spattn.runtime.plan import PLANS
from spattn.runtime.reference import attention_reference
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
out = {}
for d in sys.argv[1:]:
    os.environ["SPATTN_CACHE_DIR"] = d
    cache.clear_memory()
    PLANS.clear()
    p = spattn.compile("causal & window(9)", backend="triton")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        o = p(q, k, v)
    ref, _ = attention_reference(q.double(), k.double(), v.double(), p.mask(40, 40, num_heads=2))
    out[d] = {"err": float((o.double() - ref).abs().max()),
              "warnings": [str(w.message) for w in rec if "spattn" in str(w.message)],
              "file": sorted(cache._paths.values())[0]}
print(json.dumps(out))
"""


def _read_only_runner():
    """The command prefix that runs a child unable to write a directory of mode 0555 (empty
    when not root), or None when there is none."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]
    return None if subprocess.run(prefix + ["true"], capture_output=True).returncode else prefix


@interpreter
def test_read_only_cache_dir(env, monkeypatch):
    """An empty read-only directory falls back; a read-only one holding the kernel is used
    as it is (a prebuilt cache), without a warning."""
    prefix = _read_only_runner()
    if prefix is None:
        pytest.skip("running as root without setpriv: permission bits do not stop writes")
    empty, prebuilt = env / "ro-empty", env / "ro-prebuilt"
    empty.mkdir()
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(prebuilt))
    run_checked()
    before = {d: sorted(p.name for p in d.iterdir()) for d in (empty, prebuilt)}
    for d in before:
        d.chmod(0o555)
    try:
        child_env = {**os.environ, "TMPDIR": str(env / "systmp"), "TRITON_INTERPRET": "1"}
        r = subprocess.run(prefix + [sys.executable, "-c", READ_ONLY_CHILD, str(empty),
                                     str(prebuilt)], env=child_env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    finally:
        for d in before:
            d.chmod(0o755)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert {d: sorted(p.name for p in d.iterdir()) for d in before} == before
    assert out[str(empty)]["err"] < 1e-4 and out[str(prebuilt)]["err"] < 1e-4
    assert out[str(prebuilt)]["warnings"] == []
    assert out[str(prebuilt)]["file"].startswith(str(prebuilt))
    assert any("cannot write to the kernel cache" in w and "Permission denied" in w
               for w in out[str(empty)]["warnings"]), out[str(empty)]["warnings"]
    assert out[str(empty)]["file"].startswith(str(fallback(env)))


# ------------------------------------------------------------ damaged entries

def _populate(env, monkeypatch):
    d = env / "kernels"
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(d))
    run_checked()
    path = d / kernel_name()
    good = path.read_text()
    forget()
    return path, good


def _flip(text):
    i = text.index("tl.maximum")
    return text[:i] + "tl.minimum" + text[i + len("tl.maximum"):]


def _flip_bit(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x01
    return bytes(b)


DAMAGE = {
    "truncated": lambda p, good: p.write_text(good[: len(good) // 3]),
    "edited": lambda p, good: p.write_text(_flip(good)),
    "flipped-bit": lambda p, good: p.write_bytes(_flip_bit(good.encode(), len(good) // 2)),
    "flipped-header-bit": lambda p, good: p.write_bytes(_flip_bit(good.encode(), 20)),
    "foreign-header": lambda p, good: p.write_text(good.replace("key=", "key=f00", 1)),
    "no-header": lambda p, good: p.write_text(good.split("\n", 1)[1]),
    "empty": lambda p, good: p.write_text(""),
    "not-utf8": lambda p, good: p.write_bytes(b"\xff\xfe" + good.encode()),
    "empty-directory": lambda p, good: (p.unlink(), p.mkdir()),
    "fifo": lambda p, good: (p.unlink(), os.mkfifo(p)),
}


def _alarm(signum, frame):
    raise TimeoutError("blocked reading the kernel cache")


@interpreter
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_entry_is_regenerated(env, monkeypatch, damage):
    path, good = _populate(env, monkeypatch)
    DAMAGE[damage](path, good)
    old = signal.signal(signal.SIGALRM, _alarm)     # a FIFO must never be read
    signal.alarm(120)
    try:
        with pytest.warns(RuntimeWarning, match="is invalid .*regenerating it"):
            run_checked()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert path.is_file() and path.read_text() == good
    forget()
    with no_spattn_warnings():
        run_checked()


@interpreter
def test_directory_in_the_way_is_routed_around(env, monkeypatch):
    """A non-empty directory at the kernel's path is left alone; the kernel is written to the
    fallback, and later processes (here: fresh memory) find it there."""
    path, good = _populate(env, monkeypatch)
    path.unlink()
    (path / "keep").mkdir(parents=True)
    with pytest.warns(RuntimeWarning) as rec:
        run_checked()
    assert warned(rec, "a directory that is not empty is in the way")
    routed = fallback(env) / path.name
    assert routed.read_text() == good and (path / "keep").is_dir()
    for _ in range(2):
        forget()
        with pytest.warns(RuntimeWarning, match=f"is invalid .*using {routed}"):
            run_checked()
    shutil.rmtree(path)            # the obstacle gone: the configured directory again
    forget()
    with no_spattn_warnings():
        run_checked()
    assert path.read_text() == good


def _pyc_header(path: pathlib.Path) -> bytes:
    """The header CPython checks a ``.pyc`` against its source with (PEP 552, timestamp
    form): a corrupt body behind it is what Python's own loader would unmarshal."""
    st = path.stat()
    return (importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little")
            + (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
            + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little"))


@interpreter
@pytest.mark.parametrize("body", ["bad-marshal", "truncated"])
def test_corrupt_bytecode_is_never_read(env, monkeypatch, body):
    """Modules are compiled from the verified text: a corrupt ``__pycache__`` entry that
    matches the source's size and time is never read, and none is written; inspect (and so
    Triton) sees the verified text."""
    path, good = _populate(env, monkeypatch)
    assert not (path.parent / "__pycache__").exists()
    pyc = pathlib.Path(importlib.util.cache_from_source(str(path)))
    pyc.parent.mkdir()
    code = marshal.dumps(compile(good, str(path), "exec"))
    pyc.write_bytes(_pyc_header(path) + (b"\xff\x00bad" * 8 if body == "bad-marshal"
                                         else code[: len(code) // 2]))
    pyc_text = pyc.read_bytes()
    with no_spattn_warnings():
        run_checked()
        run_checked()
    assert pyc.read_bytes() == pyc_text
    mod, _ = cache.load(spattn.compile(SRC), "fwd", head_dim=16, dtype=torch.float32)
    assert isinstance(mod.__spec__.loader, cache._VerifiedLoader)
    kernel = next(v for n, v in vars(mod).items() if n.startswith("attn_fwd_"))
    source = inspect.getsource(kernel.fn)
    assert source.startswith("@triton.jit") and source in good
    path.write_text("# edited on disk\n" * good.count("\n"))
    assert inspect.getsource(kernel.fn) == source


# ------------------------------------------------------------- autotune files

def _tune_record(key):
    return {"key": key, "kind": "fwd", "config": {"block_m": 64, "block_n": 64, "num_warps": 4,
                                                  "num_stages": 3, "loop": "split"}}


@pytest.mark.parametrize("hostile", ["cache-dir-is-a-file", "tune-is-a-file",
                                     "entry-is-a-directory", "deeply-nested-json"])
def test_tune_files_survive_hostile_directories(env, monkeypatch, hostile):
    d = env / "kernels"
    key = "0123456789abcdef0123456789abcdef"
    if hostile == "cache-dir-is-a-file":
        d.write_text("x")
    elif hostile == "tune-is-a-file":
        d.mkdir()
        (d / "tune").write_text("x")
    elif hostile == "entry-is-a-directory":
        (d / "tune" / f"{key}.json" / "x").mkdir(parents=True)
    else:
        (d / "tune").mkdir(parents=True)
        (d / "tune" / f"{key}.json").write_text("[" * 100000 + "]" * 100000)
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(d))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert tune.read(key, "fwd") is None
        tune.write(key, _tune_record(key))
        tune.clear_memory()
        cache.clear_memory()          # a new process
        assert tune.read(key, "fwd") == _tune_record(key)["config"]
    assert all(issubclass(w.category, RuntimeWarning) for w in rec)
    if hostile == "deeply-nested-json":
        assert warned(rec, "nested too deeply")
        assert json.loads((d / "tune" / f"{key}.json").read_text())["key"] == key
    else:
        assert warned(rec, "autotune file") or warned(rec, "cannot write to the kernel cache")


# ---------------------------------------------------------------- concurrency

def _worker(cache_dir, barrier, queue):
    os.environ["SPATTN_CACHE_DIR"] = cache_dir
    forget()
    out = {}
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        barrier.wait()
        for src in ("causal", "causal & window(33)", "chunked(64)"):
            p = spattn.compile(src)
            for kind in ("fwd", "bwd"):
                text = cache.kernel_text(p, kind, head_dim=32, dtype="fp16")
                out[f"{src}:{kind}"] = hashlib.sha256(text.encode()).hexdigest()
        key = "f" * 32
        tune.write(key, _tune_record(key))
        tune.clear_memory()
        out["tune"] = tune.read(key, "fwd")
    queue.put((out, [str(w.message) for w in rec]))


@pytest.mark.skipif(sys.platform != "linux", reason="forks the test process")
def test_eight_processes_share_one_directory(env, monkeypatch):
    """Eight processes writing the same entries at once agree and leave valid files only."""
    d = env / "shared"
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(d), barrier, queue)) for _ in range(8)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    digests = [r[0] for r in results]
    assert all(x == digests[0] for x in digests)
    assert not [w for r in results for w in r[1] if "spattn" in w]
    files = sorted(p.name for p in d.rglob("*") if p.is_file())
    assert len(files) == 7 and not [f for f in files if f.endswith(".tmp")]
    for name, digest in digests[0].items():
        if name != "tune":
            src, kind = name.rsplit(":", 1)
            forget()
            monkeypatch.setenv("SPATTN_CACHE_DIR", str(d))
            with no_spattn_warnings():
                text = cache.kernel_text(spattn.compile(src), kind, head_dim=32, dtype="fp16")
            assert hashlib.sha256(text.encode()).hexdigest() == digest
