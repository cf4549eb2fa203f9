"""Layer specs for the dense Llama/Qwen family, and its MoE layers (Qwen3-MoE, DeepSeek-V3 layout).

Two implementations, swapped by spec (never by subclassing the model):
  te     megatron's Transformer Engine spec (fused norms+linears, TE attention incl. THD), used
         when TE imports and ``model.spec`` is "auto" or "te";
  local  megatron's own Column/RowParallelLinear + r1mega's :class:`RMSNorm` and
         :class:`~r1mega.models.attention.PackedCoreAttention` (packed THD sequences, SDPA/varlen).

The family differences are config, not code: Qwen2 sets ``add_qkv_bias``, Qwen3 ``qk_layernorm``
(RMSNorm over each head's channels), Llama neither.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from r1mega.models.attention import PackedCoreAttention


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as _te  # noqa: F401
    except Exception:
        return False
    return True


class RMSNorm(torch.nn.Module):
    """RMSNorm with the megatron norm signature; ``F.rms_norm`` is a fused kernel on GPU.

    megatron's local spec falls back to ``torch.nn.RMSNorm`` behind an assert that forbids
    sequence parallelism; this one marks its weight ``sequence_parallel`` so that
    ``finalize_model_grads`` all-reduces its gradient over TP when SP is on.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype,
                       device="cpu" if config.use_cpu_initialization else torch.cuda.current_device())
        )
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused rms_norm accumulates in fp32 for bf16 inputs; upcasting here instead would
        # save an fp32 copy of every norm input for backward (+4 GB at the benchmark shape).
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def dense_mlp_spec() -> ModuleSpec:
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                           linear_fc2=RowParallelLinear))


class _OwnMLPNotice(logging.Filter):
    """megatron's TransformerLayer logs "Unknown MLP type ... Using default kwargs" once per
    layer for any ``mlp`` it does not know; for r1mega's MoELayer that is the intended path (its
    groups come through the spec's params), so only that notice is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


def _quiet_unknown_mlp_notice() -> None:
    log = logging.getLogger("megatron.core.transformer.transformer_layer")
    if not any(isinstance(f, _OwnMLPNotice) for f in log.filters):
        log.addFilter(_OwnMLPNotice())


def moe_mlp_spec(settings, collector=None, ep_group=None, tp_group=None,
                 expert_dp_group=None) -> ModuleSpec:
    """r1mega's MoELayer as the layer's ``mlp`` (see r1mega/moe/layer.py); ``collector`` is the
    chunk's AuxLossCollector, shared by the chunk's MoE layers; the groups as MoELayer takes them."""
    from r1mega.moe.layer import MoELayer

    _quiet_unknown_mlp_notice()
    return ModuleSpec(module=MoELayer, params={"settings": settings, "collector": collector,
                                               "ep_group": ep_group, "tp_group": tp_group,
                                               "expert_dp_group": expert_dp_group})


def local_layer_spec(qk_norm: bool, attention_backend: str = "auto",
                     mlp: ModuleSpec | None = None) -> ModuleSpec:
    """TransformerLayer spec built only from megatron-core modules + r1mega's norm/attention;
    ``mlp`` replaces the dense SwiGLU MLP (an MoE layer)."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=ModuleSpec(
                        module=PackedCoreAttention, params={"backend": attention_backend}
                    ),
                    linear_proj=RowParallelLinear,
                    q_layernorm=RMSNorm if qk_norm else IdentityOp,
                    k_layernorm=RMSNorm if qk_norm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=mlp or dense_mlp_spec(),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def te_layer_spec(qk_norm: bool) -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_norm)


def moe_block_layer_specs(model, settings, *, first_layer: int, num_layers: int, collector=None,
                          ep_group=None, tp_group=None, expert_dp_group=None) -> list[ModuleSpec]:
    """Local layer specs of the layers [first_layer, first_layer + num_layers) of an MoE model:
    the first ``settings.first_k_dense`` layers of the whole model keep the dense MLP."""
    dense = local_layer_spec(model.qk_norm, model.attention_backend)
    moe = local_layer_spec(model.qk_norm, model.attention_backend,
                           mlp=moe_mlp_spec(settings, collector, ep_group, tp_group, expert_dp_group))
    return [moe if settings.is_moe_layer(i) else dense
            for i in range(first_layer, first_layer + num_layers)]


def layer_spec(spec: str, qk_norm: bool, attention_backend: str = "auto",
               device_type: str = "cuda") -> tuple[ModuleSpec, str]:
    """(spec, "te"|"local") for ``model.spec`` = auto | te | local on ``device_type``. TE's
    layers run on CUDA only, so auto takes them there alone (TE imports on a CPU machine too)."""
    if spec == "te" or (spec == "auto" and device_type == "cuda" and transformer_engine_available()):
        if not transformer_engine_available():
            raise RuntimeError("model.spec=te but Transformer Engine is not importable; install "
                               "transformer-engine[pytorch] or set model.spec=local.")
        if device_type != "cuda":
            raise RuntimeError(f"model.spec=te: Transformer Engine's layers run on CUDA GPUs, and "
                               f"this run is on {device_type}; set model.spec=local (or auto).")
        return te_layer_spec(qk_norm), "te"
    return local_layer_spec(qk_norm, attention_backend), "local"
