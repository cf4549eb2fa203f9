// Decode attention over the FP8 (e4m3) paged KV cache on CUDA cores: one CTA of 4 warps per
// (sequence, KV head). The PyTorch reference is r1mega/rollout/attention.py's attend_decode_gather
// on the dequantised cache; tests/gpu/test_paged_decode_cuda_gpu.py holds the kernel to it.
//
// Why not tensor cores: a KV group has a handful of query heads, so an MMA pads them to 16 rows,
// and every FP8 tile must be converted to 16 bits in the MMA's register layout first. The Triton
// kernel doing that needs ~200 registers a thread (two CTAs an SM) and runs no faster than it
// does on a bf16 cache with twice the bytes. Here a warp takes 16 keys at a time (one 16-token
// slice of a cache block, so one block-table read), and each lane touches few values:
//   q . k   D/16 lanes per key, 16 bytes each (one load); the lanes of a key sum by shuffles
//   p . v   lane l owns dims D/32 * l ...; p * v_scale of the chunk's keys come through shared
//           memory, 16 bytes per key for four heads
// Each warp keeps its own running max, sum and accumulator over the chunks it takes (chunks c,
// c + 4, ...); the four merge once at the end. Per-(token, head) scales factor out of both
// products: s = q . k8 * k_scale, acc += (p * v_scale) v8.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>

namespace {

constexpr int kWarps = 4;
constexpr int kChunk = 16;  // keys a warp takes at a time
constexpr unsigned kFull = 0xffffffffu;

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

// Two e4m3 bytes (the low one first) -> two floats: one cvt to f16x2, exact, then to f32.
__device__ __forceinline__ float2 e4m3x2(uint32_t two) {
  __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two & 0xffffu), __NV_E4M3);
  return __half22float2(*reinterpret_cast<__half2*>(&h));
}

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
// block tables (B, *) int32; bs a multiple of 16. scale_log2 = softmax scale * log2(e).
template <typename QT, int GMAX, int D>
__global__ void __launch_bounds__(kWarps * 32)
    paged_decode_fp8_kernel(const QT* __restrict__ q, int64_t q_sb, int64_t q_sh,
                            const uint8_t* __restrict__ kc, const uint8_t* __restrict__ vc,
                            int64_t c_sb, int64_t c_st, int64_t c_sh,
                            const float* __restrict__ ks, const float* __restrict__ vs,
                            int64_t s_sb, int64_t s_st, const int32_t* __restrict__ bt,
                            int64_t bt_s, const int32_t* __restrict__ ctx_lens,
                            QT* __restrict__ out, int64_t o_sb, int64_t o_sh, int group, int bs,
                            float scale_log2) {
  constexpr int LPK = D / 16;          // lanes per key in q . k (16 bytes each)
  constexpr int KPW = 32 / LPK;        // keys per warp-wide step
  constexpr int STEPS = kChunk / KPW;  // steps per chunk
  constexpr int DPL = D / 32;          // dims per lane in p . v
  using VT = typename VBytes<DPL>::T;
  __shared__ __align__(16) float pw_s[kWarps][kChunk][GMAX];
  __shared__ float m_s[kWarps][GMAX], l_s[kWarps][GMAX];
  __shared__ float acc_s[kWarps][GMAX][D];
  __shared__ __align__(16) float q_s[GMAX][D];  // the group's heads, in log2 units of the softmax

  const int b = blockIdx.x, h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int kq = lane / LPK, sl = lane % LPK;
  const int ctx = ctx_lens[b];

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

  const int n_chunks = (ctx + kChunk - 1) / kChunk;
  for (int c = warp; c < n_chunks; c += kWarps) {
    const int n0 = c * kChunk;
    const int64_t blk = bt[b * bt_s + n0 / bs];
    const int slot0 = n0 % bs;
    const uint8_t* krow = kc + blk * c_sb + slot0 * c_st + h * c_sh;
    const uint8_t* vrow = vc + blk * c_sb + slot0 * c_st + h * c_sh;
    // every load of the chunk first: K slices, V slices, the keys' scales (lane i: key i)
    uint4 kw[STEPS];
#pragma unroll
    for (int j = 0; j < STEPS; ++j) {
      const int key = j * KPW + kq;
      kw[j] = n0 + key < ctx ? __ldg(reinterpret_cast<const uint4*>(krow + key * c_st + sl * 16))
                             : make_uint4(0, 0, 0, 0);
    }
    VT vw[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      vw[i] = n0 + i < ctx ? __ldg(reinterpret_cast<const VT*>(vrow + i * c_st + lane * DPL)) : VT{};
    }
    float k_sc = 0.f, v_sc = 0.f;
    if (lane < kChunk && n0 + lane < ctx) {
      const int64_t so = blk * s_sb + (slot0 + lane) * s_st + h;
      k_sc = __ldg(ks + so), v_sc = __ldg(vs + so);
    }

    float s[STEPS][GMAX];
#pragma unroll
    for (int j = 0; j < STEPS; ++j) {
      float kf[16];
      const uint32_t w4[4] = {kw[j].x, kw[j].y, kw[j].z, kw[j].w};
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
      const float ksc = __shfl_sync(kFull, k_sc, key);
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
      const float vsc = __shfl_sync(kFull, v_sc, key);
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
      v_to_float<DPL>(vw[i], vf);
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        const float pw = pw_s[warp][i][g];
#pragma unroll
        for (int d = 0; d < DPL; ++d) acc[g][d] = fmaf(pw, vf[d], acc[g][d]);
      }
    }
    __syncwarp();  // the next chunk rewrites pw_s
  }

#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) l[g] += __shfl_xor_sync(kFull, l[g], off);
    if (lane == 0) m_s[warp][g] = m[g], l_s[warp][g] = l[g];
#pragma unroll
    for (int d = 0; d < DPL; ++d) acc_s[warp][g][lane * DPL + d] = acc[g][d];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < group * D; e += blockDim.x) {
    const int g = e / D, d = e % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, m_s[w][g]);
    float den = 0.f, num = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {  // a warp that took no chunk has m = -inf: weight 0
      const float f = exp2f(m_s[w][g] - mx);
      den += l_s[w][g] * f;
      num += acc_s[w][g][d] * f;
    }
    out[b * o_sb + (h * group + g) * o_sh + d] = from_float<QT>(num / den);
  }
}

template <typename QT, int GMAX, int D>
void launch(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& ks,
            const at::Tensor& vs, const at::Tensor& bt, const at::Tensor& ctx, at::Tensor& out,
            int group, double scale) {
  const dim3 grid(q.size(0), kc.size(2));
  const auto stream = at::cuda::getCurrentCUDAStream();
  paged_decode_fp8_kernel<QT, GMAX, D><<<grid, kWarps * 32, 0, stream>>>(
      reinterpret_cast<const QT*>(q.data_ptr()), q.stride(0), q.stride(1),
      reinterpret_cast<const uint8_t*>(kc.data_ptr()), reinterpret_cast<const uint8_t*>(vc.data_ptr()),
      kc.stride(0), kc.stride(1), kc.stride(2), ks.data_ptr<float>(), vs.data_ptr<float>(),
      ks.stride(0), ks.stride(1), bt.data_ptr<int32_t>(), bt.stride(0), ctx.data_ptr<int32_t>(),
      reinterpret_cast<QT*>(out.data_ptr()), out.stride(0), out.stride(1), group,
      static_cast<int>(kc.size(1)), static_cast<float>(scale * 1.4426950408889634));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename QT, int GMAX>
void by_dim(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& ks,
            const at::Tensor& vs, const at::Tensor& bt, const at::Tensor& ctx, at::Tensor& out,
            int group, double scale) {
  switch (q.size(2)) {
    case 64: return launch<QT, GMAX, 64>(q, kc, vc, ks, vs, bt, ctx, out, group, scale);
    case 128: return launch<QT, GMAX, 128>(q, kc, vc, ks, vs, bt, ctx, out, group, scale);
    default: return launch<QT, GMAX, 256>(q, kc, vc, ks, vs, bt, ctx, out, group, scale);
  }
}

template <typename QT>
void by_group(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& ks,
              const at::Tensor& vs, const at::Tensor& bt, const at::Tensor& ctx, at::Tensor& out,
              int group, double scale) {
  if (group <= 4) return by_dim<QT, 4>(q, kc, vc, ks, vs, bt, ctx, out, group, scale);
  return by_dim<QT, 8>(q, kc, vc, ks, vs, bt, ctx, out, group, scale);
}

}  // namespace

void paged_decode_fp8_cuda(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                           const at::Tensor& ks, const at::Tensor& vs, const at::Tensor& bt,
                           const at::Tensor& ctx, at::Tensor& out, double scale) {
  const at::cuda::CUDAGuard guard(q.device());
  const int group = static_cast<int>(q.size(1) / kc.size(2));
  if (q.scalar_type() == at::kBFloat16) {
    by_group<__nv_bfloat16>(q, kc, vc, ks, vs, bt, ctx, out, group, scale);
  } else {
    by_group<__half>(q, kc, vc, ks, vs, bt, ctx, out, group, scale);
  }
}
