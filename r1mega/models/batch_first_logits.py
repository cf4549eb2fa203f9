"""The output layer computed on batch-first hidden states, so that megatron's logits transpose is
free.

megatron's GPTModel ends with ``logits.transpose(0, 1).contiguous()``: (S, B, V/tp) -> (B, S,
V/tp), a copy of the step's largest activation (8,192 tokens x a 32k vocabulary: 0.5 GB in bf16)
in the forward, and its gradient comes back through the transpose as a strided view that the
output layer's backward copies again. Running the output layer on ``hidden.transpose(0, 1)``
(B, S, H), a copy V/H times smaller, and handing back the (S, B, V/tp) *view* of its batch-first
result leaves megatron's ``.contiguous()`` nothing to do, and the gradient arrives contiguous.

The layer's math is row-wise, so every logit is the same number either way. With sequence
parallelism the layer all-gathers its input along the sequence (dim 0): it keeps megatron's
layout there, as it does for one sequence (B = 1), where the transpose is free already.
"""
from __future__ import annotations

import torch

_CLASSES: dict = {}


class _BatchFirstLogits:
    """Mixin over megatron's ColumnParallelLinear (the output layer)."""

    def forward(self, input_, *args, **kwargs):
        if self.sequence_parallel or input_.dim() != 3 or input_.shape[1] == 1:
            return super().forward(input_, *args, **kwargs)
        out, bias = super().forward(input_.transpose(0, 1).contiguous(), *args, **kwargs)
        return out.transpose(0, 1), bias                                  # (S, B, V/tp) view


def batch_first_logits(layer: torch.nn.Module) -> torch.nn.Module:
    """Switch ``layer`` (GPTModel.output_layer) to the batch-first computation in place: its
    class becomes a subclass of its own (parameters, state dict and isinstance checks are
    unchanged; deep copies keep it)."""
    base = type(layer)
    if issubclass(base, _BatchFirstLogits):
        return layer
    cls = _CLASSES.get(base)
    if cls is None:
        cls = _CLASSES[base] = type(f"BatchFirst{base.__name__}", (_BatchFirstLogits, base), {})
    layer.__class__ = cls
    return layer
