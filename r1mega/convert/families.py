"""One explicit HF <-> megatron mapping table per model family, and the pure tensor transforms.

A table row says: this megatron tensor is made from these Hugging Face tensors by this transform.
The same row is read in both directions, so a naming or ordering bug cannot exist in only one of
them. Tensors here are always FULL (unsharded, TP=1); ``r1mega.convert.sharding`` cuts them per
tensor-parallel rank.

The three layout facts other converters get wrong, each a pure function below:
  * QKV: megatron's ``linear_qkv`` rows are, per query group g, [q heads of g..., k_g, v_g];
    HF keeps three separate projections.  Columns-per-rank TP slicing of that layout keeps whole
    groups on a rank, which is why the interleave is per group and not [all q, all k, all v].
  * SwiGLU: megatron's ``linear_fc1`` is [gate; up] stacked on the output dim (TP=1 layout).
  * Vocabulary: the embedding and output layer are padded with zero rows to ``padded_vocab_size``
    so every TP rank holds an equal slice; export drops the padding again.

MoE (Qwen3-MoE): r1mega's ``MoELayer`` holds the routed experts stacked, ``experts.gate_up``
(E, 2F, H) with [gate; up] per expert and ``experts.down`` (E, H, F); released checkpoints (and
transformers' save_pretrained) keep one module per expert, so one megatron tensor is made from
all E experts' HF tensors (a "{e}" in a row's HF names). Which layers are dense and which MoE is
a per-layer condition of the row (``when="dense_layer"`` / ``"moe_layer"``).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from r1mega.errors import UserError

COPY, QKV, GATE_UP, VOCAB = "copy", "qkv", "gate_up", "vocab"
# Per-expert HF tensors <-> one stacked megatron tensor: [gate_e; up_e] and down_e over experts e.
EXPERTS_GATE_UP, EXPERTS_STACK = "experts_gate_up", "experts_stack"
# One megatron tensor that a checkpoint also stores as identical copies (DeepSeek-V3's MTP layer
# repeats the embedding and the output head): read from the first, the copies checked equal.
VOCAB_SHARED = "vocab_shared"
# Row conditions that depend on the layer index, not only on the config.
LAYER_CONDITIONS = ("dense_layer", "moe_layer")


class ConversionError(UserError, RuntimeError):
    """A checkpoint cannot be converted; the message names the tensor/file at fault and the fix."""


@dataclass(frozen=True)
class Rule:
    mcore: str                # megatron name; "{i}" is the GLOBAL layer index
    hf: tuple[str, ...]       # HF names, in the order the transform takes them
    transform: str            # COPY | QKV | GATE_UP | VOCAB | EXPERTS_GATE_UP | EXPERTS_STACK
    # ModelConfig property the row depends on: "qkv_bias", "qk_norm", "untied", or per layer
    # "dense_layer" / "moe_layer" (None: always). HF names with "{e}" repeat over experts.
    when: Optional[str] = None


_L = "decoder.layers.{i}."
_H = "model.layers.{i}."

LLAMA_TABLE = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB),
    Rule(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",), COPY),
    Rule(_L + "self_attention.linear_qkv.weight",
         (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"), QKV),
    Rule(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), COPY),
    Rule(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",), COPY),
    Rule(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), GATE_UP),
    Rule(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), COPY),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), COPY),
    Rule("output_layer.weight", ("lm_head.weight",), VOCAB, when="untied"),
)

# Qwen2/2.5: Llama plus biases on q/k/v (never on o_proj).
QWEN2_TABLE = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB),
    Rule(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",), COPY),
    Rule(_L + "self_attention.linear_qkv.weight",
         (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"), QKV),
    Rule(_L + "self_attention.linear_qkv.bias",
         (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"), QKV,
         when="qkv_bias"),
    Rule(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), COPY),
    Rule(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",), COPY),
    Rule(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), GATE_UP),
    Rule(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), COPY),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), COPY),
    Rule("output_layer.weight", ("lm_head.weight",), VOCAB, when="untied"),
)

# Qwen3: Llama plus RMSNorm over head_dim on q and k (per head, before RoPE), no biases.
QWEN3_TABLE = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB),
    Rule(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",), COPY),
    Rule(_L + "self_attention.linear_qkv.weight",
         (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"), QKV),
    Rule(_L + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",), COPY, when="qk_norm"),
    Rule(_L + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",), COPY, when="qk_norm"),
    Rule(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), COPY),
    Rule(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",), COPY),
    Rule(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), GATE_UP),
    Rule(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), COPY),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), COPY),
    Rule("output_layer.weight", ("lm_head.weight",), VOCAB, when="untied"),
)

# Qwen3-MoE: Qwen3 attention; dense SwiGLU in the first k layers (mlp_only_layers), else a
# softmax router (float32 on our side) and E routed SwiGLU experts, no shared expert.
_MOE_ROWS = (
    Rule(_L + "mlp.router_weight", (_H + "mlp.gate.weight",), COPY, when="moe_layer"),
    Rule(_L + "mlp.experts.gate_up",
         (_H + "mlp.experts.{e}.gate_proj.weight", _H + "mlp.experts.{e}.up_proj.weight"), EXPERTS_GATE_UP,
         when="moe_layer"),
    Rule(_L + "mlp.experts.down", (_H + "mlp.experts.{e}.down_proj.weight",), EXPERTS_STACK, when="moe_layer"),
)


def _with_moe_mlp(table: tuple) -> tuple:
    """A dense table whose MLP rows hold in the dense layers only, the MoE rows in the others."""
    out = []
    for rule in table:
        if rule.mcore.startswith(_L + "mlp."):
            out.append(dataclasses.replace(rule, when="dense_layer"))
            if rule.mcore.endswith("linear_fc2.weight"):
                out += _MOE_ROWS
        else:
            out.append(rule)
    return tuple(out)


QWEN3_MOE_TABLE = _with_moe_mlp(QWEN3_TABLE)

from r1mega.convert.deepseek_v3 import DEEPSEEK_V3_TABLE  # noqa: E402 (uses Rule and the names above)

FAMILY_TABLES = {"llama": LLAMA_TABLE, "qwen2": QWEN2_TABLE, "qwen3": QWEN3_TABLE,
                 "qwen3_moe": QWEN3_MOE_TABLE, "deepseek_v3": DEEPSEEK_V3_TABLE}

# With the Transformer Engine spec the pre-attention / pre-MLP norms are fused into the next
# linear (TELayerNormColumnParallelLinear) and their weight moves with it.
TE_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}

# HF buffers that are recomputed, never weights.
HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


# ----------------------------------------------------------------------------- pure transforms


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """HF q (nh*d, *r), k (ng*d, *r), v (ng*d, *r) -> megatron (ng*(nh/ng+2)*d, *r).

    Works for weights (r = hidden) and biases (r = ()).
    """
    ng = num_query_groups
    d = k.shape[0] // ng
    rest = q.shape[1:]
    qg = q.reshape(ng, -1, *rest)  # (ng, nh/ng*d, *r)
    kg = k.reshape(ng, d, *rest)  # (ng, d, *r)
    vg = v.reshape(ng, d, *rest)  # (ng, d, *r)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_query_groups: int, head_dim: int):
    """Inverse of :func:`interleave_qkv`: megatron (ng*(nh/ng+2)*d, *r) -> (q, k, v)."""
    ng, d = num_query_groups, head_dim
    hpg = num_heads // ng
    rest = qkv.shape[1:]
    g = qkv.reshape(ng, (hpg + 2) * d, *rest)
    q = g[:, : hpg * d].reshape(num_heads * d, *rest)
    k = g[:, hpg * d: (hpg + 1) * d].reshape(ng * d, *rest)
    v = g[:, (hpg + 1) * d:].reshape(ng * d, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def concat_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(F, H), (F, H) -> (2F, H): megatron's swiglu splits fc1's output in [gate, up] halves."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor):
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def stack_experts_gate_up(parts: list[torch.Tensor]) -> torch.Tensor:
    """[gate_0 (F, H), up_0 (F, H), gate_1, up_1, ...] -> (E, 2F, H), [gate_e; up_e] per expert."""
    return torch.stack([concat_gate_up(g, u) for g, u in zip(parts[0::2], parts[1::2])], dim=0)


def split_experts_gate_up(full: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of :func:`stack_experts_gate_up`: (E, 2F, H) -> [gate_0, up_0, gate_1, up_1, ...]."""
    return [t for e in full.unbind(0) for t in split_gate_up(e)]


def pad_vocab(w: torch.Tensor, padded_vocab_size: int) -> torch.Tensor:
    """(V, H) -> (V_padded, H) with zero rows: the padded logits are exactly 0, and consumers
    (loss, sampling) must ignore columns >= V."""
    extra = padded_vocab_size - w.shape[0]
    if extra < 0:
        raise ConversionError(f"vocabulary of {w.shape[0]} rows does not fit padded size {padded_vocab_size}")
    if extra == 0:
        return w
    return torch.cat([w, w.new_zeros((extra, *w.shape[1:]))], dim=0)


def unpad_vocab(w: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return w[:vocab_size].contiguous()


# ----------------------------------------------------------------------------- expanded tables


@dataclass(frozen=True)
class Entry:
    """One table row with a concrete layer index: full megatron tensor <-> HF tensors."""

    mcore: str
    hf: tuple[str, ...]
    transform: str


def head_dim_of(model_cfg) -> int:
    return getattr(model_cfg, "kv_channels", None) or model_cfg.hidden_size // model_cfg.num_attention_heads


def _active(rule: Rule, model_cfg, layer: int = 0) -> bool:
    if rule.when is None:
        return True
    if rule.when == "untied":
        return not model_cfg.tied_embeddings
    if rule.when in LAYER_CONDITIONS:
        moe = bool(model_cfg.num_experts) and layer >= model_cfg.moe_first_k_dense
        return moe == (rule.when == "moe_layer")
    if rule.when in ("q_lora", "no_q_lora"):  # DeepSeek: low-rank or plain query projection
        return bool(model_cfg.mla.q_lora_rank) == (rule.when == "q_lora")
    return bool(getattr(model_cfg, rule.when))


def _hf_names(rule: Rule, i: int, num_experts: int) -> tuple[str, ...]:
    """The row's HF names for layer ``i``; a "{e}" row lists every expert, expert-major
    (gate_0, up_0, gate_1, up_1, ...), which is the order the EXPERTS_* transforms take."""
    if not any("{e}" in h for h in rule.hf):
        return tuple(h.format(i=i) for h in rule.hf)
    return tuple(h.format(i=i, e=e) for e in range(num_experts) for h in rule.hf)


def family_table(model_cfg) -> tuple[Rule, ...]:
    table = FAMILY_TABLES.get(model_cfg.family)
    if table is None:
        raise ConversionError(
            f"model.family='{model_cfg.family}' has no conversion table; supported: "
            f"{sorted(FAMILY_TABLES)}."
        )
    # A flag the table cannot express must fail here, not silently drop a tensor.
    names = {r.when for r in table}
    if model_cfg.qkv_bias and "qkv_bias" not in names:
        raise ConversionError(f"family '{model_cfg.family}' with qkv_bias=True is not supported; use family qwen2.")
    if model_cfg.qk_norm and "qk_norm" not in names:
        raise ConversionError(f"family '{model_cfg.family}' with qk_norm=True is not supported; use family qwen3.")
    return table


def expand_table(model_cfg, te_names: bool = False) -> list[Entry]:
    """All rows for all layers of ``model_cfg``; ``te_names`` uses the Transformer Engine names."""
    out = []
    num_experts = getattr(model_cfg, "num_experts", 0) or 0
    for rule in family_table(model_cfg):
        # "{i}" expands over layers; "{e}" (HF side only) over experts within one row.
        for i in range(model_cfg.num_layers) if "{i}" in rule.mcore else [0]:
            if not _active(rule, model_cfg, i):
                continue
            mcore = rule.mcore.format(i=i)
            if te_names:
                for old, new in TE_RENAMES.items():
                    if mcore.endswith("." + old):
                        mcore = mcore[: -len(old)] + new
            out.append(Entry(mcore, _hf_names(rule, i, num_experts), rule.transform))
    if getattr(model_cfg, "mtp_num_layers", 0):
        from r1mega.convert.deepseek_v3 import with_mtp_entries

        out = with_mtp_entries(out, model_cfg, num_experts)
    return out


def expected_hf_shapes(model_cfg) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor the table reads, from the config alone (checked before use)."""
    h, d = model_cfg.hidden_size, head_dim_of(model_cfg)
    nh, ng, f, v = model_cfg.num_attention_heads, model_cfg.num_query_groups, model_cfg.ffn_hidden_size, model_cfg.vocab_size
    by_suffix = {
        "embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "norm.weight": (h,),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "q_proj.weight": (nh * d, h), "k_proj.weight": (ng * d, h), "v_proj.weight": (ng * d, h),
        "q_proj.bias": (nh * d,), "k_proj.bias": (ng * d,), "v_proj.bias": (ng * d,),
        "q_norm.weight": (d,), "k_norm.weight": (d,), "o_proj.weight": (h, nh * d),
        "gate_proj.weight": (f, h), "up_proj.weight": (f, h), "down_proj.weight": (h, f),
        # DeepSeek-V3's MTP layer
        "enorm.weight": (h,), "hnorm.weight": (h,), "eh_proj.weight": (h, 2 * h),
        "shared_head.head.weight": (v, h),
    }
    expert = {}  # one routed expert's tensors (the same suffixes, another width)
    if getattr(model_cfg, "num_experts", 0):
        fe = model_cfg.moe_ffn_hidden_size or f
        by_suffix["mlp.gate.weight"] = (model_cfg.num_experts, h)
        expert = {"gate_proj.weight": (fe, h), "up_proj.weight": (fe, h), "down_proj.weight": (h, fe)}
    if model_cfg.family == "deepseek_v3":
        from r1mega.convert.deepseek_v3 import mla_hf_shapes

        by_suffix.update(mla_hf_shapes(model_cfg))
    shapes = {}
    for e in expand_table(model_cfg):
        for name in e.hf:
            # Longest suffix wins: "q_norm.weight" must not match "norm.weight".
            suffix = max((s for s in by_suffix if name.endswith(s)), key=len)
            routed = e.transform in (EXPERTS_GATE_UP, EXPERTS_STACK)
            shapes[name] = expert[suffix] if routed else by_suffix[suffix]
    return shapes


def hf_to_mcore_tensor(entry: Entry, hf_get: Callable[[str], torch.Tensor], model_cfg,
                       padded_vocab_size: int) -> torch.Tensor:
    """The full megatron tensor of one row, from HF tensors fetched by ``hf_get(name)``."""
    parts = [hf_get(n) for n in entry.hf]
    if entry.transform == COPY:
        return parts[0]
    if entry.transform == QKV:
        return interleave_qkv(*parts, num_query_groups=model_cfg.num_query_groups)
    if entry.transform == GATE_UP:
        return concat_gate_up(*parts)
    if entry.transform == VOCAB:
        return pad_vocab(parts[0], padded_vocab_size)
    if entry.transform == VOCAB_SHARED:
        for name, part in zip(entry.hf[1:], parts[1:]):
            if not torch.equal(part, parts[0]):
                raise ConversionError(f"HF tensor '{name}' differs from '{entry.hf[0]}'; r1mega's MTP "
                                      f"shares the model's embedding and head, so they must be equal.")
        return pad_vocab(parts[0], padded_vocab_size)
    if entry.transform == EXPERTS_GATE_UP:
        return stack_experts_gate_up(parts)
    if entry.transform == EXPERTS_STACK:
        return torch.stack(parts, dim=0)
    raise AssertionError(entry.transform)


def mcore_to_hf_tensors(entry: Entry, full: torch.Tensor, model_cfg) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors of one row, from the full megatron tensor."""
    if entry.transform == COPY:
        parts = [full]
    elif entry.transform == QKV:
        parts = split_qkv(full, model_cfg.num_attention_heads, model_cfg.num_query_groups, head_dim_of(model_cfg))
    elif entry.transform == GATE_UP:
        parts = split_gate_up(full)
    elif entry.transform == VOCAB:
        parts = [unpad_vocab(full, model_cfg.vocab_size)]
    elif entry.transform == VOCAB_SHARED:
        parts = [unpad_vocab(full, model_cfg.vocab_size).clone() for _ in entry.hf]  # own storage each
    elif entry.transform == EXPERTS_GATE_UP:
        parts = split_experts_gate_up(full)
    elif entry.transform == EXPERTS_STACK:
        parts = [t.contiguous() for t in full.unbind(0)]
    else:
        raise AssertionError(entry.transform)
    return list(zip(entry.hf, parts))


def check_hf_names(hf_names, model_cfg) -> None:
    """Every HF tensor must be read by the table (else it is a feature we would silently drop)."""
    wanted = {n for e in expand_table(model_cfg) for n in e.hf}
    names = set(hf_names)
    if model_cfg.family == "deepseek_v3":
        from r1mega.convert.deepseek_v3 import drop_unconverted

        names = drop_unconverted(names, model_cfg)
    # A tied checkpoint may still carry lm_head.weight (an identical copy); it is not needed.
    extra = sorted(n for n in names - wanted if not HF_IGNORED.match(n)
                   and not (model_cfg.tied_embeddings and n == "lm_head.weight"))
    missing = sorted(wanted - names)
    if missing:
        raise ConversionError(
            f"HF checkpoint lacks {len(missing)} tensor(s) the '{model_cfg.family}' table needs, "
            f"first: '{missing[0]}'. Is a shard missing, or does config.json not match the weights?"
        )
    if extra:
        raise ConversionError(
            f"HF tensor '{extra[0]}' (and {len(extra) - 1} more) has no row in the "
            f"'{model_cfg.family}' mapping table: the checkpoint uses a feature r1mega does not "
            f"convert. Nothing was written."
        )


def iter_hf_from_mcore(mcore_get: Callable[[str], torch.Tensor], model_cfg,
                       te_names: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    for e in expand_table(model_cfg, te_names):
        yield from mcore_to_hf_tensors(e, mcore_get(e.mcore), model_cfg)
