#!/usr/bin/env bash
# One device call for the GRPO loss kernels: JIT-build r1mega_grpo_cuda for sm_90, run the GPU
# tests, then `r1mega bench grpo-loss`. Logs land in $OUT (the device tool brings them back).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MAX_JOBS=16
OUT=${OUT:-/tmp/gpu_grpo}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
start=$(date +%s)
python3 - <<'PY' 2>&1 | tee "$OUT/build.log"
from r1mega.ops import _cuda_ext
m = _cuda_ext.get()
print("extension:", m, "error:", _cuda_ext.load_error())
PY
echo "build took $(( $(date +%s) - start )) s"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_grpo_kernel.py 2>&1 | tee "$OUT/gpu_tests.log"
timeout 150 python3 -m r1mega.bench.grpo_loss "$@" 2>&1 | tee "$OUT/bench.log"
