// The FP8 rollout's decode-sized GEMM on Hopper's wgmma: y (M, N) = (a @ w^T) * s_w [* s_a row]
// in bf16, a (M, K) and w (N, K) e4m3 row-major (K contiguous in both, as FP8 wgmma wants).
//
// At a decode step's M (a few hundred rows) cuBLAS tiles the output 128 x 128 and each CTA walks
// all of K: 256 x 3072 (qkv of the 852M shape) is 48 CTAs on 132 SMs, which is why those GEMMs
// ran at a third of their bytes floor. Here K is split over a thread-block cluster of S CTAs
// (grid z = cluster z): each multiplies its K range, writes its float32 tile to its own shared
// memory, and after a cluster barrier CTA r sums rows r * BM / S ... of all S tiles through
// distributed shared memory, in rank order (the same sum whichever CTA finishes first), applies
// the scales and stores bf16. No workspace, no second kernel, no counters.
//
// Each CTA: BM / 64 warpgroups, one m64nBNk32 wgmma each per 32 bytes of K; the stages (BM + BN)
// rows of 128 bytes, loaded by the tensor memory accelerator (one thread issues a stage's two box
// copies, an mbarrier counts their bytes) in the 128-byte-swizzle layout the wgmma descriptors
// name (16-byte piece p of row r at p ^ (r % 8), 8-row groups 1,024 bytes apart, every stage
// 1,024-aligned); rows past M arrive as zeros. ST - 1 stages (one loop) or ST (producer warp) in
// flight from the start: a decode GEMM is bound by the bytes it streams. (cp.async copies issued
// by every thread were slower still: bench/RECORDS.md.)
//
// Reference: the float64 product of the dequantised operands (tests/gpu/test_fp8_wgmma_gpu.py).
// Built for sm_90a only (wgmma); on other GPUs the Python side does not call it.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#include <cuda.h>
#include <cuda_bf16.h>
#include <cudaTypedefs.h>
#include <torch/extension.h>

#include <cstdint>

namespace cg = cooperative_groups;

namespace {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define R1MEGA_HAVE_WGMMA 1
#endif

constexpr int kBK = 128;  // K bytes a stage holds of each row: one 128-byte swizzle row

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t phase) {
  asm volatile(
      "{\n.reg .pred P1;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@P1 bra DONE;\nbra WAIT;\nDONE:\n}\n" ::"r"(bar), "r"(phase) : "memory");
}
// a box of the 2-D tensor map (c0 along K, c1 along rows) into shared memory, counted on bar
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n"
      ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1) : "memory");
}

// wgmma's shared-memory matrix descriptor: K-major rows of 128 bytes, 128-byte swizzle, 8-row
// groups 1,024 bytes apart (the leading offset is unused with swizzling)
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

#ifdef R1MEGA_HAVE_WGMMA
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }

// d (64 x 64) += a (64 x 32) b (64 x 32)^T: e4m3 from shared memory, float32 accumulators
__device__ __forceinline__ void wgmma_n64(float (&d)[32], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, %32, %33, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db), "r"(1));
}

// d (64 x 128) += a (64 x 32) b (128 x 32)^T: e4m3 from shared memory, float32 accumulators
__device__ __forceinline__ void wgmma_n128(float (&d)[64], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(1));
}

template <int BN>
__device__ __forceinline__ void wgmma_k32(float (&d)[BN / 2], uint64_t da, uint64_t db) {
  if constexpr (BN == 128) wgmma_n128(d, da, db);
  else wgmma_n64(d, da, db);
}

// keeps the compiler from moving accumulator reads or writes across the asynchronous MMAs
template <int R>
__device__ __forceinline__ void fence_regs(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
#endif

// WS: a producer warp after the warpgroups issues the copies, each stage released by an "empty"
// mbarrier once every warpgroup's MMAs on it are done, and each warpgroup keeps one k-block's
// MMAs in flight while it waits for the next (no CTA-wide barrier in the loop)
template <int BM, int BN, int S, int ST, bool WS = false>
struct Cfg {
  static constexpr int kConsumers = BM / 64 * 128;
  static constexpr int kThreads = kConsumers + (WS ? 32 : 0);
  static constexpr int kStage = (BM + BN) * kBK;
  static constexpr int kLd = BN + 8;  // float32 row stride of the split-K tile (bank spread)
  static constexpr int kRed = S > 1 ? BM * kLd * 4 : 0;
  static constexpr int kSmem = (ST * kStage > kRed ? ST * kStage : kRed) + 1024;  // + alignment
};

template <int BM, int BN, int S, int ST, bool WS>
__global__ void __launch_bounds__(Cfg<BM, BN, S, ST, WS>::kThreads)
    fp8_wgmma_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_w,
                     __nv_bfloat16* __restrict__ y, int64_t ldy, const float* __restrict__ w_scale,
                     const float* __restrict__ a_scale, int64_t a_scale_stride, int M, int K) {
#ifdef R1MEGA_HAVE_WGMMA
  using C = Cfg<BM, BN, S, ST, WS>;
  constexpr int kA = BM * kBK;
  extern __shared__ uint8_t smem_raw[];
  __shared__ __align__(8) uint64_t full[ST];   // a stage's bytes have landed
  __shared__ __align__(8) uint64_t empty[ST];  // WS: every warpgroup is done with a stage
  // the same offset in every CTA of the cluster (distributed shared memory addresses by offset)
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t sbase = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t bar0 = static_cast<uint32_t>(__cvta_generic_to_shared(full));
  const uint32_t ebar0 = static_cast<uint32_t>(__cvta_generic_to_shared(empty));

  const int tid = threadIdx.x, wg = tid / 128, lane = tid % 32, warp = (tid % 128) / 32;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM, rank = blockIdx.z;
  const int kb_per = K / kBK / S, kb0 = rank * kb_per;

  if (tid == 0) {
#pragma unroll
    for (int i = 0; i < ST; ++i) {
      mbar_init(bar0 + 8 * i, 1);
      mbar_init(ebar0 + 8 * i, BM / 64);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  }
  __syncthreads();
  auto copy = [&](int i) {  // this CTA's k-block i into stage i % ST
    const uint32_t sa = sbase + (i % ST) * C::kStage, bar = bar0 + 8 * (i % ST);
    mbar_expect(bar, C::kStage);
    tma_load(sa, &map_a, (kb0 + i) * kBK, m0, bar);
    tma_load(sa + kA, &map_w, (kb0 + i) * kBK, n0, bar);
  };
  auto mma = [&](float (&acc)[BN / 2], int i) {  // this warpgroup's MMAs on stage i % ST
    mbar_wait(bar0 + 8 * (i % ST), (i / ST) & 1);
    const uint32_t sa = sbase + (i % ST) * C::kStage + wg * 64 * kBK, sb = sbase + (i % ST) * C::kStage + kA;
    wgmma_fence();
    fence_regs(acc);
#pragma unroll
    for (int kk = 0; kk < kBK / 32; ++kk) wgmma_k32<BN>(acc, smem_desc(sa + kk * 32), smem_desc(sb + kk * 32));
    wgmma_commit();
  };

  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
  if constexpr (WS) {
    if (tid >= C::kConsumers) {  // the producer warp
      if (tid == C::kConsumers)
        for (int i = 0; i < kb_per; ++i) {
          if (i >= ST) mbar_wait(ebar0 + 8 * (i % ST), (i / ST - 1) & 1);
          copy(i);
        }
    } else {
      for (int i = 0; i < kb_per; ++i) {
        mma(acc, i);
        wgmma_wait<1>();  // k-block i - 1's MMAs are done: its stage can be refilled
        fence_regs(acc);
        if (i > 0 && tid % 128 == 0) mbar_arrive(ebar0 + 8 * ((i - 1) % ST));
      }
      wgmma_wait<0>();
      fence_regs(acc);
    }
  } else {
    if (tid == 0)
      for (int i = 0; i < ST - 1 && i < kb_per; ++i) copy(i);
    for (int i = 0; i < kb_per; ++i) {
      __syncthreads();  // every warpgroup is done with stage (i - 1) % ST: refill it
      if (tid == 0 && i + ST - 1 < kb_per) copy(i + ST - 1);
      mma(acc, i);
      wgmma_wait<0>();
      fence_regs(acc);
    }
  }

  const float ws = *w_scale;
  // accumulator (64 x BN a warpgroup): value 4j + 2h + e at row 16 warp + lane / 4 + 8h, column
  // 8j + 2 (lane % 4) + e
  const int row0 = wg * 64 + warp * 16 + lane / 4, col0 = 2 * (lane % 4);
  const bool consumer = tid < C::kConsumers;
  if constexpr (S == 1) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int gm = m0 + row0 + 8 * h;
      if (consumer && gm < M) {
        const float s = a_scale != nullptr ? ws * a_scale[gm * a_scale_stride] : ws;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
          *reinterpret_cast<__nv_bfloat162*>(y + gm * ldy + n0 + 8 * j + col0) =
              __floats2bfloat162_rn(acc[4 * j + 2 * h] * s, acc[4 * j + 2 * h + 1] * s);
      }
    }
  } else {
    __syncthreads();  // the stages are free: the float32 tile goes where they were
    float* red = reinterpret_cast<float*>(smem);
    if (consumer)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
          *reinterpret_cast<float2*>(red + (row0 + 8 * h) * C::kLd + 8 * j + col0) =
              make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    constexpr int kRows = BM / S, kV = BN / 4;
    for (int e = tid; e < kRows * kV; e += C::kThreads) {
      const int r = rank * kRows + e / kV, c = 4 * (e % kV), gm = m0 + r;
      float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int q = 0; q < S; ++q) {  // rank order: the same sum whichever CTA finished first
        const float4 v = *reinterpret_cast<const float4*>(cluster.map_shared_rank(red + r * C::kLd + c, q));
        sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
      }
      if (gm < M) {
        const float s = a_scale != nullptr ? ws * a_scale[gm * a_scale_stride] : ws;
        __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(y + gm * ldy + n0 + c);
        dst[0] = __floats2bfloat162_rn(sum.x * s, sum.y * s);
        dst[1] = __floats2bfloat162_rn(sum.z * s, sum.w * s);
      }
    }
    cluster.sync();  // no CTA leaves while another still reads its tile
  }
#else
  __trap();  // built without sm_90a's wgmma: the Python side never launches it there
#endif
}

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q;
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q));
    TORCH_CHECK(q == cudaDriverEntryPointSuccess && p != nullptr, "fp8 wgmma gemm: the driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// (rows, K) e4m3 row-major -> boxes of `box_rows` x 128 bytes in the 128-byte swizzle; rows past
// the end read as zeros
CUtensorMap tensor_map(const at::Tensor& t, int box_rows) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(t.size(1)), static_cast<cuuint64_t>(t.size(0))};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(t.stride(0))};
  const cuuint32_t box[2] = {kBK, static_cast<cuuint32_t>(box_rows)}, unit[2] = {1, 1};
  const CUresult r = encode_fn()(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, t.data_ptr(), dims, strides, box, unit,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "fp8 wgmma gemm: cuTensorMapEncodeTiled failed (", static_cast<int>(r), ") for ",
              t.sizes(), " strides ", t.strides());
  return map;
}

template <int BM, int BN, int S, int ST, bool WS>
void launch_ws(const at::Tensor& a, const at::Tensor& w, at::Tensor& y, const at::Tensor& w_scale,
               const float* a_scale, int64_t a_scale_stride) {
  using C = Cfg<BM, BN, S, ST, WS>;
  auto kernel = fp8_wgmma_kernel<BM, BN, S, ST, WS>;
  static bool attr_set = false;  // per instantiation; the host calls come from one thread
  if (!attr_set) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem));
    attr_set = true;
  }
  const int M = static_cast<int>(a.size(0)), N = static_cast<int>(w.size(0)), K = static_cast<int>(a.size(1));
  const CUtensorMap map_a = tensor_map(a, BM), map_w = tensor_map(w, BN);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(N / BN, (M + BM - 1) / BM, S);
  cfg.blockDim = dim3(C::kThreads);
  cfg.dynamicSmemBytes = C::kSmem;
  cfg.stream = at::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = S;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, map_a, map_w, reinterpret_cast<__nv_bfloat16*>(y.data_ptr()),
                                    y.stride(0), w_scale.data_ptr<float>(), a_scale, a_scale_stride, M, K));
}

template <int BM, int BN, int S, int ST>
void launch(const at::Tensor& a, const at::Tensor& w, at::Tensor& y, const at::Tensor& w_scale,
            const float* a_scale, int64_t a_scale_stride, bool producer_warp) {
  if (producer_warp) launch_ws<BM, BN, S, ST, true>(a, w, y, w_scale, a_scale, a_scale_stride);
  else launch_ws<BM, BN, S, ST, false>(a, w, y, w_scale, a_scale, a_scale_stride);
}

}  // namespace

// The configurations (BM, BN, K split, stages) by index: r1mega/precision/wgmma_gemm.py's CONFIGS
// lists the same, and picks one per problem.
void fp8_wgmma_gemm_cuda(const at::Tensor& a, const at::Tensor& w, at::Tensor& y, const at::Tensor& w_scale,
                         const c10::optional<at::Tensor>& a_scale, int64_t config, bool producer_warp) {
  const float* as = a_scale.has_value() ? a_scale->data_ptr<float>() : nullptr;
  const int64_t ass = a_scale.has_value() ? a_scale->stride(0) : 0;
  switch (config) {
    case 0: launch<64, 128, 1, 6>(a, w, y, w_scale, as, ass, producer_warp); break;
    case 1: launch<64, 128, 2, 6>(a, w, y, w_scale, as, ass, producer_warp); break;
    case 2: launch<64, 128, 4, 6>(a, w, y, w_scale, as, ass, producer_warp); break;
    case 3: launch<128, 128, 1, 3>(a, w, y, w_scale, as, ass, producer_warp); break;
    case 4: launch<128, 128, 2, 6>(a, w, y, w_scale, as, ass, producer_warp); break;
    case 5: launch<128, 128, 4, 6>(a, w, y, w_scale, as, ass, producer_warp); break;
    case 6: launch<128, 64, 1, 4>(a, w, y, w_scale, as, ass, producer_warp); break;
    case 7: launch<128, 64, 2, 6>(a, w, y, w_scale, as, ass, producer_warp); break;
    case 8: launch<128, 64, 4, 6>(a, w, y, w_scale, as, ass, producer_warp); break;
    case 9: launch<256, 128, 2, 4>(a, w, y, w_scale, as, ass, producer_warp); break;
    case 10: launch<256, 128, 4, 4>(a, w, y, w_scale, as, ass, producer_warp); break;
    case 11: launch<256, 128, 8, 4>(a, w, y, w_scale, as, ass, producer_warp); break;
    case 12: launch<256, 64, 4, 5>(a, w, y, w_scale, as, ass, producer_warp); break;
    case 13: launch<256, 64, 8, 5>(a, w, y, w_scale, as, ass, producer_warp); break;
    default: TORCH_CHECK(false, "fp8 wgmma gemm: no configuration ", config);
  }
}
