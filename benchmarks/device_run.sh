#!/usr/bin/env bash
# One call's GPU work on a lent GPU machine (batched into one command): the GPU tests
# of the warm-up, decode and score (plans, bound launches, torch.compile) paths, then the
# layout, score and decode benchmarks, each under a time limit so that the call fits the
# device time at hand. Logs and JSON under $OUT; the tables last. Carry: .whl (lark).
# Autotuning off: default configurations, so that the figures are of the kernels' defaults
# and the call does not spend its time tuning (except benchmarks/documents.py, which
# measures the tuned kernels unless DOC_TUNE=off; it is off unless T_DOCUMENTS is set, since
# with it the call nears the 10-minute command limit: run it in a call of its own; so is
# T_SHORT, the short calls against Flex). T_* variables set each
# step's time limit (0 skips it); LAYOUT_ARGS adds options to benchmarks/layouts.py (e.g.
# '--bwd --flex', or '--configs "128,128,8,3;tuned"'). Every log and JSON file goes into
# one archive, $OUT/run.tgz (a call brings back at most 8 files).
FINAL="$OUT"
OUT=/tmp/run && rm -rf "$OUT" && mkdir -p "$OUT"
source benchmarks/device_setup.sh > "$OUT/setup.log" 2>&1
export SPATTN_AUTOTUNE=0
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$OUT/gpu.txt"
git rev-parse HEAD >> "$OUT/gpu.txt" 2>/dev/null
[ "${T_TESTS:-30}" != 0 ] && timeout "${T_TESTS:-30}" python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/runtime/test_gpu.py::test_warmup_compiles_without_running \
    tests/runtime/test_decode_gpu.py > "$OUT/gpu_tests.log" 2>&1
[ "${T_SCORE_TESTS:-120}" != 0 ] && timeout "${T_SCORE_TESTS:-120}" python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/runtime/test_score_plans.py tests/runtime/test_score_compile.py \
    tests/runtime/test_tune_key.py tests/runtime/test_compile.py \
    >> "$OUT/gpu_tests.log" 2>&1
[ "${T_LAYOUTS:-85}" != 0 ] && eval timeout "${T_LAYOUTS:-85}" python3 benchmarks/layouts.py \
    --out "$OUT" --rounds 2 --only ${LAYOUT_ONLY:-flux-window-80x80 flux-stride-16x16 \
    hunyuan-window-18x24x24 hunyuan-stride-16x8x8 flux-window-80x80-flat} \
    "${LAYOUT_ARGS:-}" > "$OUT/layouts.txt" 2> "$OUT/layouts.log"
[ "${T_SCORES:-60}" != 0 ] && timeout "${T_SCORES:-60}" python3 benchmarks/scores.py --out "$OUT" --no-tune --rounds 2 \
    > "$OUT/scores.txt" 2> "$OUT/scores.log"
[ "${T_DECODE:-40}" != 0 ] && timeout "${T_DECODE:-40}" python3 benchmarks/decode.py --quick --rep 20 --out "$OUT" \
    > "$OUT/decode.txt" 2> "$OUT/decode.log"
# the score variants (table loads, tanh): their GPU tests (about 60 s), then the benchmark
# against the mask alone; e.g. T_SCORE_VARIANTS=240
touch "$OUT/score_variants.txt"
if [ "${T_SCORE_VARIANTS:-0}" != 0 ]; then
    timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/runtime/test_score_loads.py \
        >> "$OUT/gpu_tests.log" 2>&1
    timeout "$(( T_SCORE_VARIANTS - 90 ))" python3 benchmarks/score_variants.py --out "$OUT" \
        > "$OUT/score_variants.txt" 2> "$OUT/score_variants.log"
fi
# documents at 1..1000 documents in 3 fresh processes, tuned (its own empty tuning cache:
# the first process tunes, the others read the choices); e.g. T_DOCUMENTS=300; DOC_ROUNDS
# (default 2) and DOC_SCHEDULE (interleaved, the default, or sequential) pass through;
# DOC_GRAPHS=1 adds the calls replayed from CUDA graphs (--graphs)
touch "$OUT/documents.txt"
if [ "${T_DOCUMENTS:-0}" != 0 ]; then
    timeout "${T_DOCUMENTS}" python3 benchmarks/documents.py --out "$OUT/documents" \
        --cache-root /tmp/spattn-documents --budget "$(( T_DOCUMENTS - 10 ))" \
        --tune "${DOC_TUNE:-shared}" --rounds "${DOC_ROUNDS:-2}" \
        --schedule "${DOC_SCHEDULE:-interleaved}" ${DOC_GRAPHS:+--graphs} \
        > "$OUT/documents.txt" 2> "$OUT/documents.log"
fi
# short calls against Flex (N = 1024-4096, B = 1 and 8, D = 64 and 128; causal, window(256),
# documents), forward and forward+backward; e.g. T_SHORT=270; SHORT_BATCH (default "1 8")
# and SHORT_N (default "1024 2048 4096") choose the cells, T_SHORT shared by the batches
touch "$OUT/short.txt"
if [ "${T_SHORT:-0}" != 0 ]; then
    batches=(${SHORT_BATCH:-1 8})
    for b in "${batches[@]}"; do
        timeout "$(( T_SHORT / ${#batches[@]} ))" python3 benchmarks/bench.py \
            --n ${SHORT_N:-1024 2048 4096} --d 64 128 \
            --batch "$b" --patterns causal "window(256)" documents --rounds 2 \
            --json "$OUT/short_b$b.json" >> "$OUT/short.txt" 2> "$OUT/short_b$b.log"
    done
fi
# the host's and the card's time per forward+backward apart (benchmarks/host_gpu_split.py),
# with the Gluon backward as auto takes it and without; e.g. T_SPLIT=120
touch "$OUT/split.txt"
if [ "${T_SPLIT:-0}" != 0 ]; then
    timeout "$(( T_SPLIT / 2 ))" python3 benchmarks/host_gpu_split.py >> "$OUT/split.txt" \
        2> "$OUT/split.log"
    SPATTN_WS_BWD=0 SPATTN_WS_DQ=0 timeout "$(( T_SPLIT / 2 ))" python3 \
        benchmarks/host_gpu_split.py --patterns causal >> "$OUT/split.txt" 2>> "$OUT/split.log"
fi
touch "$OUT/gpu_tests.log" "$OUT/layouts.txt" "$OUT/scores.txt" "$OUT/decode.txt"
tar czf "$FINAL/run.tgz" -C /tmp run
grep -E "passed|failed|error" "$OUT/gpu_tests.log"; cat "$OUT/layouts.txt" "$OUT/scores.txt" "$OUT/decode.txt" \
    "$OUT/score_variants.txt" "$OUT/documents.txt" "$OUT/short.txt" "$OUT/split.txt"
