"""MoE under tensor parallelism: which tokens a TP rank routes, and how gradients meet.

The layout is megatron's expert-TP = 1 (r1mega/parallel/runtime.py passes
``expert_tensor_parallel_size=1``): the routed experts are never split over TP, the EP group
is carved from TP x DP (at TP=2, EP=2 it is the TP group), and each TP rank routes only the
tokens it holds.

* Sequence parallelism on (training): the MoE input is already this rank's sequence shard
  (S/TP, B, H), so the layer routes and dispatches it as it stands. Replicated weights (router,
  shared expert, and the routed experts when EP = 1) see only that shard, so their gradients
  are partial sums: they carry megatron's ``sequence_parallel`` mark and
  ``finalize_model_grads`` sums them over TP. With EP > 1 the experts are EP weights
  (``allreduce=False``): megatron DDP sums their gradients over the expert-DP group, which
  already holds every rank that computed rows for the same experts.
* Sequence parallelism off (the rollout flips it off; a run configured without it): every TP
  rank holds every token. With EP = 1 each rank computes the layer on all tokens, exactly as
  at TP = 1 (replicated weights, replicated, complete gradients: nothing to reduce). With
  EP > 1 that would send each token TP times through the all-to-all, so forward-only passes
  take a 1/TP share of the tokens (:func:`token_share`), run the layer on it and gather the
  outputs back (:func:`gather_token_shares`); training that way is refused by validation
  (r1mega/moe/settings.py) as megatron refuses it: enable sequence parallelism.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def share_sizes(num_tokens: int, tp_size: int) -> list[int]:
    """Rows each TP rank takes of ``num_tokens`` replicated rows: as equal as possible, the
    first ranks one more (torch.tensor_split's rule), so a decode step of fewer tokens than
    ranks leaves some ranks empty rather than failing."""
    base, extra = divmod(num_tokens, tp_size)
    return [base + (1 if r < extra else 0) for r in range(tp_size)]


def token_share(x: torch.Tensor, tp_rank: int, tp_size: int) -> tuple[torch.Tensor, list[int]]:
    """x (T, H) replicated over TP -> (this rank's rows (T_r, H), every rank's T_r)."""
    sizes = share_sizes(x.shape[0], tp_size)
    start = sum(sizes[:tp_rank])
    return x[start:start + sizes[tp_rank]], sizes


@torch.no_grad()
def gather_token_shares(local: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Inverse of :func:`token_share`: every rank's (T_r, H) -> (T, H) on every rank. Forward
    only (no autograd). Shares are padded to the largest one because gloo's all_gather wants
    equal sizes."""
    width = max(sizes)
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def mark_replicated_over_tp(params, sequence_parallel: bool) -> None:
    """Weights every TP rank holds whole: under sequence parallelism each rank's gradient is its
    shard's share, summed over TP by ``finalize_model_grads`` (megatron reads the mark only when
    ``config.sequence_parallel`` is on; without it every rank's gradient is already complete)."""
    for p in params:
        p.sequence_parallel = bool(sequence_parallel)
