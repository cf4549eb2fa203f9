"""Rewards for reasoning-gym tasks, scored by the task's own ``score_answer``.

Reference: ``{"dataset": "<name>", "entry": {question, answer, metadata}}`` as the data adapter
(``r1mega/data/tasks/reasoning_gym.py``) writes it. reasoning-gym is optional: without it this
reward says so in its reasons and scores 0.
"""
from __future__ import annotations

import functools

from r1mega.rewards.registry import RewardResult, extract_answer, register_reward


@functools.lru_cache(maxsize=64)
def _score_fn(name: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(name)


@register_reward("reasoning_gym")
def reasoning_gym_reward(completion: str, reference: dict, **context) -> RewardResult:
    name, entry = reference.get("dataset"), reference.get("entry")
    if not name or not isinstance(entry, dict):
        return RewardResult(0.0, ["reference needs 'dataset' and 'entry' (from the reasoning_gym "
                                  "data adapter)"])
    try:
        fn = _score_fn(name)
    except ImportError:
        return RewardResult(0.0, ["reasoning-gym is not installed: pip install reasoning-gym"])
    answer = extract_answer(completion, reference.get("answer_pattern"))
    if answer is None:
        answer = completion.strip()
    score = float(fn(answer, entry))
    return RewardResult(score, [f"reasoning_gym:{name} score_answer({answer[:40]!r}) = {score}"])
