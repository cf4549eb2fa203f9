"""The R1-Zero format reward: reasoning in one ``<think>`` block, then one ``<answer>`` block.

``format`` (strict): the whole completion is ``<think>…</think>`` then ``<answer>…</answer>``, each
tag exactly once, nothing but whitespace before, between and after, both blocks non-empty.
``format_lenient``: one think block followed later by one answer block, other text allowed around
them. Both are 0/1 rules: partial credit per tag is easy to farm by emitting tags without content.
"""
from __future__ import annotations

import re

from r1mega.rewards.registry import RewardResult, register_reward

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_STRICT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_LENIENT = re.compile(r"<think>(.*?)</think>.*?<answer>(.*?)</answer>", re.DOTALL)


def _tag_counts(text: str) -> dict:
    return {t: text.count(t) for t in _TAGS}


def check_format(completion: str, strict: bool = True) -> RewardResult:
    counts = _tag_counts(completion)
    wrong = {t: n for t, n in counts.items() if n != 1}
    if wrong:
        return RewardResult(0.0, [f"each tag must appear exactly once; counts {wrong}"])
    m = (_STRICT.fullmatch if strict else _LENIENT.search)(completion)
    if m is None:
        where = ("the completion must be <think>…</think> then <answer>…</answer> with nothing "
                 "around them" if strict else "</think> must come before <answer>")
        return RewardResult(0.0, [where])
    if not m.group(1).strip():
        return RewardResult(0.0, ["empty <think> block"])
    if not m.group(2).strip():
        return RewardResult(0.0, ["empty <answer> block"])
    return RewardResult(1.0, ["format ok" + ("" if strict else " (lenient)")])


@register_reward("format")
def format_reward(completion: str, reference: dict, **context) -> RewardResult:
    return check_format(completion, strict=True)


@register_reward("format_lenient")
def format_lenient_reward(completion: str, reference: dict, **context) -> RewardResult:
    return check_format(completion, strict=False)
