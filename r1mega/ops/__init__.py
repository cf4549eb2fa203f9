"""Python faces of the csrc/ kernels, each next to its PyTorch reference."""
from r1mega.ops.grpo_loss import (finalize_metrics, grpo_loss, grpo_loss_from_hidden, last_impl,
                                  local_normalizer)
from r1mega.ops.linear_logprobs import linear_vocab_parallel_logprobs
from r1mega.ops.logprobs import reference_logprobs, vocab_parallel_logprobs

__all__ = ["grpo_loss", "grpo_loss_from_hidden", "last_impl", "finalize_metrics", "local_normalizer",
           "vocab_parallel_logprobs", "linear_vocab_parallel_logprobs", "reference_logprobs"]
