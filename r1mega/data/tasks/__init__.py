"""Built-in procedural tasks: item ``i`` of a task is a pure function of ``(seed, i, options)``,
so a dataset of any size costs no memory and every rank and every resume sees the same items."""
from __future__ import annotations

import random
from typing import Callable

from r1mega.data.datasets import PromptRecord
from r1mega.errors import UserValueError


class ProceduralTask:
    """A lazy, indexable sequence of :class:`PromptRecord`."""

    def __init__(self, name: str, make: Callable, size: int, seed: int, options: dict):
        self.name, self._make, self.size, self.seed = name, make, int(size), int(seed)
        self.options = dict(options)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> PromptRecord:
        if not 0 <= i < self.size:
            raise IndexError(f"{self.name}: index {i} out of range 0..{self.size - 1}")
        # A string seed is hashed deterministically by random.Random (not by hash()).
        rng = random.Random(f"{self.name}:{self.seed}:{i}")
        rec = self._make(rng, **self.options)
        rec.metadata.setdefault("index", i)
        return rec

    def __iter__(self):
        return (self[i] for i in range(self.size))


def builtin_tasks() -> dict:
    from r1mega.data.tasks import arithmetic, code_functions, puzzles

    return {"arithmetic": arithmetic.make_item, "countdown": puzzles.make_countdown,
            "river_crossing": puzzles.make_river_crossing, "code": code_functions.make_item}


def make_builtin(name: str, size: int, seed: int, options: dict | None = None) -> ProceduralTask:
    tasks = builtin_tasks()
    if name not in tasks:
        raise UserValueError(f"data.source='builtin:{name}': unknown task; use one of "
                         f"{['builtin:' + t for t in sorted(tasks)]}.")
    options = options or {}
    task = ProceduralTask(name, tasks[name], size, seed, options)
    try:
        task[0]  # bad options fail here, naming the key, not in the middle of training
    except TypeError as exc:
        raise UserValueError(f"data.task_options={options} do not fit builtin:{name}: {exc}") from None
    return task
