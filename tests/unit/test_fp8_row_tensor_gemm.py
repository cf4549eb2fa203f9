"""The FP8 rollout's per-row activations on tensorwise weights (``R1MEGA_FP8_ROLLOUT_ACT=row``):
the GEMM (r1mega/precision/gemm.py, pair row x tensor) through torch's scaled matmul on the CPU
against float64 on the dequantised operands (the rollout hook's use of it: test_fp8_rollout.py)."""
from __future__ import annotations

import pytest
import torch

from r1mega.precision.gemm import ROWWISE_KERNEL_MIN_ROWS, scaled_gemm
from r1mega.precision.quantize import dequantize, quantize_reference


def _operands(m=48, k=256, n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    # rows five decades apart: one tensor scale would leave the small rows a few e4m3 codes
    x = (torch.randn(m, k, generator=g) * torch.logspace(-2, 3, m)[:, None]).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    return x, w


@pytest.mark.parametrize("m", [48, ROWWISE_KERNEL_MIN_ROWS + 16])
def test_row_x_tensor_gemm_rounds_the_float64_product_once(m):
    """Decode sizes (the tensorwise kernel, row scales on its output) and prefill sizes (the
    rowwise kernel, the weight's scale as a column vector) alike."""
    x, w = _operands(m=m)
    a = quantize_reference(x, "row", power2=True)
    b = quantize_reference(w, "tensor")
    y = scaled_gemm(a, b, torch.bfloat16)
    exact = dequantize(a).double() @ dequantize(b).double().t()
    # bf16 keeps 8 significant bits: one rounding is within 2^-8 of the value (float32
    # accumulation adds ~1e-7 relative); cancellation near zero needs an absolute floor per row
    floor = 1e-4 * exact.abs().amax(1, keepdim=True)
    err = (y.double() - exact).abs() / (exact.abs() + floor)
    assert err.max() <= 2.0 ** -8, err.max()
    assert y.dtype == torch.bfloat16 and y.shape == (m, 96)


def test_row_scales_keep_the_small_rows_that_a_tensor_scale_flushes():
    x, w = _operands()
    b = quantize_reference(w, "tensor")
    exact = x.double() @ w.double().t()
    errs = {}
    for gran in ("row", "tensor"):
        a = quantize_reference(x, gran, power2=True)
        y = scaled_gemm(a, b, torch.bfloat16).double()
        errs[gran] = ((y - exact).norm(dim=1) / exact.norm(dim=1))[:8].max().item()  # smallest rows
    assert errs["row"] < 0.1 < errs["tensor"], errs
