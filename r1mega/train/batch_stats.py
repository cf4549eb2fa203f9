"""What a batch of scored completions says: reward, accuracy by the training reward and by the
strict grader, format, length, reflection, and the reward-hack detectors.

Per rank the statistics are sums (``completion_stats``); ``reduce_stats`` adds them over the
data-parallel group and ``summarise`` divides. The strict accuracy sits beside the training
reward's own accuracy on purpose: a reward that rises while strict accuracy does not is a hack
you can see (``reward/accuracy`` vs ``reward/strict_accuracy``, and ``hack/*``).
"""
from __future__ import annotations

from typing import Sequence

import torch.distributed as dist

from r1mega.rewards.detectors import hack_shares, hack_sums
from r1mega.rewards.format import check_format
from r1mega.rewards.strict import strict_grade

# Components that say "the answer is right" (as opposed to format, length or language shaping).
ACCURACY_REWARDS = ("math_accuracy", "exact_match", "countdown", "river_crossing", "code_tests",
                    "reasoning_gym")


def has_reflection(text: str, phrases: Sequence[str]) -> bool:
    low = text.lower()
    return any(p.lower() in low for p in phrases)


def verifier_score(scored) -> float | None:
    """The task verifier's score of one completion: its best accuracy component, if any."""
    acc = [scored.components[k] for k in ACCURACY_REWARDS if k in scored.components]
    return max(acc) if acc else None


def empty_stats() -> dict:
    return {"n": 0.0, "reward_sum": 0.0, "reward_sq_sum": 0.0, "accuracy_sum": 0.0,
            "strict_sum": 0.0, "format_sum": 0.0, "reflection_sum": 0.0, "length_sum": 0.0,
            "length_max": 0.0, "truncated_sum": 0.0, "reward_errors_sum": 0.0}


def completion_stats(completions: Sequence, records: Sequence, scored: Sequence,
                     phrases: Sequence[str]) -> dict:
    """Sums over this rank's completions (``records[i]`` is completion i's prompt record)."""
    out = empty_stats()
    out["n"] = float(len(completions))
    texts = [c.text or "" for c in completions]
    for c, text, record, s in zip(completions, texts, records, scored):
        n = len(c.token_ids)
        out["reward_sum"] += s.total
        out["reward_sq_sum"] += s.total * s.total
        verified = verifier_score(s)
        out["accuracy_sum"] += float(verified is not None and verified >= 1.0)
        try:
            correct, _ = strict_grade(text, record.reference, verified)
        except ValueError:
            correct = False  # no verifier in this kind's spec and no numeric reference
        out["strict_sum"] += float(correct)
        out["reward_errors_sum"] += float(s.error is not None)
        out["format_sum"] += check_format(text).score
        out["reflection_sum"] += float(has_reflection(text, phrases))
        out["length_sum"] += n
        out["length_max"] = max(out["length_max"], float(n))
        out["truncated_sum"] += float(c.finish_reason == "length")
        for name, value in s.components.items():
            out[f"c/{name}_sum"] = out.get(f"c/{name}_sum", 0.0) + value
            out[f"c/{name}_sq_sum"] = out.get(f"c/{name}_sq_sum", 0.0) + value * value
    out.update(hack_sums(texts, [r.prompt for r in records],
                         [s.total > 0 and (verifier_score(s) or 0.0) >= 1.0 for s in scored]))
    return out


def reduce_stats(stats: dict, group) -> dict:
    """Sum every key over ``group`` (``*_max`` keys: max). Keys may differ between ranks."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return dict(stats)
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, stats, group=group)
    out: dict = {}
    for part in gathered:
        for k, v in part.items():
            out[k] = max(out.get(k, v), v) if k.endswith("_max") else out.get(k, 0.0) + v
    return out


def summarise(stats: dict) -> dict:
    n = max(stats["n"], 1.0)
    mean = stats["reward_sum"] / n
    out = {"reward/mean": mean,
           "reward/std": max(stats["reward_sq_sum"] / n - mean * mean, 0.0) ** 0.5,
           "reward/accuracy": stats["accuracy_sum"] / n,
           "reward/strict_accuracy": stats.get("strict_sum", 0.0) / n,
           "reward/format_rate": stats["format_sum"] / n,
           "reward/error_share": stats.get("reward_errors_sum", 0.0) / n,
           "response/reflection_share": stats["reflection_sum"] / n,
           "response/length_mean": stats["length_sum"] / n,
           "response/length_max": stats["length_max"],
           "response/truncated_share": stats["truncated_sum"] / n}
    out.update(hack_shares(stats, stats["n"]))
    for k, v in stats.items():
        if k.startswith("c/") and k.endswith("_sq_sum"):
            name = k[2:-7]
            m = stats[f"c/{name}_sum"] / n
            out[f"reward/{name}_mean"] = m
            out[f"reward/{name}_std"] = max(v / n - m * m, 0.0) ** 0.5
    return out
