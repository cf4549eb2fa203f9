"""Length shaping: DAPO's soft overlong penalty.

With ``L_max`` = the rollout's ``max_new_tokens`` and ``L_cache`` = ``rewards.overlong_penalty_tokens``
the penalty is 0 up to ``L_max - L_cache`` tokens, then falls linearly to -1 at ``L_max`` (and stays
-1 beyond): long answers are discouraged smoothly instead of by a cliff. Truncated completions
(cut by the token budget, so their answer may be missing) are handled by the scorer per
``rewards.truncated``; this reward only looks at the length.
"""
from __future__ import annotations

from r1mega.rewards.registry import RewardResult, register_reward


def soft_overlong_penalty(num_tokens: int, max_tokens: int, cache_tokens: int) -> float:
    if cache_tokens <= 0 or max_tokens <= 0:
        return 0.0
    expected = max_tokens - cache_tokens
    if num_tokens <= expected:
        return 0.0
    if num_tokens <= max_tokens:
        return (expected - num_tokens) / cache_tokens
    return -1.0


@register_reward("overlong_penalty")
def overlong_penalty(completion: str, reference: dict, **context) -> RewardResult:
    n = context.get("num_tokens")
    max_tokens = int(context.get("max_new_tokens") or 0)
    cache = int(context.get("overlong_penalty_tokens") or 0)
    if n is None or not max_tokens or not cache:
        return RewardResult(0.0, ["overlong penalty off (needs num_tokens, max_new_tokens and "
                                  "rewards.overlong_penalty_tokens > 0)"])
    p = soft_overlong_penalty(int(n), max_tokens, cache)
    return RewardResult(p, [f"{n} tokens of {max_tokens} (soft zone {cache}): {p:.3f}"])
