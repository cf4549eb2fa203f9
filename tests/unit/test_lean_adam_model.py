"""The lean optimizer wired through build_optimizer + TrainStep on a tiny bf16 GPT (CPU): the
independent reference is today's path, megatron's fp32-master optimizer with torch AdamW."""
from __future__ import annotations

import pytest
import torch

from r1mega.train.lean_adam_math import join_master


def _setup(single_rank_runtime, master_weights="fp32", moments="fp32", clip=0.0, lr=1e-2,
           fold=None, fp8_recipe=None):
    from r1mega.config import ModelConfig, OptimizerConfig, ParallelConfig, PrecisionConfig
    from r1mega.models.gpt import build_model
    from r1mega.train.optimizer import build_optimizer
    from r1mega.train.step import TrainStep, sft_loss_fn, sft_sample

    prec = PrecisionConfig(dtype="bf16", grad_reduce_in_fp32=False)
    if fp8_recipe:   # native FP8 linears, emulated on the CPU
        prec = PrecisionConfig(dtype="bf16", grad_reduce_in_fp32=False, fp8=True, fp8_emulate=True,
                               fp8_backend="native", fp8_recipe=fp8_recipe)
    rt = single_rank_runtime(parallel=ParallelConfig(distributed_optimizer=False), precision=prec)
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=64, vocab_size=64)
    torch.manual_seed(0)
    chunks = build_model(cfg, rt, prec, wrap=True, distributed_optimizer=False)
    opt = OptimizerConfig(lr=lr, weight_decay=0.01, clip_grad=clip, master_weights=master_weights,
                          moments_dtype=moments)
    bundle = build_optimizer(opt, chunks, rt, distributed=False)
    from r1mega.train.lean_adam import lean_optimizers

    for lean in lean_optimizers(bundle.optimizer):
        lean.fold_token_scale = fold
    step = TrainStep(chunks, bundle, rt, micro_batch_tokens=64)
    bundle.token_scale_folded = step._token_scale is not None
    g = torch.Generator().manual_seed(2)
    samples = [sft_sample(torch.randint(0, 64, (24,), generator=g)) for _ in range(2)]
    def one():
        result = step(samples, sft_loss_fn(cfg.vocab_size))
        bundle.grad_norms = getattr(bundle, "grad_norms", []) + [float(result.grad_norm)]
        return result.loss

    return chunks, bundle, one


def _run(single_rank_runtime, steps, **kw):
    from r1mega.parallel.runtime import destroy_parallel

    chunks, bundle, one = _setup(single_rank_runtime, **kw)
    losses = [float(one()) for _ in range(steps)]
    params = [p.detach().clone() for p in chunks[0].parameters()]
    destroy_parallel()  # the next run of the same test starts its own world
    return losses, params, bundle


def _masters(bundle) -> list:
    """fp32 masters of the reference (megatron's Float16Optimizer) in model-parameter order."""
    opt = bundle.optimizer.chained_optimizers[0]
    return [m for group in opt.fp32_from_float16_groups for m in group]


def test_remainder_mode_equals_the_fp32_master_path(single_rank_runtime):
    ref_losses, ref_params, ref_bundle = _run(single_rank_runtime, 4)
    ref_masters = [m.detach().clone() for m in _masters(ref_bundle)]
    # A master whose low 16 bits are exactly 0x8000 is a tie: there the model sees the
    # neighbour away from zero instead of the even one (lean_adam_math.py says why), and the runs
    # part ways. None occurs in this run; if a change of model or data made one, this names it.
    ties = sum(int(((m.view(torch.int32) & 0xFFFF) == 0x8000).sum()) for m in ref_masters)
    assert ties == 0, f"{ties} exact bf16 ties in the reference masters: pick other data"
    losses, params, bundle = _run(single_rank_runtime, 4, master_weights="bf16_remainder")
    assert losses == ref_losses
    for a, b in zip(params, ref_params):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    lean = bundle.optimizer.chained_optimizers[0].optimizer
    ours = [join_master(p, lean.state[p]["remainder"]) for g in lean.param_groups for p in g["params"]]
    assert len(ours) == len(ref_masters)
    for a, b in zip(ours, ref_masters):  # the same megatron param groups, in the same order
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    # No fp32 copy and no fp32 gradient anywhere in the lean optimizer's state.
    for p in (p for g in lean.param_groups for p in g["params"]):
        assert p.dtype == torch.bfloat16 and p.main_grad.dtype == torch.bfloat16
        assert {k: v.dtype for k, v in lean.state[p].items()} == {
            "step": torch.float32, "exp_avg": torch.float32, "exp_avg_sq": torch.float32,
            "remainder": torch.int16}


def test_bf16_moments_and_clipping_stay_close_to_the_fp32_master_path(single_rank_runtime):
    ref_losses, ref_params, _ = _run(single_rank_runtime, 4, clip=0.5)
    losses, params, bundle = _run(single_rank_runtime, 4, clip=0.5, master_weights="bf16_remainder",
                                  moments="bf16")
    assert losses[0] == ref_losses[0]
    assert losses == pytest.approx(ref_losses, rel=1e-2)
    diff = sum((a.float() - b.float()).norm() ** 2 for a, b in zip(params, ref_params)) ** 0.5
    size = sum(b.float().norm() ** 2 for b in ref_params) ** 0.5
    assert diff / size < 5e-3, diff / size


@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_stochastic_mode_trains(single_rank_runtime, moments):
    losses, params, bundle = _run(single_rank_runtime, 8, master_weights="bf16_stochastic",
                                  moments=moments, lr=3e-3)
    lean = bundle.optimizer.chained_optimizers[0].optimizer
    assert all("remainder" not in s for s in lean.state.values())
    assert losses[-1] < losses[0] - 0.1, losses


def test_token_scale_folded_into_the_update_matches_the_scaled_buffer(single_rank_runtime):
    """The CUDA default (fold_token_scale): 1/tokens goes into grad_scale, the buffer is never
    scaled; same training to bf16 rounding of the (no longer rounded) scaled gradients."""
    ref_losses, ref_params, ref_bundle = _run(single_rank_runtime, 4, clip=0.5,
                                              master_weights="bf16_remainder", fold=False)
    losses, params, bundle = _run(single_rank_runtime, 4, clip=0.5, master_weights="bf16_remainder",
                                  fold=True)
    assert bundle.token_scale_folded and not ref_bundle.token_scale_folded
    # The clip saw the scaled gradients' norm (1/tokens applied), not the raw sums'.
    assert bundle.grad_norms == pytest.approx(ref_bundle.grad_norms, rel=1e-2)
    assert min(ref_bundle.grad_norms) > 0.5, ref_bundle.grad_norms  # the clip was active
    assert losses[0] == ref_losses[0]
    assert losses == pytest.approx(ref_losses, rel=1e-3)
    diff = sum((a.float() - b.float()).norm() ** 2 for a, b in zip(params, ref_params)) ** 0.5
    size = sum(b.float().norm() ** 2 for b in ref_params) ** 0.5
    assert diff / size < 2e-3, diff / size


def _trajectory(single_rank_runtime, steps, **kw):
    """Per step: the loss, the parameters after the update, and the reference's bf16 ties."""
    from r1mega.parallel.runtime import destroy_parallel

    chunks, bundle, one = _setup(single_rank_runtime, **kw)
    losses, params, ties = [], [], []
    for _ in range(steps):
        losses.append(float(one()))
        params.append([p.detach().clone() for p in chunks[0].parameters()])
        if kw.get("master_weights", "fp32") == "fp32":
            ties.append(sum(int(((m.view(torch.int32) & 0xFFFF) == 0x8000).sum())
                            for m in _masters(bundle)))
    destroy_parallel()
    return losses, params, ties


@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise"])
def test_fp8_with_bf16_masters_equals_fp8_with_fp32_masters(single_rank_runtime, recipe):
    """bf16 master weights (the remainder mode) under FP8 linears: the FP8 copies are re-derived
    from the bf16 weights after every update, so the run equals the fp32-master FP8 run bit for
    bit, as it does without FP8, up to the first update that leaves a master on an exact bf16
    tie (there the remainder mode rounds away from zero, lean_adam_math.py says why)."""
    ref_losses, ref_params, ties = _trajectory(single_rank_runtime, 4, fp8_recipe=recipe)
    losses, params, _ = _trajectory(single_rank_runtime, 4, master_weights="bf16_remainder",
                                    fp8_recipe=recipe)
    clean = next((k for k, t in enumerate(ties) if t), len(ties))   # updates before the first tie
    assert clean >= 2, f"ties after the updates: {ties}; pick other data"
    for k in range(clean):
        for a, b in zip(params[k], ref_params[k]):
            assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    n = min(clean + 1, len(losses))              # a loss reads the weights of the update before
    assert losses[:n] == ref_losses[:n] and losses[-1] < losses[0]
    # FP8 really ran: the same run without FP8 gives other losses
    bf16_losses, _, _ = _trajectory(single_rank_runtime, 2, master_weights="bf16_remainder")
    assert bf16_losses != losses[:2]
