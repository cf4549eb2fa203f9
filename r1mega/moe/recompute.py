"""Saved activations that the backward rebuilds instead of keeping.

The experts' first projection saves its input, the permuted rows (T*k, H): k times the layer's
input, the largest activation of an MoE layer. Those rows are a gather of the layer's input,
which the router keeps for its own backward anyway, so the backward can gather them again
(one memory-bound copy) instead of holding them from the forward to the backward.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable

import torch


class _Rebuilt:
    """What autograd keeps in place of a view of the rebuilt tensor: where the view sits."""
    __slots__ = ("offset", "size", "stride")

    def __init__(self, offset: int, size, stride):
        self.offset, self.size, self.stride = offset, tuple(size), tuple(stride)


@contextlib.contextmanager
def rebuild_when_saved(t: torch.Tensor, rebuild: Callable[[], torch.Tensor],
                       source: torch.Tensor):
    """Inside the block, autograd saves any view of ``t``'s storage as a recipe, and backward
    gets ``rebuild()`` (which must equal ``t`` bitwise, computed from ``source``) viewed the same
    way. ``source`` changed in place before the backward is an error, as it would be for a
    tensor autograd saved itself."""
    # Under torch.compile the partitioner chooses what the backward keeps (dynamo cannot trace
    # the storage pointer these hooks key on), so the compiled layer stays one graph.
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        yield
        return
    # Plain values only: the hooks live as long as the graph, and must not keep t alive.
    storage, base, dtype, device = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype,
                                    t.device)
    version = source._version
    # One rebuild serves every view unpacked while it is alive (the per-expert loop unpacks one
    # slice per expert); a weak reference, so a finished node's rebuild is freed at once.
    last: list = [lambda: None]

    def pack(s: torch.Tensor):
        if s.dtype == dtype and s.device == device and s.untyped_storage().data_ptr() == storage:
            return _Rebuilt(s.storage_offset() - base, s.shape, s.stride())
        return s

    def unpack(obj):
        if not isinstance(obj, _Rebuilt):
            return obj
        if source._version != version:
            raise RuntimeError("rebuild_when_saved: the tensor the saved rows are rebuilt from "
                               "was modified in place after the forward")
        full = last[0]()
        if full is None:
            with torch.no_grad():
                full = rebuild()
            last[0] = weakref.ref(full)
        return full.as_strided(obj.size, obj.stride, full.storage_offset() + obj.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
