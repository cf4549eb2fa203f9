"""GRPO algorithm pieces as pure functions: advantages here, the loss in r1mega.ops.grpo_loss."""
from r1mega.rl.advantages import broadcast_to_tokens, group_advantages, seq_ids_from_cu_seqlens

__all__ = ["group_advantages", "broadcast_to_tokens", "seq_ids_from_cu_seqlens"]
