#!/usr/bin/env bash
# Issue 21's report: GRPO on SmolLM2-135M-Instruct in the default mode and with rollout.exact=true,
# one after the other in one device call, same config, seed and steps (configs/smollm2_grpo_gpu.yaml
# through tools/gpu_smollm2.sh), then the two side by side: reward per step, held-out accuracy,
# the importance weights exp(recomputed - rollout log-prob) and the step time. Mode "fp8" (issue
# 17's item 4, MODES="default fp8"): the rollout decodes from FP8 weight copies
# (precision.fp8_rollout=true, precision.fp8_recipe=$FP8_RECIPE, default rowwise), training stays
# bf16, and grpo.tis_cap's truncated importance weights ($TIS_CAP, default 2) correct for the
# mismatch.
#
# The GGUF (94 MB) travels in parts (a call carries at most 64 MiB): an earlier call on the same
# warm machine leaves part00 in /tmp/gguf (`mkdir -p /tmp/gguf; cp .gguf/smollm2.gguf.part00
# /tmp/gguf/`), this one carries .gguf/smollm2.gguf.part01 and part02 (and .whl, the built .so).
#
#   tools/gpu_exact_smollm2.sh   env: STEPS (300), EACH_S (budget per mode, 260), MODES ("default
#     exact"), DEFAULT_OVERRIDES (extra key=value words for the default mode, e.g. the exact
#     mode's "model.compile_layers=false rollout.compile_decode=false" for a like-for-like run:
#     the compiled decode's capture alone took 121 s of a 265 s budget on a cold machine)
# Files in $OUT (7 for two modes): {MODE}-summary.json, -metrics.jsonl and -eval-last.jsonl (the last
# held-out evaluation's completions), compare.txt.
set -uo pipefail
t0=$(date +%s)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/r1mega-out}
STEPS=${STEPS:-300}
EACH_S=${EACH_S:-260}
mkdir -p "$OUT" /tmp/gguf
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
GGUF=/tmp/gguf/smollm2.gguf
cat /tmp/gguf/smollm2.gguf.part00 .gguf/smollm2.gguf.part01 .gguf/smollm2.gguf.part02 >"$GGUF"
sha256sum "$GGUF" | grep -q '^b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53' \
  || { echo "GGUF sha256 mismatch: part00 missing from /tmp/gguf (a fresh machine?)"; exit 3; }

for mode in ${MODES:-default exact}; do
  read -r -a extra <<<"${DEFAULT_OVERRIDES:-}"
  # what validation requires of the exact mode (inductor would lower its matmuls to other kernels)
  [ "$mode" = exact ] && extra=(rollout.exact=true model.compile_layers=false rollout.compile_decode=false)
  [ "$mode" = fp8 ] && extra+=(precision.fp8_rollout=true "precision.fp8_recipe=${FP8_RECIPE:-rowwise}"
                               "grpo.tis_cap=${TIS_CAP:-2.0}")
  run=/tmp/r1mega-smollm2-$mode
  mkdir -p "$run"
  [ "$mode" != default ] && [ -d /tmp/r1mega-smollm2-default/hf ] && cp -r /tmp/r1mega-smollm2-default/hf "$run/"
  echo "== $mode at $(( $(date +%s) - t0 )) s"
  OUT=/tmp/smol-out-$mode RUN_DIR=$run BUDGET_S=$EACH_S bash tools/gpu_smollm2.sh "$GGUF" "$STEPS" \
    train.eval_every_steps=100 "${extra[@]}" >"/tmp/smol-$mode.log" 2>&1
  echo "$mode rc=$? at $(( $(date +%s) - t0 )) s"
  grep -E "Error|error:|Traceback" "/tmp/smol-$mode.log" | head -5
  sed -n '/================ GRPO/,$p' "/tmp/smol-$mode.log" | grep -v '^{' | cut -c1-300
  cp -f /tmp/smol-out-$mode/summary.json "$OUT/$mode-summary.json" 2>/dev/null
  cp -f "$run/metrics.jsonl" "$OUT/$mode-metrics.jsonl" 2>/dev/null
  # the last held-out evaluation's completions, to read the top-rewarded ones
  last_eval=$(ls "$run"/eval/step_*.jsonl 2>/dev/null | tail -1)
  [ -n "$last_eval" ] && cp -f "$last_eval" "$OUT/$mode-eval-last.jsonl"
done

python3 - "$OUT" ${MODES:-default exact} <<'PY' | tee "$OUT/compare.txt"
import json, sys
out, modes = sys.argv[1], sys.argv[2:]
s = {}
for m in modes:
    try:
        s[m] = json.loads(open(f"{out}/{m}-summary.json").read())
    except (OSError, ValueError):
        s[m] = {}
keys = [("steps_done", "{:.0f}"), ("eval_accuracy_before", "{:.3f}"), ("eval_accuracy_after", "{:.3f}"),
        ("train_reward_first_step", "{:.3f}"), ("train_reward_last5", "{:.3f}"), ("step_s", "{:.3f}"),
        ("rollout_tokens_per_s", "{:.0f}"), ("logprob_max_abs_diff_max", "{:.3e}"),
        ("logprob_mean_abs_diff", "{:.3e}"), ("is_weight_mean", "{:.6f}"), ("is_weight_min", "{:.4f}"),
        ("is_weight_max", "{:.4f}")]
print(f"{'SmolLM2 GRPO':<28}" + "".join(f"{m:>14}" for m in modes))
for k, f in keys:
    row = [s[m].get(k) for m in modes]
    print(f"{k:<28}" + "".join(f"{(f.format(v) if isinstance(v, (int, float)) else 'n/a'):>14}" for v in row))
for m in modes:
    c = s[m].get("reward_curve") or []
    means = [sum(c[i:i + 25]) / len(c[i:i + 25]) for i in range(0, len(c), 25)]
    print(f"{m} reward, mean per 25 steps: " + " ".join(f"{x:.2f}" for x in means))
print(json.dumps({m: {k: s[m].get(k) for k, _ in keys} for m in s}))
PY
