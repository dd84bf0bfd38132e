#!/usr/bin/env bash
# One device call (about 5 minutes) for the Gluon kernels' bound launches: the GPU tests of
# the three Gluon kernels (4 workers), then an A/B of this tree against a base commit
# (`benchmarks/ab.py`, carry .out/base_pkg and .whl) on short and mid-size calls, where the
# host's part of a call shows; with the argument `small`, also the Gluon forward forced on
# and off on small calls (ws_fwd.MIN_WORK). Prints the tables last; logs under $OUT.
source benchmarks/device_setup.sh >/dev/null 2>&1; export SPATTN_AUTOTUNE=0
nvidia-smi --query-gpu=name --format=csv,noheader
# (the 24-head layout case's float64 reference takes most of an 80 GB card: run alone)
timeout 150 python -m pytest -q -n 4 -m gpu tests/runtime/test_ws_fwd.py \
    tests/runtime/test_ws_dq.py tests/runtime/test_ws_bwd.py tests/runtime/test_ws_scores.py \
    -k "not test_layout_forward_gpu" -p no:cacheprovider > $OUT/tests.log 2>&1
timeout 40 python -m pytest -q -m gpu tests/runtime/test_ws_fwd.py -k test_layout_forward_gpu \
    -p no:cacheprovider >> $OUT/tests.log 2>&1
grep -E "FAILED|ERROR|passed|failed" $OUT/tests.log | tail -8 | cut -c1-300
timeout 120 python benchmarks/ab.py --base-pkg .out/base_pkg --N 4096 16384 \
    --patterns causal documents20 --rounds 3 --host --json $OUT/ab.json > $OUT/ab.log 2>&1
[ "$1" = "small" ] && timeout 80 python benchmarks/ws_fwd.py --rounds 2 --only "full 1K" \
    "full 1K B8 D64" "full 2K" "causal 4K" --out $OUT/wsf > $OUT/ws_fwd.log 2>&1
grep "^|" $OUT/ab.log | cut -c1-200 || tail -3 $OUT/ab.log
[ "$1" = "small" ] && (grep "^|" $OUT/ws_fwd.log | cut -c1-200 || tail -3 $OUT/ws_fwd.log)
