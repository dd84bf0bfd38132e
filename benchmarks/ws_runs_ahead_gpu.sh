#!/usr/bin/env bash
# One device call (about 9 minutes) for the Gluon kernels' rows' runs: their GPU tests, then
# the Gluon forward and the Gluon backward (dQ and dK/dV) each forced on and off where
# auto's PARTIAL shares for rows' runs are not yet timed (ws_fwd.MAX_RUNS_SHARE,
# ws_bwd.MAX_RUNS_SHARE): causal 4K, documents at random cuts from 7% to 100% PARTIAL.
source benchmarks/device_setup.sh >/dev/null 2>&1; export SPATTN_AUTOTUNE=0
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 300 python -m pytest -q -m gpu tests/runtime/test_ws_fwd.py tests/runtime/test_ws_dq.py \
    tests/runtime/test_ws_bwd.py -p no:cacheprovider > $OUT/tests.log 2>&1
tail -3 $OUT/tests.log | cut -c1-300
timeout 100 python benchmarks/ws_fwd.py --rounds 2 --only "causal 4K" \
    "4 documents at random cuts, causal, 16K" "20 documents at random cuts, causal, 16K" \
    "100 documents at random cuts, causal, 64K" "1000 documents, causal, 64K" \
    --out $OUT/wsf > $OUT/ws_fwd.log 2>&1
SPATTN_WS_FWD=1 SPATTN_WS_DQ=1 timeout 150 python benchmarks/ws_bwd.py --rounds 2 \
    --only "causal 4K" "20 documents 16K" "100 documents 16K" "1000 documents 64K" \
    --out $OUT/wsb > $OUT/ws_bwd.log 2>&1
grep "^|" $OUT/ws_fwd.log | cut -c1-200 || tail -3 $OUT/ws_fwd.log
grep "^|" $OUT/ws_bwd.log | cut -c1-200 || tail -3 $OUT/ws_bwd.log
