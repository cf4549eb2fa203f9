"""A dropped, trained policy is freed before the next model is built: its DDP wrapper, its
parameter and gradient buffers and its parameters (a pipeline builds one policy per phase, a
benchmark one model per row)."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from r1mega.config import ModelConfig, OptimizerConfig, PrecisionConfig
from r1mega.train.roles import Policy, free_dropped_models
from r1mega.train.step import sft_loss_fn, sft_sample

VOCAB = 64


def _trained_policy(rt, distributed: bool, dtype: str) -> tuple[Policy, list]:
    model = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=64, vocab_size=VOCAB, max_position_embeddings=64)
    policy = Policy.build(model, PrecisionConfig(dtype=dtype), OptimizerConfig(lr=1e-2), rt,
                          distributed_optimizer=distributed, micro_batch_tokens=64, total_steps=2)
    g = torch.Generator().manual_seed(0)
    samples = [sft_sample(torch.randint(0, VOCAB, (16,), generator=g)) for _ in range(2)]
    res = policy.update(samples, sft_loss_fn(VOCAB, rt.tp_group))
    assert res.update_successful and res.loss == res.loss
    chunk = policy.chunks[0]
    refs = [weakref.ref(chunk), weakref.ref(next(chunk.parameters()))]
    refs += [weakref.ref(b.param_data) for b in chunk.buffers if b.param_data is not None]
    refs += [weakref.ref(b.grad_data) for b in chunk.buffers]
    return policy, refs


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("distributed", [True, False])
def test_dropped_policy_is_freed(single_rank_runtime, distributed, dtype):
    rt = single_rank_runtime(precision=PrecisionConfig(dtype=dtype))
    policy, refs = _trained_policy(rt, distributed, dtype)
    # Trainers hold their policy in reference cycles (an object that points back at its owner).
    trainer = {"policy": policy}
    trainer["self"] = trainer
    del policy, trainer
    free_dropped_models(rt.device)
    alive = [type(r()).__name__ for r in refs if r() is not None]
    assert not alive, f"still allocated: {alive}"


def test_one_collector_pass_is_not_enough(single_rank_runtime):
    """Why free_dropped_models collects until nothing is left: the case that needs two passes."""
    rt = single_rank_runtime(precision=PrecisionConfig(dtype="fp32"))
    policy, refs = _trained_policy(rt, True, "fp32")
    trainer = {"policy": policy}
    trainer["self"] = trainer
    del policy, trainer
    gc.collect()
    first = [r() is not None for r in refs]
    free_dropped_models(rt.device)
    assert [r() is not None for r in refs] == [False] * len(refs)
    if not any(first):
        pytest.skip("this torch frees the model in one pass")
