"""A checkpoint written at EP=2 x TP=2 (sequence parallel, distributed optimizer) loads onto
other layouts: each EP rank's expert slice lands at its offset in the (E, ...) tensors and the
weights are the ones saved, bit for bit, on one rank holding every expert (weights only) and at
EP=2 x DP=2 without TP, where the optimizer state carries over too (the next step from the
loaded state matches the next step of the run that saved it).

Not covered: the optimizer state across a change of parallel.expert between 1 and > 1. megatron
keeps expert weights (``allreduce=False``) in a second chained optimizer only when EP > 1, so
the optimizer's checkpoint keys differ; weights-only loads (as here) work.

Tolerance on that next step: fp32, the sharded run sums in another order (see
test_moe_tensor_parallel.py); Adam turns ulp-level gradient noise near zero into up to lr,
so 1e-4 at lr 1e-2.
"""
from __future__ import annotations

import torch

from tests.distributed.harness import run_ranks
from tests.distributed.test_moe_tensor_parallel import (MICRO_BATCH_TOKENS, _gather_experts,
                                                        _model_cfg, _samples)

import pytest


def run(rank, world, par_kw, ckpt_dir, save, load_optimizer=True):
    from r1mega.config import CheckpointConfig, Config, OptimizerConfig, ParallelConfig, PrecisionConfig, validate
    from r1mega.models.gpt import build_model
    from r1mega.parallel.runtime import init_parallel
    from r1mega.parallel.sharding import gather_full, named_global_parameters
    from r1mega.train.checkpoint import CheckpointManager, list_checkpoints
    from r1mega.train.optimizer import build_optimizer
    from r1mega.train.step import TrainStep, sft_loss_fn

    model_cfg = _model_cfg()
    cfg = Config(model=model_cfg, parallel=ParallelConfig(**par_kw))
    validate(cfg, world_size=world)
    rt = init_parallel(cfg.parallel, PrecisionConfig())
    chunks = build_model(model_cfg, rt, wrap=True, distributed_optimizer=True)
    named = dict(named_global_parameters(chunks))
    optim = build_optimizer(OptimizerConfig(lr=1e-2, clip_grad=1.0), chunks, rt, distributed=True,
                            total_steps=3)
    step = TrainStep(chunks, optim, rt, micro_batch_tokens=MICRO_BATCH_TOKENS)
    loss_fn = sft_loss_fn(model_cfg.vocab_size, rt.tp_group if rt.tp_size > 1 else None)
    mine = _samples()[rt.dp_rank::rt.dp_size]
    mgr = CheckpointManager(CheckpointConfig(dir=ckpt_dir), {"tp": rt.tp_size, "ep": rt.ep_size,
                                                              "dp": rt.dp_size, "world": world})

    def full() -> dict:
        local = {k: p.detach().clone() for k, p in named.items()}
        return gather_full(_gather_experts(local, rt), named, rt.tp_rank, rt.tp_size, group=rt.tp_group)

    if save:
        step(mine, loss_fn)
        mgr.save(1, chunks, optim.optimizer)
    else:
        mgr.load(list_checkpoints(ckpt_dir)[0][1], chunks, optim.optimizer, load_optimizer=load_optimizer)
        optim.scheduler.step(increment=1)  # the saved run's schedule had taken one step
    at_save = full()
    if not load_optimizer:
        return {"at_save": at_save}
    step(mine, loss_fn)
    return {"at_save": at_save, "next": full()}


@pytest.mark.slow
def test_ep2_tp2_checkpoint_loads_on_other_layouts(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    saved = run_ranks(run, 4, args=(dict(tensor=2, expert=2, sequence_parallel=True), ckpt, True))[0]
    one_rank = run_ranks(run, 1, args=(dict(), ckpt, False, False))[0]
    ep_dp = run_ranks(run, 2, args=(dict(expert=2), ckpt, False))[0]
    for loaded in (one_rank, ep_dp):
        assert set(loaded["at_save"]) == set(saved["at_save"])
        for k, t in saved["at_save"].items():
            assert torch.equal(loaded["at_save"][k], t), f"{k} differs after loading"
    for k, t in saved["next"].items():
        torch.testing.assert_close(ep_dp["next"][k], t, rtol=1e-4, atol=1e-4, msg=f"{k} after the next step")
