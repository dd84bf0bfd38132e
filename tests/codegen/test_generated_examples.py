"""The committed kernels of examples/generated are what the code generator writes today:
mask-only kernels stay byte-identical when templates gain flags (scores), and a change
of the generated code shows up as a diff to regenerate (``python
examples/generated/regenerate.py``, with a ``CODEGEN_VERSION`` bump)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import filecmp, os, pathlib, sys, tempfile
sys.path.insert(0, str(pathlib.Path("examples/generated").resolve()))
import regenerate as R
from spattn.codegen.config import get_closed_form, ranges_ok
from spattn.runtime import cache
os.environ["SPATTN_CACHE_DIR"] = tempfile.mkdtemp()
bad = []
for pattern, strategy, cf, kinds, opts in R.EXAMPLES:
    if strategy == "ranges":
        auto = get_closed_form(pattern)
        cf = auto if auto is not None and ranges_ok(auto) else cf
    for kind in kinds:
        path = cache.kernel_file(pattern, kind, head_dim=128, dtype="bf16", strategy=strategy,
                                 closed_form=cf, **opts)
        committed = R.HERE / path.name
        if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
            bad.append(path.name)
print("DIFFER", bad)
sys.exit(1 if bad else 0)
'''


def test_committed_kernels_regenerate_identically():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
