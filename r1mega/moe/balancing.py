"""How MoE balancing reaches training: the balance losses of one forward, and the expert-bias step.

* :class:`AuxLossCollector`: one per model chunk (``GPTModel.moe_aux_losses``, set by
  r1mega/models/gpt.py). Each MoE layer of the chunk records its sequence-level balance loss and
  router z-loss on it during a forward that builds a graph; the train step clears it before the
  micro-batch's forward and adds ``collector.take()`` (the coefficient-weighted sum) to that
  micro-batch's loss. The losses therefore travel next to the logits, never through a global or
  through the hidden states, and forward-only passes (reference / old log-probs, rollout: no
  grad) record nothing.
* :func:`update_expert_biases`: DeepSeek-V3's auxiliary-loss-free balancing, run by the train
  step once per optimizer step. Each layer counts the expert loads of its training forwards
  (grad enabled) only; the counts are summed over the data-parallel group so every replica moves
  its bias identically, then cleared.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from r1mega.moe.router import update_expert_bias


class AuxLossCollector:
    """Balance losses recorded by a chunk's MoE layers during one micro-batch's forward."""

    def __init__(self, aux_loss_coeff: float, z_loss_coeff: float):
        self.aux_loss_coeff = float(aux_loss_coeff)
        self.z_loss_coeff = float(z_loss_coeff)
        self._terms: list[torch.Tensor] = []

    @property
    def enabled(self) -> bool:
        return bool(self.aux_loss_coeff or self.z_loss_coeff)

    def begin(self) -> None:
        """Forget what an earlier forward recorded (e.g. one whose loss was never taken)."""
        self._terms.clear()

    def record(self, aux: Optional[torch.Tensor], z: Optional[torch.Tensor]) -> None:
        """One layer's 0-d losses (None: that term is off)."""
        if aux is not None and self.aux_loss_coeff:
            self._terms.append(self.aux_loss_coeff * aux)
        if z is not None and self.z_loss_coeff:
            self._terms.append(self.z_loss_coeff * z)

    def take(self) -> Optional[torch.Tensor]:
        """sum over layers of coeff * loss, float32 0-d, or None if nothing was recorded; clears."""
        if not self._terms:
            return None
        total = torch.stack([t.float() for t in self._terms]).sum()
        self._terms.clear()
        return total


def moe_layers(chunks) -> list:
    """Every r1mega MoELayer inside ``chunks`` (DDP-wrapped or bare), in module order."""
    from r1mega.moe.layer import MoELayer

    return [m for c in chunks for m in c.modules() if isinstance(m, MoELayer)]


@torch.no_grad()
def update_expert_biases(chunks, dp_group=None, applied: Optional[object] = None) -> int:
    """One auxiliary-loss-free step for every biased MoE layer of ``chunks``; returns how many.

    ``applied``: whether the optimizer step just taken was applied (a bool, or a 0-d bool device
    tensor on the sync-free path); a skipped step leaves the biases as they were, so a step with
    a non-finite loss does not move routing either. The loads are cleared in every case: they
    belong to that step.
    """
    layers = [m for m in moe_layers(chunks) if m.expert_bias is not None]
    if not layers:
        return 0
    loads = torch.stack([m.expert_load_accum for m in layers])                # (L, E)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(loads, group=dp_group)
    # Under sequence parallelism each TP rank counted only its shard: sum over TP too, so every
    # TP rank takes the same bias step (the same layer config everywhere: one group for all).
    shard_group = getattr(layers[0], "load_shard_group", None)
    if shard_group is not None:
        dist.all_reduce(loads, group=shard_group)
    for m, load in zip(layers, loads):
        new = update_expert_bias(m.expert_bias, load, m.settings.bias_update_rate)
        if applied is None or applied is True:
            m.expert_bias.copy_(new)
        elif isinstance(applied, torch.Tensor):
            m.expert_bias.copy_(torch.where(applied.to(new.device), new, m.expert_bias))
        m.expert_load_accum.zero_()
    return len(layers)
