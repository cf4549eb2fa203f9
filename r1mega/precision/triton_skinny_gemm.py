"""The FP8 rollout's decode GEMM with K split across CTAs: ``y = (a @ w.T) * s_w [* s_a]``.

A decode step's GEMMs have a few hundred rows. A GEMM tiled 128 x 128 then has a few dozen
tiles (qkv of the 852M shape, 256 x 3072: 48), fewer CTAs than an H100 has SMs, each walking all
of K alone; splitting K spreads the weight, the bytes a decode step is there to read, over all
SMs. cuBLASLt's own K splits reduce in a second kernel.

Here the grid is (N tiles, M tiles, K splits). Each program multiplies its K range into a float32
tile; with more than one split it stores that partial to a workspace, and the last program of the
tile to finish (a per-tile counter, reset by that program for the next call) sums the partials in
split order, applies the scales and writes the output. So one launch, and the sum of a tile's
splits is in a fixed order: the result does not depend on which program finishes last.

``a`` (M, K) e4m3 row-major, ``w`` (N, K) e4m3 row-major (K contiguous in both, as FP8 wgmma
wants), ``w_scale`` one float32, ``a_scale`` optional: (M, 1) float32 row scales (without them
the output lacks a's row scales, as :func:`r1mega.precision.gemm.row_tensor_gemm_unscaled`'s)
or (M, K / 128) 1 x 128 tile scales (the attention output's per-head tiles).
Its reference is the float64 product of the dequantised operands (tests/unit under Triton's
interpreter, tests/gpu compiled).

Switched by ``R1MEGA_FP8_SKINNY``, off: on a GPU it measured slower than cuBLAS at every decode
GEMM of the 852M shape, split or not (bench/RECORDS.md). The tile-scaled pair, which cuBLAS
does not take, always comes here. ``r1mega bench fp8-decode-gemm`` and
``tools/skinny_gemm_sweep.py`` time it.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch

from r1mega import switches

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - CPU machines without Triton
    HAVE_TRITON = False

ENABLED = switches.flag("R1MEGA_FP8_SKINNY", False,
                        "decode-sized row x tensor FP8 GEMMs through the split-K Triton kernel")
MAX_ROWS = 512      # decode-sized calls only
COUNTERS = 1 << 14  # per-tile counters kept per device (more tiles than any decode GEMM has)

_counters: dict = {}
launches = 0  # host-side calls (a CUDA graph's capture counts once): tests see the route taken


def enabled(on: bool = True):
    """The switch set to ``on`` inside a with-block (benches and tests; runs read R1MEGA_FP8_SKINNY)."""
    return switches.overridden(sys.modules[__name__], "ENABLED", on)


def counters_ready(device) -> torch.Tensor:
    """The device's tile counters (zeros, each reset by the program that last uses it). Made
    before any CUDA graph capture: one made inside would be the capture's memory."""
    device = torch.device(device)
    c = _counters.get(device)
    if c is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("skinny FP8 GEMM: the tile counters must exist before a CUDA graph "
                               "capture (call counters_ready(device) first)")
        c = _counters[device] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return c


def config(m: int, n: int, k: int, sms: int = 132) -> tuple[int, int, int, int, int, int]:
    """(BM, BN, BK, SPLIT, warps, stages) for an (m, n, k) call: the rows in as few M tiles as
    wgmma allows, and K split until the grid covers the SMs (each split at least 4 K blocks)."""
    env = os.environ.get("R1MEGA_FP8_SKINNY_CONFIG")  # BM,BN,BK,SPLIT,WARPS,STAGES (sweeps)
    if env:
        bm, bn, bk, split, warps, stages = (int(v) for v in env.split(","))
        return bm, bn, bk, split, warps, stages
    bm = 64 if m <= 64 else 128
    bn, bk = 128, 128
    tiles = -(-m // bm) * -(-n // bn)
    kblocks = -(-k // bk)
    split = 1
    while tiles * split * 2 <= sms and kblocks // (split * 2) >= 4:
        split *= 2
    return bm, bn, bk, split, 4, 4


if HAVE_TRITON:
    @triton.jit
    def _skinny_kernel(A, W, Y, WS, AS, P, CNT, M, N, K, stride_am, stride_wn, stride_ym,
                       stride_as, K_ITERS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr, SPLIT: tl.constexpr, ROW_SCALE: tl.constexpr,
                       A_TILE: tl.constexpr, EVEN_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = pid_k * (K_ITERS * BK) + tl.arange(0, BK)
        m_ok = rm < M
        n_ok = rn < N
        a_ptr = A + rm[:, None].to(tl.int64) * stride_am + rk[None, :]
        w_ptr = W + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
        acc = tl.zeros((BM, BN), tl.float32)
        for i in range(K_ITERS):
            if EVEN_K:
                a = tl.load(a_ptr, mask=m_ok[:, None], other=0.0)
                w = tl.load(w_ptr, mask=n_ok[:, None], other=0.0)
            else:
                k_ok = (rk + i * BK) < K
                a = tl.load(a_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptr, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if A_TILE:  # a's 1 x BK tile scales, applied as each K block's sum is promoted
                # a last split's K blocks past K (their a and w loaded as zeros) have no scale
                # column: read the last one, not the next row's (or, past the last row, memory
                # that may hold a NaN, and 0 * NaN is NaN)
                kb = tl.minimum(pid_k * K_ITERS + i, (K - 1) // BK)
                sa = tl.load(AS + rm.to(tl.int64) * stride_as + kb, mask=m_ok, other=0.0)
                acc += tl.dot(a, tl.trans(w)) * sa[:, None]
            else:
                acc = tl.dot(a, tl.trans(w), acc)                                 # (BM, BN)
            a_ptr += BK
            w_ptr += BK
        tile_mask = m_ok[:, None] & n_ok[None, :]
        if SPLIT > 1:
            tile = pid_m * tl.num_programs(0) + pid_n
            at = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]   # within a partial
            p_tile = P + tile.to(tl.int64) * (SPLIT * BM * BN) + at
            tl.store(p_tile + pid_k * (BM * BN), acc)
            # every thread's partial is written before the one arrival the counter sees
            tl.debug_barrier()
            seen = tl.atomic_add(CNT + tile, 1, sem="acq_rel", scope="gpu")
            if seen == SPLIT - 1:  # the tile's last program: the sum, in split order
                acc = tl.load(p_tile, cache_modifier=".cg")
                for s in tl.static_range(1, SPLIT):
                    acc += tl.load(p_tile + s * (BM * BN), cache_modifier=".cg")
                _store_out(acc, Y, WS, AS, rm, rn, M, stride_ym, tile_mask, ROW_SCALE)
                tl.atomic_xchg(CNT + tile, 0, sem="relaxed", scope="gpu")
        else:
            _store_out(acc, Y, WS, AS, rm, rn, M, stride_ym, tile_mask, ROW_SCALE)

    @triton.jit
    def _store_out(acc, Y, WS, AS, rm, rn, M, stride_ym, tile_mask, ROW_SCALE: tl.constexpr):
        acc = acc * tl.load(WS)
        if ROW_SCALE:
            acc = acc * tl.load(AS + rm, mask=rm < M, other=1.0)[:, None]
        y_ptr = Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
        tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=tile_mask)


def why_not(a: torch.Tensor, w: torch.Tensor) -> Optional[str]:
    """Why (M, K) x (N, K) operands cannot go to the kernel on this device, or None."""
    if not HAVE_TRITON:
        return "Triton is not installed"
    if not (a.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return f"the operands are on {a.device}, not a GPU"
    if a.dim() != 2 or w.dim() != 2:
        return f"a and w must be matrices, got {tuple(a.shape)} and {tuple(w.shape)}"
    if a.dtype != torch.float8_e4m3fn or w.dtype != torch.float8_e4m3fn:
        return f"a and w must be e4m3, got {a.dtype} and {w.dtype}"
    if a.shape[1] != w.shape[1]:
        return f"the K sizes differ: a {tuple(a.shape)}, w {tuple(w.shape)}"
    if a.stride(1) != 1 or w.stride(1) != 1:
        return "a and w need unit column stride (K contiguous)"
    if not 0 < a.shape[0] <= MAX_ROWS:
        return f"a has {a.shape[0]} rows; the kernel takes 1 to {MAX_ROWS} (decode sizes)"
    return None


def supported(a: torch.Tensor, w: torch.Tensor) -> bool:
    return why_not(a, w) is None


def skinny_gemm_triton(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                       out_dtype: torch.dtype, a_scale: Optional[torch.Tensor] = None
                       ) -> torch.Tensor:
    """(M, K) e4m3 x (N, K) e4m3 -> (M, N) ``out_dtype``: ``(a @ w.T) * w_scale``, with a's
    scales when given: (M, 1) one a row (applied to the output), or (M, ceil(K / 128)) one a
    1 x 128 tile (applied to each 128-wide K block's sum, as DeepSeek-V3's recipe promotes)."""
    why = why_not(a, w)
    if why:
        raise ValueError(f"skinny FP8 GEMM: {why}")
    (m, k), n = a.shape, w.shape[0]
    tiles_k = -(-k // 128)
    a_tile = a_scale is not None and a_scale.dim() == 2 and a_scale.shape == (m, tiles_k) and tiles_k > 1
    if w_scale.numel() != 1 or (a_scale is not None and not a_tile and a_scale.numel() != m):
        raise ValueError(f"skinny FP8 GEMM: w_scale is one value and a_scale one a row of a ({m}, 1) "
                         f"or one a 1 x 128 tile ({m}, {tiles_k}); got {tuple(w_scale.shape)} and "
                         f"{None if a_scale is None else tuple(a_scale.shape)}")
    global launches
    launches += 1
    bm, bn, bk, split, warps, stages = config(m, n, k)
    if a_tile:
        bk = 128  # one tile scale a K block
    kblocks = -(-k // bk)
    split = max(1, min(split, kblocks))
    k_iters = -(-kblocks // split)
    split = -(-kblocks // k_iters)  # no split left without K
    grid = (-(-n // bn), -(-m // bm), split)
    y = torch.empty(m, n, dtype=out_dtype, device=a.device)
    cnt = counters_ready(a.device)
    if split > 1:
        if grid[0] * grid[1] > COUNTERS:
            raise ValueError(f"skinny FP8 GEMM: {grid[0] * grid[1]} tiles exceed the {COUNTERS} counters")
        p = torch.empty(grid[0] * grid[1] * split * bm * bn, dtype=torch.float32, device=a.device)
    else:
        p = y
    ws = w_scale.reshape(1).to(torch.float32)
    if a_scale is None:
        s_a, stride_as = ws, 0
    elif a_tile:
        s_a = a_scale.to(torch.float32)
        s_a = s_a if s_a.stride(1) == 1 else s_a.contiguous()
        stride_as = s_a.stride(0)
    else:
        s_a, stride_as = a_scale.reshape(-1).to(torch.float32), 1
    _skinny_kernel[grid](a, w, y, ws, s_a, p, cnt, m, n, k, a.stride(0), w.stride(0), y.stride(0),
                         stride_as, K_ITERS=k_iters, BM=bm, BN=bn, BK=bk, SPLIT=split,
                         ROW_SCALE=a_scale is not None and not a_tile, A_TILE=a_tile,
                         EVEN_K=k % bk == 0 and k_iters * split == kblocks,
                         num_warps=warps, num_stages=stages)
    return y


# Opaque to dynamo: the compiled decode step launches this kernel as it is.
@torch.library.custom_op("r1mega::fp8_skinny_gemm", mutates_args=())
def skinny_gemm_op(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype,
                   a_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    return skinny_gemm_triton(a, w, w_scale, out_dtype, a_scale)


@skinny_gemm_op.register_fake
def _(a, w, w_scale, out_dtype, a_scale=None):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


def serves(a: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the switch is on and the kernel takes these operands."""
    return ENABLED and supported(a, w)
