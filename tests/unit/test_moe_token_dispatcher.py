"""AllToAllDispatcher without expert parallelism (ep_group None): dispatch -> per-expert linear
maps -> combine against a per-(token, route) loop, values and gradients; the float32 combine of
bf16 rows; bad input. The EP=2 / EP=4 exchanges are in tests/distributed/test_moe_token_dispatcher.py."""
import pytest
import torch
import torch.nn.functional as F

from r1mega.moe.token_dispatcher import AllToAllDispatcher

HIDDEN = 6


def _routes(num_tokens, topk, num_experts, g, unused=()):
    allowed = torch.tensor([e for e in range(num_experts) if e not in unused])
    rows = [allowed[torch.randperm(len(allowed), generator=g)[:topk]] for _ in range(num_tokens)]
    return torch.stack(rows) if rows else torch.empty(0, topk, dtype=torch.long)


def _loop_reference(hidden, top_idx, top_w, weights):
    """out[t] = sum_j top_w[t, j] * W[top_idx[t, j]] @ hidden[t], one route at a time."""
    out = hidden.new_zeros(hidden.shape)
    for t in range(hidden.shape[0]):
        for j in range(top_idx.shape[1]):
            out[t] = out[t] + top_w[t, j] * (weights[top_idx[t, j]] @ hidden[t])
    return out


@pytest.mark.parametrize("num_tokens,topk,num_experts,unused", [
    (9, 4, 8, (2, 7)),      # k=4 with two experts that receive nothing
    (7, 1, 4, (0,)),        # k=1
    (0, 2, 4, ()),          # no tokens at all
])
def test_local_dispatch_matches_loop(num_tokens, topk, num_experts, unused):
    g = torch.Generator().manual_seed(num_tokens * 10 + topk)
    top_idx = _routes(num_tokens, topk, num_experts, g, unused)
    hidden = torch.randn(num_tokens, HIDDEN, generator=g)
    top_w = torch.rand(num_tokens, topk, generator=g)
    weights = torch.randn(num_experts, HIDDEN, HIDDEN, generator=g)
    grad_out = torch.randn(num_tokens, HIDDEN, generator=g)

    disp = AllToAllDispatcher(num_experts)
    assert disp.ep_size == 1 and disp.local_expert_range == (0, num_experts)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, top_w, weights)]
    h, w, W = leaves
    expert_input, counts, ctx = disp.dispatch(h, top_idx, w)
    assert counts.device.type == "cpu" and counts.dtype == torch.int64
    assert counts.tolist() == [int((top_idx == e).sum()) for e in range(num_experts)]
    # grouped by expert, token order within an expert
    expected = [hidden[t] for e in range(num_experts) for t in range(num_tokens) if e in top_idx[t].tolist()]
    assert torch.equal(expert_input, torch.stack(expected) if expected else hidden.new_zeros(0, HIDDEN))
    expert_output = torch.cat([F.linear(p, W[e]) for e, p in enumerate(expert_input.split(counts.tolist()))])
    out = disp.combine(expert_output, ctx)
    (out * grad_out).sum().backward()

    ref_leaves = [t.clone().requires_grad_(True) for t in (hidden, top_w, weights)]
    ref = _loop_reference(ref_leaves[0], top_idx, ref_leaves[1], ref_leaves[2])
    if num_tokens:
        (ref * grad_out).sum().backward()
    torch.testing.assert_close(out, ref)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad if want.grad is not None else torch.zeros_like(got))


def test_combine_accumulates_bf16_rows_in_float32():
    g = torch.Generator().manual_seed(3)
    top_idx = _routes(16, 4, 8, g)
    hidden = torch.randn(16, 32, generator=g).bfloat16()
    top_w = torch.rand(16, 4, generator=g)
    disp = AllToAllDispatcher(8)
    expert_input, counts, ctx = disp.dispatch(hidden, top_idx, top_w)
    expert_output = expert_input * 3.0 + 0.01                               # bf16 rows
    out = disp.combine(expert_output, ctx)
    # each token's k rows summed in float32 and rounded to bf16 once
    rows = (hidden * 3.0 + 0.01).float()                                  # the same bf16 ops per token
    want = (top_w.unsqueeze(-1) * rows.unsqueeze(1)).sum(1).bfloat16()
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want)


def test_bad_input_is_named():
    disp = AllToAllDispatcher(4)
    h = torch.randn(3, 5)
    idx = torch.tensor([[0, 1], [2, 3], [1, 2]])
    w = torch.rand(3, 2)
    with pytest.raises(ValueError, match="outside"):
        disp.dispatch(h, torch.tensor([[0, 1], [2, 4], [1, 2]]), w)
    with pytest.raises(ValueError, match="top_idx must be"):
        disp.dispatch(h, idx[:2], w[:2])
    with pytest.raises(ValueError, match="top_w"):
        disp.dispatch(h, idx, w[:, :1])
    with pytest.raises(ValueError, match="num_experts=0"):
        AllToAllDispatcher(0)
    expert_input, _, ctx = disp.dispatch(h, idx, w)
    with pytest.raises(ValueError, match=r"expert_output must be \(6, hidden\)"):
        disp.combine(expert_input[:5], ctx)
