"""The minimal forward of ``benchmarks/min_fwd.py`` compiled for Hopper (sm_90a) without a
GPU (``--compile-only``): every configuration builds, and Triton's Hopper pass
specialises the warps of exactly the forms NOTES row 91 reports (one loop, 4 warps, O
stored through pointers; not with O stored through a descriptor), and its pipeliner waits
for a product computed a tile ahead right after issuing it (``wgmma.wait_group 0`` only:
NOTES row 94, the overlap the Gluon forwards of ``gluon_fwd.py`` write by hand). A Triton that changes
this fails here, and the templates' decision (docs/decisions.md, "The forward stays a
single warp group's loop") is then worth measuring again."""
from tests.helpers.uninterpreted import run_script


def test_min_fwd_configurations_compile_for_sm90():
    r = run_script("benchmarks/min_fwd.py", "--compile-only")
    lines = {ln[:36].strip(): ln[36:].strip() for ln in r.stdout.splitlines()}
    for label in ("minimal", "+4-D descriptors", "+O by TMA", "+three loops", "+order table",
                  "all four"):
        assert lines[label].startswith("OK warp-specialised False"), (label, r.stdout)
    for label in ("ws 128x128 w4 s2", "ws 128x64 w4 s3", "ws 128x128 w4 s2, 4-D descriptors"):
        assert lines[label].startswith("OK warp-specialised True"), (label, r.stdout)
    assert lines["ws 128x128 w4 s2, O by TMA"].startswith("ERROR"), r.stdout
    ahead = lines["S a tile ahead 128x128 w8 s2"]
    assert ahead.startswith("OK warp-specialised False") and ahead.endswith("waits 0"), r.stdout
