"""A benchmark script (``benchmarks/NAME.py``) loaded as a module in a test: the scripts are
not a package, and some import their neighbours by name (``from bench import ...``)."""
from __future__ import annotations

import importlib.util
import pathlib
import sys

DIR = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    """``benchmarks/<name>.py`` as a fresh module ``spattn_bench_<name>``, the folder on
    ``sys.path`` while it loads (so that the neighbours it imports are found)."""
    sys.path.insert(0, str(DIR))
    try:
        spec = importlib.util.spec_from_file_location(f"spattn_bench_{name}", DIR / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(DIR))
