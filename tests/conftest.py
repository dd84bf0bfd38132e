"""Test configuration shared by the whole suite.

Tests are grouped by stage (``dsl``, ``ir``, ``codegen``, ``runtime``, ``api``) and selected
by markers: ``gpu`` tests need a CUDA device, ``interpreter`` tests run the generated Triton
kernels on CPU tensors and need ``TRITON_INTERPRET=1``, which this file sets where there is
no GPU (before any kernel is JIT-decorated: hence here, first). On a CUDA machine the
kernels are compiled for the device.
"""
import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from spattn.runtime.settings import interpreting  # noqa: E402

# "ci" (the default) draws the same examples on every run (derandomized, no example
# database), so a clean clone tests what was tested before it landed; "explore" searches
# afresh on every run with many more examples, for hunting bugs (a test's own
# ``max_examples`` is multiplied by SPATTN_HYPOTHESIS_SCALE, 10 by default, in that profile
# too: most property tests set their own count); "dev" is quick.
_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=60, derandomize=True, database=None, **_common)
settings.register_profile("explore", max_examples=600, **_common)
settings.register_profile("dev", max_examples=25, **_common)
settings.load_profile(os.environ.get("SPATTN_HYPOTHESIS", "ci"))


def _explore_more(items):
    """Under the ``explore`` profile, each property test with its own ``max_examples`` runs
    SPATTN_HYPOTHESIS_SCALE times as many random examples (a test's settings take precedence
    over the profile's, so the profile alone would not search those tests any harder)."""
    if os.environ.get("SPATTN_HYPOTHESIS") != "explore":
        return
    factor = int(os.environ.get("SPATTN_HYPOTHESIS_SCALE", "10"))
    for fn in {id(f): f for f in (getattr(i, "obj", None) for i in items)}.values():
        own = getattr(fn, "_hypothesis_internal_use_settings", None)
        if own is not None and own is not settings.default and hasattr(fn, "hypothesis"):
            fn._hypothesis_internal_use_settings = settings(
                own, max_examples=own.max_examples * factor, derandomize=False)


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests without CUDA and ``interpreter`` tests without the interpreter;
    scale the property tests' examples under the ``explore`` profile."""
    _explore_more(items)
    interpreted = interpreting(os.environ.get("TRITON_INTERPRET"))
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_interp = pytest.mark.skip(reason="runs the kernels on the CPU: needs TRITON_INTERPRET=1")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        elif "interpreter" in item.keywords and not interpreted:
            item.add_marker(no_interp)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Generated kernels go to a temporary cache of the test run, never the user's; so does the
    cache's fallback (``spattn-<uid>`` under the system temporary directory)."""
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(base / "spattn-cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(base))
