"""Checkpoint save -> resume on real megatron models and optimizers (CPU, gloo).

Uninterrupted: 2 steps, save, 1 more step. Resumed: fresh (differently initialised) model, load,
the same 1 step. Same layout must be bit-identical; another layout (TP=2 -> DP=2) must agree
within fp32 tolerance (different reduction order), which shows the checkpoint reshards.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.distributed.harness import run_ranks

LAYOUTS = {"tp2": dict(tensor=2, pipeline=1), "dp2": dict(tensor=1, pipeline=1),
           "pp2": dict(tensor=1, pipeline=2)}


def _samples():
    from r1mega.train.step import sft_sample

    g = torch.Generator().manual_seed(3)
    return [sft_sample(torch.randint(0, 90, (n,), generator=g), prompt_tokens=1)
            for n in (6, 9, 4, 11)]


def run(rank, world, layout, mode, ckpt_dir):
    from r1mega.config import CheckpointConfig, ModelConfig, OptimizerConfig, ParallelConfig, PrecisionConfig
    from r1mega.models.gpt import build_model
    from r1mega.parallel.runtime import init_parallel
    from r1mega.parallel.sharding import gather_full, named_global_parameters
    from r1mega.train.checkpoint import CheckpointManager
    from r1mega.train.optimizer import build_optimizer
    from r1mega.train.step import TrainStep, sft_loss_fn

    model_cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=64, vocab_size=90, tied_embeddings=False)
    rt = init_parallel(ParallelConfig(**LAYOUTS[layout], seed=1 if mode == "save" else 99),
                       PrecisionConfig())
    chunks = build_model(model_cfg, rt, wrap=True, distributed_optimizer=True)
    opt_cfg = OptimizerConfig(lr=1e-2, warmup_steps=1, decay_style="cosine", decay_steps=4, clip_grad=1.0)
    bundle = build_optimizer(opt_cfg, chunks, rt, distributed=True, total_steps=4)
    step = TrainStep(chunks, bundle, rt, micro_batch_tokens=12)
    loss_fn = sft_loss_fn(model_cfg.vocab_size, rt.tp_group)
    samples = _samples()[rt.dp_rank::rt.dp_size]
    layout_meta = {"tp": rt.tp_size, "pp": rt.pp_size, "dp": rt.dp_size, "world": world}
    mgr = CheckpointManager(CheckpointConfig(dir=ckpt_dir, keep_last=2), layout=layout_meta)
    if mode == "save":
        for _ in range(2):
            step(samples, loss_fn)
        mgr.save(2, chunks, bundle.optimizer, {"scheduler": bundle.scheduler.state_dict()})
    else:
        path = mgr.find_latest_valid()
        loaded = mgr.load(path, chunks, bundle.optimizer)
        assert loaded.step == 2
        bundle.scheduler.load_state_dict(loaded.trainer_state["scheduler"])
    result = step(samples, loss_fn)
    named = dict(named_global_parameters(chunks))
    params = gather_full({k: p.data for k, p in named.items()}, named, rt.tp_rank, rt.tp_size)
    if rt.pp_size > 1:  # each stage holds its own layers: collect them on rank 0
        import torch.distributed as dist

        box = [None] * rt.pp_size
        dist.all_gather_object(box, params, group=rt.pp_group)
        params = {k: v for part in box for k, v in part.items()}
    return {"params": params, "loss": result.loss, "lr": result.lr} if rank == 0 else None


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("ckpt"))
    out = run_ranks(run, 2, args=("tp2", "save", ckpt))[0]
    return ckpt, out


def test_checkpoint_is_complete_and_atomic(uninterrupted):
    from r1mega.train.checkpoint import list_checkpoints, verify_checkpoint

    ckpt, _ = uninterrupted
    [(step, path)] = list_checkpoints(ckpt)
    assert step == 2 and verify_checkpoint(path) is None
    assert not [n for n in os.listdir(ckpt) if n.startswith(".tmp")]
    for part in ("model", "optimizer", "trainer.json", "manifest.json", "rank_00000.pt", "rank_00001.pt"):
        assert os.path.exists(os.path.join(path, part)), part


def test_resume_same_layout_is_bit_identical(uninterrupted):
    ckpt, ref = uninterrupted
    got = run_ranks(run, 2, args=("tp2", "resume", ckpt))[0]
    assert got["loss"] == ref["loss"] and got["lr"] == ref["lr"]
    for k, v in ref["params"].items():
        assert torch.equal(got["params"][k], v), k


@pytest.mark.parametrize("layout", ["dp2", "pp2"])
def test_resume_onto_another_layout(uninterrupted, layout):
    ckpt, ref = uninterrupted
    got = run_ranks(run, 2, args=(layout, "resume", ckpt))[0]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert set(got["params"]) == set(ref["params"])
    for k, v in ref["params"].items():
        torch.testing.assert_close(got["params"][k], v, atol=1e-5, rtol=1e-4, msg=k)
