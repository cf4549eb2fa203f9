// GRPO loss kernels on a vocabulary shard of the logits, (T, Vl), row stride arbitrary, unit column
// stride. All arithmetic is float32 in the log2 domain (x2 = logit / temperature * log2 e) so that
// every exponential is one ex2 instruction; results leave in natural-log units.
//
//  shard_stats      one read:  per row [max, sum exp, sum exp*x, target x] -> (T, 4) for the TP combine
//  shard_backward   one read + one write: d loss / d logits from (lse, E_p[x], dL/dlogp, dL/dH)
//  fused_grpo       ONE read + one write for the whole forward + backward without TP: the row is
//                   held in registers across a thread-block cluster (Hopper, sm_90), the cluster
//                   exchanges its partial statistics through distributed shared memory, computes
//                   the GRPO token loss gradient and writes d loss / d logits before it exits.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <cmath>

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Storage types as raw bits: unions of them with uint4 stay trivially copyable.
struct F32 {
  using raw = unsigned int;
  static __device__ __forceinline__ float load(raw r) { return __uint_as_float(r); }
  static __device__ __forceinline__ raw store(float v) { return __float_as_uint(v); }
};
struct BF16 {
  using raw = unsigned short;
  static __device__ __forceinline__ float load(raw r) { return __uint_as_float(((unsigned int)r) << 16); }
  static __device__ __forceinline__ raw store(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};
struct F16 {
  using raw = unsigned short;
  static __device__ __forceinline__ float load(raw r) { return __half2float(__ushort_as_half(r)); }
  static __device__ __forceinline__ raw store(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

template <class D, int VEC>
union Pack {
  uint4 u;  // used only when VEC * sizeof(raw) == 16
  typename D::raw h[VEC];
};

// VEC elements at p (16-byte aligned when VEC > 1), streamed: each logit is read once per pass.
template <class D, int VEC>
__device__ __forceinline__ void load_vec(const typename D::raw* p, float (&x)[VEC]) {
  Pack<D, VEC> r;
  if constexpr (VEC * sizeof(typename D::raw) == 16) {
    r.u = __ldcs(reinterpret_cast<const uint4*>(p));
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) r.h[j] = p[j];
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) x[j] = D::load(r.h[j]);
}

template <class D, int VEC>
__device__ __forceinline__ void store_vec(typename D::raw* p, const float (&x)[VEC]) {
  Pack<D, VEC> r;
#pragma unroll
  for (int j = 0; j < VEC; ++j) r.h[j] = D::store(x[j]);
  if constexpr (VEC * sizeof(typename D::raw) == 16) {
    __stcs(reinterpret_cast<uint4*>(p), r.u);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) p[j] = r.h[j];
  }
}

// (m, s, e) += (m2, s2, e2): sums of 2^(x - m) and 2^(x - m) * x rescaled to the larger max.
__device__ __forceinline__ void merge_stats(float& m, float& s, float& e, float m2, float s2, float e2) {
  const float mm = fmaxf(m, m2);
  if (mm == -INFINITY) return;  // both empty: keep (-inf, 0, 0) rather than NaN
  const float a = exp2f(m - mm), b = exp2f(m2 - mm);
  s = s * a + s2 * b;
  e = e * a + e2 * b;
  m = mm;
}

template <int THREADS>
__device__ __forceinline__ void block_merge_stats(float& m, float& s, float& e, float* sh) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
    const float e2 = __shfl_xor_sync(0xffffffffu, e, off);
    merge_stats(m, s, e, m2, s2, e2);
  }
  constexpr int W = THREADS / 32;
  const int warp = threadIdx.x / 32;
  if ((threadIdx.x & 31) == 0) { sh[warp] = m; sh[W + warp] = s; sh[2 * W + warp] = e; }
  __syncthreads();
  m = -INFINITY; s = 0.f; e = 0.f;
#pragma unroll
  for (int i = 0; i < W; ++i) merge_stats(m, s, e, sh[i], sh[W + i], sh[2 * W + i]);
  __syncthreads();  // sh is reused by the caller
}

template <int THREADS>
__device__ __forceinline__ float block_max(float v, float* sh) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x / 32] = v;
  __syncthreads();
  v = -INFINITY;
#pragma unroll
  for (int i = 0; i < THREADS / 32; ++i) v = fmaxf(v, sh[i]);
  __syncthreads();
  return v;
}

template <int THREADS>
__device__ __forceinline__ void block_sum2(float& a, float& b, float* sh) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, off);
    b += __shfl_xor_sync(0xffffffffu, b, off);
  }
  constexpr int W = THREADS / 32;
  if ((threadIdx.x & 31) == 0) { sh[threadIdx.x / 32] = a; sh[W + threadIdx.x / 32] = b; }
  __syncthreads();
  a = 0.f; b = 0.f;
#pragma unroll
  for (int i = 0; i < W; ++i) { a += sh[i]; b += sh[W + i]; }
  __syncthreads();
}

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

// ------------------------------------------------------------------------------------------------
// The fused single-pass kernel (tp = 1). One cluster of `csize` CTAs per token row.
// ------------------------------------------------------------------------------------------------
struct LossParams {
  float clip_lo, clip_hi, dual_clip, kl_beta, tis_cap;
  int kl_code;  // 1 = k1, 2 = k2, 3 = k3
};

// d (weight * loss_t) / d logp: the derivative of r1mega.ops.grpo_loss.grpo_token_loss.
__device__ __forceinline__ float grpo_token_grad(float logp, float adv, float old, const float* ref,
                                                 const float* roll, int64_t row, float w,
                                                 const LossParams& P) {
  const float r = expf(logp - old);
  const float s1 = r * adv;
  const float s2 = fminf(fmaxf(r, P.clip_lo), P.clip_hi) * adv;
  const bool unclipped = s1 <= s2;
  const float pg = unclipped ? -s1 : -s2;
  float g = unclipped ? -adv * r : 0.f;  // the clipped branch is constant in logp
  if (P.dual_clip > 0.f && adv < 0.f && !(pg <= -P.dual_clip * adv)) g = 0.f;
  if (P.tis_cap > 0.f) g *= fminf(expf(old - roll[row]), P.tis_cap);
  if (P.kl_beta != 0.f) {
    const float d = ref[row] - logp;
    const float gk = P.kl_code == 1 ? 1.f : (P.kl_code == 2 ? -d : 1.f - expf(d));
    g += P.kl_beta * gk;
  }
  return w * g;
}

template <class D, int VPT, int THREADS>
__global__ void __launch_bounds__(THREADS, 2) fused_grpo_kernel(
    const typename D::raw* logits, typename D::raw* grad, int64_t stride_in, int64_t stride_out,
    int cols, int valid_cols, int vec_per_cta, const int64_t* __restrict__ targets,
    const float* __restrict__ adv, const float* __restrict__ old_logp, const float* __restrict__ ref_logp,
    const float* __restrict__ rollout_logp, const float* __restrict__ weight, float scale2,
    float inv_temp, LossParams P, float* __restrict__ out_logp, float* __restrict__ out_ent) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  constexpr int VEC = 16 / sizeof(typename D::raw);
  __shared__ float sh[2 * THREADS / 32];
  __shared__ float4 cstat;  // this CTA's partial statistics, read by every CTA of the cluster
  const unsigned csize = __clusterSizeInBlocks();
  const unsigned crank = __clusterRelativeBlockRank();
  const int64_t row = blockIdx.x / csize;
  const float w = weight[row];
  const int nvec = cols / VEC;
  const int v0 = (int)crank * vec_per_cta;
  const int v1 = min(v0 + vec_per_cta, nvec);
  const typename D::raw* p = logits + row * stride_in;
  typename D::raw* q = grad + row * stride_out;

  if (w == 0.f) {  // masked token: its gradient is 0, so skip reading it (uniform over the cluster)
    const float z[VEC] = {};
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int vi = v0 + threadIdx.x + k * THREADS;
      if (vi < v1) store_vec<D, VEC>(q + (int64_t)vi * VEC, z);
    }
    if (crank == 0 && threadIdx.x == 0) { out_logp[row] = 0.f; out_ent[row] = 0.f; }
    return;
  }

  uint4 v[VPT];  // the row slice lives in registers between the statistics and the gradient
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int vi = v0 + threadIdx.x + k * THREADS;
    v[k] = vi < v1 ? __ldcs(reinterpret_cast<const uint4*>(p + (int64_t)vi * VEC)) : make_uint4(0, 0, 0, 0);
  }
  float m = -INFINITY;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int vi = v0 + threadIdx.x + k * THREADS;
    Pack<D, VEC> r; r.u = v[k];
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if (vi < v1 && vi * VEC + j < valid_cols) m = fmaxf(m, D::load(r.h[j]) * scale2);
  }
  m = block_max<THREADS>(m, sh);
  float s = 0.f, e = 0.f;
  if (m != -INFINITY) {
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int vi = v0 + threadIdx.x + k * THREADS;
      Pack<D, VEC> r; r.u = v[k];
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        if (vi < v1 && vi * VEC + j < valid_cols) {
          const float x2 = D::load(r.h[j]) * scale2;
          const float t = exp2f(x2 - m);
          s += t;
          e = fmaf(t, x2, e);
        }
    }
  }
  block_sum2<THREADS>(s, e, sh);
  const int64_t tl = targets[row];
  if (threadIdx.x == 0) {
    const bool owned = tl >= (int64_t)v0 * VEC && tl < (int64_t)v1 * VEC && tl < valid_cols;
    cstat = make_float4(m, s, e, owned ? D::load(p[tl]) * scale2 : 0.f);
  }
  __cluster_barrier_arrive();  // release: cstat visible cluster-wide after the wait
  __cluster_barrier_wait();
  float mm = -INFINITY, ss = 0.f, ee = 0.f, tx = 0.f;
  for (unsigned r = 0; r < csize; ++r) {
    const float4 st = *reinterpret_cast<const float4*>(__cluster_map_shared_rank(&cstat, r));
    merge_stats(mm, ss, ee, st.x, st.y, st.z);
    tx += st.w;
  }
  __cluster_barrier_arrive();  // done reading the peers' cstat; they may exit after our wait below
  const float lse2 = mm + log2f(ss);
  const float logp = (tx - lse2) * kLn2;
  const float g = grpo_token_grad(logp, adv[row], old_logp[row], ref_logp, rollout_logp, row, w, P);
  const float coef = g * inv_temp;
  if (crank == 0 && threadIdx.x == 0) {
    out_logp[row] = logp;
    out_ent[row] = (lse2 - ee / ss) * kLn2;
  }
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int vi = v0 + threadIdx.x + k * THREADS;
    if (vi >= v1) continue;
    Pack<D, VEC> r; r.u = v[k];
    float d[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int col = vi * VEC + j;
      d[j] = 0.f;
      if (col < valid_cols) {
        d[j] = -coef * exp2f(D::load(r.h[j]) * scale2 - lse2);
        if (col == tl) d[j] += coef;
      }
    }
    store_vec<D, VEC>(q + (int64_t)vi * VEC, d);
  }
  __cluster_barrier_wait();  // no CTA leaves while a peer may still read its shared memory
#endif
}

constexpr int kThreads = 512;
constexpr int kUnroll = 4;
constexpr int kFusedThreads = 512;
constexpr int kFusedVpt = 8;       // 16-byte vectors per thread kept in registers
constexpr int kMaxCluster = 8;     // the portable cluster size

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

// Cluster size the fused kernel needs for these logits, or 0 when it cannot run (pre-Hopper GPU,
// unaligned rows, a row too long for 8 CTAs' registers, no rows).
int64_t fused_cluster_size(const torch::Tensor& logits) {
  if (!logits.is_cuda() || logits.dim() != 2 || logits.size(0) == 0 || logits.stride(1) != 1) return 0;
  const auto st = logits.scalar_type();
  if (st != at::kBFloat16 && st != at::kHalf && st != at::kFloat) return 0;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, logits.get_device()));
  if (major < 9) return 0;
  const int64_t es = logits.element_size(), cols = logits.size(1);
  if (!aligned16(logits.data_ptr(), logits.stride(0), cols, es)) return 0;
  const int64_t nvec = cols * es / 16;
  const int64_t per_cta = (int64_t)kFusedThreads * kFusedVpt;
  const int64_t csize = (nvec + per_cta - 1) / per_cta;
  return (csize >= 1 && csize <= kMaxCluster) ? csize : 0;
}

std::vector<torch::Tensor> fused_grpo_cuda(
    const torch::Tensor& logits, torch::Tensor& grad, const torch::Tensor& targets,
    const torch::Tensor& adv, const torch::Tensor& old_logp, const c10::optional<torch::Tensor>& ref_logp,
    const c10::optional<torch::Tensor>& rollout_logp, const torch::Tensor& weight, int64_t valid_cols,
    double inv_temp, double clip_lo, double clip_hi, double dual_clip, double kl_beta, int64_t kl_code,
    double tis_cap) {
  const int64_t rows = logits.size(0), cols = logits.size(1);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t csize = fused_cluster_size(logits);
  TORCH_CHECK(csize > 0, "r1mega_grpo_cuda.fused_grpo: these logits cannot use the fused kernel "
              "(check fused_supported() first)");
  TORCH_CHECK(grad.stride(1) == 1 && aligned16(grad.data_ptr(), grad.stride(0), cols, grad.element_size()),
              "fused_grpo: grad buffer must be 16-byte aligned with unit column stride");
  auto out_logp = torch::empty({rows}, logits.options().dtype(torch::kFloat32));
  auto out_ent = torch::empty({rows}, logits.options().dtype(torch::kFloat32));
  const int64_t nvec = cols * logits.element_size() / 16;
  const int vec_per_cta = (int)((nvec + csize - 1) / csize);
  LossParams P{(float)clip_lo, (float)clip_hi, (float)dual_clip, (float)kl_beta, (float)tis_cap, (int)kl_code};
  const float* ref = ref_logp.has_value() ? ref_logp->data_ptr<float>() : nullptr;
  const float* roll = rollout_logp.has_value() ? rollout_logp->data_ptr<float>() : nullptr;
  TORCH_CHECK(kl_beta == 0.0 || ref != nullptr, "fused_grpo: kl_beta != 0 needs ref_logp");
  TORCH_CHECK(tis_cap == 0.0 || roll != nullptr, "fused_grpo: tis_cap > 0 needs rollout_logp");
  const float scale2 = (float)inv_temp * kLog2e;
  dispatch(logits.scalar_type(), [&](auto d) {
    using D = decltype(d);
    auto kernel = fused_grpo_kernel<D, kFusedVpt, kFusedThreads>;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3((unsigned)(rows * csize));
    config.blockDim = dim3(kFusedThreads);
    config.dynamicSmemBytes = 0;
    config.stream = c10::cuda::getCurrentCUDAStream();
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = (unsigned)csize;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    config.attrs = attr;
    config.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(
        &config, kernel, reinterpret_cast<const typename D::raw*>(logits.data_ptr()),
        reinterpret_cast<typename D::raw*>(grad.data_ptr()), (int64_t)logits.stride(0),
        (int64_t)grad.stride(0), (int)cols, (int)valid_cols, vec_per_cta,
        (const int64_t*)targets.data_ptr<int64_t>(), (const float*)adv.data_ptr<float>(),
        (const float*)old_logp.data_ptr<float>(), ref, roll, (const float*)weight.data_ptr<float>(),
        scale2, (float)inv_temp, P, out_logp.data_ptr<float>(), out_ent.data_ptr<float>()));
  });
  return {out_logp, out_ent};
}
