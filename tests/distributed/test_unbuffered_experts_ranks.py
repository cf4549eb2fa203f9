"""Unbuffered routed-expert gradients on 2 gloo ranks (r1mega/models/ddp.py): with EP=2 the
expert-data-parallel group has one rank, so the experts leave the buffers while the dense
weights are still summed over DP=2; with DP=2 and EP=1 the experts' gradients must be summed, so
they stay buffered. Each layout trains against the same layout with every gradient buffered
(megatron's path): losses, gradient norms and parameters the same bits (fp32, non-distributed
optimizer)."""
from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_ranks

STEPS = 2


def run(rank, world, expert, unbuffered):
    from r1mega.config import Config, OptimizerConfig, ParallelConfig, PrecisionConfig, validate
    from r1mega.models import ddp
    from r1mega.models.gpt import build_model
    from r1mega.moe.experts import GroupedExperts
    from r1mega.parallel.runtime import init_parallel
    from r1mega.train.optimizer import build_optimizer
    from r1mega.train.step import TrainStep, sft_loss_fn, sft_sample
    from tests.unit.test_unbuffered_experts import _model_cfg

    if not unbuffered:
        ddp.unbuffered_expert_params = lambda *a, **k: []
    model_cfg = _model_cfg()
    cfg = Config(model=model_cfg, parallel=ParallelConfig(expert=expert, distributed_optimizer=False))
    validate(cfg, world_size=world)
    rt = init_parallel(cfg.parallel, PrecisionConfig())
    torch.manual_seed(0)
    chunks = build_model(model_cfg, rt, wrap=True, distributed_optimizer=False)
    experts = [p for m in chunks[0].modules() if isinstance(m, GroupedExperts) for p in m.parameters()]
    step = TrainStep(chunks, build_optimizer(OptimizerConfig(lr=1e-2, clip_grad=0.5), chunks, rt,
                                             distributed=False, total_steps=STEPS),
                     rt, micro_batch_tokens=24)
    g = torch.Generator().manual_seed(7)
    samples = [sft_sample(torch.randint(0, 100, (n,), generator=g), prompt_tokens=2)
               for n in [5, 9, 3, 12, 7, 4, 10, 6]][rt.dp_rank::rt.dp_size]
    results = [step(samples, sft_loss_fn(model_cfg.vocab_size)) for _ in range(STEPS)]
    return {"unbuffered": sum(hasattr(p, "main_grad") is False for p in experts),
            "experts": len(experts),
            "losses": [float(r.loss) for r in results], "norms": [float(r.grad_norm) for r in results],
            "params": [p.detach().clone() for p in chunks[0].parameters()]}


@pytest.mark.parametrize("expert", [2, 1], ids=["ep2", "dp2"])
def test_unbuffered_experts_on_two_ranks(expert):
    ref = run_ranks(run, 2, args=(expert, False))
    got = run_ranks(run, 2, args=(expert, True))
    for r, g in zip(ref, got):
        assert r["unbuffered"] == 0
        assert g["unbuffered"] == (g["experts"] if expert == 2 else 0)
        assert g["losses"] == r["losses"] and g["norms"] == r["norms"]
        for a, b in zip(g["params"], r["params"]):
            assert torch.equal(a, b)
