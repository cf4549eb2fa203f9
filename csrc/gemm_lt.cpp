// Python face of r1mega_gemm_cuda: the exact mode's fixed-algorithm GEMM (csrc/exact_gemm_lt.cpp)
// and the FP8 GEMMs with a chosen algorithm (csrc/fp8_gemm_lt.cpp), both on cuBLASLt.
#include <torch/extension.h>

#include <vector>

std::vector<torch::Tensor> algos(int64_t m, int64_t n, int64_t k, at::ScalarType dtype, int64_t max_algos);
std::vector<int64_t> describe(const torch::Tensor& blob);
int64_t workspace(int64_t m, int64_t n, int64_t k, at::ScalarType dtype, const torch::Tensor& blob);
torch::Tensor matmul(const torch::Tensor& a, const torch::Tensor& w, const torch::Tensor& blob);
std::vector<torch::Tensor> fp8_algos(int64_t m, int64_t n, int64_t k, at::ScalarType out_dtype,
                                     int64_t max_algos, int64_t max_workspace, int64_t mode);
torch::Tensor fp8_matmul(const torch::Tensor& a, const torch::Tensor& scale_a, const torch::Tensor& w,
                         const torch::Tensor& scale_w, at::ScalarType out_dtype, const torch::Tensor& blob,
                         int64_t mode);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("workspace", &workspace, "workspace bytes of an algorithm at (m, n, k), -1 where it cannot run");
  m.def("algos", &algos, "cuBLASLt heuristic algorithms without workspace or K splits (bytes each)");
  m.def("describe", &describe, "an algorithm's configuration attributes");
  m.def("matmul", &matmul, "y = a @ w.T through one fixed cuBLASLt algorithm");
  m.def("fp8_algos", &fp8_algos,
        "cuBLASLt heuristic algorithms of the FP8 GEMM (bytes each); mode 0 tensor scales, 1 a and w in 1x128 "
        "tiles, 2 a in tiles and w in 128x128 blocks",
        pybind11::arg("m"), pybind11::arg("n"), pybind11::arg("k"), pybind11::arg("out_dtype"),
        pybind11::arg("max_algos"), pybind11::arg("max_workspace"), pybind11::arg("mode") = 0);
  m.def("fp8_matmul", &fp8_matmul, "y = (a8 scale_a) @ (w8 scale_w).T through one cuBLASLt algorithm",
        pybind11::arg("a"), pybind11::arg("scale_a"), pybind11::arg("w"), pybind11::arg("scale_w"),
        pybind11::arg("out_dtype"), pybind11::arg("blob"), pybind11::arg("mode") = 0);
}
