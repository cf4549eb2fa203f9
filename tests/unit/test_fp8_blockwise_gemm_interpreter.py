"""The blockwise recipe's tile x tile GEMM in Triton (r1mega/precision/triton_blockwise_gemm.py)
under Triton's CPU interpreter, against the float32 product of the dequantised operands
(``emulated_gemm``): every tile configuration, scales in either memory order, tiles whose scales
span many octaves, and a NaN tile; the GPU test runs it compiled."""
from __future__ import annotations

import importlib.util

import pytest
import torch

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def _operands(m, n, k, seed):
    from r1mega.precision.quantize import quantize_reference

    g = torch.Generator().manual_seed(seed)
    # each 128-wide K block of a row at its own magnitude: the row and column scales of every
    # block differ, so a promotion with a wrong block's scale cannot pass
    a = torch.randn(m, k, generator=g) * torch.logspace(-4, 4, k // 128).repeat_interleave(128)
    b = torch.randn(n, k, generator=g) * torch.logspace(3, -3, k // 128).repeat_interleave(128)
    a[:, :128] *= torch.logspace(-2, 2, m)[:, None]
    a[1] = 0                                        # a zero row: multiplier 1
    return (quantize_reference(a.bfloat16(), "tile", "e4m3", power2=True),
            quantize_reference(b.bfloat16(), "tile", "e4m3", power2=False))


def _interpreted(rank, world):
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"
    from r1mega.precision.gemm import emulated_gemm
    from r1mega.precision.quantize import Fp8Tensor
    from r1mega.precision.triton_blockwise_gemm import CONFIGS, gemm_1d1d

    results = []
    a, b = _operands(256, 256, 384, 0)
    ref = emulated_gemm(a, b, torch.float32)
    for config in CONFIGS:
        results.append((config, ref, gemm_1d1d(a, b, torch.float32, config)))
    # column-major scales (cuBLAS's layout), a bf16 output
    cm = Fp8Tensor(a.data, a.scale.t().contiguous().t(), "tile", "e4m3")
    results.append(("column-major scales, bf16", ref.bfloat16(), gemm_1d1d(cm, b, torch.bfloat16)))
    nan_a = Fp8Tensor(a.data.clone(), a.scale.clone(), "tile", "e4m3")
    nan_a.scale[3, 1] = float("nan")   # one tile of row 3
    return results, gemm_1d1d(nan_a, b, torch.float32, "128x128w4")


@pytest.mark.slow
@needs_triton
def test_tile_by_tile_gemm_matches_the_emulation_under_interpreter(monkeypatch):
    from tests.distributed.harness import run_ranks

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned process
    (result,) = run_ranks(_interpreted, 1, timeout_s=600)
    cases, nan_out = result
    assert len(cases) == 6
    for name, ref, got in cases:
        assert got.dtype == ref.dtype, name
        tol = 1e-5 if ref.dtype == torch.float32 else 8e-3
        # the same FP8 operands and scales; float32 sums in another order
        torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * float(ref.abs().max()),
                                   msg=name)
    assert torch.isnan(nan_out[3]).all() and not torch.isnan(nan_out[[0, 1, 2, 4]]).any()


def test_operands_the_kernel_cannot_take_are_refused():
    from r1mega.precision.quantize import quantize_reference
    from r1mega.precision.triton_blockwise_gemm import gemm_1d1d

    a = quantize_reference(torch.randn(128, 256), "tile")
    with pytest.raises(ValueError, match="1x128 tile scales"):
        gemm_1d1d(a, quantize_reference(torch.randn(128, 256), "block"), torch.bfloat16)
    with pytest.raises(ValueError, match="e4m3"):
        gemm_1d1d(a, quantize_reference(torch.randn(128, 256), "tile", "e5m2"), torch.bfloat16)
    with pytest.raises(ValueError, match="one K"):
        gemm_1d1d(a, quantize_reference(torch.randn(128, 384), "tile"), torch.bfloat16)
    with pytest.raises(ValueError, match="multiples of the tile 128 x 256"):
        gemm_1d1d(a, quantize_reference(torch.randn(128, 256), "tile"), torch.bfloat16, "128x256w8")
