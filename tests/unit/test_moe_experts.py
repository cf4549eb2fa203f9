"""Routed + shared experts (r1mega/moe/experts.py) against a per-token loop: each token's output is
the weighted sum of its experts' SwiGLU outputs plus the shared expert's; gradients too."""
import pytest
import torch
import torch.nn.functional as F

from r1mega.moe import router
from r1mega.moe.dispatch import routing_metadata
from r1mega.moe.experts import GroupedExperts, SwiGLUMLP, moe_feed_forward


def _naive(x, weights, indices, experts, shared):
    out = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=x.dtype)
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            gate_up = experts.gate_up[e] @ x[t]                         # (2F,)
            f = gate_up.shape[0] // 2
            h = F.silu(gate_up[:f]) * gate_up[f:]
            acc = acc + weights[t, j].to(x.dtype) * (experts.down[e] @ h)
        if shared is not None:
            g = shared.gate_up @ x[t]
            f = g.shape[0] // 2
            acc = acc + shared.down @ (F.silu(g[:f]) * g[f:])
        out.append(acc)
    return torch.stack(out)


@pytest.mark.parametrize("align,use_shared", [(1, True), (8, False)])
def test_loop_experts_match_per_token_reference(align, use_shared):
    torch.manual_seed(0)
    num_tokens, hidden, ffn, num_experts, k = 19, 12, 10, 8, 3
    x = torch.randn(num_tokens, hidden, dtype=torch.float64)
    experts = GroupedExperts(num_experts, hidden, ffn, impl="loop", dtype=torch.float64)
    shared = SwiGLUMLP(hidden, 2 * ffn, dtype=torch.float64) if use_shared else None
    logits = torch.randn(num_tokens, num_experts, dtype=torch.float64)
    logits[:, 2] = -1e9  # expert 2 receives no tokens
    weights, indices = router.softmax_topk(logits, k, renormalize=True)
    assert not bool((indices == 2).any())

    xa = x.clone().requires_grad_(True)
    wa = weights.double().clone().requires_grad_(True)
    got = moe_feed_forward(xa, wa, indices, experts, shared, align=align)
    params = list(experts.parameters()) + (list(shared.parameters()) if shared else [])
    g_out = torch.randn_like(got)
    grads = torch.autograd.grad(got, [xa, wa] + params, g_out)

    xb = x.clone().requires_grad_(True)
    wb = weights.double().clone().requires_grad_(True)
    want = _naive(xb, wb, indices, experts, shared)
    want_grads = torch.autograd.grad(want, [xb, wb] + params, g_out)

    torch.testing.assert_close(got, want)
    for name, a, b in zip(["x", "weights", "gate_up", "down", "shared.gate_up", "shared.down"], grads, want_grads):
        torch.testing.assert_close(a, b, msg=name)
    assert torch.count_nonzero(grads[2][2]) == 0  # the idle expert gets no gradient


def test_bf16_loop_close_to_float64_reference():
    torch.manual_seed(1)
    x = torch.randn(16, 32)
    experts = GroupedExperts(4, 32, 16, impl="loop")
    weights, indices = router.softmax_topk(torch.randn(16, 4), 2, renormalize=False)
    want = _naive(x.double(), weights.double(), indices, experts.double(), None)
    got = moe_feed_forward(x.bfloat16(), weights, indices, experts, align=4)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=3e-2)


def test_mismatched_expert_count_and_grouped_without_hopper_are_rejected():
    meta = routing_metadata(torch.tensor([[5], [0]]), 6)
    with pytest.raises(ValueError, match="routing has 6 experts"):
        GroupedExperts(4, 8, 8)(torch.randn(2, 8), meta)
    with pytest.raises(RuntimeError, match="sm_90"):
        GroupedExperts(6, 8, 8, impl="grouped")(torch.randn(2, 8), meta)
