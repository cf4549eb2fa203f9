"""Batch-invariant GEMM on CUDA: one fixed tile configuration for every M, no split-K.

cuBLAS picks its kernel, and with it the split of the K reduction, by the problem shape, so a
token's projection differs between a decode step (M = batch) and a packed micro-batch (M =
thousands). Here every output tile reduces K in ``BLOCK_K`` steps from 0 to K in one program,
whatever M is; a row's result depends only on its own values and the weight. The CPU/reference
path is :func:`r1mega.ops.batch_invariant.bi_mm` (fixed row blocks through ``torch.mm``); the
test compares the two and checks invariance over M (tests/gpu/test_exact_gpu.py).

Tuning may change BLOCK_M/BLOCK_N and the grid order for speed, but must keep one configuration
for all M (no autotuning keyed by M) and never split K.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False

BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M = 128, 128, 64, 8
NUM_WARPS, NUM_STAGES = 8, 3
# "BM,BN,BK,WARPS,STAGES": one process-wide tile configuration (tools/exact_gemm_sweep.py
# measures candidates); the rollout and the trainer of a run share it, so exactness holds.
_TILES_ENV = "R1MEGA_EXACT_GEMM_TILES"


def set_tiles(spec: str) -> None:
    """Set the process-wide tile configuration from "BM,BN,BK,WARPS,STAGES"."""
    global BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES
    try:
        bm, bn, bk, w, st = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"{_TILES_ENV}={spec!r}: expected five integers BM,BN,BK,WARPS,STAGES") from None
    if any(v & (v - 1) or v < 16 for v in (bm, bn, bk)) or w not in (1, 2, 4, 8, 16) or st < 1:
        raise ValueError(f"{_TILES_ENV}={spec!r}: tile sizes must be powers of two >= 16, "
                         f"warps a power of two <= 16, stages >= 1")
    BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = bm, bn, bk, w, st


if os.environ.get(_TILES_ENV):
    set_tiles(os.environ[_TILES_ENV])


if HAVE_TRITON:

    @triton.jit
    def _bi_mm_kernel(A, B, C, M, N, K, sam, sak, sbk, sbn, scm, scn,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, IEEE: tl.constexpr):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        # Grouped tile order for L2 reuse of B; it changes which program computes a tile, never
        # how a tile is computed.
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_size
        pid_n = (pid % per_group) // group_size
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(A + rm[:, None] * sam + kk[None, :] * sak,
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            b = tl.load(B + kk[:, None] * sbk + rn[None, :] * sbn,
                        mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
            if IEEE:  # float32 inputs: no TF32 rounding
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        tl.store(C + rm[:, None] * scm + rn[None, :] * scn, acc.to(C.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) @ (K, N) -> (M, N) in a's dtype, float32 accumulation; any strides."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"batch-invariant matmul: shapes {tuple(a.shape)} @ {tuple(b.shape)}")
    if b.dtype != a.dtype:
        b = b.to(a.dtype)
    m, k = a.shape
    n = b.shape[1]
    c = torch.empty(m, n, dtype=a.dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    grid = (triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N),)
    _bi_mm_kernel[grid](a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                        c.stride(0), c.stride(1), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                        BLOCK_K=BLOCK_K, GROUP_M=GROUP_M, IEEE=a.dtype == torch.float32,
                        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return c
