"""The MoE dispatch kernels (r1mega_moe_cuda) as torch custom ops, so that ``torch.compile``
traces an MoE layer as one graph instead of breaking at every pybind call. Each op has a fake
implementation (output shapes and dtypes from the inputs' shapes alone: the permuted buffer's
row count is fixed by the routing shape, see ``num_permuted_rows``). r1mega/moe/dispatch.py calls
these under compilation and the extension's functions directly otherwise (a custom op costs host
time per call in eager mode). Same argument order and results as the extension's functions.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from r1mega.moe import _cuda_ext


@torch.library.custom_op("r1mega::moe_routing_metadata", mutates_args=())
def _routing_metadata(indices: Tensor, num_experts: int, align: int,
                      num_rows: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out = _cuda_ext.get().routing_metadata(indices, num_experts, align, num_rows)
    # The kernel returns views of one buffer; a custom op's outputs must not alias.
    return tuple(t.clone() for t in out)


@_routing_metadata.register_fake
def _(indices, num_experts, align, num_rows):
    i32 = dict(dtype=torch.int32, device=indices.device)
    return (torch.empty(num_experts, **i32), torch.empty(num_experts + 1, **i32),
            torch.empty(indices.shape, **i32), torch.empty(num_rows, **i32))


@torch.library.custom_op("r1mega::moe_permute", mutates_args=())
def _permute(x: Tensor, row_map: Tensor, src_entry: Tensor) -> Tensor:
    return _cuda_ext.get().permute(x, row_map, src_entry)


@_permute.register_fake
def _(x, row_map, src_entry):
    return x.new_empty((src_entry.shape[0], x.shape[1]))


@torch.library.custom_op("r1mega::moe_unpermute", mutates_args=())
def _unpermute(y: Tensor, row_map: Tensor, src_entry: Tensor, weights: Optional[Tensor]) -> Tensor:
    return _cuda_ext.get().unpermute(y, row_map, src_entry, weights)


@_unpermute.register_fake
def _(y, row_map, src_entry, weights):
    return y.new_empty((row_map.shape[0], y.shape[1]))


@torch.library.custom_op("r1mega::moe_unpermute_backward", mutates_args=())
def _unpermute_backward(grad_out: Tensor, y: Tensor, row_map: Tensor, weights: Tensor,
                        src_entry: Tensor) -> tuple[Tensor, Tensor]:
    grad_y, grad_w = _cuda_ext.get().unpermute_backward(grad_out, y, row_map, weights, src_entry)
    return grad_y, grad_w


@_unpermute_backward.register_fake
def _(grad_out, y, row_map, weights, src_entry):
    return torch.empty_like(y), torch.empty_like(weights)


def routing_metadata(indices, num_experts, align, num_rows):
    return torch.ops.r1mega.moe_routing_metadata(indices, num_experts, align, num_rows)


def permute(x, row_map, src_entry):
    return torch.ops.r1mega.moe_permute(x, row_map, src_entry)


def unpermute(y, row_map, src_entry, weights):
    return torch.ops.r1mega.moe_unpermute(y, row_map, src_entry, weights)


def unpermute_backward(grad_out, y, row_map, weights, src_entry):
    return torch.ops.r1mega.moe_unpermute_backward(grad_out, y, row_map, weights, src_entry)
