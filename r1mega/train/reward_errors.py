"""Reward failures during GRPO: counted every step, shown, and fatal past a threshold.

A completion whose reward could not run (it raised, timed out, killed its worker, or its
reference lacked a field) gets 0 for that reward through no fault of its own. A few are noise
the advantages absorb; many mean the policy is trained on a broken signal while the reward curve
looks merely flat. So each step logs how many completions had a reward error
(``reward/errors``, ``reward/error_rate``, summed over data-parallel ranks), prints the first
error on the console, and stops the run once the step's share exceeds
``rewards.max_error_rate``: the trainer's loop logs that step's metrics first, so the failure
is in tensorboard too, and the step's update never reaches a checkpoint.
"""
from __future__ import annotations

from typing import Sequence

# RewardScorer.metrics() counters -> the names logged for their per-step increase (this rank's
# scorer only: they say which kind of failure it was, the item counts above say how many).
_SCORER_COUNTERS = {"timeouts": "reward/timeouts", "crashes": "reward/worker_deaths",
                    "errors": "reward/raised", "bad_items": "reward/bad_items"}


class RewardErrorRateError(Exception):
    """Too many completions of a step had a reward error. Not a RuntimeError: the trainer's
    dead-peer handling matches words like "timed out" in RuntimeErrors, and this message may
    quote a reward's timeout."""


def error_sums(scored: Sequence) -> dict:
    """This rank's sums (the caller reduces them over DP with the other completion stats)."""
    return {"reward_errors_sum": float(sum(s.error is not None for s in scored))}


def error_metrics(stats: dict, counts_before: dict, counts_after: dict) -> dict:
    n = max(stats["n"], 1.0)
    out = {"reward/errors": stats["reward_errors_sum"],
           "reward/error_rate": stats["reward_errors_sum"] / n}
    for key, name in _SCORER_COUNTERS.items():
        out[name] = float(counts_after.get(key, 0) - counts_before.get(key, 0))
    return out


def first_error(scored: Sequence) -> "str | None":
    """The first completion's reward error on this rank, for the console (one line)."""
    text = next((s.error for s in scored if s.error), None)
    return " ".join(text.split())[:300] if text else None


def over_limit(metrics: dict, max_error_rate: float) -> bool:
    return metrics.get("reward/error_rate", 0.0) > max_error_rate


def check_reward_errors(step: int, metrics: dict, first: "str | None", max_error_rate: float,
                        rank: int = 0) -> None:
    """Warn on rank 0 when a step had reward errors; raise past ``max_error_rate``. Every rank
    sees the same reduced rate, so every rank raises together (none is left in a collective).
    Metrics without reward counts (an SFT step) pass."""
    errors, rate = metrics.get("reward/errors", 0.0), metrics.get("reward/error_rate", 0.0)
    if not errors:
        return
    total = errors / rate if rate else 0.0
    msg = (f"step {step}: a reward failed to run on {errors:.0f} of {total:.0f} completions "
           f"({rate:.1%}; they score 0 on it)" + (f"; first: {first}" if first else ""))
    if over_limit(metrics, max_error_rate):
        raise RewardErrorRateError(
            f"{msg}. That is over rewards.max_error_rate={max_error_rate:g}, so the run stops: "
            "fix the reward or the data (`r1mega reward --input FILE.jsonl` prints each line's "
            "error), or raise rewards.max_error_rate.")
    if rank == 0:
        print(f"[r1mega] WARNING: {msg}", flush=True)
