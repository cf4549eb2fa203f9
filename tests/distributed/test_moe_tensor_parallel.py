"""MoE under tensor parallelism equals the single-rank model (CPU, gloo, fp32).

Layouts, each against one rank holding every expert:
  * EP=2 x TP=2 with sequence parallelism (4 ranks, DP=2): the EP group is the TP group
    (expert-TP = 1), each TP rank routes its own sequence shard through the all-to-all;
  * TP=2 with sequence parallelism, EP=1: experts whole on both ranks, partial gradients
    summed over TP by finalize_model_grads (the ``sequence_parallel`` mark);
  * TP=2 without sequence parallelism, EP=1: every rank computes every token.

From the same initial weights and the same global batch: the loss and every parameter's
gradient after one forward/backward (TP shards and EP slices gathered back to full tensors),
then two Adam steps (parameters, gradient norms, expert biases). Replicated tensors (router,
shared expert, norms, and the experts at EP=1) must be bit-identical across the TP ranks, both
their gradients and their values after the optimizer steps.

Tolerances: fp32 throughout; the sharded runs sum the same products in another order (TP
matmul halves, per-shard expert rows, the all-reduce), which moves results by a few ulps of
the largest term: 1e-5 relative on losses and gradients. After Adam steps, a gradient near zero
becomes a step of up to lr whatever its size, so that noise reaches ~1e-5 in a few weights;
1e-4 is 1% of one step at lr 1e-2. Sample lengths are even so that sequence parallelism adds no
padding tokens (they would be routed and counted in the expert loads).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed.harness import run_ranks
from tests.distributed.test_moe_expert_parallel import _model_cfg  # the same small DeepSeek-V3-routed MoE

STEPS = 2
MICRO_BATCH_TOKENS = 24
LENGTHS = [6, 10, 4, 12, 8, 4, 10, 6]


def _samples():
    from r1mega.train.step import sft_sample

    g = torch.Generator().manual_seed(7)
    return [sft_sample(torch.randint(0, 100, (n,), generator=g), prompt_tokens=2) for n in LENGTHS]


def _gather_experts(tensors: dict, rt) -> dict:
    """EP slices (E/EP, ...) -> (E, ...) on every rank; other tensors unchanged."""
    if rt.ep_size == 1:
        return tensors
    out = dict(tensors)
    for k, t in tensors.items():
        if ".experts." in k:
            parts = [torch.empty_like(t) for _ in range(rt.ep_size)]
            dist.all_gather(parts, t.contiguous(), group=rt.ep_group)
            out[k] = torch.cat(parts)
    return out


def run(rank, world, par_kw, init_state):
    from r1mega.config import Config, OptimizerConfig, ParallelConfig, PrecisionConfig, validate
    from r1mega.models.ddp import step_grad
    from r1mega.models.gpt import build_model
    from r1mega.moe.balancing import moe_layers
    from r1mega.parallel.runtime import init_parallel
    from r1mega.parallel.sharding import gather_full, is_tp_sharded, named_global_parameters, shard
    from r1mega.train.optimizer import build_optimizer
    from r1mega.train.step import TrainStep, sft_loss_fn

    model_cfg = _model_cfg()
    cfg = Config(model=model_cfg, parallel=ParallelConfig(**par_kw))
    validate(cfg, world_size=world)
    rt = init_parallel(cfg.parallel, PrecisionConfig())
    # The non-distributed optimizer keeps whole reduced gradients in every rank's main_grad.
    chunks = build_model(model_cfg, rt, wrap=True, distributed_optimizer=False)
    named = dict(named_global_parameters(chunks))
    per_rank = model_cfg.num_experts // rt.ep_size
    ep_rank = dist.get_rank(rt.ep_group) if rt.ep_size > 1 else 0
    if init_state is None:
        init_state = {k: p.detach().clone() for k, p in named.items()}
    with torch.no_grad():
        for k, p in named.items():
            full = init_state[k]
            if ".experts." in k:
                full = full[ep_rank * per_rank:(ep_rank + 1) * per_rank]
            p.copy_(shard(full, p, rt.tp_rank, rt.tp_size))

    def full(tensors: dict) -> dict:
        return gather_full(_gather_experts(tensors, rt), named, rt.tp_rank, rt.tp_size, group=rt.tp_group)

    def replicated(tensors: dict) -> dict:
        """This rank's copy of what every TP rank holds whole (EP slices differ by design)."""
        return {k: t.detach().clone() for k, t in tensors.items()
                if not is_tp_sharded(named[k]) and not (".experts." in k and rt.ep_size > 1)}

    loss_fn = sft_loss_fn(model_cfg.vocab_size, rt.tp_group if rt.tp_size > 1 else None)
    mine = _samples()[rt.dp_rank::rt.dp_size]
    step = TrainStep(chunks, build_optimizer(OptimizerConfig(lr=1e-2, clip_grad=1.0), chunks, rt,
                                             distributed=False, total_steps=STEPS + 1),
                     rt, micro_batch_tokens=MICRO_BATCH_TOKENS)
    sums = step.forward_backward(step.micro_batches(mine), loss_fn)
    grads = {k: step_grad(p).detach().clone() for k, p in named.items()}
    first = step.optimizer_step(sums, len(step.micro_batches(mine)))
    results = [first] + [step(mine, loss_fn) for _ in range(STEPS - 1)]
    params = {k: p.detach() for k, p in named.items()}
    return {"where": (rt.tp_rank, rt.dp_rank), "init": init_state,
            "loss": sums["loss_sum"] / sums["num_tokens"],
            "losses": [r.loss for r in results], "grad_norms": [r.grad_norm for r in results],
            "grads": full(grads), "params": full(params),
            "replicated_grads": replicated(grads), "replicated_params": replicated(params),
            "biases": [m.expert_bias.clone() for m in moe_layers(chunks)]}


@pytest.fixture(scope="module")
def reference():
    return run_ranks(run, 1, args=(dict(), None))[0]


def _check_against(reference, got):
    ref = reference
    assert all(b.abs().max() > 0 for b in ref["biases"])  # the bias step did run
    by_place: dict = {}
    for r in got:
        torch.testing.assert_close(torch.tensor(r["loss"]), torch.tensor(ref["loss"]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(r["grad_norms"]), torch.tensor(ref["grad_norms"]),
                                   rtol=1e-5, atol=1e-7)
        assert set(r["grads"]) == set(ref["grads"])
        for k, g in ref["grads"].items():
            assert g.abs().max() > 0, f"reference gradient of {k} is zero: the check would be vacuous"
            torch.testing.assert_close(r["grads"][k], g, rtol=1e-5, atol=1e-7, msg=f"grad {k}")
        for k, p in ref["params"].items():
            torch.testing.assert_close(r["params"][k], p, rtol=1e-4, atol=1e-4, msg=f"param {k}")
        for a, b in zip(r["biases"], ref["biases"]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        by_place.setdefault(r["where"][1], []).append(r)
    for dp_rank, ranks in by_place.items():  # TP replicas of one DP rank: bit-identical
        assert len(ranks) > 1
        for other in ranks[1:]:
            for kind in ("replicated_grads", "replicated_params"):
                assert set(other[kind]) == set(ranks[0][kind])
                for k, t in ranks[0][kind].items():
                    assert torch.equal(other[kind][k], t), f"{kind} {k} differs across TP ranks"


@pytest.mark.slow
def test_ep2_tp2_sequence_parallel_equals_single_rank(reference):
    got = run_ranks(run, 4, args=(dict(tensor=2, expert=2, sequence_parallel=True), reference["init"]))
    _check_against(reference, got)
    # The router and shared expert of an MoE layer are among the TP-replicated tensors checked.
    assert any("router_weight" in k for k in got[0]["replicated_params"])
    assert any("shared_expert" in k for k in got[0]["replicated_params"])


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [True, False])
def test_tp2_moe_equals_single_rank(reference, sequence_parallel):
    got = run_ranks(run, 2, args=(dict(tensor=2, sequence_parallel=sequence_parallel), reference["init"]))
    _check_against(reference, got)
    assert any(".experts." in k for k in got[0]["replicated_params"])  # EP=1: whole on each TP rank
