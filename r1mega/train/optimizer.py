"""Optimizer + learning-rate schedule from ``cfg.optimizer``: megatron's (distributed) optimizer.

The distributed optimizer shards fp32 master weights and Adam moments over the DP group (ZeRO-1);
with bf16 params the model weights stay bf16 and the masters fp32. Gradient clipping is the
optimizer's (global norm across TP/PP/DP). The schedule is megatron's OptimizerParamScheduler,
stepped once per optimizer step *before* the update, so step 1 of a warmup uses lr/warmup rather
than a wasted lr=0 step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from r1mega.config import OptimizerConfig
from r1mega.parallel.runtime import ParallelRuntime


@dataclass
class OptimizerBundle:
    optimizer: Any  # megatron MegatronOptimizer (or ChainedOptimizer)
    scheduler: OptimizerParamScheduler

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def megatron_optimizer_config(opt: OptimizerConfig, rt: ParallelRuntime,
                              distributed: bool) -> MegatronOptimizerConfig:
    if opt.name not in ("adam", "adamw", "sgd"):
        raise ValueError(f"optimizer.name={opt.name!r}: use 'adam' (decoupled weight decay) or 'sgd'.")
    return MegatronOptimizerConfig(
        optimizer="sgd" if opt.name == "sgd" else "adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=rt.dtype == torch.bfloat16,
        fp16=rt.dtype == torch.float16,
        params_dtype=rt.dtype,
        use_distributed_optimizer=distributed,
    )


def build_scheduler(opt: OptimizerConfig, optimizer, total_steps: int) -> OptimizerParamScheduler:
    warmup = max(0, opt.warmup_steps)
    decay = opt.decay_steps or max(total_steps, 1)
    # megatron asserts warmup < decay; a constant schedule does not care about the decay length.
    decay = max(decay, warmup + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else opt.lr,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        lr_decay_style=opt.decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
    )


def build_optimizer(opt: OptimizerConfig, model_chunks: list, rt: ParallelRuntime, *,
                    distributed: bool = True, total_steps: int = 1,
                    pg_collection: Optional[Any] = None) -> OptimizerBundle:
    """Optimizer over DDP-wrapped ``model_chunks`` (from ``build_model(..., wrap=True)``).

    ``distributed`` must match the DDP wrapping's ``use_distributed_optimizer``.
    """
    for chunk in model_chunks:
        ddp_cfg = getattr(chunk, "ddp_config", None)
        if ddp_cfg is None:
            raise ValueError("build_optimizer needs DDP-wrapped chunks: build_model(..., wrap=True).")
        if ddp_cfg.use_distributed_optimizer != distributed:
            raise ValueError(
                f"parallel.distributed_optimizer={distributed} but the model was wrapped with "
                f"use_distributed_optimizer={ddp_cfg.use_distributed_optimizer}; build both from "
                f"the same setting.")
    lean = opt.master_weights != "fp32" or opt.moments_dtype != "fp32"
    if lean:
        check_lean_setup(opt, model_chunks, rt, distributed)
    config = megatron_optimizer_config(opt, rt, distributed)
    if opt.master_weights != "fp32":
        # No fp32 copy: megatron's FP32Optimizer hands the bf16 params (and their bf16 DDP
        # grads) straight to LeanAdamW, which keeps the master's low bits itself (or none).
        config.bf16 = config.fp16 = False
    optimizer = get_megatron_optimizer(config, model_chunks, pg_collection=pg_collection)
    count_expert_grads_once(optimizer, rt)
    if lean:
        from r1mega.train.lean_adam import replace_inner_adam

        # One seed on every rank: data-parallel replicas draw the same stochastic roundings.
        replace_inner_adam(optimizer, opt.master_weights, opt.moments_dtype, seed=0)
        if opt.master_weights != "fp32":
            from r1mega.precision.linear import weight_amax_from_optimizers
            from r1mega.train.lean_adam import lean_optimizers

            # Tensorwise FP8 weights take max |w| from the step that wrote them.
            weight_amax_from_optimizers(model_chunks, lean_optimizers(optimizer))
    elif rt.device.type == "cuda":
        use_fused_adam(optimizer)
    return OptimizerBundle(optimizer, build_scheduler(opt, optimizer, total_steps))


def check_lean_setup(opt: OptimizerConfig, model_chunks: list, rt: ParallelRuntime,
                     distributed: bool) -> None:
    """The build-time half of config_checks.validate_lean_optimizer (the runtime's dtype and the
    DDP wrapping are only known here)."""
    if distributed:
        raise ValueError(
            f"optimizer.master_weights={opt.master_weights}, optimizer.moments_dtype="
            f"{opt.moments_dtype} is implemented for the non-distributed optimizer only (megatron's "
            f"distributed optimizer shards fp32 masters); set parallel.distributed_optimizer=false.")
    if opt.master_weights == "fp32":
        return
    if rt.dtype != torch.bfloat16:
        raise ValueError(f"optimizer.master_weights={opt.master_weights} needs bf16 parameters, the "
                         f"runtime's dtype is {rt.dtype}; set precision.dtype=bf16.")
    for chunk in model_chunks:
        if chunk.ddp_config.grad_reduce_in_fp32:
            raise ValueError(f"optimizer.master_weights={opt.master_weights} steps from the bf16 "
                             f"grad buffer, but the model was wrapped with grad_reduce_in_fp32=True; "
                             f"set precision.grad_reduce_in_fp32=false.")


def count_expert_grads_once(optimizer, rt: ParallelRuntime) -> None:
    """Give the expert-parallel sub-optimizer the expert-TP group (size 1: experts are never
    split over TP) for its grad-norm and zero counts. megatron hands every sub-optimizer the
    dense TP group, so a TP rank > 0 would skip its experts as "TP duplicates"; with EP > 1 they
    are other experts than TP rank 0's (and under the distributed optimizer each element is
    owned by one expert-DP rank), so the clip norm would miss them."""
    if rt.tp_size == 1 or rt.ep_size == 1:
        return
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        groups = sub.optimizer.param_groups if sub.optimizer is not None else []
        if groups and all(g.get("is_expert_parallel", False) for g in groups):
            sub.tp_group = rt.pg_collection.expt_tp


def use_fused_adam(optimizer) -> None:
    """Without TE/apex megatron falls back to torch AdamW in its default multi-tensor (foreach)
    mode; torch's single-kernel fused AdamW does the same update with fewer passes over memory."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, (torch.optim.AdamW, torch.optim.Adam)):
            for group in inner.param_groups:
                group["foreach"], group["fused"] = False, True
