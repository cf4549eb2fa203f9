"""LM head + log-probabilities without ever holding the (T, V/tp) logits: the issue's stretch goal.

``linear_vocab_parallel_logprobs(hidden, weight_shard, ...)`` equals
``vocab_parallel_logprobs(hidden @ weight_shard.T, ...)`` but walks the tokens in chunks: each
chunk's logits ``(chunk, Vl)`` are made, reduced to the four per-token statistics and dropped. The
backward makes each chunk's logits again (one more matmul, the usual price of not storing them),
turns them into their gradient in place (the same kernels as the logits path) and accumulates
``d hidden = g @ W`` and ``d W = g^T @ hidden``. Peak extra memory is one chunk of logits plus the
weight gradient, for any vocabulary.

Tensor parallelism: ``hidden`` (T, H) is the same on every rank of ``tp_group``, ``weight_shard``
(Vl, H) holds this rank's vocabulary rows. The forward exchanges the (T, 4) statistics once; the
backward all-reduces ``d hidden`` over ``tp_group`` (each rank only saw its vocabulary rows), as
megatron's ColumnParallelLinear does for its input.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from r1mega.ops import _cuda_ext
from r1mega.ops.logprobs import (_gather_stats, check_targets, combine_stats, resolve_impl,
                                 shard_columns, torch_shard_backward, torch_shard_stats,
                                 tp_rank_and_size)

# One chunk of logits at a time: 256 MiB keeps the matmuls large and the memory small.
_CHUNK_LOGIT_BYTES = 256 * 2**20


def default_chunk_tokens(local_vocab: int, elem_bytes: int) -> int:
    return max(1, _CHUNK_LOGIT_BYTES // max(1, local_vocab * elem_bytes))


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, tp_group, tp_size, vocab_start, valid_cols, inv_temp,
                chunk, use_cuda):
        n_tok = hidden.shape[0]
        stats = []
        for i in range(0, n_tok, chunk):
            z = hidden[i:i + chunk] @ weight.t()                          # (c, Vl), dropped after
            if use_cuda:
                stats.append(_cuda_ext.get().shard_stats(z, targets[i:i + chunk], vocab_start, valid_cols,
                                                         inv_temp))
            else:
                stats.append(torch_shard_stats(z, targets[i:i + chunk], vocab_start, valid_cols, inv_temp))
        stats = torch.cat(stats) if stats else torch.zeros(0, 4, device=hidden.device)
        logp, entropy, lse, mean_x = combine_stats(_gather_stats(stats, tp_group, tp_size))
        ctx.save_for_backward(hidden, weight, targets, lse, mean_x)
        ctx.cfg = (tp_group, tp_size, vocab_start, valid_cols, inv_temp, chunk, use_cuda)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, mean_x = ctx.saved_tensors
        tp_group, tp_size, vocab_start, valid_cols, inv_temp, chunk, use_cuda = ctx.cfg
        if g_logp is None and g_ent is None:
            return (None,) * 10
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        grad_h = torch.empty_like(hidden)
        # float32 accumulation across chunks: summing bf16 partial products loses the small ones.
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        grad_w = torch.zeros(weight.shape if ctx.needs_input_grad[1] else (0,), dtype=acc, device=weight.device)
        for i in range(0, hidden.shape[0], chunk):
            sl = slice(i, i + chunk)
            z = hidden[sl] @ weight.t()                                   # (c, Vl), recomputed
            if use_cuda:
                _cuda_ext.get().shard_backward(
                    z, z, targets[sl], lse[sl], mean_x[sl], g_logp[sl].float().contiguous(),
                    None if g_ent is None else g_ent[sl].float().contiguous(), vocab_start, valid_cols,
                    inv_temp)
            else:
                torch_shard_backward(z, targets[sl], lse[sl], mean_x[sl], g_logp[sl],
                                     None if g_ent is None else g_ent[sl], vocab_start, valid_cols,
                                     inv_temp, out=z)
            grad_h[sl] = z @ weight                                       # (c, H)
            if ctx.needs_input_grad[1]:
                grad_w += (z.t() @ hidden[sl]).to(acc)                    # (Vl, H) per chunk
        if tp_size > 1:
            dist.all_reduce(grad_h, group=tp_group)
        grad_w = grad_w.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def linear_vocab_parallel_logprobs(hidden: torch.Tensor, weight_shard: torch.Tensor, targets: torch.Tensor, *,
                                   tp_group=None, vocab_size: int, temperature: float = 1.0,
                                   with_entropy: bool = False, impl: str = "auto",
                                   chunk_tokens: int = 0):
    """log p(target) (and entropy) of ``hidden @ weight_shard.T`` without materialising the logits.

    hidden (T, H); weight_shard (Vl, H), rank r owning vocabulary rows [r*Vl, (r+1)*Vl); targets
    (T,) global ids. Differentiable w.r.t. hidden and weight_shard. ``chunk_tokens`` 0 picks a
    chunk of about 256 MiB of logits.
    """
    if hidden.dim() != 2 or weight_shard.dim() != 2 or hidden.shape[1] != weight_shard.shape[1]:
        raise ValueError(f"hidden must be (tokens, H) and weight_shard (vocab/tp, H); got "
                         f"{tuple(hidden.shape)} and {tuple(weight_shard.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n_tok = hidden.shape[0]
    local_cols = weight_shard.shape[0]
    check_targets(targets, n_tok, vocab_size)
    tp_rank, tp_size = tp_rank_and_size(tp_group)
    vocab_start, valid_cols = shard_columns(vocab_size, local_cols, tp_rank, tp_size)
    # The extension is asked about the logits' dtype/device, which are the hidden states'.
    use_cuda = resolve_impl(impl, hidden)
    chunk = chunk_tokens or default_chunk_tokens(local_cols, hidden.element_size())
    logp, entropy = _LinearLogProbs.apply(hidden, weight_shard, targets.long().contiguous(), tp_group,
                                          tp_size, vocab_start, valid_cols, 1.0 / float(temperature),
                                          int(chunk), use_cuda)
    return logp, (entropy if with_entropy else None)
