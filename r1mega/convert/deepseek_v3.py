"""DeepSeek-V3 (``DeepseekV3ForCausalLM``) <-> r1mega's ``deepseek_v3`` family: the name table.

Every MLA tensor is a plain copy: megatron's ``linear_kv_down_proj`` is HF's ``kv_a_proj_with_mqa``
with the same [latent; rope key] rows, ``linear_kv_up_proj`` HF's ``kv_b_proj`` with the same
per-head [k_nope; v] rows, ``linear_q_up_proj`` (or ``linear_q_proj``) the same per-head
[q_nope; q_rope] rows. The RoPE channels stay in DeepSeek's interleaved order on both sides:
megatron's MLA RoPE de-interleaves them itself, as transformers does under ``rope_interleave``.

The router's ``e_score_correction_bias`` is r1mega's ``expert_bias`` (float32, replicated); the
routed experts stack as in Qwen3-MoE; the shared expert (n_shared_experts x moe_intermediate_size
wide) is one SwiGLU.

Released checkpoints append the multi-token-prediction module as ``model.layers.{L}`` (L =
num_hidden_layers): a full decoder layer plus ``enorm``, ``hnorm``, ``eh_proj``,
``shared_head.norm`` and copies of the embedding and head (``embed_tokens``,
``shared_head.head``). With ``model.mtp_num_layers`` = D the first D of them become r1mega's
``mtp_heads.layers.{k}`` (:func:`with_mtp_entries`); with 0 they are skipped, as transformers'
causal LM skips them (:func:`drop_unconverted`).
"""
from __future__ import annotations

import re

from r1mega.convert.families import (COPY, EXPERTS_GATE_UP, EXPERTS_STACK, GATE_UP, VOCAB,
                                     VOCAB_SHARED, Rule, _H, _L)

_A, _HA = _L + "self_attention.", _H + "self_attn."

DEEPSEEK_V3_TABLE = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB),
    Rule(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",), COPY),
    Rule(_A + "linear_q_down_proj.weight", (_HA + "q_a_proj.weight",), COPY, when="q_lora"),
    Rule(_A + "q_layernorm.weight", (_HA + "q_a_layernorm.weight",), COPY, when="q_lora"),
    Rule(_A + "linear_q_up_proj.weight", (_HA + "q_b_proj.weight",), COPY, when="q_lora"),
    Rule(_A + "linear_q_proj.weight", (_HA + "q_proj.weight",), COPY, when="no_q_lora"),
    Rule(_A + "linear_kv_down_proj.weight", (_HA + "kv_a_proj_with_mqa.weight",), COPY),
    Rule(_A + "kv_layernorm.weight", (_HA + "kv_a_layernorm.weight",), COPY),
    Rule(_A + "linear_kv_up_proj.weight", (_HA + "kv_b_proj.weight",), COPY),
    Rule(_A + "linear_proj.weight", (_HA + "o_proj.weight",), COPY),
    Rule(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",), COPY),
    Rule(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), GATE_UP,
         when="dense_layer"),
    Rule(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), COPY, when="dense_layer"),
    Rule(_L + "mlp.router_weight", (_H + "mlp.gate.weight",), COPY, when="moe_layer"),
    Rule(_L + "mlp.expert_bias", (_H + "mlp.gate.e_score_correction_bias",), COPY, when="moe_layer"),
    Rule(_L + "mlp.experts.gate_up",
         (_H + "mlp.experts.{e}.gate_proj.weight", _H + "mlp.experts.{e}.up_proj.weight"), EXPERTS_GATE_UP,
         when="moe_layer"),
    Rule(_L + "mlp.experts.down", (_H + "mlp.experts.{e}.down_proj.weight",), EXPERTS_STACK, when="moe_layer"),
    Rule(_L + "mlp.shared_expert.gate_up",
         (_H + "mlp.shared_experts.gate_proj.weight", _H + "mlp.shared_experts.up_proj.weight"), GATE_UP,
         when="moe_layer"),
    Rule(_L + "mlp.shared_expert.down", (_H + "mlp.shared_experts.down_proj.weight",), COPY, when="moe_layer"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), COPY),
    Rule("output_layer.weight", ("lm_head.weight",), VOCAB, when="untied"),
)


def mla_hf_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """HF tensor shapes by name suffix that differ from the GQA families' (longest suffix wins)."""
    a, h, n = cfg.mla, cfg.hidden_size, cfg.num_attention_heads
    fs = cfg.moe_shared_expert_ffn_hidden_size
    return {
        "q_a_proj.weight": (a.q_lora_rank, h), "q_a_layernorm.weight": (a.q_lora_rank,),
        "q_b_proj.weight": (n * a.q_head_dim, a.q_lora_rank), "q_proj.weight": (n * a.q_head_dim, h),
        "kv_a_proj_with_mqa.weight": (a.kv_lora_rank + a.qk_rope_head_dim, h),
        "kv_a_layernorm.weight": (a.kv_lora_rank,),
        "kv_b_proj.weight": (n * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank),
        "o_proj.weight": (h, n * a.v_head_dim),
        "gate.e_score_correction_bias": (cfg.num_experts,),
        "shared_experts.gate_proj.weight": (fs, h), "shared_experts.up_proj.weight": (fs, h),
        "shared_experts.down_proj.weight": (h, fs),
    }


def with_mtp_entries(entries: list, cfg, num_experts: int) -> list:
    """``entries`` (the causal LM's) plus the rows of ``cfg.mtp_num_layers`` MTP modules; the
    embedding / head rows also name the modules' copies (VOCAB_SHARED)."""
    from r1mega.convert.families import Entry, _active, _hf_names  # defined after this import

    n, out = cfg.num_layers, []
    copies = {"embedding.word_embeddings.weight": [], "output_layer.weight": []}
    head = "embedding.word_embeddings.weight" if cfg.tied_embeddings else "output_layer.weight"
    for k in range(cfg.mtp_num_layers):
        i, mine, theirs = n + k, f"mtp_heads.layers.{k}.", f"model.layers.{n + k}."
        for rule in DEEPSEEK_V3_TABLE:
            if rule.mcore.startswith(_L) and _active(rule, cfg, i):
                out.append(Entry(rule.mcore.format(i=i).replace(f"decoder.layers.{i}.", mine + "layer."),
                                 _hf_names(rule, i, num_experts), rule.transform))
        for ours, hf in (("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"),
                         ("final_norm", "shared_head.norm")):
            out.append(Entry(f"{mine}{ours}.weight", (f"{theirs}{hf}.weight",), COPY))
        copies["embedding.word_embeddings.weight"].append(theirs + "embed_tokens.weight")
        copies[head].append(theirs + "shared_head.head.weight")
    main = [Entry(e.mcore, e.hf + tuple(copies[e.mcore]), VOCAB_SHARED) if copies.get(e.mcore) else e
            for e in entries]
    return main + out


def drop_unconverted(names: set, cfg) -> set:
    """``names`` without the MTP layers r1mega's model does not hold (module docstring) and the
    FP8 block scales (``weight_scale_inv``), which the loader folds into their weights."""
    mtp = re.compile(r"^model\.layers\.(\d+)\.")
    keep = set()
    for name in names:
        m = mtp.match(name)
        if m and int(m.group(1)) >= cfg.num_layers + cfg.mtp_num_layers:
            continue
        if name.endswith(".weight_scale_inv"):
            continue
        keep.add(name)
    return keep
