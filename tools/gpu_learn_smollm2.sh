#!/usr/bin/env bash
# Issue 14's learning run on one GPU, in two device calls (the GGUF is 94 MB and a call carries
# at most 64 MiB, so it travels in parts under .gguf/, see below):
#
#   tools/gpu_learn_smollm2.sh stage1   carry .whl and .gguf/smollm2.gguf.part00: wheels into
#                                       /tmp/site, part00 into /tmp/gguf, csrc/ built in place
#   tools/gpu_learn_smollm2.sh stage2 [key=value ...]
#                                       carry .whl, .gguf/smollm2.gguf.part01 and part02: join and
#                                       check the GGUF, HF dir, TRL's GRPOTrainer (the peer, same
#                                       call), then r1mega GRPO under the time left (eval every
#                                       EVAL_EVERY steps, strict grader), then tools/eval_report.py
#
# Parts: split -b 47000000 -d SmolLM2-135M-Instruct.Q4_1.gguf .gguf/smollm2.gguf.part
# env: CALL_LIMIT_S (the device call's limit, default 600), TRL_STEPS (20), TRL_BUDGET_S (100),
#      STEPS (1000: the time budget ends the run), EVAL_EVERY (50)
set -uo pipefail
t0=$(date +%s)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/r1mega-out}
mkdir -p "$OUT" /tmp/gguf
stage=${1:?stage1 or stage2}; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
elapsed() { echo $(( $(date +%s) - t0 )); }

if [ "$stage" = stage1 ]; then
  cp -f .gguf/smollm2.gguf.part00 /tmp/gguf/ && echo "part00 kept in /tmp/gguf"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  MAX_JOBS=16 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  echo "build_ext rc=$? at $(elapsed) s"; tail -2 "$OUT/build.log"
  exit 0
fi

GGUF=/tmp/gguf/smollm2.gguf
cat /tmp/gguf/smollm2.gguf.part00 .gguf/smollm2.gguf.part01 .gguf/smollm2.gguf.part02 >"$GGUF"
sha256sum "$GGUF" | grep -q '^b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53' \
  || { echo "GGUF sha256 mismatch: part00 lost (a fresh machine?); run stage1 again"; exit 3; }
RUN_DIR=/tmp/r1mega-smollm2
HF_DIR=$RUN_DIR/hf
mkdir -p "$RUN_DIR"
python3 -c "
import sys, time; t = time.perf_counter()
from r1mega.convert.gguf import gguf_to_hf_dir
gguf_to_hf_dir('$GGUF', '$HF_DIR'); print(f'HF dir in {time.perf_counter() - t:.0f} s')"
echo "== TRL GRPOTrainer at $(elapsed) s"
timeout -k 10 $(( ${TRL_BUDGET_S:-100} + 60 )) python3 tools/trl_grpo_baseline.py "$HF_DIR" \
  --steps "${TRL_STEPS:-20}" --budget-s "${TRL_BUDGET_S:-100}" >"$OUT/trl.log" 2>&1
echo "trl rc=$? at $(elapsed) s"; tail -2 "$OUT/trl.log"
trl_tps=$(tail -1 "$OUT/trl.log" | python3 -c 'import json,sys
try: print(round(json.loads(sys.stdin.read())["completion_tokens_per_s"]))
except Exception: print(0)')
[ "$trl_tps" -gt 0 ] || trl_tps=1250
left=$(( ${CALL_LIMIT_S:-600} - $(elapsed) - 25 ))
echo "== r1mega GRPO at $(elapsed) s: ${left} s left; TRL ${trl_tps} tokens/s"
OUT=$OUT RUN_DIR=$RUN_DIR BUDGET_S=$left TRL_TOKENS_PER_S=$trl_tps \
  bash tools/gpu_smollm2.sh "$GGUF" "${STEPS:-1000}" train.eval_every_steps="${EVAL_EVERY:-50}" "$@" \
  >"$OUT/run.log" 2>&1
echo "run rc=$? at $(elapsed) s"
grep -E "held-out|RL changed|WARNING|Error|error" "$OUT/train.log" | tail -12
python3 tools/eval_report.py "$RUN_DIR" | tee "$OUT/eval_report.txt"
tail -30 "$OUT/summary.txt"
