"""megatron's DistributedDataParallel whose gradient buffers are written by each parameter's first
gradient of a step instead of zeroed at the start of the step and added to.

megatron zeroes every grad buffer before the forward (``zero_grad_buffer``) and its backward hook
adds each gradient in (``main_grad.add_(grad)``): per parameter, one write to zero, then two
reads and a write. The first gradient of a step can be copied instead: one read and one write,
and no pass over the buffer at all before the forward. On a model with many more parameters
than the step's activations (a mixture of experts: 3.6 B of qwen3-moe-small's 4.0 B parameters
are routed experts), those passes are a visible share of the step.

Nothing downstream can tell: a parameter whose hook did not run this step (no gradient) has its
``main_grad`` zeroed before the first gradient sync, which is where megatron's reductions, the
finalize step and the optimizer start reading the buffers. Padding between parameters in a
bucket is never written by a hook, so it keeps the zeros it was allocated with. Modules that
accumulate into ``main_grad`` themselves (Transformer Engine's fused weight-gradient GEMMs under
``gradient_accumulation_fusion``) need the zeroed buffer, and get megatron's behaviour.

Routed-expert weights whose gradients no collective reads (their reduction group has one rank:
one GPU, or expert parallelism as wide as data parallelism) stay out of the buffers altogether:
autograd's first gradient of a step becomes ``param.grad`` as it is (the grouped GEMM's output,
no copy) and the optimizer reads it there, as megatron's optimizers do for a parameter without
``main_grad``. The first-write copy would otherwise move every expert gradient once more (3.6 B
of qwen3-moe-small's parameters). The token-count scale and the zero gradient of a parameter
missing from a step's forward are applied to them as to the buffers.
"""
from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel
from megatron.core.transformer.cuda_graphs import is_graph_capturing


def _group_size(group) -> int:
    if group is None or not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size(group)


def unbuffered_expert_params(config, ddp_config, module, pg_collection) -> list:
    """The routed-expert weights of ``module`` that may keep their gradient outside megatron's
    buffers: nothing reduces it (its data-parallel group, or the expert-data-parallel group for
    expert-parallel weights, has one rank), finalize_model_grads reads nothing of it (no
    tensor-parallel sum), the buffer would not change its dtype or scale it, and the optimizer
    is not megatron's distributed one (which addresses the buffers)."""
    from r1mega.moe.experts import GroupedExperts

    if (getattr(config, "gradient_accumulation_fusion", False) or ddp_config.use_distributed_optimizer
            or not getattr(config, "calculate_per_token_loss", False) or pg_collection is None):
        return []
    out = []
    for m in module.modules():
        if not isinstance(m, GroupedExperts):
            continue
        for p in m.parameters():
            group = pg_collection.dp_cp if getattr(p, "allreduce", True) else pg_collection.expt_dp
            if (p.requires_grad and _group_size(group) == 1
                    and not getattr(p, "sequence_parallel", False)
                    and not getattr(p, "average_gradients_across_tp_domain", False)
                    and (not ddp_config.grad_reduce_in_fp32 or p.dtype == torch.float32)):
                out.append(p)
    return out


def step_grad(param: torch.nn.Parameter):
    """A parameter's gradient of the step wherever :class:`FirstWriteDDP` keeps it: megatron's
    buffer (``main_grad``), or ``grad`` for an unbuffered expert weight."""
    return param.main_grad if hasattr(param, "main_grad") else param.grad


class FirstWriteDDP(DistributedDataParallel):
    """:class:`DistributedDataParallel` with first-write gradient buffers and unbuffered routed
    experts where nothing reduces their gradients (module docstring)."""

    def __init__(self, config, ddp_config, module, unbuffered_experts: bool = True, **kwargs):
        self._fresh: set = set()  # parameters whose buffer still holds the previous step's grad
        self.first_write = not getattr(config, "gradient_accumulation_fusion", False)
        self.unbuffered = (unbuffered_expert_params(config, ddp_config, module, kwargs.get("pg_collection"))
                           if unbuffered_experts else [])
        for p in self.unbuffered:  # megatron builds buffers and hooks for trainable ones only
            p.requires_grad_(False)
        try:
            super().__init__(config=config, ddp_config=ddp_config, module=module, **kwargs)
        finally:
            for p in self.unbuffered:
                p.requires_grad_(True)

    def _make_backward_post_hook(self, param: torch.nn.Parameter):
        accumulate = super()._make_backward_post_hook(param)

        def hook(*unused):
            if param not in self._fresh or param.grad is None or is_graph_capturing():
                return accumulate(*unused)  # no gradient yet: still fresh, zeroed at the sync
            if param.grad_added_to_main_grad:
                raise RuntimeError(
                    f"FirstWriteDDP: a module added into main_grad of a parameter of shape "
                    f"{tuple(param.shape)} before its first gradient of the step, on top of the "
                    f"last step's values; such modules need megatron's zeroed buffers "
                    f"(config.gradient_accumulation_fusion=True selects them)")
            self._fresh.discard(param)
            param.main_grad.copy_(param.grad.data)
            # megatron's hook then skips its add and does the rest (releases the grad, marks the
            # bucket ready); later micro-batches of the step add as before. zero_out_wgrad (the
            # last stage's copy of tied embeddings) would make it add regardless.
            zero_out = param.__dict__.get("zero_out_wgrad")
            param.grad_added_to_main_grad, param.zero_out_wgrad = True, False
            try:
                return accumulate(*unused)
            finally:
                param.grad_added_to_main_grad = False
                if zero_out is None:
                    del param.zero_out_wgrad
                else:
                    param.zero_out_wgrad = zero_out

        return hook

    def zero_grad_buffer(self):
        if not self.first_write:
            return super().zero_grad_buffer()
        for param in self.params_with_grad:
            param.grad_added_to_main_grad = False
        for bucket_group in self.bucket_groups + self.expert_parallel_bucket_groups:
            bucket_group.reset()
        self._fresh = {p for p in self.params_with_grad if p in self.param_to_bucket_group}

    def _zero_unwritten(self) -> None:
        """Parameters without a gradient this step: megatron's buffer would hold zeros."""
        for param in self._fresh:
            param.main_grad.zero_()
        self._fresh = set()
        for param in self.unbuffered:
            if param.grad is None:
                param.grad = torch.zeros_like(param)

    def scale_gradients(self, scaling_factor) -> None:
        super().scale_gradients(scaling_factor)
        for param in self.unbuffered:
            if param.grad is not None:
                param.grad *= scaling_factor

    def start_grad_sync(self, *unused):
        self._zero_unwritten()
        return super().start_grad_sync(*unused)

    def finish_grad_sync(self, *args, **kwargs):
        self._zero_unwritten()
        return super().finish_grad_sync(*args, **kwargs)
