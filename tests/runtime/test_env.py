"""``codegen.config.getenv``: the per-call environment read agrees with ``os.environ``."""
import os

import pytest

from spattn.codegen import config as strategy


@pytest.mark.parametrize("fast", [True, False], ids=["posix-dict", "os-environ"])
def test_getenv_follows_os_environ(monkeypatch, fast):
    if not fast:
        monkeypatch.setattr(strategy, "_ENV_DATA", None)
    name = "SPATTN_TEST_GETENV_VALUE"
    monkeypatch.delenv(name, raising=False)
    assert strategy.getenv(name) is None
    assert strategy.getenv(name, "dflt") == "dflt"
    monkeypatch.setenv(name, "64")
    assert strategy.getenv(name) == os.environ[name] == "64"
    os.environ[name] = "héllo wörld"                # non-ASCII round trip
    assert strategy.getenv(name) == "héllo wörld"
    del os.environ[name]
    assert strategy.getenv(name, "gone") == "gone"


def test_overrides_see_a_changed_environment(monkeypatch):
    """A setting changed between two calls shows in the next call's overrides."""
    monkeypatch.delenv("SPATTN_BLOCK_M", raising=False)
    before = strategy.env_overrides("fwd")
    monkeypatch.setenv("SPATTN_BLOCK_M", "32")
    assert strategy.env_overrides("fwd") == tuple(sorted(before + (("SPATTN_BLOCK_M", "32"),),
                                                         key=lambda kv: strategy.ENV_VARS["fwd"]
                                                         .index(kv[0])))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not strategy.interpret_mode()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert strategy.interpret_mode()
