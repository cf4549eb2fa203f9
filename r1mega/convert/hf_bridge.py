"""HF weights straight into model chunks under any TP/PP layout, and back out (gathered).

Every rank reads only the HF tensors its own parameters need (safetensors are memory-mapped), so
``model.init_from_hf`` needs no separate conversion step. The full (TP=1) megatron tensor comes
from the family table; this file only decides which slice of it a rank holds:

  * parameters megatron marks ``tensor_model_parallel`` are cut into ``tp_size`` equal pieces along
    their ``partition_dim`` (rows for column-parallel, columns for row-parallel);
  * the gated ``linear_fc1`` is the exception: rank r holds [gate_r; up_r], not rows
    r*2F/tp..(r+1)*2F/tp of [gate; up], because megatron's SwiGLU halves the LOCAL output;
  * routed experts (``mlp.experts.*``, stacked (E, ...)) are cut along the expert dim over the
    expert-parallel group: EP rank r holds experts [r*E/ep, (r+1)*E/ep), as the dispatcher routes;
  * everything else (norms, QK-norm, the router) is replicated.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Optional

import torch
import torch.distributed as dist

from r1mega.convert import families as fam
from r1mega.convert.families import ConversionError
from r1mega.convert.hf_config import check_model_matches_hf
from r1mega.convert.hf_io import HFCheckpoint, check_shapes

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def unwrap_chunk(chunk):
    """The GPTModel inside megatron DDP / Float16Module wrappers."""
    from megatron.core.models.gpt import GPTModel

    while not isinstance(chunk, GPTModel) and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def global_param_names(chunk) -> dict[str, tuple[str, torch.nn.Parameter]]:
    """local parameter name -> (global megatron name, parameter) for one model chunk.

    Layers are numbered per chunk; ``layer_number`` (1-based, global) gives the index in the full
    model, which is what the table and the HF names use.
    """
    gpt = unwrap_chunk(chunk)
    offsets = {}
    if getattr(gpt, "decoder", None) is not None:
        offsets = {j: layer.layer_number - 1 for j, layer in enumerate(gpt.decoder.layers)}
    out = {}
    # The router's selection bias is a buffer (state, not trained by the optimizer) but a weight
    # of the checkpoint (DeepSeek-V3's e_score_correction_bias).
    bias = ((n, b) for n, b in gpt.named_buffers() if n.endswith("mlp.expert_bias"))
    for name, p in list(gpt.named_parameters()) + list(bias):
        m = _LAYER.match(name)
        gname = f"decoder.layers.{offsets[int(m.group(1))]}.{m.group(2)}" if m else name
        out[name] = (gname, p)
    return out


def uses_te_names(chunks) -> bool:
    return any(n.endswith("layer_norm_weight") for c in chunks for n, _ in unwrap_chunk(c).named_parameters())


def _is_gated_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight")


def tp_slice(full: torch.Tensor, param: torch.nn.Parameter, name: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's piece of the full tensor ``full`` for parameter ``param`` (named ``name``)."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if _is_gated_fc1(name):
        gate, up = fam.split_gate_up(full)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)
    if full.shape[dim] % tp_size:
        raise ConversionError(f"tensor '{name}' has {full.shape[dim]} entries along dim {dim}, "
                              f"not divisible by tensor parallel size {tp_size}.")
    return full.chunk(tp_size, dim)[tp_rank]


def _is_routed_expert(name: str) -> bool:
    return ".mlp.experts." in name


def _ep(ctx) -> tuple[int, int]:
    """(EP rank, EP size) of this rank."""
    size = getattr(ctx, "ep_size", 1) or 1
    return (dist.get_rank(ctx.ep_group) if size > 1 else 0), size


def ep_slice(full: torch.Tensor, name: str, ep_rank: int, ep_size: int) -> torch.Tensor:
    """This EP rank's experts of the stacked (E, ...) tensor ``full`` (``name``)."""
    if ep_size == 1 or not _is_routed_expert(name):
        return full
    if full.shape[0] % ep_size:
        raise ConversionError(f"tensor '{name}' stacks {full.shape[0]} experts, not divisible by "
                              f"the expert parallel size {ep_size} (parallel.expert).")
    return full.chunk(ep_size, 0)[ep_rank]


def tp_unslice(pieces: list[torch.Tensor], param: torch.nn.Parameter, name: str) -> torch.Tensor:
    """Inverse of :func:`tp_slice`: the full tensor from every TP rank's piece (rank order)."""
    if len(pieces) == 1 or not getattr(param, "tensor_model_parallel", False):
        return pieces[0]
    if _is_gated_fc1(name):
        halves = [fam.split_gate_up(p) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(pieces, dim=param.partition_dim)


def check_layout(model_cfg, tp_size: int) -> None:
    """Refuse layouts the QKV layout cannot be cut for, before any tensor moves."""
    if model_cfg.num_query_groups % tp_size:
        raise ConversionError(
            f"model has {model_cfg.num_query_groups} KV groups (num_key_value_heads), fewer than or "
            f"not divisible by tensor parallel size {tp_size}: each TP rank needs whole KV groups "
            f"(KV-head replication is not implemented). Use a TP size that divides "
            f"{model_cfg.num_query_groups}."
        )


def load_hf_into_model(model_chunks, hf_dir, model_cfg, ctx, optimizer=None) -> dict:
    """Copy a HF checkpoint (dir or :class:`HFCheckpoint`) into this rank's model chunks.

    Every parameter must be covered and every HF tensor used; shapes are checked by name.
    If the megatron ``optimizer`` already exists, pass it: with bf16/fp16 parameters it keeps
    fp32 master copies taken at construction, and its first step would otherwise write the OLD
    weights back (the HF weights would be silently lost).
    Returns a small report: {"hf_dtype", "num_params", "num_hf_tensors"}.
    """
    from r1mega.models.gpt import padded_vocab_size

    ckpt = hf_dir if isinstance(hf_dir, HFCheckpoint) else HFCheckpoint(hf_dir, key="model.init_from_hf")
    tp_rank, tp_size = ctx.tp_rank, ctx.tp_size
    ep_rank, ep_size = _ep(ctx)
    check_layout(model_cfg, tp_size)
    check_model_matches_hf(model_cfg, ckpt.config, os.path.join(ckpt.dir, "config.json"))
    fam.check_hf_names(ckpt.names(), model_cfg)
    check_shapes(ckpt, fam.expected_hf_shapes(model_cfg))
    if model_cfg.tied_embeddings and "lm_head.weight" in ckpt.weight_map:
        # A tied config with its own, different head: dropping it would change the model.
        if not torch.equal(ckpt.get("lm_head.weight"), ckpt.get("model.embed_tokens.weight")):
            raise ConversionError(
                "config.json says tie_word_embeddings=true but 'lm_head.weight' differs from "
                "'model.embed_tokens.weight'; fix tie_word_embeddings in config.json."
            )
    te = uses_te_names(model_chunks)
    entries = {e.mcore: e for e in fam.expand_table(model_cfg, te_names=te)}
    vocab = padded_vocab_size(model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by, tp_size)
    n = 0
    with torch.no_grad():
        for chunk in model_chunks:
            for local, (gname, p) in global_param_names(chunk).items():
                key = gname
                if key == "output_layer.weight" and model_cfg.tied_embeddings:
                    # Last PP stage's copy of the tied embedding (not the first stage's own).
                    key = "embedding.word_embeddings.weight"
                if key not in entries:
                    raise ConversionError(
                        f"model parameter '{gname}' has no row in the '{model_cfg.family}' mapping "
                        f"table (spec {'te' if te else 'local'}); the model and the table disagree."
                    )
                full = fam.hf_to_mcore_tensor(entries[key], ckpt.get, model_cfg, vocab)
                piece = tp_slice(ep_slice(full, gname, ep_rank, ep_size), p, gname, tp_rank, tp_size)
                if tuple(piece.shape) != tuple(p.shape):
                    raise ConversionError(
                        f"tensor '{gname}' (from HF {list(entries[key].hf)}): TP rank {tp_rank} "
                        f"piece has shape {list(piece.shape)}, the model expects {list(p.shape)}."
                    )
                # copy_ on the parameter (not .data): it advances its version, which the FP8
                # weight caches and the optimizer's weight amax check before reusing anything.
                p.copy_(piece.to(device=p.device, dtype=p.dtype))
                n += 1
    if optimizer is not None:
        optimizer.reload_model_params()  # master weights <- the parameters just loaded
    return {"hf_dtype": ckpt.dtype(), "num_params": n, "num_hf_tensors": len(ckpt.names())}


def gather_full_state(model_chunks, model_cfg, ctx) -> Optional[dict[str, torch.Tensor]]:
    """Full (TP-gathered, all PP stages) megatron tensors by global name, on CPU.

    Collective over TP and PP groups of DP/CP rank 0; returns the dict on the one writer rank
    (tp=pp=dp=cp rank 0) and None elsewhere.
    """
    # Routed experts first, on every rank: the expert-parallel group spans data-parallel ranks.
    _, ep_size = _ep(ctx)
    experts: dict[str, torch.Tensor] = {}
    for chunk in model_chunks:
        for _, (gname, p) in global_param_names(chunk).items():
            if ep_size > 1 and _is_routed_expert(gname):
                pieces = [torch.empty_like(p.detach()) for _ in range(ep_size)]
                dist.all_gather(pieces, p.detach().contiguous(), group=ctx.ep_group)
                experts[gname] = torch.cat([x.cpu() for x in pieces], dim=0)  # (E, ...) rank order
    if getattr(ctx, "dp_rank", 0) != 0 or getattr(ctx, "cp_rank", 0) != 0:
        return None
    tp_size = ctx.tp_size
    mine: dict[str, torch.Tensor] = dict(experts)
    for chunk in model_chunks:
        for _, (gname, p) in global_param_names(chunk).items():
            if gname in experts:
                continue
            if gname == "output_layer.weight" and model_cfg.tied_embeddings:
                continue  # the first stage's embedding is the one that is exported
            data = p.detach()
            if tp_size > 1 and getattr(p, "tensor_model_parallel", False):
                pieces = [torch.empty_like(data) for _ in range(tp_size)]
                dist.all_gather(pieces, data.contiguous(), group=ctx.tp_group)
                data = tp_unslice([x.cpu() for x in pieces], p, gname)
            if ctx.tp_rank == 0:
                mine[gname] = data.cpu().clone()
    if ctx.tp_rank != 0:
        return None
    if ctx.pp_size > 1:
        gathered = [None] * ctx.pp_size if ctx.pp_rank == 0 else None
        dist.gather_object(mine, gathered, dst=dist.get_global_rank(ctx.pp_group, 0), group=ctx.pp_group)
        if ctx.pp_rank != 0:
            return None
        for part in gathered:
            mine.update(part)
    return mine


def hf_tensors_from_full(full: dict[str, torch.Tensor], model_cfg, dtype: torch.dtype):
    """(hf name, tensor) pairs in table order; every table row must be present in ``full``."""
    te = any(k.endswith("layer_norm_weight") for k in full)

    def get(name: str) -> torch.Tensor:
        if name not in full:
            raise ConversionError(f"megatron tensor '{name}' is missing from the model state.")
        return full[name]

    for name, t in fam.iter_hf_from_mcore(get, model_cfg, te_names=te):
        yield name, t.to(dtype)


def export_hf(model_chunks, model_cfg, ctx, out_dir: str, *, dtype: torch.dtype = torch.bfloat16,
              assets_dir: Optional[str] = None, original_config: Optional[dict] = None,
              check: Optional[Callable[[str], None]] = None, overwrite: bool = False,
              max_shard_bytes: int = 5 * 2**30) -> Optional[str]:
    """Write the model as a HF directory at ``out_dir`` (collective; rank 0 writes).

    ``assets_dir`` supplies tokenizer/generation files; ``check(tmp_dir)`` runs on the complete
    temp directory before it is renamed onto ``out_dir`` (verification), so a failed check leaves
    nothing at ``out_dir``.
    """
    import json
    import shutil

    from r1mega.convert import hf_io
    from r1mega.convert.hf_config import hf_config_from_model_config

    writer = dist.get_rank() == 0 if dist.is_initialized() else True
    error = None
    full = gather_full_state(model_chunks, model_cfg, ctx)
    if writer:
        try:
            hf_io.check_output_free(out_dir, overwrite)
            tmp = hf_io.partial_path(out_dir)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            try:
                hf_io.write_safetensors(hf_tensors_from_full(full, model_cfg, dtype), tmp, max_shard_bytes)
                if assets_dir and os.path.isdir(assets_dir):
                    hf_io.carry_files(assets_dir, tmp)
                cfg = hf_config_from_model_config(model_cfg, original_config, hf_io.dtype_name(dtype))
                with open(os.path.join(tmp, "config.json"), "w") as f:
                    json.dump(cfg, f, indent=2, sort_keys=True)
                if check is not None:
                    check(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            hf_io.commit_dir(tmp, out_dir)
        except Exception as exc:  # re-raised on every rank below, so no rank hangs
            error = exc
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [repr(error) if error is not None else None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:
            raise ConversionError(f"export to {out_dir} failed on rank 0: {box[0]}")
    if error is not None:
        raise error
    return out_dir if writer else None
