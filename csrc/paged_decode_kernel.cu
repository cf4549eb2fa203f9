// Decode attention over the FP8 (e4m3) paged KV cache on CUDA cores: one CTA of 4 warps per
// (sequence, KV head). The PyTorch reference is r1mega/rollout/attention.py's attend_decode_gather
// on the dequantised cache; tests/gpu/test_paged_decode_cuda_gpu.py holds the kernel to it.
//
// Tensor cores: a KV group has a handful of query heads, so an MMA pads them, and every FP8 tile
// must be converted to 16 bits in the MMA's register layout first. The Triton kernel doing that
// needs ~200 registers a thread (two CTAs an SM); csrc/paged_decode_mma.cuh does it in CUDA
// (R1MEGA_PAGED_FP8=mma). Here, on CUDA cores, a warp takes 16 keys at a time (one 16-token
// slice of a cache block, so one block-table read), and each lane touches few values:
//   q . k   D/16 lanes per key, 16 bytes each; the lanes of a key sum by shuffles
//   p . v   lane l owns dims D/32 * l ...; p * v_scale of the chunk's keys come through shared
//           memory, 16 bytes per key for four heads
// Each warp keeps its own running max, sum and accumulator over the chunks it takes (chunks c,
// c + 4, ...); the four merge once at the end. Per-(token, head) scales factor out of both
// products: s = q . k8 * k_scale, acc += (p * v_scale) v8.
//
// Loads: each warp copies its chunks (K, V and their scales) into a ring of kStages slices of
// shared memory with cp.async, kStages - 1 chunks ahead of the one it computes, so a chunk's DRAM
// latency overlaps the work on the previous ones; keys past the context are zero-filled (an
// unwritten slot may hold e4m3 NaN bytes, and 0 * NaN would reach the accumulator). After the
// loop the ring holds the warps' partial results for the merge.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>

#include "paged_decode_common.cuh"
#include "paged_decode_mma.cuh"

namespace {

// Dynamic shared memory of one CTA, in bytes: the rings (K and V slices, then the scales), the
// p * v_scale hand-over, q, and the warps' running max and sum.
template <int GMAX, int D>
struct Smem {
  static constexpr int kRing = kWarps * kStages * 2 * kChunk * D;   // e4m3 K | V per chunk
  static constexpr int kScales = kWarps * kStages * 2 * kChunk * 4;  // float32 k | v scales
  static constexpr int kPw = kWarps * kChunk * GMAX * 4;
  static constexpr int kQ = GMAX * D * 4;
  static constexpr int kMl = 2 * kWarps * GMAX * 4;
  static constexpr int kBytes = kRing + kScales + kPw + kQ + kMl;
  // the merge's partial accumulators (kWarps, GMAX, D) float32 reuse the K|V rings
  static_assert(kWarps * GMAX * D * 4 <= kRing, "the merge buffer must fit in the ring");
};

// DPL e4m3 bytes of one key's row for the p . v lanes
template <int DPL>
struct VBytes;
template <>
struct VBytes<2> {
  using T = uint16_t;
};
template <>
struct VBytes<4> {
  using T = uint32_t;
};
template <>
struct VBytes<8> {
  using T = uint2;
};

template <int DPL>
__device__ __forceinline__ void v_to_float(typename VBytes<DPL>::T w, float (&f)[DPL]);
template <>
__device__ __forceinline__ void v_to_float<2>(uint16_t w, float (&f)[2]) {
  float2 a = e4m3x2(w);
  f[0] = a.x, f[1] = a.y;
}
template <>
__device__ __forceinline__ void v_to_float<4>(uint32_t w, float (&f)[4]) {
  float2 a = e4m3x2(w), b = e4m3x2(w >> 16);
  f[0] = a.x, f[1] = a.y, f[2] = b.x, f[3] = b.y;
}
template <>
__device__ __forceinline__ void v_to_float<8>(uint2 w, float (&f)[8]) {
  float2 a = e4m3x2(w.x), b = e4m3x2(w.x >> 16), c = e4m3x2(w.y), d = e4m3x2(w.y >> 16);
  f[0] = a.x, f[1] = a.y, f[2] = b.x, f[3] = b.y, f[4] = c.x, f[5] = c.y, f[6] = d.x, f[7] = d.y;
}

// q (B, Hq, D) with strides (q_sb, q_sh, 1); caches (N, bs, Hkv, D) e4m3 with strides
// (c_sb, c_st, c_sh, 1) in bytes; scales (N, bs, Hkv) float32 with strides (s_sb, s_st, 1);
// block tables (B, *) int32 or int64 with strides (bt_s, 1); bs a multiple of 16.
// scale_log2 = softmax scale * log2(e).
template <typename QT, int GMAX, int D, typename IT>
__global__ void __launch_bounds__(kWarps * 32)
    paged_decode_fp8_kernel(const QT* __restrict__ q, int64_t q_sb, int64_t q_sh,
                            const uint8_t* __restrict__ kc, const uint8_t* __restrict__ vc,
                            int64_t c_sb, int64_t c_st, int64_t c_sh,
                            const float* __restrict__ ks, const float* __restrict__ vs,
                            int64_t s_sb, int64_t s_st, const IT* __restrict__ bt,
                            int64_t bt_s, const int32_t* __restrict__ ctx_lens,
                            QT* __restrict__ out, int64_t o_sb, int64_t o_sh, int group, int bs,
                            float scale_log2, bool heads_inner) {
  constexpr int LPK = D / 16;          // lanes per key in q . k (16 bytes each)
  constexpr int KPW = 32 / LPK;        // keys per warp-wide step
  constexpr int STEPS = kChunk / KPW;  // steps per chunk
  constexpr int DPL = D / 32;          // dims per lane in p . v
  constexpr int SEGS = kChunk * D / 16;  // 16-byte pieces of a chunk's K (and of its V)
  using VT = typename VBytes<DPL>::T;
  using S = Smem<GMAX, D>;
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* ring = smem;                                                  // [warp][stage][K|V][key][D]
  float* sc_ring = reinterpret_cast<float*>(smem + S::kRing);             // [warp][stage][k|v][key]
  float(*pw_s)[kChunk][GMAX] = reinterpret_cast<float(*)[kChunk][GMAX]>(smem + S::kRing + S::kScales);
  float(*q_s)[D] = reinterpret_cast<float(*)[D]>(smem + S::kRing + S::kScales + S::kPw);
  float* m_s = reinterpret_cast<float*>(smem + S::kRing + S::kScales + S::kPw + S::kQ);  // [warp][g]
  float* l_s = m_s + kWarps * GMAX;
  float(*acc_s)[GMAX][D] = reinterpret_cast<float(*)[GMAX][D]>(smem);  // after the loop only

  // heads_inner: a sequence's KV heads are neighbouring CTAs (grid (Hkv, B)), which read the
  // interleaved head rows of each cache slot at about the same time
  const int b = heads_inner ? blockIdx.y : blockIdx.x, h = heads_inner ? blockIdx.x : blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int kq = lane / LPK, sl = lane % LPK;
  const int ctx = ctx_lens[b];
  const int n_chunks = (ctx + kChunk - 1) / kChunk;
  const int my_chunks = warp < n_chunks ? (n_chunks - warp + kWarps - 1) / kWarps : 0;

  // The warp's it-th chunk (chunk warp + it * kWarps) into ring stage it % kStages. Every call
  // commits a group, also an empty one, so that the wait below counts groups uniformly.
  auto issue = [&](int it) {
    if (it < my_chunks) {
      const int n0 = (warp + it * kWarps) * kChunk;
      const int64_t blk = static_cast<int64_t>(bt[b * bt_s + n0 / bs]);
      const int slot0 = n0 % bs;
      const int64_t base = blk * c_sb + slot0 * c_st + h * c_sh;
      uint8_t* kd = ring + ((warp * kStages + it % kStages) * 2) * kChunk * D;
      uint8_t* vd = kd + kChunk * D;
#pragma unroll
      for (int e = lane; e < SEGS; e += 32) {
        const int key = e / LPK, part = e % LPK;
        const int64_t src = base + key * c_st + part * 16;
        const int n = n0 + key < ctx ? 16 : 0;
        cp_async16(kd + key * D + part * 16, kc + src, n);
        cp_async16(vd + key * D + part * 16, vc + src, n);
      }
      // lanes 0..15: the keys' k scales, 16..31: their v scales
      const int key = lane % kChunk;
      const float* src = (lane < kChunk ? ks : vs) + blk * s_sb + (slot0 + key) * s_st + h;
      cp_async4(sc_ring + ((warp * kStages + it % kStages) * 2) * kChunk + lane, src,
                n0 + key < ctx ? 4 : 0);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int it = 0; it < kStages - 1; ++it) issue(it);

  // q in shared memory, not registers: 16 floats a head per lane would take a third of them
  for (int e = threadIdx.x; e < GMAX * D; e += blockDim.x) {
    const int g = e / D, d = e % D;
    q_s[g][d] = g < group ? to_float(q[b * q_sb + (h * group + g) * q_sh + d]) * scale_log2 : 0.f;
  }
  __syncthreads();
  float m[GMAX], l[GMAX], acc[GMAX][DPL];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    m[g] = -INFINITY, l[g] = 0.f;
#pragma unroll
    for (int d = 0; d < DPL; ++d) acc[g][d] = 0.f;
  }

  for (int it = 0; it < my_chunks; ++it) {
    issue(it + kStages - 1);  // into the stage the previous iteration finished with
    cp_async_wait<kStages - 1>();  // this warp's copies of chunk it have landed
    __syncwarp();                  // ... and every lane's are visible to the others
    const int n0 = (warp + it * kWarps) * kChunk;
    const uint8_t* kr = ring + ((warp * kStages + it % kStages) * 2) * kChunk * D;
    const uint8_t* vr = kr + kChunk * D;
    const float* sc = sc_ring + ((warp * kStages + it % kStages) * 2) * kChunk;

    float s[STEPS][GMAX];
#pragma unroll
    for (int j = 0; j < STEPS; ++j) {
      const uint4 kw = *reinterpret_cast<const uint4*>(kr + (j * KPW + kq) * D + sl * 16);
      float kf[16];
      const uint32_t w4[4] = {kw.x, kw.y, kw.z, kw.w};
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const float2 a = e4m3x2(w4[t]), z = e4m3x2(w4[t] >> 16);
        kf[4 * t] = a.x, kf[4 * t + 1] = a.y, kf[4 * t + 2] = z.x, kf[4 * t + 3] = z.y;
      }
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        const float4* qp = reinterpret_cast<const float4*>(&q_s[g][sl * 16]);
        float dot = 0.f;
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          const float4 qq = qp[t];
          dot = fmaf(qq.x, kf[4 * t], dot);
          dot = fmaf(qq.y, kf[4 * t + 1], dot);
          dot = fmaf(qq.z, kf[4 * t + 2], dot);
          dot = fmaf(qq.w, kf[4 * t + 3], dot);
        }
        s[j][g] = dot;
      }
    }
#pragma unroll
    for (int off = LPK / 2; off >= 1; off /= 2) {
#pragma unroll
      for (int j = 0; j < STEPS; ++j) {
#pragma unroll
        for (int g = 0; g < GMAX; ++g) s[j][g] += __shfl_xor_sync(kFull, s[j][g], off);
      }
    }
    float cmax[GMAX];
#pragma unroll
    for (int g = 0; g < GMAX; ++g) cmax[g] = -INFINITY;
#pragma unroll
    for (int j = 0; j < STEPS; ++j) {
      const int key = j * KPW + kq;
      const float ksc = sc[key];
      const bool ok = n0 + key < ctx;
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        s[j][g] = ok ? s[j][g] * ksc : -INFINITY;
        cmax[g] = fmaxf(cmax[g], s[j][g]);
      }
    }
#pragma unroll
    for (int off = LPK; off < 32; off *= 2) {
#pragma unroll
      for (int g = 0; g < GMAX; ++g) cmax[g] = fmaxf(cmax[g], __shfl_xor_sync(kFull, cmax[g], off));
    }
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      const float m_new = fmaxf(m[g], cmax[g]);  // finite: the chunk's first key is in the context
      const float alpha = exp2f(m[g] - m_new);
      m[g] = m_new;
      l[g] *= alpha;
#pragma unroll
      for (int d = 0; d < DPL; ++d) acc[g][d] *= alpha;
    }
#pragma unroll
    for (int j = 0; j < STEPS; ++j) {
      const int key = j * KPW + kq;
      const float vsc = sc[kChunk + key];
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        const float p = exp2f(s[j][g] - m[g]);
        if (sl == 0) {  // one lane per key counts it and hands p * v_scale to the p . v lanes
          l[g] += p;
          pw_s[warp][key][g] = p * vsc;
        }
      }
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      float vf[DPL];
      v_to_float<DPL>(*reinterpret_cast<const VT*>(vr + i * D + lane * DPL), vf);
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        const float pw = pw_s[warp][i][g];
#pragma unroll
        for (int d = 0; d < DPL; ++d) acc[g][d] = fmaf(pw, vf[d], acc[g][d]);
      }
    }
    __syncwarp();  // the next iteration's copies and p * v_scale overwrite what was read here
  }
  cp_async_wait<0>();  // only empty groups are left, but the ring becomes acc_s next
  __syncthreads();

#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) l[g] += __shfl_xor_sync(kFull, l[g], off);
    if (lane == 0) m_s[warp * GMAX + g] = m[g], l_s[warp * GMAX + g] = l[g];
#pragma unroll
    for (int d = 0; d < DPL; ++d) acc_s[warp][g][lane * DPL + d] = acc[g][d];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < group * D; e += blockDim.x) {
    const int g = e / D, d = e % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, m_s[w * GMAX + g]);
    float den = 0.f, num = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {  // a warp that took no chunk has m = -inf: weight 0
      const float f = exp2f(m_s[w * GMAX + g] - mx);
      den += l_s[w * GMAX + g] * f;
      num += acc_s[w][g][d] * f;
    }
    out[b * o_sb + (h * group + g) * o_sh + d] = from_float<QT>(num / den);
  }
}

// Over 48 KB of dynamic shared memory needs the opt-in, per kernel and device (remembered for the
// first 64 devices, asked again on every launch beyond them).
template <typename Kernel>
void opt_in(Kernel kernel, int smem, int dev, bool (&done)[64]) {
  if (smem > 48 * 1024 && (dev >= 64 || !done[dev])) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    if (dev < 64) done[dev] = true;
  }
}

#define R1MEGA_PAGED_ARGS                                                                           \
  reinterpret_cast<const QT*>(q.data_ptr()), q.stride(0), q.stride(1),                              \
      reinterpret_cast<const uint8_t*>(kc.data_ptr()), reinterpret_cast<const uint8_t*>(vc.data_ptr()), \
      kc.stride(0), kc.stride(1), kc.stride(2), ks.data_ptr<float>(), vs.data_ptr<float>(), ks.stride(0), \
      ks.stride(1), reinterpret_cast<const IT*>(bt.data_ptr()), bt.stride(0), ctx.data_ptr<int32_t>(),    \
      reinterpret_cast<QT*>(out.data_ptr()), out.stride(0), out.stride(1), group,                      \
      static_cast<int>(kc.size(1)), static_cast<float>(scale * 1.4426950408889634), heads_inner

// The tensor-core kernel with HPC KV heads a CTA (csrc/paged_decode_mma.cuh); ROWS: the epilogue;
// ROPE: q, k and v from `rope` (q is then only the batch's shape: out is passed)
template <typename QT, int D, typename IT, int HPC, bool ROWS, int WPH = kWarps, bool TILES = false,
          bool ROPE = false>
void launch_mma(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& ks,
                const at::Tensor& vs, const at::Tensor& bt, const at::Tensor& ctx, at::Tensor& out,
                int group, double scale, bool heads_inner, const RowsOut& rows, const RopeIn& rope = {}) {
  constexpr int smem = MmaSmem<D, HPC, WPH, ROPE>::kBytes;
  static_assert(smem <= 227 * 1024, "an H100's shared memory a CTA");
  auto* kernel = paged_decode_fp8_mma_kernel<QT, D, IT, HPC, ROWS, WPH, TILES, false, ROPE>;
  static bool opted_in[64] = {};
  opt_in(kernel, smem, q.get_device(), opted_in);
  const int heads = static_cast<int>(kc.size(2) / HPC);
  const dim3 grid = heads_inner ? dim3(heads, q.size(0)) : dim3(q.size(0), heads);
  kernel<<<grid, WPH * 32 * HPC, smem, at::cuda::getCurrentCUDAStream()>>>(R1MEGA_PAGED_ARGS, rows, rope);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The cluster rows epilogue: one CTA a KV head of kWarps warps (D == kWarps * 32, checked), a
// sequence's Hkv CTAs one thread-block cluster (sm_90+, Hkv <= 8: checked by the caller)
template <typename QT, int D, typename IT, bool ROPE = false>
void launch_mma_cluster(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& ks,
                        const at::Tensor& vs, const at::Tensor& bt, const at::Tensor& ctx, at::Tensor& out,
                        int group, double scale, bool heads_inner, const RowsOut& rows, const RopeIn& rope = {}) {
  constexpr int smem = MmaSmem<D, 1, kWarps, ROPE>::kBytes;
  auto* kernel = paged_decode_fp8_mma_kernel<QT, D, IT, 1, false, kWarps, true, true, ROPE>;
  static bool opted_in[64] = {};
  opt_in(kernel, smem, q.get_device(), opted_in);
  const unsigned hkv = static_cast<unsigned>(kc.size(2));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = heads_inner ? dim3(hkv, q.size(0)) : dim3(q.size(0), hkv);
  cfg.blockDim = dim3(kWarps * 32);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = at::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = heads_inner ? hkv : 1;
  attr[0].val.clusterDim.y = heads_inner ? 1 : hkv;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, R1MEGA_PAGED_ARGS, rows, rope));
}

// One CTA a sequence, all its KV heads (checked: 1, 2 or 4 with D * heads <= 512); ROWS: the epilogue
template <typename QT, int D, typename IT, bool ROWS>
void launch_seq(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& ks,
                const at::Tensor& vs, const at::Tensor& bt, const at::Tensor& ctx, at::Tensor& out,
                int group, double scale, bool heads_inner, const RowsOut& rows) {
  const int hpc = static_cast<int>(kc.size(2));
  if (hpc == 1)
    return launch_mma<QT, D, IT, 1, ROWS>(q, kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows);
  if constexpr (D <= 256) {
    if (hpc == 2)
      return launch_mma<QT, D, IT, 2, ROWS>(q, kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows);
  }
  if constexpr (D <= 128) {
    if (hpc == 4)
      return launch_mma<QT, D, IT, 4, ROWS>(q, kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows);
  }
  TORCH_CHECK(false, "r1mega_attn_cuda: one CTA a sequence takes 1, 2 or 4 KV heads with head_dim * heads <= 512, got ",
              hpc, " x ", D);
}

// MMA: the tensor-core kernel (GMAX unused), one KV head a CTA with wph (1, 2, 4) warps, or all of
// a sequence's with `rows` (o_proj's row quantiser as the epilogue) or seq_cta; else the CUDA-core one
template <typename QT, int GMAX, int D, typename IT, bool MMA>
void launch(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& ks,
            const at::Tensor& vs, const at::Tensor& bt, const at::Tensor& ctx, at::Tensor& out,
            int group, double scale, bool heads_inner, const RowsOut& rows, bool seq_cta, int wph) {
  if constexpr (MMA) {
    if (rows.q8 != nullptr && (rows.tiles || rows.cluster)) {  // one CTA a KV head, a thread a dim
      if constexpr (D == kWarps * 32) {
        if (rows.cluster)
          return launch_mma_cluster<QT, D, IT>(q, kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows);
        return launch_mma<QT, D, IT, 1, false, kWarps, true>(q, kc, vc, ks, vs, bt, ctx, out, group, scale,
                                                             heads_inner, rows);
      }
      TORCH_CHECK(false, "r1mega_attn_cuda: the tiles and cluster epilogues take head_dim ", kWarps * 32,
                  ", got ", D);
    }
    if (rows.q8 == nullptr && !seq_cta && wph == 1)
      return launch_mma<QT, D, IT, 1, false, 1>(q, kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows);
    if (rows.q8 == nullptr && !seq_cta && wph == 2)
      return launch_mma<QT, D, IT, 1, false, 2>(q, kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows);
    if (rows.q8 == nullptr && !seq_cta)
      return launch_mma<QT, D, IT, 1, false>(q, kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows);
    if (rows.q8 == nullptr)
      return launch_seq<QT, D, IT, false>(q, kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows);
    return launch_seq<QT, D, IT, true>(q, kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows);
  } else {
    constexpr int smem = Smem<GMAX, D>::kBytes;
    static bool opted_in[64] = {};
    opt_in(paged_decode_fp8_kernel<QT, GMAX, D, IT>, smem, q.get_device(), opted_in);
    const dim3 grid = heads_inner ? dim3(kc.size(2), q.size(0)) : dim3(q.size(0), kc.size(2));
    paged_decode_fp8_kernel<QT, GMAX, D, IT>
        <<<grid, kWarps * 32, smem, at::cuda::getCurrentCUDAStream()>>>(R1MEGA_PAGED_ARGS);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}
// RoPE in the kernel (csrc/paged_decode_rope.cuh): the tensor-core kernel, one CTA a KV head of
// kWarps warps, plain or with the cluster rows epilogue (D 128); out stands in for q
template <typename QT, int D, typename IT>
void launch_rope(const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& ks, const at::Tensor& vs,
                 const at::Tensor& bt, const at::Tensor& ctx, at::Tensor& out, int group, double scale,
                 bool heads_inner, const RowsOut& rows, const RopeIn& rope) {
  if (rows.q8 == nullptr)
    return launch_mma<QT, D, IT, 1, false, kWarps, false, true>(out, kc, vc, ks, vs, bt, ctx, out, group, scale,
                                                                heads_inner, rows, rope);
  if constexpr (D == kWarps * 32) {
    if (rows.cluster)
      return launch_mma_cluster<QT, D, IT, true>(out, kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner,
                                                 rows, rope);
  }
  TORCH_CHECK(false, "r1mega_attn_cuda: with RoPE, rows come from the cluster epilogue at head_dim ", kWarps * 32,
              " only");
}

template <typename QT, typename IT>
void rope_by_dim(int d, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& ks, const at::Tensor& vs,
                 const at::Tensor& bt, const at::Tensor& ctx, at::Tensor& out, int group, double scale,
                 bool heads_inner, const RowsOut& rows, const RopeIn& rope) {
  switch (d) {
    case 64: return launch_rope<QT, 64, IT>(kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows, rope);
    case 128: return launch_rope<QT, 128, IT>(kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows, rope);
    default: return launch_rope<QT, 256, IT>(kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows, rope);
  }
}

#undef R1MEGA_PAGED_ARGS

template <typename QT, int GMAX, int D, bool MMA>
void by_index(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& ks,
              const at::Tensor& vs, const at::Tensor& bt, const at::Tensor& ctx, at::Tensor& out,
              int group, double scale, bool heads_inner, const RowsOut& rows, bool seq_cta, int wph) {
  // the CUDA-graph decode step reads its block tables out of one packed int64 buffer
  if (bt.scalar_type() == at::kLong)
    return launch<QT, GMAX, D, int64_t, MMA>(q, kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows, seq_cta, wph);
  return launch<QT, GMAX, D, int32_t, MMA>(q, kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows, seq_cta, wph);
}

template <typename QT, int GMAX, bool MMA>
void by_dim(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& ks,
            const at::Tensor& vs, const at::Tensor& bt, const at::Tensor& ctx, at::Tensor& out,
            int group, double scale, bool heads_inner, const RowsOut& rows, bool seq_cta, int wph) {
  switch (q.size(2)) {
    case 64: return by_index<QT, GMAX, 64, MMA>(q, kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows, seq_cta, wph);
    case 128: return by_index<QT, GMAX, 128, MMA>(q, kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows, seq_cta, wph);
    default: return by_index<QT, GMAX, 256, MMA>(q, kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows, seq_cta, wph);
  }
}

template <typename QT>
void by_group(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& ks,
              const at::Tensor& vs, const at::Tensor& bt, const at::Tensor& ctx, at::Tensor& out,
              int group, double scale, bool tensor_cores, bool heads_inner, const RowsOut& rows, bool seq_cta, int wph) {
  if (tensor_cores) return by_dim<QT, 8, true>(q, kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows, seq_cta, wph);
  if (group <= 4) return by_dim<QT, 4, false>(q, kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows, seq_cta, wph);
  return by_dim<QT, 8, false>(q, kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows, seq_cta, wph);
}

}  // namespace

void paged_decode_fp8_cuda(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                           const at::Tensor& ks, const at::Tensor& vs, const at::Tensor& bt,
                           const at::Tensor& ctx, at::Tensor& out, double scale, bool tensor_cores,
                           bool heads_inner, const c10::optional<at::Tensor>& q8,
                           const c10::optional<at::Tensor>& s8, bool power2, bool seq_cta, int wph,
                           bool tiles, bool cluster) {
  const at::cuda::CUDAGuard guard(q.device());
  const int group = static_cast<int>(q.size(1) / kc.size(2));
  RowsOut rows;
  if (q8.has_value()) {
    rows.q8 = reinterpret_cast<uint8_t*>(q8->data_ptr());
    rows.s8 = s8->data_ptr<float>();
    rows.q8_sb = q8->stride(0);
    rows.s8_sb = tiles ? s8->stride(0) : 1;
    rows.power2 = power2;
    rows.tiles = tiles;
    rows.cluster = cluster;
  }
  if (q.scalar_type() == at::kBFloat16) {
    by_group<__nv_bfloat16>(q, kc, vc, ks, vs, bt, ctx, out, group, scale, tensor_cores, heads_inner, rows, seq_cta, wph);
  } else {
    by_group<__half>(q, kc, vc, ks, vs, bt, ctx, out, group, scale, tensor_cores, heads_inner, rows, seq_cta, wph);
  }
}

void paged_decode_fp8_rope_cuda(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                const at::Tensor& slots, const c10::optional<at::Tensor>& row_scale,
                                at::Tensor& kc, at::Tensor& vc, at::Tensor& ks, at::Tensor& vs,
                                const at::Tensor& bt, const at::Tensor& ctx, at::Tensor& out, double scale,
                                bool heads_inner, const c10::optional<at::Tensor>& q8,
                                const c10::optional<at::Tensor>& s8, bool power2, bool cluster) {
  const at::cuda::CUDAGuard guard(qkv.device());
  const int group = static_cast<int>(out.size(1) / kc.size(2));
  RowsOut rows;
  if (q8.has_value()) {
    rows.q8 = reinterpret_cast<uint8_t*>(q8->data_ptr());
    rows.s8 = s8->data_ptr<float>();
    rows.q8_sb = q8->stride(0);
    rows.power2 = power2;
    rows.cluster = cluster;
  }
  RopeIn rope;
  rope.qkv = qkv.data_ptr();
  rope.x_sb = qkv.stride(0);
  rope.x_sh = qkv.stride(1);
  rope.cos = cos.data_ptr();
  rope.sin = sin.data_ptr();
  rope.cs_sb = cos.stride(0);
  rope.slots = slots.data_ptr<int64_t>();
  rope.slots_s = slots.stride(0);
  rope.row_scale = row_scale.has_value() ? row_scale->data_ptr<float>() : nullptr;
  rope.kc = reinterpret_cast<uint8_t*>(kc.data_ptr());
  rope.vc = reinterpret_cast<uint8_t*>(vc.data_ptr());
  rope.ks = ks.data_ptr<float>();
  rope.vs = vs.data_ptr<float>();
  const int d = static_cast<int>(out.size(2));
  const bool bf16 = out.scalar_type() == at::kBFloat16, i64 = bt.scalar_type() == at::kLong;
  if (bf16 && i64)
    rope_by_dim<__nv_bfloat16, int64_t>(d, kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows, rope);
  else if (bf16)
    rope_by_dim<__nv_bfloat16, int32_t>(d, kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows, rope);
  else if (i64)
    rope_by_dim<__half, int64_t>(d, kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows, rope);
  else
    rope_by_dim<__half, int32_t>(d, kc, vc, ks, vs, bt, ctx, out, group, scale, heads_inner, rows, rope);
}
