"""megatron's DistributedDataParallel whose gradient buffers are written by each parameter's first
gradient of a step instead of zeroed at the start of the step and added to.

megatron zeroes every grad buffer before the forward (``zero_grad_buffer``) and its backward hook
adds each gradient in (``main_grad.add_(grad)``): per parameter, one write to zero, then two
reads and a write. The first gradient of a step can be copied instead: one read and one write,
and no pass over the buffer at all before the forward. On a model with many more parameters
than the step's activations (a mixture of experts: 3.2 B of qwen3-moe-small's 4.0 B parameters
are routed experts), those passes are a visible share of the step.

Nothing downstream can tell: a parameter whose hook did not run this step (no gradient) has its
``main_grad`` zeroed before the first gradient sync, which is where megatron's reductions, the
finalize step and the optimizer start reading the buffers. Padding between parameters in a
bucket is never written by a hook, so it keeps the zeros it was allocated with. Modules that
accumulate into ``main_grad`` themselves (Transformer Engine's fused weight-gradient GEMMs under
``gradient_accumulation_fusion``) need the zeroed buffer, and get megatron's behaviour.
"""
from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel
from megatron.core.transformer.cuda_graphs import is_graph_capturing


class FirstWriteDDP(DistributedDataParallel):
    """:class:`DistributedDataParallel` with first-write gradient buffers (module docstring)."""

    def __init__(self, config, ddp_config, module, **kwargs):
        self._fresh: set = set()  # parameters whose buffer still holds the previous step's grad
        self.first_write = not getattr(config, "gradient_accumulation_fusion", False)
        super().__init__(config=config, ddp_config=ddp_config, module=module, **kwargs)

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

    def start_grad_sync(self, *unused):
        self._zero_unwritten()
        return super().start_grad_sync(*unused)

    def finish_grad_sync(self, *args, **kwargs):
        self._zero_unwritten()
        return super().finish_grad_sync(*args, **kwargs)
