"""Which phase a `r1mega train` run starts in, from the checkpoint it found (plain files)."""
import json
import os

from r1mega.config import CheckpointConfig
from r1mega.train import phases


def _ckpt(root, name, trainer):
    path = os.path.join(root, name)
    os.makedirs(path)
    with open(os.path.join(path, "trainer.json"), "w") as f:
        json.dump({"format": 1, "step": trainer.get("step", 0), "trainer": trainer}, f)
    return path


def test_plan_follows_the_phase_in_trainer_json(tmp_path):
    root = str(tmp_path)
    mid_sft = _ckpt(root, "a", {"phase": "cold_start", "step": 4})
    done_sft = _ckpt(root, "b", {"phase": "cold_start", "step": 6})
    boundary = _ckpt(root, "c", {"phase": "grpo", "step": 0})
    sft_run = _ckpt(root, "d", {"phase": "sft", "step": 2})  # an `r1mega sft` result
    converted = os.path.join(root, "e")
    os.makedirs(converted)  # no trainer.json
    assert phases.plan_start(None, 6) == phases.FRESH_COLD_START
    assert phases.plan_start(None, 0) == phases.FRESH_GRPO
    assert phases.plan_start(mid_sft, 6) == phases.CONTINUE_COLD_START
    assert phases.plan_start(done_sft, 6) == phases.WEIGHTS_THEN_GRPO  # SFT is not rerun
    assert phases.plan_start(mid_sft, 3) == phases.WEIGHTS_THEN_GRPO  # sft_steps lowered since
    assert phases.plan_start(boundary, 6) == phases.RESUME_GRPO
    assert phases.plan_start(sft_run, 6) == phases.WEIGHTS_THEN_GRPO
    assert phases.plan_start(converted, 6) == phases.WEIGHTS_THEN_GRPO
    assert phases.phase_of(converted) is None and phases.trainer_meta(converted) == {}


def test_cold_start_checkpoints_live_apart(tmp_path):
    cfg = CheckpointConfig(dir=str(tmp_path), keep_last=2, save_every_steps=5)
    cold = phases.cold_start_checkpoint_config(cfg)
    assert cold.dir == os.path.join(str(tmp_path), "cold_start")
    assert (cold.keep_last, cold.save_every_steps) == (2, 5) and cfg.dir == str(tmp_path)
