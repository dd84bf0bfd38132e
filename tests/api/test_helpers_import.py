"""The test helpers change no process-wide setting when a test imports them: the search
tools set ``TRITON_INTERPRET`` only when run as scripts. A test module importing one that
set it on import turned every kernel of a GPU test run into the interpreter's."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
#: run only as scripts (``compile_kernels`` drops TRITON_INTERPRET for its own process)
SCRIPTS = {"compile_kernels"}
MODULES = sorted(p.stem for p in (ROOT / "tests" / "helpers").glob("*.py")
                 if p.stem != "__init__" and p.stem not in SCRIPTS)


@pytest.mark.parametrize("value", [None, "1"], ids=["unset", "set-1"])
def test_importing_the_helpers_leaves_triton_interpret_alone(value):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",
                                                            "SPATTN_CACHE_DIR")}
    if value is not None:
        env["TRITON_INTERPRET"] = value
    code = ("import os\n"
            + "".join(f"import tests.helpers.{m}\n" for m in MODULES)
            + "print(repr(os.environ.get('TRITON_INTERPRET')), "
              "repr(os.environ.get('SPATTN_CACHE_DIR')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [repr(value), "None"], (MODULES, r.stdout)
