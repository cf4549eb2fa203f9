"""Expert parallelism: move routed token copies to the EP ranks that own their experts, and back.

EP rank r of an expert-parallel group of size P owns the global experts
[r * E_local, (r + 1) * E_local), E_local = num_experts // P. One MoE layer is

    expert_input, tokens_per_local_expert, ctx = dispatcher.dispatch(hidden, top_idx, top_w)
    expert_output = local_experts(expert_input, tokens_per_local_expert)     # rows grouped by local expert
    out = dispatcher.combine(expert_output, ctx)                             # (T, H) on the token's home rank

dispatch, on each rank (T tokens, k routes each, N = rows this rank's experts receive):
  1. routing metadata over the *global* expert ids and a permute into expert order (dispatch.py).
     Experts are contiguous per rank, so expert order is destination-rank-then-expert order: the
     permuted rows are already the all-to-all's send buffer, split by destination rank.
  2. one small all-to-all of the per-expert counts, so every rank knows what it will receive;
     these counts go to the host once (variable split sizes are host integers, unavoidably).
  3. all_to_all_single of the rows with those splits (autograd: the backward is the reverse exchange).
  4. received rows come grouped by source rank, then local expert; a second, local permutation
     (routing metadata over the local expert ids, one route per row) regroups them by local expert,
     source ranks in order within an expert.
combine is the exact reverse: undo the local permutation, the reverse all-to-all, then the weighted
sum over the k routes on the home rank (unpermute_tokens, float32 accumulation). The router weights
are applied only there, so their gradient is computed where they live and never travels.

With ep_group None or of size 1 the dispatcher is just the local permute / unpermute.

Every rank of the group must call dispatch and combine the same number of times, in the same order,
and, when training, run the backward of both: a rank whose experts receive no rows still has to
keep ``expert_input`` in the autograd graph (run its experts on the zero rows rather than return a
fresh zero tensor), or its peers wait forever in the backward all-to-all.

Not here: expert tensor parallelism (splitting one expert's FFN over a TP group inside the EP
group) and dropping tokens over a capacity factor; every routed copy is delivered.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from r1mega.moe.dispatch import RoutingMetadata, permute_tokens, routing_metadata, unpermute_tokens


def exchange_rows(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """x (sum(input_splits), ...) -> (sum(output_splits), ...): rows x[input block j] go to group
    rank j; block i of the result came from group rank i. No autograd (see _AllToAll).

    One helper for every backend: gloo (torch 2.13, CPU) implements all_to_all_single with
    uneven splits, including empty blocks, as NCCL does. (Its list form, dist.all_to_all, rejects
    uneven sizes on gloo, so it is not used.)"""
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=output_splits,
                           input_split_sizes=input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Differentiable variable-split all-to-all: the gradient travels the reverse way."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return exchange_rows(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_out):
        return exchange_rows(grad_out, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


@dataclass
class DispatchContext:
    """What combine needs to undo a dispatch. Opaque to the MoE layer."""
    home_meta: RoutingMetadata            # the T*k routed copies on their home rank, global expert order
    top_w: torch.Tensor                   # (T, k) float32, applied in combine
    local_meta: RoutingMetadata | None    # received rows -> local-expert order; None without EP
    send_splits: list[int] | None         # rows sent to each group rank (host ints); None without EP
    recv_splits: list[int] | None         # rows received from each group rank
    num_rows: int                         # N: rows of expert_input / expert_output


class AllToAllDispatcher:
    """Moves routed token copies to the ranks that own their experts and back."""

    def __init__(self, num_experts: int, ep_group=None, *, impl: str = "auto", validate: bool = True):
        """``ep_group`` None or of size 1: local only. ``impl`` picks the dispatch.py kernels
        ("auto": CUDA where loaded, else the PyTorch references). ``validate`` checks every expert
        id is in range (a host sync on CUDA; a router cannot produce a bad one)."""
        self.ep_group = ep_group
        self.ep_size = 1 if ep_group is None else dist.get_world_size(ep_group)
        self.ep_rank = 0 if ep_group is None else dist.get_rank(ep_group)
        if num_experts < 1 or num_experts % self.ep_size:
            raise ValueError(f"AllToAllDispatcher: num_experts={num_experts} does not split over an expert-parallel "
                             f"group of {self.ep_size} ranks; make model.num_experts a multiple of parallel.expert")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.impl = impl
        self.validate = validate

    @property
    def local_expert_range(self) -> tuple[int, int]:
        """[first, end) of the global expert ids this rank runs."""
        return self.ep_rank * self.num_local_experts, (self.ep_rank + 1) * self.num_local_experts

    def _check(self, hidden: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> None:
        if hidden.dim() != 2:
            raise ValueError(f"AllToAllDispatcher.dispatch: hidden must be (tokens, hidden), got {tuple(hidden.shape)}")
        if top_idx.dim() != 2 or top_idx.shape[0] != hidden.shape[0]:
            raise ValueError(f"AllToAllDispatcher.dispatch: top_idx must be ({hidden.shape[0]}, topk) to match "
                             f"hidden {tuple(hidden.shape)}, got {tuple(top_idx.shape)}")
        if top_w.shape != top_idx.shape:
            raise ValueError(f"AllToAllDispatcher.dispatch: top_w {tuple(top_w.shape)} must have top_idx's shape "
                             f"{tuple(top_idx.shape)}")
        if not top_w.is_floating_point():
            raise ValueError(f"AllToAllDispatcher.dispatch: top_w must be floating point (the router's float32), "
                             f"got {top_w.dtype}")

    def dispatch(self, hidden: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor):
        """hidden (T, H); top_idx (T, k) int64 global expert ids; top_w (T, k) float32.
        -> (expert_input (N, H) grouped by local expert, tokens_per_local_expert (E_local,) int64 on host, ctx)"""
        self._check(hidden, top_idx, top_w)
        home = routing_metadata(top_idx, self.num_experts, impl=self.impl, validate=self.validate)
        rows = permute_tokens(hidden, home, impl=self.impl)                      # (T*k, H) global expert order
        if self.ep_size == 1:
            counts = home.counts.to("cpu", torch.int64)                           # (E,) the one host sync
            ctx = DispatchContext(home, top_w, None, None, None, rows.shape[0])
            return rows, counts, ctx

        P, E_local = self.ep_size, self.num_local_experts
        send_counts = home.counts.to(torch.int64)                                 # (E,) = (P, E_local) by dest
        # recv_counts[s * E_local + e]: rows source rank s sends for local expert e.
        recv_counts = exchange_rows(send_counts, [E_local] * P, [E_local] * P, self.ep_group)
        host = torch.cat([send_counts, recv_counts]).cpu().view(2, P, E_local)    # the one host sync
        send_splits = host[0].sum(1).tolist()
        recv_splits = host[1].sum(1).tolist()
        tokens_per_local_expert = host[1].sum(0)                                  # (E_local,) int64
        num_recv = sum(recv_splits)

        # Entries naming no expert (only when validate=False) sit past the routed rows: not sent.
        received = _AllToAll.apply(rows[:sum(send_splits)], recv_splits, send_splits, self.ep_group)  # (N, H)
        # Local expert id of each received row, then one route per row: a stable sort by local expert.
        local_ids = torch.repeat_interleave(
            torch.arange(E_local, device=recv_counts.device).repeat(P), recv_counts,
            output_size=num_recv).view(num_recv, 1)                               # (N, 1)
        local = routing_metadata(local_ids, E_local, impl=self.impl, validate=False)
        expert_input = permute_tokens(received, local, impl=self.impl)            # (N, H) by local expert
        ctx = DispatchContext(home, top_w, local, send_splits, recv_splits, num_recv)
        return expert_input, tokens_per_local_expert, ctx

    def combine(self, expert_output: torch.Tensor, ctx: DispatchContext) -> torch.Tensor:
        """expert_output (N, H) in dispatch's order -> (T, H): sum_k top_w * expert_out, float32 accumulation."""
        if expert_output.dim() != 2 or expert_output.shape[0] != ctx.num_rows:
            raise ValueError(f"AllToAllDispatcher.combine: expert_output must be ({ctx.num_rows}, hidden), the rows "
                             f"dispatch returned, in that order; got {tuple(expert_output.shape)}")
        rows = expert_output
        if ctx.local_meta is not None:
            # One route per row, weight 1: exactly the inverse of the local permutation.
            received = unpermute_tokens(expert_output, None, ctx.local_meta, impl=self.impl)  # (N, H)
            rows = _AllToAll.apply(received, ctx.send_splits, ctx.recv_splits, self.ep_group)  # (T*k, H)
            if rows.shape[0] < ctx.home_meta.num_rows:                                   # dropped entries
                rows = torch.cat([rows, rows.new_zeros(ctx.home_meta.num_rows - rows.shape[0], rows.shape[1])])
        return unpermute_tokens(rows, ctx.top_w, ctx.home_meta, impl=self.impl)          # (T, H)
