"""Checkpoint round trip of the lean optimizer state (int16 remainders, bf16 moments, step) through
megatron's FP32Optimizer.sharded_state_dict and dist_checkpointing: save after 2 steps, resume a
differently initialised model, and the 3rd step equals the uninterrupted run's bit for bit."""
from __future__ import annotations

import pytest
import torch


def _build(single_rank_runtime, init_seed, master_weights="bf16_remainder", moments="bf16"):
    from r1mega.config import ModelConfig, OptimizerConfig, ParallelConfig, PrecisionConfig
    from r1mega.models.gpt import build_model
    from r1mega.train.optimizer import build_optimizer
    from r1mega.train.step import TrainStep, sft_loss_fn, sft_sample

    prec = PrecisionConfig(dtype="bf16", grad_reduce_in_fp32=False)
    rt = single_rank_runtime(parallel=ParallelConfig(distributed_optimizer=False, seed=init_seed),
                             precision=prec)
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=64, vocab_size=64)
    torch.manual_seed(init_seed)
    chunks = build_model(cfg, rt, prec, wrap=True, distributed_optimizer=False)
    opt = OptimizerConfig(lr=1e-2, weight_decay=0.01, clip_grad=1.0,
                          master_weights=master_weights, moments_dtype=moments)
    bundle = build_optimizer(opt, chunks, rt, distributed=False)
    step = TrainStep(chunks, bundle, rt, micro_batch_tokens=64)
    g = torch.Generator().manual_seed(2)
    samples = [sft_sample(torch.randint(0, 64, (24,), generator=g)) for _ in range(2)]
    return chunks, bundle, lambda: step(samples, sft_loss_fn(cfg.vocab_size)).loss


def _snapshot(chunks, bundle):
    lean = bundle.optimizer.chained_optimizers[0].optimizer
    params = [p.detach().clone() for p in chunks[0].parameters()]
    state = [{k: v.clone() for k, v in lean.state[p].items()}
             for g in lean.param_groups for p in g["params"]]
    return params, state


@pytest.mark.parametrize("master_weights,moments", [("bf16_remainder", "bf16"),
                                                    ("bf16_stochastic", "fp32")])
def test_save_load_resume_equals_uninterrupted(single_rank_runtime, tmp_path, master_weights, moments):
    from r1mega.config import CheckpointConfig
    from r1mega.parallel.runtime import destroy_parallel
    from r1mega.train.checkpoint import CheckpointManager

    mgr = CheckpointManager(CheckpointConfig(dir=str(tmp_path), keep_last=2), layout={"world": 1})
    chunks, bundle, one = _build(single_rank_runtime, 1, master_weights, moments)
    for _ in range(2):
        one()
    mgr.save(2, chunks, bundle.optimizer, {})
    saved_params, saved_state = _snapshot(chunks, bundle)
    one()
    want_params, want_state = _snapshot(chunks, bundle)
    destroy_parallel()

    chunks, bundle, one = _build(single_rank_runtime, 99, master_weights, moments)
    mgr.load(mgr.find_latest_valid(), chunks, bundle.optimizer)
    got_params, got_state = _snapshot(chunks, bundle)
    for a, b in zip(got_params, saved_params):
        assert torch.equal(a, b)
    for a, b in zip(got_state, saved_state):
        assert {k: v.dtype for k, v in a.items()} == {k: v.dtype for k, v in b.items()}
        for k in b:
            assert torch.equal(a[k], b[k]), k
    one()
    got_params, got_state = _snapshot(chunks, bundle)
    for a, b in zip(got_params, want_params):
        assert torch.equal(a, b)
    for a, b in zip(got_state, want_state):
        for k in b:
            assert torch.equal(a[k], b[k]), k


def test_resuming_other_modes_is_refused(single_rank_runtime, tmp_path):
    from r1mega.config import CheckpointConfig
    from r1mega.parallel.runtime import destroy_parallel
    from r1mega.train.checkpoint import CheckpointManager

    mgr = CheckpointManager(CheckpointConfig(dir=str(tmp_path)), layout={"world": 1})
    chunks, bundle, one = _build(single_rank_runtime, 1, "bf16_stochastic", "fp32")
    one()
    mgr.save(1, chunks, bundle.optimizer, {})
    destroy_parallel()
    chunks, bundle, _ = _build(single_rank_runtime, 1, "bf16_remainder", "fp32")
    with pytest.raises(Exception, match="optimizer.master_weights"):
        mgr.load(mgr.find_latest_valid(), chunks, bundle.optimizer)


def test_resuming_with_bf16_moments_rounds_the_saved_fp32_moments(single_rank_runtime, tmp_path):
    from r1mega.config import CheckpointConfig
    from r1mega.parallel.runtime import destroy_parallel
    from r1mega.train.checkpoint import CheckpointManager

    mgr = CheckpointManager(CheckpointConfig(dir=str(tmp_path)), layout={"world": 1})
    chunks, bundle, one = _build(single_rank_runtime, 1, "bf16_remainder", "fp32")
    one()
    mgr.save(1, chunks, bundle.optimizer, {})
    _, saved = _snapshot(chunks, bundle)
    destroy_parallel()
    chunks, bundle, _ = _build(single_rank_runtime, 5, "bf16_remainder", "bf16")
    mgr.load(mgr.find_latest_valid(), chunks, bundle.optimizer)
    _, got = _snapshot(chunks, bundle)
    for a, b in zip(got, saved):
        assert a["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(a["exp_avg"], b["exp_avg"].to(torch.bfloat16))
        assert torch.equal(a["remainder"], b["remainder"])
