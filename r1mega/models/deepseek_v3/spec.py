"""DeepSeek-V3 layers from megatron-core's own ``MLASelfAttention`` and local (non-TE) modules.

megatron-core 0.16.1's MLA runs without Transformer Engine once its submodules are local: the
down projections are ``ColumnParallelLinear`` (each TP rank computes a slice of the latent and
megatron gathers it, so the latent is whole on every rank), the up projections are
column-parallel over heads, the output projection row-parallel; the core attention is r1mega's
:class:`PackedCoreAttention` (packed THD sequences; q/k are ``qk_nope + qk_rope`` wide, v
``v_head_dim``: SDPA takes different q/k and v widths).

RoPE: MLA is built with megatron's plain ``rope`` type and its frequencies are then replaced by
YaRN's (:func:`r1mega.models.rope_scaling.apply_rope_scaling`), because megatron's
``YarnRotaryEmbedding`` moves its tables to CUDA unconditionally. That is exact whenever YaRN's
attention factor on cos/sin is 1, which DeepSeek's configs (mscale == mscale_all_dim) give and
validation demands; the mscale on the softmax scale megatron computes from the same config.
megatron's MLA RoPE de-interleaves the rotary channels ([x0, x1, x2, ...] -> [x0, x2, ..., x1,
x3, ...]) before rotating, which is transformers' ``rope_interleave=True`` (DeepSeek's layout).
"""
from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer import multi_latent_attention as _mla
from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from r1mega.models.attention import PackedCoreAttention
from r1mega.models.rope_scaling import apply_rope_scaling
from r1mega.models.spec import RMSNorm, dense_mlp_spec, moe_mlp_spec

if not isinstance(_mla.TELinear, type):
    # megatron's TE extension module imports without Transformer Engine, with a MagicMock for
    # TELinear, so MLA's HAVE_TE reads True and its __init__ calls isinstance(x, <mock>). No TE
    # path can be taken without TE, so the flag is corrected.
    _mla.HAVE_TE = False


def mla_config_kwargs(model) -> dict:
    """The ``MLATransformerConfig`` fields of ``model`` (cfg.model, family deepseek_v3)."""
    a, rs = model.mla, model.rope_scaling
    yarn = rs.type == "yarn"
    return dict(
        q_lora_rank=a.q_lora_rank or None,  # megatron: None means one plain query projection
        kv_lora_rank=a.kv_lora_rank,
        qk_head_dim=a.qk_nope_head_dim,
        qk_pos_emb_head_dim=a.qk_rope_head_dim,
        v_head_dim=a.v_head_dim,
        kv_channels=a.q_head_dim,
        rope_type="rope",  # frequencies replaced by apply_mla_rope (module docstring)
        rotary_base=model.rope_theta,
        # Read by megatron only for the softmax scale's mscale (factor 1: no mscale).
        rotary_scaling_factor=rs.factor if yarn else 1.0,
        mscale=rs.mscale if yarn else 1.0,
        mscale_all_dim=rs.mscale_all_dim if yarn else 0.0,
        original_max_position_embeddings=rs.original_max_position_embeddings,
        beta_fast=rs.beta_fast,
        beta_slow=rs.beta_slow,
    )


def mla_attention_spec(attention_backend: str = "auto", q_lora: bool = True) -> ModuleSpec:
    return ModuleSpec(
        module=MLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=ColumnParallelLinear,
            linear_q_down_proj=ColumnParallelLinear,
            linear_q_up_proj=ColumnParallelLinear,
            linear_kv_down_proj=ColumnParallelLinear,
            linear_kv_up_proj=ColumnParallelLinear,
            core_attention=ModuleSpec(module=PackedCoreAttention, params={"backend": attention_backend}),
            linear_proj=RowParallelLinear,
            q_layernorm=RMSNorm if q_lora else IdentityOp,
            kv_layernorm=RMSNorm,
        ),
    )


def mla_layer_spec(model, mlp: ModuleSpec | None = None) -> ModuleSpec:
    """One DeepSeek-V3 decoder layer: MLA + (dense SwiGLU | ``mlp``)."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=mla_attention_spec(model.attention_backend, bool(model.mla.q_lora_rank)),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=mlp or dense_mlp_spec(),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def mla_block_layer_specs(model, moe_settings, *, first_layer: int, num_layers: int,
                          collector=None, ep_group=None, tp_group=None,
                          expert_dp_group=None) -> list[ModuleSpec]:
    """Specs of layers [first_layer, first_layer + num_layers): dense MLP in the first
    ``moe_first_k_dense`` layers of the whole model, the MoE layer after (none without experts)."""
    dense = mla_layer_spec(model)
    if moe_settings is None:
        return [dense] * num_layers
    moe = mla_layer_spec(model, mlp=moe_mlp_spec(moe_settings, collector, ep_group, tp_group,
                                                 expert_dp_group))
    return [moe if moe_settings.is_moe_layer(i) else dense
            for i in range(first_layer, first_layer + num_layers)]


def apply_mla_rope(gpt, model) -> None:
    """YaRN (or plain) frequencies into every MLA layer's own rotary embedding."""
    for layer in getattr(gpt.decoder, "layers", []):
        apply_rope_scaling(layer.self_attention.rotary_pos_emb, model.rope_scaling, model.rope_theta)
