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

Packed THD batches (the RL micro-batches: ~64 sequences end to end, total T and every length
different each step) compile to the same single region, forward and backward, with one graph for
all steps. :func:`compile_layers` puts an eager wrapper in front of each compiled forward that, for
THD calls, hands dynamo only tensors and symbolic sizes:

* ``packed_seq_params`` becomes a plain PackedSeqParams without the host tuple of lengths and
  with ``max_seqlen`` rounded up to a multiple of 128 (:func:`~r1mega.models.attention.
  compile_packed_seqs`); the core attention's traced path builds its mask from ``cu_seqlens`` on
  the device (CPU/SDPA) or calls torch's varlen custom op (GPU). ``max_seqlen`` is made a symbolic
  int from the first compile (``torch.compiler.config.dynamic_sources``), not a constant;
* the RoPE frequencies arrive per token, (T, 1, 1, d), gathered eagerly once per micro-batch by
  :mod:`~r1mega.models.packed_rope`, so their (max_seqlen, ...) shape never reaches dynamo and in
  the graph RoPE is elementwise;
* T (hidden states, frequencies) and the number of sequences (``cu_seqlens``) are marked dynamic
  before the first call, so the first compile is already the general one.

No break is left to resume, and none may come back: a break inside megatron's ``with
off_interface(...)`` block is one dynamo (torch 2.11-2.13) cannot resume with a ``nullcontext``
holding a tensor (InternalTorchDynamoError, seen on CPU with the host-tuple attention).

Grad mode is part of dynamo's guards: a forward-only log-prob pass (no_grad) compiles its own
graph once per layer, then reuses it like the training pass does.
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


_MAX_SEQLEN_SOURCE = r".*\['packed_seq_params'\]\.max_seqlen_(q|kv)$"


def prepare_dynamo() -> None:
    """Idempotent dynamo settings and megatron shims for compiling megatron layers."""
    import importlib

    cfg = torch._dynamo.config
    # One compiled region per layer instance: without larger caches dynamo stops compiling after
    # 8 layers (each guards on its own module) and the rest silently run eager.
    cfg.cache_size_limit = max(cfg.cache_size_limit, 128)
    cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 1024)
    # ints cannot be marked dynamic like tensor sizes; the source names them instead (the layer
    # forward takes **kwargs). Only the core attention's varlen call reads them.
    sources = torch.compiler.config.dynamic_sources
    if _MAX_SEQLEN_SOURCE not in sources:
        torch.compiler.config.dynamic_sources = ",".join(filter(None, [sources, _MAX_SEQLEN_SOURCE]))
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


def _thd_arguments(layer, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The compile-friendly form of a packed (THD) layer call (module docstring)."""
    from r1mega.models import packed_rope
    from r1mega.models.attention import compile_packed_seqs

    params = compile_packed_seqs(kwargs["packed_seq_params"])
    kwargs = dict(kwargs, packed_seq_params=params)
    hidden = args[0] if args else kwargs["hidden_states"]  # (T, 1, H)
    torch._dynamo.mark_dynamic(hidden, 0)
    for cu in {id(t): t for t in (params.cu_seqlens_q, params.cu_seqlens_kv)}.values():
        torch._dynamo.mark_dynamic(cu, 0)
    rope = kwargs.get("rotary_pos_emb")
    if isinstance(rope, torch.Tensor):
        if (not layer.config.apply_rope_fusion and params.cu_seqlens_q_padded is None
                and params.cu_seqlens_q is params.cu_seqlens_kv):
            # (max_s, 1, 1, d) -> (T, 1, 1, d): megatron's "exact mapping" form, what
            # packed_rope.packed_freqs would gather inside every layer's graph.
            rope = packed_rope.packed_freqs(rope, params.cu_seqlens_q, hidden.shape[0])
            kwargs["rotary_pos_emb"] = rope
        torch._dynamo.mark_dynamic(rope, 0)
    return args, kwargs


def _packed_aware(layer, compiled):
    def forward(*args, **kwargs):
        params = kwargs.get("packed_seq_params")
        if params is not None and params.qkv_format == "thd":
            args, kwargs = _thd_arguments(layer, args, kwargs)
        return compiled(*args, **kwargs)

    forward.r1mega_compiled = compiled
    return forward


def compile_layers(chunks, dynamic=None, backend: str = "inductor") -> int:
    """Compile every TransformerLayer.forward of the (DDP-wrapped or bare) chunks; returns how many.

    ``dynamic=None``: unpacked (B, S) batches compile static first, dynamic after a shape changes;
    packed THD batches are dynamic in T and the sequence count from the first call. ``backend``:
    tests pass "aot_eager" (the same dynamo graphs and guards, no code generation).
    """
    from r1mega.models.gpt import unwrap

    prepare_dynamo()
    n = 0
    for chunk in chunks:
        for layer in unwrap(chunk).decoder.layers:
            layer.forward = _packed_aware(layer, torch.compile(layer.forward, dynamic=dynamic,
                                                                    backend=backend))
            n += 1
    return n


def layer_graph_breaks(layer, *args, **kwargs) -> list[str]:
    """Graph-break reasons of one layer forward under dynamo (first line of each), for the call
    as :func:`compile_layers` makes it (THD arguments in their compile-friendly form)."""
    prepare_dynamo()
    torch._dynamo.reset()
    params = kwargs.get("packed_seq_params")
    if params is not None and params.qkv_format == "thd":
        args, kwargs = _thd_arguments(layer, args, kwargs)
    exp = torch._dynamo.explain(layer.forward)(*args, **kwargs)
    return [b.reason.splitlines()[0] for b in exp.break_reasons]
