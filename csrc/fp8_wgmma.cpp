// Python face of the wgmma FP8 decode GEMM (r1mega_wgmma_cuda, csrc/fp8_wgmma_kernel.cu). Every
// tensor is checked here, by name; which configuration serves a problem is the caller's
// (r1mega/precision/wgmma_gemm.py), and its limits are checked here too.
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

void fp8_wgmma_gemm_cuda(const at::Tensor& a, const at::Tensor& w, at::Tensor& y, const at::Tensor& w_scale,
                         const c10::optional<at::Tensor>& a_scale, int64_t config, bool producer_warp);

namespace {

// (BM, BN, K split) of each configuration index, as in fp8_wgmma_gemm_cuda's switch
constexpr int kConfigs[][3] = {{64, 128, 1},  {64, 128, 2},  {64, 128, 4}, {128, 128, 1}, {128, 128, 2},
                               {128, 128, 4}, {128, 64, 1},  {128, 64, 2}, {128, 64, 4},  {256, 128, 2},
                               {256, 128, 4}, {256, 128, 8}, {256, 64, 4}, {256, 64, 8}};

bool aligned16(const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// a (M, K) and w (N, K) float8_e4m3fn with unit column stride, row strides multiples of 16 bytes,
// 16-byte aligned; w_scale one float32; a_scale None or (M, 1) / (M,) float32 row scales.
// K a multiple of 128 * split, N of the configuration's BN. producer_warp: the warp-specialised
// pipeline (csrc/fp8_wgmma_kernel.cu). Returns y (M, N) bf16.
torch::Tensor fp8_wgmma_gemm(const torch::Tensor& a, const torch::Tensor& w, const torch::Tensor& w_scale,
                             c10::optional<torch::Tensor> a_scale, int64_t config, bool producer_warp) {
  TORCH_CHECK(config >= 0 && config < static_cast<int64_t>(sizeof(kConfigs) / sizeof(kConfigs[0])),
              "fp8 wgmma gemm: no configuration ", config);
  const int bn = kConfigs[config][1], split = kConfigs[config][2];
  TORCH_CHECK(a.is_cuda() && w.device() == a.device() && w_scale.device() == a.device(),
              "fp8 wgmma gemm: a, w and w_scale on one CUDA device");
  for (const auto* t : {&a, &w}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat8_e4m3fn && t->dim() == 2 && t->stride(1) == 1 &&
                    t->stride(0) % 16 == 0 && aligned16(*t),
                "fp8 wgmma gemm: a and w must be 2-D float8_e4m3fn, unit column stride, 16-byte rows and "
                "alignment; got ", t->scalar_type(), " ", t->sizes(), " strides ", t->strides());
  }
  const int64_t m = a.size(0), k = a.size(1), n = w.size(0);
  TORCH_CHECK(w.size(1) == k, "fp8 wgmma gemm: a ", a.sizes(), " and w ", w.sizes(), " differ in K");
  TORCH_CHECK(m >= 1 && m < (1 << 30) && k % (128 * split) == 0 && n % bn == 0,
              "fp8 wgmma gemm: configuration ", config, " needs K a multiple of ", 128 * split, " and N of ",
              bn, "; got M ", m, " N ", n, " K ", k);
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == 1, "fp8 wgmma gemm: w_scale one float32");
  if (a_scale.has_value()) {
    const auto& s = *a_scale;
    TORCH_CHECK(s.device() == a.device() && s.scalar_type() == at::kFloat && s.size(0) >= m &&
                    (s.dim() == 1 || (s.dim() == 2 && s.size(1) == 1)),
                "fp8 wgmma gemm: a_scale (M, 1) or (M,) float32 row scales, got ", s.sizes());
  }
  const c10::cuda::CUDAGuard guard(a.device());
  auto y = torch::empty({m, n}, a.options().dtype(at::kBFloat16));
  fp8_wgmma_gemm_cuda(a, w, y, w_scale, a_scale, config, producer_warp);
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fp8_wgmma_gemm", &fp8_wgmma_gemm, "y = (a @ w.T) * w_scale [* a_scale rows], FP8 wgmma, K split in a cluster",
        py::arg("a"), py::arg("w"), py::arg("w_scale"), py::arg("a_scale") = py::none(), py::arg("config"),
        py::arg("producer_warp") = false);
}
