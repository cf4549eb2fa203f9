"""torch.compile of the decoder layers, one compiled region per TransformerLayer.

megatron-core 0.16.1's layer forward stops dynamo in several places, each a graph break that
splits the layer into separately compiled pieces with eager code between them (on the 852M
shape the H200 profile showed 16 compiled regions per layer):

* ``warnings.warn`` inside ``get_tensor_model_parallel_group_if_none`` (a deprecation notice on
  every linear layer's forward when no explicit TP group is passed; dynamo cannot reorder it):
  the modules that call it get the same lookup without the notice;
* the fine-grained activation offloading context (``with off_interface(flag, x, name)``), a
  user class dynamo cannot enter: with offloading off (r1mega never turns it on) it is replaced
  by ``contextlib.nullcontext(x)``, the same behaviour, which dynamo traces.

:func:`layer_graph_breaks` reports what is left (tests assert none on the local spec).

Scope: unpacked (B, S) batches, as ``bench train-step`` and equal-length SFT batches run. Packed
THD batches still break the graph inside the core attention (host-side sequence lengths), and
a break inside megatron's ``with off_interface(...)`` block is one dynamo (torch 2.11-2.13)
cannot resume with a ``nullcontext`` holding a tensor (InternalTorchDynamoError, seen on CPU),
so the trainer does not compile its packed RL micro-batches this way.
"""
from __future__ import annotations

import contextlib

import torch

_MODULES_WITH_OFFLOAD = (
    "megatron.core.transformer.attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.multi_latent_attention",
    "megatron.core.transformer.moe.experts",
)


def _offload_shim(original):
    def off_interface(offload, tensor, name):
        if not offload:
            return contextlib.nullcontext(tensor)
        return original(offload, tensor, name)

    # The static helpers megatron calls on the class (group_commit, get_context, ...).
    for attr in ("group_commit", "get_context", "init_chunk_handler"):
        if hasattr(original, attr):
            setattr(off_interface, attr, getattr(original, attr))
    off_interface.r1mega_shim = True
    return off_interface


def _quiet_tp_group_if_none(tp_group, is_expert=False, check_initialized=True):
    """megatron.core.utils.get_tensor_model_parallel_group_if_none minus its deprecation warning."""
    from megatron.core import parallel_state as ps

    if not torch.distributed.is_initialized():
        return None
    if not ps.is_initialized() or tp_group is not None:
        return tp_group
    if is_expert:
        return ps.get_expert_tensor_parallel_group(check_initialized=check_initialized)
    return ps.get_tensor_model_parallel_group(check_initialized=check_initialized)


_MODULES_WITH_TP_LOOKUP = (
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.transformer.mlp",
)


def prepare_dynamo() -> None:
    """Idempotent dynamo settings and megatron shims for compiling megatron layers."""
    import importlib

    cfg = torch._dynamo.config
    # One compiled region per layer instance: without larger caches dynamo stops compiling after
    # 8 layers (each guards on its own module) and the rest silently run eager.
    cfg.cache_size_limit = max(cfg.cache_size_limit, 128)
    cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 1024)
    for name in _MODULES_WITH_TP_LOOKUP:
        mod = importlib.import_module(name)
        if hasattr(mod, "get_tensor_model_parallel_group_if_none"):
            mod.get_tensor_model_parallel_group_if_none = _quiet_tp_group_if_none
    for name in _MODULES_WITH_OFFLOAD:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional megatron module that does not import here
            continue
        cur = getattr(mod, "off_interface", None)
        if cur is not None and not getattr(cur, "r1mega_shim", False):
            mod.off_interface = _offload_shim(cur)


def compile_layers(chunks, dynamic=None) -> int:
    """Compile every TransformerLayer.forward of the (DDP-wrapped or bare) chunks; returns how many.
    ``dynamic=None``: static shapes first, dynamic after a shape changes (packed RL batches)."""
    from r1mega.models.gpt import unwrap

    prepare_dynamo()
    n = 0
    for chunk in chunks:
        for layer in unwrap(chunk).decoder.layers:
            layer.forward = torch.compile(layer.forward, dynamic=dynamic)
            n += 1
    return n


def layer_graph_breaks(layer, *args, **kwargs) -> list[str]:
    """Graph-break reasons of one layer forward under dynamo (first line of each)."""
    prepare_dynamo()
    torch._dynamo.reset()
    exp = torch._dynamo.explain(layer.forward)(*args, **kwargs)
    return [b.reason.splitlines()[0] for b in exp.break_reasons]
