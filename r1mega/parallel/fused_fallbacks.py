"""Multi-tensor fallbacks for megatron-core when neither Transformer Engine nor apex is installed.

megatron-core's own fallbacks (``megatron.core.utils.local_multi_tensor_l2_norm`` / ``..._scale``)
loop over the parameters in Python, and the l2 norm builds ``torch.tensor(list of device
scalars)``: one device-to-host synchronisation PER PARAMETER in every gradient-norm computation.
Each sync waits for the GPU to drain its queue. The
replacements below are the same math as ``torch._foreach_*`` calls: a handful of fused kernels and
no host synchronisation (megatron reads the final norm once, as with apex). They are installed only
where megatron fell back to its local versions; TE's or apex's kernels are left alone.
"""
from __future__ import annotations

import torch


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for ``amp_C.multi_tensor_l2norm``: (total l2 norm as a (1,) float32 tensor, None)."""
    tensors = [t for group in tensor_lists for t in group]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    # fp32 per-tensor norms: a bf16 grad buffer (grad_reduce_in_fp32=false, the lean optimizer)
    # would otherwise round each tensor's norm to bf16 before the sum (0.4% in the clip factor).
    norms = torch._foreach_norm(tensors, 2.0, dtype=torch.float32)
    total = torch.linalg.vector_norm(torch.stack(list(norms)))
    return total.reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for ``amp_C.multi_tensor_scale``: ``dst = src * scale`` over two tensor lists."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if not src:
        return
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def install() -> list[str]:
    """Replace megatron's local multi-tensor fallbacks (where in use); returns what was replaced."""
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads, optimizer

    replaced = []
    local_norm = getattr(mutils, "local_multi_tensor_l2_norm", None)
    local_scale = getattr(mutils, "local_multi_tensor_scale", None)
    for module in (clip_grads, optimizer):
        if local_norm is not None and getattr(module, "l2_norm_impl", None) is local_norm:
            module.l2_norm_impl = foreach_l2_norm
            replaced.append(f"{module.__name__}.l2_norm_impl")
        if local_scale is not None and getattr(module, "multi_tensor_scale_impl", None) is local_scale:
            module.multi_tensor_scale_impl = foreach_scale
            replaced.append(f"{module.__name__}.multi_tensor_scale_impl")
    return replaced
