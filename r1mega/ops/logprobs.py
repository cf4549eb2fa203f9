"""Per-token log-probabilities (and entropy) from vocabulary-parallel logits.

The logits arrive as a SHARD ``(T, V_padded/tp)``: tensor-parallel rank ``r`` of ``tp_group`` owns
the global columns ``[r*Vl, (r+1)*Vl)``. Columns at or past the true ``vocab_size`` are padding
and are masked out (they get probability 0 and gradient 0).

Nothing here gathers the vocabulary or builds a ``(T, V)`` float32 tensor. Each rank reduces its
shard to four floats per token (max, sum of exponentials, sum of exponential times logit, target
logit); those ``(T, 4)`` statistics are the only thing exchanged over ``tp_group`` (one all-gather),
and every rank then combines them into the same ``lse``, ``logp`` and entropy. The backward needs
``lse`` and ``E_p[x]`` only, so it is one read of the logits and one write of the gradient.

Two implementations share that structure: the CUDA extension (``csrc/grpo_loss*.{cpp,cu}``) and a
token-chunked PyTorch version whose working set is ``chunk_tokens x Vl`` floats. A third,
:func:`reference_logprobs`, is plain autograd on the full vocabulary: the ground truth for tests.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.distributed as dist

from r1mega.ops import _cuda_ext

# The torch path materialises chunk_tokens x Vl floats at a time; 64 MiB keeps it small on any device.
_TORCH_CHUNK_BYTES = 64 * 2**20


# --------------------------------------------------------------------------------------------------
# Process-group helpers (the group is always passed in; None or size 1 means no tensor parallelism)
# --------------------------------------------------------------------------------------------------
def tp_rank_and_size(tp_group) -> Tuple[int, int]:
    if tp_group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def shard_columns(vocab_size: int, local_cols: int, tp_rank: int, tp_size: int) -> Tuple[int, int]:
    """(first global column of this shard, number of real, unpadded columns in it)."""
    if local_cols * tp_size < vocab_size:
        raise ValueError(
            f"logits shard has {local_cols} columns x tp={tp_size} = {local_cols * tp_size} < "
            f"vocab_size={vocab_size}: pass the true (unpadded) vocabulary size and the logits "
            f"shard of THIS rank, shape (tokens, padded_vocab / tp)")
    vocab_start = tp_rank * local_cols
    valid_cols = max(0, min(local_cols, vocab_size - vocab_start))
    return vocab_start, valid_cols


def _gather_stats(stats: torch.Tensor, tp_group, tp_size: int) -> torch.Tensor:
    """(T, 4) local statistics -> (tp, T, 4) from every rank: the one TP collective of a step."""
    if tp_size == 1:
        return stats.unsqueeze(0)
    parts = [torch.empty_like(stats) for _ in range(tp_size)]
    dist.all_gather(parts, stats.contiguous(), group=tp_group)
    return torch.stack(parts)


def combine_stats(all_stats: torch.Tensor):
    """(R, T, 4) per-shard [max, sumexp, sum exp*x, target x] -> (logp, entropy, lse, E_p[x]), (T,) each.

    Shards whose columns are all padding report max=-inf and zero sums; they must weigh 0, not NaN.
    """
    m, s, e, tx = all_stats.unbind(-1)                                   # (R, T) each
    big_m = m.max(dim=0).values                                          # (T,)
    safe_m = torch.where(torch.isfinite(big_m), big_m, torch.zeros_like(big_m))
    w = torch.where(torch.isfinite(m), torch.exp(m - safe_m), torch.zeros_like(m))
    sum_exp = (s * w).sum(0)
    lse = safe_m + torch.log(sum_exp)
    mean_x = (e * w).sum(0) / sum_exp
    logp = tx.sum(0) - lse          # only the owning shard reports a non-zero target logit
    return logp, lse - mean_x, lse, mean_x


# --------------------------------------------------------------------------------------------------
# Token-chunked PyTorch implementation (also the fallback when the extension is absent)
# --------------------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 inputs stay float64 so that gradcheck can test the hand-written backward.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_tokens(local_cols: int) -> int:
    return max(1, _TORCH_CHUNK_BYTES // (4 * max(1, local_cols)))


def torch_shard_stats(logits, targets, vocab_start: int, valid_cols: int, inv_temp: float):
    """(T, Vl) shard -> (T, 4) [max, sum exp(x-max), sum exp(x-max)*x, x_target or 0], x = logits/temp."""
    n_tok = logits.shape[0]
    acc = _acc_dtype(logits.dtype)
    out = torch.zeros(n_tok, 4, dtype=acc, device=logits.device)
    if valid_cols == 0:
        out[:, 0] = -math.inf
        return out
    local_t = targets - vocab_start                                      # (T,)
    owned = (local_t >= 0) & (local_t < valid_cols)
    step = _chunk_tokens(valid_cols)
    for i in range(0, n_tok, step):
        j = min(n_tok, i + step)
        x = logits[i:j, :valid_cols].to(acc) * inv_temp                  # (c, valid)
        m = x.max(dim=1).values                                          # (c,)
        ex = torch.exp(x - m[:, None])
        tgt = x.gather(1, local_t[i:j].clamp(0, valid_cols - 1)[:, None]).squeeze(1)
        out[i:j, 0] = m
        out[i:j, 1] = ex.sum(1)
        out[i:j, 2] = (ex * x).sum(1)
        out[i:j, 3] = torch.where(owned[i:j], tgt, torch.zeros_like(tgt))
    return out


def torch_shard_backward(logits, targets, lse, mean_x, g_logp, g_ent, vocab_start: int,
                         valid_cols: int, inv_temp: float, out: torch.Tensor) -> torch.Tensor:
    """Write d(loss)/d(logits) into ``out`` (may be ``logits`` itself: each chunk is read first).

    d logp / d x_j = [j == target] - p_j ;  d H / d x_j = -p_j (x_j - E_p[x]) ;  d x / d z = 1/temp.
    """
    n_tok = logits.shape[0]
    acc = _acc_dtype(logits.dtype)
    local_t = targets - vocab_start
    owned = (local_t >= 0) & (local_t < valid_cols)
    gl = torch.zeros(n_tok, dtype=acc, device=logits.device) if g_logp is None else g_logp.to(acc)
    step = _chunk_tokens(max(valid_cols, 1))
    for i in range(0, n_tok, step):
        j = min(n_tok, i + step)
        if valid_cols == 0:
            out[i:j].zero_()
            continue
        x = logits[i:j, :valid_cols].to(acc) * inv_temp                  # (c, valid)
        p = torch.exp(x - lse[i:j, None].to(acc))
        g = -gl[i:j, None] * p
        if g_ent is not None:
            g = g - g_ent[i:j, None].to(acc) * p * (x - mean_x[i:j, None].to(acc))
        rows = torch.nonzero(owned[i:j]).squeeze(1)
        g[rows, local_t[i:j][rows]] += gl[i:j][rows]
        out[i:j, :valid_cols] = (g * inv_temp).to(out.dtype)
        out[i:j, valid_cols:] = 0
    return out


# --------------------------------------------------------------------------------------------------
# The autograd function and the public entry point
# --------------------------------------------------------------------------------------------------
class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, tp_group, tp_size, vocab_start, valid_cols, inv_temp,
                use_cuda, inplace_backward):
        if use_cuda:
            stats = _cuda_ext.get().shard_stats(logits, targets, vocab_start, valid_cols, inv_temp)
        else:
            stats = torch_shard_stats(logits, targets, vocab_start, valid_cols, inv_temp)
        logp, entropy, lse, mean_x = combine_stats(_gather_stats(stats, tp_group, tp_size))
        ctx.save_for_backward(logits, targets, lse, mean_x)
        ctx.cfg = (vocab_start, valid_cols, inv_temp, use_cuda, inplace_backward)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, targets, lse, mean_x = ctx.saved_tensors
        vocab_start, valid_cols, inv_temp, use_cuda, inplace = ctx.cfg
        if g_logp is None and g_ent is None:
            return (None,) * 9
        # In place only when the caller promised not to reuse its logits (megatron's CE does the same).
        out = logits if inplace else torch.empty_like(logits)
        if use_cuda:
            gl = g_logp if g_logp is not None else torch.zeros_like(lse)
            _cuda_ext.get().shard_backward(logits, out, targets, lse, mean_x, gl.float().contiguous(),
                                           None if g_ent is None else g_ent.float().contiguous(),
                                           vocab_start, valid_cols, inv_temp)
        else:
            torch_shard_backward(logits, targets, lse, mean_x, g_logp, g_ent, vocab_start,
                                 valid_cols, inv_temp, out)
        return out, None, None, None, None, None, None, None, None


def check_target_layout(targets: torch.Tensor, n_tok: int, name: str = "targets"):
    """Shape and dtype only: host metadata, no device op (the fused GRPO kernel checks the range)."""
    if targets.dim() != 1 or targets.shape[0] != n_tok:
        raise ValueError(f"{name} must have shape ({n_tok},) to match the logits, got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be int64 token ids, got {targets.dtype}")


def check_targets(targets: torch.Tensor, n_tok: int, vocab_size: int, name: str = "targets"):
    check_target_layout(targets, n_tok, name)
    if n_tok and bool(((targets < 0) | (targets >= vocab_size)).any()):
        bad = targets[(targets < 0) | (targets >= vocab_size)][:4].tolist()
        raise ValueError(f"{name} hold ids outside [0, vocab_size={vocab_size}), e.g. {bad}: replace "
                         f"ignore-index/pad ids of masked tokens with any valid id (e.g. 0)")


def resolve_impl(impl: str, logits: torch.Tensor) -> bool:
    """True when the CUDA extension should run."""
    if impl not in ("auto", "cuda", "torch"):
        raise ValueError(f"impl must be 'auto', 'cuda' or 'torch' (grpo.loss_impl), got {impl!r}")
    if impl == "torch":
        return False
    usable = logits.is_cuda and logits.dtype in (torch.bfloat16, torch.float16, torch.float32)
    ext = _cuda_ext.get() if usable else None
    if impl == "cuda" and ext is None:
        raise RuntimeError(
            "impl='cuda' (grpo.loss_impl) but the r1mega_grpo_cuda extension is unavailable for "
            f"logits on {logits.device} dtype {logits.dtype}: {_cuda_ext.load_error() or 'CPU tensor'}; "
            "build it with `pip install -e .` on a CUDA machine or use impl='auto'")
    return ext is not None


def vocab_parallel_logprobs(logits_shard: torch.Tensor, targets: torch.Tensor, *, tp_group=None,
                            vocab_size: int, temperature: float = 1.0, with_entropy: bool = False,
                            impl: str = "auto", inplace_backward: bool = False, check_range: bool = True):
    """log p(target) per token from a vocabulary shard; differentiable w.r.t. ``logits_shard``.

    logits_shard: (T, Vl) this rank's columns [rank*Vl, (rank+1)*Vl) of (T, V_padded).
    targets: (T,) global token ids in [0, vocab_size).  Returns (logp (T,), entropy (T,) | None),
    float32 (float64 for float64 logits), identical on every rank of ``tp_group``.
    SFT cross-entropy is ``-logp``. ``inplace_backward`` writes the gradient into ``logits_shard``.
    ``check_range=False`` skips the id range check, which reads a flag back from the device (a
    sync that drains the GPU's queue): only for targets already validated elsewhere.
    """
    if logits_shard.dim() != 2:
        raise ValueError(f"logits_shard must be (tokens, vocab/tp), got shape {tuple(logits_shard.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n_tok, local_cols = logits_shard.shape
    if check_range:
        check_targets(targets, n_tok, vocab_size)
    else:
        check_target_layout(targets, n_tok)
    tp_rank, tp_size = tp_rank_and_size(tp_group)
    vocab_start, valid_cols = shard_columns(vocab_size, local_cols, tp_rank, tp_size)
    use_cuda = resolve_impl(impl, logits_shard)
    if use_cuda and logits_shard.stride(1) != 1:
        logits_shard = logits_shard.contiguous()
    logp, entropy = _VocabParallelLogProbs.apply(
        logits_shard, targets.long().contiguous(), tp_group, tp_size, vocab_start, valid_cols,
        1.0 / float(temperature), use_cuda, inplace_backward)
    return logp, (entropy if with_entropy else None)


def reference_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, vocab_size: int,
                       temperature: float = 1.0):
    """Ground truth on FULL (T, V_padded) logits: plain log_softmax through autograd (tests only)."""
    acc = _acc_dtype(logits.dtype)
    x = logits[:, :vocab_size].to(acc) / temperature                     # (T, V)
    logsm = torch.log_softmax(x, dim=-1)
    logp = logsm.gather(1, targets.long()[:, None]).squeeze(1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, entropy
