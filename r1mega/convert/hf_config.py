"""Hugging Face ``config.json`` <-> :class:`r1mega.config.ModelConfig`.

Import is strict: any HF setting that changes the maths and that our model does not implement
(rope scaling other than Llama 3.1's "llama3", sliding windows, biases in the wrong places,
another activation) is refused with the key and its value, instead of converting into a model
that is silently different.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from r1mega.config import ConfigError, ModelConfig, RopeScalingConfig, validate_rope_scaling
from r1mega.convert.families import ConversionError
from r1mega.models.deepseek_v3.config import MLAConfig

# model_type -> (family, architectures entry)
SUPPORTED = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3ForCausalLM"),
}
FAMILY_TO_HF = {fam: (mt, arch) for mt, (fam, arch) in SUPPORTED.items()}


LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_from_hf(hf: dict) -> tuple[float, RopeScalingConfig]:
    """(rope_theta, rope scaling) of a config.json, in either transformers layout."""
    # transformers >= 5 writes rope_parameters={rope_theta, rope_type, ...}; 4.x a flat rope_theta
    # and rope_scaling={rope_type (or type), ...}. 5.x reads rope_scaling first when both exist.
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return theta, RopeScalingConfig()
    if rope_type == "yarn":
        return theta, _yarn_from_hf(hf, scaling)
    if rope_type != "llama3":
        raise ConversionError(
            f"config.json: rope type '{rope_type}' (rope_scaling / rope_parameters) is not "
            f"implemented by r1mega's model; plain RoPE, 'llama3' (Llama 3.1/3.2) and 'yarn' convert."
        )
    # As in transformers: a top-level original_max_position_embeddings wins, and without any the
    # model's own max_position_embeddings is the original length.
    scaling = dict(scaling)
    if "original_max_position_embeddings" in hf:
        scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    elif "max_position_embeddings" in hf:
        scaling.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
    missing = [k for k in LLAMA3_KEYS if scaling.get(k) is None]
    if missing:
        raise ConversionError(f"config.json: rope type 'llama3' without {missing} in rope_scaling / "
                              f"rope_parameters; the checkpoint's config is incomplete.")
    rs = RopeScalingConfig(
        type="llama3", factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
    try:  # transformers loads such values with a warning; we would compute inf/NaN frequencies
        validate_rope_scaling(rs, key="config.json rope_scaling")
    except ConfigError as exc:
        raise ConversionError(str(exc)) from None
    return theta, rs


def _yarn_from_hf(hf: dict, scaling: dict) -> RopeScalingConfig:
    """transformers' yarn parameters (``_compute_yarn_parameters``) as a RopeScalingConfig."""
    from r1mega.models.yarn import yarn_attention_factor

    old = scaling.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
    if old is None:
        raise ConversionError("config.json: rope type 'yarn' without original_max_position_embeddings.")
    factor = scaling.get("factor")
    if factor is None:  # transformers' rule for DeepSeek-style configs
        factor = hf["max_position_embeddings"] / old
    if scaling.get("truncate", True) is not True:
        raise ConversionError("config.json: yarn with truncate=false is not implemented (r1mega rounds "
                              "the correction range as DeepSeek and transformers' default do).")
    if scaling.get("mscale") is None and scaling.get("mscale_all_dim"):
        raise ConversionError("config.json: yarn with mscale_all_dim but no mscale; transformers then "
                              "ignores mscale_all_dim for the RoPE factor but not the softmax scale. "
                              "Write mscale explicitly.")
    rs = RopeScalingConfig(type="yarn", factor=float(factor), original_max_position_embeddings=int(old),
                           beta_fast=float(scaling.get("beta_fast") or 32),
                           beta_slow=float(scaling.get("beta_slow") or 1),
                           mscale=float(scaling.get("mscale") or 1.0),
                           mscale_all_dim=float(scaling.get("mscale_all_dim") or 0.0))
    given = scaling.get("attention_factor")
    if given is not None and abs(float(given) - yarn_attention_factor(rs)) > 1e-9:
        raise ConversionError(f"config.json: yarn attention_factor={given} differs from the one its "
                              f"factor/mscale give ({yarn_attention_factor(rs)}); not implemented.")
    try:
        validate_rope_scaling(rs, key="config.json rope_scaling")
    except ConfigError as exc:
        raise ConversionError(str(exc)) from None
    return rs


def _rope_to_hf(cfg: ModelConfig) -> dict:
    """transformers 5 ``rope_parameters`` for ``cfg``."""
    out = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    rs = cfg.rope_scaling
    if rs.type == "llama3":
        out.update(rope_type="llama3", factor=rs.factor, low_freq_factor=rs.low_freq_factor,
                   high_freq_factor=rs.high_freq_factor,
                   original_max_position_embeddings=rs.original_max_position_embeddings)
    if rs.type == "yarn":
        out.update(rope_type="yarn", factor=rs.factor, beta_fast=rs.beta_fast, beta_slow=rs.beta_slow,
                   original_max_position_embeddings=rs.original_max_position_embeddings)
        if rs.mscale_all_dim:  # without it transformers ignores mscale (r1mega does too)
            out.update(mscale=rs.mscale, mscale_all_dim=rs.mscale_all_dim)
    return out


def _refuse(hf: dict, key: str, bad, why: str) -> None:
    if key in hf and hf[key] == bad:
        raise ConversionError(f"config.json: {key}={hf[key]!r} is not supported ({why}).")


def model_config_from_hf(hf: dict, base: Optional[ModelConfig] = None) -> ModelConfig:
    """ModelConfig for a HF ``config.json`` dict; ``base`` supplies r1mega-only fields."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        archs = hf.get("architectures")
        raise ConversionError(
            f"config.json: unsupported architecture model_type={model_type!r} "
            f"(architectures={archs}); r1mega converts {sorted(SUPPORTED)}."
        )
    family, _ = SUPPORTED[model_type]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"config.json: hidden_act={act!r}; r1mega's MLP is SwiGLU (silu).")
    if model_type == "llama":
        _refuse(hf, "attention_bias", True, "Llama with attention biases also biases o_proj")
        _refuse(hf, "mlp_bias", True, "MLP biases")
    if model_type in ("qwen3", "qwen3_moe"):
        _refuse(hf, "attention_bias", True, "Qwen3 with attention biases")
    if hf.get("use_sliding_window"):
        raise ConversionError("config.json: use_sliding_window=true is not supported (full attention only).")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim")
    cfg = dataclasses.replace(base) if base is not None else ModelConfig()
    cfg.family = family
    cfg.num_layers = int(hf["num_hidden_layers"])
    cfg.hidden_size = hidden
    cfg.num_attention_heads = heads
    # 0 keeps the default (hidden/heads); only a decoupled head size is spelled out.
    cfg.kv_channels = int(head_dim) if head_dim is not None and int(head_dim) != hidden // heads else 0
    cfg.num_query_groups = int(hf.get("num_key_value_heads") or heads)
    cfg.ffn_hidden_size = int(hf["intermediate_size"])
    cfg.vocab_size = int(hf["vocab_size"])
    cfg.max_position_embeddings = int(hf.get("max_position_embeddings", cfg.max_position_embeddings))
    cfg.rope_theta, cfg.rope_scaling = _rope_from_hf(hf)
    cfg.norm_epsilon = float(hf.get("rms_norm_eps", cfg.norm_epsilon))
    cfg.qkv_bias = model_type == "qwen2"  # Qwen2 hard-codes q/k/v biases
    cfg.qk_norm = model_type in ("qwen3", "qwen3_moe")
    cfg.tied_embeddings = bool(hf.get("tie_word_embeddings", False))
    cfg.init_method_std = float(hf.get("initializer_range", cfg.init_method_std))
    _moe_from_hf(hf, cfg, model_type == "qwen3_moe")
    cfg.mla = MLAConfig()
    if model_type == "deepseek_v3":
        from r1mega.convert.hf_config_deepseek import deepseek_from_hf

        deepseek_from_hf(hf, cfg)
    return cfg


# ModelConfig MoE keys that describe the architecture (the others, moe_aux_loss_coeff,
# moe_z_loss_coeff, moe_bias_update_rate, are training choices a config.json does not fix).
MOE_ARCH_FIELDS = ("num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_norm_topk_prob",
                   "moe_first_k_dense", "moe_router", "moe_shared_expert_ffn_hidden_size",
                   "moe_num_groups", "moe_topk_groups", "moe_routed_scaling_factor")


def _moe_from_hf(hf: dict, cfg: ModelConfig, is_moe: bool) -> None:
    """The MoE keys of ``cfg`` from a Qwen3-MoE config.json (``is_moe``), or their dense defaults."""
    from r1mega.moe.settings import _MOE_DEFAULTS

    for key in (k for k in MOE_ARCH_FIELDS if k != "num_experts"):
        setattr(cfg, key, _MOE_DEFAULTS[key])
    cfg.num_experts = 0
    if not is_moe:
        for key in ("moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_bias_update_rate"):
            setattr(cfg, key, _MOE_DEFAULTS[key])  # a dense model rejects them (validate_moe)
        return
    # transformers 5 writes num_local_experts (its attribute_map), released checkpoints num_experts.
    experts = hf.get("num_experts")
    if experts is None:
        experts = hf.get("num_local_experts")
    if not experts:
        raise ConversionError(f"config.json: model_type=qwen3_moe with num_experts={experts!r}; "
                              f"a Qwen3-MoE checkpoint needs num_experts > 0.")
    step = int(hf.get("decoder_sparse_step", 1))
    if step != 1:
        raise ConversionError(
            f"config.json: decoder_sparse_step={step} (an MoE block every {step} layers) is not "
            f"implemented; r1mega's MoE models are dense in the first k layers and MoE after "
            f"(model.moe_first_k_dense), which needs decoder_sparse_step=1.")
    dense = sorted(int(i) for i in (hf.get("mlp_only_layers") or []))
    if dense != list(range(len(dense))):
        raise ConversionError(
            f"config.json: mlp_only_layers={dense} is not implemented; r1mega keeps only the "
            f"first k layers dense (model.moe_first_k_dense), i.e. mlp_only_layers=[0, ..., k-1].")
    if len(dense) >= cfg.num_layers:
        raise ConversionError(f"config.json: mlp_only_layers lists all {cfg.num_layers} layers (no MoE "
                              f"layer is left); convert it as a dense model (model_type qwen3).")
    cfg.num_experts = int(experts)
    cfg.moe_router_topk = int(hf.get("num_experts_per_tok", 8))
    cfg.moe_ffn_hidden_size = int(hf.get("moe_intermediate_size", 768))
    cfg.moe_norm_topk_prob = bool(hf.get("norm_topk_prob", False))
    cfg.moe_first_k_dense = len(dense)
    cfg.moe_router = "softmax"
    # router_aux_loss_coef / output_router_logits are not read: transformers' loss is a
    # batch-global load-balancing loss, r1mega's a per-sequence one (model.moe_aux_loss_coeff);
    # the training objective is chosen in r1mega's config, the forward does not depend on it.


def hf_config_from_model_config(cfg: ModelConfig, original: Optional[dict] = None,
                                dtype_name: Optional[str] = None) -> dict:
    """config.json dict for ``cfg``; fields of ``original`` we do not own (token ids, the
    tokenizer class, ...) are kept so a round trip changes nothing we did not convert."""
    if cfg.family not in FAMILY_TO_HF:
        raise ConversionError(f"model.family={cfg.family!r} has no Hugging Face architecture; "
                              f"supported: {sorted(FAMILY_TO_HF)}.")
    model_type, arch = FAMILY_TO_HF[cfg.family]
    out = dict(original or {})
    if out.get("model_type") not in (None, model_type):
        # The carried config belongs to another architecture: do not mix its keys in.
        out = {}
    out.update({
        "architectures": [arch],
        "model_type": model_type,
        "num_hidden_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads,
        "intermediate_size": cfg.ffn_hidden_size,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tied_embeddings,
        "initializer_range": cfg.init_method_std,
    })
    rope = _rope_to_hf(cfg)
    v5_layout = "rope_parameters" in out or original is None
    # transformers 4.x reads only rope_scaling, 5.x rope_scaling before rope_parameters: a scaled
    # rope goes there too unless the original was a 5.x file without it, so no reader of ours
    # falls back to plain RoPE.
    scaling_key = rope["rope_type"] != "default" and (
        original is None or "rope_scaling" in out or "rope_parameters" not in out)
    out.pop("rope_scaling", None)
    if v5_layout:
        out["rope_parameters"] = rope
    if scaling_key:
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    out["rope_theta"] = cfg.rope_theta  # read by transformers 4.x; 5.x maps it too
    if model_type == "llama":
        out.setdefault("attention_bias", False)
        out.setdefault("mlp_bias", False)
    if model_type == "qwen3":
        out.setdefault("attention_bias", False)
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):
        out.setdefault("use_sliding_window", False)
    if model_type == "qwen3_moe":
        out.pop("num_local_experts", None)  # transformers 5's alias of num_experts
        out.update(_moe_to_hf(cfg))
    else:
        for key in ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                    "norm_topk_prob", "mlp_only_layers", "decoder_sparse_step"):
            out.pop(key, None)
    if model_type == "deepseek_v3":
        from r1mega.convert.hf_config_deepseek import deepseek_to_hf

        out.update(deepseek_to_hf(cfg))
    if dtype_name is not None:
        out["torch_dtype"] = dtype_name
        out["dtype"] = dtype_name
    return out


def _moe_to_hf(cfg: ModelConfig) -> dict:
    """Qwen3-MoE config.json keys for ``cfg``; what the architecture cannot say is refused."""
    unsupported = {"moe_router": "softmax", "moe_shared_expert_ffn_hidden_size": 0,
                   "moe_num_groups": 1, "moe_topk_groups": 1, "moe_routed_scaling_factor": 1.0,
                   "moe_bias_update_rate": 0.0}
    for key, want in unsupported.items():
        if getattr(cfg, key) != want:
            raise ConversionError(f"model.{key}={getattr(cfg, key)!r} has no Qwen3-MoE equivalent "
                                  f"(Qwen3MoeForCausalLM needs {want!r}); it cannot be exported.")
    return {
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.moe_router_topk,
        "moe_intermediate_size": cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size,
        "norm_topk_prob": cfg.moe_norm_topk_prob,
        "mlp_only_layers": list(range(cfg.moe_first_k_dense)),
        "decoder_sparse_step": 1,
    }


def read_hf_config(hf_dir: str, key: str = "model.init_from_hf") -> dict:
    """``hf_dir/config.json`` as a dict; ``key`` names where ``hf_dir`` came from in errors."""
    import json
    import os

    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{key}={hf_dir}: {path} does not exist; {key} must be a Hugging Face "
                              f"model directory (config.json + safetensors).")
    with open(path) as f:
        try:
            hf = json.load(f)
        except ValueError as exc:
            raise ConversionError(f"{key}={hf_dir}: {path} is not valid JSON ({exc}).") from None
    if not isinstance(hf, dict):
        raise ConversionError(f"{key}={hf_dir}: {path} holds {type(hf).__name__}, not an object.")
    return hf


def model_config_from_hf_dir(hf_dir: str, base: Optional[ModelConfig] = None) -> ModelConfig:
    """ModelConfig read from ``hf_dir/config.json`` (for ``model.init_from_hf``)."""
    return model_config_from_hf(read_hf_config(hf_dir), base)


# Fields config.json also sets but a user may choose differently without changing the weights'
# meaning: a shorter context to budget the KV cache, an init std nobody uses once weights load.
USER_CHOOSABLE = ("max_position_embeddings", "init_method_std")


def apply_init_from_hf(cfg, explicit: set) -> None:
    """``model.init_from_hf=DIR`` describes the model: its config.json fills ``cfg.model`` and
    ``data.tokenizer`` defaults to DIR. ``explicit``: the dotted keys the user wrote."""
    given = {k.split(".")[1] for k in explicit if k.startswith("model.")}
    cfg.model = fill_model_from_hf(cfg.model, cfg.model.init_from_hf, given)
    if "data.tokenizer" not in explicit:
        cfg.data.tokenizer = cfg.model.init_from_hf


def fill_model_from_hf(model_cfg: ModelConfig, hf_dir: str, explicit: set) -> ModelConfig:
    """``model_cfg`` with every field config.json describes taken from ``hf_dir``.

    ``explicit`` holds the ``model.*`` field names the user wrote (YAML or override): those of
    the architecture must agree with config.json (an error names both values), the user-choosable
    ones win, and r1mega-only fields (spec, compile_layers, recompute ...) are kept."""
    import os

    hf = read_hf_config(hf_dir)
    want = model_config_from_hf(hf, base=model_cfg)
    for name in set(explicit) & set(USER_CHOOSABLE):
        setattr(want, name, getattr(model_cfg, name))
    stated = dataclasses.replace(want, **{n: getattr(model_cfg, n) for n in set(explicit) & set(ARCH_FIELDS)})
    bad = arch_mismatches(stated, want, os.path.join(hf_dir, "config.json"))
    if bad:
        raise ConversionError("; ".join(bad) + ". Remove these model.* keys: model.init_from_hf "
                              "takes the architecture from config.json.")
    return want


ARCH_FIELDS = ("family", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
               "ffn_hidden_size", "vocab_size", "qkv_bias", "qk_norm", "tied_embeddings",
               "rope_theta", "rope_scaling", "norm_epsilon", "kv_channels", "mla") + MOE_ARCH_FIELDS


def check_model_matches_hf(model_cfg: ModelConfig, hf: dict, source: str = "config.json") -> None:
    """Refuse to load HF weights into a model whose architecture fields differ, naming them all."""
    bad = arch_mismatches(model_cfg, model_config_from_hf(hf), source)
    if bad:
        raise ConversionError(
            "the model config does not match the HF checkpoint: " + "; ".join(bad) + ". Set these "
            "model.* keys from the checkpoint (r1mega.convert.hf_config.model_config_from_hf_dir)."
        )


def arch_mismatches(model_cfg: ModelConfig, want: ModelConfig, source: str) -> list:
    """'model.X=a but SOURCE gives b' for each architecture field where the two differ."""
    bad = []
    for name in ARCH_FIELDS:
        a, b = getattr(model_cfg, name), getattr(want, name)
        if name == "kv_channels":  # 0 is shorthand for hidden/heads
            a = a or model_cfg.hidden_size // model_cfg.num_attention_heads
            b = b or want.hidden_size // want.num_attention_heads
        if name == "moe_ffn_hidden_size" and model_cfg.num_experts:  # 0 is shorthand for ffn
            a, b = a or model_cfg.ffn_hidden_size, b or want.ffn_hidden_size
        if name == "rope_scaling":  # type none ignores the other fields
            a, b = (x if x.type != "none" else RopeScalingConfig() for x in (a, b))
        same = abs(a - b) <= 1e-6 * max(abs(a), abs(b)) if isinstance(a, float) else a == b
        if not same:
            bad.append(f"model.{name}={a!r} but {source} gives {b!r}")
    return bad
