// cuBLASLt GEMMs with a fixed algorithm for the exact mode (r1mega/ops/cublaslt_gemm.py).
//
// y (M, N) = a (M, K) @ w (N, K)^T, both row-major, float32 accumulation, no workspace. cuBLAS's
// own heuristic picks a kernel per problem shape (and splits K for small M), so its bits for a
// row depend on the batch; here the caller fixes one algorithm (kernel, tile, stages, cluster,
// K splits = 1) per weight shape and passes it to every call, so each output element is one
// chain of MMA steps over K in order whatever M is. Whether that chain gives the Triton GEMM's
// bits is the device's property: r1mega/ops/triton_batch_invariant.py checks it before use.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>
#include <torch/extension.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

namespace {

#define LT_CHECK(expr)                                                                  \
  do {                                                                                  \
    cublasStatus_t status_ = (expr);                                                    \
    TORCH_CHECK(status_ == CUBLAS_STATUS_SUCCESS, "cuBLASLt: ", #expr, " returned ",    \
                cublasLtGetStatusName(status_), " (", cublasLtGetStatusString(status_), ")"); \
  } while (0)

constexpr uint32_t kAlign = 16;  // bytes, of every operand's base and row

cudaDataType_t data_type(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kHalf: return CUDA_R_16F;
    default: TORCH_CHECK(false, "cuBLASLt exact GEMM: bf16 or fp16 operands, got ", t);
  }
}

// The descriptors of one problem: column-major D (N, M) = op_T(w: K x N) @ a (K x M), which is
// row-major y = a @ w^T with no copies.
struct Problem {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t wl = nullptr, al = nullptr, yl = nullptr;
  Problem(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldw, int64_t ldy, cudaDataType_t t) {
    LT_CHECK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t tr = CUBLAS_OP_T, nt = CUBLAS_OP_N;
    LT_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &tr, sizeof(tr)));
    LT_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &nt, sizeof(nt)));
    LT_CHECK(cublasLtMatrixLayoutCreate(&wl, t, k, n, ldw));
    LT_CHECK(cublasLtMatrixLayoutCreate(&al, t, k, m, lda));
    LT_CHECK(cublasLtMatrixLayoutCreate(&yl, t, n, m, ldy));
  }
  ~Problem() {
    if (yl) cublasLtMatrixLayoutDestroy(yl);
    if (al) cublasLtMatrixLayoutDestroy(al);
    if (wl) cublasLtMatrixLayoutDestroy(wl);
    if (op) cublasLtMatmulDescDestroy(op);
  }
  Problem(const Problem&) = delete;
  Problem& operator=(const Problem&) = delete;
};

cublasLtMatmulAlgo_t unpack(const torch::Tensor& blob) {
  TORCH_CHECK(blob.device().is_cpu() && blob.scalar_type() == at::kByte &&
                  blob.numel() == static_cast<int64_t>(sizeof(cublasLtMatmulAlgo_t)) && blob.is_contiguous(),
              "cuBLASLt exact GEMM: an algorithm is ", sizeof(cublasLtMatmulAlgo_t),
              " contiguous CPU bytes (from algos())");
  cublasLtMatmulAlgo_t algo;
  std::memcpy(&algo, blob.data_ptr(), sizeof(algo));
  return algo;
}

// One cuBLASLt handle per device for the process (our own: torch's headers for its handle pull
// in cuSPARSE and cuSOLVER, which a cuBLAS-only build environment need not have).
cublasLtHandle_t handle_for(c10::DeviceIndex device) {
  static std::mutex mu;
  static std::vector<cublasLtHandle_t> handles;
  std::lock_guard<std::mutex> lock(mu);
  if (handles.size() <= static_cast<size_t>(device)) handles.resize(device + 1, nullptr);
  if (!handles[device]) LT_CHECK(cublasLtCreate(&handles[device]));
  return handles[device];
}

template <typename T>
int64_t config(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t attr) {
  T v{};
  size_t written = 0;
  LT_CHECK(cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, &v, sizeof(v), &written));
  return static_cast<int64_t>(v);
}

}  // namespace

// Up to max_algos algorithms of cuBLASLt's heuristic for (m, n, k) that run without workspace
// and without splitting K, best first, each as its bytes.
std::vector<torch::Tensor> algos(int64_t m, int64_t n, int64_t k, at::ScalarType dtype, int64_t max_algos) {
  TORCH_CHECK(m > 0 && n > 0 && k > 0 && max_algos > 0, "cuBLASLt exact GEMM: bad problem ", m, "x", n, "x", k);
  auto handle = handle_for(c10::cuda::current_device());
  Problem p(m, n, k, k, k, n, data_type(dtype));
  cublasLtMatmulPreference_t pref;
  LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>, decltype(&cublasLtMatmulPreferenceDestroy)>
      guard(pref, &cublasLtMatmulPreferenceDestroy);
  size_t no_workspace = 0;
  LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &no_workspace,
                                                sizeof(no_workspace)));
  // algorithms for 16-byte aligned operands (the default asks for 256: views of a tensor are
  // not, and an algorithm chosen for alignment it does not get may fail to run)
  uint32_t align = kAlign;
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
    LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &align, sizeof(align)));
  std::vector<cublasLtMatmulHeuristicResult_t> found(static_cast<size_t>(4 * max_algos));
  int count = 0;
  LT_CHECK(cublasLtMatmulAlgoGetHeuristic(handle, p.op, p.wl, p.al, p.yl, p.yl, pref,
                                          static_cast<int>(found.size()), found.data(), &count));
  std::vector<torch::Tensor> out;
  for (int i = 0; i < count && static_cast<int64_t>(out.size()) < max_algos; ++i) {
    const auto& r = found[i];
    if (r.state != CUBLAS_STATUS_SUCCESS || r.workspaceSize != 0) continue;
    if (config<int32_t>(r.algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM) > 1 ||
        config<uint32_t>(r.algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME) != CUBLASLT_REDUCTION_SCHEME_NONE)
      continue;
    auto blob = torch::empty({static_cast<int64_t>(sizeof(r.algo))}, torch::kUInt8);
    std::memcpy(blob.data_ptr(), &r.algo, sizeof(r.algo));
    out.push_back(blob);
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
  Problem p(m, n, k, k, k, n, data_type(dtype));
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
  Problem p(m, n, k, a.stride(0), w.stride(0), n, data_type(a.scalar_type()));
  cublasLtMatmulHeuristicResult_t check{};
  LT_CHECK(cublasLtMatmulAlgoCheck(handle, p.op, p.wl, p.al, p.yl, p.yl, &algo, &check));
  TORCH_CHECK(check.workspaceSize == 0, "cuBLASLt exact GEMM: the algorithm wants ", check.workspaceSize,
              " bytes of workspace at ", m, "x", n, "x", k);
  const float one = 1.0f, zero = 0.0f;
  LT_CHECK(cublasLtMatmul(handle, p.op, &one, w.data_ptr(), p.wl, a.data_ptr(), p.al, &zero, y.data_ptr(), p.yl,
                          y.data_ptr(), p.yl, &algo, nullptr, 0, c10::cuda::getCurrentCUDAStream()));
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("workspace", &workspace, "workspace bytes of an algorithm at (m, n, k), -1 where it cannot run");
  m.def("algos", &algos, "cuBLASLt heuristic algorithms without workspace or K splits (bytes each)");
  m.def("describe", &describe, "an algorithm's configuration attributes");
  m.def("matmul", &matmul, "y = a @ w.T through one fixed cuBLASLt algorithm");
}
