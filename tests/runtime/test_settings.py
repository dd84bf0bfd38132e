"""``runtime.settings``: the SPATTN_* environment, read in one place, checked, parsed once per
distinct environment."""
import os

import pytest

from spattn import SpattnConfigError
from spattn.runtime import settings


@pytest.mark.parametrize("fast", [True, False], ids=["posix-dict", "os-environ"])
def test_getenv_follows_os_environ(monkeypatch, fast):
    if not fast:
        monkeypatch.setattr(settings, "_ENV_DATA", None)
    name = "SPATTN_TEST_GETENV_VALUE"
    monkeypatch.delenv(name, raising=False)
    assert settings.getenv(name) is None
    assert settings.getenv(name, "dflt") == "dflt"
    monkeypatch.setenv(name, "64")
    assert settings.getenv(name) == os.environ[name] == "64"
    os.environ[name] = "héllo wörld"                # non-ASCII round trip
    assert settings.getenv(name) == "héllo wörld"
    del os.environ[name]
    assert settings.getenv(name, "gone") == "gone"


def test_current_sees_a_changed_environment(monkeypatch):
    for var in settings.VARIABLES:
        monkeypatch.delenv(var, raising=False)
    base = settings.current()
    assert base.overrides("fwd") == {} and not base.tiles_set("fwd") and base.autotune
    assert settings.current() is base                # parsed once per distinct environment
    monkeypatch.setenv("SPATTN_BLOCK_M", "32")
    monkeypatch.setenv("SPATTN_NUM_WARPS", "4")
    monkeypatch.setenv("SPATTN_BWD_WARPS", "8")
    s = settings.current()
    assert s.overrides("fwd") == {"block_m": 32, "num_warps": 4}
    assert s.overrides("bwd") == {"num_warps": 8} and s.tiles_set("bwd")
    monkeypatch.setenv("SPATTN_STRATEGY", "Table")
    monkeypatch.setenv("SPATTN_TMA", "auto")
    monkeypatch.setenv("SPATTN_AUTOTUNE", "off")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    s = settings.current()
    assert s.strategy == "table" and s.tma is None and not s.autotune and s.interpret
    assert s.overrides("fwd")["strategy"] == "table"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not settings.current().interpret
    assert settings.current().layout == "auto"
    monkeypatch.setenv("SPATTN_LAYOUT", "Off")
    assert settings.current().layout == "off"


@pytest.mark.parametrize("var,value,text", [
    ("SPATTN_AUTOTUNE", "of", "SPATTN_AUTOTUNE='of'"),
    ("SPATTN_BLOCK_N", "48", "power of two"),
    ("SPATTN_BWD_STAGES", "0", "1..8"),
    ("SPATTN_FWD_LOOP", "unrolled", "'split', 'fused', 'persistent'"),
    ("SPATTN_TABLES", "dense", "'auto', 'csr', 'spans', 'runs'"),
    ("SPATTN_LAYOUT", "boxes", "'auto', 'off', 'on'"),
    ("SPATTN_TUNE_REPS", "-1", "integer in 0..100"),
    ("SPATTN_TUNE_REPS", "3.5", "integer in 0..100"),
    ("SPATTN_TUNE_REPS", "\u00b2", "integer in 0..100"),
    ("SPATTN_TUNE_REPS", "9" * 5000, "integer in 0..100"),
    ("SPATTN_BLOCK_M", str(2 ** 40), "power of two in 16..256"),
    ("SPATTN_BWD_BLOCK_N2", "512", "power of two in 16..256"),
    ("TRITON_INTERPRET", "2", "TRITON_INTERPRET='2'"),
    ("TRITON_INTERPRET", " 1", "Triton reads any other value as off"),
    ("SPATTN_TUNE_MARGIN", "5%", r"fraction in \[0, 1\)"),
    ("SPATTN_TUNE_MARGIN", "1.5", r"fraction in \[0, 1\)"),
    ("SPATTN_TUNE_MARGIN", "nan", r"fraction in \[0, 1\)"),
])
def test_bad_values_name_the_variable(monkeypatch, var, value, text):
    monkeypatch.setenv(var, value)
    with pytest.raises(SpattnConfigError, match=text):
        settings.current()


def test_tuning_reps_and_margin(monkeypatch):
    for var in settings.VARIABLES:
        monkeypatch.delenv(var, raising=False)
    s = settings.current()
    assert (s.tune_reps, s.tune_margin) == (settings.TUNE_REPS, settings.TUNE_MARGIN)
    monkeypatch.setenv("SPATTN_TUNE_REPS", " 8 ")
    monkeypatch.setenv("SPATTN_TUNE_MARGIN", "0")
    s = settings.current()
    assert (s.tune_reps, s.tune_margin) == (8, 0.0)
    assert not s.tiles_set("fwd")           # tuning settings do not switch tuning off


@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("YES", True), ("On", True),
                                      ("y", True), ("0", False), ("", False), ("false", False),
                                      ("OFF", False), ("no", False)])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, on):
    """TRITON_INTERPRET's spellings of on and off, any case, as ``triton.knobs`` reads them:
    spattn's settings, backend choice and kernel cache tag agree with Triton's own reading."""
    import triton
    from spattn.runtime import api, cache
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert settings.current().interpret is on
    assert api._interpret() is on
    assert (cache.device_tag() == "interpret") is on
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime"):
        assert bool(knobs.runtime.interpret) is on


def test_triton_interpret_before_triton_knobs(monkeypatch):
    """Before ``triton.knobs`` (Triton 3.2, 3.3) only exactly ``1`` turned the interpreter
    on: there ``true`` is refused rather than read as on (spattn would choose the
    interpreter while Triton compiles for the GPU)."""
    monkeypatch.setattr(settings, "_interpret_spellings", lambda: (("1",), ("", "0")))
    assert settings.interpreting("1") and not settings.interpreting("0")
    with pytest.raises(SpattnConfigError, match=r"TRITON_INTERPRET='true'.*expected 1 "):
        settings.interpreting("true")
