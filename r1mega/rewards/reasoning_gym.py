"""Rewards for reasoning-gym tasks, scored by the task's own ``score_answer``.

Reference: ``{"dataset": "<name>", "entry": {question, answer, metadata}}`` as the data adapter
(``r1mega/data/tasks/reasoning_gym.py``) writes it. reasoning-gym is optional: without it this
reward cannot run, which the scorer's self-check reports before training (not a silent 0).
"""
from __future__ import annotations

import functools

from r1mega.rewards.registry import (MissingReference, RewardResult, RewardSetupError,
                                     extract_answer, register_reward)


@functools.lru_cache(maxsize=64)
def _score_fn(name: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(name)


def _check_installed(**context) -> None:
    try:
        import reasoning_gym  # noqa: F401
    except ImportError as exc:
        raise RewardSetupError(f"reasoning-gym is not importable ({exc}): pip install "
                               "reasoning-gym") from None


@register_reward("reasoning_gym", self_check=_check_installed)
def reasoning_gym_reward(completion: str, reference: dict, **context) -> RewardResult:
    name, entry = reference.get("dataset"), reference.get("entry")
    if not name or not isinstance(entry, dict):
        raise MissingReference("reasoning_gym: the reference needs 'dataset' and an 'entry' "
                               "object (as the reasoning_gym data adapter writes them)")
    try:
        fn = _score_fn(name)
    except ImportError as exc:
        raise RewardSetupError(f"reasoning-gym is not importable ({exc}): pip install "
                               "reasoning-gym") from None
    answer = extract_answer(completion, reference.get("answer_pattern"))
    if answer is None:
        answer = completion.strip()
    score = float(fn(answer, entry))
    return RewardResult(score, [f"reasoning_gym:{name} score_answer({answer[:40]!r}) = {score}"])
