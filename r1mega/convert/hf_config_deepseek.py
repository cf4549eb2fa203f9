"""DeepSeek-V3 ``config.json`` (``model_type: deepseek_v3``) <-> ``ModelConfig`` (family
``deepseek_v3``): MLA sizes, the group-limited sigmoid router, the shared expert, the dense
first layers. What r1mega does not implement is refused by key, as in hf_config.py."""
from __future__ import annotations

from r1mega.config import ModelConfig
from r1mega.convert.families import ConversionError
from r1mega.models.deepseek_v3.config import MLAConfig


def _need(hf: dict, key: str):
    if hf.get(key) is None:
        raise ConversionError(f"config.json: model_type=deepseek_v3 without '{key}'; the checkpoint's "
                              f"config is incomplete.")
    return hf[key]


def deepseek_from_hf(hf: dict, cfg: ModelConfig) -> None:
    """Fill the MLA and MoE fields of ``cfg`` from a DeepSeek-V3 config.json (the generic fields
    are already set by hf_config.model_config_from_hf)."""
    if hf.get("attention_bias"):
        raise ConversionError("config.json: attention_bias=true is not supported for deepseek_v3 "
                              "(MLA's projections have no biases in r1mega).")
    if hf.get("rope_interleave", True) is not True:
        raise ConversionError("config.json: rope_interleave=false is not supported: r1mega's MLA "
                              "(megatron's) rotates DeepSeek's interleaved RoPE channels.")
    for key, want in (("topk_method", "noaux_tc"), ("scoring_func", "sigmoid")):
        if key in hf and hf[key] != want:
            raise ConversionError(f"config.json: {key}={hf[key]!r}; r1mega's DeepSeek-V3 router is "
                                  f"{key}={want!r} (group-limited sigmoid with a selection bias).")
    heads, kv = cfg.num_attention_heads, int(hf.get("num_key_value_heads") or cfg.num_attention_heads)
    if kv != heads:
        raise ConversionError(f"config.json: num_key_value_heads={kv} differs from num_attention_heads="
                              f"{heads}; MLA has one key/value per head.")
    cfg.num_query_groups = heads
    cfg.kv_channels = 0  # MLA's head sizes live in model.mla
    cfg.qkv_bias = cfg.qk_norm = False
    cfg.mla = MLAConfig(q_lora_rank=int(hf.get("q_lora_rank") or 0),
                        kv_lora_rank=int(_need(hf, "kv_lora_rank")),
                        qk_nope_head_dim=int(_need(hf, "qk_nope_head_dim")),
                        qk_rope_head_dim=int(_need(hf, "qk_rope_head_dim")),
                        v_head_dim=int(_need(hf, "v_head_dim")))
    experts = int(hf.get("n_routed_experts") or 0)
    first_dense = int(hf.get("first_k_dense_replace", 0))
    if not experts or first_dense >= cfg.num_layers:
        return  # every layer dense: the MoE keys keep their dense defaults
    if int(hf.get("moe_layer_freq", 1)) != 1:
        raise ConversionError(f"config.json: moe_layer_freq={hf['moe_layer_freq']} is not implemented; "
                              f"r1mega's MoE layers follow the first_k_dense_replace dense ones.")
    cfg.num_experts = experts
    cfg.moe_router = "sigmoid_group"
    cfg.moe_router_topk = int(_need(hf, "num_experts_per_tok"))
    cfg.moe_ffn_hidden_size = int(_need(hf, "moe_intermediate_size"))
    cfg.moe_shared_expert_ffn_hidden_size = int(hf.get("n_shared_experts") or 0) * cfg.moe_ffn_hidden_size
    cfg.moe_norm_topk_prob = bool(hf.get("norm_topk_prob", True))
    cfg.moe_num_groups = int(hf.get("n_group") or 1)
    cfg.moe_topk_groups = int(hf.get("topk_group") or 1)
    cfg.moe_routed_scaling_factor = float(hf.get("routed_scaling_factor", 1.0))
    cfg.moe_first_k_dense = first_dense


def deepseek_to_hf(cfg: ModelConfig) -> dict:
    """The DeepSeek-V3 keys of config.json for ``cfg``."""
    a = cfg.mla
    fe = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
    out = {
        "q_lora_rank": a.q_lora_rank or None, "kv_lora_rank": a.kv_lora_rank,
        "qk_nope_head_dim": a.qk_nope_head_dim, "qk_rope_head_dim": a.qk_rope_head_dim,
        "v_head_dim": a.v_head_dim, "head_dim": a.qk_rope_head_dim,
        "qk_head_dim": a.q_head_dim, "rope_interleave": True, "attention_bias": False,
        "num_key_value_heads": cfg.num_attention_heads,
        "num_nextn_predict_layers": cfg.mtp_num_layers,
    }
    if not cfg.num_experts:
        # transformers has no flag for "no MoE": every layer below first_k_dense_replace is dense.
        return {**out, "first_k_dense_replace": cfg.num_layers, "n_routed_experts": 1,
                "n_shared_experts": 0, "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1,
                "moe_intermediate_size": cfg.ffn_hidden_size}
    if cfg.moe_router != "sigmoid_group":
        raise ConversionError(f"model.moe_router={cfg.moe_router!r} has no DeepSeek-V3 equivalent "
                              f"(DeepseekV3ForCausalLM routes with sigmoid_group); it cannot be exported.")
    shared = cfg.moe_shared_expert_ffn_hidden_size
    if shared % fe:
        raise ConversionError(f"model.moe_shared_expert_ffn_hidden_size={shared} is not a multiple of the "
                              f"routed expert width {fe}; DeepSeek-V3 counts n_shared_experts of that width.")
    return {**out, "n_routed_experts": cfg.num_experts, "num_experts_per_tok": cfg.moe_router_topk,
            "moe_intermediate_size": fe, "n_shared_experts": shared // fe,
            "norm_topk_prob": cfg.moe_norm_topk_prob, "n_group": cfg.moe_num_groups,
            "topk_group": cfg.moe_topk_groups, "routed_scaling_factor": cfg.moe_routed_scaling_factor,
            "first_k_dense_replace": cfg.moe_first_k_dense, "topk_method": "noaux_tc",
            "scoring_func": "sigmoid"}
