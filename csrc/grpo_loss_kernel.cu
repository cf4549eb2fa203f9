// GRPO loss kernels on a vocabulary shard of the logits, (T, Vl), row stride arbitrary, unit column
// stride, and their host launchers. All arithmetic is float32 in the log2 domain; results leave in
// natural-log units.
//
//  shard_stats      one read:  per row [max, sum exp, sum exp*x, target x] -> (T, 4) for the TP combine
//  shard_backward   one read + one write: d loss / d logits from (lse, E_p[x], dL/dlogp, dL/dH)
//  fused_grpo       one read + one write for forward AND backward without TP (grpo_fused.cuh)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cstdlib>


#include "grpo_fused.cuh"

namespace {
using namespace r1mega_grpo;

// ------------------------------------------------------------------------------------------------
// Pass 1 of the two-pass path: per-row statistics of this shard.
// ------------------------------------------------------------------------------------------------
template <class D, int VEC, int THREADS, int UNROLL>
__global__ void __launch_bounds__(THREADS) shard_stats_kernel(
    const typename D::raw* __restrict__ logits, int64_t stride, const int64_t* __restrict__ targets,
    int64_t vocab_start, int valid_cols, float scale2, float4* __restrict__ out) {
  __shared__ float sh[3 * THREADS / 32];
  const int64_t row = blockIdx.x;
  const typename D::raw* p = logits + row * stride;
  const int nvec = (valid_cols + VEC - 1) / VEC;
  float m = -INFINITY, s = 0.f, e = 0.f;
  for (int base = threadIdx.x; base < nvec; base += THREADS * UNROLL) {
    float x[UNROLL][VEC];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {  // all loads first: UNROLL independent requests in flight
      const int vi = base + u * THREADS;
      if (vi < nvec) load_vec<D, VEC>(p + (int64_t)vi * VEC, x[u]);
    }
    float bm = -INFINITY;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int vi = base + u * THREADS;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const bool ok = vi < nvec && vi * VEC + j < valid_cols;  // padded vocabulary columns: -inf
        x[u][j] = ok ? x[u][j] * scale2 : -INFINITY;
        bm = fmaxf(bm, x[u][j]);
      }
    }
    if (bm > m) {  // online rescale, once per UNROLL*VEC elements
      const float f = exp2f(m - bm);
      s *= f; e *= f; m = bm;
    }
    if (m != -INFINITY) {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u)
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          if (x[u][j] != -INFINITY) {
            const float t = exp2f(x[u][j] - m);
            s += t;
            e = fmaf(t, x[u][j], e);
          }
    }
  }
  block_merge_stats<THREADS>(m, s, e, sh);
  if (threadIdx.x == 0) {
    const int64_t tl = targets[row] - vocab_start;
    const float tx = (tl >= 0 && tl < valid_cols) ? D::load(p[tl]) * scale2 : 0.f;
    out[row] = make_float4(m * kLn2, s, e * kLn2, tx * kLn2);
  }
}

// ------------------------------------------------------------------------------------------------
// Pass 2 of the two-pass path: d loss / d logits. grad may alias logits (each element is read by
// the thread that later writes it).
// ------------------------------------------------------------------------------------------------
template <class D, int VEC, int THREADS, int UNROLL>
__global__ void __launch_bounds__(THREADS) shard_backward_kernel(
    const typename D::raw* logits, typename D::raw* grad, int64_t stride_in, int64_t stride_out,
    const int64_t* __restrict__ targets, int64_t vocab_start, int valid_cols, int cols, float scale2,
    float inv_temp, const float* __restrict__ lse, const float* __restrict__ mean_x,
    const float* __restrict__ g_logp, const float* __restrict__ g_ent) {
  const int64_t row = blockIdx.x;
  const typename D::raw* p = logits + row * stride_in;
  typename D::raw* q = grad + row * stride_out;
  const float gl = g_logp[row];
  const float ge = g_ent != nullptr ? g_ent[row] : 0.f;
  const float lse2 = lse[row] * kLog2e, mx2 = mean_x[row] * kLog2e;
  const int64_t tl = targets[row] - vocab_start;
  const int nvec = cols / VEC;
  for (int base = threadIdx.x; base < nvec; base += THREADS * UNROLL) {
    float x[UNROLL][VEC];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int vi = base + u * THREADS;
      if (vi < nvec && vi * VEC < valid_cols) load_vec<D, VEC>(p + (int64_t)vi * VEC, x[u]);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int vi = base + u * THREADS;
      if (vi >= nvec) continue;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int col = vi * VEC + j;
        float d = 0.f;
        if (col < valid_cols) {
          const float x2 = x[u][j] * scale2;
          const float pj = exp2f(x2 - lse2);
          d = -gl * pj;
          if (ge != 0.f) d -= ge * pj * (x2 - mx2) * kLn2;
          if (col == tl) d += gl;
          d *= inv_temp;
        }
        x[u][j] = d;
      }
      store_vec<D, VEC>(q + (int64_t)vi * VEC, x[u]);
    }
  }
}


constexpr int kThreads = 512;
constexpr int kUnroll = 4;
// Fused-kernel shapes: (threads per CTA, 16-byte vectors per thread kept in registers, CTAs per SM
// the registers must allow). R1MEGA_GRPO_FUSED_VARIANT=i picks one (the benchmark sweeps them).
struct FusedShape { int threads, vpt, minb; };
constexpr FusedShape kFusedShapes[] = {{512, 8, 2}, {256, 8, 4}, {1024, 4, 1}, {384, 8, 2}, {256, 16, 2}};
constexpr int kNumFusedShapes = sizeof(kFusedShapes) / sizeof(kFusedShapes[0]);
constexpr int kDefaultFusedShape = 0;
constexpr int kMaxCluster = 16;    // Hopper's non-portable maximum (8 is the portable one)

template <int I> struct ShapeTag {
  static constexpr int threads = kFusedShapes[I].threads, vpt = kFusedShapes[I].vpt, minb = kFusedShapes[I].minb;
};

template <class F>
void with_shape(int i, F&& f) {
  switch (i) {
    case 0: f(ShapeTag<0>{}); break;
    case 1: f(ShapeTag<1>{}); break;
    case 2: f(ShapeTag<2>{}); break;
    case 3: f(ShapeTag<3>{}); break;
    case 4: f(ShapeTag<4>{}); break;
    default: TORCH_CHECK(false, "r1mega_grpo_cuda: fused shape ", i, " out of range");
  }
}

int fused_shape_index() {
  const char* env = std::getenv("R1MEGA_GRPO_FUSED_VARIANT");
  if (env == nullptr || *env == 0) return kDefaultFusedShape;
  const int i = std::atoi(env);
  TORCH_CHECK(i >= 0 && i < kNumFusedShapes, "R1MEGA_GRPO_FUSED_VARIANT=", env, " must be in [0, ",
              kNumFusedShapes, ")");
  return i;
}

bool aligned16(const void* ptr, int64_t stride_elems, int64_t cols, int64_t elem) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (stride_elems * elem) % 16 == 0 &&
         (cols * elem) % 16 == 0;
}

template <class F>
void dispatch(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kBFloat16: f(BF16{}); break;
    case at::kHalf: f(F16{}); break;
    case at::kFloat: f(F32{}); break;
    default: TORCH_CHECK(false, "r1mega_grpo_cuda: logits must be bfloat16, float16 or float32, got ", t);
  }
}


}  // namespace

using namespace r1mega_grpo;

torch::Tensor shard_stats_cuda(const torch::Tensor& logits, const torch::Tensor& targets,
                               int64_t vocab_start, int64_t valid_cols, double inv_temp) {
  const int64_t rows = logits.size(0), cols = logits.size(1);
  auto out = torch::empty({rows, 4}, logits.options().dtype(torch::kFloat32));
  if (rows == 0) return out;
  const c10::cuda::CUDAGuard guard(logits.device());
  const float scale2 = (float)inv_temp * kLog2e;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t es = logits.element_size();
  const bool vec = aligned16(logits.data_ptr(), logits.stride(0), cols, es);
  dispatch(logits.scalar_type(), [&](auto d) {
    using D = decltype(d);
    const auto* p = reinterpret_cast<const typename D::raw*>(logits.data_ptr());
    auto* o = reinterpret_cast<float4*>(out.data_ptr<float>());
    if (vec) {
      constexpr int VEC = 16 / sizeof(typename D::raw);
      shard_stats_kernel<D, VEC, kThreads, kUnroll><<<rows, kThreads, 0, stream>>>(
          p, logits.stride(0), targets.data_ptr<int64_t>(), vocab_start, (int)valid_cols, scale2, o);
    } else {
      shard_stats_kernel<D, 1, kThreads, kUnroll><<<rows, kThreads, 0, stream>>>(
          p, logits.stride(0), targets.data_ptr<int64_t>(), vocab_start, (int)valid_cols, scale2, o);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void shard_backward_cuda(const torch::Tensor& logits, torch::Tensor& grad, const torch::Tensor& targets,
                         const torch::Tensor& lse, const torch::Tensor& mean_x, const torch::Tensor& g_logp,
                         const c10::optional<torch::Tensor>& g_ent, int64_t vocab_start,
                         int64_t valid_cols, double inv_temp) {
  const int64_t rows = logits.size(0), cols = logits.size(1);
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  const float scale2 = (float)inv_temp * kLog2e;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t es = logits.element_size();
  const bool vec = aligned16(logits.data_ptr(), logits.stride(0), cols, es) &&
                   aligned16(grad.data_ptr(), grad.stride(0), cols, es);
  const float* ge = g_ent.has_value() ? g_ent->data_ptr<float>() : nullptr;
  dispatch(logits.scalar_type(), [&](auto d) {
    using D = decltype(d);
    const auto* p = reinterpret_cast<const typename D::raw*>(logits.data_ptr());
    auto* q = reinterpret_cast<typename D::raw*>(grad.data_ptr());
    if (vec) {
      constexpr int VEC = 16 / sizeof(typename D::raw);
      shard_backward_kernel<D, VEC, kThreads, kUnroll><<<rows, kThreads, 0, stream>>>(
          p, q, logits.stride(0), grad.stride(0), targets.data_ptr<int64_t>(), vocab_start,
          (int)valid_cols, (int)cols, scale2, (float)inv_temp, lse.data_ptr<float>(),
          mean_x.data_ptr<float>(), g_logp.data_ptr<float>(), ge);
    } else {
      shard_backward_kernel<D, 1, kThreads, kUnroll><<<rows, kThreads, 0, stream>>>(
          p, q, logits.stride(0), grad.stride(0), targets.data_ptr<int64_t>(), vocab_start,
          (int)valid_cols, (int)cols, scale2, (float)inv_temp, lse.data_ptr<float>(),
          mean_x.data_ptr<float>(), g_logp.data_ptr<float>(), ge);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------------------------
// Scaling the fused kernel's gradient by the incoming d loss, decided on the device
// ------------------------------------------------------------------------------------------------
// The fused forward already wrote d loss / d logits for d loss = 1, the value almost every caller
// passes. Checking that on the host would stall the CPU until the loss kernel finishes (no more
// launches queued behind it); here every block reads the scalar and leaves at once when it is 1,
// so the usual case costs one tiny launch and the rare one a read + write of the gradient.
template <class D>
__global__ void scale_if_not_one_kernel(typename D::raw* x, int64_t rows, int64_t cols, int64_t stride,
                                        const float* __restrict__ g) {
  const float s = *g;
  if (s == 1.f) return;
  const int64_t n = rows * cols;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / cols;
    typename D::raw* p = x + r * stride + (i - r * cols);
    *p = D::store(D::load(*p) * s);
  }
}

// ------------------------------------------------------------------------------------------------
// Fused kernel planning and launch
// ------------------------------------------------------------------------------------------------
struct FusedPlan {
  int csize = 0;      // CTAs per cluster (0: the fused kernel cannot run on these logits)
  int vpt = 0;        // 16-byte vectors per thread
  int nclusters = 0;  // one per row
  int threads = 0;
  int shape = 0;      // index into kFusedShapes
};

template <typename Kernel, typename... Args>
void launch_cluster(Kernel kernel, unsigned grid, unsigned threads, unsigned csize, size_t smem,
                    Args... args) {
  if (csize > 8) {  // clusters of 9..16 CTAs are Hopper-only and must be asked for per kernel
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = c10::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = csize;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args...));
}

// How the fused kernel would run on these logits; csize == 0 when it cannot (pre-Hopper GPU,
// unaligned rows, a row too long for 8 CTAs' registers, no rows).
FusedPlan plan_fused(const torch::Tensor& logits) {
  FusedPlan plan;
  if (!logits.is_cuda() || logits.dim() != 2 || logits.size(0) == 0 || logits.stride(1) != 1) return plan;
  const auto st = logits.scalar_type();
  if (st != at::kBFloat16 && st != at::kHalf && st != at::kFloat) return plan;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, logits.get_device()));
  if (major < 9) return plan;
  const int64_t es = logits.element_size(), cols = logits.size(1), rows = logits.size(0);
  if (!aligned16(logits.data_ptr(), logits.stride(0), cols, es)) return plan;
  const int64_t nvec = cols * es / 16;
  const int shape = fused_shape_index();
  const FusedShape fs = kFusedShapes[shape];
  const int64_t per_cta = (int64_t)fs.threads * fs.vpt;
  const int64_t csize = (nvec + per_cta - 1) / per_cta;
  if (csize <= kMaxCluster) plan = FusedPlan{(int)csize, fs.vpt, (int)rows, fs.threads, shape};
  return plan;
}

std::vector<int64_t> fused_plan(const torch::Tensor& logits) {
  const FusedPlan p = plan_fused(logits);
  return {p.csize, p.vpt, p.nclusters, p.threads, p.shape};
}

std::vector<torch::Tensor> fused_grpo_cuda(
    const torch::Tensor& logits, torch::Tensor& grad, const torch::Tensor& targets,
    const torch::Tensor& adv, const torch::Tensor& old_logp, const c10::optional<torch::Tensor>& ref_logp,
    const c10::optional<torch::Tensor>& rollout_logp, const torch::Tensor& weight, int64_t valid_cols,
    double inv_temp, double clip_lo, double clip_hi, double dual_clip, double kl_beta, int64_t kl_code,
    double tis_cap, double wscale) {
  const int64_t rows = logits.size(0), cols = logits.size(1);
  const c10::cuda::CUDAGuard guard(logits.device());
  const FusedPlan plan = plan_fused(logits);
  TORCH_CHECK(plan.csize > 0 && plan.nclusters > 0, "r1mega_grpo_cuda.fused_grpo: these logits cannot "
              "use the fused kernel (check fused_supported() first)");
  TORCH_CHECK(grad.stride(1) == 1 && aligned16(grad.data_ptr(), grad.stride(0), cols, grad.element_size()),
              "fused_grpo: grad buffer must be 16-byte aligned with unit column stride");
  auto out_logp = torch::empty({rows}, logits.options().dtype(torch::kFloat32));
  auto out_ent = torch::empty({rows}, logits.options().dtype(torch::kFloat32));
  auto out_stats = torch::empty({rows, (int64_t)kRowStats}, logits.options().dtype(torch::kFloat32));
  const int64_t nvec = cols * logits.element_size() / 16;
  const int vec_per_cta = (int)((nvec + plan.csize - 1) / plan.csize);
  LossParams P{(float)clip_lo, (float)clip_hi, (float)dual_clip, (float)kl_beta, (float)tis_cap, (int)kl_code};
  const float* ref = ref_logp.has_value() ? ref_logp->data_ptr<float>() : nullptr;
  const float* roll = rollout_logp.has_value() ? rollout_logp->data_ptr<float>() : nullptr;
  TORCH_CHECK(kl_beta == 0.0 || ref != nullptr, "fused_grpo: kl_beta != 0 needs ref_logp");
  TORCH_CHECK(tis_cap == 0.0 || roll != nullptr, "fused_grpo: tis_cap > 0 needs rollout_logp");
  const float scale2 = (float)inv_temp * kLog2e;
  const unsigned grid = (unsigned)((int64_t)plan.nclusters * plan.csize);
  dispatch(logits.scalar_type(), [&](auto d) {
    using D = decltype(d);
    using raw = typename D::raw;
    const raw* in = reinterpret_cast<const raw*>(logits.data_ptr());
    raw* out = reinterpret_cast<raw*>(grad.data_ptr());
    const int64_t* tg = targets.data_ptr<int64_t>();
    const float* ad = adv.data_ptr<float>();
    const float* ol = old_logp.data_ptr<float>();
    const float* wt = weight.data_ptr<float>();
    with_shape(plan.shape, [&](auto tag) {
      using S = decltype(tag);
      launch_cluster(fused_grpo_kernel<D, S::vpt, S::threads, S::minb>, grid, S::threads, plan.csize, 0,
                     in, out, (int64_t)logits.stride(0), (int64_t)grad.stride(0), (int)cols,
                     (int)valid_cols, vec_per_cta, tg, ad, ol, ref, roll, wt, (float)wscale, scale2,
                     (float)inv_temp, P, out_logp.data_ptr<float>(), out_ent.data_ptr<float>(),
                     out_stats.data_ptr<float>());
    });
  });
  return {out_logp, out_ent, out_stats};
}

void scale_if_not_one_cuda(torch::Tensor& grad, const torch::Tensor& g) {
  const int64_t rows = grad.size(0), cols = grad.size(1);
  if (rows == 0 || cols == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, grad.get_device()));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(grad.scalar_type(), [&](auto d) {
    using D = decltype(d);
    scale_if_not_one_kernel<D><<<2 * sms, 512, 0, stream>>>(
        reinterpret_cast<typename D::raw*>(grad.data_ptr()), rows, cols, grad.stride(0), g.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
