// Python face of the GRPO loss kernels (r1mega_grpo_cuda). The checks live here so that a wrong
// tensor is reported by name before any kernel runs; the kernels are in grpo_loss_kernel.cu and the
// PyTorch reference of every function is in r1mega/ops/logprobs.py and r1mega/ops/grpo_loss.py.
#include <torch/extension.h>

#include <cmath>
#include <vector>

torch::Tensor shard_stats_cuda(const torch::Tensor& logits, const torch::Tensor& targets,
                               int64_t vocab_start, int64_t valid_cols, double inv_temp);
void shard_backward_cuda(const torch::Tensor& logits, torch::Tensor& grad, const torch::Tensor& targets,
                         const torch::Tensor& lse, const torch::Tensor& mean_x, const torch::Tensor& g_logp,
                         const c10::optional<torch::Tensor>& g_ent, int64_t vocab_start,
                         int64_t valid_cols, double inv_temp);
std::vector<int64_t> fused_plan(const torch::Tensor& logits);
void scale_if_not_one_cuda(torch::Tensor& grad, const torch::Tensor& g);
std::vector<torch::Tensor> fused_grpo_cuda(
    const torch::Tensor& logits, torch::Tensor& grad, const torch::Tensor& targets,
    const torch::Tensor& adv, const torch::Tensor& old_logp, const c10::optional<torch::Tensor>& ref_logp,
    const c10::optional<torch::Tensor>& rollout_logp, const torch::Tensor& weight, int64_t valid_cols,
    double inv_temp, double clip_lo, double clip_hi, double dual_clip, double kl_beta, int64_t kl_code,
    double tis_cap, double wscale);

namespace {

void check_logits(const torch::Tensor& logits) {
  TORCH_CHECK(logits.is_cuda(), "r1mega_grpo_cuda: logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2, "r1mega_grpo_cuda: logits must be (tokens, vocab/tp), got ", logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1, "r1mega_grpo_cuda: logits need unit column stride; call .contiguous()");
  TORCH_CHECK(logits.size(1) < (int64_t)1 << 30, "r1mega_grpo_cuda: vocabulary shard too wide");
}

void check_rowvec(const torch::Tensor& t, const torch::Tensor& logits, const char* name,
                  at::ScalarType dtype) {
  TORCH_CHECK(t.device() == logits.device(), "r1mega_grpo_cuda: ", name, " is on ", t.device(),
              " but logits are on ", logits.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0), "r1mega_grpo_cuda: ", name,
              " must have shape (", logits.size(0), ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "r1mega_grpo_cuda: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "r1mega_grpo_cuda: ", name, " must be contiguous");
}

void check_cols(const torch::Tensor& logits, int64_t valid_cols) {
  TORCH_CHECK(valid_cols >= 0 && valid_cols <= logits.size(1), "r1mega_grpo_cuda: valid_cols=",
              valid_cols, " outside [0, ", logits.size(1), "]");
}

torch::Tensor shard_stats(const torch::Tensor& logits, const torch::Tensor& targets, int64_t vocab_start,
                          int64_t valid_cols, double inv_temp) {
  check_logits(logits);
  check_rowvec(targets, logits, "targets", at::kLong);
  check_cols(logits, valid_cols);
  return shard_stats_cuda(logits, targets, vocab_start, valid_cols, inv_temp);
}

void shard_backward(const torch::Tensor& logits, torch::Tensor grad, const torch::Tensor& targets,
                    const torch::Tensor& lse, const torch::Tensor& mean_x, const torch::Tensor& g_logp,
                    const c10::optional<torch::Tensor>& g_ent, int64_t vocab_start, int64_t valid_cols,
                    double inv_temp) {
  check_logits(logits);
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type() &&
                  grad.stride(1) == 1 && grad.device() == logits.device(),
              "r1mega_grpo_cuda: grad must match the logits' shape, dtype and device with unit column stride");
  check_rowvec(targets, logits, "targets", at::kLong);
  check_rowvec(lse, logits, "lse", at::kFloat);
  check_rowvec(mean_x, logits, "mean_x", at::kFloat);
  check_rowvec(g_logp, logits, "g_logp", at::kFloat);
  if (g_ent.has_value()) check_rowvec(*g_ent, logits, "g_ent", at::kFloat);
  check_cols(logits, valid_cols);
  shard_backward_cuda(logits, grad, targets, lse, mean_x, g_logp, g_ent, vocab_start, valid_cols, inv_temp);
}

bool fused_supported(const torch::Tensor& logits) {
  const auto plan = fused_plan(logits);
  return plan[0] > 0 && plan[2] > 0;
}

std::vector<torch::Tensor> fused_grpo(const torch::Tensor& logits, torch::Tensor grad,
                                      const torch::Tensor& targets, const torch::Tensor& adv,
                                      const torch::Tensor& old_logp,
                                      const c10::optional<torch::Tensor>& ref_logp,
                                      const c10::optional<torch::Tensor>& rollout_logp,
                                      const torch::Tensor& weight, int64_t valid_cols, double inv_temp,
                                      double clip_lo, double clip_hi, double dual_clip, double kl_beta,
                                      int64_t kl_code, double tis_cap, double wscale) {
  check_logits(logits);
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type() &&
                  grad.device() == logits.device(),
              "r1mega_grpo_cuda.fused_grpo: grad must match the logits' shape, dtype and device");
  check_rowvec(targets, logits, "targets", at::kLong);
  check_rowvec(adv, logits, "advantages", at::kFloat);
  check_rowvec(old_logp, logits, "old_logp", at::kFloat);
  check_rowvec(weight, logits, "weights", at::kFloat);
  if (ref_logp.has_value()) check_rowvec(*ref_logp, logits, "ref_logp", at::kFloat);
  if (rollout_logp.has_value()) check_rowvec(*rollout_logp, logits, "rollout_logp", at::kFloat);
  check_cols(logits, valid_cols);
  TORCH_CHECK(kl_code >= 1 && kl_code <= 3, "fused_grpo: kl_code must be 1, 2 or 3 (k1/k2/k3)");
  TORCH_CHECK(std::isfinite(wscale) && wscale > 0, "fused_grpo: wscale must be finite and > 0");
  return fused_grpo_cuda(logits, grad, targets, adv, old_logp, ref_logp, rollout_logp, weight, valid_cols,
                         inv_temp, clip_lo, clip_hi, dual_clip, kl_beta, kl_code, tis_cap, wscale);
}

void scale_if_not_one(torch::Tensor grad, const torch::Tensor& g) {
  check_logits(grad);
  TORCH_CHECK(g.device() == grad.device() && g.numel() == 1 && g.scalar_type() == at::kFloat,
              "r1mega_grpo_cuda.scale_if_not_one: g must be one float32 value on the gradient's device");
  scale_if_not_one_cuda(grad, g);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "r1mega GRPO loss kernels on vocabulary-parallel logits";
  m.def("shard_stats", &shard_stats, "(T, Vl) logits -> (T, 4) [max, sumexp, sum exp*x, target x]",
        py::arg("logits"), py::arg("targets"), py::arg("vocab_start"), py::arg("valid_cols"),
        py::arg("inv_temp"));
  m.def("shard_backward", &shard_backward, "write d loss / d logits into grad (may alias logits)",
        py::arg("logits"), py::arg("grad"), py::arg("targets"), py::arg("lse"), py::arg("mean_x"),
        py::arg("g_logp"), py::arg("g_ent"), py::arg("vocab_start"), py::arg("valid_cols"),
        py::arg("inv_temp"));
  m.def("fused_supported", &fused_supported, "whether fused_grpo can run on these logits",
        py::arg("logits"));
  m.def("fused_plan", &fused_plan, "[cluster size, vectors per thread, clusters] of the fused kernel",
        py::arg("logits"));
  m.def("scale_if_not_one", &scale_if_not_one,
        "grad *= g in place unless g == 1, decided on the device (no host sync)", py::arg("grad"),
        py::arg("g"));
  m.def("fused_grpo", &fused_grpo,
        "one-pass GRPO forward + logits gradient (tp = 1), token weight = weight * wscale -> "
        "[logp, entropy, row_stats (T, 12)]",
        py::arg("logits"), py::arg("grad"), py::arg("targets"), py::arg("adv"), py::arg("old_logp"),
        py::arg("ref_logp"), py::arg("rollout_logp"), py::arg("weight"), py::arg("valid_cols"),
        py::arg("inv_temp"), py::arg("clip_lo"), py::arg("clip_hi"), py::arg("dual_clip"),
        py::arg("kl_beta"), py::arg("kl_code"), py::arg("tis_cap"), py::arg("wscale") = 1.0);
}
