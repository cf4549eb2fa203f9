"""The token log-prob of ``rollout.exact``: one function for the sampler and the trainer.

The rollout reports log p(token) at its sampling temperature; GRPO recomputes it from the
training logits. With bit-identical logits (the batch-invariant forward), the two agree bit for
bit only if they also share this last step: the same temperature arithmetic, the same max, the
same tree-ordered sum of exponentials and the same log. Vocab-parallel shards combine through one
all-reduce each (max, then sum); with two TP ranks a sum of two partials is order-free.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from r1mega.ops import triton_rows
from r1mega.ops.batch_invariant import det_exp, det_log, tree_max, tree_sum


def inverse_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """(N,) float32 temperatures -> (N,) float32 1/T, and 1 for greedy rows (T <= 0, which the
    sampler reports at temperature 1). Computed in float64 and rounded once, on both sides."""
    t = temperature.to(torch.float32).double()
    return torch.where(t > 0, 1.0 / torch.where(t > 0, t, 1.0), 1.0).float()


def exact_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: torch.Tensor, *,
                         vocab_start: int = 0, valid_cols: Optional[int] = None,
                         group=None) -> torch.Tensor:
    """logits (N, V_local) this rank's columns from ``vocab_start``; targets (N,) global ids;
    temperature (N,) float32 -> (N,) float32 log-softmax(logits / T)[target], no truncation.
    Columns at and past ``valid_cols`` (embedding padding) are excluded."""
    n, v_local = logits.shape
    inv_t = inverse_temperature(temperature)  # (N,)
    valid = v_local if valid_cols is None else min(int(valid_cols), v_local)
    sharded = group is not None and dist.get_world_size(group) > 1
    local = targets.long() - vocab_start
    mine = (local >= 0) & (local < v_local)
    if triton_rows.supported(logits):  # one kernel per reduction (r1mega/ops/triton_rows.py)
        m = triton_rows.row_max(logits, inv_t, valid)  # (N,)
        if sharded:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        s = triton_rows.row_sumexp(logits, inv_t, m, valid)  # (N,)
        xt = logits.gather(1, local.clamp(0, v_local - 1)[:, None]).squeeze(1).float() * inv_t
        xt = torch.where(local < valid, xt, float("-inf"))  # as the masked columns below
    else:
        x = logits.float() * inv_t[:, None]  # (N, V_local)
        if valid < v_local:
            cols = torch.arange(v_local, device=logits.device)
            x = torch.where(cols[None, :] < valid, x, float("-inf"))
        m = tree_max(x, -1)  # (N,)
        if sharded:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        s = tree_sum(det_exp(x - m[:, None]), -1)  # (N,)
        xt = x.gather(1, local.clamp(0, v_local - 1)[:, None]).squeeze(1)
    if sharded:
        dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
    xt = torch.where(mine, xt, torch.zeros_like(xt))
    if sharded:
        dist.all_reduce(xt, op=dist.ReduceOp.SUM, group=group)
    return xt - (m + det_log(s))
