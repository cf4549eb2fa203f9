// RoPE and the KV cache write inside the FP8 decode attention kernel (R1MEGA_PAGED_FP8_ROPE):
// the decode step's RoPE kernel (r1mega/rollout/triton_rope_kv.py) reads linear_qkv's output,
// rotates q and k, writes k and v into the FP8 cache and q back out for attention; here the
// tensor-core kernel's CTA for (sequence, KV head) does that work for its own head instead.
//
// Arithmetic: the eager reference's (rope_kv_write_reference: apply_row_scale, rotate_qk,
// kv_cache.quantize_rows), every product and sum rounded to the activation dtype as PyTorch's
// eager ops round them. The extension builds with --use_fast_math, so the products and sums are
// explicit round-to-nearest intrinsics, which the compiler never contracts into an FMA (the
// Triton kernel's products are, on the GPU: see triton_rope_kv's docstring).
//
// Ordering: the new key's slot is read by the same CTA's chunk walk a few instructions later.
// Rather than order the global write before the cp.async reads, the CTA keeps the new row's e4m3
// bytes and scales in shared memory and the warp whose chunk holds the last position copies them
// over what its cp.async brought (a stale slot), so the walk never waits on the write.
#pragma once
#include "paged_decode_common.cuh"

namespace {

struct RopeIn {
  const void* qkv = nullptr;  // (T, Hkv, (G + 2) * D) activations: each KV head's q heads, k, v
  int64_t x_sb = 0, x_sh = 0;  // token and KV head strides (elements)
  const void* cos = nullptr;   // (T, D) activation dtype, unit stride on D
  const void* sin = nullptr;
  int64_t cs_sb = 0;
  const int64_t* slots = nullptr;    // (T,) flat cache slots, block * bs + offset, stride slots_s
  int64_t slots_s = 1;               // the graph step's slots are a column of its packed rows
  const float* row_scale = nullptr;  // (T,) float32, or null: qkv's rows still to be scaled
  uint8_t* kc = nullptr;             // the caches and scales the kernel reads, to write the new row
  uint8_t* vc = nullptr;
  float* ks = nullptr;
  float* vs = nullptr;
};

template <typename QT>
__device__ __forceinline__ float rounded(float v) {
  return to_float(from_float<QT>(v));
}

// apply_row_scale's arithmetic: x times its row's scale, rounded back to the activation dtype
template <typename QT>
__device__ __forceinline__ float row_scaled(const QT* row, int d, float rs, bool scaled) {
  const float x = to_float(row[d]);
  return scaled ? rounded<QT>(__fmul_rn(x, rs)) : x;
}

// Element d of a row rotated as rotate_qk does: x * cos + rotate_half(x) * sin, rotate_half(x) =
// cat(-x2, x1), each product and the sum rounded to QT
template <typename QT, int D>
__device__ __forceinline__ float rope_elem(const QT* row, const QT* cos, const QT* sin, int d, float rs,
                                           bool scaled) {
  const float x = row_scaled(row, d, rs, scaled);
  const float xp = row_scaled(row, d < D / 2 ? d + D / 2 : d - D / 2, rs, scaled);
  const float a = rounded<QT>(__fmul_rn(x, to_float(cos[d])));
  const float c = rounded<QT>(__fmul_rn(d < D / 2 ? -xp : xp, to_float(sin[d])));
  return rounded<QT>(__fadd_rn(a, c));
}

// q's rotated values at this lane's dims of the MMA's B operand (k-step t: dims d0(t) .. d0(t) + 3,
// d0(t) = 64 (t / 4) + 16 j + 4 (t % 4)), for D >= 128, where dims d and d + D / 2 are k-steps t
// and t + KT / 2 of the same lane: one 8-byte load each of x, cos and sin a k-step, all issued
// before any is used, and no partner load.
template <typename QT, int D>
__device__ __forceinline__ void rope_q_lane(const QT* row, const QT* cs, const QT* sn, int j, float rs,
                                            bool scaled, float (&f)[D / 16][4]) {
  constexpr int KT = D / 16;
  static_assert(D >= 128, "dims d and d + D / 2 in one lane");
  uint2 xw[KT], cw[KT], sw[KT];
#pragma unroll
  for (int t = 0; t < KT; ++t) {
    const int d0 = 64 * (t / 4) + 16 * j + 4 * (t % 4);
    xw[t] = *reinterpret_cast<const uint2*>(row + d0);
    cw[t] = *reinterpret_cast<const uint2*>(cs + d0);
    sw[t] = *reinterpret_cast<const uint2*>(sn + d0);
  }
#pragma unroll
  for (int t = 0; t < KT / 2; ++t) {
    const QT* x1 = reinterpret_cast<const QT*>(&xw[t]);
    const QT* x2 = reinterpret_cast<const QT*>(&xw[t + KT / 2]);
    const QT* c1 = reinterpret_cast<const QT*>(&cw[t]);
    const QT* c2 = reinterpret_cast<const QT*>(&cw[t + KT / 2]);
    const QT* s1 = reinterpret_cast<const QT*>(&sw[t]);
    const QT* s2 = reinterpret_cast<const QT*>(&sw[t + KT / 2]);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float a = to_float(x1[i]), b = to_float(x2[i]);
      if (scaled) a = rounded<QT>(__fmul_rn(a, rs)), b = rounded<QT>(__fmul_rn(b, rs));
      // y1 = x1 cos1 + (-x2) sin1, y2 = x2 cos2 + x1 sin2, each product and sum rounded
      f[t][i] = rounded<QT>(__fadd_rn(rounded<QT>(__fmul_rn(a, to_float(c1[i]))),
                                      rounded<QT>(__fmul_rn(-b, to_float(s1[i])))));
      f[t + KT / 2][i] = rounded<QT>(__fadd_rn(rounded<QT>(__fmul_rn(b, to_float(c2[i]))),
                                               rounded<QT>(__fmul_rn(a, to_float(s2[i])))));
    }
  }
}

// Shared memory of the new row: the e4m3 k | v bytes, then their two scales
template <int D>
struct RopeSmem {
  static constexpr int kBytes = 2 * D + 16;
};

// The new token's k (rotated) and v rows of KV head h, quantised as kv_cache.quantize_rows does
// (scale = amax / 448 correctly rounded, 1 for an all-zero row; x / scale clamped to +-448 and
// rounded to nearest even), written to the cache at slots[b] and into `nkv` for the chunk walk.
// One warp makes both rows (the one whose walk takes the last position).
template <typename QT, int D>
__device__ void rope_write_new_kv(const RopeIn& r, int b, int h, int group, int bs, int64_t c_sb,
                                  int64_t c_st, int64_t c_sh, int64_t s_sb, int64_t s_st, uint8_t* nkv) {
  const int lane = threadIdx.x % 32;
  const QT* base = static_cast<const QT*>(r.qkv) + b * r.x_sb + h * r.x_sh;
  const QT* cs = static_cast<const QT*>(r.cos) + b * r.cs_sb;
  const QT* sn = static_cast<const QT*>(r.sin) + b * r.cs_sb;
  const bool scaled = r.row_scale != nullptr;
  const float rs = scaled ? r.row_scale[b] : 1.f;
  const int64_t slot = r.slots[b * r.slots_s];
  const int64_t blk = slot / bs, off = slot % bs;
  float* nsc = reinterpret_cast<float*>(nkv + 2 * D);
  for (int kv = 0; kv < 2; ++kv) {
    const QT* row = base + (group + kv) * D;
    float y[D / 32];
    uint32_t m = 0;
#pragma unroll
    for (int i = 0; i < D / 32; ++i) {
      const int d = lane + 32 * i;
      y[i] = kv == 0 ? rope_elem<QT, D>(row, cs, sn, d, rs, scaled) : row_scaled(row, d, rs, scaled);
      m = max(m, __float_as_uint(y[i]) & 0x7fffffffu);  // NaN's bits above inf's: NaN propagates
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) m = max(m, __shfl_xor_sync(kFull, m, o));
    const float amax = __uint_as_float(m);
    const float scale = amax > 0.f ? __fdiv_rn(amax, 448.f) : 1.f;
    uint8_t* dst = (kv == 0 ? r.kc : r.vc) + blk * c_sb + off * c_st + h * c_sh;
#pragma unroll
    for (int i = 0; i < D / 32; ++i) {
      float v = __fdiv_rn(y[i], scale);
      v = v < -448.f ? -448.f : (v > 448.f ? 448.f : v);
      const uint8_t byte = static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
      dst[lane + 32 * i] = byte;
      nkv[kv * D + lane + 32 * i] = byte;
    }
    if (lane == 0) {
      (kv == 0 ? r.ks : r.vs)[blk * s_sb + off * s_st + h] = scale;
      nsc[kv] = scale;
    }
  }
}

// The context position whose cache slot is slots[b] when that is the last one (ctx - 1), which
// the chunk walk then takes from `nkv`; else -1 (a slot elsewhere is written, not read this step)
template <typename IT>
__device__ __forceinline__ int rope_patch_pos(const RopeIn& r, const IT* bt, int64_t bt_s, int b, int ctx,
                                              int bs) {
  const int p = ctx - 1;
  const int64_t at = static_cast<int64_t>(bt[b * bt_s + p / bs]) * bs + p % bs;
  return r.slots[b * r.slots_s] == at ? p : -1;
}

}  // namespace
