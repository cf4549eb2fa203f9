"""A 2-step GRPO run (`run_train`, rollout included) of the tiny MoE model on 4 CPU ranks:
it finishes, every logged number is finite, both updates apply, and the final checkpoint is
written and verifies. The model is configs/moe_tiny_cpu.yaml shrunk, in DeepSeek-V3's layout
(sigmoid group-limited router with the bias step, a shared expert, the first layer dense), so
the run crosses dense and MoE layers, the expert-bias step and a checkpoint of both.

Layouts:
  * TP=2 x DP=2 with sequence parallelism (experts whole on each TP rank; the rollout turns
    sequence parallelism off and every TP rank computes every token);
  * TP=2 x EP=2 x DP=2 with sequence parallelism: the rollout steps the ranks of each
    expert-parallel group together (empty steps for a rank that is done) and, with sequence
    parallelism off there, each TP rank routes a 1/TP share of the tokens.
"""
from __future__ import annotations

import json
import math
import os

import pytest

from tests.distributed.harness import run_ranks

from r1mega.rewards.registry import RewardResult, register_reward

@register_reward("test_digit_share_moe")
def _digit_share(completion: str, reference: dict, **context) -> RewardResult:
    """Differs between random completions, so advantages (and gradients) are not all zero."""
    return RewardResult(sum(c.isdigit() for c in completion) / max(len(completion), 1), [])


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train(rank, world_size, overrides, run_dir, ckpt_dir):
    from r1mega.config import load_config
    from r1mega.train.trainer import run_train

    small = [
        "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=64", "model.moe_ffn_hidden_size=16",
        "model.moe_router=sigmoid_group", "model.moe_num_groups=4", "model.moe_topk_groups=2",
        "model.moe_routed_scaling_factor=2.5", "model.moe_bias_update_rate=0.001",
        "model.moe_shared_expert_ffn_hidden_size=16", "model.moe_first_k_dense=1",
        # Sequence-level balance losses need whole sequences; each TP rank sees a shard.
        "model.moe_aux_loss_coeff=0",
        "data.num_examples=32", "data.global_batch_prompts=4", "data.micro_batch_tokens=128",
        "rollout.group_size=2", "rollout.max_new_tokens=6", "rollout.kv_cpu_tokens=1024",
        "rollout.kv_block_tokens=4", "optimizer.lr=1e-3", "optimizer.warmup_steps=0",
        "optimizer.decay_style=constant", "grpo.kl_beta=0.05",
        "train.steps=2", "logging.progress_bar=false", f"logging.run_dir={run_dir}",
        f"checkpoint.dir={ckpt_dir}",
    ]
    cfg = load_config(os.path.join(ROOT, "configs/moe_tiny_cpu.yaml"), small + overrides)
    cfg.rewards.spec = {"arithmetic": {"test_digit_share_moe": 1.0, "format": 0.1}}
    return run_train(cfg)


def _check_run(run_dir: str, ckpt_dir: str) -> None:
    from r1mega.train.checkpoint import list_checkpoints, verify_checkpoint

    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = {r["step"]: r for r in rows if "reward/mean" in r}
    assert sorted(steps) == [1, 2]
    for step, row in steps.items():
        for k, v in row.items():
            if isinstance(v, float):
                assert math.isfinite(v), (step, k, v)
        assert row["update_skipped"] == 0.0, f"step {step} was not applied"
        assert row["grad_norm"] > 0
        assert 1 <= row["response/length_max"] <= 6
    saved = list_checkpoints(ckpt_dir)
    assert [s for s, _ in saved][-1] == 2, saved
    assert verify_checkpoint(saved[-1][1]) is None


def _run(tmp_path, layout):
    run_dir, ckpt_dir = str(tmp_path / "run"), str(tmp_path / "ckpt")
    codes = run_ranks(_train, world_size=4, args=(layout, run_dir, ckpt_dir), timeout_s=900)
    assert codes == [0, 0, 0, 0]
    _check_run(run_dir, ckpt_dir)


@pytest.mark.slow
def test_moe_grpo_two_steps_tp2_dp2(tmp_path):
    _run(tmp_path, ["parallel.tensor=2", "parallel.sequence_parallel=true"])


@pytest.mark.slow
def test_moe_grpo_two_steps_tp2_ep2(tmp_path):
    _run(tmp_path, ["parallel.tensor=2", "parallel.expert=2", "parallel.sequence_parallel=true"])
