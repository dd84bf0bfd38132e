"""The progress display of long work (``runtime/progress.py``, ``SPATTN_PROGRESS``): plan
builds and ``explain()``, shown after a delay, forced on without a terminal here."""
import io
import time

import pytest
import torch

import spattn
from spattn.runtime import progress as pg
from spattn.runtime.plan import PLANS


@pytest.fixture
def no_delay(monkeypatch):
    monkeypatch.setattr(pg, "DELAY", 0)


def _q(L=24):
    return torch.randn(1, 2, L, 16)


def test_forced_on_shows_a_plan_build_and_its_time(monkeypatch, capsys, no_delay):
    monkeypatch.setenv("SPATTN_PROGRESS", "1")
    PLANS.clear()
    q = _q()
    spattn.compile("causal & window(5)", backend="torch")(q, q, q)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "spattn: building the torch plan of 'pattern' for q [1, 2, 24, 16] " \
                     "float32 (kernels, tables) ..."
    assert err[1].startswith("spattn: building the torch plan of 'pattern'")
    assert " done in " in err[1] and err[1].endswith(" s")
    spattn.compile("causal & window(5)", backend="torch")(q, q, q)     # the plan is cached
    assert capsys.readouterr().err == ""


def test_forced_on_shows_explain(monkeypatch, capsys, no_delay):
    monkeypatch.setenv("SPATTN_PROGRESS", "on")
    spattn.compile("causal").explain(64)
    assert "spattn: explaining 'pattern' at Lq=64, Lk=64 ..." in capsys.readouterr().err


@pytest.mark.parametrize("value", [None, "auto", "0", "off"], ids=["unset", "auto", "0", "off"])
def test_not_shown_without_a_terminal_unless_forced(monkeypatch, capsys, no_delay, value):
    if value is None:
        monkeypatch.delenv("SPATTN_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("SPATTN_PROGRESS", value)
    PLANS.clear()
    q = _q(20)
    spattn.compile("causal & window(6)", backend="torch")(q, q, q)
    assert capsys.readouterr().err == ""


def test_short_work_shows_nothing(monkeypatch, capsys):
    monkeypatch.setenv("SPATTN_PROGRESS", "1")
    monkeypatch.setattr(pg, "DELAY", 30.0)
    with pg.progress("short"):
        pass
    assert capsys.readouterr().err == ""


def test_shown_after_the_delay_once_and_a_failure_is_said(monkeypatch, capsys):
    monkeypatch.setenv("SPATTN_PROGRESS", "1")
    monkeypatch.setattr(pg, "DELAY", 0.05)
    with pytest.raises(ZeroDivisionError):
        with pg.progress("long"), pg.progress("nested"):
            time.sleep(0.3)
            1 / 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0] == "spattn: long ..."
    assert lines[1].startswith("spattn: long: failed after ")


def test_terminal_shows_a_rich_spinner(monkeypatch, no_delay):
    """On a terminal: a transient rich line (spinner, text, elapsed), then the total."""
    class Tty(io.StringIO):
        def isatty(self):
            return True
    stream = Tty()
    monkeypatch.setattr(pg.sys, "stderr", stream)
    monkeypatch.delenv("SPATTN_PROGRESS", raising=False)
    with pg.progress("compiling") as p:
        assert p._display is not None and p._display.live.is_started
    assert not p._display.live.is_started
    assert "spattn: compiling: done in" in stream.getvalue()


def test_bad_value_is_a_config_error(monkeypatch):
    monkeypatch.setenv("SPATTN_PROGRESS", "sometimes")
    with pytest.raises(spattn.SpattnConfigError, match="SPATTN_PROGRESS='sometimes'"):
        with pg.progress("x"):
            pass
