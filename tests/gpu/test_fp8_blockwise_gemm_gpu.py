"""The blockwise recipe's tile x tile GEMM in Triton (r1mega/precision/triton_blockwise_gemm.py)
compiled on a GPU with e4m3 (sm_89+): every tile configuration against the float32 product of the
dequantised operands (``emulated_gemm``) and against cuBLAS's scaled_mm of the same operands,
within float32 summation order; a NaN tile reaches only its row."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a GPU with e4m3 (sm_89+)")

from r1mega.precision.gemm import _blockwise_mm, emulated_gemm  # noqa: E402
from r1mega.precision.quantize import Fp8Tensor, quantize  # noqa: E402
from r1mega.precision.triton_blockwise_gemm import CONFIGS, gemm_1d1d  # noqa: E402


def _operands(m, n, k, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    octaves = torch.logspace(-4, 4, k // 128, device="cuda").repeat_interleave(128)
    a = torch.randn(m, k, device="cuda", generator=g) * octaves
    b = torch.randn(n, k, device="cuda", generator=g) * octaves.flip(0)
    return quantize(a.bfloat16(), "tile"), quantize(b.bfloat16(), "tile")


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("mnk", [(256, 512, 1024), (768, 256, 4096)])
def test_tile_gemm_matches_emulation_and_cublas(config, mnk):
    a, b = _operands(*mnk, seed=sum(mnk))
    ref = emulated_gemm(a, b, torch.float32)
    got = gemm_1d1d(a, b, torch.float32, config)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    cub = _blockwise_mm(a.data, a.scale, b.data, b.scale, False, torch.bfloat16)
    torch.testing.assert_close(gemm_1d1d(a, b, torch.bfloat16, config).float(), cub.float(),
                               rtol=1e-2, atol=1e-2 * float(cub.float().abs().max()))


def test_a_nan_tile_reaches_only_its_row():
    a, b = _operands(256, 256, 512, 3)
    scale = a.scale.clone()
    scale[5, 2] = float("nan")
    y = gemm_1d1d(Fp8Tensor(a.data, scale, "tile", "e4m3"), b, torch.float32)
    assert torch.isnan(y[5]).all() and not torch.isnan(y[torch.arange(256, device="cuda") != 5]).any()
