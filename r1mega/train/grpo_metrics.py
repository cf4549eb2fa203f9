"""The metrics of one GRPO step: what the rollout, the rewards, the loss and the clock say.

Kept apart from the step itself (``train/grpo.py``) so that the step reads like the algorithm.
Rewards, accuracy and lengths are sums per rank reduced over the data-parallel group
(``batch_stats.py``); the loss figures come from the last update's fused-loss sums; times and
throughput are this rank's.
"""
from __future__ import annotations

from typing import Optional

import torch

from r1mega.ops.grpo_loss import finalize_metrics
from r1mega.train.batch_stats import completion_stats, reduce_stats, summarise
from r1mega.train.metrics import memory_metrics
from r1mega.train.reward_errors import error_metrics, error_sums

# Dense bf16 peak of one accelerator, for the MFU estimate; unknown devices report no MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


# Engine stats -> metric names. This rank's rollout, not reduced over DP: the split between
# prefill and decode, and how often overlapped decoding had to fall back to synchronous steps.
ROLLOUT_STATS = {"decode": "rollout/decode_steps", "decode_s": "rollout/decode_s",
                 "prefill": "rollout/prefill_steps", "prefill_s": "rollout/prefill_s",
                 "overlap_drains": "rollout/overlap_drains", "preemptions": "rollout/preemptions",
                 "graph_captures": "rollout/graph_captures", "capture_s": "rollout/capture_s",
                 # steps an expert-parallel rank ran with no tokens, waiting for its peers
                 "empty": "rollout/empty_steps"}


def rollout_metrics(stats: dict) -> dict:
    out = {name: float(stats[k]) for k, name in ROLLOUT_STATS.items() if k in stats}
    if stats.get("decode"):
        out["rollout/decode_ms_per_step"] = 1e3 * stats["decode_s"] / stats["decode"]
    return out


def peak_flops(rt) -> Optional[float]:
    if rt.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(rt.device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def step_metrics(cfg, rt, records, completions, scored, equal, samples, results, times, *,
                 rollout_stats: Optional[dict] = None, reward_counts: Optional[dict] = None,
                 scorer_counts: Optional[dict] = None, num_params: int = 0) -> dict:
    """Every metric of one step (all ranks call it: the statistics are reduced over DP)."""
    t0, t_rollout, t_reward, t_logprobs, t_train = times
    stats = completion_stats(completions, [records[c.prompt_index] for c in completions],
                             scored, cfg.rewards.reflection_phrases)
    stats["equal_groups_sum"] = float(equal.sum())
    stats["groups"] = float(equal.numel())
    stats["seq_tokens_sum"] = float(sum(int(s["input_ids"].numel()) for s in samples))
    stats.update(error_sums(scored))
    stats = reduce_stats(stats, rt.dp_group if rt.dp_size > 1 else None)
    out = summarise(stats)
    out.update(error_metrics(stats, reward_counts or {}, scorer_counts or {}))
    out["groups/all_equal_share"] = stats["equal_groups_sum"] / max(stats["groups"], 1.0)
    last = results[-1]
    loss_metrics = finalize_metrics({k: torch.tensor(v) for k, v in last.metrics_sum.items()
                                     if k.endswith("_sum") or k == "n_tokens"}) \
        if "n_tokens" in last.metrics_sum else {}
    out.update({
        "loss": last.loss, "lr": last.lr,
        "grad_norm": float("nan") if last.grad_norm is None else last.grad_norm,
        "update_skipped": float(not all(r.update_successful for r in results)),
        "kl": loss_metrics.get("ref_kl" if cfg.grpo.kl_beta else "approx_kl", 0.0),
        "kl/approx_old": loss_metrics.get("approx_kl", 0.0),
        "entropy": loss_metrics.get("entropy", 0.0),
        "clip/low_frac": loss_metrics.get("clip_frac_low", 0.0),
        "clip/high_frac": loss_metrics.get("clip_frac_high", 0.0),
        "clip/dual_frac": loss_metrics.get("dual_clip_frac", 0.0),
        "train/tokens": float(last.num_tokens),
        "train/micro_batches": float(last.num_micro_batches),
    })
    step_s = t_train - t0
    gen_tokens = stats["length_sum"]
    seq_tokens = stats["seq_tokens_sum"]
    passes = cfg.grpo.inner_epochs * 3 + (1 if cfg.grpo.kl_beta else 0) + \
        (1 if cfg.grpo.inner_epochs > 1 else 0)
    # 2·N FLOPs per token forward, 4·N backward; generation ~ one forward per token.
    flops = 2.0 * num_params * (seq_tokens * passes + seq_tokens)
    out.update({
        # reward_s is the scoring the rollout did not hide (the last finishers, mostly).
        "time/rollout_s": t_rollout - t0, "time/reward_s": t_reward - t_rollout,
        "time/logprobs_s": t_logprobs - t_reward, "time/train_s": t_train - t_logprobs,
        "time/step_s": step_s,
        # All ranks' completion tokens and completions this step (the TRL comparison's units).
        "rollout/completion_tokens": gen_tokens, "rollout/completions": stats["n"],
        "throughput/tokens_per_s": gen_tokens / max(step_s, 1e-9),
        "throughput/rollout_tokens_per_s": gen_tokens / max(t_rollout - t0, 1e-9),
        "throughput/tflops": flops / max(step_s, 1e-9) / 1e12 / max(rt.world_size, 1),
    })
    out.update(rollout_metrics(rollout_stats or {}))
    peak = peak_flops(rt)
    if peak:
        out["throughput/mfu"] = flops / max(step_s, 1e-9) / (peak * rt.world_size)
    out.update(memory_metrics())
    return out
