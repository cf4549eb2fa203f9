// Decode attention over the FP8 (e4m3) paged KV cache on tensor cores (R1MEGA_PAGED_FP8=mma):
// the same CTA, chunk walk, cp.async ring and merge as the CUDA-core kernel beside it
// (csrc/paged_decode_kernel.cu), with both products as f16 MMAs (m16n8k16, float32 accumulators).
// The CUDA-core kernel issues ~1,100 instructions a lane per 16-key chunk (q from shared memory,
// e4m3 -> f32 conversions, shuffle reductions), so instruction issue, not DRAM, bounds it at four
// CTAs an SM; here a chunk is 16 MMAs and ~250 other instructions.
//
//   S^T (16 keys x 8 heads) = K (16 x D) q^T (D x 8): A = the chunk's K rows converted to f16
//       (exact for e4m3), B = q pre-scaled into log2 units, in registers for the whole walk. The
//       dot runs over D in any order as long as A's columns and B's rows agree, so a lane's A
//       values come from whole 16-byte pieces of its two rows (pieces j, j + 4, ...): one shared
//       load for four k-steps, and B takes the same permutation once.
//   O^T (D x 8) += V^T (D x 16 keys) P^T (16 x 8): A = V^T, whose two keys a register pairs sit a
//       row apart in the cache, so each lane loads its four keys' D/8 bytes (one piece at D 128)
//       and pairs them with byte permutes; the MMA's M rows are dims in a permuted order
//       (row g of m-tile t = dim D/8 * g + 2t, row g + 8 the next), undone when the output is
//       written. B = P^T: S^T's accumulator layout transposed by movmatrix, no shared memory.
// Heads past the group (N is 8) carry q = 0 and are never written; groups up to 8 fit.
//
// Scales: s = (q . k8) * k_scale per key; p * v_scale goes into the f16 P^T divided by the
// largest v_scale the warp has seen (a running reference, rescaled like the running max), so
// a small v_scale never pushes p * v_scale into f16's subnormals; the reference multiplies the
// accumulator back at the merge.
//
// Shared memory: each 16-byte piece of a ring row sits at piece ^ swizzle(key), which spreads
// both the K loads (rows g, g + 8; pieces j) and the V loads (keys 2j, 2j + 1, ...; piece g) of
// one quarter-warp over all 32 banks at D 128.
#pragma once
#include "paged_decode_common.cuh"
#include "paged_decode_rope.cuh"
#include "paged_decode_rows.cuh"

namespace {

template <int PIECES>
__device__ __forceinline__ int ring_piece(int key, int part) {
  return part ^ (((((key >> 1) & 3) << 1) ^ ((key & 1) << 2)) & (PIECES - 1));
}

// HPC: KV heads a CTA takes, WPH warps each (the rows epilogue wants a sequence's whole row)
template <int D, int HPC = 1, int WPH = kWarps, bool ROPE = false>
struct MmaSmem {
  static constexpr int kAllWarps = HPC * WPH;
  static constexpr int kRing = kAllWarps * kStages * 2 * kChunk * D;    // e4m3 K | V per chunk
  static constexpr int kScales = kAllWarps * kStages * 2 * kChunk * 4;  // float32 k | v scales
  static constexpr int kMl = 3 * kAllWarps * 8 * 4;                     // m, l per head; v reference
  static constexpr int kNew = ROPE ? RopeSmem<D>::kBytes : 0;           // the new token's k | v row
  static constexpr int kBytes = kRing + kScales + kMl + kNew;
  // the merge's partial accumulators (warps, 8, D) float32 reuse the K|V rings
  static_assert(kAllWarps * 8 * D * 4 <= kRing, "the merge buffer must fit in the ring");
};

// Two e4m3 bytes (the low one first) -> f16x2 bits, the low byte's value in the low half.
__device__ __forceinline__ uint32_t e4m3x2_h2(uint32_t two) {
  const __half2_raw h =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two & 0xffffu), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}

__device__ __forceinline__ uint32_t pack_h2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// c += a b: m16n8k16, a row-major f16 (4 registers), b column-major f16 (2), c float32 (4)
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// An 8 x 8 f16 tile in the accumulator's row layout -> its transpose in the same layout
__device__ __forceinline__ uint32_t transpose_8x8(uint32_t x) {
  uint32_t y;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// The D / 8 bytes of chunk key `key` that lane group g multiplies in O^T (D/32 words)
template <int D>
__device__ __forceinline__ void v_words(const uint8_t* vr, int key, int g, uint32_t (&w)[D / 32]) {
  constexpr int PIECES = D / 16;
  if constexpr (D >= 128) {
#pragma unroll
    for (int u = 0; u < D / 128; ++u) {
      const uint4 x = *reinterpret_cast<const uint4*>(vr + key * D + ring_piece<PIECES>(key, (D / 128) * g + u) * 16);
      w[4 * u] = x.x, w[4 * u + 1] = x.y, w[4 * u + 2] = x.z, w[4 * u + 3] = x.w;
    }
  } else {
    const uint2 x = *reinterpret_cast<const uint2*>(vr + key * D + ring_piece<PIECES>(key, g / 2) * 16 + (g % 2) * 8);
    w[0] = x.x, w[1] = x.y;
  }
}

// Arguments as paged_decode_fp8_kernel's (csrc/paged_decode_kernel.cu), and `rows` (ROWS, with
// HPC = Hkv): o_proj's input row quantised here (csrc/paged_decode_rows.cuh). A CTA takes HPC KV
// heads of one sequence, WPH warps each, which split the head's chunks (fewer warps a head: each
// walks more chunks, and more CTAs fit an SM); the grid's head axis is Hkv / HPC.
// CLUSTER (with TILES' thread layout): one scale a row, a sequence's CTAs one cluster.
// ROPE (one KV head a CTA): q, k and v come from linear_qkv's output `rope` (q is unused), rotated
// here, and the new k and v rows are written to the cache (csrc/paged_decode_rope.cuh).
template <typename QT, int D, typename IT, int HPC, bool ROWS, int WPH = kWarps, bool TILES = false,
          bool CLUSTER = false, bool ROPE = false>
__global__ void __launch_bounds__(WPH * 32 * HPC)
    paged_decode_fp8_mma_kernel(const QT* __restrict__ q, int64_t q_sb, int64_t q_sh,
                                const uint8_t* __restrict__ kc, const uint8_t* __restrict__ vc,
                                int64_t c_sb, int64_t c_st, int64_t c_sh,
                                const float* __restrict__ ks, const float* __restrict__ vs,
                                int64_t s_sb, int64_t s_st, const IT* __restrict__ bt,
                                int64_t bt_s, const int32_t* __restrict__ ctx_lens,
                                QT* __restrict__ out, int64_t o_sb, int64_t o_sh, int group, int bs,
                                float scale_log2, bool heads_inner, RowsOut rows, RopeIn rope) {
  constexpr int PIECES = D / 16;   // 16-byte pieces of a cache row
  constexpr int KT = D / 16;       // k-steps of S^T, m-tiles of O^T
  constexpr int VB = D / 8;        // V bytes (dims) a lane takes of each of its keys
  constexpr int SEGS = kChunk * PIECES;
  static_assert(!ROWS || WPH == kWarps, "the rows epilogue's outputs a thread assume kWarps warps a head");
  static_assert(!TILES || (!ROWS && HPC == 1 && WPH * 32 == D),
                "the tiles epilogue takes one thread a dim of one KV head's outputs");
  static_assert(!CLUSTER || TILES, "the cluster rows epilogue keeps the tiles' thread layout");
  static_assert(!ROPE || HPC == 1, "RoPE in the kernel takes one KV head a CTA");
  using S = MmaSmem<D, HPC, WPH, ROPE>;
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* ring = smem;                                                 // [warp][stage][K|V][key][D]
  float* sc_ring = reinterpret_cast<float*>(smem + S::kRing);            // [warp][stage][k|v][key]
  float* m_s = reinterpret_cast<float*>(smem + S::kRing + S::kScales);   // [warp][head]
  float* l_s = m_s + S::kAllWarps * 8;
  float* r_s = l_s + S::kAllWarps * 8;                                   // [warp]
  float(*acc_s)[8][D] = reinterpret_cast<float(*)[8][D]>(smem);          // after the loop only
  uint8_t* nkv = smem + S::kRing + S::kScales + S::kMl;                  // ROPE: [k|v][D], 2 scales

  const int b = heads_inner ? blockIdx.y : blockIdx.x;
  const int h0 = (heads_inner ? blockIdx.x : blockIdx.y) * HPC;  // the CTA's first KV head
  // wid: the warp in the CTA (its ring, its partial results); warp: in its head's WPH, which
  // split the head's chunks
  const int wid = threadIdx.x / 32, warp = wid % WPH, h = h0 + wid / WPH, lane = threadIdx.x % 32;
  const int g = lane / 4, j = lane % 4;  // the MMA fragments' row group and column pair
  const int ctx = ctx_lens[b];
  const int n_chunks = (ctx + kChunk - 1) / kChunk;
  const int my_chunks = warp < n_chunks ? (n_chunks - warp + WPH - 1) / WPH : 0;

  auto issue = [&](int it) {
    if (it < my_chunks) {
      const int n0 = (warp + it * WPH) * kChunk;
      const int64_t blk = static_cast<int64_t>(bt[b * bt_s + n0 / bs]);
      const int slot0 = n0 % bs;
      const int64_t base = blk * c_sb + slot0 * c_st + h * c_sh;
      uint8_t* kd = ring + ((wid * kStages + it % kStages) * 2) * kChunk * D;
      uint8_t* vd = kd + kChunk * D;
#pragma unroll
      for (int e = lane; e < SEGS; e += 32) {
        const int key = e / PIECES, part = e % PIECES;
        const int64_t src = base + key * c_st + part * 16;
        const int dst = key * D + ring_piece<PIECES>(key, part) * 16;
        const int n = n0 + key < ctx ? 16 : 0;
        cp_async16(kd + dst, kc + src, n);
        cp_async16(vd + dst, vc + src, n);
      }
      const int key = lane % kChunk;
      const float* src = (lane < kChunk ? ks : vs) + blk * s_sb + (slot0 + key) * s_st + h;
      cp_async4(sc_ring + ((wid * kStages + it % kStages) * 2) * kChunk + lane, src,
                n0 + key < ctx ? 4 : 0);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int it = 0; it < kStages - 1; ++it) issue(it);
  int patch = -1;  // ROPE: the context position the walk takes from nkv
  if constexpr (ROPE) {
    // the warp whose walk takes position ctx - 1 makes the new rows (its loads queue behind its
    // own copies, which it waits for anyway), so no other warp waits on them
    if (warp == ((ctx - 1) / kChunk) % WPH) {
      rope_write_new_kv<QT, D>(rope, b, h, group, bs, c_sb, c_st, c_sh, s_sb, s_st, nkv);
      __syncwarp();  // nkv written by the lanes that read it in the walk
    }
    patch = rope_patch_pos(rope, bt, bt_s, b, ctx, bs);
  }

  // B of S^T: k rows 2j, 2j + 1 (and + 8, + 9) of k-step t are dims d0, d0 + 1 (d0 + 2, d0 + 3)
  uint32_t qb[KT][2];
  float f[KT][4];
  if constexpr (ROPE) {  // rotated here from KV head h's q heads in linear_qkv's output
    const QT* x_row = static_cast<const QT*>(rope.qkv) + b * rope.x_sb + h * rope.x_sh + g * D;
    const QT* cs = static_cast<const QT*>(rope.cos) + b * rope.cs_sb;
    const QT* sn = static_cast<const QT*>(rope.sin) + b * rope.cs_sb;
    const bool scaled = rope.row_scale != nullptr;
    const float rs = scaled ? rope.row_scale[b] : 1.f;
    if (g < group) {
      if constexpr (D >= 128) {
        rope_q_lane<QT, D>(x_row, cs, sn, j, rs, scaled, f);
      } else {
#pragma unroll
        for (int t = 0; t < KT; ++t)
#pragma unroll
          for (int x = 0; x < 4; ++x)
            f[t][x] = rope_elem<QT, D>(x_row, cs, sn, 64 * (t / 4) + 16 * j + 4 * (t % 4) + x, rs, scaled);
      }
    } else {
#pragma unroll
      for (int t = 0; t < KT; ++t) f[t][0] = f[t][1] = f[t][2] = f[t][3] = 0.f;
    }
  } else {
#pragma unroll
    for (int t = 0; t < KT; ++t)
#pragma unroll
      for (int x = 0; x < 4; ++x)
        f[t][x] = g < group ? to_float(q[b * q_sb + (h * group + g) * q_sh + 64 * (t / 4) + 16 * j + 4 * (t % 4) + x])
                            : 0.f;
  }
#pragma unroll
  for (int t = 0; t < KT; ++t) {
    qb[t][0] = pack_h2(f[t][0] * scale_log2, f[t][1] * scale_log2);
    qb[t][1] = pack_h2(f[t][2] * scale_log2, f[t][3] * scale_log2);
  }
  // heads 2j and 2j + 1: running max (log2 units) and this lane's part of the sum
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  float vref = 1.17549435e-38f;  // FLT_MIN: any real v_scale replaces it; zeros leave p * 0
  float acc[KT][4];
#pragma unroll
  for (int t = 0; t < KT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;

  for (int it = 0; it < my_chunks; ++it) {
    issue(it + kStages - 1);
    cp_async_wait<kStages - 1>();
    __syncwarp();
    const int n0 = (warp + it * WPH) * kChunk;
    const uint8_t* kr = ring + ((wid * kStages + it % kStages) * 2) * kChunk * D;
    const uint8_t* vr = kr + kChunk * D;
    const float* sc = sc_ring + ((wid * kStages + it % kStages) * 2) * kChunk;
    if constexpr (ROPE) {
      if (patch >= n0 && patch < n0 + kChunk) {  // the new token: its row as written, not as read
        const int key = patch - n0;
        uint8_t* kw = ring + ((wid * kStages + it % kStages) * 2) * kChunk * D;
        if (lane < 2 * PIECES) {
          const int kv = lane / PIECES, part = lane % PIECES;
          *reinterpret_cast<uint4*>(kw + kv * kChunk * D + key * D + ring_piece<PIECES>(key, part) * 16) =
              *reinterpret_cast<const uint4*>(nkv + kv * D + part * 16);
        }
        if (lane < 2)
          sc_ring[((wid * kStages + it % kStages) * 2 + lane) * kChunk + key] =
              reinterpret_cast<const float*>(nkv + 2 * D)[lane];
        __syncwarp();
      }
    }

    // S^T: c[0], c[1] = key g, heads 2j, 2j + 1; c[2], c[3] = key g + 8
    float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int i = 0; i < D / 64; ++i) {
      const uint4 lo = *reinterpret_cast<const uint4*>(kr + g * D + ring_piece<PIECES>(g, 4 * i + j) * 16);
      const uint4 hi = *reinterpret_cast<const uint4*>(kr + (g + 8) * D + ring_piece<PIECES>(g + 8, 4 * i + j) * 16);
      const uint32_t wl[4] = {lo.x, lo.y, lo.z, lo.w}, wh[4] = {hi.x, hi.y, hi.z, hi.w};
#pragma unroll
      for (int tt = 0; tt < 4; ++tt) {
        const uint32_t a[4] = {e4m3x2_h2(wl[tt]), e4m3x2_h2(wh[tt]), e4m3x2_h2(wl[tt] >> 16),
                               e4m3x2_h2(wh[tt] >> 16)};
        mma_16816(s, a, qb[4 * i + tt][0], qb[4 * i + tt][1]);
      }
    }
    const bool ok0 = n0 + g < ctx, ok1 = n0 + g + 8 < ctx;
    s[0] = ok0 ? s[0] * sc[g] : -INFINITY;
    s[1] = ok0 ? s[1] * sc[g] : -INFINITY;
    s[2] = ok1 ? s[2] * sc[g + 8] : -INFINITY;
    s[3] = ok1 ? s[3] * sc[g + 8] : -INFINITY;
    float c0 = fmaxf(s[0], s[2]), c1 = fmaxf(s[1], s[3]);
    float cv = fmaxf(sc[kChunk + g], sc[kChunk + g + 8]);  // past the context: zero-filled
#pragma unroll
    for (int off = 4; off < 32; off *= 2) {  // over the lanes of one column pair j
      c0 = fmaxf(c0, __shfl_xor_sync(kFull, c0, off));
      c1 = fmaxf(c1, __shfl_xor_sync(kFull, c1, off));
      cv = fmaxf(cv, __shfl_xor_sync(kFull, cv, off));
    }
    const float mn0 = fmaxf(m0, c0), mn1 = fmaxf(m1, c1);  // finite: key 0 is in the context
    const float a0 = exp2f(m0 - mn0), a1 = exp2f(m1 - mn1);
    const float vnew = fmaxf(vref, cv), beta = vref / vnew;
    m0 = mn0, m1 = mn1, vref = vnew;
    const float p0 = exp2f(s[0] - mn0), p1 = exp2f(s[1] - mn1);
    const float p2 = exp2f(s[2] - mn0), p3 = exp2f(s[3] - mn1);
    l0 = l0 * a0 + p0 + p2;
    l1 = l1 * a1 + p1 + p3;
    const float sa0 = a0 * beta, sa1 = a1 * beta;
#pragma unroll
    for (int t = 0; t < KT; ++t) acc[t][0] *= sa0, acc[t][1] *= sa1, acc[t][2] *= sa0, acc[t][3] *= sa1;
    const float w0 = sc[kChunk + g] / vnew, w1 = sc[kChunk + g + 8] / vnew;
    // B of O^T: rows keys 2j, 2j + 1 (+ 8, + 9), column head g
    const uint32_t pb0 = transpose_8x8(pack_h2(p0 * w0, p1 * w0));
    const uint32_t pb1 = transpose_8x8(pack_h2(p2 * w1, p3 * w1));

    uint32_t v0[D / 32], v1[D / 32], v8[D / 32], v9[D / 32];
    v_words<D>(vr, 2 * j, g, v0);
    v_words<D>(vr, 2 * j + 1, g, v1);
    v_words<D>(vr, 2 * j + 8, g, v8);
    v_words<D>(vr, 2 * j + 9, g, v9);
#pragma unroll
    for (int t = 0; t < KT; ++t) {
      // bytes 2t, 2t + 1 of the lane's D / 8: dims VB * g + 2t (row g) and + 1 (row g + 8)
      const uint32_t sel = (t & 1) ? 0x7362u : 0x5140u;
      const uint32_t lo = __byte_perm(v0[t / 2], v1[t / 2], sel);  // key 2j, 2j + 1 of both dims
      const uint32_t hi = __byte_perm(v8[t / 2], v9[t / 2], sel);
      const uint32_t a[4] = {e4m3x2_h2(lo), e4m3x2_h2(lo >> 16), e4m3x2_h2(hi), e4m3x2_h2(hi >> 16)};
      mma_16816(acc[t], a, pb0, pb1);
    }
    __syncwarp();  // the next iteration's copies overwrite what was read here
  }
  cp_async_wait<0>();
  __syncthreads();

#pragma unroll
  for (int off = 4; off < 32; off *= 2) {  // the sums over all of the warp's keys
    l0 += __shfl_xor_sync(kFull, l0, off);
    l1 += __shfl_xor_sync(kFull, l1, off);
  }
  if (g == 0) {
    m_s[wid * 8 + 2 * j] = m0, m_s[wid * 8 + 2 * j + 1] = m1;
    l_s[wid * 8 + 2 * j] = l0, l_s[wid * 8 + 2 * j + 1] = l1;
  }
  if (lane == 0) r_s[wid] = vref;
#pragma unroll
  for (int t = 0; t < KT; ++t) {
    const int d = VB * g + 2 * t;
    acc_s[wid][2 * j][d] = acc[t][0], acc_s[wid][2 * j + 1][d] = acc[t][1];
    acc_s[wid][2 * j][d + 1] = acc[t][2], acc_s[wid][2 * j + 1][d + 1] = acc[t][3];
  }
  __syncthreads();
  // The merge: element e of the CTA's HPC * group heads' outputs, head-major (as a row of
  // o_proj's input). With ROWS each thread keeps its outputs (at most group * D / 128 <= D / 16)
  // for the epilogue; without, the loop stays a plain one (fewer registers).
  const int n_out = HPC * group * D;
  auto merged = [&](int e) {
    const int w0 = (e / (group * D)) * WPH, hd = (e / D) % group, d = e % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = w0; w < w0 + WPH; ++w) mx = fmaxf(mx, m_s[w * 8 + hd]);
    float den = 0.f, num = 0.f;
#pragma unroll
    for (int w = w0; w < w0 + WPH; ++w) {  // a warp that took no chunk has m = -inf: weight 0
      const float f = exp2f(m_s[w * 8 + hd] - mx);
      den += l_s[w * 8 + hd] * f;
      num += acc_s[w][hd][d] * r_s[w] * f;
    }
    const QT o = from_float<QT>(num / den);
    out[b * o_sb + (h0 * group + e / D) * o_sh + d] = o;
    return o;
  };
  if constexpr (ROWS) {
    constexpr int kPer = D / 16;
    float vals[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = threadIdx.x + i * blockDim.x;
      vals[i] = e < n_out ? to_float(merged(e)) : 0.f;
    }
    quantize_row<kPer, HPC * WPH>(rows, vals, b, n_out);
  } else if constexpr (TILES) {
    float vals[8];  // head i's dim threadIdx.x (element threadIdx.x + i * D of the CTA's outputs)
#pragma unroll
    for (int i = 0; i < 8; ++i) vals[i] = i < group ? to_float(merged(threadIdx.x + i * D)) : 0.f;
    if constexpr (CLUSTER)
      quantize_row_cluster<WPH>(rows, vals, b, h0 * group, group);
    else
      quantize_head_tiles<WPH>(rows, vals, b, h0 * group, group);
  } else {
    for (int e = threadIdx.x; e < n_out; e += blockDim.x) merged(e);
  }
}

}  // namespace
