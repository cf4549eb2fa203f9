"""The reward_model reward in the reward worker pool: the judge's score of each completion equals
exp(mean log-prob) computed independently by a plain batched forward of the same weights."""
from __future__ import annotations

import math
import os

import pytest

from tests.distributed.harness import run_ranks

from r1mega.config import ConfigError, RewardsConfig, load_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAIRS = [("3+4-2=", "<think>3+4=7,7-2=5</think><answer>5</answer>"),
         ("9-1+1=", "<think>9-1=8</think><answer>8</answer>"),
         ("hello", "zz")]


def _make_judge(rank, world_size, directory):
    """A tiny trained-format checkpoint + judge.json; the expected scores by a plain forward."""
    import torch

    from r1mega.config import CheckpointConfig, DataConfig, ModelConfig, ParallelConfig
    from r1mega.data.templates import encode_prompt
    from r1mega.data.tokenizer import load_tokenizer
    from r1mega.models.gpt import build_model
    from r1mega.parallel.runtime import init_parallel
    from r1mega.rewards.reward_model import write_judge
    from r1mega.train.checkpoint import CheckpointManager

    rt = init_parallel(ParallelConfig(distributed_optimizer=False))
    model_cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2,
                            num_query_groups=1, ffn_hidden_size=64, vocab_size=128,
                            max_position_embeddings=128)
    data_cfg = DataConfig(tokenizer="char", template="raw", max_prompt_tokens=32)
    (model,) = build_model(model_cfg, rt, wrap=False)
    path = CheckpointManager(CheckpointConfig(dir=os.path.join(directory, "ckpt")), {}).save(
        1, [model])
    write_judge(os.path.join(directory, "judge"), path, model_cfg, data_cfg)
    tok = load_tokenizer("char")
    expected = []
    model.eval()
    for prompt, completion in PAIRS:
        p = encode_prompt(prompt, "raw", tok, 32)
        ids = torch.tensor([p + tok.encode(completion) + [tok.eos_id]])
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=None, attention_mask=None)[0, :, :128]
        logp = torch.log_softmax(logits.float(), -1)
        # Position t predicts token t+1: the completion's tokens and the EOS.
        targets = ids[0, len(p):]
        lp = logp[len(p) - 1:-1].gather(1, targets[:, None])[:, 0]
        expected.append(math.exp(float(lp.mean())))
    return expected


@pytest.mark.slow  # a spawned rank saves the judge, then a worker imports megatron: ~30 s on 2 cores
def test_reward_model_scores_in_the_worker_pool(tmp_path):
    from r1mega.rewards.scorer import RewardScorer

    expected = run_ranks(_make_judge, world_size=1, args=(str(tmp_path),))[0]
    cfg = RewardsConfig(spec={"chat": {"reward_model": 1.0}}, num_workers=1, timeout_s=120.0,
                        reward_model_dir=str(tmp_path / "judge"))
    with RewardScorer(cfg) as scorer:
        scorer.self_check(["chat"])
        scored = scorer.score([{"kind": "chat", "prompt": p, "completion": c, "reference": {}}
                               for p, c in PAIRS])
    assert [s.error for s in scored] == [None] * len(PAIRS)
    for s, want in zip(scored, expected):
        assert 0.0 < s.total <= 1.0
        assert s.total == pytest.approx(want, rel=1e-4)


def test_reward_model_config_is_checked():
    base = os.path.join(ROOT, "configs/demo.yaml")
    spec = "rewards.spec={arithmetic: {exact_match: 1.0, reward_model: 0.5}}"
    with pytest.raises(ConfigError, match="rewards.reward_model_dir"):
        validate(load_config(base, [spec]))
    with pytest.raises(ConfigError, match="rewards.num_workers"):
        validate(load_config(base, [spec, "rewards.reward_model_dir=/x"]))
