#!/usr/bin/env bash
# Interleaved A/B of the exact mode's settings on the GPU machine: each run is one
# `bench rollout --exact` process (the settings are read at import), the default mode timed in
# the same process as the baseline; arms run in the given order, so repeat an arm to see drift.
#   tools/gpu_exact_ab.sh SETTINGS "NAME GEMM_SMALL_TILES DECODE_TILES [ATTENTION [GEMM_TMA [CUBLASLT [GEMM [WS]]]]]" ...
#   ATTENTION: keys | rows (R1MEGA_EXACT_ATTENTION); GEMM_TMA: 1 | 0 (R1MEGA_EXACT_GEMM_TMA);
#   CUBLASLT: 0 | 1 (R1MEGA_EXACT_GEMM_CUBLASLT); GEMM: triton | cublaslt (R1MEGA_EXACT_GEMM);
#   WS: 0 | 1 (R1MEGA_EXACT_GEMM_WS: warp-specialised TMA variants among the candidates)
#   e.g. tools/gpu_exact_ab.sh 256x128x256 "default - -" "lt - - - - 1" "ltonly - - - - - cublaslt"
#   ("-": the default); env REPS: timed runs per mode in each process (default 5, the median)
set -u
OUT=${OUT:-/tmp/r1mega-out}
mkdir -p "$OUT"
settings=$1; shift
for arm in "$@"; do
  read -r name gemm dec attn tma lt whole ws <<<"$arm"
  env_args=()
  [ "$gemm" != - ] && env_args+=(R1MEGA_EXACT_GEMM_SMALL_TILES="$gemm")
  [ "$dec" != - ] && env_args+=(R1MEGA_EXACT_DECODE_TILES="$dec")
  [ -n "${attn:-}" ] && [ "$attn" != - ] && env_args+=(R1MEGA_EXACT_ATTENTION="$attn")
  [ -n "${tma:-}" ] && [ "$tma" != - ] && env_args+=(R1MEGA_EXACT_GEMM_TMA="$tma")
  [ -n "${lt:-}" ] && [ "$lt" != - ] && env_args+=(R1MEGA_EXACT_GEMM_CUBLASLT="$lt")
  [ -n "${whole:-}" ] && [ "$whole" != - ] && env_args+=(R1MEGA_EXACT_GEMM="$whole")
  [ -n "${ws:-}" ] && [ "$ws" != - ] && env_args+=(R1MEGA_EXACT_GEMM_WS="$ws")
  env "${env_args[@]}" timeout 240 python3 -m r1mega.cli bench rollout --exact --no-peer \
    --settings "$settings" --reps "${REPS:-5}" >"$OUT/ab_$name.log" 2>&1
  echo "== $name (gemm ${gemm}, decode tiles ${dec}, attention ${attn:--}, gemm tma ${tma:--}, cublaslt ${lt:--}, exact gemm ${whole:-triton}, ws ${ws:--}) rc=$?"
  grep -E "^\[.*(sync|exact)\] rollout|log-prob gap" "$OUT/ab_$name.log" | sed -E 's/.*\[(.*)\] rollout ([0-9,]+) tok\/s.*= ([0-9.]+) ms\/step.*/  \1  \2 tok\/s  decode \3 ms\/step/'
done
