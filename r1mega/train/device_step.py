"""The optimizer step with no host synchronisation, and a non-blocking read-back of its results.

megatron's step reads the global gradient norm on the host (``get_grad_norm_fp32`` ends in
``.item()``) to decide on clipping, and a skip-on-NaN guard has to read it too. Each read waits
for the GPU to drain its queue; after it the GPU idles while the host launches the clip, the
Adam update and the next step's first kernels (the figures: r1mega/bench/RECORDS.md).

torch's fused Adam/AdamW kernel takes two device tensors that remove the need to read anything:
``grad_scale`` (every gradient is divided by it) and ``found_inf`` (non-zero: the kernel leaves
parameters and moments alone and the step counters are rolled back). So the norm, the clip
factor and the skip decision stay on the device:

    norm      = sqrt(all_reduce_sum(||g||^2))             over megatron's grad-stats group
    ok        = isfinite(norm) and isfinite(loss)
    grad_scale = max(1, (norm + 1e-6) / clip_grad)         == 1 / megatron's clip_coeff when < 1
    found_inf = not ok

and megatron's ``step_with_ready_grads`` runs the inner optimizer and copies the main params back
as usual (a skipped step copies unchanged values). The step's scalars (ok, norm, token count,
loss and metric sums) go to pinned host memory with one queued copy; :class:`Readback` waits for
that copy (an event, not the whole stream) only when a value is first read.

Only for fused torch Adam/AdamW without a loss scaler (bf16/fp32); anything else takes the
host path in failures.py.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from r1mega.parallel.fused_fallbacks import foreach_l2_norm


class Readback:
    """A (n,) device vector copied to pinned host memory without blocking; read on first use.

    ``on_ready(values)`` runs once, when the values are first read (the step uses it to roll the
    learning-rate schedule back after a skipped update)."""

    def __init__(self, values: torch.Tensor, on_ready: Optional[Callable[[list], None]] = None):
        values = values.detach().reshape(-1)
        self._event = None
        if values.is_cuda:
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = values.clone()
        self._values: Optional[list] = None
        self._on_ready = on_ready

    @property
    def ready(self) -> bool:
        return self._values is not None

    def get(self) -> list:
        if self._values is None:
            if self._event is not None:
                self._event.synchronize()
            self._values = self._host.tolist()
            if self._on_ready is not None:
                cb, self._on_ready = self._on_ready, None
                cb(self._values)
        return self._values


def _optimizers(optimizer) -> list:
    return [o for o in (getattr(optimizer, "chained_optimizers", None) or [optimizer])
            if not getattr(o, "is_stub_optimizer", False)]


def sync_free_supported(optimizer) -> bool:
    """True when every (chained) optimizer is a fused torch Adam/AdamW or r1mega's LeanAdamW, with
    no loss scaler, and all of them reduce gradient statistics over one group (megatron's
    default)."""
    opts = _optimizers(optimizer)
    if not opts:
        return False
    from r1mega.train.lean_adam import LeanAdamW

    for o in opts:
        inner = getattr(o, "optimizer", None)
        if isinstance(inner, LeanAdamW):  # takes grad_scale/found_inf on every device
            continue
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            return False
        if not all(g.get("fused") for g in inner.param_groups):
            return False
        if getattr(o, "grad_scaler", None) is not None:
            return False
        if getattr(o.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
            return False
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained and len(chained) > 1 and not optimizer.grads_states_parallel_group_is_shared():
        return False
    return True


class DeferredGradScale:
    """The step's 1/global-token-count gradient scale, kept for the optimizer instead of applied
    to the grad buffer (one read and write of every gradient fewer). Only for optimizers that
    divide by a device ``grad_scale`` inside their update anyway (:func:`folds_token_scale`)."""

    def __init__(self):
        self.scale: Optional[torch.Tensor] = None

    def take(self) -> Optional[torch.Tensor]:
        scale, self.scale = self.scale, None
        return scale


def folds_token_scale(optimizer) -> bool:
    """True when every (chained) optimizer is a LeanAdamW that takes the token scale."""
    from r1mega.train.lean_adam import LeanAdamW

    opts = _optimizers(optimizer)
    return bool(opts) and all(isinstance(getattr(o, "optimizer", None), LeanAdamW)
                              and o.optimizer.folds_token_scale() for o in opts)


def whole_buffers(grads: list, buffers) -> list:
    """``grads`` with the members of each DDP grad buffer whose every parameter's ``main_grad`` is
    among them replaced by the buffer's flat ``grad_data``: one reduction instead of one per
    parameter. The padding between parameters holds zeros (never written), so the sum of
    squares is the same; a buffer holding a gradient the norm leaves out (a tensor-parallel
    duplicate, a tied copy) keeps its members one by one."""
    if not buffers or not grads:
        return grads
    index = {(g.data_ptr(), g.numel(), g.dtype): i for i, g in enumerate(grads)}
    flat, used = [], set()
    for buf in buffers:
        members = [index.get((p.main_grad.data_ptr(), p.main_grad.numel(), p.main_grad.dtype))
                   for p in buf.params]
        if members and None not in members:
            flat.append(buf.grad_data)
            used.update(members)
    return flat + [g for i, g in enumerate(grads) if i not in used]


@torch.no_grad()
def global_grad_norm(optimizer, device: torch.device, buffers=None) -> torch.Tensor:
    """(1,) float32 global L2 norm of the main gradients, on the device: megatron's
    ``get_grad_norm_fp32`` (same gradients, same group, same sum of squares) minus its read.
    ``buffers``: the model chunks' DDP grad buffers (:func:`whole_buffers`)."""
    grads = whole_buffers([g for o in _optimizers(optimizer) for g in o.get_main_grads_for_grad_norm()],
                          buffers)
    if grads:
        norm, _ = foreach_l2_norm(None, torch.zeros(1, dtype=torch.int, device=device), [grads], False)
        sq = norm.float() ** 2
    else:
        sq = torch.zeros(1, dtype=torch.float32, device=device)
    group = optimizer.get_grad_stats_parallel_group()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=group)
    return sq.sqrt()


@torch.no_grad()
def device_optimizer_step(optimizer, loss_finite: torch.Tensor, device: torch.device,
                          grad_prescale: Optional[torch.Tensor] = None, buffers=None):
    """Clip + Adam + copy-back with no host read. Returns device tensors (ok (1,) bool,
    grad_norm (1,) float32). ``loss_finite``: 0-d/1-elem bool tensor, the global loss's check.
    ``grad_prescale``: a multiplier the gradients have not had yet (DeferredGradScale); the norm
    is the scaled gradients', and the update divides by clip / prescale."""
    if optimizer.prepare_grads():  # only an fp16 loss scaler answers True; excluded above
        raise RuntimeError("device_optimizer_step needs an optimizer without a loss scaler")
    norm = global_grad_norm(optimizer, device, buffers)
    if grad_prescale is not None:
        grad_prescale = grad_prescale.reshape(1).to(device=device, dtype=torch.float32)
        norm = norm * grad_prescale
    ok = torch.isfinite(norm) & loss_finite.reshape(1).to(device=device, dtype=torch.bool)
    # 0-d: torch subtracts found_inf from the 0-d step counters in place.
    found_inf = (~ok).float().reshape(())
    one = torch.ones((), dtype=torch.float32, device=device)
    opts = _optimizers(optimizer)
    for o in opts:
        clip = float(o.config.clip_grad)
        scale = ((norm + 1.0e-6) / clip).clamp(min=1.0) if clip > 0.0 else one
        if grad_prescale is not None:
            scale = scale / grad_prescale
        # A NaN norm must not reach the kernel's division; the step is skipped anyway.
        o.optimizer.grad_scale = torch.where(ok, scale, one).reshape(())
        o.optimizer.found_inf = found_inf
    try:
        optimizer.step_with_ready_grads()
    finally:
        for o in opts:
            o.optimizer.grad_scale = None
            o.optimizer.found_inf = None
    return ok, norm
