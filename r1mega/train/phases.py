"""Where a ``r1mega train`` run starts: fresh, inside its SFT cold start, or inside GRPO.

A run with ``train.sft_steps > 0`` has two phases, and both are checkpointed::

    <checkpoint.dir>/cold_start/step_00000040/   cold-start SFT (phase "cold_start"): its own
                                                 optimizer, schedule and data cursor
    <checkpoint.dir>/step_00000000/              the phase boundary: SFT done, RL not yet begun
                                                 (weights, RL data cursor, "before RL" eval; no
                                                 optimizer state, RL's Adam starts empty)
    <checkpoint.dir>/step_00000010/              GRPO (phase "grpo")

The cold start lives in its own directory because its step numbers restart at 1: in one directory
SFT step 250 would sort after GRPO step 10, be taken for the newest checkpoint, and keep-last-K
pruning would delete GRPO checkpoints in its favour. The GRPO checkpoints stay where they always
were, so `r1mega generate`, `convert` and earlier runs see no change.

Resume order: a GRPO checkpoint wins (it includes the boundary); else the newest cold-start
checkpoint, which either continues SFT from its step or, when SFT had finished, gives RL its
starting weights. The phase is read from each checkpoint's ``trainer.json``, never guessed from
its path, so ``checkpoint.load`` may name any of them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

COLD_START_SUBDIR = "cold_start"

# What run_train does with the checkpoint it found (see plan_start).
FRESH_COLD_START = "fresh_cold_start"      # no checkpoint: SFT from step 0, then GRPO
CONTINUE_COLD_START = "continue_cold_start"  # a cold-start checkpoint before its last step
RESUME_GRPO = "resume_grpo"                # a GRPO checkpoint (boundary included): everything
WEIGHTS_THEN_GRPO = "weights_then_grpo"    # finished cold start, `r1mega sft` result, converted
FRESH_GRPO = "fresh_grpo"                  # no checkpoint, no cold start (HF init or random)


def trainer_meta(path: str) -> dict:
    """The ``trainer`` section of a checkpoint's trainer.json ({} for checkpoints r1mega's
    trainer did not write, e.g. converted models)."""
    try:
        with open(os.path.join(path, "trainer.json")) as f:
            return json.load(f).get("trainer") or {}
    except (OSError, ValueError):
        return {}


def phase_of(path: str) -> Optional[str]:
    """'grpo' / 'cold_start' / 'sft' (`r1mega sft`) for checkpoints the trainer wrote, else None."""
    return trainer_meta(path).get("phase")


def cold_start_checkpoint_config(ckpt_cfg):
    """``checkpoint`` with ``dir`` pointed at the cold start's own directory (same cadence,
    keep-last-K and signal handling as GRPO)."""
    return dataclasses.replace(ckpt_cfg, dir=os.path.join(ckpt_cfg.dir, COLD_START_SUBDIR))


def plan_start(path: Optional[str], sft_steps: int) -> str:
    """One of the constants above, for the checkpoint ``path`` the run resumes from (None: none).

    A cold-start checkpoint at or past ``sft_steps`` means SFT finished but the boundary was not
    written yet (the run stopped between the two): RL starts from its weights, SFT is not rerun.
    """
    if path is None:
        return FRESH_COLD_START if sft_steps > 0 else FRESH_GRPO
    meta = trainer_meta(path)
    phase = meta.get("phase")
    if phase == "grpo":
        return RESUME_GRPO
    if phase == "cold_start" and int(meta.get("step", 0)) < sft_steps:
        return CONTINUE_COLD_START
    return WEIGHTS_THEN_GRPO
