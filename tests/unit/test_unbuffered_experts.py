"""Routed-expert gradients kept out of megatron's grad buffers where nothing reduces them
(r1mega/models/ddp.py). The independent reference is the same model trained through the buffers
(megatron's path: every gradient in ``main_grad``): losses, gradient norms and parameters after
several steps of several micro-batches must be the same bits, for the fp32-master optimizer
(megatron's Float16Optimizer and FP32Optimizer with torch AdamW) and for the lean one."""
from __future__ import annotations

import pytest
import torch

STEPS = 3


def _model_cfg():
    from r1mega.config import ModelConfig

    return ModelConfig(family="qwen3_moe", num_layers=2, hidden_size=32, num_attention_heads=4,
                       num_query_groups=2, ffn_hidden_size=48, vocab_size=100, qk_norm=True,
                       spec="local", num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=24,
                       moe_shared_expert_ffn_hidden_size=16)


def _run(single_rank_runtime, monkeypatch, unbuffered: bool, dtype: str, master: str):
    from r1mega.config import OptimizerConfig, ParallelConfig, PrecisionConfig
    from r1mega.models import ddp
    from r1mega.models.gpt import build_model
    from r1mega.moe.experts import GroupedExperts
    from r1mega.parallel.runtime import destroy_parallel
    from r1mega.train.optimizer import build_optimizer
    from r1mega.train.step import TrainStep, sft_loss_fn, sft_sample

    if not unbuffered:
        monkeypatch.setattr(ddp, "unbuffered_expert_params", lambda *a, **k: [])
    prec = PrecisionConfig(dtype=dtype, grad_reduce_in_fp32=False)
    rt = single_rank_runtime(parallel=ParallelConfig(distributed_optimizer=False), precision=prec)
    cfg = _model_cfg()
    torch.manual_seed(0)
    chunks = build_model(cfg, rt, prec, wrap=True, distributed_optimizer=False)
    experts = [p for m in chunks[0].modules() if isinstance(m, GroupedExperts) for p in m.parameters()]
    buffered = {id(p) for b in chunks[0].buffers + chunks[0].expert_parallel_buffers for p in b.params}
    assert experts and all((id(p) in buffered) != unbuffered for p in experts)
    assert all(hasattr(p, "main_grad") != unbuffered for p in experts)
    assert all(id(p) in buffered for p in chunks[0].parameters() if all(p is not e for e in experts))
    opt = OptimizerConfig(lr=1e-2, weight_decay=0.01, clip_grad=0.5, master_weights=master,
                          moments_dtype="fp32" if master == "fp32" else "bf16")
    bundle = build_optimizer(opt, chunks, rt, distributed=False)
    step = TrainStep(chunks, bundle, rt, micro_batch_tokens=24)  # several micro-batches a step
    g = torch.Generator().manual_seed(2)
    samples = [sft_sample(torch.randint(0, 100, (n,), generator=g), prompt_tokens=2)
               for n in (5, 9, 3, 12, 7, 4, 10, 6)]
    results = [step(samples, sft_loss_fn(cfg.vocab_size)) for _ in range(STEPS)]
    out = ([float(r.loss) for r in results], [float(r.grad_norm) for r in results],
           [p.detach().clone() for p in chunks[0].parameters()])
    destroy_parallel()
    return out


@pytest.mark.parametrize("dtype,master", [("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16_stochastic")])
def test_unbuffered_experts_train_as_the_buffers_do(single_rank_runtime, monkeypatch, dtype, master):
    ref_losses, ref_norms, ref_params = _run(single_rank_runtime, monkeypatch, False, dtype, master)
    monkeypatch.undo()
    losses, norms, params = _run(single_rank_runtime, monkeypatch, True, dtype, master)
    if master == "fp32":  # megatron's optimizers: the norm sums the same tensors in the same order
        assert losses == ref_losses and norms == ref_norms
        for p, q in zip(params, ref_params):
            assert torch.equal(p, q)
    else:
        # the sync-free step's norm takes each buffer as one flat tensor (device_step.whole_buffers),
        # so without the experts in it the sum of squares is grouped otherwise: the norm (and
        # with it the clip's scale) may move in its last bits, and a stochastic rounding flip
        # with it, by one bf16 step
        assert norms == pytest.approx(ref_norms, rel=1e-6) and losses == pytest.approx(ref_losses, rel=1e-6)
        same = diff = 0
        for p, q in zip(params, ref_params):
            if p.dtype == torch.float32:  # the routers: the clip's scale in its last bits
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-8)
                continue
            step = torch.finfo(torch.bfloat16).eps * q.float().abs()
            assert ((p.float() - q.float()).abs() <= step).all()
            same, diff = same + int((p == q).sum()), diff + int((p != q).sum())
        assert diff <= 1e-3 * (same + diff), (diff, same)
    assert ref_norms[0] > 0.5  # the clip acted
    moved = [not torch.equal(p, q) for p, q in zip(params, _initial(single_rank_runtime, dtype))]
    assert sum(moved) == len(params)  # every parameter trained, experts included


def _initial(single_rank_runtime, dtype):
    from r1mega.config import ParallelConfig, PrecisionConfig
    from r1mega.models.gpt import build_model
    from r1mega.parallel.runtime import destroy_parallel

    prec = PrecisionConfig(dtype=dtype, grad_reduce_in_fp32=False)
    rt = single_rank_runtime(parallel=ParallelConfig(distributed_optimizer=False), precision=prec)
    torch.manual_seed(0)
    chunks = build_model(_model_cfg(), rt, prec, wrap=True, distributed_optimizer=False)
    out = [p.detach().clone() for p in chunks[0].parameters()]
    destroy_parallel()
    return out


def test_buffers_are_kept_where_something_reads_them(single_rank_runtime):
    """The distributed optimizer addresses the buffers; an fp32 grad buffer under bf16 weights
    changes the gradient's dtype: the experts stay buffered in both."""
    from r1mega.config import ParallelConfig, PrecisionConfig
    from r1mega.models.gpt import build_model
    from r1mega.parallel.runtime import destroy_parallel

    for distributed, fp32_grads in ((True, False), (False, True)):
        prec = PrecisionConfig(dtype="bf16", grad_reduce_in_fp32=fp32_grads)
        rt = single_rank_runtime(parallel=ParallelConfig(distributed_optimizer=distributed), precision=prec)
        chunks = build_model(_model_cfg(), rt, prec, wrap=True, distributed_optimizer=distributed)
        assert chunks[0].unbuffered == []
        assert all(hasattr(p, "main_grad") for p in chunks[0].parameters())
        destroy_parallel()
