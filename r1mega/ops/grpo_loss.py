"""The GRPO objective on vocabulary-parallel logits: clipped ratio surrogate, KL to the reference,
truncated importance weights, three aggregation modes, and the metrics a trainer logs.

Per active token t (``loss_mask > 0``), with ``logp`` from the current policy:

    ratio   = exp(logp - old_logp)
    pg      = -min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
    pg      = min(pg, -dual_clip * A)                 if dual_clip > 0 and A < 0
    pg      = pg * min(exp(old_logp - rollout_logp), tis_cap)      if tis_cap > 0 (a constant)
    kl      = k1: logp - ref | k2: (ref - logp)^2 / 2 | k3: exp(ref - logp) - (ref - logp) - 1
    loss_t  = pg + kl_beta * kl
    loss    = sum_t weight_t * loss_t

The aggregation mode only changes ``weight_t`` (see :func:`token_weights`), and ``normalizer`` is
GLOBAL (summed over micro-batches and data-parallel ranks by the caller, :func:`local_normalizer`
gives one micro-batch's share) so that summing every rank's and micro-batch's loss is exact.

Paths: ``cuda`` runs one fused kernel (statistics, loss gradient and the logits' gradient in a
single read of the logits; Hopper thread-block clusters) when there is no tensor parallelism, else
the two-kernel path (statistics, one (T, 4) all-gather, then read + write in the backward);
``torch`` runs the token-chunked PyTorch path. :func:`last_impl` says which ran.
:func:`grpo_loss_from_hidden` takes the hidden states and the LM-head shard instead and never
materialises the logits (r1mega.ops.linear_logprobs).
"""
from __future__ import annotations

import math
import os
from typing import Dict, Optional

import torch

from r1mega.ops import _cuda_ext
from r1mega.ops.logprobs import (check_target_layout, check_targets, resolve_impl, shard_columns,
                                 tp_rank_and_size, vocab_parallel_logprobs)

LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_CODES = {"k1": 1, "k2": 2, "k3": 3}
_last = {"impl": None, "kernel": None}


def last_impl() -> Optional[str]:
    """'cuda' or 'torch': the path the last :func:`grpo_loss` call took."""
    return _last["impl"]


def last_kernel() -> Optional[str]:
    """Finer detail: 'fused' (one-pass cluster kernel), 'two_pass' (CUDA, also under tensor
    parallelism) or 'chunked' (torch)."""
    return _last["kernel"]


# --------------------------------------------------------------------------------------------------
# Per-token math (pure, (T,) tensors). The CUDA kernel's grpo_token_grad() is this function's
# derivative; keep the two in step.
# --------------------------------------------------------------------------------------------------
def check_cfg(cfg, ref_logp, rollout_logp):
    if cfg.loss_agg not in LOSS_AGGS:
        raise ValueError(f"grpo.loss_agg must be one of {LOSS_AGGS}, got {cfg.loss_agg!r}")
    if cfg.kl_estimator not in KL_CODES:
        raise ValueError(f"grpo.kl_estimator must be k1, k2 or k3, got {cfg.kl_estimator!r}")
    if cfg.dual_clip and cfg.dual_clip <= 1.0:
        raise ValueError(f"grpo.dual_clip must be > 1 (or 0 to disable), got {cfg.dual_clip}")
    if cfg.kl_beta and ref_logp is None:
        raise ValueError(f"grpo.kl_beta={cfg.kl_beta} needs ref_logp (the reference model's log-probs)")
    if cfg.tis_cap and rollout_logp is None:
        raise ValueError(f"grpo.tis_cap={cfg.tis_cap} needs rollout_logp (the rollout engine's log-probs)")


def grpo_token_loss(logp, adv, old_logp, active, *, cfg, ref_logp=None, rollout_logp=None):
    """(T,) per-token loss and its parts. Inactive tokens get exactly 0 loss AND 0 gradient.

    Inputs of inactive tokens may be garbage (inf, NaN); they are replaced before any arithmetic,
    because ``where`` alone would still let NaN into the gradient through the unused branch.
    """
    zero = torch.zeros_like(logp)
    adv = torch.where(active, adv.to(logp.dtype), zero)
    log_ratio = torch.where(active, logp - old_logp.to(logp.dtype), zero)             # (T,)
    ratio = torch.exp(log_ratio)
    s1 = ratio * adv
    s2 = torch.clamp(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high) * adv
    pg = torch.where(s1 <= s2, -s1, -s2)
    dual_bound = torch.zeros_like(active)
    if cfg.dual_clip:
        pg3 = -cfg.dual_clip * adv
        dual_bound = (adv < 0) & ~(pg <= pg3)
        pg = torch.where(dual_bound, pg3, pg)
    if cfg.tis_cap:
        tis_w = torch.exp(torch.where(active, old_logp.to(logp.dtype) - rollout_logp.to(logp.dtype), zero))
        pg = pg * torch.clamp(tis_w, max=cfg.tis_cap).detach()
    kl = zero
    if ref_logp is not None:
        d = torch.where(active, ref_logp.to(logp.dtype) - logp, zero)                  # log(ref/pi)
        if cfg.kl_estimator == "k1":
            kl = -d
        elif cfg.kl_estimator == "k2":
            kl = 0.5 * d * d
        else:
            kl = torch.exp(d) - d - 1.0
    loss = pg + cfg.kl_beta * kl if cfg.kl_beta else pg
    loss = torch.where(active, loss, zero)
    return loss, {"ratio": ratio, "log_ratio": log_ratio, "adv": adv, "kl": kl, "dual": dual_bound}


def token_weights(loss_mask, *, loss_agg: str, normalizer: float, seq_ids=None, dtype=torch.float32):
    """(T,) weight of each token's loss so that sum_t weight_t * loss_t is the aggregated loss.

    token_mean: mask / normalizer (normalizer = global active tokens);
    seq_mean_token_mean: mask / (tokens of its sequence) / normalizer (normalizer = global sequences);
    seq_mean_token_sum_norm: mask / normalizer (normalizer = global sequences x constant, Dr. GRPO).
    """
    if not normalizer > 0:
        raise ValueError(f"normalizer must be > 0 (global tokens or sequences), got {normalizer}")
    mask = loss_mask.to(dtype)
    if loss_agg != "seq_mean_token_mean":
        return mask / normalizer
    if seq_ids is None:
        raise ValueError("grpo.loss_agg='seq_mean_token_mean' needs seq_ids (T,) mapping tokens to sequences")
    _, inverse = torch.unique(seq_ids, return_inverse=True)
    counts = torch.zeros(int(inverse.max()) + 1 if inverse.numel() else 0, dtype=dtype, device=mask.device)
    counts.scatter_add_(0, inverse, mask)
    return mask / (counts[inverse].clamp(min=1.0) * normalizer)


def local_normalizer_count(loss_mask, *, loss_agg: str, seq_ids=None, num_seqs: int = 0,
                           norm_tokens: int = 0) -> torch.Tensor:
    """This micro-batch's share of ``normalizer`` as an int32 0-d tensor on ``loss_mask``'s device,
    with nothing read back to the host (the trainer's loss path): active tokens (token_mean),
    sequences with an active token (seq_mean_token_mean), or those times ``norm_tokens``
    (seq_mean_token_sum_norm). ``seq_ids`` (T,) must hold ids in [0, num_seqs)."""
    active = loss_mask > 0
    if loss_agg == "token_mean":
        return active.sum().to(torch.int32)
    if seq_ids is None:
        raise ValueError(f"grpo.loss_agg={loss_agg!r} needs seq_ids to count sequences")
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"grpo.loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    if loss_agg == "seq_mean_token_sum_norm" and norm_tokens <= 0:
        raise ValueError("seq_mean_token_sum_norm needs norm_tokens > 0 (grpo.loss_norm_tokens or "
                         "rollout.max_new_tokens)")
    per_seq = torch.zeros(num_seqs, dtype=torch.long, device=loss_mask.device)
    per_seq.index_add_(0, seq_ids, active.long())
    n_seq = (per_seq > 0).sum()
    if loss_agg == "seq_mean_token_sum_norm":
        n_seq = n_seq * int(norm_tokens)
    return n_seq.to(torch.int32)


def local_normalizer(loss_mask, *, loss_agg: str, seq_ids=None, norm_tokens: int = 0) -> float:
    """:func:`local_normalizer_count` as a float, for any sequence ids (host read: not for hot
    paths). Sum it over micro-batches and DP ranks to get ``normalizer``."""
    num_seqs = 0
    if seq_ids is not None and loss_agg != "token_mean":
        _, seq_ids = torch.unique(seq_ids, return_inverse=True)
        num_seqs = int(seq_ids.max()) + 1 if seq_ids.numel() else 0
    return float(local_normalizer_count(loss_mask, loss_agg=loss_agg, seq_ids=seq_ids,
                                        num_seqs=num_seqs, norm_tokens=norm_tokens))


@torch.no_grad()
def _metrics(parts, entropy, active, cfg, have_ref) -> Dict[str, torch.Tensor]:
    """Sums, counts, mins and maxes: all-reduce ``*_sum``/``n_tokens`` with SUM, ``*_min`` with MIN,
    ``*_max`` with MAX across ranks, then :func:`finalize_metrics`."""
    ratio, adv, lr = parts["ratio"].float(), parts["adv"].float(), parts["log_ratio"].float()
    f = active.float()
    out = {
        "n_tokens": f.sum(),
        "clip_frac_low_sum": ((ratio < 1.0 - cfg.eps_low) & (adv < 0) & active).float().sum(),
        "clip_frac_high_sum": ((ratio > 1.0 + cfg.eps_high) & (adv > 0) & active).float().sum(),
        "dual_clip_frac_sum": (parts["dual"] & active).float().sum(),
        # k3 estimate of KL(old || current): how far this update moved from the sampling policy.
        "approx_kl_sum": ((torch.exp(lr) - 1.0 - lr) * f).sum(),
        "ref_kl_sum": (parts["kl"].float() * f).sum() if have_ref else torch.zeros((), device=f.device),
        "entropy_sum": (entropy.float() * f).sum(),
        "ratio_sum": (ratio * f).sum(),
        # masked_fill with a Python float: a torch.tensor(inf, device=...) here would be a blocking
        # host-to-device copy that stalls the CPU until the loss kernel has finished.
        "ratio_min": ratio.masked_fill(~active, math.inf).amin() if ratio.numel() else ratio.new_full((), math.inf),
        "ratio_max": ratio.masked_fill(~active, -math.inf).amax() if ratio.numel() else ratio.new_full((), -math.inf),
    }
    return out


def finalize_metrics(metrics: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Means from (already reduced) sums: {'clip_frac_low': ..., 'entropy': ..., 'ratio_min': ...}."""
    bad = float(metrics.get("bad_targets_sum", 0.0))
    if bad > 0:
        raise ValueError(f"{bad:.0f} target token ids were outside [0, vocab_size): the update was "
                         "skipped (their rows' gradients are NaN); replace ignore-index/pad ids of "
                         "masked tokens with any valid id (e.g. 0)")
    n = max(float(metrics["n_tokens"]), 1.0)
    out = {}
    for key, value in metrics.items():
        if key.endswith("_sum"):
            out[key[:-4]] = float(value) / n
        elif key != "n_tokens":
            out[key] = float(value)
    out["n_tokens"] = float(metrics["n_tokens"])
    return out


# --------------------------------------------------------------------------------------------------
# The fused single-pass CUDA path (no tensor parallelism)
# --------------------------------------------------------------------------------------------------
# Columns of the fused kernel's per-row statistics (csrc/grpo_common.cuh, enum RowStat).
ROW_STATS = ("loss_w", "active", "clip_low", "clip_high", "dual", "approx_kl", "ref_kl", "entropy",
             "ratio", "ratio_min", "ratio_max", "bad_targets")


class _FusedGRPO(torch.autograd.Function):
    """Forward writes the logits' gradient for grad_output=1; backward only rescales it if needed.

    The kernel also returns, per row, the weighted loss term and every metric's contribution
    (ROW_STATS), so the whole objective costs the kernel plus three reductions: the per-token
    PyTorch math (:func:`grpo_token_loss`, :func:`_metrics`) is ~40 small kernels otherwise."""

    @staticmethod
    def forward(ctx, logits, targets, adv, old_logp, ref_logp, rollout_logp, weights, wscale,
                cfg, valid_cols, inv_temp, inplace, holder):
        grad = logits if inplace else torch.empty_like(logits)
        logp, entropy, stats = _cuda_ext.get().fused_grpo(
            logits, grad, targets, adv, old_logp, ref_logp, rollout_logp, weights, valid_cols,
            inv_temp, 1.0 - float(cfg.eps_low), 1.0 + float(cfg.eps_high), float(cfg.dual_clip or 0.0),
            float(cfg.kl_beta or 0.0), KL_CODES[cfg.kl_estimator], float(cfg.tis_cap or 0.0), wscale)
        sums = stats.sum(0)  # (12,)
        ctx.grad = grad
        ctx.mark_non_differentiable(logp, entropy)
        holder["sums"], holder["stats"] = sums, stats
        return sums[0].clone(), logp, entropy

    @staticmethod
    def backward(ctx, g_loss, _g_logp, _g_ent):
        grad, ctx.grad = ctx.grad, None
        if g_loss is None:
            return (None,) * 13
        # Usually exactly 1 (the trainer sums normalised losses). Decided on the device: a host
        # check (float(g_loss)) would stall the CPU until the loss kernel has finished.
        _cuda_ext.get().scale_if_not_one(grad, g_loss.detach().float().reshape(1).contiguous())
        return (grad,) + (None,) * 12


def _fused_metrics(sums, stats) -> Dict[str, torch.Tensor]:
    """:func:`_metrics`' dict from the kernel's row statistics (same keys, same reductions)."""
    c = {name: i for i, name in enumerate(ROW_STATS)}
    return {
        "n_tokens": sums[c["active"]],
        "clip_frac_low_sum": sums[c["clip_low"]],
        "clip_frac_high_sum": sums[c["clip_high"]],
        "dual_clip_frac_sum": sums[c["dual"]],
        "approx_kl_sum": sums[c["approx_kl"]],
        "ref_kl_sum": sums[c["ref_kl"]],
        "entropy_sum": sums[c["entropy"]],
        "ratio_sum": sums[c["ratio"]],
        "ratio_min": stats[:, c["ratio_min"]].amin() if stats.shape[0] else sums.new_full((), math.inf),
        "ratio_max": stats[:, c["ratio_max"]].amax() if stats.shape[0] else sums.new_full((), -math.inf),
        "bad_targets_sum": sums[c["bad_targets"]],
    }


def _fused_grpo_loss(logits_shard, targets, advantages, old_logp, loss_mask, *, cfg, vocab_size,
                     temperature, ref_logp, rollout_logp, seq_ids, normalizer, inplace_backward):
    """The fused path: host-side checks only, then the kernel; no device op before the launch
    (the token weights are ``loss_mask * (1 / normalizer)`` inside the kernel), no host sync."""
    n_tok, local_cols = logits_shard.shape
    _check_inputs(n_tok, cfg=cfg, advantages=advantages, old_logp=old_logp, loss_mask=loss_mask,
                  ref_logp=ref_logp, rollout_logp=rollout_logp, seq_ids=seq_ids)
    check_target_layout(targets, n_tok)
    if not normalizer > 0:
        raise ValueError(f"normalizer must be > 0 (global tokens or sequences), got {normalizer}")
    if cfg.loss_agg == "seq_mean_token_mean":
        weights, wscale = token_weights(loss_mask, loss_agg=cfg.loss_agg, normalizer=normalizer,
                                        seq_ids=seq_ids), 1.0
    else:
        weights, wscale = loss_mask, 1.0 / float(normalizer)
    f32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731 (no-ops when float32)
    ref = ref_logp if (ref_logp is not None and bool(cfg.kl_beta)) else None
    _, valid_cols = shard_columns(vocab_size, local_cols, 0, 1)
    holder = {}
    loss, logp, entropy = _FusedGRPO.apply(
        logits_shard, targets.long().contiguous(), f32(advantages), f32(old_logp), f32(ref),
        f32(rollout_logp if cfg.tis_cap else None), f32(weights), wscale, cfg, valid_cols,
        1.0 / float(temperature), inplace_backward, holder)
    _last.update(impl="cuda", kernel="fused")
    return loss, _fused_metrics(holder["sums"], holder["stats"])


def fused_enabled() -> bool:
    """R1MEGA_GRPO_FUSED=0 forces the two-pass CUDA kernels even where the fused one could run."""
    return os.environ.get("R1MEGA_GRPO_FUSED", "1") != "0"


def _fused_eligible(logits, tp_size) -> bool:
    ext = _cuda_ext.get()
    return tp_size == 1 and ext is not None and fused_enabled() and bool(ext.fused_supported(logits))


def _check_inputs(n_tok, *, cfg, **per_token):
    """Host-side checks of every entry point: the config, and one value per token in each of
    ``per_token`` (None allowed). No device op."""
    check_cfg(cfg, per_token.get("ref_logp"), per_token.get("rollout_logp"))
    for name, t in per_token.items():
        if t is not None and tuple(t.shape) != (n_tok,):
            raise ValueError(f"{name} must have shape ({n_tok},) like the logits' tokens, got {tuple(t.shape)}")


def _prepare(n_tok, targets, advantages, old_logp, loss_mask, *, cfg, vocab_size, ref_logp, rollout_logp,
             seq_ids, normalizer, acc):
    """Checks shared by the unfused entry points -> (active, targets, weights, ref)."""
    _check_inputs(n_tok, cfg=cfg, advantages=advantages, old_logp=old_logp, loss_mask=loss_mask,
                  ref_logp=ref_logp, rollout_logp=rollout_logp, seq_ids=seq_ids)
    active = loss_mask > 0
    # Masked tokens may carry pad/ignore ids; any valid id keeps the kernels in bounds.
    targets = torch.where(active, targets.long(), torch.zeros_like(targets, dtype=torch.long))
    check_targets(targets, n_tok, vocab_size)
    weights = token_weights(loss_mask, loss_agg=cfg.loss_agg, normalizer=normalizer, seq_ids=seq_ids, dtype=acc)
    ref = ref_logp if (ref_logp is not None and bool(cfg.kl_beta)) else None
    return active, targets, weights, ref


def _loss_from_logp(logp, entropy, advantages, old_logp, active, weights, *, cfg, ref, rollout_logp):
    token_loss, parts = grpo_token_loss(logp, advantages, old_logp, active, cfg=cfg, ref_logp=ref,
                                        rollout_logp=rollout_logp)
    loss = (weights.to(token_loss.dtype) * token_loss).sum()
    return loss, _metrics(parts, entropy.detach(), active, cfg, ref is not None)


def grpo_loss(logits_shard, targets, advantages, old_logp, loss_mask, *, cfg, tp_group=None,
              vocab_size: int, temperature: float = 1.0, ref_logp=None, rollout_logp=None,
              seq_ids=None, normalizer: float, impl: str = "auto", inplace_backward: bool = False):
    """GRPO loss of one micro-batch on this rank's vocabulary shard.

    logits_shard (T, Vl) any float dtype; targets (T,) int; advantages, old_logp, loss_mask,
    ref_logp, rollout_logp, seq_ids: (T,). ``cfg`` is a ``GRPOConfig``. Returns (loss 0-d tensor,
    metrics dict of 0-d tensors, see :func:`_metrics`). ``inplace_backward=True`` lets the gradient
    overwrite ``logits_shard`` (do not read the logits afterwards).
    """
    if logits_shard.dim() != 2:
        raise ValueError(f"logits_shard must be (tokens, vocab/tp), got {tuple(logits_shard.shape)}")
    n_tok, local_cols = logits_shard.shape
    acc = torch.float64 if logits_shard.dtype == torch.float64 else torch.float32
    use_cuda = resolve_impl(impl, logits_shard)
    tp_rank, tp_size = tp_rank_and_size(tp_group)
    if use_cuda and _fused_eligible(logits_shard, tp_size):
        return _fused_grpo_loss(logits_shard, targets, advantages, old_logp, loss_mask, cfg=cfg,
                                vocab_size=vocab_size, temperature=temperature, ref_logp=ref_logp,
                                rollout_logp=rollout_logp, seq_ids=seq_ids, normalizer=normalizer,
                                inplace_backward=inplace_backward)
    active, targets, weights, ref = _prepare(
        n_tok, targets, advantages, old_logp, loss_mask, cfg=cfg, vocab_size=vocab_size, ref_logp=ref_logp,
        rollout_logp=rollout_logp, seq_ids=seq_ids, normalizer=normalizer, acc=acc)
    logp, entropy = vocab_parallel_logprobs(
        logits_shard, targets, tp_group=tp_group, vocab_size=vocab_size, temperature=temperature,
        with_entropy=True, impl="cuda" if use_cuda else "torch", inplace_backward=inplace_backward)
    _last.update(impl="cuda" if use_cuda else "torch", kernel="two_pass" if use_cuda else "chunked")
    return _loss_from_logp(logp, entropy, advantages, old_logp, active, weights, cfg=cfg, ref=ref,
                           rollout_logp=rollout_logp)


def grpo_loss_from_hidden(hidden, weight_shard, targets, advantages, old_logp, loss_mask, *, cfg,
                          tp_group=None, vocab_size: int, temperature: float = 1.0, ref_logp=None,
                          rollout_logp=None, seq_ids=None, normalizer: float, impl: str = "auto",
                          chunk_tokens: int = 0):
    """:func:`grpo_loss` of ``hidden @ weight_shard.T`` without materialising the logits (stretch goal).

    hidden (T, H) (identical on every rank of ``tp_group``), weight_shard (Vl, H) this rank's
    LM-head rows. Gradients flow to both; d hidden is all-reduced over ``tp_group``.
    """
    from r1mega.ops.linear_logprobs import linear_vocab_parallel_logprobs

    n_tok = hidden.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    active, targets, weights, ref = _prepare(
        n_tok, targets, advantages, old_logp, loss_mask, cfg=cfg, vocab_size=vocab_size, ref_logp=ref_logp,
        rollout_logp=rollout_logp, seq_ids=seq_ids, normalizer=normalizer, acc=acc)
    logp, entropy = linear_vocab_parallel_logprobs(
        hidden, weight_shard, targets, tp_group=tp_group, vocab_size=vocab_size, temperature=temperature,
        with_entropy=True, impl=impl, chunk_tokens=chunk_tokens)
    use_cuda = resolve_impl(impl, hidden)
    _last.update(impl="cuda" if use_cuda else "torch", kernel="linear_chunked")
    return _loss_from_logp(logp, entropy, advantages, old_logp, active, weights, cfg=cfg, ref=ref,
                           rollout_logp=rollout_logp)
