"""Between this rank's parameter shards and the full (TP=PP=1) tensors, by megatron's own markers.

megatron marks each tensor-parallel parameter with ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride``. A stride ``s`` means the full tensor is ``s`` blocks along that dim (SwiGLU's
fc1 is [gate; up], s=2) and every block is split over the TP ranks: rank ``r`` holds pieces
``r, tp + r, 2 tp + r, ...`` of the full tensor cut into ``s * tp`` pieces.

Pipeline stages number their layers locally (``decoder.layers.0``); :func:`global_name` rewrites
that to the global layer index (``TransformerLayer.layer_number`` is global and 1-based), so that
names mean the same thing under every layout. Used by the equivalence tests and by anything that
moves whole weights in and out of a sharded model.
"""
from __future__ import annotations

import re
from typing import Iterator

import torch
import torch.distributed as dist

_LAYER = re.compile(r"^(.*?decoder\.layers\.)(\d+)(\..*)$")


def is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def shard(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's piece of ``full`` laid out like ``param`` (returns ``full`` if replicated)."""
    if not is_tp_sharded(param) or tp_size == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = torch.chunk(full, stride * tp_size, dim=dim)
    return torch.cat([pieces[s * tp_size + tp_rank] for s in range(stride)], dim=dim)


def unshard(shards: list, param_like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`shard`: ``shards[r]`` from TP rank r -> the full tensor."""
    tp_size = len(shards)
    if not is_tp_sharded(param_like) or tp_size == 1:
        return shards[0]
    dim, stride = param_like.partition_dim, getattr(param_like, "partition_stride", 1)
    per_rank = [torch.chunk(s, stride, dim=dim) for s in shards]  # [rank][block]
    return torch.cat([per_rank[r][s] for s in range(stride) for r in range(tp_size)], dim=dim)


def _layer_offsets(chunk: torch.nn.Module) -> dict:
    """local layer index -> global 0-based index, read from the layers themselves."""
    out = {}
    for name, mod in chunk.named_modules():
        m = _LAYER.match(name + ".")
        if m and hasattr(mod, "layer_number") and m.group(3) == ".":
            out[int(m.group(2))] = mod.layer_number - 1
    return out


def global_name(local_name: str, offsets: dict) -> str:
    m = _LAYER.match(local_name)
    if not m:
        return local_name
    return f"{m.group(1)}{offsets[int(m.group(2))]}{m.group(3)}"


def named_global_parameters(chunks: list) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(global name, param) over all model chunks of this rank; DDP ``module.`` prefixes removed."""
    for chunk in chunks:
        inner = chunk
        while hasattr(inner, "module"):
            inner = inner.module
        offsets = _layer_offsets(inner)
        for name, p in inner.named_parameters():
            yield global_name(name, offsets), p


def load_full_state(chunks: list, full: dict, tp_rank: int, tp_size: int,
                    tied_embeddings: bool) -> None:
    """Copy full tensors (global names) into this rank's shards, in place.

    With tied embeddings the last stage's ``output_layer.weight`` is a copy of the embedding.
    """
    with torch.no_grad():
        for name, p in named_global_parameters(chunks):
            src = name
            if name == "output_layer.weight" and tied_embeddings:
                src = "embedding.word_embeddings.weight"
            if src not in full:
                raise KeyError(f"full state has no tensor '{src}' for parameter '{name}'.")
            piece = shard(full[src], p, tp_rank, tp_size)
            if piece.shape != p.shape:
                raise ValueError(f"'{name}': full {tuple(full[src].shape)} -> shard "
                                 f"{tuple(piece.shape)} does not fit the parameter {tuple(p.shape)}.")
            p.copy_(piece)  # advances the version (FP8 weight caches, the optimizer's amax)


def gather_full(local: dict, params_like: dict, tp_rank: int, tp_size: int, group=None) -> dict:
    """All ranks' ``{global name: shard}`` -> ``{global name: full}`` on every rank (CPU tensors).

    For small models (tests, checks): exchanges whole dicts with ``all_gather_object``.
    """
    world = dist.get_world_size(group)
    gathered: list = [None] * world
    meta = {k: (is_tp_sharded(params_like[k]), getattr(params_like[k], "partition_dim", 0),
                getattr(params_like[k], "partition_stride", 1)) for k in local}
    dist.all_gather_object(gathered, (tp_rank, {k: v.detach().cpu() for k, v in local.items()},
                                      meta), group=group)
    by_name: dict = {}
    info: dict = {}
    for rank_tp, tensors, m in gathered:
        for k, v in tensors.items():
            by_name.setdefault(k, {})[rank_tp] = v
            info[k] = m[k]
    out = {}
    for k, pieces in by_name.items():
        sharded, dim, stride = info[k]
        like = torch.empty(0)
        like.tensor_model_parallel, like.partition_dim, like.partition_stride = sharded, dim, stride
        if sharded and tp_size > 1:
            if len(pieces) != tp_size:
                raise RuntimeError(f"'{k}': got shards from TP ranks {sorted(pieces)}, need {tp_size}.")
            out[k] = unshard([pieces[r] for r in range(tp_size)], like)
        else:
            out[k] = pieces[min(pieces)]
    return out
