#!/usr/bin/env bash
# The multi-GPU script (issue 20): r1mega on all GPUs of one host (NCCL), one device call per
# machine kind (nvidia-h200-x2/-x4/-x8), ~9 minutes. Parts, in order of value (each with its own
# timeout, all under one deadline; a part that would start past it is skipped and says so):
#   equiv    tests/distributed equivalence (TP2, SP, PP2, DP2, TP2xPP2, interleaved PP, EP2, EP4)
#            on NCCL, one GPU per rank, bf16 tolerances (R1MEGA_TEST_BACKEND=nccl)
#   dp       bench train-scale, 852M, DP = 1, NGPU, then the sizes between (same per-GPU batch):
#            per-GPU tokens/s and efficiency vs the DP=1 run of this call (bar >= 90 %)
#   ep       bench train-scale, qwen3-moe-small, EP = 1, 2, 4, 8 (<= NGPU): all-to-all ms/step
#   rollout  bench rollout-tp, 852M, TP = 1, 2, 4 (<= NGPU): tokens/s, roofline fraction
#   grpo     r1mega train (demo task, ~150M model) on all GPUs, DP x TP2: tokens/s, step split
#   fail     tools/multi_failures.py: a killed rank ends every rank (non-zero, within the
#            timeout); launch/torchrun.sh MAX_RESTARTS=1 resumes from the last checkpoint
#   8b       bench train-scale, Llama-3-8B shape (145 GB of weights + fp32 optimizer state: more
#            than one H200), TP = NGPU, distributed optimizer, sequence parallel: MFU
# Per-run logs go to $GPU_MULTI_LOGDIR, packed into $OUT/logs.tar.gz after every run (the device
# tool returns at most 8 files from $OUT); $OUT also gets summary.log, summary.json, build.log and
# the built extensions (so/). The summary table (tools/multi_summary.py) is printed LAST.
#
#   tools/gpu_multi.sh                 all parts on the GPUs `nvidia-smi -L` lists
#   tools/gpu_multi.sh --dry-run       the same code paths on 2 CPU ranks (gloo, tiny shapes)
#   env: GPU_MULTI_PARTS="equiv dp ..." (default: all, in the order above),
#        GPU_MULTI_DEADLINE_S=530 (whole script), GPU_SKIP_BUILD=1 (csrc/ built already),
#        GPU_MULTI_STEPS=5 (timed steps per train-scale run),
#        GPU_MULTI_LOGDIR=DIR (per-run logs and runs.tsv; default a new /tmp/r1mega-multi.XXXX)
# NVLink multicast stays as the machine set it: this script sets no NCCL_* variable.
set -u
export PYTHONUNBUFFERED=1
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-/tmp/r1mega-out}
LOGS=${GPU_MULTI_LOGDIR:-$(mktemp -d /tmp/r1mega-multi.XXXX)}
mkdir -p "$OUT" "$LOGS"
: >"$LOGS/runs.tsv"
exec > >(tee "$OUT/summary.log") 2>&1   # kept in $OUT too: a call that runs out of time loses its stdout
T_START=$(date +%s)
DEADLINE=${GPU_MULTI_DEADLINE_S:-530}
PARTS=${GPU_MULTI_PARTS:-equiv dp ep rollout grpo fail 8b}
STEPS=${GPU_MULTI_STEPS:-5}

if ls .whl/*.whl >/dev/null 2>&1 && [ $DRY = 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}   # the machine's own path kept
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

if [ $DRY = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
  NGPU=2
  SMOKE=(--smoke)
  unset R1MEGA_TEST_BACKEND
  echo "dry run: 2 CPU ranks, gloo, tiny shapes"
else
  NGPU=$(nvidia-smi -L | grep -c '^GPU')
  SMOKE=()
  export R1MEGA_TEST_BACKEND=nccl
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sort | uniq -c
  nvidia-smi topo -m 2>/dev/null | head -$((NGPU + 1)) >"$LOGS/topo.txt"
  python3 -c 'import torch, megatron.core; print("torch", torch.__version__, "megatron-core", megatron.core.__version__)'
  if [ "${GPU_SKIP_BUILD:-0}" != 1 ]; then
    t0=$(date +%s)
    MAX_JOBS=32 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1
    echo "build_ext rc=$? in $(( $(date +%s) - t0 )) s"; tail -2 "$OUT/build.log"
    mkdir -p "$OUT/so" && cp r1mega_*.so "$OUT/so/" 2>/dev/null
  fi
fi
echo "GPUs (ranks): $NGPU; parts: $PARTS; deadline ${DEADLINE} s"

pack() { tar czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null; }   # a cut-off call keeps what ran

left() { echo $(( DEADLINE - ($(date +%s) - T_START) )); }

# run PART LABEL BUDGET_S CMD...: one run, its log in $LOGS, a row in runs.tsv. The budget is cut
# to the time left; SIGINT first (pytest/torchrun then still report), SIGKILL 15 s later.
run() {
  local part=$1 label=$2 budget=$3; shift 3
  local rest; rest=$(left)
  local log="${part}_${label}.log"
  if [ "$rest" -lt 30 ]; then
    printf '%s\t%s\tskipped\t0\t%s\n' "$part" "$label" "$log" >>"$LOGS/runs.tsv"
    echo "== $part $label: skipped (${rest} s left)"
    return 1
  fi
  [ "$budget" -gt $((rest - 15)) ] && budget=$((rest - 15))
  echo "== $part $label (budget ${budget} s): $*"
  local t0; t0=$(date +%s)
  timeout -s INT -k 15 "$budget" "$@" >"$LOGS/$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  printf '%s\t%s\t%s\t%s\t%s\n' "$part" "$label" "$rc" "$dt" "$log" >>"$LOGS/runs.tsv"
  echo "   rc=$rc in ${dt} s: $(grep -E '^\{' "$LOGS/$log" | tail -1 | cut -c1-300)"
  pack
  return $rc
}

# a standalone torchrun on a free port (an array, not a function: `timeout` runs programs)
TORCHRUN=(python3 -m torch.distributed.run --standalone --nproc-per-node)

json_field() {  # json_field LOG KEY: KEY of the log's last JSON line ("" if none)
  python3 - "$LOGS/$1" "$2" <<'EOF'
import json, sys
lines = [l for l in open(sys.argv[1], errors="replace").read().splitlines() if l.startswith("{")]
try:
    v = json.loads(lines[-1]).get(sys.argv[2]) if lines else None
except ValueError:
    v = None
print("" if v is None else v)
EOF
}

sizes() {  # sizes MAX A B C...: those of A B C... that are <= MAX
  local max=$1; shift
  for s in "$@"; do [ "$s" -le "$max" ] && echo "$s"; done
}

for part in $PARTS; do
  case $part in
  equiv)
    if [ $DRY = 1 ]; then  # the cheapest layouts: the same harness, gloo
      run equiv tests 240 python3 -m pytest -q -x -p no:cacheprovider -rfE --tb=short \
        tests/distributed/test_parallel_equivalence.py -k "reference or tp2 and not pp and not sequence"
    else
      run equiv tests 200 python3 -m pytest -v -p no:cacheprovider -rfE --tb=short \
        tests/distributed/test_parallel_equivalence.py tests/distributed/test_moe_expert_parallel.py
    fi
    ;;
  dp)
    ref=""
    order=(1 "$NGPU" $(sizes $((NGPU - 1)) 2 4))  # DP=1 and the largest first: the bar's two ends
    for dp in "${order[@]}"; do
      [ "$dp" = 1 ] || [ -n "$ref" ] || break   # no efficiency without the DP=1 reference
      run dp "dp$dp" 100 "${TORCHRUN[@]}" "$dp" -m r1mega.cli bench train-scale --model 852m --steps "$STEPS" \
        --warmup 2 --label "dp$dp" ${ref:+--ref-tokens-per-gpu $ref} "${SMOKE[@]}"
      [ "$dp" = 1 ] && ref=$(json_field "dp_dp1.log" tokens_per_s_per_gpu)
    done
    ;;
  ep)
    ref=""
    for ep in $(sizes "$NGPU" 1 2 4 8); do
      run ep "ep$ep" 100 "${TORCHRUN[@]}" "$ep" -m r1mega.cli bench train-scale --model qwen3-moe-small \
        --seqs 4 --expert "$ep" --steps "$STEPS" --warmup 2 --label "ep$ep" \
        ${ref:+--ref-tokens-per-gpu $ref} "${SMOKE[@]}"
      [ "$ep" = 1 ] && ref=$(json_field "ep_ep1.log" tokens_per_s_per_gpu)
    done
    ;;
  rollout)
    for tp in $(sizes "$NGPU" 1 2 4); do
      run rollout "tp$tp" 120 "${TORCHRUN[@]}" "$tp" -m r1mega.cli bench rollout-tp --model 852m \
        --label "tp$tp" "${SMOKE[@]}" ||
      # CUDA graphs with NCCL collectives inside are new on several GPUs: a figure either way
      run rollout "tp$tp-eager" 120 "${TORCHRUN[@]}" "$tp" -m r1mega.cli bench rollout-tp --model 852m \
        --label "tp$tp-eager" --no-graphs "${SMOKE[@]}"
    done
    ;;
  grpo)
    rd=$(mktemp -d /tmp/r1mega_grpo_multi.XXXX)
    if [ $DRY = 1 ]; then
      size=(model.num_layers=2 model.hidden_size=32 model.ffn_hidden_size=64 model.num_attention_heads=2
            model.num_query_groups=2 data.global_batch_prompts=4 rollout.group_size=2
            rollout.max_new_tokens=8 train.steps=3 parallel.tensor=2)
    else  # ~150M parameters on the char vocabulary of the demo task; DP = NGPU / 2
      size=(model.num_layers=12 model.hidden_size=1024 model.ffn_hidden_size=2816
            model.num_attention_heads=16 model.num_query_groups=4 model.max_position_embeddings=256
            data.global_batch_prompts=$((16 * NGPU)) rollout.group_size=8 rollout.max_new_tokens=64
            data.micro_batch_tokens=8192 train.steps=10 parallel.tensor=2)
    fi
    run grpo "dp$((NGPU / 2))xtp2" 150 "${TORCHRUN[@]}" "$NGPU" -m r1mega.cli train configs/demo.yaml \
      train.sft_steps=0 data.eval_source=null logging.samples_every_steps=0 \
      "logging.run_dir=$rd" "${size[@]}"
    python3 tools/grpo_run_summary.py "$rd/metrics.jsonl" --warmup 2 >>"$LOGS/grpo_dp$((NGPU / 2))xtp2.log" 2>&1
    rm -rf "$rd"
    ;;
  fail)
    run fail "drills" 260 python3 tools/multi_failures.py --nproc "$NGPU" --out "$LOGS" \
      --timeout-s 60 $( [ $DRY = 1 ] && echo --cpu --timeout-s 30 )
    ;;
  8b)
    lay=(--tensor "$NGPU"); name=tp$NGPU   # 8 KV heads: TP up to 8
    seqs=$([ "$NGPU" -le 2 ] && echo 4 || echo 8)  # TP2: 72 GB of weights/optimizer per GPU
    run 8b "$name" 180 "${TORCHRUN[@]}" "$NGPU" -m r1mega.cli bench train-scale --model llama3-8b \
      "${lay[@]}" --sequence-parallel --seqs "$seqs" --steps 3 --warmup 2 --label "$name" "${SMOKE[@]}"
    ;;
  *) echo "unknown part '$part' (GPU_MULTI_PARTS): use equiv dp ep rollout grpo fail 8b"; exit 2 ;;
  esac
done

echo
echo "================ summary ($(( $(date +%s) - T_START )) s, $NGPU ranks$( [ $DRY = 1 ] && echo ', DRY RUN on CPU'))"
python3 tools/multi_summary.py "$LOGS"
cp "$LOGS/summary.json" "$OUT/" 2>/dev/null
pack
