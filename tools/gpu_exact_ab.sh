#!/usr/bin/env bash
# Interleaved A/B of the exact mode's small-batch settings on the GPU machine: each run is one
# `bench rollout --exact` process (the settings are read at import), the default mode timed in
# the same process as the baseline; arms run in the given order, so repeat an arm to see drift.
#   tools/gpu_exact_ab.sh SETTINGS "NAME GEMM_SMALL_TILES DECODE_TILES" ...
#   e.g. tools/gpu_exact_ab.sh 256x128x256 "old 64,64,128,4,3 64,4" "new - -"   ("-": the default)
set -u
OUT=${OUT:-/tmp/r1mega-out}
mkdir -p "$OUT"
settings=$1; shift
for arm in "$@"; do
  read -r name gemm dec <<<"$arm"
  env_args=()
  [ "$gemm" != - ] && env_args+=(R1MEGA_EXACT_GEMM_SMALL_TILES="$gemm")
  [ "$dec" != - ] && env_args+=(R1MEGA_EXACT_DECODE_TILES="$dec")
  env "${env_args[@]}" timeout 240 python3 -m r1mega.cli bench rollout --exact --no-peer \
    --settings "$settings" >"$OUT/ab_$name.log" 2>&1
  echo "== $name (gemm ${gemm}, decode tiles ${dec}) rc=$?"
  grep -E "^\[.*(sync|exact)\] rollout" "$OUT/ab_$name.log" | sed -E 's/.*\[(.*)\] rollout ([0-9,]+) tok\/s.*= ([0-9.]+) ms\/step.*/  \1  \2 tok\/s  decode \3 ms\/step/'
done
