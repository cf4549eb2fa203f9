"""Rollout of the MoE model under expert parallelism (2 CPU ranks, gloo) equals the EP=1 rollout.

Each rank holds half of the experts and its own prompts; the ranks have different prompt counts
and lengths, so one finishes early and must keep joining the others' all-to-alls with empty steps
(a hang here fails the test through the harness's timeout). The reference is one rank holding
every expert (EP=1), generating the same requests, from the same initial weights: greedy tokens
must be equal, and so must the routes the rollout records (routing replay), which the EP run
computes on the ranks that own the experts. A second round gives one rank no requests at all;
a third gives one rank a bad request, which must fail on both ranks rather than hang.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed.harness import run_ranks

VOCAB = 128
# Rank r's requests (prompt, samples, max_new_tokens): rank 1 has fewer, shorter ones.
REQUESTS = [
    [([5, 17, 3], 2, 9), (list(range(20, 37)), 1, 7), ([9], 1, 8)],
    [([(7 * i) % VOCAB for i in range(11)], 1, 3)],
]


def _model_cfg():
    from r1mega.config import ModelConfig

    return ModelConfig(family="qwen3_moe", num_layers=3, hidden_size=32, num_attention_heads=4,
                       num_query_groups=2, ffn_hidden_size=64, vocab_size=VOCAB,
                       max_position_embeddings=128, qk_norm=True, spec="local", num_experts=8,
                       moe_router_topk=2, moe_ffn_hidden_size=32, moe_router="sigmoid_group",
                       moe_num_groups=4, moe_topk_groups=2, moe_routed_scaling_factor=2.5,
                       moe_bias_update_rate=0.01, moe_shared_expert_ffn_hidden_size=16,
                       moe_first_k_dense=1)


def _requests(rounds):
    from r1mega.rollout.types import GenerationRequest

    return [[GenerationRequest(p, n=n, max_new_tokens=m, temperature=0.0) for p, n, m in reqs]
            for reqs in rounds]


def run(rank, world, expert, init_state):
    from r1mega.config import Config, ParallelConfig, PrecisionConfig, RolloutConfig, validate
    from r1mega.models.gpt import build_model
    from r1mega.moe.balancing import moe_layers
    from r1mega.parallel.runtime import init_parallel
    from r1mega.rollout.engine import RolloutEngine

    cfg = Config(model=_model_cfg(), parallel=ParallelConfig(expert=expert))
    cfg.rollout.routing_replay = True
    validate(cfg, world_size=world)
    # fp32 also where the ranks get GPUs (NCCL): bf16 rounding differs with the rows per expert.
    rt = init_parallel(cfg.parallel, PrecisionConfig(dtype="fp32"))
    torch.manual_seed(0)
    chunks = build_model(cfg.model, rt, wrap=False)
    named = dict(chunks[0].named_parameters())
    named.update({k: b for k, b in chunks[0].named_buffers() if k.endswith("expert_bias")})
    if init_state is None:
        with torch.no_grad():
            for k, p in named.items():
                if p.dim() >= 2:
                    p.mul_(4.0)  # peaked logits: greedy decoding is not a string of near-ties
            for layer in moe_layers(chunks):
                layer.expert_bias.copy_(torch.randn(8) * 0.05)
        init_state = {k: p.detach().clone() for k, p in named.items()}
    else:
        per_rank = cfg.model.num_experts // rt.ep_size
        ep_rank = dist.get_rank(rt.ep_group)
        with torch.no_grad():
            for k, p in named.items():
                full = init_state[k]
                if ".experts." in k:  # this rank's slice of the stacked experts
                    full = full[ep_rank * per_rank:(ep_rank + 1) * per_rank]
                p.copy_(full)
    rcfg = RolloutConfig(kv_block_tokens=4, kv_cpu_tokens=2048, cuda_graphs=False, routing_replay=True)
    eng = RolloutEngine(chunks, rcfg, rt, eos_ids=[], vocab_size=VOCAB)
    # EP=1: one rank generates every rank's requests; EP=2: each rank its own, then a round in
    # which rank 1 has none at all.
    rounds = [REQUESTS[0] + REQUESTS[1]] if world == 1 else [REQUESTS[rank], REQUESTS[0] if rank == 0 else []]
    out = []
    for reqs in _requests(rounds):
        comps = eng.generate(reqs)
        out.append({"completions": [(c.prompt_index, c.sample_index, c.token_ids, c.routes) for c in comps],
                    "empty_steps": eng.stats["empty"], "steps": eng.stats["prefill"] + eng.stats["decode"]})
    errors = None
    if world > 1:
        # A bad request on one rank (an empty prompt): it raises, and its peer raises too
        # instead of waiting in the next step's all-to-all.
        from r1mega.rollout.types import GenerationRequest

        try:
            eng.generate([GenerationRequest([] if rank == 1 else [4, 5], n=1, temperature=0.0)])
        except (ValueError, RuntimeError) as exc:
            errors = (type(exc).__name__, str(exc))
    eng.release()
    return {"init": init_state, "rounds": out, "errors": errors}


@pytest.mark.slow  # three rank processes importing megatron: 20-40 s on 2 shared cores
def test_ep2_rollout_with_an_early_finisher_equals_ep1():
    ref = run_ranks(run, 1, args=(1, None), timeout_s=300)[0]
    ref_comps = ref["rounds"][0]["completions"]
    by_rank = {0: ref_comps[:4], 1: ref_comps[4:]}  # rank 0: 2 + 1 + 1 samples, rank 1: 1
    got = run_ranks(run, 2, args=(2, ref["init"]), timeout_s=300)
    for rank, r in enumerate(got):
        first = r["rounds"][0]
        assert len(first["completions"]) == len(by_rank[rank])
        for (pi, si, toks, routes), (_, rsi, rtoks, rroutes) in zip(first["completions"], by_rank[rank]):
            assert si == rsi and toks == rtoks, f"rank {rank} prompt {pi} sample {si}"
            assert routes.shape == rroutes.shape and torch.equal(routes, rroutes), f"rank {rank} prompt {pi}"
            assert routes.shape == (2, len(REQUESTS[rank][pi][0]) + len(toks) - 1, 2)
    # Rank 1 (3 new tokens) ran empty steps while rank 0 (up to 9) decoded; every rank took as
    # many steps in all.
    r0, r1 = got[0]["rounds"][0], got[1]["rounds"][0]
    assert r1["empty_steps"] > 0 and r0["empty_steps"] == 0
    assert r0["steps"] == r1["steps"] + r1["empty_steps"]
    # Second round: rank 1 has no requests; rank 0's completions are those of the first round.
    second0, second1 = got[0]["rounds"][1], got[1]["rounds"][1]
    assert second1["completions"] == [] and second1["empty_steps"] == second0["steps"]
    assert [c[2] for c in second0["completions"]] == [c[2] for c in by_rank[0]]
    assert got[1]["errors"][0] == "ValueError" and "empty prompt" in got[1]["errors"][1]
    assert got[0]["errors"][0] == "RuntimeError" and "peer rank rejected" in got[0]["errors"][1]
