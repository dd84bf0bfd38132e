set -u
source benchmarks/device_setup.sh
export SPATTN_AUTOTUNE=0
R=/tmp/r1; mkdir -p $R
pack(){ tar czf $OUT/r1.tgz -C /tmp r1; }
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv > $R/gpu.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $R/gpu.txt
git log --oneline -1 >> $R/gpu.txt 2>/dev/null
P="flux-window-80x80 flux-stride-16x16 hunyuan-window-18x24x24 hunyuan-stride-16x8x8"
timeout 230 python3 benchmarks/layouts.py --out $R/auto --only $P --configs "128,64,8,3;64,64,4,3;128,128,8,3" > $R/auto.log 2>&1; pack
SPATTN_LAYOUT_GATHER=kernel timeout 120 python3 benchmarks/layouts.py --out $R/kernel --only $P > $R/kernel.log 2>&1; pack
timeout 170 python3 -m pytest -m gpu -q -p no:cacheprovider tests/runtime > $R/gpu_tests.log 2>&1; pack
echo "== auto"; tail -12 $R/auto.log; echo "== kernel"; tail -9 $R/kernel.log; echo "== tests"; tail -5 $R/gpu_tests.log
