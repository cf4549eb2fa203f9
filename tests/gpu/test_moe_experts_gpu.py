"""Grouped-GEMM experts (torch._grouped_mm, bf16, Hopper) vs the per-expert loop on the same rows,
forward and gradients, with padding and experts that receive no tokens."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from r1mega.moe.dispatch import routing_metadata  # noqa: E402
from r1mega.moe.experts import GroupedExperts, grouped_mm_available, moe_feed_forward  # noqa: E402


@pytest.mark.parametrize("align", [1, 16, 128])
def test_grouped_matches_loop(align):
    x0 = torch.randn(4, 8, device="cuda", dtype=torch.bfloat16)
    if not grouped_mm_available(x0):
        pytest.skip("torch._grouped_mm needs bf16 on sm_90+")
    torch.manual_seed(align)
    num_tokens, hidden, ffn, num_experts, k = 515, 256, 128, 16, 4
    scores = torch.rand(num_tokens, num_experts, device="cuda")
    scores[:, [3, 11]] = -1  # two experts without tokens
    weights, indices = scores.softmax(-1).topk(k, dim=-1)
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    outs, grads = {}, {}
    for impl in ("grouped", "loop"):
        torch.manual_seed(0)
        experts = GroupedExperts(num_experts, hidden, ffn, impl=impl, device="cuda", dtype=torch.bfloat16)
        xi = x.clone().requires_grad_(True)
        out = moe_feed_forward(xi, weights, indices, experts, align=align)
        out.float().square().sum().backward()
        outs[impl] = out.float()
        grads[impl] = (xi.grad.float(), experts.gate_up.grad.float(), experts.down.grad.float())
    torch.testing.assert_close(outs["grouped"], outs["loop"], rtol=2e-2, atol=2e-2)
    for a, b in zip(grads["grouped"], grads["loop"]):
        assert float((a - b).norm() / b.norm()) < 2e-2
    assert torch.count_nonzero(grads["grouped"][1][3]) == 0


def test_metadata_offsets_feed_grouped_mm_without_sync():
    meta = routing_metadata(torch.randint(0, 8, (64, 1), device="cuda"), 8, align=16, impl="auto")
    assert meta.offsets.device.type == "cuda" and meta.offsets.dtype == torch.int32
