"""The FP8 rollout's per-row activations on tensorwise weights (``R1MEGA_FP8_ROLLOUT_ACT=row``):
the GEMM (r1mega/precision/gemm.py, pair row x tensor) through torch's scaled matmul on the CPU
against float64 on the dequantised operands, and the rollout hook's choice of scales."""
from __future__ import annotations

import pytest
import torch

from r1mega.precision.gemm import scaled_gemm
from r1mega.precision.policy import Fp8Policy
from r1mega.precision.quantize import dequantize, quantize_reference
from r1mega.precision.rollout import Fp8RolloutWeights


def _operands(m=48, k=256, n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    # rows five decades apart: one tensor scale would leave the small rows a few e4m3 codes
    x = (torch.randn(m, k, generator=g) * torch.logspace(-2, 3, m)[:, None]).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    return x, w


def test_row_x_tensor_gemm_rounds_the_float64_product_once():
    x, w = _operands()
    a = quantize_reference(x, "row", power2=True)
    b = quantize_reference(w, "tensor")
    y = scaled_gemm(a, b, torch.bfloat16)
    exact = dequantize(a).double() @ dequantize(b).double().t()
    # bf16 keeps 8 significant bits: one rounding is within 2^-8 of the value (float32
    # accumulation adds ~1e-7 relative); cancellation near zero needs an absolute floor per row
    floor = 1e-4 * exact.abs().amax(1, keepdim=True)
    err = (y.double() - exact).abs() / (exact.abs() + floor)
    assert err.max() <= 2.0 ** -8, err.max()
    assert y.dtype == torch.bfloat16 and y.shape == (48, 96)


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


@pytest.fixture
def model(single_rank_runtime):
    from r1mega.config import ModelConfig
    from r1mega.models.gpt import build_model

    rt = single_rank_runtime()
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=1, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=256, vocab_size=128, max_position_embeddings=64)
    return build_model(cfg, rt, wrap=False)[0]


@pytest.mark.parametrize("emulate", [True, False])
def test_rollout_linear_takes_row_scaled_activations_under_the_switch(model, monkeypatch, emulate):
    monkeypatch.setenv("R1MEGA_FP8_ROLLOUT_ACT", "row")
    policy = Fp8Policy(recipe="tensorwise", backend="native", emulate=emulate, rollout=True)
    fp8 = Fp8RolloutWeights(model, policy)
    assert (fp8.act, fp8.act_power2) == ("row", True)
    lin = model.decoder.layers[0].mlp.linear_fc2                  # RowParallelLinear (128 <- 256)
    x = torch.randn(7, 1, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), fp8.decoding():
        y, _ = lin(x)
    a = quantize_reference(x.reshape(7, 256), "row", power2=True)
    w = quantize_reference(lin.weight.detach(), "tensor", power2=policy.power2_scales)
    ref = dequantize(a).double() @ dequantize(w).double().t()
    torch.testing.assert_close(y.reshape(7, 128).double(), ref, rtol=1e-5, atol=1e-5)
    fp8.remove()


def test_switch_leaves_other_weight_scalings_and_refuses_unknown_values(model, monkeypatch):
    monkeypatch.setenv("R1MEGA_FP8_ROLLOUT_ACT", "row")
    fp8 = Fp8RolloutWeights(model, Fp8Policy(recipe="blockwise", backend="native", emulate=True,
                                             rollout=True))
    assert fp8.act == "tile"                                      # blockwise weights: 1x128 tiles
    fp8.remove()
    monkeypatch.setenv("R1MEGA_FP8_ROLLOUT_ACT", "rows")
    with pytest.raises(ValueError, match="R1MEGA_FP8_ROLLOUT_ACT='rows'"):
        Fp8RolloutWeights(model, Fp8Policy(recipe="tensorwise", backend="native", emulate=True,
                                           rollout=True))
