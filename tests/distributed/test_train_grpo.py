"""A 2-step GRPO run (`run_train`) on 4 CPU ranks completes and logs every metric, at
TP=2 x DP=2 (rollout engine with vocab-parallel sampling) and PP=2 x DP=2 (generation through the
pipeline schedule). The KL term is on, so the reference role runs too."""
from __future__ import annotations

import json
import math
import os

import pytest

from tests.distributed.harness import run_ranks

from r1mega.rewards.registry import RewardResult, register_reward


@register_reward("test_digit_share_dist")
def _digit_share(completion: str, reference: dict, **context) -> RewardResult:
    """Differs between random completions, so advantages (and gradients) are not all zero."""
    return RewardResult(sum(c.isdigit() for c in completion) / max(len(completion), 1), [])


EXPECTED = ("reward/mean", "reward/std", "reward/accuracy", "reward/format_rate",
            "reward/test_digit_share_dist_mean", "reward/test_digit_share_dist_std",
            "response/length_mean", "response/length_max", "response/reflection_share", "kl",
            "entropy", "clip/low_frac", "clip/high_frac", "grad_norm", "lr",
            "throughput/tokens_per_s", "throughput/tflops", "time/rollout_s", "time/reward_s",
            "time/logprobs_s", "time/train_s", "memory/host_rss_gb", "loss")


def _train(rank, world_size, overrides, run_dir):
    from r1mega.config import load_config
    from r1mega.train.trainer import run_train

    base = [
        "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=64", "model.vocab_size=128",
        "model.max_position_embeddings=64",
        "data.source=builtin:arithmetic", "data.template=raw", "data.num_examples=64",
        "data.global_batch_prompts=4", "data.micro_batch_tokens=128",
        "rollout.group_size=2", "rollout.max_new_tokens=6", "rollout.kv_cpu_tokens=1024",
        "rollout.kv_block_tokens=4", "rollout.cuda_graphs=false",
        "grpo.kl_beta=0.05", "optimizer.lr=1e-3", "train.steps=2",
        "rewards.num_workers=0", "logging.progress_bar=false", f"logging.run_dir={run_dir}",
    ]
    cfg = load_config(None, base + overrides)
    cfg.rewards.spec = {"arithmetic": {"test_digit_share_dist": 1.0, "format": 0.1}}
    return run_train(cfg)


@pytest.mark.parametrize("layout", [["parallel.tensor=2"], ["parallel.pipeline=2"]],
                         ids=["tp2_dp2", "pp2_dp2"])
def test_two_grpo_steps_on_four_ranks(tmp_path, layout):
    run_dir = str(tmp_path / "run")
    codes = run_ranks(_train, world_size=4, args=(layout, run_dir), timeout_s=600)
    assert codes == [0, 0, 0, 0]
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = {r["step"]: r for r in rows if "reward/mean" in r}
    assert sorted(steps) == [1, 2]
    for step, row in steps.items():
        missing = [k for k in EXPECTED if k not in row]
        assert not missing, f"step {step} lacks {missing}"
        for k in EXPECTED:
            assert math.isfinite(row[k]), (step, k, row[k])
        assert row["update_skipped"] == 0.0
        assert row["grad_norm"] > 0
        assert 1 <= row["response/length_max"] <= 6
    # tensorboard event file written
    tb = os.path.join(run_dir, "tensorboard")
    assert any(name.startswith("events.") for name in os.listdir(tb))
