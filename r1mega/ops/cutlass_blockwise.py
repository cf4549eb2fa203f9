"""CUTLASS's Hopper kernels for the blockwise FP8 recipe's GEMMs (csrc/fp8_blockwise_gemm.cu):
a (M, K) with 1x128 tile scales times b (N, K) with 1x128 tile scales (the weight gradient) or
128x128 block scales (forward, dgrad), bf16 out.

``R1MEGA_FP8_BLOCKWISE_GEMM`` picks who runs them: ``cublas`` (default: torch's scaled_mm) or
``cutlass`` (this extension, where it loads and the sizes are multiples of 128; cuBLAS
otherwise). ``R1MEGA_FP8_CUTLASS_CONFIG`` picks the tile configuration (the extension's
``configs()``, by index).
"""
from __future__ import annotations

import torch

from r1mega import switches
from r1mega.ops.cuda_libs import cutlass_include_dirs
from r1mega.ops.extension import CudaExtension


def _libraries():
    found = cutlass_include_dirs()
    return None if found is None else (found, [])


_EXT = CudaExtension("r1mega_cutlass_cuda", ["fp8_blockwise_gemm.cu"], "R1MEGA_CUTLASS",
                     ["-std=c++17", "--expt-relaxed-constexpr"],
                     "the blockwise FP8 GEMMs run cuBLAS's", libraries=_libraries,
                     arch_flags=["-gencode=arch=compute_90a,code=sm_90a"])
get, load_error = _EXT.get, _EXT.load_error


def choice() -> str:
    return switches.choice("R1MEGA_FP8_BLOCKWISE_GEMM", "cublas", {
        "cublas": "torch.nn.functional.scaled_mm (cuBLAS)",
        "cutlass": "CUTLASS's warp-specialised kernels (csrc/fp8_blockwise_gemm.cu)"})


def config() -> int:
    return int(switches.choice("R1MEGA_FP8_CUTLASS_CONFIG", "1", {
        "0": "128x128 tiles, cooperative", "1": "64x128 tiles, ping-pong",
        "2": "128x128 tiles, cooperative, clusters of 2 along N"}))


def serves(a_data: torch.Tensor, b_data: torch.Tensor) -> bool:
    """Whether the CUTLASS route takes this product (the switch, the device, the sizes)."""
    if choice() != "cutlass" or not a_data.is_cuda or torch.cuda.get_device_capability(a_data.device) != (9, 0):
        return False
    (m, k), n = a_data.shape, b_data.shape[0]
    # TMA reads the operands: 16-byte aligned starts (a view into a larger tensor may not be)
    aligned = a_data.data_ptr() % 16 == 0 and b_data.data_ptr() % 16 == 0
    return m % 128 == 0 and n % 128 == 0 and k % 128 == 0 and aligned and get() is not None


def blockwise_gemm(a_data, a_scale, b_data, b_scale, b_block: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """(M, K) tiles x (N, K) tiles or blocks -> (M, N) through CUTLASS (bf16 out, cast after
    for another dtype); the scales float32 with strides (1, rows), as
    r1mega.precision.gemm._colmajor makes them."""
    y = get().gemm(a_data.contiguous(), a_scale, b_data.contiguous(), b_scale, b_block, config())
    return y if out_dtype == torch.bfloat16 else y.to(out_dtype)
