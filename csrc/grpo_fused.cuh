// The fused single-pass GRPO kernel (no tensor parallelism): ONE read of the logits and one write
// of their gradient for the whole forward + backward. A token row is split over a thread-block
// cluster (Hopper, sm_90), one cluster per row; each CTA keeps its slice in registers and reduces it
// to (max, sum exp, sum exp*x), the cluster exchanges those through distributed shared memory, every
// CTA computes the same lse, log-prob and GRPO token gradient, and writes d loss / d logits for its
// slice from the registers.
//
// The kernel is memory-bound only if its arithmetic hides under the loads and stores, so the work
// per logit is kept small, with ONE exp2:
//  * the max runs on packed 16-bit pairs (one HMNMX2 per two logits, exact);
//  * each thread exponentiates against its OWN max, and overwrites the logit in its registers
//    with t = 2^(x*s - m_thread) (bf16 for 16-bit logits, f32 for f32 logits), so the gradient
//    pass needs one multiply, p = t * 2^(m_thread - lse), instead of a second exp2;
//  * padding and target-column checks are per 16-byte vector, not per logit.
// Rounding t to bf16 adds at most 2^-9 relative error to a gradient that is itself stored in bf16.
// The previous kernel (a second exp2 per logit, per-logit checks) took 4.7 ms at 16,384 x 152,064;
// see git history (commit 0a4fdcd) for it and for the removed persistent variant (commit 33ce148).
#pragma once
#include "grpo_common.cuh"

namespace r1mega_grpo {

// t storage: bf16 bits for 16-bit logits (same register footprint, no underflow unlike fp16), f32
// for f32 logits.
template <class D> struct TStore { using type = BF16; };
template <> struct TStore<F32> { using type = F32; };

// Packed 16-bit max and f32 -> bf16x2 rounding as explicit PTX (sm_80+): the header intrinsics
// compiled to per-element f32 code with nvcc 13.
__device__ __forceinline__ unsigned max_bf16x2(unsigned a, unsigned b) {
  unsigned d;
  asm("max.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
__device__ __forceinline__ unsigned max_f16x2(unsigned a, unsigned b) {
  unsigned d;
  asm("max.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
  unsigned d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}

// a * b on bf16 pairs with one rounding (fma with -0: exact sign of zero; sm_80+).
__device__ __forceinline__ unsigned mul_bf16x2(unsigned a, unsigned b) {
  unsigned d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
  return d;
}

// The VEC values of one 16-byte vector as floats. bf16 words unpack with one shift or mask each.
template <class D, int VEC>
__device__ __forceinline__ void unpack_vec(const uint4& u, float (&x)[VEC]) {
  if constexpr (std::is_same<D, BF16>::value) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[2 * i] = __uint_as_float(w[i] << 16);
      x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  } else {
    Pack<D, VEC> r; r.u = u;
#pragma unroll
    for (int j = 0; j < VEC; ++j) x[j] = D::load(r.h[j]);
  }
}

// Max of the VEC raw values of one 16-byte vector, as float (unscaled).
template <class D, int VEC>
__device__ __forceinline__ float vec_max(const uint4& u) {
  if constexpr (std::is_same<D, BF16>::value) {
    const unsigned a = max_bf16x2(max_bf16x2(u.x, u.y), max_bf16x2(u.z, u.w));
    return fmaxf(__uint_as_float(a << 16), __uint_as_float(a & 0xffff0000u));
  } else if constexpr (std::is_same<D, F16>::value) {
    const unsigned a = max_f16x2(max_f16x2(u.x, u.y), max_f16x2(u.z, u.w));
    return fmaxf(__half2float(__ushort_as_half((unsigned short)(a & 0xffffu))),
                 __half2float(__ushort_as_half((unsigned short)(a >> 16))));
  } else {
    return fmaxf(fmaxf(__uint_as_float(u.x), __uint_as_float(u.y)),
                 fmaxf(__uint_as_float(u.z), __uint_as_float(u.w)));
  }
}

template <class D, int VPT, int THREADS, int MINB>
__global__ void __launch_bounds__(THREADS, MINB) fused_grpo_kernel(
    const typename D::raw* logits, typename D::raw* grad, int64_t stride_in, int64_t stride_out,
    int cols, int valid_cols, int vec_per_cta, const int64_t* __restrict__ targets,
    const float* __restrict__ adv, const float* __restrict__ old_logp, const float* __restrict__ ref_logp,
    const float* __restrict__ rollout_logp, const float* __restrict__ weight, float wscale, float scale2,
    float inv_temp, LossParams P, float* __restrict__ out_logp, float* __restrict__ out_ent,
    float* __restrict__ out_stats) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  using T = typename TStore<D>::type;
  constexpr int VEC = 16 / sizeof(typename D::raw);
  __shared__ float sh[3 * THREADS / 32];
  // Every CTA's partial statistics, PUSHED into every CTA of the cluster: after the exchange each
  // CTA reads only its own shared memory, so no barrier at the end has to keep a CTA alive while
  // peers read it, and each CTA leaves as soon as its gradient stores are issued.
  __shared__ float4 cstat[16];
  const unsigned csize = __clusterSizeInBlocks();
  const unsigned crank = __clusterRelativeBlockRank();
  const int64_t row = blockIdx.x / csize;
  const float w = weight[row] * wscale;
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
    if (crank == 0 && threadIdx.x < kRowStats) {
      const int c = threadIdx.x;
      out_stats[row * kRowStats + c] = c == kRatioMin ? INFINITY : (c == kRatioMax ? -INFINITY : 0.f);
      if (c == 0) { out_logp[row] = 0.f; out_ent[row] = 0.f; }
    }
    return;
  }
  // The per-row scalars and the target's logit, loaded now so that their latency overlaps the
  // row's loads instead of sitting between the cluster exchange and the gradient pass.
  const int64_t tl = targets[row];
  const bool bad = tl < 0 || tl >= valid_cols;  // an id outside the vocabulary (see below)
  const bool owned = !bad && tl >= (int64_t)v0 * VEC && tl < (int64_t)v1 * VEC;
  typename D::raw traw = 0;
  float a_adv = 0.f, a_old = 0.f;
  if (threadIdx.x == 0) {
    if (owned) traw = p[tl];
    a_adv = adv[row];
    a_old = old_logp[row];
  }
  // DSMEM may be written only once every CTA of the cluster runs: arrive now, wait just before
  // the push (by then the peers have long arrived, so the wait costs nothing).
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");

  uint4 v[VPT];  // the row slice, later t, lives in registers between the statistics and the gradient
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int vi = v0 + threadIdx.x + k * THREADS;
    v[k] = vi < v1 ? __ldcs(reinterpret_cast<const uint4*>(p + (int64_t)vi * VEC)) : make_uint4(0, 0, 0, 0);
  }
  // Pass 1: this thread's max (scale2 > 0, so the max of raw values scales exactly).
  float m = -INFINITY;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int vi = v0 + threadIdx.x + k * THREADS;
    if (vi >= v1) continue;
    if ((vi + 1) * VEC <= valid_cols) {
      m = fmaxf(m, vec_max<D, VEC>(v[k]));
    } else {  // the vector holding the end of the valid (unpadded) vocabulary
      Pack<D, VEC> r; r.u = v[k];
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        if (vi * VEC + j < valid_cols) m = fmaxf(m, D::load(r.h[j]));
    }
  }
  m = m == -INFINITY ? m : m * scale2;
  // Pass 2: t = 2^(x2 - m), sums, and t written over the logits in the registers.
  float s = 0.f, e = 0.f;  // e relative to m: sum t * (x2 - m)
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int vi = v0 + threadIdx.x + k * THREADS;
    if (vi >= v1) continue;  // pass 3 skips this vector too
    float x[VEC], t[VEC];
    unpack_vec<D, VEC>(v[k], x);
    if ((vi + 1) * VEC <= valid_cols) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float u = fmaf(x[j], scale2, -m);
        t[j] = exp2f(u);
        s += t[j];
        e = fmaf(t[j], u, e);
      }
    } else {  // padded vocabulary columns count as -inf: t = 0
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const bool ok = vi * VEC + j < valid_cols;
        const float u = ok ? fmaf(x[j], scale2, -m) : 0.f;
        t[j] = ok ? exp2f(u) : 0.f;
        s += t[j];
        e = fmaf(t[j], u, e);
      }
    }
    if constexpr (sizeof(typename T::raw) == 2) {  // 8 values -> 4 words, element j at bits 16*(j%2)
      v[k] = make_uint4(pack_bf16x2(t[0], t[1]), pack_bf16x2(t[2], t[3]), pack_bf16x2(t[4], t[5]),
                        pack_bf16x2(t[6], t[7]));
    } else {
      v[k] = make_uint4(__float_as_uint(t[0]), __float_as_uint(t[1]), __float_as_uint(t[2]),
                        __float_as_uint(t[3]));
    }
  }
  const float m_thread = m;
  if (m != -INFINITY) e += m * s;  // back to sum t * x2
  block_merge_stats<THREADS>(m, s, e, sh);
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
  if (threadIdx.x == 0) {
    const float4 mine = make_float4(m, s, e, owned ? D::load(traw) * scale2 : 0.f);
    for (unsigned r = 0; r < csize; ++r)
      *reinterpret_cast<float4*>(__cluster_map_shared_rank(&cstat[crank], r)) = mine;
  }
  __cluster_barrier_arrive();  // release: our pushes are visible to the peers after their wait
  __cluster_barrier_wait();    // acquire: every peer's push has landed in our cstat
  __shared__ float2 bcast;     // (lse2, coef), computed once by thread 0
  if (threadIdx.x == 0) {
    float mm = -INFINITY, ss = 0.f, ee = 0.f, tx = 0.f;
    for (unsigned r = 0; r < csize; ++r) {
      const float4 st = cstat[r];
      merge_stats(mm, ss, ee, st.x, st.y, st.z);
      tx += st.w;
    }
    const float lse2 = mm + log2f(ss);
    // An id outside the vocabulary (the Python side does not sync to check) poisons the row with
    // NaN: the gradient norm turns non-finite, the update is skipped, and the row statistics
    // count it so that finalize_metrics names the cause.
    const float logp = bad ? __int_as_float(0x7fc00000) : (tx - lse2) * kLn2;
    const float ent = (lse2 - ee / ss) * kLn2;
    const float g = bad ? logp : grpo_token_grad(logp, a_adv, a_old, ref_logp, rollout_logp, row, w, P);
    bcast = make_float2(lse2, g * inv_temp);
    if (crank == 0) {
      out_logp[row] = logp;
      out_ent[row] = ent;
      float st[kRowStats];
      grpo_row_stats(logp, ent, a_adv, a_old, ref_logp, rollout_logp, row, w, bad, P, st);
#pragma unroll
      for (int c = 0; c < kRowStats; ++c) out_stats[row * kRowStats + c] = st[c];
    }
  }
  __syncthreads();
  const float lse2 = bcast.x;
  const float coef = bcast.y;
  // Pass 3: d = -coef * p = -coef * t * 2^(m_thread - lse2), plus coef at the target column.
  const float f = m_thread == -INFINITY ? 0.f : -coef * exp2f(m_thread - lse2);
  const int tvec = (int)(tl / VEC);
  if constexpr (std::is_same<D, BF16>::value) {
    // bf16 logits: t and the gradient are both bf16, so d = t * f is one packed multiply per two
    // logits (f rounded to bf16 once per thread: one more 2^-9 relative rounding) instead of
    // unpack, multiply and repack per logit (H200, 16,384 x 152,064: kernel 3.39 -> 3.26 ms).
    const unsigned f2 = pack_bf16x2(f, f);
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int vi = v0 + threadIdx.x + k * THREADS;
      if (vi >= v1) continue;
      uint4 d = make_uint4(mul_bf16x2(v[k].x, f2), mul_bf16x2(v[k].y, f2), mul_bf16x2(v[k].z, f2),
                           mul_bf16x2(v[k].w, f2));
      if (vi == tvec && !bad) {  // the target column, in float32: t * f + coef
        const int jt = (int)(tl - (int64_t)tvec * VEC);
        float x[VEC], y[VEC];
        unpack_vec<BF16, VEC>(v[k], x);
        unpack_vec<BF16, VEC>(d, y);
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          if (j == jt) y[j] = fmaf(x[j], f, coef);
        d = make_uint4(pack_bf16x2(y[0], y[1]), pack_bf16x2(y[2], y[3]), pack_bf16x2(y[4], y[5]),
                       pack_bf16x2(y[6], y[7]));
      }
      __stcs(reinterpret_cast<uint4*>(q + (int64_t)vi * VEC), d);
    }
  } else {
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int vi = v0 + threadIdx.x + k * THREADS;
      if (vi >= v1) continue;
      float d[VEC];
      unpack_vec<T, VEC>(v[k], d);
#pragma unroll
      for (int j = 0; j < VEC; ++j) d[j] *= f;
      if (vi == tvec && !bad) {
        const int jt = (int)(tl - (int64_t)tvec * VEC);
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          if (j == jt) d[j] += coef;
      }
      store_vec<D, VEC>(q + (int64_t)vi * VEC, d);
    }
  }
#endif
}

}  // namespace r1mega_grpo
