"""MoE routing as pure float32 functions: which experts each token goes to, and with what weight.

Two families:
- Qwen3-MoE: softmax over all experts, top-k, optionally renormalised over the k chosen.
- DeepSeek-V3: sigmoid scores; experts are split into ``n_group`` groups, a group's score is the
  sum of its two best (biased) expert scores, only the ``topk_group`` best groups stay eligible,
  then top-k among their experts. The per-expert bias (auxiliary-loss-free balancing) is added
  for the *selection* only: the weights come from the unbiased scores, renormalised over the k
  chosen, times ``routed_scaling_factor``. The bias moves by ``rate * sign(mean_load - load)``
  after each training step, so overloaded experts become less likely to be chosen.

Balance losses: the sequence-level auxiliary loss of DeepSeek-V3 (eq. 17-20) and the router
z-loss (ST-MoE). Everything is float32 whatever the activations are: top-k on bf16 scores ties
and flips between otherwise identical runs, which breaks routing replay and parity tests.
"""
from __future__ import annotations

import torch

from r1mega.moe.router_gemm import SplitLogits, logits_split, use_split
from r1mega.ops.batch_invariant import exact_active


def router_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(T, H) x (E, H) -> (T, E) float32 logits; the gate weight is read in float32 too.

    bf16 activations on CUDA take the float32 product on bf16 tensor cores (r1mega/moe/
    router_gemm.py), in training and forward-only passes alike, so both route the same tokens
    the same way; ``rollout.exact`` keeps the plain float32 GEMM its batch-invariant mode owns."""
    needs_graph = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if use_split(hidden, weight) and not exact_active():
        return SplitLogits.apply(hidden, weight) if needs_graph else logits_split(hidden, weight)
    if not needs_graph or (hidden.dtype == torch.float32 and weight.dtype == torch.float32):
        # Nothing is kept for a backward (rollout, log-prob passes): the plain ops, which
        # torch.compile and CUDA-graph capture of the decode step see as before.
        return torch.nn.functional.linear(hidden.float(), weight.float())
    return _Float32Logits.apply(hidden, weight)


class _Float32Logits(torch.autograd.Function):
    """The float32 router product, keeping for the backward the activations in their own dtype:
    autograd over ``linear(hidden.float(), w)`` would hold a float32 copy of every MoE layer's
    (T, H) input until the backward (twice a bf16 activation's bytes); a bf16 value widens to
    float32 exactly, so re-widening it in the backward gives the same gradient."""

    @staticmethod
    def forward(ctx, hidden, weight):
        ctx.save_for_backward(hidden, weight)
        return torch.nn.functional.linear(hidden.float(), weight.float())   # (T, E)

    @staticmethod
    def backward(ctx, grad):                                                 # grad (T, E) float32
        hidden, weight = ctx.saved_tensors
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad @ weight.float()).to(hidden.dtype)           # (T, H)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad.t() @ hidden.float()).to(weight.dtype)       # (E, H)
        return grad_hidden, grad_weight


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE routing. logits (T, E) -> weights (T, k) float32, indices (T, k) int64."""
    _check_k(logits, k, "softmax_topk")
    probs = torch.softmax(logits.float(), dim=-1)                     # (T, E)
    weights, indices = torch.topk(probs, k, dim=-1)                  # (T, k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def group_limited_topk(logits: torch.Tensor, k: int, n_group: int, topk_group: int,
                       bias: torch.Tensor | None = None, renormalize: bool = True,
                       routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing. logits (T, E) -> weights (T, k) float32, indices (T, k) int64.

    ``bias`` (E,) shifts only which experts are chosen; gradients reach the router through the
    unbiased sigmoid scores gathered at the chosen experts.
    """
    _check_k(logits, k, "group_limited_topk")
    num_tokens, num_experts = logits.shape
    if n_group < 1 or num_experts % n_group != 0:
        raise ValueError(f"group_limited_topk: n_group={n_group} must divide num_experts={num_experts}")
    per_group = num_experts // n_group
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"group_limited_topk: topk_group={topk_group} must be in [1, n_group={n_group}]")
    if k > topk_group * per_group:
        raise ValueError(f"group_limited_topk: k={k} exceeds the {topk_group * per_group} experts of the "
                         f"{topk_group} selected groups; raise topk_group")
    scores = torch.sigmoid(logits.float())                            # (T, E)
    if bias is not None and bias.shape != (num_experts,):
        raise ValueError(f"group_limited_topk: bias has shape {tuple(bias.shape)}, expected ({num_experts},)")
    choice = scores if bias is None else scores + bias.float()        # selection only
    # A group's strength is its best two experts (one for single-expert groups), as in DeepSeek-V3.
    grouped = choice.view(num_tokens, n_group, per_group)             # (T, G, E/G)
    group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)  # (T, G)
    group_idx = group_scores.topk(topk_group, dim=-1).indices         # (T, topk_group)
    group_keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    expert_keep = group_keep.unsqueeze(-1).expand(-1, -1, per_group).reshape(num_tokens, num_experts)
    masked = choice.masked_fill(~expert_keep, float("-inf"))          # (T, E)
    indices = masked.topk(k, dim=-1).indices                          # (T, k)
    weights = scores.gather(1, indices)                               # unbiased: (T, k)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, indices


def replayed_weights(logits: torch.Tensor, indices: torch.Tensor, router: str, renormalize: bool,
                     routed_scaling_factor: float) -> torch.Tensor:
    """The routing weights of given (e.g. replayed) experts: logits (T, E), indices (T, k) ->
    (T, k) float32, by exactly the arithmetic ``softmax_topk`` / ``group_limited_topk`` apply to
    the experts they choose, so a replay of a forward's own choice gives bit-identical weights.
    The expert bias never enters (it only selects); gradients reach the logits through gather."""
    if router == "softmax":
        weights = torch.softmax(logits.float(), dim=-1).gather(1, indices)  # (T, k)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        # MoELayer.route scales softmax weights only when the factor is not 1.
        return weights * routed_scaling_factor if routed_scaling_factor != 1.0 else weights
    weights = torch.sigmoid(logits.float()).gather(1, indices)             # (T, k)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor


def expert_load(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, k) expert indices -> (E,) float32 count of token slots per expert.

    index_add_ rather than bincount: CUDA's bincount reads the largest index back to the host
    to size its output, a synchronisation in every MoE layer's training forward. The counts are
    integers below 2^24, exact in float32 whatever order the additions land in."""
    flat = indices.reshape(-1)                                         # (T*k,)
    ones = torch.ones(flat.shape, dtype=torch.float32, device=flat.device)
    return torch.zeros(num_experts, dtype=torch.float32, device=flat.device).index_add_(0, flat, ones)


def update_expert_bias(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """Auxiliary-loss-free balancing step: bias (E,), load (E,) -> new bias (E,).

    Experts above the mean load are pushed down by ``rate`` and those below pushed up; the sign
    (not the size) of the imbalance is used, so one very hot batch cannot swing the bias. Call it
    with the load summed over the step's micro-batches (and the data-parallel group) on training
    passes only: forward-only passes (reference / old log-probs) must leave routing unchanged.
    """
    if bias.shape != load.shape:
        raise ValueError(f"update_expert_bias: bias {tuple(bias.shape)} and load {tuple(load.shape)} differ")
    load = load.float()
    return bias + rate * torch.sign(load.mean() - load)


def sequence_aux_loss(probs: torch.Tensor, indices: torch.Tensor, k: int,
                      token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss (without its alpha), averaged over sequences.

    probs (B, S, E): per-token affinities normalised over all experts (softmax probabilities, or
    sigmoid scores divided by their sum). indices (B, S, k): the chosen experts. token_mask (B, S)
    drops padding. Per sequence: f_i = E / (k * S) * #(tokens choosing i), P_i = mean_t probs,
    loss = sum_i f_i * P_i, which is 1 under perfect balance. f carries no gradient (it is a count).
    """
    if probs.dim() != 3 or indices.dim() != 3 or indices.shape[:2] != probs.shape[:2]:
        raise ValueError(f"sequence_aux_loss: probs (B, S, E) and indices (B, S, k) expected, got "
                         f"{tuple(probs.shape)} and {tuple(indices.shape)}")
    batch, seq, num_experts = probs.shape
    mask = (torch.ones(batch, seq, device=probs.device) if token_mask is None
            else token_mask.float())                                   # (B, S)
    n_valid = mask.sum(dim=1).clamp_min(1.0)                           # (B,)
    chosen = torch.zeros(batch, seq, num_experts, device=probs.device)
    chosen.scatter_(2, indices, 1.0)                                   # (B, S, E) one-hot of k
    counts = (chosen * mask.unsqueeze(-1)).sum(dim=1)                  # (B, E)
    f = counts * num_experts / (k * n_valid.unsqueeze(-1))             # (B, E)
    p = (probs.float() * mask.unsqueeze(-1)).sum(dim=1) / n_valid.unsqueeze(-1)  # (B, E)
    return (f * p).sum(dim=-1).mean()


def normalized_sigmoid_scores(logits: torch.Tensor) -> torch.Tensor:
    """(.., E) logits -> sigmoid scores normalised to sum 1 per token, the affinities that
    DeepSeek-V3's balance loss uses."""
    s = torch.sigmoid(logits.float())
    return s / s.sum(dim=-1, keepdim=True)


def z_loss(logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small so the
    softmax does not saturate. logits (..., E), token_mask (...) optional."""
    lse_sq = torch.logsumexp(logits.float(), dim=-1).square()         # (...)
    if token_mask is None:
        return lse_sq.mean()
    mask = token_mask.float()
    return (lse_sq * mask).sum() / mask.sum().clamp_min(1.0)


def _check_k(logits: torch.Tensor, k: int, name: str) -> None:
    if logits.dim() != 2:
        raise ValueError(f"{name}: logits must be (tokens, experts), got shape {tuple(logits.shape)}")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"{name}: k={k} must be in [1, num_experts={logits.shape[1]}]")
