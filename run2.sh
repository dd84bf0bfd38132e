set -u
source benchmarks/device_setup.sh
export SPATTN_AUTOTUNE=0
R=/tmp/r2; mkdir -p $R
pack(){ tar czf $OUT/r2.tgz -C /tmp r2; }
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv > $R/gpu.txt
timeout 130 python3 benchmarks/scores.py --out $R/scores --no-tune --rounds 3 --cases "causal+softcap(30),causal+alibi" > $R/scores.log 2>&1; pack
P="flux-window-80x80 flux-stride-16x16 hunyuan-window-18x24x24 hunyuan-stride-16x8x8"
timeout 150 python3 benchmarks/layouts.py --out $R/lay --only $P > $R/lay.log 2>&1; pack
timeout 220 python3 benchmarks/flex16.py --out $R/flex16 --only "dilated(512,4)" "strided(128)" "neighborhood2d(13x13)" > $R/flex16.log 2>&1; pack
echo "== scores"; tail -8 $R/scores.log; echo "== layouts"; tail -7 $R/lay.log; echo "== flex16"; tail -14 $R/flex16.log
