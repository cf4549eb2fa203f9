"""EP=2 (× DP=2) training of the MoE model equals the single-rank run (CPU, gloo, fp32).

The routed experts are split over the two ranks (AllToAllDispatcher moves the token copies), the
rest is data parallel. From the same initial weights, on the same global batch (each rank packs
its half), the losses, the forward-only log-probs, the parameters after 2 Adam steps (experts
gathered over the EP group) and the expert biases (loads summed over DP) must agree. Balance
losses are off here: they are defined per packed micro-batch, and the packing differs with DP.

EP=4 (4 ranks, 2 experts each) runs with ``R1MEGA_TEST_BACKEND=nccl`` only (GPUs, bf16, the
tolerances of harness.BF16_REL): on CPU, EP=2 covers the same code and the token dispatcher's
EP=4 test its 4-rank all-to-all, and 4 more CPU ranks would cost CI a minute.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed.harness import assert_rel_close, assert_update_close, on_gpus, run_ranks

STEPS = 2
MICRO_BATCH_TOKENS = 24


def _model_cfg():
    from r1mega.config import ModelConfig

    return ModelConfig(family="qwen3_moe", num_layers=2, hidden_size=32, num_attention_heads=4,
                       num_query_groups=2, ffn_hidden_size=48, vocab_size=100, qk_norm=True,
                       spec="local", num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=24,
                       moe_router="sigmoid_group", moe_num_groups=4, moe_topk_groups=2,
                       moe_routed_scaling_factor=2.5, moe_bias_update_rate=0.01,
                       moe_shared_expert_ffn_hidden_size=16)


def _samples():
    from r1mega.train.step import sft_sample

    g = torch.Generator().manual_seed(7)
    return [sft_sample(torch.randint(0, 100, (n,), generator=g), prompt_tokens=2)
            for n in [5, 9, 3, 12, 7, 4, 10, 6]]


def run(rank, world, expert, init_state):
    from r1mega.config import Config, OptimizerConfig, ParallelConfig, PrecisionConfig, validate
    from r1mega.models.gpt import build_model
    from r1mega.moe.balancing import moe_layers
    from r1mega.parallel.runtime import init_parallel
    from r1mega.parallel.sharding import named_global_parameters
    from r1mega.train.optimizer import build_optimizer
    from r1mega.train.step import TrainStep, forward_only, sft_loss_fn, vocab_parallel_target_logprobs

    model_cfg = _model_cfg()
    cfg = Config(model=model_cfg, parallel=ParallelConfig(expert=expert))
    validate(cfg, world_size=world)
    rt = init_parallel(cfg.parallel, PrecisionConfig())
    chunks = build_model(model_cfg, rt, wrap=True, distributed_optimizer=True)
    named = dict(named_global_parameters(chunks))
    per_rank = model_cfg.num_experts // rt.ep_size
    ep_rank = dist.get_rank(rt.ep_group) if rt.ep_size > 1 else 0
    if init_state is None:
        init_state = {k: p.detach().clone() for k, p in named.items()}
    else:
        with torch.no_grad():
            for k, p in named.items():
                full = init_state[k]
                if ".experts." in k:  # this rank's slice of the stacked experts
                    full = full[ep_rank * per_rank:(ep_rank + 1) * per_rank]
                p.copy_(full)
    logp_fn = lambda logits, mb: vocab_parallel_target_logprobs(  # noqa: E731
        logits, mb.fields["labels"], vocab_size=model_cfg.vocab_size)
    mine = _samples()[rt.dp_rank::rt.dp_size]
    init_logprobs = forward_only(chunks, rt, mine, logp_fn, MICRO_BATCH_TOKENS)
    step = TrainStep(chunks, build_optimizer(OptimizerConfig(lr=1e-2, clip_grad=1.0), chunks, rt,
                                             distributed=True, total_steps=STEPS),
                     rt, micro_batch_tokens=MICRO_BATCH_TOKENS)
    results = [step(mine, sft_loss_fn(model_cfg.vocab_size)) for _ in range(STEPS)]
    params = {}
    for k, p in named.items():
        t = p.detach().clone()
        if ".experts." in k and rt.ep_size > 1:
            parts = [torch.empty_like(t) for _ in range(rt.ep_size)]
            dist.all_gather(parts, t, group=rt.ep_group)
            t = torch.cat(parts)
        params[k] = t
    return {"losses": [r.loss for r in results], "init_logprobs": init_logprobs,
            "grad_norms": [r.grad_norm for r in results], "init": init_state, "params": params,
            "biases": [m.expert_bias.clone() for m in moe_layers(chunks)]}


@pytest.mark.slow
@pytest.mark.parametrize("expert", [2, 4], ids=lambda e: f"ep{e}")
def test_ep_equals_single_rank(expert):
    if expert == 4 and not on_gpus():
        pytest.skip("EP=4 runs on GPUs (R1MEGA_TEST_BACKEND=nccl); EP=2 covers CPU")
    ref = run_ranks(run, 1, args=(1, None))[0]
    assert all(b.abs().max() > 0 for b in ref["biases"])
    got = run_ranks(run, expert, args=(expert, ref["init"]))
    samples = list(range(8))
    for rank, r in enumerate(got):
        mine = samples[rank::expert]
        if on_gpus():
            _compare_bf16(r, ref, mine, rank)
            continue
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(r["grad_norms"]), torch.tensor(ref["grad_norms"]),
                                   rtol=1e-4, atol=1e-6)
        for i, lp in zip(mine, r["init_logprobs"]):
            torch.testing.assert_close(lp, ref["init_logprobs"][i], rtol=1e-5, atol=1e-5)
        for a, b in zip(r["biases"], ref["biases"]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        for k, p in ref["params"].items():
            # Adam turns a gradient near zero into a step of up to lr whatever its size, so
            # summation-order noise (the two runs sum an expert's rows in different orders)
            # shows up as ~1e-5 in a few weights; 1e-4 is 1% of one step (lr 1e-2).
            torch.testing.assert_close(r["params"][k], p, rtol=1e-4, atol=1e-4, msg=f"param {k}")
        _compare_bf16(r, ref, mine, rank)  # fp32 agreement implies it: checks the GPU path's code


def _compare_bf16(r, ref, mine, rank):
    """bf16 on GPUs: whole-tensor tolerances (harness.BF16_REL). Routing is discrete: a token
    whose top-k scores tie within bf16 rounding may pick another expert in one layout, which moves
    that expert's bias by one update; so at most a quarter of the biases may differ."""
    assert_rel_close(r["losses"], ref["losses"], "loss", f"losses (rank {rank})")
    assert_rel_close(r["grad_norms"], ref["grad_norms"], "grad_norm", f"grad norms (rank {rank})")
    for i, lp in zip(mine, r["init_logprobs"]):
        assert_rel_close(lp.float(), ref["init_logprobs"][i].float(), "logprobs", f"log-probs {i}")
    for a, b in zip(r["biases"], ref["biases"]):
        moved = ((a.float().cpu() - b.float().cpu()).abs() > 1e-6).float().mean().item()
        assert moved <= 0.25, f"rank {rank}: {moved:.0%} of the expert biases differ"
    for k, p in ref["params"].items():
        # lr 1e-2 (constant) for STEPS steps
        assert_update_close(r["params"][k], p, ref["init"][k], 1e-2 * STEPS, f"param {k} (rank {rank})")
