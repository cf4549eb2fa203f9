"""Expert parallelism (r1mega/moe/token_dispatcher.py) on gloo ranks against one process.

Every rank builds the same global problem (its tokens are one slice of it; each expert is a plain
linear map W[e]), runs dispatch -> its local experts -> combine, and compares with a direct
per-(token, route) reference computed on the whole problem in the same process: the rows its
experts receive (values and order), the counts per local expert, the output, and the gradients
w.r.t. hidden, top_w and its experts' weights. The cases include experts no token picks, a rank
that sends nothing to one peer, a rank with no tokens, a rank whose experts receive nothing,
k=1 and k=4, and (world 4) two strided EP=2 groups, so group ranks differ from global ranks.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.distributed.harness import run_ranks

HIDDEN = 8


def _case(seed, tokens_per_rank, topk, num_experts, ep_size, unused=(), blocked=()):
    """Global inputs. ``unused``: experts nobody picks. ``blocked``: (source rank, destination rank)
    pairs that exchange no rows (the source never picks the destination's experts)."""
    g = torch.Generator().manual_seed(seed)
    e_local = num_experts // ep_size
    idx = []
    for src, n in enumerate(tokens_per_rank):
        allowed = torch.tensor([e for e in range(num_experts)
                                if e not in unused and (src, e // e_local) not in blocked])
        assert len(allowed) >= topk, "test case too constrained"
        rows = [allowed[torch.randperm(len(allowed), generator=g)[:topk]] for _ in range(n)]
        idx.append(torch.stack(rows) if rows else torch.empty(0, topk, dtype=torch.long))
    total = sum(tokens_per_rank)
    hidden = torch.randn(total, HIDDEN, generator=g)
    top_w = torch.rand(total, topk, generator=g)
    weights = torch.randn(num_experts, HIDDEN, HIDDEN, generator=g) / HIDDEN ** 0.5
    grad_out = torch.randn(total, HIDDEN, generator=g)
    return hidden, torch.cat(idx), top_w, weights, grad_out


def _reference(hidden, top_idx, top_w, weights, grad_out):
    """out[t] = sum_j top_w[t, j] * W[top_idx[t, j]] @ hidden[t], and its gradients."""
    hidden, top_w, weights = (t.clone().requires_grad_(True) for t in (hidden, top_w, weights))
    per_route = torch.einsum("tjoh,th->tjo", weights[top_idx], hidden)      # (T, k, H)
    out = torch.einsum("tj,tjo->to", top_w, per_route)                       # (T, H)
    (out * grad_out).sum().backward()
    return out.detach(), hidden.grad, top_w.grad, weights.grad


def _expected_rows(hidden, top_idx, lo, hi):
    """Rows expert e in [lo, hi) receives, grouped by expert; within an expert in global token
    order (= source rank, then the source's token order, as the global problem stacks the ranks)."""
    rows = []
    for e in range(lo, hi):
        tokens = [t for t in range(top_idx.shape[0]) for j in range(top_idx.shape[1]) if top_idx[t, j] == e]
        rows += [hidden[t] for t in tokens]
    return torch.stack(rows) if rows else hidden.new_zeros(0, hidden.shape[1])


def _local_experts(x, counts, w_local):
    """Rows grouped by local expert -> each group through its expert's linear map."""
    return torch.cat([F.linear(part, w_local[e]) for e, part in enumerate(x.split(counts.tolist()))])


def _check(group, ep_rank, ep_size, case, **kw):
    from r1mega.moe.token_dispatcher import AllToAllDispatcher

    tokens_per_rank, topk, num_experts = case
    hidden, top_idx, top_w, weights, grad_out = _case(sum(tokens_per_rank) * 31 + topk, tokens_per_rank, topk,
                                                      num_experts, ep_size, **kw)
    ref_out, ref_gh, ref_gw, ref_gW = _reference(hidden, top_idx, top_w, weights, grad_out)
    start = sum(tokens_per_rank[:ep_rank])
    mine = slice(start, start + tokens_per_rank[ep_rank])
    disp = AllToAllDispatcher(num_experts, group)
    lo, hi = disp.local_expert_range
    assert (lo, hi) == (ep_rank * num_experts // ep_size, (ep_rank + 1) * num_experts // ep_size)

    h = hidden[mine].clone().requires_grad_(True)
    w = top_w[mine].clone().requires_grad_(True)
    w_local = weights[lo:hi].clone().requires_grad_(True)
    expert_input, counts, ctx = disp.dispatch(h, top_idx[mine], w)
    assert counts.device.type == "cpu" and counts.dtype == torch.int64
    assert torch.equal(counts, torch.bincount(top_idx.reshape(-1), minlength=num_experts)[lo:hi])
    assert torch.equal(expert_input, _expected_rows(hidden, top_idx, lo, hi))
    out = disp.combine(_local_experts(expert_input, counts, w_local), ctx)
    (out * grad_out[mine]).sum().backward()

    torch.testing.assert_close(out, ref_out[mine])
    torch.testing.assert_close(h.grad, ref_gh[mine])
    torch.testing.assert_close(w.grad, ref_gw[mine])
    torch.testing.assert_close(w_local.grad, ref_gW[lo:hi])
    return int(counts.sum())


def _cases(ep_size):
    """(case, kwargs); the rank-local facts each one exercises are in the comments."""
    last = ep_size - 1
    if ep_size == 2:
        return [
            # k=4; experts 1 and 11 unused; rank 0 sends nothing to rank 1
            (([6, 5], 4, 12), dict(unused=(1, 11), blocked={(0, 1)})),
            # k=1; rank 1's experts receive nothing (it still sends and runs its empty experts)
            (([7, 4], 1, 4), dict(blocked={(0, 1), (1, 1)})),
            # rank 0 has no tokens at all
            (([0, 5], 4, 8), dict(unused=(6,))),
        ]
    return [
        # k=4, rank 1 without tokens, rank 0 sends nothing to rank 1, experts 1 and 15 unused
        (([5, 0, 7, 3], 4, 16), dict(unused=(1, 15), blocked={(0, 1)})),
        # k=1, the last rank's experts receive nothing, rank 2 sends only to rank 0
        (([6, 3, 4, 2], 1, 8), dict(blocked={(s, last) for s in range(ep_size)} | {(2, 1), (2, 2)})),
    ]


def _rank_fn(rank, world_size):
    dist.init_process_group("gloo")
    received = []
    for case, kw in _cases(world_size):
        received.append(_check(dist.group.WORLD, rank, world_size, case, **kw))
    if world_size == 4:
        # Two EP=2 groups strided over the world ({0, 2} and {1, 3}), as EP sits inside DP.
        groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        for case, kw in _cases(2):
            received.append(_check(groups[rank % 2], rank // 2, 2, case, **kw))
    dist.barrier()
    dist.destroy_process_group()
    return received


@pytest.mark.parametrize("ep_size", [2, 4])
def test_ep_matches_single_process(ep_size):
    received = run_ranks(_rank_fn, ep_size, timeout_s=300)
    # the case where one rank's experts get nothing really did give that rank zero rows
    assert received[ep_size - 1][1] == 0
