// The blockwise FP8 recipe's GEMMs through CUTLASS's Hopper kernels (warp-specialised, TMA, wgmma,
// the partial sums promoted with their scales every 128 of K): y (M, N) bf16 = a (M, K) @ b (N, K)^T,
// a with one scale per 1 x 128 tile along K, b with one per 1 x 128 tile (the weight gradient: dy.T
// and x.T, both along the tokens) or per 128 x 128 block (the forward and dgrad's weight).
//
// Why: cuBLAS's tile x tile kernel runs at ~73 % of its tensorwise rate at the training shape's
// wgrad (r1mega/bench/RECORDS.md); CUTLASS's ping-pong schedule lets one warpgroup promote its
// partial sums while the other's MMAs run. Scales are float32 and MN-major (column-major
// (rows, K / 128)), the only layout CUTLASS's sm90 kernels take, as cuBLAS's. Built for sm_90a
// only, with the CUTLASS headers of the nvidia-cutlass package (setup.py finds them).
// Reference: r1mega.precision.gemm.emulated_gemm (tests/gpu/test_fp8_blockwise_cutlass_gpu.py).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace {

using namespace cute;

// GranN: 1 (b's scales per row: tile x tile) or 128 (per 128 x 128 block)
template <int GranN, class Tile, class Cluster, class Schedule, class EpiSchedule>
struct Blockwise {
  using A = cutlass::float_e4m3_t;
  using D = cutlass::bfloat16_t;
  using Scales = cutlass::detail::Sm90BlockwiseScaleConfig<1, GranN, 128, cute::GMMA::Major::MN,
                                                           cute::GMMA::Major::MN>;
  using LayoutSFA = decltype(Scales::deduce_layoutSFA());
  using LayoutSFB = decltype(Scales::deduce_layoutSFB());
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor, 8,
      D, cutlass::layout::RowMajor, 8, EpiSchedule,
      cutlass::epilogue::fusion::LinearCombination<D, float, void, float>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, A, cute::tuple<cutlass::layout::RowMajor, LayoutSFA>, 16,
      A, cute::tuple<cutlass::layout::ColumnMajor, LayoutSFB>, 16, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      Schedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static void run(const at::Tensor& a, const at::Tensor& sfa, const at::Tensor& b, const at::Tensor& sfb,
                  at::Tensor& y) {
    const int m = a.size(0), n = b.size(0), k = a.size(1);
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    auto sa = cutlass::make_cute_packed_stride(StrideA{}, make_shape(m, k, 1));
    auto sb = cutlass::make_cute_packed_stride(StrideB{}, make_shape(n, k, 1));
    auto sd = cutlass::make_cute_packed_stride(StrideD{}, make_shape(m, n, 1));
    auto lsfa = Scales::tile_atom_to_shape_SFA(make_shape(m, n, k, 1));
    auto lsfb = Scales::tile_atom_to_shape_SFB(make_shape(m, n, k, 1));
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {reinterpret_cast<const A*>(a.data_ptr()), sa, reinterpret_cast<const A*>(b.data_ptr()), sb,
         sfa.data_ptr<float>(), lsfa, sfb.data_ptr<float>(), lsfb},
        {{}, nullptr, sd, reinterpret_cast<D*>(y.data_ptr()), sd}};
    args.epilogue.thread.alpha = 1.f;
    args.epilogue.thread.beta = 0.f;
    Gemm gemm;
    TORCH_CHECK(gemm.can_implement(args) == cutlass::Status::kSuccess,
                "fp8 blockwise gemm: CUTLASS cannot run ", m, " x ", n, " x ", k, " with this tile");
    const size_t ws = Gemm::get_workspace_size(args);
    auto workspace = at::empty({static_cast<int64_t>(ws)}, a.options().dtype(at::kByte));
    auto stream = at::cuda::getCurrentCUDAStream();
    TORCH_CHECK(gemm.initialize(args, workspace.data_ptr(), stream) == cutlass::Status::kSuccess,
                "fp8 blockwise gemm: CUTLASS initialize failed");
    TORCH_CHECK(gemm.run(stream) == cutlass::Status::kSuccess, "fp8 blockwise gemm: CUTLASS run failed");
  }
};

using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8Blockwise;
using Ping = cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8Blockwise;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using PingEpi = cutlass::epilogue::TmaWarpSpecialized;

// (M tile, N tile) rows and columns each config needs the problem to be a multiple of
constexpr int kConfigs = 3;
const char* kNames[kConfigs] = {"coop128x128", "ping64x128", "coop128x128c2"};

template <int GranN>
void dispatch(int config, const at::Tensor& a, const at::Tensor& sfa, const at::Tensor& b,
              const at::Tensor& sfb, at::Tensor& y) {
  switch (config) {
    case 0:
      Blockwise<GranN, Shape<_128, _128, _128>, Shape<_1, _1, _1>, Coop, CoopEpi>::run(a, sfa, b, sfb, y);
      break;
    case 1:
      Blockwise<GranN, Shape<_64, _128, _128>, Shape<_1, _1, _1>, Ping, PingEpi>::run(a, sfa, b, sfb, y);
      break;
    default:
      Blockwise<GranN, Shape<_128, _128, _128>, Shape<_1, _2, _1>, Coop, CoopEpi>::run(a, sfa, b, sfb, y);
  }
}

void check_scales(const at::Tensor& s, int64_t rows, int64_t kb, const char* name) {
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 2 && s.size(0) == rows && s.size(1) == kb &&
                  s.stride(0) == 1 && (kb == 1 || s.stride(1) == rows),
              "fp8 blockwise gemm: ", name, " must be float32 (", rows, ", ", kb,
              ") column-major (strides (1, rows))");
}

at::Tensor blockwise_gemm(at::Tensor a, at::Tensor sfa, at::Tensor b, at::Tensor sfb, bool b_blocks, int64_t config) {
  TORCH_CHECK(a.is_cuda() && b.is_cuda(), "fp8 blockwise gemm: CUDA tensors");
  TORCH_CHECK(a.scalar_type() == at::kFloat8_e4m3fn && b.scalar_type() == at::kFloat8_e4m3fn,
              "fp8 blockwise gemm: e4m3 operands");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1) && a.stride(1) == 1 && b.stride(1) == 1 &&
                  a.stride(0) == a.size(1) && b.stride(0) == b.size(1),
              "fp8 blockwise gemm: a (M, K) and b (N, K) contiguous row-major with one K");
  TORCH_CHECK(config >= 0 && config < kConfigs, "fp8 blockwise gemm: config ", config, " of ", kConfigs);
  const int64_t m = a.size(0), n = b.size(0), k = a.size(1);
  TORCH_CHECK(k % 128 == 0 && m % 128 == 0 && n % 128 == 0,
              "fp8 blockwise gemm: M, N and K must be multiples of 128, got ", m, " x ", n, " x ", k);
  check_scales(sfa, m, k / 128, "a's scales");
  check_scales(sfb, b_blocks ? n / 128 : n, k / 128, "b's scales");
  const c10::cuda::CUDAGuard guard(a.device());
  auto y = at::empty({m, n}, a.options().dtype(at::kBFloat16));
  if (b_blocks) {
    dispatch<128>(static_cast<int>(config), a, sfa, b, sfb, y);
  } else {
    dispatch<1>(static_cast<int>(config), a, sfa, b, sfb, y);
  }
  return y;
}

std::vector<std::string> configs() { return std::vector<std::string>(kNames, kNames + kConfigs); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &blockwise_gemm, "y (M, N) bf16 = a (M, K) @ b (N, K)^T, e4m3, 1x128 tiles x 1x128 tiles or 128x128 blocks");
  m.def("configs", &configs, "the tile configurations, by index");
}
