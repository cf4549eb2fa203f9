"""The FP8 rollout's decode GEMM with the activation quantised inside: ``y = x @ w.T`` for x
(M, K) in bf16/fp16 and w (N, K) in e4m3 with 128 x 128 block scales (the blockwise recipe) or
one scale (tensorwise: read as the same scale for every block).

A decode step's activations are a few hundred rows. Quantising them in a kernel of their own
costs a launch and a pass per linear; this kernel instead rounds each 1 x 128 tile of x to e4m3
as it loads it (the tile's amax, the recipe's power-of-2 multiplier, clamp, round: the
arithmetic of :func:`r1mega.precision.quantize.quantize_reference` (x, "tile", power2)), and
adds each K block's FP8 x FP8 dot times its two scales to a float32 accumulator, as
DeepSeek-V3's recipe promotes partial sums per 128. Its reference is ``emulated_gemm`` of the
reference-quantised operands, equal up to float32 accumulation order (tests/unit under
Triton's interpreter, tests/gpu compiled).

Used by ``Fp8RolloutWeights`` for decode steps when ``R1MEGA_FP8_ROLLOUT_GEMM=fused`` (default
``quantize``: quantiser kernel + cuBLAS, which this route did not beat when timed: see
r1mega/bench/RECORDS.md). Every N tile quantises its rows of x again, so the rounding work grows
with N / BN. With tensorwise weights the activation is still quantised per 1 x 128 tile, not per
tensor as the ``quantize`` route does: another rounding of x (a finer one), so the two routes'
rollouts differ in FP8 error.
"""
from __future__ import annotations

import torch

from r1mega import switches
from r1mega.precision.quantize import BLOCK, FP8_MAX, Fp8Tensor

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - CPU machines without Triton
    HAVE_TRITON = False

MAX_ROWS = 512  # decode-sized calls only; a prefill's tens of thousands of rows go to cuBLAS


def gemm_choice() -> str:
    return switches.choice("R1MEGA_FP8_ROLLOUT_GEMM", "quantize", {
        "quantize": "the activation quantiser kernel, then cuBLAS's scaled matmul",
        "fused": "decode steps (blockwise, tensorwise) through r1mega/precision/triton_act_gemm.py"})


if HAVE_TRITON:
    from r1mega.precision.triton_quant import _abs_bits, _multiplier, _round_e4m3

    @triton.jit
    def _act_q_gemm_kernel(X, W, WS, Y, M, N, K, stride_xm, stride_wn, stride_wsn, stride_wsk,
                           stride_ym, BM: tl.constexpr, BN: tl.constexpr, FMAX: tl.constexpr):
        # Program (n block, m block) of BM x BN outputs; BN divides 128, so one weight scale per
        # K block. K % 128 == 0, N % 128 == 0 (the blockwise recipe's alignment).
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, 128)
        m_ok = rm < M
        x_ptr = X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
        w_ptr = W + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
        ws_ptr = WS + (pid_n * BN // 128) * stride_wsn
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, K, 128):
            x = tl.load(x_ptr + k0, mask=m_ok[:, None], other=0.0).to(tl.float32)    # (BM, 128)
            amax = tl.max(_abs_bits(x), axis=1).to(tl.float32, bitcast=True)
            mult = _multiplier(amax, FMAX, True)                                       # (BM,)
            v = x * mult[:, None]
            v = tl.where(v > FMAX, FMAX, v)
            v = tl.where(v < -FMAX, -FMAX, v)
            x8 = _round_e4m3(v).to(tl.float8e4nv)
            w8 = tl.load(w_ptr + k0)                                                    # (BN, 128)
            ws = tl.load(ws_ptr + (k0 // 128) * stride_wsk)
            sx = tl.math.div_rn(tl.zeros_like(mult) + 1.0, mult)
            acc += tl.dot(x8, tl.trans(w8)) * (sx[:, None] * ws)
        y_ptr = Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
        tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=m_ok[:, None])


def tiles(m: int, n: int, sms: int = 132) -> tuple[int, int]:
    """(BM, BN): 64-row tiles (Hopper's wgmma M), 128 columns unless that leaves SMs idle."""
    bm = 64
    bn = 128 if triton.cdiv(m, bm) * (n // 128) >= sms else 64
    return bm, bn


def act_quant_gemm(x: torch.Tensor, w: Fp8Tensor, out_dtype: torch.dtype,
                   bm: int | None = None, bn: int | None = None) -> torch.Tensor:
    """(M, K) x (N, K) e4m3 weight (128x128-block or one scale) -> (M, N) ``out_dtype``; x's
    1x128 tiles quantised on the fly (power-of-2 scales, the blockwise recipe's)."""
    if w.granularity not in ("block", "tensor") or w.fmt != "e4m3":
        raise ValueError(f"act_quant_gemm: the weight must be e4m3 with 128x128 block scales or "
                         f"one tensor scale, got {w.fmt} {w.granularity}")
    m, k = x.shape
    n, k2 = w.shape
    if k != k2 or k % BLOCK or n % BLOCK:
        raise ValueError(f"act_quant_gemm: x {tuple(x.shape)} @ w {tuple(w.shape)}.T needs one K "
                         f"and K, N multiples of {BLOCK}")
    if x.stride(1) != 1 or w.data.stride(1) != 1:
        raise ValueError("act_quant_gemm: x and w must be row-major along K")
    # one scale: every block's, through zero strides (no copy, nothing to keep in sync)
    scale = w.scale
    if w.granularity == "tensor":
        scale = scale.reshape(1, 1).expand(n // BLOCK, k // BLOCK)
    y = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0:
        return y
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
    tbm, tbn = tiles(m, n, sms)
    bm, bn = bm or tbm, bn or tbn
    if BLOCK % bn:
        raise ValueError(f"act_quant_gemm: BN={bn} must divide {BLOCK}")
    grid = (n // bn, triton.cdiv(m, bm))
    _act_q_gemm_kernel[grid](x, w.data, scale, y, m, n, k, x.stride(0), w.data.stride(0),
                             scale.stride(0), scale.stride(1), y.stride(0), BM=bm, BN=bn,
                             FMAX=FP8_MAX["e4m3"], num_warps=4, num_stages=3)
    return y


@torch.library.custom_op("r1mega::fp8_act_gemm", mutates_args=())
def fp8_act_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """:func:`act_quant_gemm` as an op torch.compile keeps whole (the compiled decode step);
    ``w_scale`` (N/128, K/128) blocks, or (1, 1): one for the whole weight."""
    granularity = "tensor" if w_scale.shape == (1, 1) else "block"
    return act_quant_gemm(x, Fp8Tensor(w, w_scale, granularity, "e4m3"), out_dtype)


@fp8_act_gemm.register_fake
def _fp8_act_gemm_fake(x, w, w_scale, out_dtype):
    return x.new_empty(x.shape[0], w.shape[0], dtype=out_dtype)
