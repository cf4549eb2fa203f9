"""On the GPU path (CUDA dispatch kernels, torch._grouped_mm experts, bf16), the MoE layer's
permuted rows are rebuilt in backward, not kept: gradients bitwise those of the layer that
keeps them (tests/unit/test_moe_rows_rebuilt.py runs the CPU loop path)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("sigmoid", [False, True], ids=["softmax", "sigmoid-group-shared"])
def test_rows_rebuilt_on_the_grouped_path(sigmoid, monkeypatch):
    from r1mega.moe.experts import grouped_mm_available
    from tests.unit.test_moe_layer import H, SIGMOID, make_layer, settings
    from tests.unit.test_moe_rows_rebuilt import B, S, _run

    layer = make_layer(settings(**(SIGMOID if sigmoid else {}))).cuda().to(torch.bfloat16)
    layer.router_weight.data = layer.router_weight.data.float()
    torch.manual_seed(1)
    x = torch.randn(S * 16, B, H, device="cuda", dtype=torch.bfloat16)
    if not grouped_mm_available(x):
        pytest.skip("torch._grouped_mm needs bf16 on sm_90+")
    g = torch.randn_like(x)
    kept, kept_held = _run(layer, x, g, True, monkeypatch)
    rebuilt, rebuilt_held = _run(layer, x, g, False, monkeypatch)
    for a, b in zip(kept, rebuilt):
        assert torch.equal(a, b)
    assert kept_held and not rebuilt_held
