// The fused single-pass GRPO kernels (no tensor parallelism): ONE read of the logits and one write
// of their gradient for the whole forward + backward. A token row is split over a thread-block
// cluster (Hopper, sm_90); each CTA reduces its slice to (max, sum exp, sum exp*x), the cluster
// exchanges those through distributed shared memory, every CTA computes the same lse, log-prob and
// GRPO token gradient, and writes d loss / d logits for its slice from data still on chip.
//
//  fused_grpo_simple_kernel      one cluster per row, the slice in registers (the first version,
//                                kept as a fallback: R1MEGA_GRPO_FUSED=simple)
//  fused_grpo_persistent_kernel  persistent clusters walking the rows; the next row streams into
//                                shared memory (cp.async, double buffered) while this one computes,
//                                and exp(x - thread max) is kept in registers so that each logit
//                                costs one ex2 instead of two.
#pragma once
#include "grpo_common.cuh"

namespace r1mega_grpo {

template <class D, int VPT, int THREADS>
__global__ void __launch_bounds__(THREADS, 2) fused_grpo_simple_kernel(
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

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  const unsigned dst = (unsigned)__cvta_generic_to_shared(smem_dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// Launched with gridDim.x = (number of co-resident clusters) * csize and 2 * VPT * THREADS * 16
// bytes of dynamic shared memory. Each thread only ever reads back the shared-memory slots it
// filled itself, so the double buffer needs no block barrier.
template <class D, int VPT, int THREADS>
__global__ void __launch_bounds__(THREADS, 1) fused_grpo_persistent_kernel(
    const typename D::raw* logits, typename D::raw* grad, int64_t stride_in, int64_t stride_out,
    int rows, int cols, int valid_cols, int vec_per_cta, const int64_t* __restrict__ targets,
    const float* __restrict__ adv, const float* __restrict__ old_logp, const float* __restrict__ ref_logp,
    const float* __restrict__ rollout_logp, const float* __restrict__ weight, float scale2,
    float inv_temp, LossParams P, float* __restrict__ out_logp, float* __restrict__ out_ent) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  constexpr int VEC = 16 / sizeof(typename D::raw);
  constexpr int N = VPT * VEC;
  extern __shared__ uint4 stage[];  // [2][VPT][THREADS]
  __shared__ float sh[3 * THREADS / 32];
  __shared__ float4 cstat[2];       // parity-indexed: a peer may still read last row's while we write
  const unsigned csize = __clusterSizeInBlocks();
  const unsigned crank = __clusterRelativeBlockRank();
  const int nclusters = gridDim.x / csize;
  const int nvec = cols / VEC;
  const int v0 = (int)crank * vec_per_cta;
  const int v1 = min(v0 + vec_per_cta, nvec);
  const int tid = threadIdx.x;

  auto prefetch = [&](int r, int buf) {
    const typename D::raw* p = logits + (int64_t)r * stride_in;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int vi = v0 + tid + k * THREADS;
      if (vi < v1) cp_async16(&stage[(buf * VPT + k) * THREADS + tid], p + (int64_t)vi * VEC);
    }
    cp_async_commit();
  };

  int row = blockIdx.x / csize;
  int buf = 0, parity = 0;
  if (row < rows && weight[row] != 0.f) prefetch(row, 0);
  for (; row < rows; row += nclusters, buf ^= 1) {
    const int next = row + nclusters;
    const bool next_active = next < rows && weight[next] != 0.f;
    if (next_active) prefetch(next, buf ^ 1);  // two rows in flight per CTA
    const float w = weight[row];
    typename D::raw* q = grad + (int64_t)row * stride_out;
    if (w == 0.f) {  // masked token (uniform over the cluster): zero gradient, nothing was loaded
      const float z[VEC] = {};
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        const int vi = v0 + tid + k * THREADS;
        if (vi < v1) store_vec<D, VEC>(q + (int64_t)vi * VEC, z);
      }
      if (crank == 0 && tid == 0) { out_logp[row] = 0.f; out_ent[row] = 0.f; }
      continue;
    }
    if (next_active) cp_async_wait<1>(); else cp_async_wait<0>();

    float t[N];  // x2 first, then 2^(x2 - thread max); padded or absent columns end as 0
    float m = -INFINITY;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int vi = v0 + tid + k * THREADS;
      Pack<D, VEC> r;
      r.u = vi < v1 ? stage[(buf * VPT + k) * THREADS + tid] : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const bool ok = vi < v1 && vi * VEC + j < valid_cols;
        t[k * VEC + j] = ok ? D::load(r.h[j]) * scale2 : -INFINITY;
        m = fmaxf(m, t[k * VEC + j]);
      }
    }
    float s = 0.f, e = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float x2 = t[i];
      const float ex = x2 == -INFINITY ? 0.f : exp2f(x2 - m);
      s += ex;
      e = fmaf(ex, x2 == -INFINITY ? 0.f : x2, e);
      t[i] = ex;
    }
    const float m_thread = m;
    block_merge_stats<THREADS>(m, s, e, sh);
    const int64_t tl = targets[row];
    if (tid == 0) {
      const bool owned = tl >= (int64_t)v0 * VEC && tl < (int64_t)v1 * VEC && tl < valid_cols;
      const float tx = owned ? D::load(logits[(int64_t)row * stride_in + tl]) * scale2 : 0.f;
      cstat[parity] = make_float4(m, s, e, tx);
    }
    __cluster_barrier_arrive();
    __cluster_barrier_wait();
    float mm = -INFINITY, ss = 0.f, ee = 0.f, tx = 0.f;
    for (unsigned r = 0; r < csize; ++r) {
      const float4 st = *reinterpret_cast<const float4*>(__cluster_map_shared_rank(&cstat[parity], r));
      merge_stats(mm, ss, ee, st.x, st.y, st.z);
      tx += st.w;
    }
    parity ^= 1;
    const float lse2 = mm + log2f(ss);
    const float logp = (tx - lse2) * kLn2;
    const float g = grpo_token_grad(logp, adv[row], old_logp[row], ref_logp, rollout_logp, row, w, P);
    const float coef = g * inv_temp;
    // p_j = 2^(x2_j - lse2) = t_j * 2^(thread max - lse2): one ex2 per thread instead of per logit.
    const float pscale = m_thread == -INFINITY ? 0.f : -coef * exp2f(m_thread - lse2);
    if (crank == 0 && tid == 0) {
      out_logp[row] = logp;
      out_ent[row] = (lse2 - ee / ss) * kLn2;
    }
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int vi = v0 + tid + k * THREADS;
      if (vi >= v1) continue;
      float d[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int col = vi * VEC + j;
        d[j] = t[k * VEC + j] * pscale;
        if (col == tl) d[j] += coef;
      }
      store_vec<D, VEC>(q + (int64_t)vi * VEC, d);
    }
  }
  __cluster_barrier_arrive();  // no CTA leaves while a peer may still read its cstat
  __cluster_barrier_wait();
#endif
}

}  // namespace r1mega_grpo
