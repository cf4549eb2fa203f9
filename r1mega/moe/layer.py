"""The MoE feed-forward block, in megatron's TransformerLayer as its ``mlp`` submodule.

megatron's MLP contract: ``forward(hidden_states (S, B, H)) -> (output (S, B, H), bias=None)``.
One forward, per token t of the S*B tokens:

    logits = x_t W_r^T (float32)  ──► router (softmax top-k | sigmoid group-limited top-k + bias)
        ──► dispatch: token copies grouped by expert (local permute, or the EP all-to-all)
        ──► routed SwiGLU experts over each expert's rows
        ──► combine: sum_j w_tj * expert_{i_tj}(x_t), float32 accumulation
        (+ shared_expert(x_t))

Only on forwards that build a graph (training) does the layer count expert loads for the
bias step and record its balance losses on the chunk's collector (r1mega/moe/balancing.py);
forward-only log-prob passes and the rollout (no grad) route exactly as training does but
leave no trace.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule
from torch import nn

from r1mega.moe import router as R
from r1mega.moe.balancing import AuxLossCollector
from r1mega.moe.dispatch import permute_tokens, routing_metadata, unpermute_tokens
from r1mega.moe.experts import GroupedExperts, SwiGLUMLP
from r1mega.moe.recompute import rebuild_when_saved
from r1mega.moe.settings import MoESettings
from r1mega.moe.tensor_parallel import gather_token_shares, mark_replicated_over_tp, token_share


class LocalDispatcher:
    """The EP=1 dispatcher, with ``AllToAllDispatcher``'s interface (r1mega/moe/token_dispatcher.py):
    every expert is local, so dispatch is the permute into expert-contiguous rows and combine the
    weighted unpermute. The counts stay on the device: no host sync per layer (the loop experts
    read them back anyway; the grouped GEMM does not)."""

    def __init__(self, num_experts: int, ep_group=None, impl: str = "auto"):
        if ep_group is not None and torch.distributed.get_world_size(ep_group) > 1:
            raise ValueError("LocalDispatcher serves expert-parallel size 1 only; use AllToAllDispatcher")
        self.num_experts, self.impl = num_experts, impl

    def dispatch(self, hidden: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor):
        """hidden (T, H), top_idx (T, k), top_w (T, k) -> (rows (T*k, H), counts (E,), ctx)."""
        # The router cannot produce an out-of-range index: skip the (syncing) validation.
        meta = routing_metadata(top_idx, self.num_experts, align=1, impl=self.impl, validate=False)
        return permute_tokens(hidden, meta, impl=self.impl), meta.counts, (meta, top_w)

    def combine(self, expert_output: torch.Tensor, ctx) -> torch.Tensor:
        """(T*k, H) in dispatch's order -> (T, H) = sum_j top_w[t, j] * row(t, j)."""
        meta, top_w = ctx
        return unpermute_tokens(expert_output, top_w, meta, impl=self.impl)


@dataclass(frozen=True)
class ExpertGroups:
    """The part of RoutingMetadata that GroupedExperts reads: rows [offsets[e], offsets[e+1])
    belong to local expert e."""
    num_experts: int
    offsets: torch.Tensor  # (E_local + 1,) int32

    @classmethod
    def from_counts(cls, counts: torch.Tensor, device) -> "ExpertGroups":
        counts = torch.as_tensor(counts).to(device=device, dtype=torch.int64)
        offsets = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=device)
        offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
        return cls(counts.numel(), offsets)


def make_dispatcher(num_experts: int, ep_group, impl: str = "auto"):
    if ep_group is None or torch.distributed.get_world_size(ep_group) == 1:
        return LocalDispatcher(num_experts, impl=impl)
    from r1mega.moe.token_dispatcher import AllToAllDispatcher

    # A router cannot produce an out-of-range expert id: no validation (a host sync on CUDA).
    return AllToAllDispatcher(num_experts, ep_group=ep_group, impl=impl, validate=False)


class MoELayer(MegatronModule):
    """Router (float32) + dispatcher + grouped routed experts + optional shared expert."""

    def __init__(self, config, settings: MoESettings, collector: Optional[AuxLossCollector] = None,
                 ep_group=None, tp_group=None, expert_dp_group=None, experts_impl: str = "auto",
                 dispatch_impl: str = "auto", fp8_policy=None, **unused):
        """``tp_group``: the dense TP group (None: TP = 1); ``expert_dp_group``: the ranks that
        hold the same experts (megatron's expert-DP group), for checkpoint replica ids."""
        super().__init__(config)
        s = settings
        self.settings, self.collector = s, collector
        hidden = config.hidden_size
        ep_size = 1 if ep_group is None else torch.distributed.get_world_size(ep_group)
        self.ep_group, self.ep_size, self.expert_dp_group = ep_group, ep_size, expert_dp_group
        if tp_group is not None:
            self.tp_group = tp_group  # MegatronModule.sharded_state_dict reads it too
        self.tp_size = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
        self.tp_rank = 0 if tp_group is None else torch.distributed.get_rank(tp_group)
        # Read at call time: the rollout switches it off (sequence_parallel_off) for decode steps.
        self.sequence_parallel = bool(config.sequence_parallel) and self.tp_size > 1
        if s.num_experts % ep_size:
            raise ValueError(f"MoELayer: num_experts={s.num_experts} not divisible by the expert-parallel "
                             f"size {ep_size} (model.num_experts / parallel.expert)")
        self.num_local_experts = s.num_experts // ep_size
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        std = config.init_method_std
        # float32 whatever the activations: bf16 logits tie and flip top-k choices between runs.
        self.router_weight = nn.Parameter(torch.empty(s.num_experts, hidden, device=device,
                                                      dtype=torch.float32))
        nn.init.normal_(self.router_weight, std=std)
        # fp8_policy: set by r1mega/precision/spec.py when precision.fp8_experts is on
        self.experts = GroupedExperts(self.num_local_experts, hidden, s.ffn_hidden_size,
                                      impl=experts_impl, device=device, dtype=config.params_dtype,
                                      fp8=fp8_policy)
        self.experts.reset_parameters(std=std)
        if ep_size > 1:
            # megatron DDP's mark for expert-parallel weights: their gradients are reduced over
            # the expert-data-parallel group (ranks holding the SAME experts), not over DP.
            for p in self.experts.parameters():
                p.allreduce = False
        else:
            mark_replicated_over_tp(self.experts.parameters(), self.sequence_parallel)
        self.shared_expert = None
        if s.shared_ffn_hidden_size:
            self.shared_expert = SwiGLUMLP(hidden, s.shared_ffn_hidden_size, device=device,
                                           dtype=config.params_dtype, fp8=fp8_policy)
            for w in (self.shared_expert.gate_up, self.shared_expert.down):
                nn.init.normal_(w, std=std)
            mark_replicated_over_tp(self.shared_expert.parameters(), self.sequence_parallel)
        mark_replicated_over_tp([self.router_weight], self.sequence_parallel)
        if s.bias_enabled or s.selection_bias:
            # (With bias_update_rate 0 the balancing step adds 0: the bias stays as loaded.)
            # State, not a parameter: moved by update_expert_biases, saved with checkpoints.
            self.register_buffer("expert_bias", torch.zeros(s.num_experts, device=device))
            self.register_buffer("expert_load_accum", torch.zeros(s.num_experts, device=device),
                                 persistent=False)
        else:
            self.expert_bias = self.expert_load_accum = None
        self.dispatcher = make_dispatcher(s.num_experts, ep_group, impl=dispatch_impl)
        # Routing replay (r1mega/moe/replay.py): per-forward objects set by routing_context.
        # moe_index numbers the MoE layers of the whole model (set_layer_number; 0 if unset).
        self.moe_index = 0
        self.routing_replay = None
        self.routing_capture = None

    def set_layer_number(self, layer_number: int) -> None:
        """megatron's TransformerLayer hands its global 1-based layer number to its mlp: the
        first ``first_k_dense`` layers are dense, so MoE layer i is model layer first_k_dense + i."""
        self.moe_index = layer_number - 1 - self.settings.first_k_dense

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """megatron's default (every tensor replicated over TP, one copy per DP rank), except the
        routed experts under EP > 1: each EP rank's (E/EP, ...) stack is the slice
        [ep_rank * E/EP, (ep_rank + 1) * E/EP) of one (E, ...) tensor, and its copies are the
        expert-DP ranks (with expert-TP = 1 a TP rank > 0 holds other experts, never a replica)."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.ep_size == 1:
            return sd
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        dist = torch.distributed
        ep_rank = dist.get_rank(self.ep_group)
        edp_rank = 0 if self.expert_dp_group is None else dist.get_rank(self.expert_dp_group)
        axis = len(sharded_offsets)  # the expert axis, after any prepended (layer) axes
        for name, param in self.experts.named_parameters():
            key = f"{prefix}experts.{name}"
            sd[key] = ShardedTensor.from_rank_offsets(
                sd[key].key, param, *sharded_offsets, (axis, ep_rank, self.ep_size),
                replica_id=(0, 0, edp_rank), prepend_axis_num=len(sharded_offsets))
        return sd

    def host_sync_free(self, dtype: torch.dtype) -> bool:
        """Whether a forward on activations of ``dtype`` runs without reading anything back to
        the host (what CUDA-graph capture needs): the grouped-GEMM experts (bf16, sm_90+) and the
        local dispatcher's device-side counts. The per-expert loop and the all-to-all (split
        sizes on the host) both synchronise."""
        from r1mega.moe import _cuda_ext
        from r1mega.moe.experts import grouped_mm_available

        probe = torch.empty(0, device=self.router_weight.device, dtype=dtype)
        grouped = self.experts.impl == "grouped" or (self.experts.impl == "auto" and grouped_mm_available(probe))
        # The PyTorch reference of the routing metadata sizes its bincount on the host.
        if not grouped or not isinstance(self.dispatcher, LocalDispatcher):
            return False
        return self.dispatcher.impl != "torch" and _cuda_ext.get() is not None

    # ------------------------------------------------------------------ routing

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, H) -> (logits (T, E) float32, weights (T, k) float32, indices (T, k) int64)."""
        s = self.settings
        logits = R.router_logits(x, self.router_weight)                        # (T, E)
        if s.router == "softmax":
            w, idx = R.softmax_topk(logits, s.topk, s.norm_topk_prob)
            if s.routed_scaling_factor != 1.0:
                w = w * s.routed_scaling_factor
        else:
            w, idx = R.group_limited_topk(logits, s.topk, s.num_groups, s.topk_groups,
                                          bias=self.expert_bias, renormalize=s.norm_topk_prob,
                                          routed_scaling_factor=s.routed_scaling_factor)
        replay = self.routing_replay
        if replay is not None:
            forced = replay.forced(self.moe_index, x.shape[0], s.topk).to(idx.device)  # (T, k), -1 free
            free = (forced < 0).any(dim=-1, keepdim=True)                          # (T, 1)
            forced = torch.where(free, idx, forced)
            w = torch.where(free, w, R.replayed_weights(logits, forced, s.router, s.norm_topk_prob,
                                                        s.routed_scaling_factor))
            idx = forced
        if self.routing_capture is not None:
            self.routing_capture.record(self.moe_index, idx)
        return logits, w, idx

    def _balance_losses(self, logits: torch.Tensor, idx: torch.Tensor, seq: int, batch: int,
                        padding_mask: Optional[torch.Tensor]) -> None:
        """Record this forward's balance losses (megatron layout: token t = s * B + b). A packed
        (THD) micro-batch arrives as B = 1, so its 'sequence' is the whole packed row."""
        c, s = self.collector, self.settings
        mask = None if padding_mask is None else ~padding_mask.bool()          # (B, S) True = real
        aux = z = None
        if c.aux_loss_coeff:
            probs = (torch.softmax(logits, -1) if s.router == "softmax"
                     else R.normalized_sigmoid_scores(logits))                  # (T, E)
            probs = probs.view(seq, batch, -1).transpose(0, 1)                  # (B, S, E)
            aux = R.sequence_aux_loss(probs, idx.view(seq, batch, -1).transpose(0, 1), s.topk, mask)
        if c.z_loss_coeff:
            z = R.z_loss(logits.view(seq, batch, -1).transpose(0, 1), mask)
        c.record(aux, z)

    # ------------------------------------------------------------------ forward

    @property
    def load_shard_group(self):
        """The group over which this layer's expert loads are partial (each TP rank counts only
        its sequence shard under sequence parallelism), or None; update_expert_biases sums there."""
        return self.tp_group if self.sequence_parallel else None

    def forward(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, **unused):
        """hidden_states (S, B, H): this TP rank's sequence shard under sequence parallelism,
        else every token (see r1mega/moe/tensor_parallel.py) -> ((S, B, H), None)."""
        if self.tp_size > 1 and self.ep_size > 1 and not self.sequence_parallel:
            return self._forward_token_share(hidden_states), None
        return self._forward(hidden_states, padding_mask), None

    def _forward_token_share(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Tokens replicated over TP, experts spread over EP: each TP rank routes a 1/TP share
        (otherwise every token crosses the all-to-all TP times), then the shares are gathered."""
        if torch.is_grad_enabled():
            raise RuntimeError("MoELayer: training with parallel.tensor > 1 and parallel.expert > 1 "
                               "needs parallel.sequence_parallel=true (each TP rank then routes its "
                               "own sequence shard); this path is for forward-only passes")
        seq, batch, hidden = hidden_states.shape
        mine, sizes = token_share(hidden_states.reshape(seq * batch, hidden), self.tp_rank, self.tp_size)
        out = self._forward(mine.view(-1, 1, hidden), None).view(-1, hidden)  # (T_r, H)
        return gather_token_shares(out, sizes, self.tp_group).view(seq, batch, hidden)

    def _forward(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        seq, batch, hidden = hidden_states.shape
        x = hidden_states.reshape(seq * batch, hidden)                          # (T, H)
        logits, w, idx = self.route(x)
        if torch.is_grad_enabled():
            # Training forward: the only passes that balancing may learn from.
            if self.expert_load_accum is not None:
                self.expert_load_accum += R.expert_load(idx, self.settings.num_experts)
            if self.collector is not None and self.collector.enabled:
                self._balance_losses(logits, idx, seq, batch, padding_mask)
        if torch.is_grad_enabled() and torch.compiler.is_compiling():
            # Compiled, the partitioner would keep the permuted rows for backward (k copies of
            # x, the layer's largest activation) that rebuild_when_saved's hooks gather again;
            # dynamo cannot trace those hooks, so a training forward runs this part eagerly.
            # Forward-only passes (log-probs, compiled or graph-captured decode) trace the whole
            # layer as one graph.
            out = self._routed_eager(x, idx, w)
        else:
            out = self._routed(x, idx, w)
        out = out.to(x.dtype)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return out.view(seq, batch, hidden)

    def _routed(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x (T, H), top-k indices and weights (T, k) -> (T, H): dispatch, experts, combine."""
        rows, counts, ctx = self.dispatcher.dispatch(x, idx, w)                 # (N, H)
        if isinstance(self.dispatcher, LocalDispatcher):
            # The routing metadata already holds the offsets: no cumsum kernels per layer.
            meta = ctx[0]
            groups = ExpertGroups(meta.num_experts, meta.offsets)
            # The rows are a gather of x (which the router keeps): backward gathers them again
            # rather than keeping k copies of x. After an all-to-all they are other ranks' rows.
            regather = lambda: permute_tokens(x, meta, impl=self.dispatcher.impl)  # noqa: E731
            with rebuild_when_saved(rows, regather, source=x):
                routed = self.experts(rows, groups)                              # (N, H)
        else:
            groups = ExpertGroups.from_counts(counts, rows.device)
            routed = self.experts(rows, groups)
        return self.dispatcher.combine(routed, ctx)                              # (T, H)

    @torch.compiler.disable
    def _routed_eager(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._routed(x, idx, w)


def num_active_parameters(settings: MoESettings, hidden: int) -> int:
    """Parameters one token touches in an MoE layer's FFN (router + k experts + shared expert)."""
    per_expert = 3 * hidden * settings.ffn_hidden_size
    shared = 3 * hidden * settings.shared_ffn_hidden_size
    return settings.num_experts * hidden + settings.topk * per_expert + shared

