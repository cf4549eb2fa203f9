#!/usr/bin/env bash
# The one script the GPU machine runs (device tool): install the carried wheels, build csrc/,
# run tests/gpu, run the benchmarks, print a short table last. Full logs go to $OUT.
#
#   tools/gpu_all.sh [bench ...]     default benches: grpo-loss train-step rollout
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/r1mega-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c 'import torch, megatron.core; print("torch", torch.__version__, "megatron-core", megatron.core.__version__)'

t0=$(date +%s)
TORCH_CUDA_ARCH_LIST=9.0 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1
build_rc=$?
echo "build_ext rc=$build_rc in $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/build.log"

python3 -m pytest tests/gpu -q -x -p no:cacheprovider >"$OUT/gpu_tests.log" 2>&1
tests_rc=$?
tail -15 "$OUT/gpu_tests.log"

benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(grpo-loss train-step rollout)
for b in "${benches[@]}"; do
  echo "== bench $b"
  timeout 300 python3 -m r1mega.cli bench "$b" >"$OUT/bench_$b.log" 2>&1
  echo "rc=$?"; tail -25 "$OUT/bench_$b.log"
done

echo
echo "================ summary"
echo "build_ext rc=$build_rc   tests/gpu rc=$tests_rc ($(tail -1 "$OUT/gpu_tests.log"))"
for b in "${benches[@]}"; do
  printf '%-12s %s\n' "$b" "$(tail -1 "$OUT/bench_$b.log" | cut -c1-600)"
done
