"""Fused Triton FP8 quantisers: one kernel reads each tile, computes its scale, writes FP8.

The PyTorch reference is :func:`r1mega.precision.quantize.quantize_reference` (its docstring
has the scale arithmetic); ``tests/gpu/test_fp8_gpu.py`` compares the two bit for bit.

  _quant_rows_kernel    grid (R, n_tiles): tiles of one row (1x128, or a whole row for the
                        rowwise recipe, read twice in chunks: amax, then scale and write), or a
                        whole tensor's elements under a given amax (tensorwise: the amax comes
                        from one reduction kernel before, the only second pass).
  _quant_blocks_kernel  grid (ceil(R/128), ceil(C/128)): one 128x128 weight block.

Both take the input's strides (a transposed view is quantised without a copy: wgrad's
operands are dy.T and x.T) and the scale tensor's strides, so the scales are written straight
into the column-major layout cuBLAS wants (r1mega/precision/gemm.py allocates it).

Bit-exactness with the reference: ``fmax / amax`` and ``1 / mult`` use IEEE division
(``div_rn``; Triton's ``/`` is the approximate ``div.full``); the power-of-2 rounding is the
same mantissa-clearing bit operation; the clamp keeps NaN; fp32 -> fp8 rounds to nearest even
in both (``cvt.rn.satfinite``, and the clamp makes saturation moot). ``tl.max`` may drop NaN,
so a NaN count restores the reference's NaN propagation.
"""
from __future__ import annotations

import torch

from r1mega.precision.quantize import BLOCK, FP8_DTYPES, FP8_MAX, Fp8Tensor, scale_shape

try:
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # pragma: no cover - CPU machines without Triton
    _HAVE_TRITON = False


def available() -> bool:
    return _HAVE_TRITON and torch.cuda.is_available()


if _HAVE_TRITON:
    try:
        _div_rn = tl.math.div_rn
    except AttributeError:  # pragma: no cover - older Triton keeps it in libdevice
        from triton.language.extra.cuda.libdevice import div_rn as _div_rn

    @triton.jit
    def _multiplier(amax, FMAX: tl.constexpr, POWER2: tl.constexpr):
        """The scale arithmetic of quantize.multiplier_from_amax, per tile (fp32 scalar)."""
        mult = _div_rn(tl.full([], FMAX, tl.float32), amax)
        FLT_MAX: tl.constexpr = 3.4028234663852886e38
        mult = tl.where(mult > FLT_MAX, FLT_MAX, mult)
        if POWER2:
            bits = mult.to(tl.int32, bitcast=True) & 0x7F800000
            mult = tl.where(mult == mult, bits.to(tl.float32, bitcast=True), mult)
        return tl.where(amax == 0.0, 1.0, mult)

    @triton.jit
    def _store_q(q_ptr, offs, mask, v, mult, FMAX: tl.constexpr):
        v = v * mult
        v = tl.where(v > FMAX, FMAX, v)
        v = tl.where(v < -FMAX, -FMAX, v)
        tl.store(q_ptr + offs, v.to(q_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, amax_ptr, C, TILE_C,
                           sxr, sxc, sqr, ssr, sst,
                           FMAX: tl.constexpr, POWER2: tl.constexpr, CHUNK: tl.constexpr,
                           GIVEN_AMAX: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1).to(tl.int64)
        start = tile * TILE_C
        x_row = x_ptr + row * sxr
        if GIVEN_AMAX:
            amax = tl.load(amax_ptr).to(tl.float32)
        else:
            amax = tl.zeros([], tl.float32)
            nans = tl.zeros([], tl.int32)
            for c0 in range(0, TILE_C, CHUNK):
                cols = start + c0 + tl.arange(0, CHUNK)
                m = (cols < C) & (cols < start + TILE_C)
                v = tl.abs(tl.load(x_row + cols * sxc, mask=m, other=0.0).to(tl.float32))
                amax = tl.maximum(amax, tl.max(v, axis=0))
                nans += tl.sum((v != v).to(tl.int32), axis=0)
            amax = tl.where(nans > 0, float("nan"), amax)
        mult = _multiplier(amax, FMAX, POWER2)
        for c0 in range(0, TILE_C, CHUNK):
            cols = start + c0 + tl.arange(0, CHUNK)
            m = (cols < C) & (cols < start + TILE_C)
            v = tl.load(x_row + cols * sxc, mask=m, other=0.0).to(tl.float32)
            _store_q(q_ptr + row * sqr, cols, m, v, mult, FMAX)
        scale = _div_rn(tl.full([], 1.0, tl.float32), mult)
        if GIVEN_AMAX:
            # one scale for the tensor: every program computed it, one writes it
            if (row == 0) & (tile == 0):
                tl.store(s_ptr, scale)
        else:
            tl.store(s_ptr + row * ssr + tile * sst, scale)

    @triton.jit
    def _quant_blocks_kernel(x_ptr, q_ptr, s_ptr, R, C, sxr, sxc, sqr, ssr, sst,
                             FMAX: tl.constexpr, POWER2: tl.constexpr, B: tl.constexpr):
        br = tl.program_id(0).to(tl.int64)
        bc = tl.program_id(1).to(tl.int64)
        rows = br * B + tl.arange(0, B)
        cols = bc * B + tl.arange(0, B)
        m = (rows[:, None] < R) & (cols[None, :] < C)
        v = tl.load(x_ptr + rows[:, None] * sxr + cols[None, :] * sxc, mask=m,
                    other=0.0).to(tl.float32)                                  # (B, B)
        a = tl.abs(v)
        amax = tl.max(tl.max(a, axis=1), axis=0)
        nans = tl.sum(tl.sum((a != a).to(tl.int32), axis=1), axis=0)
        amax = tl.where(nans > 0, float("nan"), amax)
        mult = _multiplier(amax, FMAX, POWER2)
        _store_q(q_ptr, rows[:, None] * sqr + cols[None, :], m, v, mult, FMAX)
        tl.store(s_ptr + br * ssr + bc * sst, _div_rn(tl.full([], 1.0, tl.float32), mult))


def new_scale(rows: int, cols: int, granularity: str, device) -> torch.Tensor:
    """Scale tensor of ``scale_shape``, column-major for tiles (cuBLAS: "strides (1, M)")."""
    r, c = scale_shape(rows, cols, granularity)
    if granularity == "tile":
        return torch.empty(c, r, dtype=torch.float32, device=device).t()   # (R, nt), strides (1, R)
    return torch.empty(r, c, dtype=torch.float32, device=device)


def quantize_triton(x: torch.Tensor, granularity: str, fmt: str = "e4m3",
                    power2: bool = False) -> Fp8Tensor:
    """The fused quantiser: same result as ``quantize_reference``, bit for bit."""
    if x.dim() != 2:
        raise ValueError(f"quantize: expected a 2-D (rows, contraction) matrix, got {tuple(x.shape)}")
    r, c = x.shape
    q = torch.empty(r, c, dtype=FP8_DTYPES[fmt], device=x.device)
    s = new_scale(r, c, granularity, x.device)
    if r == 0 or c == 0:
        s.fill_(1.0)
        return Fp8Tensor(q, s, granularity, fmt)
    fmax = FP8_MAX[fmt]
    if granularity == "block":
        grid = (triton.cdiv(r, BLOCK), triton.cdiv(c, BLOCK))
        _quant_blocks_kernel[grid](x, q, s, r, c, x.stride(0), x.stride(1), q.stride(0),
                                   s.stride(0), s.stride(1), FMAX=fmax, POWER2=power2, B=BLOCK,
                                   num_warps=8)
        return Fp8Tensor(q, s, granularity, fmt)
    if granularity == "tensor":
        # One reduction (no abs copy), then every row quantised under that amax. NaN propagates
        # through the inf-norm as through the reference's amax.
        amax = torch.linalg.vector_norm(x, ord=float("inf")).float().reshape(1)
        grid, tile_c, chunk, given = (r, 1), c, 1024, True
    elif granularity == "row":
        amax, grid, tile_c, chunk, given = s, (r, 1), c, 1024, False
    else:
        amax, grid, tile_c, chunk, given = s, (r, triton.cdiv(c, BLOCK)), BLOCK, BLOCK, False
    _quant_rows_kernel[grid](x, q, s, amax, c, tile_c, x.stride(0), x.stride(1), q.stride(0),
                             s.stride(0), s.stride(1), FMAX=fmax, POWER2=power2, CHUNK=chunk,
                             GIVEN_AMAX=given, num_warps=4)
    return Fp8Tensor(q, s, granularity, fmt)
