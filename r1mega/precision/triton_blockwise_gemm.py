"""The blockwise recipe's weight-gradient GEMM in Triton: ``y = a @ b.T`` for a (M, K) and b (N, K)
in e4m3, each with one scale per 1 x 128 tile along K (the tokens, in wgrad: dy.T and x.T).

cuBLAS runs this tile x tile form at about three quarters of the rate of its tile x block form
(r1mega/bench/RECORDS.md): every 128 of K its kernel promotes the partial sums with a row scale and
a column scale. This kernel does the same promotion, ``acc += dot(a_k, b_k) * sa[:, k] * sb[:, k]``
once per K block, so that its rate can be timed against cuBLAS's (tools/blockwise_wgrad_sweep.py).
Reference: ``emulated_gemm`` of the same operands, equal up to float32 summation order
(tests/unit under Triton's interpreter, tests/gpu compiled).
"""
from __future__ import annotations

import torch

from r1mega.precision.quantize import BLOCK, Fp8Tensor

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - CPU machines without Triton
    HAVE_TRITON = False

# (BM, BN, warps, stages, group of M tiles walked together for L2 reuse)
CONFIGS = {"128x128w4": (128, 128, 4, 4, 8), "128x128w8": (128, 128, 8, 3, 8),
           "128x256w8": (128, 256, 8, 3, 8), "256x128w8": (256, 128, 8, 3, 8),
           "64x256w4": (64, 256, 4, 4, 8)}
DEFAULT = "128x128w8"

if HAVE_TRITON:
    @triton.jit
    def _gemm_1d1d_kernel(A, B, SA, SB, Y, M, N, K, stride_am, stride_bn, stride_sam, stride_sak,
                          stride_sbn, stride_sbk, stride_ym, BM: tl.constexpr, BN: tl.constexpr,
                          GROUP: tl.constexpr):
        # M % BM == N % BN == K % 128 == 0 (the caller checks): no masks in the loop.
        pid = tl.program_id(0)
        tiles_m, tiles_n = M // BM, N // BN
        per_group = GROUP * tiles_n
        first_m = (pid // per_group) * GROUP
        group_m = min(tiles_m - first_m, GROUP)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, 128)
        a_ptr = A + rm[:, None].to(tl.int64) * stride_am + rk[None, :]
        b_ptr = B + rn[:, None].to(tl.int64) * stride_bn + rk[None, :]
        sa_ptr = SA + rm.to(tl.int64) * stride_sam
        sb_ptr = SB + rn.to(tl.int64) * stride_sbn
        acc = tl.zeros((BM, BN), tl.float32)
        for kb in range(0, K // 128):
            a = tl.load(a_ptr)                                          # (BM, 128) e4m3
            b = tl.load(b_ptr)                                          # (BN, 128) e4m3
            sa = tl.load(sa_ptr + kb * stride_sak)                      # (BM,)
            sb = tl.load(sb_ptr + kb * stride_sbk)                      # (BN,)
            acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb[None, :])
            a_ptr += 128
            b_ptr += 128
        y_ptr = Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
        tl.store(y_ptr, acc.to(Y.dtype.element_ty))


def problems(a: Fp8Tensor, b: Fp8Tensor, bm: int, bn: int) -> list[str]:
    """Why :func:`gemm_1d1d` cannot take (a, b) with (bm, bn) tiles, or []."""
    out = []
    for name, t in (("a", a), ("b", b)):
        if t.granularity != "tile" or t.fmt != "e4m3":
            out.append(f"{name} must be e4m3 with 1x128 tile scales, got {t.fmt} {t.granularity}")
        elif t.data.dim() != 2 or t.data.stride(1) != 1:
            out.append(f"{name} must be a row-major 2-D matrix")
    if out:
        return out
    (m, k), (n, k2) = a.data.shape, b.data.shape
    if k != k2 or k % BLOCK:
        out.append(f"a {tuple(a.data.shape)} and b {tuple(b.data.shape)} need one K, a multiple of {BLOCK}")
    if m % bm or n % bn:
        out.append(f"M={m} and N={n} must be multiples of the tile {bm} x {bn}")
    return out


def gemm_1d1d(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype, config: str = DEFAULT) -> torch.Tensor:
    """(M, K) x (N, K) e4m3 operands with 1x128 tile scales -> (M, N) ``out_dtype``."""
    bm, bn, warps, stages, group = CONFIGS[config]
    bad = problems(a, b, bm, bn)
    if bad:
        raise ValueError("gemm_1d1d: " + "; ".join(bad))
    (m, k), n = a.data.shape, b.data.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=a.data.device)
    sa, sb = a.scale, b.scale
    grid = ((m // bm) * (n // bn),)
    _gemm_1d1d_kernel[grid](a.data, b.data, sa, sb, y, m, n, k, a.data.stride(0), b.data.stride(0),
                            sa.stride(0), sa.stride(1), sb.stride(0), sb.stride(1), y.stride(0),
                            BM=bm, BN=bn, GROUP=group, num_warps=warps, num_stages=stages)
    return y
