"""The Hugging Face transformers peer of a bench shape (r1mega/bench/shapes.py), built on the device.

Dense shapes become ``LlamaForCausalLM``; ``family: qwen3_moe`` shapes ``Qwen3MoeForCausalLM``
through the conversion's own config mapping (r1mega/convert/hf_config.py), so the peer has the
layout a converted checkpoint would have. Both use SDPA attention; the MoE peer's experts run
with ``experts_implementation`` (None: transformers' own default, which it resolves itself).
"""
from __future__ import annotations

from typing import Optional

import torch


def is_moe_shape(shape: dict) -> bool:
    return bool(shape.get("num_experts"))


def _llama_config(shape: dict):
    import transformers

    # Kept exactly as the dense bench has always built it, so dense results stay comparable.
    return transformers.LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["ffn_hidden_size"], num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_query_groups"],
        max_position_embeddings=shape["max_position_embeddings"],
        tie_word_embeddings=shape["tied_embeddings"], attn_implementation="sdpa",
    )


def _qwen3_moe_config(shape: dict):
    import transformers

    from r1mega.config import ModelConfig
    from r1mega.convert.hf_config import hf_config_from_model_config

    d = hf_config_from_model_config(ModelConfig(**shape))
    model_type = d.pop("model_type")
    d.pop("architectures", None)
    # No router logits in the output: transformers then adds no balance loss, as r1mega's
    # shape (moe_aux_loss_coeff 0) adds none; both train on the same cross-entropy alone.
    d["output_router_logits"] = False
    return transformers.AutoConfig.for_model(model_type, **d)


def build_hf_model(shape: dict, device: torch.device, dtype: torch.dtype,
                   experts_implementation: Optional[str] = None):
    """-> (model in train mode on ``device`` in ``dtype``, experts implementation in use or None).

    The weights are created on the device in ``dtype`` directly: a float32 host copy of a
    4B-parameter model would cost minutes of CPU init and 16 GB of host memory."""
    import transformers

    if not is_moe_shape(shape):
        if experts_implementation not in (None, "default"):
            raise SystemExit(f"--hf-experts {experts_implementation}: the dense shape has no experts")
        model = transformers.LlamaForCausalLM(_llama_config(shape)).to(device=device, dtype=dtype)
        model.train()
        return model, None
    if shape.get("family") != "qwen3_moe":
        raise SystemExit(f"no transformers peer for model family {shape.get('family')!r} "
                         "(bench shapes with experts must be family qwen3_moe)")
    impl = None if experts_implementation in (None, "default") else experts_implementation
    selectable = hasattr(transformers.PreTrainedModel, "set_experts_implementation")
    if impl is not None and not selectable:
        raise PeerUnavailable(f"transformers {transformers.__version__} has no "
                              f"experts_implementation; only its default experts can be timed")
    kwargs = {"experts_implementation": impl} if selectable else {}
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            _qwen3_moe_config(shape), dtype=dtype, attn_implementation="sdpa", **kwargs)
    model.train()
    # transformers 4.x loops over the experts (its only implementation).
    return model, getattr(model.config, "_experts_implementation", None) or "eager"


class PeerUnavailable(Exception):
    """The installed transformers cannot build the requested peer variant."""


def total_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
