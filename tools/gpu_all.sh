#!/usr/bin/env bash
# The one script the GPU machine runs (device tool): install the carried wheels, build csrc/ with
# setup.py, run tests/gpu, run the benchmarks, optionally the SmolLM2 GRPO run, and print a short
# summary table last. Full logs go to $OUT (at most 8 files come back: keep the list short).
#
#   tools/gpu_all.sh [BENCH_SPEC ...]        default specs: grpo-loss train-step rollout
#     a spec is a bench name plus its flags in one word list, e.g. "rollout --overlap-too";
#     leading NAME=VALUE words set environment variables for that spec alone
#     ("R1MEGA_FP8_QUANT=cuda fp8 --models gemm-heavy"), and a spec whose first word (after
#     them) is a tools/*.py path runs that script instead of a bench
#   env: GPU_SKIP_BUILD=1 (carry the six .so files: tools/gpu_prebuild.sh builds them on the CPU
#        machine, or a previous call's $OUT/so), GPU_SKIP_TESTS=1, GPU_TESTS="tests/gpu/x.py" (default tests/gpu),
#        GPU_SKIP_BENCH=1 (no benchmark, not even the defaults), GPU_SMOLLM2_GGUF=path GPU_SMOLLM2_STEPS=N (runs tools/gpu_smollm2.sh last),
#        GPU_BENCH_TIMEOUT=s (per bench, default 300), GPU_TESTS_TIMEOUT=s (default 420)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/r1mega-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/summary.log") 2>&1   # kept in $OUT too: a call that runs out of time loses its stdout
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c 'import torch, megatron.core; print("torch", torch.__version__, "megatron-core", megatron.core.__version__)'

build_rc=skipped
if [ "${GPU_SKIP_BUILD:-0}" != 1 ]; then
  t0=$(date +%s)
  # setup.py's own arch list (8.0;9.0): the build users get, not a Hopper-only shortcut.
  # One extension after another: torch's BuildExtension writes every extension's build.ninja
  # into one temp folder, so `build_ext -j N` races (checked with torch 2.11: missing objects).
  MAX_JOBS=16 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  build_rc=$?
  echo "build_ext rc=$build_rc in $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/build.log"
  # the built extensions come back so that a later cold call can carry them (GPU_SKIP_BUILD=1)
  mkdir -p "$OUT/so" && cp r1mega_*.so "$OUT/so/" 2>/dev/null
fi

tests_rc=skipped
if [ "${GPU_SKIP_TESTS:-0}" != 1 ]; then
  t0=$(date +%s)
  # SIGINT, not SIGTERM: pytest then still prints the failures' tracebacks and its summary.
  timeout -s INT -k 20 ${GPU_TESTS_TIMEOUT:-420} python3 -m pytest ${GPU_TESTS:-tests/gpu} -v -rfE --tb=short \
    -p no:cacheprovider >"$OUT/gpu_tests.log" 2>&1
  tests_rc=$?
  echo "tests/gpu rc=$tests_rc in $(( $(date +%s) - t0 )) s"
  grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_tests.log" | tail -15
fi

specs=("$@")
[ ${#specs[@]} -gt 0 ] || specs=(grpo-loss train-step rollout)
[ "${GPU_SKIP_BENCH:-0}" != 1 ] || specs=()
names=()
i=0
for spec in "${specs[@]}"; do
  read -r -a words <<<"$spec"
  envs=()
  while [ ${#words[@]} -gt 0 ] && [[ ${words[0]} =~ ^[A-Z][A-Z0-9_]*= ]]; do
    envs+=("${words[0]}"); words=("${words[@]:1}")
  done
  i=$((i + 1))
  name=$i-$(basename "${words[0]}" .py)   # one log per spec, also when a bench runs twice
  names+=("$name")
  echo "== bench $spec"
  t0=$(date +%s)
  if [[ ${words[0]} == tools/*.py ]]; then
    cmd=(python3 "${words[@]}")
  else
    cmd=(python3 -m r1mega.cli bench "${words[@]}")
  fi
  env "${envs[@]}" timeout "${GPU_BENCH_TIMEOUT:-300}" "${cmd[@]}" >"$OUT/bench_$name.log" 2>&1
  echo "rc=$? in $(( $(date +%s) - t0 )) s"
  grep -vE "^\{" "$OUT/bench_$name.log" | tail -40
done

smol_rc=skipped
if [ -n "${GPU_SMOLLM2_GGUF:-}" ]; then
  echo "== SmolLM2 GRPO"
  bash tools/gpu_smollm2.sh "$GPU_SMOLLM2_GGUF" "${GPU_SMOLLM2_STEPS:-30}"
  smol_rc=$?
fi

echo
echo "================ summary"
echo "build_ext rc=$build_rc   tests/gpu rc=$tests_rc ($( [ -f "$OUT/gpu_tests.log" ] && tail -1 "$OUT/gpu_tests.log"))   smollm2 rc=$smol_rc"
for name in "${names[@]}"; do
  printf '%-16s %s\n' "$name" "$(tail -1 "$OUT/bench_$name.log" | cut -c1-900)"
done
