"""``reasoning_gym:<name>``: reasoning-gym's procedural tasks, scored by their own verifiers.

reasoning-gym is optional (``pip install reasoning-gym``). Each item's reference is
``{"dataset": name, "entry": <the reasoning-gym entry>}``, which the ``reasoning_gym`` reward
hands to that dataset's ``score_answer``.
"""
from __future__ import annotations

from r1mega.data.datasets import PromptRecord
from r1mega.errors import UserError, UserValueError


class MissingPackageError(UserError, ImportError):
    """An optional package a config asks for is not installed."""

_ANSWER_HINT = ("\nShow your reasoning in <think> </think> and give only the final answer in "
                "<answer> </answer>.")


class ReasoningGymSource:
    def __init__(self, name: str, size: int, seed: int, options: dict | None = None):
        try:
            import reasoning_gym
        except ImportError:
            raise MissingPackageError(f"data.source='reasoning_gym:{name}' needs the reasoning-gym "
                              "package: pip install reasoning-gym") from None
        try:
            self._ds = reasoning_gym.create_dataset(name, size=size, seed=seed, **(options or {}))
        except Exception as exc:  # noqa: BLE001 -- re-raised with the config key
            raise UserValueError(f"data.source='reasoning_gym:{name}': {exc}") from None
        self.name, self.size = name, size

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        return (self[i] for i in range(self.size))

    def __getitem__(self, i: int) -> PromptRecord:
        if not 0 <= i < self.size:  # reasoning-gym would happily make item size, size + 1, ...
            raise IndexError(f"reasoning_gym:{self.name}: index {i} out of range 0..{self.size - 1}")
        entry = self._ds[i]
        ref = {"dataset": self.name, "entry": entry}
        return PromptRecord(entry["question"] + _ANSWER_HINT, "reasoning_gym", ref,
                            {"index": i, "source": f"reasoning_gym:{self.name}"})
