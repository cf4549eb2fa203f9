// cuBLASLt GEMMs with a fixed algorithm for the exact mode (r1mega/ops/cublaslt_gemm.py).
//
// y (M, N) = a (M, K) @ w (N, K)^T, both row-major, float32 accumulation, no workspace. cuBLAS's
// own heuristic picks a kernel per problem shape (and splits K for small M), so its bits for a
// row depend on the batch; here the caller fixes one algorithm (kernel, tile, stages, cluster,
// K splits = 1) per weight shape and passes it to every call, so each output element is one
// chain of MMA steps over K in order whatever M is. Whether that chain gives the Triton GEMM's
// bits is the device's property: r1mega/ops/triton_batch_invariant.py checks it before use.
#include "gemm_lt_common.h"

using namespace r1mega_lt;

namespace {

cudaDataType_t data_type(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kHalf: return CUDA_R_16F;
    default: TORCH_CHECK(false, "cuBLASLt exact GEMM: bf16 or fp16 operands, got ", t);
  }
}

}  // namespace

// Up to max_algos algorithms of cuBLASLt's heuristic for (m, n, k) that run without workspace
// and without splitting K, best first, each as its bytes.
std::vector<torch::Tensor> algos(int64_t m, int64_t n, int64_t k, at::ScalarType dtype, int64_t max_algos) {
  TORCH_CHECK(m > 0 && n > 0 && k > 0 && max_algos > 0, "cuBLASLt exact GEMM: bad problem ", m, "x", n, "x", k);
  auto handle = handle_for(c10::cuda::current_device());
  Problem p(m, n, k, k, k, n, data_type(dtype), data_type(dtype));
  auto pref = preference(0);
  std::vector<cublasLtMatmulHeuristicResult_t> found(static_cast<size_t>(4 * max_algos));
  int count = 0;
  LT_CHECK(cublasLtMatmulAlgoGetHeuristic(handle, p.op, p.wl, p.al, p.yl, p.yl, pref.get(),
                                          static_cast<int>(found.size()), found.data(), &count));
  std::vector<torch::Tensor> out;
  for (int i = 0; i < count && static_cast<int64_t>(out.size()) < max_algos; ++i) {
    const auto& r = found[i];
    if (r.state != CUBLAS_STATUS_SUCCESS || r.workspaceSize != 0) continue;
    if (config<int32_t>(r.algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM) > 1 ||
        config<uint32_t>(r.algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME) != CUBLASLT_REDUCTION_SCHEME_NONE)
      continue;
    out.push_back(pack(r.algo));
  }
  return out;
}

// (algorithm id, tile id, stages id, K splits, reduction scheme, CTA swizzling, custom option,
// inner shape id, cluster shape id): what an algorithm is, for reports and cache keys.
std::vector<int64_t> describe(const torch::Tensor& blob) {
  auto a = unpack(blob);
  return {config<int32_t>(a, CUBLASLT_ALGO_CONFIG_ID),
          config<uint32_t>(a, CUBLASLT_ALGO_CONFIG_TILE_ID),
          config<uint32_t>(a, CUBLASLT_ALGO_CONFIG_STAGES_ID),
          config<int32_t>(a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
          config<uint32_t>(a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME),
          config<uint32_t>(a, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING),
          config<uint32_t>(a, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION),
          config<uint16_t>(a, CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID),
          config<uint16_t>(a, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID)};
}

// Bytes of workspace the algorithm wants at (m, n, k), or -1 where cuBLASLt refuses it there: an
// algorithm's need can appear only at large M (e.g. none at 8,192 rows, 4 bytes at 16,384).
int64_t workspace(int64_t m, int64_t n, int64_t k, at::ScalarType dtype, const torch::Tensor& blob) {
  TORCH_CHECK(m > 0 && n > 0 && k > 0, "cuBLASLt exact GEMM: bad problem ", m, "x", n, "x", k);
  auto algo = unpack(blob);
  auto handle = handle_for(c10::cuda::current_device());
  Problem p(m, n, k, k, k, n, data_type(dtype), data_type(dtype));
  cublasLtMatmulHeuristicResult_t check{};
  if (cublasLtMatmulAlgoCheck(handle, p.op, p.wl, p.al, p.yl, p.yl, &algo, &check) != CUBLAS_STATUS_SUCCESS)
    return -1;
  return static_cast<int64_t>(check.workspaceSize);
}

// y = a @ w^T through the given algorithm; refused (an error, never another algorithm) where
// cuBLASLt says it cannot run this problem.
torch::Tensor matmul(const torch::Tensor& a, const torch::Tensor& w, const torch::Tensor& blob) {
  TORCH_CHECK(a.is_cuda() && w.is_cuda() && a.device() == w.device(), "cuBLASLt exact GEMM: CUDA operands on one device");
  TORCH_CHECK(a.dim() == 2 && w.dim() == 2 && a.size(1) == w.size(1), "cuBLASLt exact GEMM: a (M, K), w (N, K), got ",
              a.sizes(), " and ", w.sizes());
  TORCH_CHECK(a.scalar_type() == w.scalar_type(), "cuBLASLt exact GEMM: a and w of one dtype");
  TORCH_CHECK(a.stride(1) == 1 && w.stride(1) == 1, "cuBLASLt exact GEMM: row-major a and w");
  const int64_t e = a.element_size();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(a.data_ptr()) % kAlign == 0 &&
                  reinterpret_cast<uintptr_t>(w.data_ptr()) % kAlign == 0 && (a.stride(0) * e) % kAlign == 0 &&
                  (w.stride(0) * e) % kAlign == 0 && (w.size(0) * e) % kAlign == 0,
              "cuBLASLt exact GEMM: operands and rows aligned to ", kAlign, " bytes");
  auto algo = unpack(blob);
  const int64_t m = a.size(0), n = w.size(0), k = a.size(1);
  auto y = torch::empty({m, n}, a.options());
  if (m == 0 || n == 0) return y;
  c10::cuda::CUDAGuard device_guard(a.device());
  auto handle = handle_for(a.device().index());
  Problem p(m, n, k, a.stride(0), w.stride(0), n, data_type(a.scalar_type()), data_type(a.scalar_type()));
  cublasLtMatmulHeuristicResult_t check{};
  LT_CHECK(cublasLtMatmulAlgoCheck(handle, p.op, p.wl, p.al, p.yl, p.yl, &algo, &check));
  TORCH_CHECK(check.workspaceSize == 0, "cuBLASLt exact GEMM: the algorithm wants ", check.workspaceSize,
              " bytes of workspace at ", m, "x", n, "x", k);
  const float one = 1.0f, zero = 0.0f;
  LT_CHECK(cublasLtMatmul(handle, p.op, &one, w.data_ptr(), p.wl, a.data_ptr(), p.al, &zero, y.data_ptr(), p.yl,
                          y.data_ptr(), p.yl, &algo, nullptr, 0, c10::cuda::getCurrentCUDAStream()));
  return y;
}
