"""Python faces of the csrc/ kernels, each next to its PyTorch reference."""
from r1mega.ops.grpo_loss import finalize_metrics, grpo_loss, last_impl, local_normalizer
from r1mega.ops.logprobs import reference_logprobs, vocab_parallel_logprobs

__all__ = ["grpo_loss", "last_impl", "finalize_metrics", "local_normalizer", "vocab_parallel_logprobs",
           "reference_logprobs"]
