// MoE token dispatch kernels (r1mega_moe_cuda). PyTorch references: r1mega/moe/dispatch.py.
//
// Layout contract (shared with the reference):
//   indices (T, k): expert of each (token, slot); flat entry i = t * k + j.
//   counts (E) int32, offsets (E + 1) int32: expert e owns permuted rows [offsets[e], offsets[e+1]),
//     the first counts[e] of them real, the rest zero padding up to a multiple of `align`.
//   row_map (T, k) int32: permuted row of each entry (-1 when the expert index is out of range).
//   src_entry (R) int32: flat entry of each permuted row, -1 for padding; R = T*k + E*(align-1)
//     is fixed on the host so that nothing waits for the device to learn the real row count.
//   Within an expert, rows follow the flat entry order (token-major), like megatron-core.
//
// The copy kernels are token-centric: each token's row is read once and written to its k rows
// (permute), or its k rows are read and combined in float32 into one (unpermute). Reading each
// token once is what lets permute run at the bytes floor (T*H read + T*k*H written).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <map>
#include <mutex>
#include <tuple>
#include <vector>

namespace cg = cooperative_groups;

namespace {

constexpr int kMetaThreads = 512;
constexpr int kMetaWarps = kMetaThreads / 32;
constexpr int kMaxExperts = 2 * kMetaThreads;  // the offsets scan covers two experts a thread
constexpr int kCopyThreads = 256;

// ---------------------------------------------------------------------------------------------
// (a) routing metadata, one cooperative launch. Each block owns a contiguous range of entries.
//   phase 1: per-block expert counts -> workspace; src_entry := -1.            grid sync
//   phase 2: every block derives totals, padded offsets and its own per-expert start.
//   phase 3: stable ranks inside the block, tile by tile (warp match + per-warp counts).
// ---------------------------------------------------------------------------------------------
template <typename idx_t>
__global__ void __launch_bounds__(kMetaThreads) routing_metadata_kernel(
    const idx_t* __restrict__ indices, int64_t num_entries, int num_experts, int align,
    int* __restrict__ block_counts,  // (gridDim.x, E) workspace
    int* __restrict__ counts, int* __restrict__ offsets, int* __restrict__ row_map,
    int* __restrict__ src_entry, int64_t num_rows) {
  extern __shared__ int smem[];
  int* s_cnt = smem;                          // (E) this block's counts, later its running base
  int* s_scan = s_cnt + num_experts;          // (E) padded totals -> exclusive offsets
  int* s_tile = s_scan + num_experts;         // (E) tile totals
  int* s_warp = s_tile + num_experts;         // (kMetaWarps, E) per-warp counts of the tile
  cg::grid_group grid = cg::this_grid();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t tiles = (num_entries + kMetaThreads - 1) / kMetaThreads;
  const int64_t tiles_per_block = (tiles + gridDim.x - 1) / gridDim.x;
  const int64_t begin = min((int64_t)blockIdx.x * tiles_per_block, tiles) * kMetaThreads;
  const int64_t end = min(begin + tiles_per_block * kMetaThreads, num_entries);

  for (int e = tid; e < num_experts; e += kMetaThreads) s_cnt[e] = 0;
  for (int i = tid; i < kMetaWarps * num_experts; i += kMetaThreads) s_warp[i] = 0;
  for (int64_t r = (int64_t)blockIdx.x * kMetaThreads + tid; r < num_rows;
       r += (int64_t)gridDim.x * kMetaThreads)
    src_entry[r] = -1;
  __syncthreads();
  for (int64_t i = begin + tid; i < end; i += kMetaThreads) {
    const int64_t e = (int64_t)indices[i];
    if (e >= 0 && e < num_experts) atomicAdd(&s_cnt[e], 1);
  }
  __syncthreads();
  for (int e = tid; e < num_experts; e += kMetaThreads)
    block_counts[(int64_t)blockIdx.x * num_experts + e] = s_cnt[e];
  grid.sync();

  // phase 2: totals over all blocks and the prefix over the blocks before this one.
  for (int e = tid; e < num_experts; e += kMetaThreads) {
    int before = 0, total = 0;
#pragma unroll 8
    for (int b = 0; b < (int)gridDim.x; ++b) {
      const int c = block_counts[(int64_t)b * num_experts + e];
      before += (b < (int)blockIdx.x) ? c : 0;
      total += c;
    }
    s_cnt[e] = before;
    s_tile[e] = total;
    s_scan[e] = (total + align - 1) / align * align;
  }
  __syncthreads();
  // Inclusive Hillis-Steele scan of the padded totals (E <= kMetaThreads * 2, checked on host).
  for (int step = 1; step < num_experts; step <<= 1) {
    int v[2] = {0, 0};
    for (int q = 0; q < 2; ++q) {
      const int e = tid + q * kMetaThreads;
      if (e < num_experts && e >= step) v[q] = s_scan[e - step];
    }
    __syncthreads();
    for (int q = 0; q < 2; ++q) {
      const int e = tid + q * kMetaThreads;
      if (e < num_experts) s_scan[e] += v[q];
    }
    __syncthreads();
  }
  for (int e = tid; e < num_experts; e += kMetaThreads) {
    const int padded = (s_tile[e] + align - 1) / align * align;
    const int start = s_scan[e] - padded;  // exclusive offset
    if (blockIdx.x == 0) {
      counts[e] = s_tile[e];
      offsets[e] = start;
      if (e == num_experts - 1) offsets[num_experts] = s_scan[e];
    }
    s_cnt[e] += start;  // this block's first row for expert e
  }
  __syncthreads();

  // phase 3: stable ranks. Within a warp, peers with the same expert are found by match_any;
  // across warps, an exclusive scan of per-warp counts per expert; across tiles, a running base.
  for (int64_t tile = begin; tile < end; tile += kMetaThreads) {
    const int64_t i = tile + tid;
    int e = -1;
    if (i < end) {
      const int64_t v = (int64_t)indices[i];
      e = (v >= 0 && v < num_experts) ? (int)v : -1;
    }
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    if (e >= 0 && rank == 0) s_warp[warp * num_experts + e] = __popc(peers);
    __syncthreads();
    for (int x = tid; x < num_experts; x += kMetaThreads) {
      int run = 0;
      for (int w = 0; w < kMetaWarps; ++w) {
        const int c = s_warp[w * num_experts + x];
        s_warp[w * num_experts + x] = run;
        run += c;
      }
      s_tile[x] = run;
    }
    __syncthreads();
    if (i < end) {
      if (e >= 0) {
        const int row = s_cnt[e] + s_warp[warp * num_experts + e] + rank;
        row_map[i] = row;
        src_entry[row] = (int)i;
      } else {
        row_map[i] = -1;
      }
    }
    __syncthreads();
    for (int x = tid; x < num_experts; x += kMetaThreads) {
      s_cnt[x] += s_tile[x];
      for (int w = 0; w < kMetaWarps; ++w) s_warp[w * num_experts + x] = 0;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Vector helpers: VEC elements of scalar_t per 16-byte (or narrower) access.
// ---------------------------------------------------------------------------------------------
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// acc_t is float for 16/32-bit inputs and double for double (the gradcheck path).
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// (b) permute: out[row_map[t, j]] = x[t] for every j; padding rows are zeroed by the same grid.
template <typename T, int VEC>
__global__ void permute_kernel(const T* __restrict__ x, const int* __restrict__ row_map,
                               const int* __restrict__ src_entry, T* __restrict__ out,
                               int64_t num_tokens, int topk, int64_t hidden, int64_t num_rows) {
  const int64_t nvec = hidden / VEC;
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    const Pack<T, VEC>* src = reinterpret_cast<const Pack<T, VEC>*>(x + t * hidden);
    for (int64_t c = threadIdx.x; c < nvec; c += blockDim.x) {
      const Pack<T, VEC> v = src[c];
      for (int j = 0; j < topk; ++j) {
        const int row = row_map[t * topk + j];
        if (row >= 0) reinterpret_cast<Pack<T, VEC>*>(out + (int64_t)row * hidden)[c] = v;
      }
    }
  }
  Pack<T, VEC> zero;
  for (int q = 0; q < VEC; ++q) zero.v[q] = T(0);
  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    if (src_entry[r] >= 0) continue;
    Pack<T, VEC>* dst = reinterpret_cast<Pack<T, VEC>*>(out + r * hidden);
    for (int64_t c = threadIdx.x; c < nvec; c += blockDim.x) dst[c] = zero;
  }
}

// (c) unpermute + combine: out[t] = sum_j w[t, j] * y[row_map[t, j]], accumulated in acc_t.
// Without weights (w == nullptr) it is the backward of permute (sum of the k copies' grads).
template <typename T, typename W, int VEC>
__global__ void unpermute_kernel(const T* __restrict__ y, const int* __restrict__ row_map,
                                 const W* __restrict__ w, T* __restrict__ out, int64_t num_tokens,
                                 int topk, int64_t hidden) {
  using acc_t = typename Acc<T>::type;
  const int64_t nvec = hidden / VEC;
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    for (int64_t c = threadIdx.x; c < nvec; c += blockDim.x) {
      acc_t acc[VEC];
      for (int q = 0; q < VEC; ++q) acc[q] = acc_t(0);
      for (int j = 0; j < topk; ++j) {
        const int row = row_map[t * topk + j];
        if (row < 0) continue;
        const acc_t scale = w ? static_cast<acc_t>(w[t * topk + j]) : acc_t(1);
        const Pack<T, VEC> v = reinterpret_cast<const Pack<T, VEC>*>(y + (int64_t)row * hidden)[c];
        for (int q = 0; q < VEC; ++q) acc[q] += scale * static_cast<acc_t>(v.v[q]);
      }
      Pack<T, VEC> o;
      for (int q = 0; q < VEC; ++q) o.v[q] = static_cast<T>(acc[q]);
      reinterpret_cast<Pack<T, VEC>*>(out + t * hidden)[c] = o;
    }
  }
}

// Backward of unpermute + combine, one warp per token: grad_y[row] = w * g[t] and
// grad_w[t, j] = <g[t], y[row]> (warp reduction in acc_t); padding rows of grad_y are zeroed.
// The k rows of a token are taken kUnpermuteUnroll at a time: each lane issues all their loads
// before using any, and their dot products are reduced together by shuffles, with no block
// barrier (a row of hidden 2048 is only eight 16-byte loads a lane).
constexpr int kUnpermuteUnroll = 4;

template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kCopyThreads, 3) unpermute_backward_kernel(const T* __restrict__ g, const T* __restrict__ y,
                                          const int* __restrict__ row_map, const W* __restrict__ w,
                                          const int* __restrict__ src_entry, T* __restrict__ grad_y,
                                          W* __restrict__ grad_w, int64_t num_tokens, int topk,
                                          int64_t hidden, int64_t num_rows) {
  using acc_t = typename Acc<T>::type;
  constexpr int U = kUnpermuteUnroll;
  const int64_t nvec = hidden / VEC;
  const int lane = threadIdx.x & 31;
  const int64_t warps_per_block = blockDim.x >> 5;
  const int64_t first = (int64_t)blockIdx.x * warps_per_block + (threadIdx.x >> 5);
  for (int64_t t = first; t < num_tokens; t += (int64_t)gridDim.x * warps_per_block) {
    for (int j0 = 0; j0 < topk; j0 += U) {
      const int nj = min(U, topk - j0);
      int rows[U];
      acc_t scale[U], dot[U];
#pragma unroll
      for (int q = 0; q < U; ++q) {
        rows[q] = q < nj ? row_map[t * topk + j0 + q] : -1;  // uniform across the warp
        scale[q] = rows[q] >= 0 ? static_cast<acc_t>(w[t * topk + j0 + q]) : acc_t(0);
        dot[q] = acc_t(0);
      }
      for (int64_t c = lane; c < nvec; c += 32) {
        const Pack<T, VEC> gv = reinterpret_cast<const Pack<T, VEC>*>(g + t * hidden)[c];
        Pack<T, VEC> yv[U];
#pragma unroll
        for (int q = 0; q < U; ++q)
          if (rows[q] >= 0) yv[q] = reinterpret_cast<const Pack<T, VEC>*>(y + (int64_t)rows[q] * hidden)[c];
#pragma unroll
        for (int q = 0; q < U; ++q) {
          if (rows[q] < 0) continue;
          Pack<T, VEC> o;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const acc_t gq = static_cast<acc_t>(gv.v[e]);
            dot[q] += gq * static_cast<acc_t>(yv[q].v[e]);
            o.v[e] = static_cast<T>(scale[q] * gq);
          }
          reinterpret_cast<Pack<T, VEC>*>(grad_y + (int64_t)rows[q] * hidden)[c] = o;
        }
      }
      acc_t mine = acc_t(0);
#pragma unroll
      for (int q = 0; q < U; ++q) {
        for (int off = 16; off > 0; off >>= 1) dot[q] += __shfl_xor_sync(0xffffffffu, dot[q], off);
        if (q == lane) mine = rows[q] >= 0 ? dot[q] : acc_t(0);  // a static index: no local memory
      }
      if (lane < nj) grad_w[t * topk + j0 + lane] = static_cast<W>(mine);
    }
  }
  Pack<T, VEC> zero;
  for (int q = 0; q < VEC; ++q) zero.v[q] = T(0);
  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    if (src_entry[r] >= 0) continue;
    Pack<T, VEC>* dst = reinterpret_cast<Pack<T, VEC>*>(grad_y + r * hidden);
    for (int64_t c = threadIdx.x; c < nvec; c += blockDim.x) dst[c] = zero;
  }
}

// Widest vector (<= 16 bytes) that divides the row and every base pointer's alignment.
template <typename T>
int pick_vec(int64_t hidden, std::initializer_list<const void*> ptrs) {
  int vec = 16 / (int)sizeof(T);
  while (vec > 1) {
    bool ok = hidden % vec == 0;
    for (const void* p : ptrs) ok = ok && (reinterpret_cast<uintptr_t>(p) % (vec * sizeof(T)) == 0);
    if (ok) break;
    vec /= 2;
  }
  return vec;
}

// ATen/cuda/CUDAContext.h is avoided on purpose: it pulls in cuSPARSE/cuBLAS headers that a bare
// CUDA toolkit may lack, and nothing here needs them.
int sm_count() {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

int copy_grid(int64_t work) {
  const int sms = sm_count();
  return (int)std::max<int64_t>(1, std::min<int64_t>(work, (int64_t)sms * 16));
}

#define R1MEGA_VEC_SWITCH(vec, ...)                       \
  switch (vec) {                                          \
    case 8: { constexpr int VEC = 8; __VA_ARGS__; break; } \
    case 4: { constexpr int VEC = 4; __VA_ARGS__; break; } \
    case 2: { constexpr int VEC = 2; __VA_ARGS__; break; } \
    default: { constexpr int VEC = 1; __VA_ARGS__; break; } \
  }

}  // namespace

// Blocks of the cooperative metadata launch, cached per (device, num_experts, index type): the
// occupancy query costs host time on every call otherwise. The kernel's dynamic shared-memory
// limit is raised once, to what the largest supported expert count needs: the attribute belongs
// to the kernel, not to a launch, so setting it per expert count would let a small count shrink
// it under a later large one. One block per SM at most: more blocks only add to the grid
// barrier and to the per-block prefix reads (measured on the H200 at 16k tokens x top-8 of 256).
template <typename index_t>
int metadata_blocks(int dev, int64_t num_experts, size_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<int, int64_t, size_t>, int> cache;
  static std::map<std::pair<int, size_t>, bool> attribute_set;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(dev, num_experts, sizeof(index_t));
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto kernel = routing_metadata_kernel<index_t>;
  if (!attribute_set[{dev, sizeof(index_t)}]) {
    const int max_smem = (int)(sizeof(int) * kMaxExperts * (3 + kMetaWarps));
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
    attribute_set[{dev, sizeof(index_t)}] = true;
  }
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kMetaThreads, smem));
  TORCH_CHECK(per_sm > 0, "r1mega_moe_cuda: routing metadata does not fit on device ", dev,
              " with num_experts=", num_experts);
  const int blocks = sm_count();  // per_sm >= 1 guarantees these are co-resident
  cache[key] = blocks;
  return blocks;
}

std::vector<at::Tensor> routing_metadata_cuda(const at::Tensor& indices, int64_t num_experts,
                                              int64_t align, int64_t num_rows, int64_t max_blocks) {
  const c10::cuda::CUDAGuard guard(indices.device());
  const int64_t num_entries = indices.numel();
  const size_t smem = sizeof(int) * (size_t)num_experts * (3 + kMetaWarps);
  const int dev = indices.get_device();
  std::vector<at::Tensor> result;
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "routing_metadata_cuda", [&] {
    auto kernel = routing_metadata_kernel<index_t>;
    const int64_t tiles = (num_entries + kMetaThreads - 1) / kMetaThreads;
    int64_t blocks = std::min<int64_t>(metadata_blocks<index_t>(dev, num_experts, smem), tiles);
    if (max_blocks > 0) blocks = std::min(blocks, max_blocks);
    blocks = std::max<int64_t>(blocks, 1);
    // One allocation for all outputs and the workspace: allocator calls dominate the host time.
    const int64_t n_counts = num_experts, n_offsets = num_experts + 1;
    const int64_t total = n_counts + n_offsets + num_entries + num_rows + blocks * num_experts;
    auto buf = at::empty({total}, indices.options().dtype(at::kInt));
    auto counts = buf.narrow(0, 0, n_counts);
    auto offsets = buf.narrow(0, n_counts, n_offsets);
    auto row_map = buf.narrow(0, n_counts + n_offsets, num_entries).view(indices.sizes());
    auto src_entry = buf.narrow(0, n_counts + n_offsets + num_entries, num_rows);
    int* ws = buf.data_ptr<int>() + n_counts + n_offsets + num_entries + num_rows;
    const index_t* idx_ptr = indices.data_ptr<index_t>();
    int* c = counts.data_ptr<int>();
    int* o = offsets.data_ptr<int>();
    int* rm = row_map.data_ptr<int>();
    int* se = src_entry.data_ptr<int>();
    int ne = (int)num_experts, al = (int)align;
    int64_t n = num_entries, nr = num_rows;
    void* args[] = {(void*)&idx_ptr, (void*)&n, (void*)&ne, (void*)&al, (void*)&ws,
                    (void*)&c, (void*)&o, (void*)&rm, (void*)&se, (void*)&nr};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel((const void*)kernel, dim3((unsigned)blocks), dim3(kMetaThreads),
                                               args, smem, c10::cuda::getCurrentCUDAStream()));
    result = {counts, offsets, row_map, src_entry};
  });
  return result;
}

at::Tensor permute_cuda(const at::Tensor& x, const at::Tensor& row_map, const at::Tensor& src_entry) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t num_tokens = x.size(0), hidden = x.size(1), topk = row_map.size(1);
  const int64_t num_rows = src_entry.numel();
  auto out = at::empty({num_rows, hidden}, x.options());
  if (hidden == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "permute_cuda", [&] {
    const int vec = pick_vec<scalar_t>(hidden, {x.data_ptr(), out.data_ptr()});
    R1MEGA_VEC_SWITCH(vec, permute_kernel<scalar_t, VEC><<<copy_grid(std::max(num_tokens, num_rows)),
                                                           kCopyThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), row_map.data_ptr<int>(), src_entry.data_ptr<int>(), out.data_ptr<scalar_t>(),
        num_tokens, (int)topk, hidden, num_rows));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor unpermute_cuda(const at::Tensor& y, const at::Tensor& row_map, const c10::optional<at::Tensor>& weights) {
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t num_tokens = row_map.size(0), topk = row_map.size(1), hidden = y.size(1);
  auto out = at::empty({num_tokens, hidden}, y.options());
  if (hidden == 0 || num_tokens == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "unpermute_cuda", [&] {
    const int vec = pick_vec<scalar_t>(hidden, {y.data_ptr(), out.data_ptr()});
    auto stream = c10::cuda::getCurrentCUDAStream();
    if (weights.has_value() && weights->scalar_type() == at::kDouble) {
      R1MEGA_VEC_SWITCH(vec, unpermute_kernel<scalar_t, double, VEC><<<copy_grid(num_tokens), kCopyThreads, 0, stream>>>(
          y.data_ptr<scalar_t>(), row_map.data_ptr<int>(), weights->data_ptr<double>(), out.data_ptr<scalar_t>(),
          num_tokens, (int)topk, hidden));
    } else {
      const float* wp = weights.has_value() ? weights->data_ptr<float>() : nullptr;
      R1MEGA_VEC_SWITCH(vec, unpermute_kernel<scalar_t, float, VEC><<<copy_grid(num_tokens), kCopyThreads, 0, stream>>>(
          y.data_ptr<scalar_t>(), row_map.data_ptr<int>(), wp, out.data_ptr<scalar_t>(), num_tokens, (int)topk,
          hidden));
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::vector<at::Tensor> unpermute_backward_cuda(const at::Tensor& grad_out, const at::Tensor& y,
                                                const at::Tensor& row_map, const at::Tensor& weights,
                                                const at::Tensor& src_entry) {
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t num_tokens = row_map.size(0), topk = row_map.size(1), hidden = y.size(1);
  const int64_t num_rows = y.size(0);
  auto grad_y = at::empty_like(y);
  auto grad_w = at::empty_like(weights);
  if (hidden == 0) {
    grad_w.zero_();
    return {grad_y, grad_w};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "unpermute_backward_cuda", [&] {
    const int vec = pick_vec<scalar_t>(hidden, {y.data_ptr(), grad_out.data_ptr(), grad_y.data_ptr()});
    auto stream = c10::cuda::getCurrentCUDAStream();
    const int grid = copy_grid(std::max(num_tokens, num_rows));
    if (weights.scalar_type() == at::kDouble) {
      R1MEGA_VEC_SWITCH(vec, unpermute_backward_kernel<scalar_t, double, VEC><<<grid, kCopyThreads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), row_map.data_ptr<int>(), weights.data_ptr<double>(),
          src_entry.data_ptr<int>(), grad_y.data_ptr<scalar_t>(), grad_w.data_ptr<double>(), num_tokens, (int)topk,
          hidden, num_rows));
    } else {
      R1MEGA_VEC_SWITCH(vec, unpermute_backward_kernel<scalar_t, float, VEC><<<grid, kCopyThreads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), row_map.data_ptr<int>(), weights.data_ptr<float>(),
          src_entry.data_ptr<int>(), grad_y.data_ptr<scalar_t>(), grad_w.data_ptr<float>(), num_tokens, (int)topk,
          hidden, num_rows));
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_y, grad_w};
}
