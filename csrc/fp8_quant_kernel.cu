// The FP8 dual quantiser: one read of a 16-bit (R, C) matrix writes x and x.T in FP8 with their
// dequantisation scales, for the tensor, tile (1x128) and block (128x128) granularities of
// r1mega/precision/quantize.py, bit for bit its quantize_reference (the GPU test holds it there).
//
// One CTA of 256 threads per 128 x 128 block (or, persistent, two CTAs an SM walking the blocks,
// each loading its next block into registers while it works on one). Lane l of warp w holds
// columns 8 (l % 16) ... + 7 of rows 16 w + 8 (l / 16) ... + 7: every load instruction reads two whole 256-byte rows, the
// row maxima reduce over 16 lanes, the column maxima over a thread's 8 rows, its partner lane and
// the 8 warps. x.T's bytes go through shared memory as 8-byte runs of 8 rows, each 128-byte row
// of x.T XOR-swizzled by its 16-column group so that neither the writes nor the 16-byte reads
// that store it collide on banks.
//
// Built without --use_fast_math: the scale arithmetic must round like the reference (IEEE
// division, no flush of subnormal inputs to zero).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <torch/extension.h>

#include <cfloat>
#include <algorithm>
#include <cstdint>
#include <tuple>

namespace {

constexpr int kBlock = 128;
constexpr int kThreads = 256;
enum Gran : int { kTensor = 0, kTile = 1, kBlockGran = 2 };

template <typename T>
__device__ __forceinline__ float to_f32(uint32_t bits16);

template <>
__device__ __forceinline__ float to_f32<at::BFloat16>(uint32_t bits16) {
  return __uint_as_float(bits16 << 16);
}

template <>
__device__ __forceinline__ float to_f32<at::Half>(uint32_t bits16) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits16)));
}

// The j-th 16-bit value of 8 packed in 16 bytes, as float (j a compile-time constant after
// unrolling, so the words stay in registers).
template <typename T>
__device__ __forceinline__ float elem(const uint4& v, int j) {
  const uint32_t w = j < 2 ? v.x : j < 4 ? v.y : j < 6 ? v.z : v.w;
  return to_f32<T>((j & 1) ? (w >> 16) : (w & 0xFFFFu));
}

// |v| as int32 bits: they order like the magnitudes, a NaN's above inf, so an integer max is the
// amax with NaN kept.
__device__ __forceinline__ int abs_bits(float v) { return __float_as_int(v) & 0x7FFFFFFF; }

// quantize.multiplier_from_amax, per tile.
__device__ __forceinline__ float multiplier(float amax, float fmax, bool power2) {
  float mult = __fdiv_rn(fmax, amax);
  if (mult > FLT_MAX) mult = FLT_MAX;
  if (power2 && mult == mult) mult = __int_as_float(__float_as_int(mult) & 0x7F800000);
  return amax == 0.0f ? 1.0f : mult;
}

__device__ __forceinline__ float clamp_scaled(float v, float mult, float fmax) {
  v = __fmul_rn(v, mult);
  v = v > fmax ? fmax : v;
  return v < -fmax ? -fmax : v;  // NaN passes both
}

// Two floats -> two FP8 bytes (a in the low byte), round to nearest even.
template <bool kE4M3>
__device__ __forceinline__ uint32_t fp8x2(float a, float b) {
  return static_cast<uint32_t>(__nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE,
                                                        kE4M3 ? __NV_E4M3 : __NV_E5M2));
}

// Eight values -> eight FP8 bytes (the first in the low byte of .x).
template <bool kE4M3>
__device__ __forceinline__ uint2 pack8(const float (&v)[8]) {
  return make_uint2(fp8x2<kE4M3>(v[0], v[1]) | (fp8x2<kE4M3>(v[2], v[3]) << 16),
                    fp8x2<kE4M3>(v[4], v[5]) | (fp8x2<kE4M3>(v[6], v[7]) << 16));
}

// This thread's 8 rows x 8 columns of block (br, bc), zeros outside x (C % 16 == 0: a chunk of
// 8 columns is all in or all out).
template <typename T>
__device__ __forceinline__ void load_block(uint4 (&raw)[8], const T* __restrict__ x, int64_t R,
                                           int64_t C, int64_t br, int64_t bc, int lrow0, int lcol) {
  const int64_t row0 = br * kBlock + lrow0, col = bc * kBlock + lcol;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    raw[i] = make_uint4(0, 0, 0, 0);
    if (col < C && row0 + i < R) raw[i] = __ldg(reinterpret_cast<const uint4*>(x + (row0 + i) * C + col));
  }
}

struct DualSmem {
  __align__(16) uint2 tq[kBlock][16];  // x.T's block: row c, slot (r / 8) ^ (c / 8 % 16) (read as uint4)
  int partial[8][kBlock];              // per-warp column maxima (tile), warp maxima (block)
};

// One 128 x 128 block (br, bc) from this thread's loaded values: scales, x and x.T in FP8. Ends
// with every thread done with shared memory's x.T block, so the CTA may take another block.
template <typename T, bool kE4M3, int kGran>
__device__ __forceinline__ void dual_block(const uint4 (&raw)[8], DualSmem& sm, int64_t br,
                                           int64_t bc, int64_t R, int64_t C,
                                           uint8_t* __restrict__ q, uint8_t* __restrict__ qt,
                                           float* __restrict__ s, float* __restrict__ st,
                                           const float* __restrict__ amax_in, float fmax,
                                           bool power2, int64_t s_r, int64_t s_c, int64_t st_r,
                                           int64_t st_c) {
  auto& tq = sm.tq;
  auto& partial = sm.partial;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int chunk = lane & 15;
  const int lrow0 = warp * 16 + (lane >> 4) * 8;   // this thread's first row within the block
  const int lcol = chunk * 8;                      // its first column within the block
  const int64_t row0 = br * kBlock + lrow0, col = bc * kBlock + lcol;
  const bool col_ok = col < C;                     // C % 16 == 0: a chunk is all in or all out

  float mult = 1.0f;
  float mult_r[8], mult_c[8];
  if (kGran == kTensor) {
    mult = multiplier(__ldg(amax_in), fmax, power2);
  } else {
    int rbits[8], cbits[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) cbits[j] = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      rbits[i] = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int b = abs_bits(elem<T>(raw[i], j));
        rbits[i] = max(rbits[i], b);
        cbits[j] = max(cbits[j], b);
      }
    }
    if (kGran == kTile) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int off = 1; off < 16; off <<= 1)
          rbits[i] = max(rbits[i], __shfl_xor_sync(0xffffffffu, rbits[i], off));
        mult_r[i] = multiplier(__int_as_float(rbits[i]), fmax, power2);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        cbits[j] = max(cbits[j], __shfl_xor_sync(0xffffffffu, cbits[j], 16));
        if (lane < 16) partial[warp][lcol + j] = cbits[j];
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        int m = 0;
#pragma unroll
        for (int w = 0; w < 8; ++w) m = max(m, partial[w][lcol + j]);
        mult_c[j] = multiplier(__int_as_float(m), fmax, power2);
      }
    } else {  // one 128 x 128 block
      int m = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) m = max(m, rbits[i]);
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
      if (lane == 0) partial[0][warp] = m;
      __syncthreads();
      m = 0;
#pragma unroll
      for (int w = 0; w < 8; ++w) m = max(m, partial[0][w]);
      mult = multiplier(__int_as_float(m), fmax, power2);
    }
  }
  if (kGran != kTile) {
#pragma unroll
    for (int i = 0; i < 8; ++i) mult_r[i] = mult_c[i] = mult;
  }

  // x in FP8, row by row: 16 lanes write one row's 128 bytes.
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = clamp_scaled(elem<T>(raw[i], j), mult_r[i], fmax);
    if (col_ok && row0 + i < R) *reinterpret_cast<uint2*>(q + (row0 + i) * C + col) = pack8<kE4M3>(v);
  }
  // x.T in FP8: column lcol + j of x is row lcol + j of x.T; this thread's 8 rows are 8 bytes of it.
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = clamp_scaled(elem<T>(raw[i], j), mult_c[j], fmax);
    tq[lcol + j][(lrow0 >> 3) ^ chunk] = pack8<kE4M3>(v);
  }

  if (kGran == kTile) {
#pragma unroll
    for (int i = 0; i < 8; ++i)  // lane `chunk == i` of each row group writes that row's scale
      if (chunk == i && row0 + i < R) s[(row0 + i) * s_r + bc * s_c] = __fdiv_rn(1.0f, mult_r[i]);
    if (warp == 0 && lane < 16 && col_ok) {
#pragma unroll
      for (int j = 0; j < 8; ++j) st[(col + j) * st_r + br * st_c] = __fdiv_rn(1.0f, mult_c[j]);
    }
  } else if (threadIdx.x == 0) {
    const float scale = __fdiv_rn(1.0f, mult);
    if (kGran == kBlockGran) {
      s[br * s_r + bc * s_c] = scale;
      st[bc * st_r + br * st_c] = scale;
    } else if (br == 0 && bc == 0) {
      s[0] = scale;
      st[0] = scale;
    }
  }
  __syncthreads();

  // x.T's block to global memory: 8 threads per 128-byte row, 16 bytes each (R % 16 == 0).
#pragma unroll
  for (int it = 0; it < kBlock * 8 / kThreads; ++it) {
    const int idx = it * kThreads + threadIdx.x;
    const int c = idx >> 3, k = idx & 7;
    const int f = (c >> 3) & 15;
    uint4 v = reinterpret_cast<const uint4*>(&tq[c][0])[k ^ (f >> 1)];
    if (f & 1) v = make_uint4(v.z, v.w, v.x, v.y);
    const int64_t gc = bc * kBlock + c, gr = br * kBlock + k * 16;
    if (gc < C && gr < R) *reinterpret_cast<uint4*>(qt + gc * R + gr) = v;
  }
  __syncthreads();
}

// One CTA a block (grid (ceil(C / 128), ceil(R / 128))).
template <typename T, bool kE4M3, int kGran>
__global__ void __launch_bounds__(kThreads)
quant_dual_kernel(const T* __restrict__ x, int64_t R, int64_t C, uint8_t* __restrict__ q,
                  uint8_t* __restrict__ qt, float* __restrict__ s, float* __restrict__ st,
                  const float* __restrict__ amax_in, float fmax, bool power2, int64_t s_r,
                  int64_t s_c, int64_t st_r, int64_t st_c) {
  __shared__ DualSmem sm;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint4 raw[8];
  load_block<T>(raw, x, R, C, blockIdx.y, blockIdx.x, warp * 16 + (lane >> 4) * 8, (lane & 15) * 8);
  dual_block<T, kE4M3, kGran>(raw, sm, blockIdx.y, blockIdx.x, R, C, q, qt, s, st, amax_in, fmax,
                              power2, s_r, s_c, st_r, st_c);
}

// Persistent: a CTA takes blocks blockIdx.x, + gridDim.x, ... (row-major over the block grid) and
// loads its next block into registers before working on the current one, so that each SM has a
// block's reads in flight while it computes and stores (one CTA a block leaves the loads to
// whichever of an SM's two resident CTAs is between blocks).
template <typename T, bool kE4M3, int kGran>
__global__ void __launch_bounds__(kThreads, 2)
quant_dual_persistent_kernel(const T* __restrict__ x, int64_t R, int64_t C,
                             uint8_t* __restrict__ q, uint8_t* __restrict__ qt,
                             float* __restrict__ s, float* __restrict__ st,
                             const float* __restrict__ amax_in, float fmax, bool power2,
                             int64_t s_r, int64_t s_c, int64_t st_r, int64_t st_c) {
  __shared__ DualSmem sm;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int lrow0 = warp * 16 + (lane >> 4) * 8, lcol = (lane & 15) * 8;
  const int64_t nc = (C + kBlock - 1) / kBlock, n = nc * ((R + kBlock - 1) / kBlock);
  uint4 a[8], b[8];
  int64_t blk = blockIdx.x;
  if (blk < n) load_block<T>(a, x, R, C, blk / nc, blk % nc, lrow0, lcol);
  // two blocks an iteration, so the prefetch alternates between a and b without copies
  for (; blk < n; blk += 2 * gridDim.x) {
    const int64_t nb = blk + gridDim.x, nb2 = nb + gridDim.x;
    if (nb < n) load_block<T>(b, x, R, C, nb / nc, nb % nc, lrow0, lcol);
    dual_block<T, kE4M3, kGran>(a, sm, blk / nc, blk % nc, R, C, q, qt, s, st, amax_in, fmax,
                                power2, s_r, s_c, st_r, st_c);
    if (nb >= n) break;
    if (nb2 < n) load_block<T>(a, x, R, C, nb2 / nc, nb2 % nc, lrow0, lcol);
    dual_block<T, kE4M3, kGran>(b, sm, nb / nc, nb % nc, R, C, q, qt, s, st, amax_in, fmax,
                                power2, s_r, s_c, st_r, st_c);
  }
}

template <typename T, bool kE4M3>
void launch(const at::Tensor& x, at::Tensor& q, at::Tensor& qt, at::Tensor& s, at::Tensor& st,
            const float* amax, int64_t gran, float fmax, bool power2, bool persistent,
            cudaStream_t stream) {
  const int64_t R = x.size(0), C = x.size(1);
  const int64_t nr = (R + kBlock - 1) / kBlock, nc = (C + kBlock - 1) / kBlock;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const dim3 grid = persistent ? dim3(static_cast<unsigned>(std::min<int64_t>(nr * nc, 2 * sms)))
                               : dim3(nc, nr);
  auto args = std::make_tuple(reinterpret_cast<const T*>(x.data_ptr()), R, C,
                              reinterpret_cast<uint8_t*>(q.data_ptr()),
                              reinterpret_cast<uint8_t*>(qt.data_ptr()), s.data_ptr<float>(),
                              st.data_ptr<float>(), amax, fmax, power2, s.stride(0), s.stride(1),
                              st.stride(0), st.stride(1));
  auto run = [&](auto kernel) {
    std::apply([&](auto... a) { kernel<<<grid, kThreads, 0, stream>>>(a...); }, args);
  };
  if (persistent) {
    if (gran == kTensor) run(quant_dual_persistent_kernel<T, kE4M3, kTensor>);
    else if (gran == kTile) run(quant_dual_persistent_kernel<T, kE4M3, kTile>);
    else run(quant_dual_persistent_kernel<T, kE4M3, kBlockGran>);
  } else {
    if (gran == kTensor) run(quant_dual_kernel<T, kE4M3, kTensor>);
    else if (gran == kTile) run(quant_dual_kernel<T, kE4M3, kTile>);
    else run(quant_dual_kernel<T, kE4M3, kBlockGran>);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void quant_dual_cuda(const at::Tensor& x, at::Tensor& q, at::Tensor& qt, at::Tensor& s,
                     at::Tensor& st, const c10::optional<at::Tensor>& amax, int64_t gran,
                     bool power2, bool persistent) {
  const c10::cuda::CUDAGuard guard(x.device());
  const bool e4m3 = q.scalar_type() == at::ScalarType::Float8_e4m3fn;
  const float fmax = e4m3 ? 448.0f : 57344.0f;
  const float* a = amax.has_value() ? amax->data_ptr<float>() : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (x.scalar_type() == at::kBFloat16) {
    if (e4m3) launch<at::BFloat16, true>(x, q, qt, s, st, a, gran, fmax, power2, persistent, stream);
    else launch<at::BFloat16, false>(x, q, qt, s, st, a, gran, fmax, power2, persistent, stream);
  } else {
    if (e4m3) launch<at::Half, true>(x, q, qt, s, st, a, gran, fmax, power2, persistent, stream);
    else launch<at::Half, false>(x, q, qt, s, st, a, gran, fmax, power2, persistent, stream);
  }
}
