// The output projection's row quantiser as the FP8 decode kernel's epilogue: under the FP8
// rollout's row scales, o_proj's input (attention's output row, all Hq heads of one sequence) is
// quantised to e4m3 with a power-of-two scale per row. A row spans the Hkv CTAs of its sequence,
// so the last of them to finish quantises it: each CTA makes its part of the row visible
// (__threadfence) and counts itself in `counters[b]`; the one that brings the count to Hkv reads
// the whole row back (from L2, past L1) and writes the e4m3 row and its scale, then zeroes the
// count for the next launch. This removes one kernel launch a layer (r1mega/precision/
// triton_fp8_rows.py's, which read the same row) from the decode step.
//
// The arithmetic is that kernel's (r1mega/precision/quantize.py's quantize_reference, "row"):
// amax over |x| as integer bits (NaN propagates), mult = 448 / amax correctly rounded (explicit
// intrinsics: the extension builds with --use_fast_math), clamped to FLT_MAX, its mantissa
// dropped for power-of-two scales, 1 where amax is 0; x * mult clamped to +-448 and rounded to
// nearest even; scale = 1 / mult correctly rounded.
#pragma once
#include <cuda_fp8.h>

#include "paged_decode_common.cuh"

namespace {

struct RowsOut {
  uint8_t* q8 = nullptr;    // (>= B, Hq * D) e4m3 rows, row stride q8_sb; null: no epilogue
  float* s8 = nullptr;      // (>= B) float32 dequantisation scales
  int* counters = nullptr;  // (>= B) int32, zero before the launch and after it
  int64_t q8_sb = 0;
  bool power2 = true;
};

template <typename QT>
__device__ __forceinline__ float load_cg(const QT* p) {
  const unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(p));
  return to_float(*reinterpret_cast<const QT*>(&bits));
}

template <typename QT, int D>
__device__ void quantize_row_when_last(const RowsOut& rows, const QT* out, int b, int64_t o_sb, int64_t o_sh,
                                       int n_kv, int group) {
  __shared__ int last;
  __shared__ uint32_t warp_max[kWarps];
  __threadfence();  // this CTA's part of the row, before it is counted
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(rows.counters + b, 1) == n_kv - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();  // the other CTAs' parts, counted before, are visible past this point
  const int C = n_kv * group * D;
  const QT* row = out + b * o_sb;
  uint32_t m = 0;
  for (int e = threadIdx.x; e < C; e += blockDim.x)
    m = max(m, __float_as_uint(load_cg(row + (e / D) * o_sh + e % D)) & 0x7fffffffu);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) m = max(m, __shfl_xor_sync(kFull, m, off));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kWarps; ++w) m = max(m, warp_max[w]);
  const float fmax = 448.f, amax = __uint_as_float(m);
  float mult = __fdiv_rn(fmax, amax);
  if (mult > 3.4028234663852886e38f) mult = 3.4028234663852886e38f;
  if (rows.power2 && mult == mult) mult = __uint_as_float(__float_as_uint(mult) & 0x7f800000u);
  if (amax == 0.f) mult = 1.f;
  uint8_t* q = rows.q8 + b * rows.q8_sb;
  for (int e = threadIdx.x; e < C; e += blockDim.x) {
    float v = __fmul_rn(load_cg(row + (e / D) * o_sh + e % D), mult);
    v = v < -fmax ? -fmax : (v > fmax ? fmax : v);
    q[e] = static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
  }
  if (threadIdx.x == 0) {
    rows.s8[b] = __fdiv_rn(1.f, mult);
    rows.counters[b] = 0;
  }
}

}  // namespace
