"""The FP8 rollout's decode GEMM on Hopper's wgmma with K split in a cluster (csrc/fp8_wgmma*):
``y = (a @ w.T) * s_w [* s_a]`` in bf16.

At a decode step's few hundred rows cuBLAS's FP8 kernels tile the output 128 x 128 and walk all
of K per CTA, so qkv (256 x 3072) and o_proj (256 x 2048) of the 852M shape run on a third of
the SMs, at a third to a half of their bytes floor (bench/RECORDS.md, thirty-third session). A
split through L2 (the Triton kernel of r1mega/precision/triton_skinny_gemm.py, cuBLASLt's K
splits) cost more than it won. Here the K parts of a tile are CTAs of one cluster and sum
through distributed shared memory, in rank order, inside the one launch; the tensor memory
accelerator streams the operands.

``a`` (M, K) and ``w`` (N, K) e4m3 row-major, ``w_scale`` one float32, ``a_scale`` None (the
output then lacks a's row scales, as :func:`r1mega.precision.gemm.row_tensor_gemm_unscaled`'s)
or (M, 1) float32 row scales. Its reference is the float64 product of the dequantised operands
(tests/gpu/test_fp8_wgmma_gpu.py). Switched by ``R1MEGA_FP8_WGMMA``, off: on an H100 it was
slower than cuBLAS at every decode GEMM of the 852M shape (bench/RECORDS.md).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch

from r1mega import switches
from r1mega.ops.extension import CudaExtension

ENABLED = switches.flag("R1MEGA_FP8_WGMMA", False,
                        "decode-sized row x tensor FP8 GEMMs through the wgmma kernel with K split "
                        "in a thread-block cluster (Hopper)")
PRODUCER_WARP = switches.flag("R1MEGA_FP8_WGMMA_WS", False,
                              "the wgmma GEMM's warp-specialised pipeline (a producer warp, per-stage "
                              "empty barriers, MMAs in flight across stages)")
MAX_ROWS = 512  # decode-sized calls only

# (BM, BN, K split, stages) by index, as csrc/fp8_wgmma_kernel.cu's switch
CONFIGS = ((64, 128, 1, 6), (64, 128, 2, 6), (64, 128, 4, 6), (128, 128, 1, 3), (128, 128, 2, 6),
           (128, 128, 4, 6), (128, 64, 1, 4), (128, 64, 2, 6), (128, 64, 4, 6),
           # 256-row tiles (4 warpgroups): the weight read once from L2 at 256 rows, not twice;
           # only through R1MEGA_FP8_WGMMA_CONFIG (sweeps) until timed
           (256, 128, 2, 4), (256, 128, 4, 4), (256, 128, 8, 4), (256, 64, 4, 5), (256, 64, 8, 5))
PICKED_TILE_ROWS = (64, 128)  # the tile heights config() chooses among
# the most K parts config() splits into: on an H100 every 4-way split was slower than the 2-way
# one or no split (the float32 tiles' exchange grows with the parts; bench/RECORDS.md)
PICKED_MAX_SPLIT = 2
SMEM_PER_SM = 228 * 1024  # Hopper: 227 KB a CTA at most, 228 KB an SM (1 KB reserved a CTA)

_EXT = CudaExtension("r1mega_wgmma_cuda", ["fp8_wgmma.cpp", "fp8_wgmma_kernel.cu"], "R1MEGA_WGMMA",
                     ["-lineinfo"], "the FP8 decode GEMMs run cuBLAS",
                     arch_flags=["-gencode=arch=compute_90a,code=sm_90a"])
launches = 0  # host-side calls (a CUDA graph's capture counts once): tests see the route taken


def enabled(on: bool = True):
    """The switch set to ``on`` inside a with-block (benches and tests; runs read R1MEGA_FP8_WGMMA)."""
    return switches.overridden(sys.modules[__name__], "ENABLED", on)


def smem_bytes(cfg: tuple[int, int, int, int]) -> int:
    """Dynamic shared memory of a configuration: its stages, or the split-K float32 tile if
    larger, and 1 KB to align the swizzled stages."""
    bm, bn, split, stages = cfg
    red = bm * (bn + 8) * 4 if split > 1 else 0
    return max(stages * (bm + bn) * 128, red) + 1024


def usable(index: int, m: int, n: int, k: int) -> bool:
    bm, bn, split, _ = CONFIGS[index]
    return n % bn == 0 and k % (128 * split) == 0 and k // (128 * split) >= 2 and (bm == 64) == (m <= 64)


def config(m: int, n: int, k: int, sms: int = 132) -> Optional[int]:
    """The configuration index for an (m, n, k) call, or None when none fits: the grid in as few
    waves as it can be (CTAs an SM by shared memory), then as many SMs busy as possible, then the
    wider tile and the smaller split. ``R1MEGA_FP8_WGMMA_CONFIG`` forces an index (sweeps)."""
    env = os.environ.get("R1MEGA_FP8_WGMMA_CONFIG")
    if env:
        i = int(env)
        return i if 0 <= i < len(CONFIGS) and usable(i, m, n, k) else None
    best = None
    for i, cfg in enumerate(CONFIGS):
        if not usable(i, m, n, k) or cfg[0] not in PICKED_TILE_ROWS or cfg[2] > PICKED_MAX_SPLIT:
            continue
        bm, bn, split, _ = cfg
        ctas = -(-m // bm) * (n // bn) * split
        per_sm = max(1, min(SMEM_PER_SM // (smem_bytes(cfg) + 1024), 2048 // (bm // 64 * 128)))
        key = (-(-ctas // (sms * per_sm)), -min(ctas, sms), -bn, split)
        if best is None or key < best[0]:
            best = (key, i)
    return None if best is None else best[1]


def why_not(a: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
            a_scale: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why (M, K) x (N, K) operands cannot go to the kernel here, or None. Never loads the
    extension while dynamo traces (an import there splits the graph): it must be loaded before."""
    if not a.is_cuda:
        return f"the operands are on {a.device}, not a GPU"
    compiling = torch.compiler.is_compiling()
    if not compiling and torch.cuda.get_device_capability(a.device) != (9, 0):
        return "wgmma needs an sm_90 GPU (Hopper)"
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        return f"a (M, K) and w (N, K) matrices, got {tuple(a.shape)} and {tuple(w.shape)}"
    if a.dtype != torch.float8_e4m3fn or w.dtype != torch.float8_e4m3fn:
        return f"a and w must be e4m3, got {a.dtype} and {w.dtype}"
    if out_dtype != torch.bfloat16:
        return f"the kernel writes bf16, not {out_dtype}"
    if a.stride(1) != 1 or w.stride(1) != 1 or a.stride(0) % 16 or w.stride(0) % 16:
        return "a and w need unit column stride and row strides of 16-byte multiples"
    # no data_ptr() while dynamo traces (it splits the graph there); the extension checks it
    if not compiling and (a.data_ptr() % 16 or w.data_ptr() % 16):
        return "a and w must be 16-byte aligned"
    if not 0 < a.shape[0] <= MAX_ROWS:
        return f"a has {a.shape[0]} rows; the kernel takes 1 to {MAX_ROWS} (decode sizes)"
    if a_scale is not None and (a_scale.dtype != torch.float32 or a_scale.numel() != a.shape[0]):
        return f"a_scale must be one float32 a row of a, got {tuple(a_scale.shape)} {a_scale.dtype}"
    # N and K only (the weight's, static): a decode step traces with a symbolic batch, and the
    # op picks its configuration from the real one; these two fit one at every row count
    if w.shape[0] % 128 or a.shape[1] % 256:
        return f"N {w.shape[0]} and K {a.shape[1]} must be multiples of 128 and 256"
    # traced: loaded before (ready()) on a GPU the eager check found to be sm_90
    ext = _EXT.loaded() if compiling else _EXT.get()
    if ext is None:
        return f"r1mega_wgmma_cuda is not loaded: {_EXT.load_error() or 'not loaded before tracing'}"
    return None


def ready(device) -> bool:
    """Load the extension before a decode step compiles (the graph must not import it), on a
    Hopper GPU only: a traced step takes the kernel wherever the extension is loaded."""
    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)
            and _EXT.get() is not None)


def wgmma_gemm(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype,
               a_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(M, K) e4m3 x (N, K) e4m3 -> (M, N) bf16: ``(a @ w.T) * w_scale``, times a's row scales
    when given."""
    why = why_not(a, w, out_dtype, a_scale)
    if why:
        raise ValueError(f"wgmma FP8 GEMM: {why}")
    if w_scale.numel() != 1 or w_scale.dtype != torch.float32:
        raise ValueError(f"wgmma FP8 GEMM: w_scale must be one float32, got {tuple(w_scale.shape)}")
    (m, k), n = a.shape, w.shape[0]
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    global launches
    launches += 1
    s_a = None if a_scale is None else a_scale.reshape(-1)
    return _EXT.get().fp8_wgmma_gemm(a, w, w_scale.reshape(()), s_a, config(m, n, k, sms), PRODUCER_WARP)


# Opaque to dynamo: the compiled decode step launches the kernel as it is.
@torch.library.custom_op("r1mega::fp8_wgmma_gemm", mutates_args=())
def wgmma_gemm_op(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype,
                  a_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    return wgmma_gemm(a, w, w_scale, out_dtype, a_scale)


@wgmma_gemm_op.register_fake
def _(a, w, w_scale, out_dtype, a_scale=None):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


def serves(a: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype,
           a_scale: Optional[torch.Tensor] = None) -> bool:
    """Whether the switch is on and the kernel takes these operands."""
    return ENABLED and why_not(a, w, out_dtype, a_scale) is None
