// Python face of the MoE dispatch kernels (r1mega_moe_cuda). Every tensor is checked here, by
// name, before a kernel runs; the kernels are in moe_dispatch_kernel.cu and the PyTorch reference
// of each function is in r1mega/moe/dispatch.py.
#include <torch/extension.h>

#include <vector>

std::vector<torch::Tensor> routing_metadata_cuda(const torch::Tensor& indices, int64_t num_experts,
                                                 int64_t align, int64_t num_rows, int64_t max_blocks);
torch::Tensor permute_cuda(const torch::Tensor& x, const torch::Tensor& row_map, const torch::Tensor& src_entry);
torch::Tensor unpermute_cuda(const torch::Tensor& y, const torch::Tensor& row_map,
                             const c10::optional<torch::Tensor>& weights);
std::vector<torch::Tensor> unpermute_backward_cuda(const torch::Tensor& grad_out, const torch::Tensor& y,
                                                   const torch::Tensor& row_map, const torch::Tensor& weights,
                                                   const torch::Tensor& src_entry);

namespace {

void check_cuda_contig(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "r1mega_moe_cuda: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "r1mega_moe_cuda: ", name, " must be contiguous; call .contiguous()");
}

void check_map(const torch::Tensor& row_map, const torch::Tensor& src_entry, const torch::Tensor& data,
               const char* data_name) {
  check_cuda_contig(row_map, "row_map");
  check_cuda_contig(src_entry, "src_entry");
  TORCH_CHECK(row_map.dim() == 2 && row_map.scalar_type() == at::kInt,
              "r1mega_moe_cuda: row_map must be (tokens, topk) int32, got ", row_map.sizes(), " ",
              row_map.scalar_type());
  TORCH_CHECK(src_entry.dim() == 1 && src_entry.scalar_type() == at::kInt,
              "r1mega_moe_cuda: src_entry must be (rows,) int32, got ", src_entry.sizes());
  TORCH_CHECK(row_map.device() == data.device() && src_entry.device() == data.device(),
              "r1mega_moe_cuda: row_map/src_entry and ", data_name, " are on different devices");
  TORCH_CHECK(data.dim() == 2, "r1mega_moe_cuda: ", data_name, " must be (rows, hidden), got ", data.sizes());
  TORCH_CHECK(src_entry.numel() < ((int64_t)1 << 31) && row_map.numel() < ((int64_t)1 << 31),
              "r1mega_moe_cuda: more than 2^31 routed rows; split the batch");
}

void check_weights(const torch::Tensor& w, const torch::Tensor& row_map) {
  check_cuda_contig(w, "weights");
  TORCH_CHECK(w.sizes() == row_map.sizes(), "r1mega_moe_cuda: weights must have shape ", row_map.sizes(),
              " like the routing, got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble,
              "r1mega_moe_cuda: weights must be float32 (or float64), got ", w.scalar_type());
}

std::vector<torch::Tensor> routing_metadata(const torch::Tensor& indices, int64_t num_experts, int64_t align,
                                            int64_t num_rows, int64_t max_blocks) {
  check_cuda_contig(indices, "indices");
  TORCH_CHECK(indices.dim() == 2, "r1mega_moe_cuda: indices must be (tokens, topk), got ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong,
              "r1mega_moe_cuda: indices must be int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK(num_experts >= 1 && num_experts <= 1024, "r1mega_moe_cuda: num_experts=", num_experts,
              " outside [1, 1024]");
  TORCH_CHECK(align >= 1, "r1mega_moe_cuda: align=", align, " must be >= 1");
  TORCH_CHECK(num_rows >= indices.numel() && num_rows < ((int64_t)1 << 31),
              "r1mega_moe_cuda: num_rows=", num_rows, " must hold all ", indices.numel(), " routed rows");
  return routing_metadata_cuda(indices, num_experts, align, num_rows, max_blocks);
}

torch::Tensor permute(const torch::Tensor& x, const torch::Tensor& row_map, const torch::Tensor& src_entry) {
  check_cuda_contig(x, "x");
  check_map(row_map, src_entry, x, "x");
  TORCH_CHECK(row_map.size(0) == x.size(0), "r1mega_moe_cuda: row_map has ", row_map.size(0),
              " tokens but x has ", x.size(0));
  return permute_cuda(x, row_map, src_entry);
}

torch::Tensor unpermute(const torch::Tensor& y, const torch::Tensor& row_map, const torch::Tensor& src_entry,
                        const c10::optional<torch::Tensor>& weights) {
  check_cuda_contig(y, "y");
  check_map(row_map, src_entry, y, "y");
  TORCH_CHECK(y.size(0) == src_entry.size(0), "r1mega_moe_cuda: y has ", y.size(0), " rows, the routing ",
              src_entry.size(0));
  if (weights.has_value()) check_weights(*weights, row_map);
  return unpermute_cuda(y, row_map, weights);
}

std::vector<torch::Tensor> unpermute_backward(const torch::Tensor& grad_out, const torch::Tensor& y,
                                              const torch::Tensor& row_map, const torch::Tensor& weights,
                                              const torch::Tensor& src_entry) {
  check_cuda_contig(grad_out, "grad_out");
  check_cuda_contig(y, "y");
  check_map(row_map, src_entry, y, "y");
  check_weights(weights, row_map);
  TORCH_CHECK(grad_out.scalar_type() == y.scalar_type(), "r1mega_moe_cuda: grad_out is ", grad_out.scalar_type(),
              " but y is ", y.scalar_type());
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == row_map.size(0) && grad_out.size(1) == y.size(1),
              "r1mega_moe_cuda: grad_out must be (", row_map.size(0), ", ", y.size(1), "), got ", grad_out.sizes());
  TORCH_CHECK(y.size(0) == src_entry.size(0), "r1mega_moe_cuda: y has ", y.size(0), " rows, the routing ",
              src_entry.size(0));
  return unpermute_backward_cuda(grad_out, y, row_map, weights, src_entry);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "r1mega MoE token dispatch: routing metadata, permute, unpermute + combine (and backward)";
  m.def("routing_metadata", &routing_metadata,
        "(indices, num_experts, align, num_rows, max_blocks=0 (auto)) -> counts, offsets, row_map, src_entry",
        py::arg("indices"), py::arg("num_experts"), py::arg("align"), py::arg("num_rows"), py::arg("max_blocks") = 0);
  m.def("permute", &permute, "(x, row_map, src_entry) -> permuted rows");
  m.def("unpermute", &unpermute, "(y, row_map, src_entry, weights|None) -> combined tokens, float32 accumulation");
  m.def("unpermute_backward", &unpermute_backward, "(grad_out, y, row_map, weights, src_entry) -> grad_y, grad_w");
}
