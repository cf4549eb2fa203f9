// The output projection's row quantiser as the FP8 decode kernel's epilogue
// (R1MEGA_PAGED_FP8_ROWS): under the FP8 rollout's row scales, o_proj's input (attention's output
// row, all Hq heads of one sequence) is quantised to e4m3 with one scale per row. The kernel then
// runs one CTA per sequence with all its KV heads (HPC = Hkv), so the merge has the whole row in
// its threads' registers: one block reduction for the amax, and the e4m3 row and its scale
// written beside the bf16 output. This removes a kernel launch a layer (the one-pass row kernel of
// r1mega/precision/triton_fp8_rows.py, which read the row back).
//
// The arithmetic is that kernel's (r1mega/precision/quantize.py's quantize_reference, "row"):
// amax over |x| as integer bits (NaN propagates), mult = 448 / amax correctly rounded (explicit
// intrinsics: the extension builds with --use_fast_math), clamped to FLT_MAX, its mantissa
// dropped for power-of-two scales, 1 where amax is 0; x * mult clamped to +-448 and rounded to
// nearest even; scale = 1 / mult correctly rounded.
//
// The cluster form (R1MEGA_PAGED_FP8_ROWS_CLUSTER, Hopper): the grid stays one CTA a KV head, and
// a sequence's Hkv CTAs form one thread-block cluster. Each CTA reduces its heads' amax, the CTAs
// exchange them through distributed shared memory, and each quantises its own heads with the
// row's amax: the one-CTA-a-sequence form's arithmetic (tests/gpu/test_paged_rows_gpu.py holds
// it to the row kernel's bits), without its 4x larger CTAs.
#pragma once
#include <cooperative_groups.h>
#include <cuda_fp8.h>

#include "paged_decode_common.cuh"

namespace {

struct RowsOut {
  uint8_t* q8 = nullptr;  // (>= B, Hq * D) e4m3 rows, row stride q8_sb; null: no epilogue
  float* s8 = nullptr;    // (>= B) float32 dequantisation scales; tiles: (>= B, Hq), row stride s8_sb
  int64_t q8_sb = 0;
  int64_t s8_sb = 1;
  bool power2 = true;
  bool tiles = false;     // one scale a head's D = 128 outputs (a 1 x 128 tile), one CTA a KV head
  bool cluster = false;   // one scale a row, one CTA a KV head, a sequence's CTAs one cluster
};

// mult = 448 / amax as quantize_reference computes it (see above); amax as |x|'s float bits
__device__ __forceinline__ float e4m3_multiplier(uint32_t amax_bits, bool power2) {
  const float amax = __uint_as_float(amax_bits);
  float mult = __fdiv_rn(448.f, amax);
  if (mult > 3.4028234663852886e38f) mult = 3.4028234663852886e38f;
  if (power2 && mult == mult) mult = __uint_as_float(__float_as_uint(mult) & 0x7f800000u);
  if (amax == 0.f) mult = 1.f;
  return mult;
}

__device__ __forceinline__ uint8_t e4m3_byte(float v, float mult) {
  v = __fmul_rn(v, mult);
  v = v < -448.f ? -448.f : (v > 448.f ? 448.f : v);
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

// The tiles epilogue: thread t of the CTA's WARPS * 32 == D holds dim t of each of the KV head's
// `group` q heads (vals[i]: head i, as the output rounded it). Each head's D outputs are one
// 1 x 128 tile of o_proj's input row: its amax needs only this CTA, no other.
template <int WARPS>
__device__ void quantize_head_tiles(const RowsOut& rows, const float (&vals)[8], int b, int head0,
                                    int group) {
  __shared__ uint32_t warp_max[WARPS][8];
  constexpr int D = WARPS * 32;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    uint32_t m = __float_as_uint(vals[i]) & 0x7fffffffu;
#pragma unroll
    for (int off = 16; off > 0; off /= 2) m = max(m, __shfl_xor_sync(kFull, m, off));
    if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32][i] = m;
  }
  __syncthreads();
  uint8_t* q = rows.q8 + b * rows.q8_sb + static_cast<int64_t>(head0) * D;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (i >= group) break;
    uint32_t m = 0;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) m = max(m, warp_max[w][i]);
    const float mult = e4m3_multiplier(m, rows.power2);
    q[i * D + threadIdx.x] = e4m3_byte(vals[i], mult);
    if (threadIdx.x == 0) rows.s8[b * rows.s8_sb + head0 + i] = __fdiv_rn(1.f, mult);
  }
}

// vals[i]: the row's element threadIdx.x + i * blockDim.x (zero past n), as the output rounded it
template <int PER, int WARPS>
__device__ void quantize_row(const RowsOut& rows, const float (&vals)[PER], int b, int n) {
  __shared__ uint32_t warp_max[WARPS];
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < PER; ++i) m = max(m, __float_as_uint(vals[i]) & 0x7fffffffu);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) m = max(m, __shfl_xor_sync(kFull, m, off));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < WARPS; ++w) m = max(m, warp_max[w]);
  const float mult = e4m3_multiplier(m, rows.power2);
  uint8_t* q = rows.q8 + b * rows.q8_sb;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int e = threadIdx.x + i * blockDim.x;
    if (e < n) q[e] = e4m3_byte(vals[i], mult);
  }
  if (threadIdx.x == 0) rows.s8[b] = __fdiv_rn(1.f, mult);
}

// The cluster rows epilogue: the thread layout of quantize_head_tiles (vals[i]: head i's dim
// threadIdx.x, zero past `group`), one scale for the whole row, its amax exchanged between the
// sequence's CTAs (one cluster) through distributed shared memory.
template <int WARPS>
__device__ void quantize_row_cluster(const RowsOut& rows, const float (&vals)[8], int b, int head0,
                                     int group) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  __shared__ uint32_t warp_max[WARPS];
  __shared__ uint32_t cta_max;
  constexpr int D = WARPS * 32;
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) m = max(m, __float_as_uint(vals[i]) & 0x7fffffffu);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) m = max(m, __shfl_xor_sync(kFull, m, off));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t c = 0;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) c = max(c, warp_max[w]);
    cta_max = c;
  }
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every CTA's amax written and visible to the cluster
  uint32_t row = 0;
  const unsigned n = cluster.num_blocks();
  for (unsigned r = 0; r < n; ++r) row = max(row, *cluster.map_shared_rank(&cta_max, r));
  // a CTA's shared memory must outlive the others' reads of it: arrive now, wait before exiting
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
  const float mult = e4m3_multiplier(row, rows.power2);
  uint8_t* q = rows.q8 + b * rows.q8_sb + static_cast<int64_t>(head0) * D;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (i >= group) break;
    q[i * D + threadIdx.x] = e4m3_byte(vals[i], mult);
  }
  if (threadIdx.x == 0 && cluster.block_rank() == 0) rows.s8[b] = __fdiv_rn(1.f, mult);
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#else
  __trap();  // the host launches the cluster form on sm_90+ only
#endif
}

}  // namespace
