"""Fixtures the GPU tests share."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def tensorwise_rollout(single_rank_runtime):
    """(model, runtime, tensorwise FP8 rollout policy, six prompts of 5-60 tokens): the small
    local-spec model (2 layers, hidden 256, 8 q / 2 KV heads, vocab 1,000) the FP8 rollout
    tests decode with."""
    from r1mega.config import ModelConfig, PrecisionConfig
    from r1mega.models.gpt import build_model
    from r1mega.precision.policy import resolve_rollout_fp8_policy

    rt = single_rank_runtime()
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=8,
                                    num_query_groups=2, ffn_hidden_size=512, vocab_size=1000,
                                    max_position_embeddings=256, spec="local"), rt, wrap=False)
    policy = resolve_rollout_fp8_policy(PrecisionConfig(fp8_rollout=True, fp8_recipe="tensorwise"), "cuda")
    prompts = [[(i * 37 + j) % 1000 for j in range(5 + 11 * i)] for i in range(6)]
    return model, rt, policy, prompts
