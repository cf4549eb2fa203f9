#!/usr/bin/env bash
# The FP8 rollout's next device call, most important first (what lands under $OUT comes back even
# when the call is cut off): the written-but-unrun kernels' GPU tests, then the rollout with each
# of them beside the default in one process, then the kernel-level benches.
#   carry: .whl .prebuilt (the extensions built here by tools/gpu_prebuild.sh or the attention one
#   alone); STAGES="tests rollout attn wgmma train quant deepgemm ..." picks stages; ROLLOUT_VARIANTS overrides the variants.
set -uo pipefail
cp .prebuilt/*.so . 2>/dev/null
export GPU_SKIP_BUILD=1 R1MEGA_GRPO_JIT=0 R1MEGA_MOE_JIT=0 R1MEGA_GEMM_JIT=0 R1MEGA_FP8_JIT=0 \
  R1MEGA_ATTN_JIT=0 R1MEGA_WGMMA_JIT=0
O=${OUT:?}
# DeepGEMM's kernel cache: carried in .dgcache (an earlier call's $OUT/dgcache.tgz unpacked), sent back
export DG_JIT_CACHE_DIR=${DG_JIT_CACHE_DIR:-$PWD/.dgcache}
mkdir -p "$DG_JIT_CACHE_DIR"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
git log --oneline -1 2>/dev/null
R=tests/gpu/test_paged_rows_gpu.py
P=tests/gpu/test_paged_rope_gpu.py
F=tests/gpu/test_fp8_gpu.py
for stage in ${STAGES:-tests rollout attn wgmma}; do
  case $stage in
    tests)  # the cluster rows epilogue and RoPE in the kernel (bits, refusals, graph replay), the decode kernels
      OUT=$O/tests GPU_SKIP_BENCH=1 GPU_TESTS_TIMEOUT=${TESTS_S:-150} \
        GPU_TESTS="$R::test_cluster_epilogue_rows_equal_the_row_kernel_on_the_kernels_output $R::test_cluster_epilogue_refuses_what_it_cannot_take $R::test_cluster_epilogue_replays_in_a_cuda_graph_and_the_op_falls_back $P --deselect $P::test_rollout_decodes_the_same_with_rope_in_the_kernel tests/gpu/test_paged_decode_cuda_gpu.py" \
        bash tools/gpu_all.sh | tail -4 ;;
    rollout)
      v=""; for x in ${ROLLOUT_VARIANTS:-rows-cluster rope rope-rows-cluster}; do v="$v --variant $x"; done
      OUT=$O/rollout GPU_SKIP_TESTS=1 GPU_BENCH_TIMEOUT=${ROLLOUT_S:-330} \
        bash tools/gpu_all.sh "fp8 --rollout --recipe tensorwise --skip-weights-only$v" | tail -8 ;;
    rollout-blockwise)  # the blockwise recipe's rollout: its decode GEMMs on DeepGEMM (the default) and on cuBLAS
      OUT=$O/rollout_blockwise GPU_SKIP_TESTS=1 GPU_BENCH_TIMEOUT=${ROLLOUT_S:-330} \
        bash tools/gpu_all.sh "fp8 --rollout --recipe blockwise --skip-weights-only --variant blockwise-cublas" | tail -8 ;;
    rollout-tests)  # the rollouts with the switches on against off, eager and compiled
      OUT=$O/rollout_tests GPU_SKIP_BENCH=1 GPU_TESTS_TIMEOUT=${TESTS_S:-240} \
        GPU_TESTS="$R::test_rollout_decodes_the_same_with_the_cluster_epilogue $P::test_rollout_decodes_the_same_with_rope_in_the_kernel" \
        bash tools/gpu_all.sh | tail -4 ;;
    attn)
      OUT=$O/attn GPU_SKIP_TESTS=1 GPU_BENCH_TIMEOUT=60 bash tools/gpu_all.sh "decode-attention" | tail -4 ;;
    wgmma)
      OUT=$O/wgmma GPU_TESTS_TIMEOUT=60 GPU_BENCH_TIMEOUT=45 \
        GPU_TESTS="tests/gpu/test_fp8_wgmma_gpu.py --deselect tests/gpu/test_fp8_wgmma_gpu.py::test_rollout_decodes_through_it" \
        bash tools/gpu_all.sh "tools/skinny_gemm_sweep.py --budget-s 30" | tail -4 ;;
    train)  # both training bars, lean optimizer state as the H200 rows; TRAIN_PROFILE=1 adds kernel
            # tables; TRAIN_ARGS adds flags ("--train-env R1MEGA_FP8_WEIGHT_AMAX=1 --fp8-again")
      for recipe in ${TRAIN_RECIPES:-tensorwise blockwise}; do
        OUT=$O/train_$recipe GPU_SKIP_TESTS=1 GPU_BENCH_TIMEOUT=${TRAIN_S:-200} \
          bash tools/gpu_all.sh "fp8 --models gemm-heavy --recipe $recipe --compile layer --master-weights bf16_remainder --moments-dtype bf16${TRAIN_PROFILE:+ --profile} ${TRAIN_ARGS:-}" | tail -4
      done ;;
    fp8-tests)  # the quantisers (into given tensors too), the weight caches, the FP8 linear and rollout graphs
      OUT=$O/fp8_tests GPU_SKIP_BENCH=1 GPU_TESTS_TIMEOUT=${TESTS_S:-240} \
        GPU_TESTS="tests/gpu/test_fp8_quant_cuda_gpu.py $F::test_dual_quantizer_equals_reference_of_x_and_xt_bitwise $F::test_fp8_linear_dual_path_equals_separate_passes_on_gpu $F::test_fp8_linear_vs_bf16_forward_backward $F::test_native_fp8_model_trains_on_gpu $F::test_fp8_rollout_compiled_graphs_decode_like_eager" \
        bash tools/gpu_all.sh | tail -4 ;;
    rows-tests)  # the row quantiser (one and several rows a program) and the attention rows epilogues
      OUT=$O/rows_tests GPU_SKIP_BENCH=1 GPU_TESTS_TIMEOUT=${TESTS_S:-200} \
        GPU_TESTS="tests/gpu/test_fp8_rows_gpu.py tests/gpu/test_paged_rows_gpu.py" bash tools/gpu_all.sh | tail -4 ;;
    amax-tests)  # the optimizer's weight amax (kernel, skipped step, NaN) and the FP8 caches taking it
      OUT=$O/amax_tests GPU_SKIP_BENCH=1 GPU_TESTS_TIMEOUT=${TESTS_S:-150} \
        GPU_TESTS="tests/gpu/test_lean_adam_gpu.py" bash tools/gpu_all.sh | tail -4 ;;
    lt)  # cuBLASLt's blockwise algorithms: their tests, then every listed one timed against scaled_mm
      OUT=$O/lt GPU_TESTS_TIMEOUT=${TESTS_S:-120} GPU_BENCH_TIMEOUT=${LT_S:-150} \
        GPU_TESTS="tests/gpu/test_fp8_gemm_lt_gpu.py" bash tools/gpu_all.sh "tools/blockwise_lt_sweep.py" | tail -4 ;;
    deepgemm)  # DeepGEMM's blockwise GEMMs (its wheel in .whl): tests, then each GEMM of a layer against cuBLAS's
      OUT=$O/deepgemm GPU_TESTS_TIMEOUT=${TESTS_S:-150} GPU_BENCH_TIMEOUT=${DG_S:-300} \
        GPU_TESTS="tests/gpu/test_fp8_blockwise_deepgemm_gpu.py" \
        bash tools/gpu_all.sh "tools/blockwise_deepgemm_sweep.py --jit-jobs 12" | tail -8
      tar czf "$O/dgcache.tgz" -C "$DG_JIT_CACHE_DIR" . ;;
    deepgemm-tests)
      OUT=$O/deepgemm_tests GPU_SKIP_BENCH=1 GPU_TESTS_TIMEOUT=${TESTS_S:-150} \
        GPU_TESTS="tests/gpu/test_fp8_blockwise_deepgemm_gpu.py" bash tools/gpu_all.sh | tail -4 ;;
    probe)  # which form of the in-graph amax inductor fuses into the SwiGLU and its backward
      OUT=$O/probe GPU_SKIP_TESTS=1 GPU_BENCH_TIMEOUT=${PROBE_S:-150} bash tools/gpu_all.sh "tools/amax_fusion_probe.py" | tail -4 ;;
    quant-tests)  # the dual quantisers (CUDA's a CTA a block and persistent, Triton's persistent) against the reference
      OUT=$O/quant_tests GPU_SKIP_BENCH=1 GPU_TESTS_TIMEOUT=${TESTS_S:-150} \
        GPU_TESTS="tests/gpu/test_fp8_quant_cuda_gpu.py" bash tools/gpu_all.sh | tail -4 ;;
    quant)  # the dual quantisers (Triton and CUDA) against their bytes floor
      OUT=$O/quant GPU_SKIP_TESTS=1 GPU_BENCH_TIMEOUT=90 bash tools/gpu_all.sh "tools/fp8_quant_sweep.py" | tail -4 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
