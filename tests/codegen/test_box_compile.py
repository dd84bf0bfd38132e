"""Forward kernels that read a token layout's boxes through 5-D TMA descriptors
(``rows="box"``) compile for Hopper (sm_90) without a GPU, with 5-D bulk tensor loads in
the PTX: 2-D (a padded grid) and 3-D layouts (batch and heads folded) in the table
strategy, a 1-D one in the ranges strategy, the split and fused loops, 64-bit integers, the
FULL key tiles as runs (tests/helpers/compile_kernels.py ``--box``)."""
from tests.helpers.uninterpreted import run_script


def test_box_kernels_compile_for_sm90():
    r = run_script("tests/helpers/compile_kernels.py", "--box")
    assert r.stdout.count("OK ") == 8 and r.stdout.count(" runs") == 2 and "rows': 'box'" in r.stdout, r.stdout
