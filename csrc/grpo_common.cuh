// Device helpers shared by the GRPO loss kernels: storage types, 16-byte vector loads/stores,
// (max, sum exp, sum exp*x) statistics and their block reductions, and the per-token GRPO gradient.
// Everything is float32 in the log2 domain (x2 = logit / temperature * log2 e): one ex2 per exp.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace r1mega_grpo {
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

// Per-row outputs of the fused kernel besides logp/entropy: the weighted loss term and the metric
// contributions, so that the Python side needs one reduction instead of ~40 small kernels.
// Columns (kRowStats floats per row); inactive rows (weight 0) hold zeros and +-inf in the
// min/max columns. Keep in step with r1mega.ops.grpo_loss (ROW_STATS).
enum RowStat {
  kLossW = 0, kActive, kClipLow, kClipHigh, kDual, kApproxKl, kRefKl, kEntropy, kRatio, kRatioMin,
  kRatioMax, kBadTarget, kRowStats
};

// The value side of grpo_token_grad: r1mega.ops.grpo_loss.grpo_token_loss and _metrics for one
// active token, written to st[0..kRowStats).
__device__ __forceinline__ void grpo_row_stats(float logp, float ent, float adv, float old, const float* ref,
                                               const float* roll, int64_t row, float w, bool bad,
                                               const LossParams& P, float* st) {
  const float lr = logp - old;
  const float r = expf(lr);
  const float s1 = r * adv;
  const float s2 = fminf(fmaxf(r, P.clip_lo), P.clip_hi) * adv;
  float pg = s1 <= s2 ? -s1 : -s2;
  bool dual = false;
  if (P.dual_clip > 0.f) {
    const float pg3 = -P.dual_clip * adv;
    dual = adv < 0.f && !(pg <= pg3);
    if (dual) pg = pg3;
  }
  if (P.tis_cap > 0.f) pg *= fminf(expf(old - roll[row]), P.tis_cap);
  float kl = 0.f;
  if (ref != nullptr) {
    const float d = ref[row] - logp;
    kl = P.kl_code == 1 ? -d : (P.kl_code == 2 ? 0.5f * d * d : expf(d) - d - 1.f);
  }
  const float loss = P.kl_beta != 0.f ? pg + P.kl_beta * kl : pg;
  st[kLossW] = w * loss;
  st[kActive] = 1.f;
  st[kClipLow] = (r < P.clip_lo && adv < 0.f) ? 1.f : 0.f;
  st[kClipHigh] = (r > P.clip_hi && adv > 0.f) ? 1.f : 0.f;
  st[kDual] = dual ? 1.f : 0.f;
  st[kApproxKl] = expf(lr) - 1.f - lr;
  st[kRefKl] = kl;
  st[kEntropy] = ent;
  st[kRatio] = r;
  st[kRatioMin] = r;
  st[kRatioMax] = r;
  st[kBadTarget] = bad ? 1.f : 0.f;
}

}  // namespace r1mega_grpo
