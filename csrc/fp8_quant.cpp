// Python face of the FP8 dual quantiser (r1mega_fp8_cuda). Every tensor is checked here, by name,
// before the kernel runs; the kernel is in fp8_quant_kernel.cu, its reference is
// r1mega/precision/quantize.py's quantize_reference (of x and of x.T).
#include <torch/extension.h>

void quant_dual_cuda(const at::Tensor& x, at::Tensor& q, at::Tensor& qt, at::Tensor& s,
                     at::Tensor& st, const c10::optional<at::Tensor>& amax, int64_t gran,
                     bool power2, bool persistent);

namespace {

void check_on(const torch::Tensor& t, const torch::Tensor& x, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), "r1mega_fp8_cuda: ", name,
              " must be on x's device ", x.device(), ", got ", t.device());
}

// gran: 0 tensor, 1 tile (1x128), 2 block (128x128). q (R, C) and qt (C, R) FP8, contiguous, of
// one format; s and st float32 scales of x and x.T in quantize.scale_shape's shapes (any strides);
// amax: max |x| as float32 (1,), tensor granularity only. persistent: two CTAs an SM walk the
// blocks, each loading its next block while it works on one (else one CTA a block).
void quant_dual(const torch::Tensor& x, torch::Tensor q, torch::Tensor qt, torch::Tensor s,
                torch::Tensor st, const c10::optional<torch::Tensor>& amax, int64_t gran,
                bool power2, bool persistent) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(),
              "r1mega_fp8_cuda: x must be a contiguous 2-D CUDA matrix, got ", x.sizes(), " on ",
              x.device());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "r1mega_fp8_cuda: x must be bfloat16 or float16, got ", x.scalar_type());
  const int64_t R = x.size(0), C = x.size(1);
  TORCH_CHECK(R % 16 == 0 && C % 16 == 0 && R > 0 && C > 0,
              "r1mega_fp8_cuda: x's sides must be positive multiples of 16, got ", x.sizes());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              "r1mega_fp8_cuda: x's data must be 16-byte aligned");
  TORCH_CHECK((R + 127) / 128 <= 65535, "r1mega_fp8_cuda: ", R, " rows are more than 65535 blocks");
  TORCH_CHECK(gran >= 0 && gran <= 2, "r1mega_fp8_cuda: granularity code ", gran, " not in 0..2");
  const auto fp8 = q.scalar_type();
  TORCH_CHECK(fp8 == at::ScalarType::Float8_e4m3fn || fp8 == at::ScalarType::Float8_e5m2,
              "r1mega_fp8_cuda: q must be float8_e4m3fn or float8_e5m2, got ", fp8);
  TORCH_CHECK(qt.scalar_type() == fp8, "r1mega_fp8_cuda: q and qt must share one FP8 format");
  check_on(q, x, "q");
  check_on(qt, x, "qt");
  check_on(s, x, "s");
  check_on(st, x, "st");
  TORCH_CHECK(q.is_contiguous() && q.size(0) == R && q.size(1) == C,
              "r1mega_fp8_cuda: q must be contiguous (", R, ", ", C, "), got ", q.sizes());
  TORCH_CHECK(qt.is_contiguous() && qt.size(0) == C && qt.size(1) == R,
              "r1mega_fp8_cuda: qt must be contiguous (", C, ", ", R, "), got ", qt.sizes());
  const int64_t nr = (R + 127) / 128, nc = (C + 127) / 128;
  const std::vector<int64_t> want_s = gran == 0 ? std::vector<int64_t>{1, 1}
                                    : gran == 1 ? std::vector<int64_t>{R, nc}
                                                : std::vector<int64_t>{nr, nc};
  const std::vector<int64_t> want_st = gran == 0 ? std::vector<int64_t>{1, 1}
                                     : gran == 1 ? std::vector<int64_t>{C, nr}
                                                 : std::vector<int64_t>{nc, nr};
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.sizes() == want_s,
              "r1mega_fp8_cuda: s must be float32 ", want_s, ", got ", s.scalar_type(), " ", s.sizes());
  TORCH_CHECK(st.scalar_type() == at::kFloat && st.sizes() == want_st,
              "r1mega_fp8_cuda: st must be float32 ", want_st, ", got ", st.scalar_type(), " ",
              st.sizes());
  if (gran == 0) {
    TORCH_CHECK(amax.has_value(), "r1mega_fp8_cuda: tensor granularity needs amax");
  }
  if (amax.has_value()) {
    TORCH_CHECK(gran == 0, "r1mega_fp8_cuda: a given amax is for tensor granularity only");
    check_on(*amax, x, "amax");
    TORCH_CHECK(amax->scalar_type() == at::kFloat && amax->numel() == 1,
                "r1mega_fp8_cuda: amax must be one float32 value, got ", amax->scalar_type(), " ",
                amax->sizes());
  }
  quant_dual_cuda(x, q, qt, s, st, amax, gran, power2, persistent);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_dual", &quant_dual,
        "x (R, C) bf16/fp16 -> FP8 x and x.T with their scales, one read (tensor/tile/block)",
        py::arg("x"), py::arg("q"), py::arg("qt"), py::arg("s"), py::arg("st"), py::arg("amax"),
        py::arg("gran"), py::arg("power2"), py::arg("persistent") = false);
}
