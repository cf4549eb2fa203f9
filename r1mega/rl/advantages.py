"""GRPO advantages: each completion's reward compared with the other completions of its prompt.

For a prompt with G sampled completions and rewards r_1..r_G, completion i gets
``A_i = (r_i - mean(r)) / (std(r) + eps)`` (DeepSeekMath / R1), or ``r_i - mean(r)`` without the
std scaling (Dr. GRPO, ``grpo.scale_rewards=False``: the std division favours prompts that are
almost always solved or almost never). Every token of completion i then carries ``A_i``.

A group whose rewards are all equal has zero advantage everywhere and so no learning signal; it is
flagged so that dynamic sampling (DAPO) can drop it and refill the batch.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """rewards (N*G,), completions of one prompt contiguous -> (advantages (N*G,), equal_groups (N,) bool).

    std is the unbiased sample std over the group (as in the GRPO papers' reference code).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (num_prompts * group_size,), got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size (rollout.group_size / num_generations) must be >= 2 for GRPO, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}: "
                         "every prompt needs exactly group_size scored completions")
    if not bool(torch.isfinite(rewards).all()):
        bad = torch.nonzero(~torch.isfinite(rewards)).squeeze(1)[:4].tolist()
        raise ValueError(f"rewards hold non-finite values at indices {bad}: fix the reward function "
                         "(a failed verification should score 0, not NaN)")
    acc = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    grouped = rewards.to(acc).view(-1, group_size)                       # (N, G)
    mean = grouped.mean(dim=1, keepdim=True)
    centred = grouped - mean
    # Exact equality, not std < eps: rule-based rewards are discrete, and a tiny but real spread
    # still carries a (scaled-up) signal.
    equal = (grouped == grouped[:, :1]).all(dim=1)                       # (N,)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    centred = torch.where(equal[:, None], torch.zeros_like(centred), centred)
    return centred.reshape(-1), equal


def seq_ids_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(S+1,) cumulative sequence lengths of a packed batch -> (T,) index of each token's sequence."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or int(cu_seqlens[0]) != 0:
        raise ValueError(f"cu_seqlens must be 1-D, start at 0 and be non-decreasing, got {cu_seqlens.tolist()[:8]}")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu_seqlens.tolist()[:8]}")
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)


def broadcast_to_tokens(values: torch.Tensor, *, cu_seqlens: Optional[torch.Tensor] = None,
                        seq_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(S,) per-sequence values -> (T,) per-token, via cu_seqlens (S+1,) or seq_ids (T,) (exactly one)."""
    if (cu_seqlens is None) == (seq_ids is None):
        raise ValueError("pass exactly one of cu_seqlens (S+1,) or seq_ids (T,)")
    if cu_seqlens is not None:
        if cu_seqlens.numel() != values.numel() + 1:
            raise ValueError(f"cu_seqlens has {cu_seqlens.numel()} entries for {values.numel()} sequences; "
                             "it needs one more than the number of sequences")
        seq_ids = seq_ids_from_cu_seqlens(cu_seqlens)
    if seq_ids.numel() and (int(seq_ids.min()) < 0 or int(seq_ids.max()) >= values.numel()):
        raise ValueError(f"seq_ids must lie in [0, {values.numel()}), got range "
                         f"[{int(seq_ids.min())}, {int(seq_ids.max())}]")
    return values[seq_ids.long()]
