"""FP8 quantisation (r1mega/precision/quantize.py) against an independent per-tile loop.

The reference here walks every tile/block with Python loops and plain scalar arithmetic
(math.floor(math.log2(...)) for the power-of-2 scales), rather than the vectorised padding and
mantissa-bit trick of the implementation, so a wrong tile boundary, a ragged edge taken wrong or
a scale rounded the other way shows up as a mismatch.
"""
from __future__ import annotations

import math

import pytest
import torch

from r1mega.precision.gemm import _block_scale_b, _colmajor, emulated_gemm
from r1mega.precision.quantize import (
    FP8_DTYPES, FP8_MAX, dequantize, multiplier_from_amax, quantize_reference, scale_shape,
)

GRANS = ["tensor", "row", "tile", "block"]


def _tiles(rows, cols, gran):
    """[(row_slice, col_slice, scale_index)] of every tile."""
    if gran == "tensor":
        return [(slice(0, rows), slice(0, cols), (0, 0))]
    if gran == "row":
        return [(slice(r, r + 1), slice(0, cols), (r, 0)) for r in range(rows)]
    if gran == "tile":
        return [(slice(r, r + 1), slice(c, min(c + 128, cols)), (r, c // 128))
                for r in range(rows) for c in range(0, cols, 128)]
    return [(slice(r, min(r + 128, rows)), slice(c, min(c + 128, cols)), (r // 128, c // 128))
            for r in range(0, rows, 128) for c in range(0, cols, 128)]


def loop_reference(x, gran, fmt, power2):
    fmax = FP8_MAX[fmt]
    data = torch.empty(x.shape, dtype=FP8_DTYPES[fmt])
    scale = torch.empty(scale_shape(*x.shape, gran))
    for rs, cs, idx in _tiles(*x.shape, gran):
        tile = x[rs, cs].double()
        amax = float(tile.abs().max())
        if amax == 0:
            mult = 1.0
        else:
            mult = float(torch.tensor(fmax, dtype=torch.float32) / torch.tensor(amax, dtype=torch.float32))
            if power2:
                mult = 2.0 ** math.floor(math.log2(mult))
        mult32 = torch.tensor(mult, dtype=torch.float32)
        data[rs, cs] = (x[rs, cs].float() * mult32).clamp(-fmax, fmax).to(FP8_DTYPES[fmt])
        scale[idx] = 1.0 / mult32
    return data, scale


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("power2", [False, True])
@pytest.mark.parametrize("shape", [(3, 128), (130, 300), (257, 129)])
def test_quantize_matches_loop_reference_with_ragged_edges(gran, fmt, power2, shape):
    g = torch.Generator().manual_seed(hash((gran, fmt, power2, shape)) % 2**31)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[1])  # (R, C) wide range
    q = quantize_reference(x, gran, fmt, power2)
    data, scale = loop_reference(x, gran, fmt, power2)
    assert q.data.dtype == FP8_DTYPES[fmt] and q.data.shape == x.shape
    assert torch.equal(q.data.view(torch.uint8), data.view(torch.uint8))
    torch.testing.assert_close(q.scale, scale, rtol=0, atol=0)


@pytest.mark.parametrize("gran", GRANS)
def test_quantize_bf16_input_and_transposed_view(gran):
    x = torch.randn(200, 260).to(torch.bfloat16)
    a = quantize_reference(x.t(), gran)          # non-contiguous view
    b = quantize_reference(x.t().contiguous(), gran)
    assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
    assert torch.equal(a.scale, b.scale)


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_dequantize_within_format_error(gran, fmt):
    x = torch.randn(131, 257, dtype=torch.float64)
    q = quantize_reference(x, gran, fmt, power2=gran == "block")
    # e4m3 keeps 3 mantissa bits (half-ulp 2^-4 relative), e5m2 2 bits (2^-3); values far
    # below the tile's amax fall into the subnormal range, so bound by the tile's amax too.
    rel = 2.0 ** -4 if fmt == "e4m3" else 2.0 ** -3
    amax = x.abs().max()
    err = (dequantize(q, torch.float64) - x).abs()
    assert bool((err <= rel * x.abs() + amax * 2.0 ** -9 * 2).all())


def test_scale_arithmetic_zero_nan_inf_and_power2():
    amax = torch.tensor([0.0, 448.0, 1.0, 3.0, float("nan"), float("inf"), 1e-45])
    m = multiplier_from_amax(amax, "e4m3", power2=False)
    assert m[0] == 1.0 and m[1] == 1.0 and m[2] == 448.0
    assert m[3] == torch.tensor(448.0) / torch.tensor(3.0)
    assert torch.isnan(m[4]) and m[5] == 0.0
    assert m[6] == torch.finfo(torch.float32).max          # denormal amax: clamped, not inf
    p = multiplier_from_amax(amax, "e4m3", power2=True)
    assert p[2] == 256.0 and p[3] == 128.0 and torch.isnan(p[4]) and p[0] == 1.0
    assert p[6] == 2.0 ** 127


def test_zero_tile_stays_zero_and_nan_tile_surfaces():
    x = torch.randn(4, 384)
    x[0, :128] = 0.0
    x[1, 130] = float("nan")
    x[2, 300] = float("inf")
    q = quantize_reference(x, "tile")
    d = dequantize(q)
    assert (d[0, :128] == 0).all() and q.scale[0, 0] == 1.0
    assert torch.isnan(d[1, 128:256]).all() and torch.isfinite(d[1, :128]).all()
    assert torch.isnan(d[2, 256:]).all() and torch.isfinite(d[2, :256]).all()
    assert torch.isfinite(d[3]).all()


@pytest.mark.parametrize("a_gran,b_gran", [("tensor", "tensor"), ("row", "row"), ("tile", "block"),
                                           ("tile", "tile")])
def test_emulated_gemm_equals_float64_product_of_dequantised(a_gran, b_gran):
    a = quantize_reference(torch.randn(33, 300), a_gran)
    b = quantize_reference(torch.randn(140, 300), b_gran, power2=True)
    out = emulated_gemm(a, b, torch.float32)
    ref = dequantize(a, torch.float64) @ dequantize(b, torch.float64).t()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


def test_cublas_scale_layouts():
    # torch's meta_scaled_mm_v2: 1x128 scales (M, K/128) with strides (1, M); 128x128 scales of
    # b as (L4, N/128) with strides (1, L4), L4 = K/128 rounded up to 4.
    s = torch.arange(12.0).reshape(6, 2)
    c = _colmajor(s)
    assert c.shape == (6, 2) and c.stride() == (1, 6) and torch.equal(c, s)
    b = torch.arange(6.0).reshape(2, 3)                 # (N/128=2, K/128=3)
    sb = _block_scale_b(b)
    assert sb.shape == (4, 2) and sb.stride() == (1, 4)
    assert torch.equal(sb[:3], b.t())


def test_a_given_amax_is_tensorwise_and_quantises_as_the_computed_one():
    """The compiled FP8 linear hands the quantiser max |x| from its graph: with it the bytes and
    scale are the computed amax's, NaN included; other granularities refuse one."""
    g = torch.Generator().manual_seed(7)
    for x in (torch.randn(37, 300, generator=g) * 5, torch.tensor([[1.0, float("nan")], [2.0, -3.0]])):
        ref = quantize_reference(x, "tensor")
        got = quantize_reference(x, "tensor", amax=x.abs().amax().reshape(1))
        assert torch.equal(got.data.view(torch.uint8), ref.data.view(torch.uint8))
        assert torch.equal(got.scale, ref.scale) or (got.scale.isnan().all() and ref.scale.isnan().all())
    with pytest.raises(ValueError, match="one value for the whole tensor"):
        quantize_reference(torch.randn(4, 128), "tile", amax=torch.ones(1))


@pytest.mark.parametrize("gran", GRANS)
def test_quantize_into_given_tensors_equals_a_fresh_quantisation(gran):
    """``out=``: the result lands in the given tensors (the weight caches' refresh: a captured
    graph keeps reading them, and no whole-weight copy follows), equal to a fresh quantisation."""
    from r1mega.precision.quantize import quantize, quantize_dual

    g = torch.Generator().manual_seed(7)
    x = torch.randn(200, 330, generator=g) * 3
    old = quantize(torch.randn(200, 330, generator=g), gran, "e4m3", True)
    data, scale = old.data, old.scale
    got = quantize(x, gran, "e4m3", True, out=old)
    ref_data, ref_scale = loop_reference(x, gran, "e4m3", True)
    assert got is old and got.data is data and got.scale is scale
    assert torch.equal(got.data.view(torch.uint8), ref_data.view(torch.uint8))
    assert torch.equal(got.scale, ref_scale)
    if gran in ("tensor", "tile", "block"):
        pair = quantize_dual(torch.randn(200, 330, generator=g), gran)
        ptrs = [t.data_ptr() for q in pair for t in (q.data, q.scale)]
        q, qt = quantize_dual(x, gran, out=pair)
        assert (q, qt) == pair and [t.data_ptr() for p in (q, qt) for t in (p.data, p.scale)] == ptrs
        for got, src in ((q, x), (qt, x.t())):
            ref_data, ref_scale = loop_reference(src, gran, "e4m3", False)
            assert torch.equal(got.data.view(torch.uint8), ref_data.view(torch.uint8))
            assert torch.equal(got.scale, ref_scale)


def test_quantize_refuses_tensors_of_another_layout():
    from r1mega.precision.quantize import quantize, quantize_dual

    x = torch.randn(200, 330)
    tile = quantize(x, "tile")
    with pytest.raises(ValueError, match=r"data \(200, 330\).*not \(330, 200\)"):
        quantize(x.t().contiguous(), "tile", out=tile)                  # (330, 200) into (200, 330)
    with pytest.raises(ValueError, match="granularity/format tile/e4m3, not block/e4m3"):
        quantize(x, "block", out=tile)
    with pytest.raises(ValueError, match="not tile/e5m2"):
        quantize(x, "tile", "e5m2", out=tile)
    from r1mega.precision.triton_quant import out_buffers

    rowmajor = type(tile)(tile.data, tile.scale.contiguous(), "tile", "e4m3")   # the reference's layout
    assert quantize(x, "tile", out=rowmajor) is rowmajor                        # fine for the reference
    with pytest.raises(ValueError, match=r"scale .* strides \(3, 1\), not \(200, 3\) float32 strides \(1, 200\)"):
        out_buffers(rowmajor, 200, 330, "tile", "e4m3", x.device)              # not for the kernels
    short = type(tile)(tile.data, tile.scale[:, :2], "tile", "e4m3")
    with pytest.raises(ValueError, match=r"scale \(200, 2\)"):
        quantize(x, "tile", out=short)
    q, qt = quantize_dual(x, "block")
    with pytest.raises(ValueError, match="quantize"):
        quantize_dual(x, "block", out=(qt, q))                           # the pair swapped
