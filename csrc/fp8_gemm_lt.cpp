// cuBLASLt's FP8 GEMM with a chosen algorithm: the FP8 rollout's decode-sized GEMMs
// (r1mega/precision/fp8_gemm_lt.py picks one per problem by timing them), and the blockwise
// recipe's GEMMs for tools/blockwise_lt_sweep.py, which times every algorithm listed for them.
//
// y (M, N) = (a8 (M, K) * scale_a) @ (w8 (N, K) * scale_w)^T in bf16 or fp16: e4m3 operands,
// row-major; one float32 scale each (device scalars, fast accumulation as torch._scaled_mm's
// use_fast_accum) or the blockwise modes below. torch._scaled_mm asks cuBLASLt's heuristic for one
// algorithm; at a decode step's M (16-512 rows) the heuristic's first is not always the fastest
// (splitting K, other tiles), and the caller times the ones listed here.
#include "gemm_lt_common.h"

using namespace r1mega_lt;

namespace {

cudaDataType_t out_type(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kHalf: return CUDA_R_16F;
    default: TORCH_CHECK(false, "cuBLASLt FP8 GEMM: a bf16 or fp16 output, got ", t);
  }
}

// The FP8 problem: the shared descriptors plus fast accumulation and the two scale pointers
// (cuBLASLt's A is w, its B is a: column-major D = w^T-op @ a).
// Blockwise (DeepSeek-V3) scaling, the modes torch.nn.functional.scaled_mm sets: a's 1x128 tiles
// (float32, (M, K/128) with strides (1, M)); w's 1x128 tiles likewise or its 128x128 blocks (the
// (L4, N/128) buffer of gemm._block_scale_b). No fast accumulation: partial sums are promoted
// with the scales every 128 of K.
enum ScaleMode : int64_t { kTensorScales = 0, kTilesTiles = 1, kTilesBlocks = 2 };

struct Fp8Problem : Problem {
  Fp8Problem(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldw, at::ScalarType out,
             const void* scale_a, const void* scale_w, int64_t mode = kTensorScales)
      : Problem(m, n, k, lda, ldw, n, CUDA_R_8F_E4M3, out_type(out)) {
    TORCH_CHECK(mode >= kTensorScales && mode <= kTilesBlocks, "cuBLASLt FP8 GEMM: scale mode 0, 1 or 2, got ", mode);
    int8_t fast = mode == kTensorScales ? 1 : 0;
    LT_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof(fast)));
    if (mode != kTensorScales) {
      int32_t a_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;  // cuBLASLt's B is a
      int32_t w_mode = mode == kTilesTiles ? CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F
                                           : CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
      LT_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &w_mode, sizeof(w_mode)));
      LT_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &a_mode, sizeof(a_mode)));
    }
    LT_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &scale_w, sizeof(scale_w)));
    LT_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &scale_a, sizeof(scale_a)));
  }
};

void check_problem(int64_t m, int64_t n, int64_t k) {
  TORCH_CHECK(m > 0 && n > 0 && k > 0 && k % 16 == 0 && n % 16 == 0,
              "cuBLASLt FP8 GEMM: M, N, K > 0 with K and N multiples of 16, got ", m, "x", n, "x", k);
}

// K-split variants of an unsplit algorithm whose kernel supports them: at a decode step's M a
// GEMM has few output tiles (256 x 3072 is 48 tiles of 128 x 128 on 132 SMs), and splitting K
// puts more SMs on the weight's bytes. cuBLASLt's heuristic seldom lists them itself. Only those
// AlgoCheck accepts within the workspace limit; split parts of at least 256 of K.
std::vector<cublasLtMatmulAlgo_t> k_splits(cublasLtHandle_t handle, const Problem& p, const cublasLtMatmulAlgo_t& algo,
                                           int64_t k, size_t max_workspace) {
  std::vector<cublasLtMatmulAlgo_t> out;
  int32_t supported = 0;
  uint32_t schemes = 0;
  size_t written = 0;
  if (cublasLtMatmulAlgoCapGetAttribute(&algo, CUBLASLT_ALGO_CAP_SPLITK_SUPPORT, &supported, sizeof(supported),
                                        &written) != CUBLAS_STATUS_SUCCESS ||
      !supported || config<int32_t>(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM) > 1)
    return out;
  if (cublasLtMatmulAlgoCapGetAttribute(&algo, CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK, &schemes, sizeof(schemes),
                                        &written) != CUBLAS_STATUS_SUCCESS)
    return out;
  // float32 partial sums first (the output type would round each part to bf16)
  uint32_t scheme = CUBLASLT_REDUCTION_SCHEME_NONE;
  for (uint32_t s : {CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE, CUBLASLT_REDUCTION_SCHEME_INPLACE})
    if (schemes & s) {
      scheme = s;
      break;
    }
  if (scheme == CUBLASLT_REDUCTION_SCHEME_NONE) return out;
  for (int32_t split : {2, 3, 4, 6, 8}) {
    if (k / split < 256) break;
    cublasLtMatmulAlgo_t a = algo;
    if (cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &split, sizeof(split)) !=
            CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme, sizeof(scheme)) !=
            CUBLAS_STATUS_SUCCESS)
      continue;
    cublasLtMatmulHeuristicResult_t check{};
    if (cublasLtMatmulAlgoCheck(handle, p.op, p.wl, p.al, p.yl, p.yl, &a, &check) == CUBLAS_STATUS_SUCCESS &&
        check.workspaceSize <= max_workspace)
      out.push_back(a);
  }
  return out;
}

}  // namespace

// Up to max_algos algorithms of cuBLASLt's heuristic for (m, n, k), best first, each followed by
// its K-split variants, each as its bytes, with workspace up to max_workspace bytes.
std::vector<torch::Tensor> fp8_algos(int64_t m, int64_t n, int64_t k, at::ScalarType out_dtype,
                                     int64_t max_algos, int64_t max_workspace, int64_t mode) {
  check_problem(m, n, k);
  TORCH_CHECK(max_algos > 0 && max_workspace >= 0, "cuBLASLt FP8 GEMM: max_algos > 0, max_workspace >= 0");
  auto handle = handle_for(c10::cuda::current_device());
  // the scale pointers only need to be set for the heuristic to see the scaling mode
  static const float dummy = 1.0f;
  Fp8Problem p(m, n, k, k, k, out_dtype, &dummy, &dummy, mode);
  auto pref = preference(static_cast<size_t>(max_workspace));
  std::vector<cublasLtMatmulHeuristicResult_t> found(static_cast<size_t>(max_algos));
  int count = 0;
  LT_CHECK(cublasLtMatmulAlgoGetHeuristic(handle, p.op, p.wl, p.al, p.yl, p.yl, pref.get(),
                                          static_cast<int>(found.size()), found.data(), &count));
  std::vector<torch::Tensor> out;
  for (int i = 0; i < count; ++i) {
    if (found[i].state != CUBLAS_STATUS_SUCCESS) continue;
    out.push_back(pack(found[i].algo));
    if (mode != kTensorScales) continue;  // K splits: for the decode-sized tensorwise calls only
    for (const auto& split : k_splits(handle, p, found[i].algo, k, static_cast<size_t>(max_workspace)))
      out.push_back(pack(split));
  }
  return out;
}

// y = (a8 scale_a) @ (w8 scale_w)^T through the given algorithm, its workspace from torch's
// allocator (so that the call can be captured in a CUDA graph); refused (an error, never another
// algorithm) where cuBLASLt says the algorithm cannot run this problem.
torch::Tensor fp8_matmul(const torch::Tensor& a, const torch::Tensor& scale_a, const torch::Tensor& w,
                         const torch::Tensor& scale_w, at::ScalarType out_dtype, const torch::Tensor& blob,
                         int64_t mode) {
  TORCH_CHECK(a.is_cuda() && w.is_cuda() && a.device() == w.device(), "cuBLASLt FP8 GEMM: CUDA operands on one device");
  TORCH_CHECK(a.scalar_type() == at::ScalarType::Float8_e4m3fn && w.scalar_type() == at::ScalarType::Float8_e4m3fn,
              "cuBLASLt FP8 GEMM: float8_e4m3fn operands, got ", a.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(a.dim() == 2 && w.dim() == 2 && a.size(1) == w.size(1), "cuBLASLt FP8 GEMM: a (M, K), w (N, K), got ",
              a.sizes(), " and ", w.sizes());
  TORCH_CHECK(a.stride(1) == 1 && w.stride(1) == 1, "cuBLASLt FP8 GEMM: row-major a and w");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(a.data_ptr()) % kAlign == 0 &&
                  reinterpret_cast<uintptr_t>(w.data_ptr()) % kAlign == 0 && a.stride(0) % kAlign == 0 &&
                  w.stride(0) % kAlign == 0,
              "cuBLASLt FP8 GEMM: operands and rows aligned to ", kAlign, " bytes");
  const int64_t m = a.size(0), n = w.size(0), k = a.size(1);
  check_problem(m, n, k);
  for (const auto* s : {&scale_a, &scale_w})
    TORCH_CHECK(s->device() == a.device() && s->scalar_type() == at::kFloat,
                "cuBLASLt FP8 GEMM: float32 scales on the operands' device, got ", s->scalar_type(), " on ",
                s->device());
  if (mode == kTensorScales) {
    TORCH_CHECK(scale_a.numel() == 1 && scale_w.numel() == 1, "cuBLASLt FP8 GEMM: one scale an operand, got ",
                scale_a.sizes(), " and ", scale_w.sizes());
  } else {
    // the layouts scaled_mm checks: (rows, K/128) with strides (1, rows); blocks (L4, N/128), strides (1, L4)
    const int64_t kb = (k + 127) / 128, nb = (n + 127) / 128, l4 = (kb + 3) / 4 * 4;
    auto tiles_ok = [&](const torch::Tensor& t, int64_t rows) {
      return t.dim() == 2 && t.size(0) == rows && t.size(1) == kb && t.stride(0) == 1 && (kb == 1 || t.stride(1) == rows);
    };
    TORCH_CHECK(tiles_ok(scale_a, m), "cuBLASLt FP8 GEMM: a's 1x128 scales (", m, ", ", kb, ") with strides (1, ", m,
                "), got ", scale_a.sizes(), " strides ", scale_a.strides());
    if (mode == kTilesTiles) {
      TORCH_CHECK(tiles_ok(scale_w, n), "cuBLASLt FP8 GEMM: w's 1x128 scales (", n, ", ", kb, ") with strides (1, ",
                  n, "), got ", scale_w.sizes(), " strides ", scale_w.strides());
    } else {
      TORCH_CHECK(scale_w.dim() == 2 && scale_w.size(0) == l4 && scale_w.size(1) == nb && scale_w.stride(0) == 1 &&
                      (nb == 1 || scale_w.stride(1) == l4),
                  "cuBLASLt FP8 GEMM: w's 128x128 scales (", l4, ", ", nb, ") with strides (1, ", l4, "), got ",
                  scale_w.sizes(), " strides ", scale_w.strides());
    }
  }
  auto algo = unpack(blob);
  c10::cuda::CUDAGuard device_guard(a.device());
  auto y = torch::empty({m, n}, a.options().dtype(out_dtype));
  auto handle = handle_for(a.device().index());
  Fp8Problem p(m, n, k, a.stride(0), w.stride(0), out_dtype, scale_a.data_ptr(), scale_w.data_ptr(), mode);
  cublasLtMatmulHeuristicResult_t check{};
  LT_CHECK(cublasLtMatmulAlgoCheck(handle, p.op, p.wl, p.al, p.yl, p.yl, &algo, &check));
  torch::Tensor ws;
  if (check.workspaceSize > 0)
    ws = torch::empty({static_cast<int64_t>(check.workspaceSize)}, a.options().dtype(torch::kUInt8));
  const float one = 1.0f, zero = 0.0f;
  LT_CHECK(cublasLtMatmul(handle, p.op, &one, w.data_ptr(), p.wl, a.data_ptr(), p.al, &zero, y.data_ptr(), p.yl,
                          y.data_ptr(), p.yl, &algo, ws.defined() ? ws.data_ptr() : nullptr, check.workspaceSize,
                          c10::cuda::getCurrentCUDAStream()));
  return y;
}
