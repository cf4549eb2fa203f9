"""Batch statistics of completions that are worth a chart but not a reward.

``reflection_share`` is the R1 paper's "aha moment" signal: the share of completions that
re-check themselves (``rewards.reflection_phrases``: "wait", "let me check", ...). Rewarding it
would be trivially hacked by sprinkling the words, so it is only logged.
"""
from __future__ import annotations

import re

from r1mega.rewards.format import check_format


def _phrase_pattern(phrases) -> re.Pattern | None:
    words = [re.escape(p.strip()) for p in phrases if p.strip()]
    if not words:
        return None
    return re.compile(r"\b(?:" + "|".join(words) + r")\b", re.IGNORECASE)


def completion_stats(completions: list, reflection_phrases=()) -> dict:
    """Shares over a batch: ``reflection_share``, ``format_share`` (strict R1-Zero format),
    and ``mean_chars``."""
    n = len(completions)
    if n == 0:
        return {"reflection_share": 0.0, "format_share": 0.0, "mean_chars": 0.0}
    pattern = _phrase_pattern(reflection_phrases)
    reflective = sum(bool(pattern.search(c)) for c in completions) if pattern else 0
    formatted = sum(check_format(c).score for c in completions)
    return {"reflection_share": reflective / n, "format_share": formatted / n,
            "mean_chars": sum(len(c) for c in completions) / n}
