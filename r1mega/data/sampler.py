"""Prompts sharded over data-parallel ranks, with a cursor that resumes exactly.

One global order per epoch (a permutation seeded by ``(seed, epoch)``); each step takes the next
``per_rank × dp_size`` positions of it and rank ``r`` keeps the ``r``-th slice. The cursor is
global, ``(epoch, offset)``, so a resume continues with the very next prompt, even under another
DP size. A step that runs past the end of an epoch continues into the next one's order, so no
prompt is dropped and no rank ever gets a short batch.
"""
from __future__ import annotations

import numpy as np


class PromptSampler:
    def __init__(self, source, dp_rank: int, dp_size: int, seed: int = 0, shuffle: bool = True):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in 0..dp_size-1 (dp_size={dp_size}).")
        if len(source) == 0:
            raise ValueError("the prompt source is empty; check data.source.")
        self.source, self.dp_rank, self.dp_size = source, dp_rank, dp_size
        self.seed, self.shuffle = int(seed), shuffle
        self.epoch, self.offset = 0, 0
        self._order_epoch, self._order = None, None

    def _order_of(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = len(self.source)
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                self._order = rng.permutation(n)
            else:
                self._order = np.arange(n)
            self._order_epoch = epoch
        return self._order

    def next_indices(self, per_rank: int) -> list[int]:
        """This rank's dataset indices for the next step; advances the global cursor."""
        n = len(self.source)
        total = per_rank * self.dp_size
        positions = []
        epoch, offset = self.epoch, self.offset
        while len(positions) < total:
            take = min(total - len(positions), n - offset)
            order = self._order_of(epoch)
            positions.extend(int(i) for i in order[offset:offset + take])
            offset += take
            if offset == n:
                epoch, offset = epoch + 1, 0
        self.epoch, self.offset = epoch, offset
        return positions[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]

    def next_batch(self, per_rank: int) -> list:
        return [self.source[i] for i in self.next_indices(per_rank)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed,
                "num_prompts": len(self.source), "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_prompts") != len(self.source) or state.get("seed") != self.seed:
            raise ValueError(
                f"sampler state is for {state.get('num_prompts')} prompts with seed "
                f"{state.get('seed')}, but the source has {len(self.source)} prompts and "
                f"data.seed={self.seed}; resuming would not continue the same order. Use the "
                "same data.source/num_examples/seed, or start the data cursor fresh.")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self._order_epoch = None
