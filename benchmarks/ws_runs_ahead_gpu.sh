#!/usr/bin/env bash
# One device call (about 9 minutes) that checks and measures the runs-ahead kernels of this
# branch: the Gluon GPU tests, then an A/B of the three Gluon kernels forced on documents
# against the base commit's (make it first, on the dev machine:
#   python benchmarks/ab.py --make-base e3504f4 --out .out/base_pkg
# and carry .whl and .out), then the Gluon backward against the generated one and Flex.
source benchmarks/device_setup.sh >/dev/null 2>&1; export SPATTN_AUTOTUNE=0
nvidia-smi --query-gpu=name --format=csv,noheader
python -c "import torch, triton; print(torch.__version__, triton.__version__)"
timeout 180 python -m pytest -q -m gpu tests/runtime/test_ws_fwd.py tests/runtime/test_ws_dq.py \
    tests/runtime/test_ws_bwd.py -p no:cacheprovider > $OUT/tests.log 2>&1; tail -4 $OUT/tests.log
SPATTN_WS_FWD=1 SPATTN_WS_DQ=1 SPATTN_WS_BWD=1 timeout 190 python benchmarks/ab.py \
    --base-pkg .out/base_pkg --N 16384 65536 --patterns documents4 documents20 documents100 \
    --rounds 2 --json $OUT/ab_forced.json > $OUT/ab_forced.log 2>&1
grep "^|" $OUT/ab_forced.log || tail -3 $OUT/ab_forced.log | cut -c1-600
SPATTN_WS_FWD=1 SPATTN_WS_DQ=1 timeout 140 python benchmarks/ws_bwd.py --rounds 2 \
    --only "4 documents 16K" "20 documents 64K" "100 documents 64K" --out $OUT/wsb \
    > $OUT/ws_bwd.log 2>&1
grep "^|\|taken\|PARTIAL" $OUT/ws_bwd.log | cut -c1-250 | tail -8
