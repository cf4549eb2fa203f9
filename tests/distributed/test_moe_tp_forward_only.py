"""Forward-only MoE at TP=2 x EP=2 with sequence parallelism switched off (the rollout's case):
every TP rank holds every token, each routes a 1/TP share through the expert all-to-all and
the shares are gathered back. The output must equal the layer's math on one device with all
experts (``moe_feed_forward``), including a step with fewer tokens than TP ranks (one rank's
share is empty); a graph-building forward that way is refused, not silently wrong.
Tolerance: fp32, the same products summed per row in the same order; 1e-6.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed.harness import run_ranks
from tests.distributed.test_moe_tensor_parallel import _model_cfg


def run(rank, world):
    from r1mega.config import Config, ParallelConfig, PrecisionConfig, validate
    from r1mega.models.gpt import build_model
    from r1mega.moe.balancing import moe_layers
    from r1mega.moe.experts import GroupedExperts, moe_feed_forward
    from r1mega.parallel.runtime import init_parallel

    model_cfg = _model_cfg()
    cfg = Config(model=model_cfg, parallel=ParallelConfig(tensor=2, expert=2, sequence_parallel=True))
    validate(cfg, world_size=world)
    rt = init_parallel(cfg.parallel, PrecisionConfig())
    layer = moe_layers(build_model(model_cfg, rt, wrap=False))[0]
    assert dist.get_process_group_ranks(rt.ep_group) == dist.get_process_group_ranks(rt.tp_group)
    with torch.no_grad():  # distinct expert weights per EP rank (they start as equal draws)
        for p in layer.experts.parameters():
            p.add_(0.1 * rank)
    full = GroupedExperts(model_cfg.num_experts, model_cfg.hidden_size, model_cfg.moe_ffn_hidden_size)
    with torch.no_grad():
        for name, p in layer.experts.named_parameters():
            parts = [torch.empty_like(p) for _ in range(rt.ep_size)]
            dist.all_gather(parts, p.detach().contiguous(), group=rt.ep_group)
            getattr(full, name).copy_(torch.cat(parts))
    rows = []  # rows the local experts compute, per forward
    layer.experts.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    layer.sequence_parallel = False  # as r1mega.rollout.model_runner.sequence_parallel_off does
    g = torch.Generator().manual_seed(3)
    errors = []
    for tokens in (7, 1):
        x = torch.randn(tokens, 1, model_cfg.hidden_size, generator=g)  # the same on both ranks
        with torch.no_grad():
            out, _ = layer(x)
            _, w, idx = layer.route(x.view(tokens, -1))
            ref = moe_feed_forward(x.view(tokens, -1), w, idx, full, shared=layer.shared_expert)
        errors.append((out.view(tokens, -1) - ref).abs().max().item())
    refused = None
    try:
        layer(torch.randn(4, 1, model_cfg.hidden_size, requires_grad=True))
    except RuntimeError as exc:
        refused = str(exc)
    return {"errors": errors, "refused": refused, "rows": rows[:2]}


@pytest.mark.slow
def test_forward_only_token_shares_equal_one_device():
    got = run_ranks(run, 2)
    for r in got:
        assert max(r["errors"]) < 1e-6, r["errors"]
        assert "parallel.sequence_parallel=true" in r["refused"]
    # Each token's top-2 copies cross the all-to-all once, not once per TP rank.
    topk = _model_cfg().moe_router_topk
    assert sum(r["rows"][0] for r in got) == 7 * topk
    assert sum(r["rows"][1] for r in got) == 1 * topk
