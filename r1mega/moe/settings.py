"""The MoE keys of ``model`` (``ModelConfig.num_experts`` / ``moe_*``): validation and the frozen
settings one MoE layer is built from.

Pure Python (no torch): ``r1mega.config.validate`` imports it, and a bad MoE config must fail
before any process group exists. Every knob either changes what the layer computes or is
rejected; none is accepted and ignored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ROUTERS = ("softmax", "sigmoid_group")

# model key -> default; any of them set away from its default on a dense model is an error.
_MOE_DEFAULTS = {
    "moe_router_topk": 2, "moe_ffn_hidden_size": 0, "moe_shared_expert_ffn_hidden_size": 0,
    "moe_router": "softmax", "moe_norm_topk_prob": True, "moe_num_groups": 1, "moe_topk_groups": 1,
    "moe_routed_scaling_factor": 1.0, "moe_bias_update_rate": 0.0, "moe_aux_loss_coeff": 0.0,
    "moe_z_loss_coeff": 0.0, "moe_first_k_dense": 0,
}


@dataclass(frozen=True)
class MoESettings:
    """What one MoE layer needs, read once from ``cfg.model``."""
    num_experts: int
    topk: int
    ffn_hidden_size: int            # each routed expert's SwiGLU width
    shared_ffn_hidden_size: int     # 0: no shared expert
    router: str                     # "softmax" | "sigmoid_group"
    norm_topk_prob: bool
    num_groups: int
    topk_groups: int
    routed_scaling_factor: float
    bias_update_rate: float         # 0: no selection bias at all
    aux_loss_coeff: float
    z_loss_coeff: float
    first_k_dense: int
    # DeepSeek-V3's router always carries its selection bias (e_score_correction_bias), frozen
    # when bias_update_rate is 0; other models have one only while balancing moves it.
    selection_bias: bool = False

    @classmethod
    def from_model(cls, m) -> "MoESettings":
        return cls(num_experts=m.num_experts, topk=m.moe_router_topk,
                   ffn_hidden_size=m.moe_ffn_hidden_size or m.ffn_hidden_size,
                   shared_ffn_hidden_size=m.moe_shared_expert_ffn_hidden_size,
                   router=m.moe_router, norm_topk_prob=m.moe_norm_topk_prob,
                   num_groups=m.moe_num_groups, topk_groups=m.moe_topk_groups,
                   routed_scaling_factor=m.moe_routed_scaling_factor,
                   bias_update_rate=m.moe_bias_update_rate, aux_loss_coeff=m.moe_aux_loss_coeff,
                   z_loss_coeff=m.moe_z_loss_coeff, first_k_dense=m.moe_first_k_dense,
                   selection_bias=m.family == "deepseek_v3")

    def with_(self, **changes) -> "MoESettings":
        return dataclasses.replace(self, **changes)

    def is_moe_layer(self, layer_index: int) -> bool:
        """``layer_index``: 0-based over the whole model (all pipeline stages)."""
        return self.num_experts > 0 and layer_index >= self.first_k_dense

    @property
    def bias_enabled(self) -> bool:
        return self.bias_update_rate > 0


def validate_moe(m, p, error) -> None:
    """Checks of ``model.num_experts`` / ``model.moe_*`` against each other and ``parallel``;
    raises ``error`` (ConfigError) naming the key and the fix."""
    e = m.num_experts
    if e < 0:
        raise error(f"model.num_experts must be >= 0 (0: dense), got {e}.")
    if m.family == "qwen3_moe" and not e:
        raise error("model.family=qwen3_moe needs model.num_experts > 0 (Qwen3-30B-A3B: 128).")
    if not e:
        if p.expert > 1:
            raise error(f"parallel.expert={p.expert} but the model has no experts; set parallel.expert=1.")
        changed = [k for k, d in _MOE_DEFAULTS.items() if getattr(m, k) != d]
        if changed:
            raise error(f"model.{changed[0]}={getattr(m, changed[0])!r} has no effect on a dense model "
                        f"(model.num_experts=0); set model.num_experts or remove model.{changed[0]}.")
        return
    if e % p.expert != 0:
        raise error(f"model.num_experts={e} is not divisible by parallel.expert={p.expert}.")
    if not 1 <= m.moe_router_topk <= e:
        raise error(f"model.moe_router_topk must be in [1, model.num_experts={e}], got {m.moe_router_topk}.")
    for key in ("moe_ffn_hidden_size", "moe_shared_expert_ffn_hidden_size", "moe_first_k_dense"):
        if getattr(m, key) < 0:
            raise error(f"model.{key} must be >= 0, got {getattr(m, key)}.")
    for key in ("moe_bias_update_rate", "moe_aux_loss_coeff", "moe_z_loss_coeff"):
        if getattr(m, key) < 0:
            raise error(f"model.{key} must be >= 0 (0: off), got {getattr(m, key)}.")
    if m.moe_routed_scaling_factor <= 0:
        raise error(f"model.moe_routed_scaling_factor must be > 0, got {m.moe_routed_scaling_factor}.")
    if m.moe_router not in ROUTERS:
        raise error(f"model.moe_router: '{m.moe_router}' is not one of {list(ROUTERS)}.")
    if m.moe_router == "softmax":
        if m.moe_num_groups != 1 or m.moe_topk_groups != 1:
            raise error("model.moe_num_groups / model.moe_topk_groups apply to moe_router=sigmoid_group "
                        "only; set them to 1 or use moe_router=sigmoid_group.")
        if m.moe_bias_update_rate:
            raise error("model.moe_bias_update_rate (auxiliary-loss-free balancing) biases the "
                        "sigmoid_group router's selection; set moe_router=sigmoid_group or the rate to 0.")
    else:
        g, tg = m.moe_num_groups, m.moe_topk_groups
        if g < 1 or e % g != 0:
            raise error(f"model.moe_num_groups={g} must be >= 1 and divide model.num_experts={e}.")
        if not 1 <= tg <= g:
            raise error(f"model.moe_topk_groups={tg} must be in [1, model.moe_num_groups={g}].")
        if m.moe_router_topk > tg * (e // g):
            raise error(f"model.moe_router_topk={m.moe_router_topk} exceeds the {tg * (e // g)} experts "
                        f"of the {tg} selected groups; raise model.moe_topk_groups.")
    if m.moe_first_k_dense >= m.num_layers:
        raise error(f"model.moe_first_k_dense={m.moe_first_k_dense} leaves no MoE layer among "
                    f"model.num_layers={m.num_layers}; use a dense model (num_experts=0) instead.")
    if m.spec == "te":
        raise error("model.spec=te has no MoE layer here (megatron's MoE router needs TE's GEMM and "
                    "the grouped_gemm package); set model.spec=local or auto for an MoE model.")
    # Tensor parallelism: experts whole on each rank (expert-TP = 1), tokens split by sequence
    # parallelism (r1mega/moe/tensor_parallel.py).
    if p.tensor > 1 and p.expert > 1 and not p.sequence_parallel:
        raise error(f"parallel.tensor={p.tensor} with parallel.expert={p.expert} needs "
                    "parallel.sequence_parallel=true: each TP rank then routes its own sequence "
                    "shard (without it every token would cross the expert all-to-all once per TP "
                    "rank). Set parallel.sequence_parallel=true, or parallel.expert=1.")
    if p.tensor > 1 and p.sequence_parallel and (m.moe_aux_loss_coeff or m.moe_z_loss_coeff):
        raise error("model.moe_aux_loss_coeff / moe_z_loss_coeff with parallel.sequence_parallel is "
                    "not implemented: each TP rank sees only a shard of every sequence, and the "
                    "sequence-level loss needs all of it. Use moe_bias_update_rate (aux-loss-free "
                    "balancing) or parallel.sequence_parallel=false.")
    if m.recompute != "none":
        raise error(f"model.recompute={m.recompute} with MoE layers is not implemented: a recomputed "
                    "forward would count expert loads and balance losses twice. Set model.recompute=none.")
    if p.pipeline > 1 and (m.moe_aux_loss_coeff or m.moe_z_loss_coeff):
        raise error("model.moe_aux_loss_coeff / moe_z_loss_coeff with parallel.pipeline > 1 is not "
                    "implemented: only the last stage's balance losses would reach the loss. Use "
                    "moe_bias_update_rate (aux-loss-free balancing) or parallel.pipeline=1.")
