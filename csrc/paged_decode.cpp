// Python face of the FP8 paged decode attention (r1mega_attn_cuda). Every tensor is checked here,
// by name, before the kernel runs; the kernel is paged_decode_kernel.cu, its reference
// r1mega/rollout/attention.py's attend_decode_gather on the dequantised cache.
#include <ATen/cuda/CUDAContext.h>
#include <torch/extension.h>

void paged_decode_fp8_cuda(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                           const at::Tensor& ks, const at::Tensor& vs, const at::Tensor& bt,
                           const at::Tensor& ctx, at::Tensor& out, double scale, bool tensor_cores,
                           bool heads_inner, const c10::optional<at::Tensor>& q8,
                           const c10::optional<at::Tensor>& s8, bool power2, bool seq_cta, int wph,
                           bool tiles, bool cluster);
void paged_decode_fp8_rope_cuda(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                const at::Tensor& slots, const c10::optional<at::Tensor>& row_scale,
                                at::Tensor& kc, at::Tensor& vc, at::Tensor& ks, at::Tensor& vs,
                                const at::Tensor& bt, const at::Tensor& ctx, at::Tensor& out, double scale,
                                bool heads_inner, const c10::optional<at::Tensor>& q8,
                                const c10::optional<at::Tensor>& s8, bool power2, bool cluster);

namespace {

void same_device(const torch::Tensor& t, const torch::Tensor& q, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), "r1mega_attn_cuda: ", name,
              " must be on q's device ", q.device(), ", got ", t.device());
}

bool aligned16(const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// q (B, Hq, D) bf16/fp16, unit stride on D; k/v caches (N, bs, Hkv, D) float8_e4m3fn sharing one
// layout, unit stride on D, the other strides multiples of 16 bytes; k/v scales (N, bs, Hkv)
// float32 sharing one layout, unit stride on heads; block tables (B, *) int32 or int64 with unit
// stride on blocks (any row stride: the graph step's rows are slices of one packed buffer);
// context lengths (B,) int32, each >= 1; out like q. D in {64, 128, 256}, Hq / Hkv <= 8 and a
// whole number, bs a multiple of 16. With q8 and s8 (tensor cores only), out's rows are also
// quantised for the output projection (csrc/paged_decode_rows.cuh), one CTA a sequence: q8
// (>= B, Hq * D) float8_e4m3fn with unit column stride, s8 (>= B) contiguous float32; Hkv 1, 2
// or 4 and Hkv * D <= 512. seq_cta (tensor cores only, the same Hkv and D limits): one CTA a
// sequence without the epilogue, the same bits as one CTA a KV head. warps_per_head (tensor cores,
// one CTA a KV head): 4, 2 or 1 warps split a head's chunks. tiles (with q8 and s8, one CTA a KV
// head of 4 warps, D 128): each head's outputs quantised as one 1 x 128 tile, s8 (>= B, Hq)
// float32 with unit column stride. cluster (with q8 and s8, not tiles; one CTA a KV head of 4
// warps, D 128, Hkv <= 8, sm_90+): the rows as above, a sequence's CTAs one thread-block cluster.
void check_args(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                const torch::Tensor& ks, const torch::Tensor& vs, const torch::Tensor& bt,
                const torch::Tensor& ctx, const torch::Tensor& out, bool tensor_cores, bool heads_inner,
                const c10::optional<torch::Tensor>& q8, const c10::optional<torch::Tensor>& s8,
                bool seq_cta, int64_t warps_per_head, bool tiles, bool cluster) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 && q.stride(2) == 1,
              "r1mega_attn_cuda: q must be a (B, Hq, D) CUDA tensor with unit stride on D, got ",
              q.sizes(), " strides ", q.strides());
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "r1mega_attn_cuda: q must be bfloat16 or float16, got ", q.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  TORCH_CHECK(D == 64 || D == 128 || D == 256, "r1mega_attn_cuda: head_dim ", D, " not in {64, 128, 256}");
  for (auto* t : {&kc, &vc}) {
    same_device(*t, q, "a cache");
    TORCH_CHECK(t->scalar_type() == at::ScalarType::Float8_e4m3fn && t->dim() == 4 &&
                    t->size(3) == D && t->stride(3) == 1,
                "r1mega_attn_cuda: the caches must be (N, bs, Hkv, ", D,
                ") float8_e4m3fn with unit stride on D, got ", t->scalar_type(), " ", t->sizes());
    TORCH_CHECK(aligned16(*t) && t->stride(0) % 16 == 0 && t->stride(1) % 16 == 0 &&
                    t->stride(2) % 16 == 0,
                "r1mega_attn_cuda: the caches' data and strides must be 16-byte multiples, got ",
                t->strides());
  }
  TORCH_CHECK(vc.sizes() == kc.sizes() && vc.strides() == kc.strides(),
              "r1mega_attn_cuda: k and v caches must share one shape and layout");
  const int64_t bs = kc.size(1), Hkv = kc.size(2);
  TORCH_CHECK(bs % 16 == 0, "r1mega_attn_cuda: ", bs, "-token cache blocks; the kernel takes multiples of 16");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && Hq / Hkv <= 8,
              "r1mega_attn_cuda: ", Hq, " query heads over ", Hkv, " KV heads: the group must be a whole number <= 8");
  for (auto* t : {&ks, &vs}) {
    same_device(*t, q, "a scale");
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(0) == kc.size(0) &&
                    t->size(1) == bs && t->size(2) == Hkv && t->stride(2) == 1,
                "r1mega_attn_cuda: the scales must be float32 (", kc.size(0), ", ", bs, ", ", Hkv,
                ") with unit stride on heads, got ", t->scalar_type(), " ", t->sizes());
  }
  TORCH_CHECK(vs.strides() == ks.strides(), "r1mega_attn_cuda: k and v scales must share one layout");
  same_device(bt, q, "block_tables");
  same_device(ctx, q, "ctx_lens");
  TORCH_CHECK((bt.scalar_type() == at::kInt || bt.scalar_type() == at::kLong) && bt.dim() == 2 &&
                  bt.size(0) == B && bt.stride(1) == 1,
              "r1mega_attn_cuda: block_tables must be int32 or int64 (", B,
              ", *) with unit stride on blocks, got ", bt.scalar_type(), " ", bt.sizes(), " strides ",
              bt.strides());
  TORCH_CHECK(ctx.scalar_type() == at::kInt && ctx.dim() == 1 && ctx.size(0) == B && ctx.stride(0) == 1,
              "r1mega_attn_cuda: ctx_lens must be contiguous int32 (", B, "), got ", ctx.scalar_type(),
              " ", ctx.sizes());
  same_device(out, q, "out");
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && out.sizes() == q.sizes() && out.stride(2) == 1,
              "r1mega_attn_cuda: out must be like q, got ", out.scalar_type(), " ", out.sizes());
  TORCH_CHECK(heads_inner ? B <= 65535 : B <= 2147483647 && Hkv <= 65535, "r1mega_attn_cuda: grid of ",
              B, " sequences x ", Hkv, " KV heads too large", heads_inner ? " with heads inner (B <= 65535)" : "");
  TORCH_CHECK(q8.has_value() == s8.has_value(), "r1mega_attn_cuda: q8 and s8 go together");
  TORCH_CHECK(!tiles || (q8.has_value() && tensor_cores && !seq_cta && warps_per_head == 4 && D == 128),
              "r1mega_attn_cuda: tiles (one scale a head's outputs) needs q8 and s8, the tensor-core "
              "kernel with one CTA a KV head of 4 warps, and head_dim 128; got q8 ", q8.has_value(),
              ", tensor_cores ", tensor_cores, ", seq_cta ", seq_cta, ", warps_per_head ",
              warps_per_head, ", head_dim ", D);
  if (cluster) {
    TORCH_CHECK(q8.has_value() && !tiles && tensor_cores && !seq_cta && warps_per_head == 4 && D == 128,
                "r1mega_attn_cuda: cluster (one scale a row through a cluster of a sequence's KV heads) "
                "needs q8 and s8 without tiles, the tensor-core kernel with one CTA a KV head of 4 "
                "warps, and head_dim 128; got q8 ", q8.has_value(), ", tiles ", tiles, ", tensor_cores ",
                tensor_cores, ", seq_cta ", seq_cta, ", warps_per_head ", warps_per_head, ", head_dim ", D);
    TORCH_CHECK(Hkv <= 8, "r1mega_attn_cuda: cluster takes at most 8 KV heads (a portable cluster), got ", Hkv);
    const int major = at::cuda::getDeviceProperties(q.get_device())->major;
    TORCH_CHECK(major >= 9, "r1mega_attn_cuda: cluster needs thread-block clusters (sm_90+), the device is sm_",
                major, "x");
  }
  if ((q8.has_value() && !tiles && !cluster) || seq_cta) {
    TORCH_CHECK(tensor_cores, "r1mega_attn_cuda: one CTA a sequence (q8, seq_cta) is the tensor-core kernel's");
    TORCH_CHECK((Hkv == 1 || Hkv == 2 || Hkv == 4) && Hkv * D <= 512,
                "r1mega_attn_cuda: one CTA a sequence (q8, seq_cta) takes 1, 2 or 4 KV heads with "
                "head_dim * heads <= 512, got ", Hkv, " x ", D);
  }
  TORCH_CHECK(warps_per_head == 4 || warps_per_head == 2 || warps_per_head == 1,
              "r1mega_attn_cuda: warps_per_head must be 4, 2 or 1, got ", warps_per_head);
  TORCH_CHECK(warps_per_head == 4 || (tensor_cores && !q8.has_value() && !seq_cta),
              "r1mega_attn_cuda: warps_per_head ", warps_per_head,
              " is the tensor-core kernel's with one CTA a KV head (not with q8 or seq_cta)");
  if (q8.has_value()) {
    same_device(*q8, q, "q8");
    same_device(*s8, q, "s8");
    TORCH_CHECK(q8->scalar_type() == at::ScalarType::Float8_e4m3fn && q8->dim() == 2 && q8->size(0) >= B &&
                    q8->size(1) == Hq * D && q8->stride(1) == 1,
                "r1mega_attn_cuda: q8 must be float8_e4m3fn (>= ", B, ", ", Hq * D,
                ") with unit column stride, got ", q8->scalar_type(), " ", q8->sizes());
    if (tiles) {
      TORCH_CHECK(s8->scalar_type() == at::kFloat && s8->dim() == 2 && s8->size(0) >= B &&
                      s8->size(1) == Hq && s8->stride(1) == 1,
                  "r1mega_attn_cuda: with tiles, s8 must be float32 (>= ", B, ", ", Hq,
                  ") with unit column stride, got ", s8->scalar_type(), " ", s8->sizes());
    } else {
      TORCH_CHECK(s8->scalar_type() == at::kFloat && s8->is_contiguous() && s8->numel() >= B,
                  "r1mega_attn_cuda: s8 must be contiguous float32 with >= ", B, " elements, got ",
                  s8->scalar_type(), " ", s8->sizes());
    }
  }
}

void paged_decode_fp8(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                      const torch::Tensor& ks, const torch::Tensor& vs, const torch::Tensor& bt,
                      const torch::Tensor& ctx, torch::Tensor out, double scale, bool tensor_cores,
                      bool heads_inner, c10::optional<torch::Tensor> q8, c10::optional<torch::Tensor> s8,
                      bool power2, bool seq_cta, int64_t warps_per_head, bool tiles, bool cluster) {
  check_args(q, kc, vc, ks, vs, bt, ctx, out, tensor_cores, heads_inner, q8, s8, seq_cta, warps_per_head, tiles,
             cluster);
  if (q.size(0) == 0) return;
  paged_decode_fp8_cuda(q, kc, vc, ks, vs, bt, ctx, out, scale, tensor_cores, heads_inner, q8, s8, power2, seq_cta,
                        static_cast<int>(warps_per_head), tiles, cluster);
}

// RoPE and the cache write in the kernel (csrc/paged_decode_rope.cuh): qkv (T, Hkv, (G + 2) * D)
// bf16/fp16, linear_qkv's output as triton_rope_kv reads it (each KV head's G q heads, its k, its
// v), unit stride on the last dim; cos, sin (T, D) in qkv's dtype sharing one layout, unit stride
// on D; slots (T,) int64 (any stride), flat cache slots (block * bs + offset) where the new k and v
// rows go; row_scale (T,) contiguous float32 or none: qkv's rows still to be scaled. The caches
// and scales are written at the slots (as kv_cache.write_slots does) and read as in
// paged_decode_fp8; out (T, G * Hkv, D) like qkv. The tensor-core kernel, one CTA a KV head of 4
// warps; with q8 and s8, the cluster rows epilogue (cluster must be true: D 128, Hkv <= 8, sm_90+).
void paged_decode_fp8_rope(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                           const torch::Tensor& slots, c10::optional<torch::Tensor> row_scale, torch::Tensor kc,
                           torch::Tensor vc, torch::Tensor ks, torch::Tensor vs, const torch::Tensor& bt,
                           const torch::Tensor& ctx, torch::Tensor out, double scale, bool heads_inner,
                           c10::optional<torch::Tensor> q8, c10::optional<torch::Tensor> s8, bool power2,
                           bool cluster) {
  TORCH_CHECK(qkv.is_cuda() && qkv.dim() == 3 && qkv.stride(2) == 1,
              "r1mega_attn_cuda: qkv must be a (T, Hkv, (G + 2) * D) CUDA tensor with unit stride on the "
              "last dim, got ", qkv.sizes(), " strides ", qkv.strides());
  TORCH_CHECK(out.is_cuda() && out.dim() == 3 && out.scalar_type() == qkv.scalar_type(),
              "r1mega_attn_cuda: out must be a (T, Hq, D) CUDA tensor of qkv's dtype ", qkv.scalar_type(),
              ", got ", out.scalar_type(), " ", out.sizes());
  const int64_t T = qkv.size(0), Hkv = kc.size(2), D = out.size(2);
  TORCH_CHECK(qkv.size(1) == Hkv && out.size(0) == T && Hkv > 0 && out.size(1) % Hkv == 0 &&
                  qkv.size(2) == (out.size(1) / Hkv + 2) * D,
              "r1mega_attn_cuda: qkv ", qkv.sizes(), " must be (T, Hkv=", Hkv, ", (G + 2) * D) for out ",
              out.sizes(), " (T, G * Hkv, D)");
  check_args(out, kc, vc, ks, vs, bt, ctx, out, true, heads_inner, q8, s8, false, 4, false, cluster);
  TORCH_CHECK(!q8.has_value() || cluster,
              "r1mega_attn_cuda: with RoPE, o_proj's rows come from the cluster epilogue only (cluster=true)");
  for (auto* t : {&cos, &sin}) {
    same_device(*t, qkv, "cos/sin");
    TORCH_CHECK(t->scalar_type() == qkv.scalar_type() && t->dim() == 2 && t->size(0) == T && t->size(1) == D &&
                    t->stride(1) == 1,
                "r1mega_attn_cuda: cos and sin must be (", T, ", ", D, ") ", qkv.scalar_type(),
                " with unit stride on D, got ", t->scalar_type(), " ", t->sizes());
  }
  TORCH_CHECK(sin.strides() == cos.strides(), "r1mega_attn_cuda: cos and sin must share one layout");
  // a lane reads four neighbouring elements of each at once
  auto aligned8 = [](const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 8 == 0; };
  TORCH_CHECK(aligned8(qkv) && qkv.stride(0) % 4 == 0 && qkv.stride(1) % 4 == 0 && aligned8(cos) &&
                  aligned8(sin) && cos.stride(0) % 4 == 0,
              "r1mega_attn_cuda: qkv, cos and sin must start on 8 bytes with strides of multiples of 4 "
              "elements, got qkv strides ", qkv.strides(), ", cos strides ", cos.strides());
  same_device(slots, qkv, "slots");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == T,
              "r1mega_attn_cuda: slots must be int64 (", T, "), got ", slots.scalar_type(), " ", slots.sizes());
  if (row_scale.has_value()) {
    same_device(*row_scale, qkv, "row_scale");
    TORCH_CHECK(row_scale->scalar_type() == at::kFloat && row_scale->dim() == 1 && row_scale->size(0) == T &&
                    row_scale->stride(0) == 1,
                "r1mega_attn_cuda: row_scale must be contiguous float32 (", T, "), got ",
                row_scale->scalar_type(), " ", row_scale->sizes());
  }
  if (T == 0) return;
  paged_decode_fp8_rope_cuda(qkv, cos, sin, slots, row_scale, kc, vc, ks, vs, bt, ctx, out, scale, heads_inner, q8,
                             s8, power2, cluster);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_fp8", &paged_decode_fp8,
        "decode attention of q (B, Hq, D) over an FP8 paged KV cache with per-(token, head) scales",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("k_scale"), py::arg("v_scale"),
        py::arg("block_tables"), py::arg("ctx_lens"), py::arg("out"), py::arg("scale"),
        py::arg("tensor_cores") = false, py::arg("heads_inner") = false, py::arg("q8") = py::none(),
        py::arg("s8") = py::none(), py::arg("power2") = true, py::arg("seq_cta") = false,
        py::arg("warps_per_head") = 4, py::arg("tiles") = false, py::arg("cluster") = false);
  m.def("paged_decode_fp8_rope", &paged_decode_fp8_rope,
        "RoPE on linear_qkv's output, the new K/V rows written to the FP8 paged cache, and decode attention, "
        "in one kernel",
        py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("slots"), py::arg("row_scale"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("k_scale"), py::arg("v_scale"), py::arg("block_tables"),
        py::arg("ctx_lens"), py::arg("out"), py::arg("scale"), py::arg("heads_inner") = false,
        py::arg("q8") = py::none(), py::arg("s8") = py::none(), py::arg("power2") = true,
        py::arg("cluster") = false);
}
