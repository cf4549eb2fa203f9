"""Model families as code: each ``model.family`` names the function that lays out one model
chunk's transformer block (which layer is dense, MoE, or another attention kind).

The one extension point a new architecture needs is here: DeepSeek-V3 (multi-head latent
attention, MTP) registers its own builder with ``@register_block_builder("deepseek_v3")``
instead of adding flags to the Llama spec. Everything else about building the chunk (the
TransformerConfig, GPTModel, DDP) stays in r1mega/models/gpt.py.

Today's families share one builder: the Llama/Qwen decoder, dense, or with r1mega's MoELayer in
the layers ``model.num_experts`` / ``model.moe_first_k_dense`` make MoE (Qwen3-MoE, and the
DeepSeek-V3 routing layout on GQA attention).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from r1mega.models.spec import RMSNorm, layer_spec, moe_block_layer_specs
from r1mega.moe.balancing import AuxLossCollector
from r1mega.moe.settings import MoESettings


@dataclass
class BlockSpec:
    """What GPTModel takes as ``transformer_layer_spec``, and what comes with it."""
    spec: object                           # ModuleSpec (one for every layer) or TransformerBlockSubmodules
    impl: str                              # "te" | "local"
    collector: Optional[AuxLossCollector]  # the chunk's MoE balance-loss collector, or None
    # Multi-token-prediction layers (DeepSeek-V3), attached to the last pipeline stage only.
    mtp_layer_specs: Optional[list] = None


# (model (cfg.model), rt, first_layer: the chunk's first global layer, num_layers) -> BlockSpec
BlockBuilder = Callable[..., BlockSpec]
_BUILDERS: dict[str, BlockBuilder] = {}


def register_block_builder(*families: str):
    """Decorator: ``fn`` lays out the block of every family in ``families``."""
    def wrap(fn: BlockBuilder) -> BlockBuilder:
        for name in families:
            if name in _BUILDERS:
                raise ValueError(f"model family '{name}' already has a block builder "
                                 f"({_BUILDERS[name].__name__})")
            _BUILDERS[name] = fn
        return fn
    return wrap


def block_spec(model, rt, *, first_layer: int, num_layers: int) -> BlockSpec:
    """The block of one chunk holding global layers [first_layer, first_layer + num_layers)."""
    try:
        builder = _BUILDERS[model.family]
    except KeyError:
        raise ValueError(f"model.family='{model.family}' has no block builder; known: "
                         f"{sorted(_BUILDERS)} (r1mega/models/families.py)") from None
    return builder(model, rt, first_layer=first_layer, num_layers=num_layers)


@register_block_builder("llama", "qwen2", "qwen3", "qwen3_moe")
def decoder_block(model, rt, *, first_layer: int, num_layers: int) -> BlockSpec:
    """Llama/Qwen decoder layers; MoE feed-forwards where model.num_experts says so."""
    if not model.num_experts:
        spec, impl = layer_spec(model.spec, model.qk_norm, model.attention_backend, rt.device.type)
        if impl == "local":
            # Our RMSNorm for the final norm too (megatron's fallback forbids sequence parallelism).
            spec = TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=RMSNorm)
        return BlockSpec(spec, impl, None)
    # MoE layers exist in the local spec only (config validation rejects model.spec=te). Per-chunk
    # specs: which layers are dense depends on the chunk's global layer range, and the chunk's MoE
    # layers report their balance losses to the chunk's collector.
    moe = MoESettings.from_model(model)
    collector = AuxLossCollector(moe.aux_loss_coeff, moe.z_loss_coeff)
    layers = moe_block_layer_specs(model, moe, first_layer=first_layer, num_layers=num_layers,
                                   collector=collector, **_moe_groups(rt))
    return BlockSpec(TransformerBlockSubmodules(layer_specs=layers, layer_norm=RMSNorm), "local", collector)


@register_block_builder("deepseek_v3")
def deepseek_v3_block(model, rt, *, first_layer: int, num_layers: int) -> BlockSpec:
    """Multi-head latent attention layers (r1mega/models/deepseek_v3/spec.py): a dense MLP in the
    first model.moe_first_k_dense layers, the MoE layer after; plus the MTP modules' layers."""
    from r1mega.models.deepseek_v3.spec import mla_block_layer_specs

    moe = MoESettings.from_model(model) if model.num_experts else None
    collector = AuxLossCollector(moe.aux_loss_coeff, moe.z_loss_coeff) if moe else None
    groups = _moe_groups(rt) if moe else {}
    layers = mla_block_layer_specs(model, moe, first_layer=first_layer, num_layers=num_layers,
                                   collector=collector, **groups)
    mtp = None
    if model.mtp_num_layers:
        mtp = mla_block_layer_specs(model, moe, first_layer=model.num_layers,
                                    num_layers=model.mtp_num_layers, collector=collector, **groups)
    return BlockSpec(TransformerBlockSubmodules(layer_specs=layers, layer_norm=RMSNorm), "local",
                     collector, mtp)


def _moe_groups(rt) -> dict:
    """The process groups an MoE layer exchanges over (None: size 1)."""
    return dict(ep_group=rt.ep_group if rt.ep_size > 1 else None,
                tp_group=rt.tp_group if rt.tp_size > 1 else None,
                expert_dp_group=rt.pg_collection.expt_dp if rt.ep_size > 1 else None)
