#!/usr/bin/env bash
# Transformer Engine on the GPU machine (issue 17, item 3), which has no TE and no package index.
# TE's core wheel (transformer-engine-cu13 2.20.2, 276 MB) exceeds what one device call carries
# (64 MiB). `prepare` keeps only sm_90's device code in it (tools/fatbin_prune.py: the other seven
# architectures' fatbin payloads zeroed, 32 MB rebuilt), so one call carries it:
#
#   here, once:  tools/gpu_te.sh prepare            # .te/: the sm_90 wheel, the wheels TE imports,
#                                                   # TE's torch extension (see below; 7 min on
#                                                   # 2 cores the first time, most of it the build)
#   device (carry .whl .te/whl .te/torch .te/sm90):
#                tools/gpu_te.sh run [PARTS]         # PARTS: import tests current blockwise parity
#   env TE_BENCH_ARGS: more flags for the throughput benches (e.g. "--master-weights bf16_remainder
#   --moments-dtype bf16": DeepSeek-V3's optimizer state, in both rows)
#
# `run` installs TE with the wheels in .te/whl (TE's metapackage, einops, pydantic, nvdlfw-inspect)
# and .te/torch (transformer-engine-torch 2.20.2 built against torch 2.11+cu130 for sm_90: `prepare`
# builds it here with Python 3.12, since the device machine would spend minutes of its time on it;
# without it `run` builds the source package in .te/src there), then: TE's import,
# tests/gpu/test_te_gpu.py, and `bench fp8 --backend te` at the GEMM-heavy shape (current, then
# blockwise), a table last. r1mega's CUDA extensions are not carried: their JIT builds are off,
# their PyTorch paths serve.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/r1mega-out}
mkdir -p "$OUT"
WHEEL=transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl
cmd=${1:-}
shift || true

case "$cmd" in
prepare)  # on the CPU machine: TE-torch is built against torch 2.11+cu130 (tools/gpu_abi_venv.sh)
  set -e
  src=${TE_SRC:-/tmp/te}
  mkdir -p .te/sm90 .te/whl .te/torch .te/src "$src/dist"
  grep -qx '/.te/' .git/info/exclude || echo '/.te/' >>.git/info/exclude
  [ -f "$src/$WHEEL" ] || python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 -d "$src" transformer-engine-cu13==2.20.2
  python3 "$(dirname "$0")/fatbin_prune.py" "$src/$WHEEL" ".te/sm90/$WHEEL" --arch 90
  # TE's import checks for its metapackage (transformer-engine) beside the core wheel; of the
  # other modules `import transformer_engine.pytorch` loads, the device machine lacks these
  for spec in transformer-engine==2.20.2 einops==0.8.2 nvdlfw-inspect==0.2.2 pydantic==2.14.4 \
      pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .te/whl "$spec"
  done
  sdist=$src/transformer_engine_torch-2.20.2.tar.gz
  if [ ! -f "$sdist" ]; then  # `pip download` of an sdist runs its build backend, which fails here
    url=$(curl -fsS https://pypi.org/simple/transformer-engine-torch/ \
          | grep -o 'https://[^"#]*/transformer_engine_torch-2\.20\.2\.tar\.gz' | head -1)
    curl -fsS -o "$sdist" "$url"
  fi
  cp "$sdist" .te/src/
  if ! ls "$src"/dist/transformer_engine_torch-*.whl >/dev/null 2>&1; then
    . "$(dirname "$0")/gpu_abi_venv.sh"
    "$venv/bin/pip" install -q --no-deps "$src/$WHEEL" .te/whl/transformer_engine-2.20.2-*.whl einops pydantic
    rm -rf "$src/build" && mkdir -p "$src/build" && tar xzf "$sdist" -C "$src/build"
    t0=$(date +%s)
    (cd "$src/build/transformer_engine_torch-2.20.2" &&
      NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_CUDA_ARCHS=90 NVTE_FRAMEWORK=pytorch MAX_JOBS=$(nproc) \
      "$venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$src/dist" . ) >"$src/build.log" 2>&1 \
      || { tail -30 "$src/build.log"; exit 1; }
    echo "TE-torch built in $(( $(date +%s) - t0 )) s (log: $src/build.log)"
  fi
  cp "$src"/dist/transformer_engine_torch-*.whl .te/torch/
  du -sh .te/*
  ;;
run)
  PARTS=${*:-import tests current blockwise}
  t0=$(date +%s)
  # one pip command: TE's wheels share the transformer_engine/ folder (a second --target install
  # would skip what is already there)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      $(ls .whl/*.whl 2>/dev/null) .te/whl/*.whl ".te/sm90/$WHEEL" $(ls .te/torch/*.whl 2>/dev/null) || exit 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  export R1MEGA_GRPO_JIT=0 R1MEGA_MOE_JIT=0 R1MEGA_GEMM_JIT=0
  if ! ls .te/torch/*.whl >/dev/null 2>&1; then
    (cd /tmp && tar xzf "$OLDPWD"/.te/src/transformer_engine_torch-2.20.2.tar.gz && cd transformer_engine_torch-2.20.2 &&
      NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_CUDA_ARCHS=90 NVTE_FRAMEWORK=pytorch MAX_JOBS=16 \
      python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . ) >"$OUT/te_build.log" 2>&1 \
      || { tail -30 "$OUT/te_build.log"; exit 1; }
  fi
  echo "TE installed in $(( $(date +%s) - t0 )) s"
  declare -A R
  for part in $PARTS; do
    case "$part" in
    import)
      python3 -c 'import torch, transformer_engine, transformer_engine.pytorch as te
from r1mega.models.spec import transformer_engine_available
print("TE", transformer_engine.__version__, "torch", torch.__version__, "r1mega sees TE:", transformer_engine_available())' \
        2>&1 | tail -5; R[import]=${PIPESTATUS[0]} ;;
    tests)
      timeout 300 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_te_gpu.py 2>&1 | tail -25
      R[tests]=${PIPESTATUS[0]} ;;
    current|delayed|blockwise)
      timeout 240 python3 -m r1mega.cli bench fp8 --backend te --recipe "$part" --models gemm-heavy \
        --steps 6 --warmup 2 ${TE_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_te_$part.log" | grep -v '^{' | tail -8
      R[$part]=${PIPESTATUS[0]} ;;
    parity)
      timeout 420 python3 -m r1mega.cli bench fp8 --backend te --recipe current --parity 2>&1 \
        | tee "$OUT/bench_te_parity.log" | grep -v '^{' | tail -6
      R[parity]=${PIPESTATUS[0]} ;;
    *) echo "unknown part $part"; R[$part]=2 ;;
    esac
  done
  echo "---- TE trial ($(( $(date +%s) - t0 )) s)"
  printf '%-12s %s\n' part rc
  for part in $PARTS; do printf '%-12s %s\n' "$part" "${R[$part]}"; done
  for f in "$OUT"/bench_te_*.log; do
    [ -f "$f" ] && grep 'step throughput' "$f"
  done
  ;;
*)
  sed -n 2,20p "$0"; exit 2 ;;
esac
