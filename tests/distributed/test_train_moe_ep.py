"""`run_train` of the small MoE (configs/moe_tiny_cpu.yaml, shrunk) with parallel.expert=2 on 2 CPU
ranks: the colocated rollout steps both EP ranks together, the completions carry their routes
(rollout.routing_replay), and the reference, old-log-prob and training forwards replay them.
Two GRPO steps must complete with finite losses on every rank."""
from __future__ import annotations

import json
import math
import os

import pytest

from tests.distributed.harness import run_ranks

from r1mega.rewards.registry import RewardResult, register_reward


@register_reward("test_digit_share_moe_ep")
def _digit_share(completion: str, reference: dict, **context) -> RewardResult:
    """Differs between random completions, so advantages (and gradients) are not all zero."""
    return RewardResult(sum(c.isdigit() for c in completion) / max(len(completion), 1), [])


def _train(rank, world_size, run_dir):
    from r1mega.config import load_config
    from r1mega.train.trainer import run_train

    cfg = load_config("configs/moe_tiny_cpu.yaml", [
        "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
        "model.moe_ffn_hidden_size=32", "model.max_position_embeddings=64",
        "parallel.expert=2", "rollout.routing_replay=true",
        "data.num_examples=64", "data.global_batch_prompts=4", "data.micro_batch_tokens=128",
        "rollout.group_size=2", "rollout.max_new_tokens=6", "rollout.kv_cpu_tokens=1024",
        "rollout.kv_block_tokens=4", "grpo.kl_beta=0.05", "grpo.inner_epochs=2", "train.steps=2",
        "rewards.num_workers=0", "logging.progress_bar=false", f"logging.run_dir={run_dir}",
    ])
    cfg.rewards.spec = {"arithmetic": {"test_digit_share_moe_ep": 1.0, "format": 0.1}}
    return run_train(cfg)


@pytest.mark.slow  # 15 s alone, 40 s on a loaded 2-core box
def test_two_grpo_steps_with_expert_parallel_rollout_and_routing_replay(tmp_path):
    run_dir = str(tmp_path / "run")
    assert run_ranks(_train, world_size=2, args=(run_dir,), timeout_s=600) == [0, 0]
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = {r["step"]: r for r in rows if "reward/mean" in r}
    assert sorted(steps) == [1, 2]
    for row in steps.values():
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
        assert row["rollout/completions"] == 8
