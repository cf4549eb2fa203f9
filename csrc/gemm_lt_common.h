// What the cuBLASLt GEMMs of r1mega_gemm_cuda share (csrc/exact_gemm_lt.cpp, csrc/fp8_gemm_lt.cpp):
// the status check, one handle per device, the problem's descriptors, algorithms as bytes.
#pragma once
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>
#include <torch/extension.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

namespace r1mega_lt {

#define LT_CHECK(expr)                                                                  \
  do {                                                                                  \
    cublasStatus_t status_ = (expr);                                                    \
    TORCH_CHECK(status_ == CUBLAS_STATUS_SUCCESS, "cuBLASLt: ", #expr, " returned ",    \
                cublasLtGetStatusName(status_), " (", cublasLtGetStatusString(status_), ")"); \
  } while (0)

constexpr uint32_t kAlign = 16;  // bytes, of every operand's base and row

// The descriptors of one problem: column-major D (N, M) = op_T(w: K x N) @ a (K x M), which is
// row-major y = a @ w^T with no copies (for FP8, the "TN" layout cuBLASLt requires). Operands of
// type `in`, output (and C) of type `out`, float32 accumulation and scales.
struct Problem {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t wl = nullptr, al = nullptr, yl = nullptr;
  Problem(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldw, int64_t ldy, cudaDataType_t in,
          cudaDataType_t out) {
    LT_CHECK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t tr = CUBLAS_OP_T, nt = CUBLAS_OP_N;
    LT_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &tr, sizeof(tr)));
    LT_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &nt, sizeof(nt)));
    LT_CHECK(cublasLtMatrixLayoutCreate(&wl, in, k, n, ldw));
    LT_CHECK(cublasLtMatrixLayoutCreate(&al, in, k, m, lda));
    LT_CHECK(cublasLtMatrixLayoutCreate(&yl, out, n, m, ldy));
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

inline cublasLtMatmulAlgo_t unpack(const torch::Tensor& blob) {
  TORCH_CHECK(blob.device().is_cpu() && blob.scalar_type() == at::kByte &&
                  blob.numel() == static_cast<int64_t>(sizeof(cublasLtMatmulAlgo_t)) && blob.is_contiguous(),
              "cuBLASLt GEMM: an algorithm is ", sizeof(cublasLtMatmulAlgo_t),
              " contiguous CPU bytes (from algos() or fp8_algos())");
  cublasLtMatmulAlgo_t algo;
  std::memcpy(&algo, blob.data_ptr(), sizeof(algo));
  return algo;
}

inline torch::Tensor pack(const cublasLtMatmulAlgo_t& algo) {
  auto blob = torch::empty({static_cast<int64_t>(sizeof(algo))}, torch::kUInt8);
  std::memcpy(blob.data_ptr(), &algo, sizeof(algo));
  return blob;
}

// One cuBLASLt handle per device for the process (our own: torch's headers for its handle pull
// in cuSPARSE and cuSOLVER, which a cuBLAS-only build environment need not have).
inline cublasLtHandle_t handle_for(c10::DeviceIndex device) {
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

// A heuristic preference: workspace up to max_workspace bytes, operands 16-byte aligned (the
// default asks for 256: views of a tensor are not, and an algorithm chosen for alignment it
// does not get may fail to run). Destroyed with the returned guard.
using PrefGuard = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>,
                                  decltype(&cublasLtMatmulPreferenceDestroy)>;
inline PrefGuard preference(size_t max_workspace) {
  cublasLtMatmulPreference_t pref;
  LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  PrefGuard guard(pref, &cublasLtMatmulPreferenceDestroy);
  LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_workspace,
                                                sizeof(max_workspace)));
  uint32_t align = kAlign;
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
    LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &align, sizeof(align)));
  return guard;
}

}  // namespace r1mega_lt
