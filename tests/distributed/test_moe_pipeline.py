"""PP=2 with MoE layers (CPU, gloo, fp32) equals the single-rank run: the DeepSeek-V3 layout in
small (first layer dense, sigmoid group-limited routing with bias balancing, shared expert) over
two pipeline stages, from the same initial weights, on the same packed batch: same losses,
forward-only log-probs, parameters after 3 Adam steps, and expert biases layer by layer (each
stage moves the biases of its own layers from its own training loads)."""
from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_ranks

STEPS = 3
MICRO_BATCH_TOKENS = 24


def _model_cfg():
    from r1mega.config import ModelConfig

    return ModelConfig(family="qwen3_moe", num_layers=4, hidden_size=32, num_attention_heads=4,
                       num_query_groups=2, ffn_hidden_size=48, vocab_size=100, qk_norm=True,
                       spec="local", num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=24,
                       moe_router="sigmoid_group", moe_num_groups=4, moe_topk_groups=2,
                       moe_routed_scaling_factor=2.5, moe_bias_update_rate=0.01,
                       moe_shared_expert_ffn_hidden_size=16, moe_first_k_dense=1)


def _samples():
    from r1mega.train.step import sft_sample

    g = torch.Generator().manual_seed(7)
    return [sft_sample(torch.randint(0, 100, (n,), generator=g), prompt_tokens=2)
            for n in [5, 9, 3, 12, 7, 4, 10, 6]]


def run(rank, world, pipeline, init_state):
    from r1mega.config import OptimizerConfig, ParallelConfig, PrecisionConfig, validate, Config
    from r1mega.models.gpt import build_model, unwrap
    from r1mega.parallel.runtime import init_parallel
    from r1mega.parallel.sharding import load_full_state, named_global_parameters
    from r1mega.train.optimizer import build_optimizer
    from r1mega.train.step import TrainStep, forward_only, sft_loss_fn, vocab_parallel_target_logprobs

    model_cfg = _model_cfg()
    cfg = Config(model=model_cfg, parallel=ParallelConfig(pipeline=pipeline))
    validate(cfg, world_size=world)
    rt = init_parallel(cfg.parallel, PrecisionConfig())
    chunks = build_model(model_cfg, rt, wrap=True, distributed_optimizer=True)
    named = dict(named_global_parameters(chunks))
    if init_state is None:
        init_state = {k: p.detach().clone() for k, p in named.items()}
    else:
        load_full_state(chunks, init_state, rt.tp_rank, rt.tp_size, model_cfg.tied_embeddings)
    logp_fn = lambda logits, mb: vocab_parallel_target_logprobs(  # noqa: E731
        logits, mb.fields["labels"], vocab_size=model_cfg.vocab_size)
    init_logprobs = forward_only(chunks, rt, _samples(), logp_fn, MICRO_BATCH_TOKENS)
    opt = OptimizerConfig(lr=1e-2, clip_grad=1.0)
    step = TrainStep(chunks, build_optimizer(opt, chunks, rt, distributed=True, total_steps=STEPS),
                     rt, micro_batch_tokens=MICRO_BATCH_TOKENS)
    loss_fn = sft_loss_fn(model_cfg.vocab_size)
    results = [step(_samples(), loss_fn) for _ in range(STEPS)]
    biases = {layer.layer_number: layer.mlp.expert_bias.clone()
              for layer in unwrap(chunks[0]).decoder.layers
              if getattr(layer.mlp, "expert_bias", None) is not None}
    return {"losses": [r.loss for r in results], "num_micro_batches": results[0].num_micro_batches,
            "init_logprobs": init_logprobs, "biases": biases, "init": init_state,
            "params": {k: p.detach().clone() for k, p in named.items()}}


@pytest.mark.slow
def test_pp2_with_moe_layers_equals_single_rank():
    ref = run_ranks(run, 1, args=(1, None))[0]
    assert ref["num_micro_batches"] > 1  # several micro-batches' loads go into each bias step
    assert sorted(ref["biases"]) == [2, 3, 4]  # layer 1 is dense
    assert all(b.abs().max() > 0 for b in ref["biases"].values())
    got = run_ranks(run, 2, args=(2, ref["init"]))
    for r in got:  # every stage reports the last stage's loss
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]),
                                   rtol=1e-5, atol=1e-6)
        for a, b in zip(r["init_logprobs"], ref["init_logprobs"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    biases = {**got[0]["biases"], **got[1]["biases"]}
    assert sorted(got[0]["biases"]) == [2] and sorted(got[1]["biases"]) == [3, 4]
    for n, b in ref["biases"].items():
        torch.testing.assert_close(biases[n], b, rtol=0, atol=1e-6, msg=f"bias of layer {n}")
    params = {**got[0]["params"], **got[1]["params"]}
    # the last stage's output layer is the tied copy of the embedding (synchronised by megatron)
    torch.testing.assert_close(params.pop("output_layer.weight"), params["embedding.word_embeddings.weight"])
    assert set(params) == set(ref["params"])
    for k, p in ref["params"].items():
        torch.testing.assert_close(params[k], p, rtol=1e-4, atol=1e-5, msg=f"param {k}")
