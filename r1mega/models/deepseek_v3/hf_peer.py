"""transformers' ``DeepseekV3ForCausalLM`` of a given r1mega shape: the benchmark peer and the
reference of the conversion tests.

A shape is a dict of ``ModelConfig`` keys (r1mega/bench/shapes.py); the HF config comes from
r1mega's own exporter (``hf_config_from_model_config``), so peer and model cannot drift apart.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from r1mega.config import ModelConfig


def hf_config_dict(shape: dict) -> dict:
    """config.json of the DeepSeek-V3 ``shape`` (``family: deepseek_v3``)."""
    from r1mega.convert.hf_config import hf_config_from_model_config

    cfg = ModelConfig(**{**shape, "family": "deepseek_v3"})
    return hf_config_from_model_config(cfg)


def hf_deepseek_v3(shape: dict, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
                   **from_config):
    """A randomly initialised ``DeepseekV3ForCausalLM`` of ``shape``; ``from_config`` goes to
    transformers' ``_from_config`` (e.g. ``attn_implementation="sdpa"``,
    ``experts_implementation="grouped_mm"`` for its fastest peer)."""
    import transformers

    hf = hf_config_dict(shape)
    for key in ("architectures", "model_type", "dtype", "torch_dtype"):
        hf.pop(key, None)
    config = transformers.DeepseekV3Config(**hf)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.DeepseekV3ForCausalLM._from_config(config, **from_config)
    return model.to(dtype)


def make_tiny_deepseek_v3_dir(out_dir: str, shape: Optional[dict] = None, *, seed: int = 0,
                              std: float = 0.2, dtype: torch.dtype = torch.float32) -> str:
    """Save a random DeepSeek-V3 of ``shape`` (default :data:`TINY`) with ``save_pretrained``.

    Weights are drawn with a large std, norms and the router bias perturbed, so that a conversion
    bug moves the logits by O(1) (as r1mega/convert/testing.py does for the other families)."""
    model = hf_deepseek_v3({**TINY, **(shape or {}), "init_method_std": std}, dtype=torch.float32, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
            elif not name.endswith("gate.weight"):
                p.normal_(0.0, std)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.05)  # moves some top-k choices, not all
    model.to(dtype)
    model.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 256, "marker": f"tiny-deepseek_v3-{seed}"}, f)
    return out_dir


# A scaled-down DeepSeek-V3: first layer dense, MLA with both latents, YaRN, 8 routed experts
# top-2 in 4 groups (2 chosen), one shared expert. Heads 4 so that TP=2 splits them.
TINY = dict(family="deepseek_v3", num_layers=3, hidden_size=64, num_attention_heads=4,
            num_query_groups=4, ffn_hidden_size=96, vocab_size=97, tied_embeddings=False,
            max_position_embeddings=256, norm_epsilon=1e-6,
            mla=dict(q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                     v_head_dim=12),
            rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64,
                              beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
            num_experts=8, moe_router="sigmoid_group", moe_router_topk=2, moe_ffn_hidden_size=32,
            moe_shared_expert_ffn_hidden_size=32, moe_num_groups=4, moe_topk_groups=2,
            moe_routed_scaling_factor=2.5, moe_first_k_dense=1)
