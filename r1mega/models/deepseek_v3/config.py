"""The multi-head latent attention (MLA) keys of ``model.mla`` and their checks.

Pure Python (no torch): ``r1mega.config`` imports it, and a bad MLA config must fail before any
process group exists. The section is used by ``model.family: deepseek_v3`` only; any other family
must leave it at its defaults (nothing else would read it).

MLA (DeepSeek-V2/V3) projects the hidden state to a query latent of ``q_lora_rank`` (0: one plain
query projection, as in DeepSeek-V2-Lite) and a key/value latent of ``kv_lora_rank`` plus one
RoPE key of ``qk_rope_head_dim`` shared by all heads; per head the query/key are
``qk_nope_head_dim + qk_rope_head_dim`` wide and the value ``v_head_dim``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class MLAConfig:
    """DeepSeek-V3's values are q_lora_rank 1536, kv_lora_rank 512, 128 / 64 / 128."""
    q_lora_rank: int = 0
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16

    @property
    def q_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


def mla_parameters(m) -> int:
    """Parameters of one MLA block (projections and latent norms), for FLOP counts."""
    a, h, n = m.mla, m.hidden_size, m.num_attention_heads
    q = h * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * n * a.q_head_dim if a.q_lora_rank \
        else h * n * a.q_head_dim
    kv = h * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank \
        + a.kv_lora_rank * n * (a.qk_nope_head_dim + a.v_head_dim)
    return q + kv + n * a.v_head_dim * h


def validate_mtp(m, p, error) -> None:
    """``model.mtp_num_layers`` / ``mtp_loss_weight``: deepseek_v3 only, one pipeline stage."""
    if m.mtp_num_layers < 0:
        raise error(f"model.mtp_num_layers must be >= 0 (0: no multi-token prediction), got {m.mtp_num_layers}.")
    if m.mtp_loss_weight < 0:
        raise error(f"model.mtp_loss_weight must be >= 0, got {m.mtp_loss_weight}.")
    if not m.mtp_num_layers:
        return
    if m.family != "deepseek_v3":
        raise error(f"model.mtp_num_layers={m.mtp_num_layers}: multi-token prediction is built for "
                    f"model.family=deepseek_v3 only (its modules are MLA layers); set it to 0.")
    if p.pipeline > 1:
        raise error(f"model.mtp_num_layers with parallel.pipeline={p.pipeline} is not implemented: the "
                    f"MTP modules need the embedding, which only the first stage holds. Use "
                    f"parallel.pipeline=1 or model.mtp_num_layers=0.")


def validate_mla(m, p, error) -> None:
    """Checks of ``model.mla`` against the family and ``parallel``; raises ``error`` naming the key."""
    validate_mtp(m, p, error)
    if m.family != "deepseek_v3":
        if m.mla != MLAConfig():
            changed = next(f.name for f in dataclasses.fields(MLAConfig)
                           if getattr(m.mla, f.name) != getattr(MLAConfig(), f.name))
            raise error(f"model.mla.{changed} has no effect on model.family={m.family!r} (only "
                        f"deepseek_v3 has latent attention); remove it or set model.family=deepseek_v3.")
        return
    a = m.mla
    for key in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
        if getattr(a, key) < 1:
            raise error(f"model.mla.{key} must be >= 1, got {getattr(a, key)}.")
    if a.q_lora_rank < 0:
        raise error(f"model.mla.q_lora_rank must be >= 0 (0: a plain query projection), got {a.q_lora_rank}.")
    if a.qk_rope_head_dim < 2 or a.qk_rope_head_dim % 2:
        raise error(f"model.mla.qk_rope_head_dim must be even and >= 2 (RoPE rotates pairs), "
                    f"got {a.qk_rope_head_dim}.")
    if m.num_query_groups != m.num_attention_heads:
        raise error(f"model.num_query_groups={m.num_query_groups} must equal model.num_attention_heads="
                    f"{m.num_attention_heads} for deepseek_v3: MLA has one key/value per head "
                    f"(the latent is shared, not grouped).")
    if m.kv_channels or m.qkv_bias or m.qk_norm:
        raise error("model.kv_channels / qkv_bias / qk_norm do not apply to deepseek_v3 (MLA sets its "
                    "head sizes in model.mla.*, has no q/k/v biases and norms the latents); remove them.")
    if m.spec == "te":
        raise error("model.spec=te has no MLA layer here (r1mega builds megatron's MLASelfAttention "
                    "from local modules); set model.spec=local or auto.")
    if m.rope_scaling.type not in ("none", "yarn"):
        raise error(f"model.rope_scaling.type={m.rope_scaling.type!r}: DeepSeek-V3 uses 'yarn' or "
                    f"plain RoPE ('none').")
    rs = m.rope_scaling
    if rs.type == "yarn" and rs.factor > 1 and not (rs.mscale and rs.mscale == rs.mscale_all_dim):
        # Then YaRN's factor on cos/sin differs from 1 and would scale only the RoPE channels.
        raise error(f"model.rope_scaling.mscale={rs.mscale} / mscale_all_dim={rs.mscale_all_dim}: "
                    f"deepseek_v3 implements YaRN with equal, nonzero mscale and mscale_all_dim "
                    f"(every DeepSeek-V2/V3 config: 0.707/0.707 or 1/1).")
    # megatron's ColumnParallelLinear shards the down projections' outputs before gathering them.
    for name, width in (("q_lora_rank", a.q_lora_rank),
                        ("kv_lora_rank + qk_rope_head_dim", a.kv_lora_rank + a.qk_rope_head_dim)):
        if width and width % p.tensor:
            raise error(f"model.mla.{name}={width} is not divisible by parallel.tensor={p.tensor}; "
                        f"the latent projections are split over TP ranks.")
    if p.context > 1:
        raise error("parallel.context > 1 with deepseek_v3 (MLA) is not implemented; set parallel.context=1.")
