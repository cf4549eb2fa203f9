"""YaRN RoPE scaling (``rope_scaling.type: yarn``), DeepSeek's variant included.

YaRN keeps the high-frequency RoPE dimensions (many rotations within the original context) as
they are, divides the low-frequency ones by ``factor`` (interpolation), and ramps linearly between
the two over the dimensions whose rotation count within ``original_max_position_embeddings`` lies
between ``beta_slow`` and ``beta_fast``. It also sharpens attention by an "attention factor" that
multiplies cos and sin (so every rotated q.k product by its square). The rule is transformers'
``_compute_yarn_parameters`` (which DeepSeek-V3's own code also computes), op for op, so that a
converted checkpoint sees the very frequencies its reference implementation uses.

DeepSeek's MLA additionally multiplies the softmax scale by ``yarn_get_mscale(factor,
mscale_all_dim) ** 2`` (:func:`mla_softmax_scale`), and rotates only the 64 RoPE channels.
"""
from __future__ import annotations

import math

import torch


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """0.1 * mscale * ln(scale) + 1 for scale > 1, else 1 (the YaRN paper's sqrt(1/t))."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(scaling) -> float:
    """The factor on cos/sin. DeepSeek configs give both mscales (V3: 1 and 1, so 1.0); others
    get the paper's default from ``factor`` alone."""
    if scaling.mscale and scaling.mscale_all_dim:
        return yarn_get_mscale(scaling.factor, scaling.mscale) / yarn_get_mscale(scaling.factor,
                                                                               scaling.mscale_all_dim)
    return yarn_get_mscale(scaling.factor)


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The RoPE dimension index that turns ``num_rotations`` times over ``max_pos`` positions."""
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_inv_freq(dim: int, base: float, scaling) -> torch.Tensor:
    """(dim/2,) float32 inverse frequencies for a rotary width ``dim`` and RoPE ``base``."""
    old = scaling.original_max_position_embeddings
    low = math.floor(_correction_dim(scaling.beta_fast, dim, base, old))
    high = math.ceil(_correction_dim(scaling.beta_slow, dim, base, old))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a one-dimension ramp would divide by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)   # (dim/2,)
    extrapolation = 1.0 / pos_freqs                     # original frequencies (high-frequency end)
    interpolation = 1.0 / (scaling.factor * pos_freqs)  # slowed down by `factor` (low-frequency end)
    keep = 1 - ramp                                     # 1: keep the original frequency
    return interpolation * (1 - keep) + extrapolation * keep


def mla_softmax_scale(q_head_dim: int, scaling) -> float:
    """DeepSeek MLA's softmax scale: 1/sqrt(d_qk), times mscale(factor, mscale_all_dim)^2 under
    YaRN (transformers' ``yarn_apply_mscale``; megatron's MultiLatentAttention computes the same)."""
    scale = q_head_dim ** -0.5
    if scaling.type == "yarn" and scaling.mscale_all_dim:
        m = yarn_get_mscale(scaling.factor, scaling.mscale_all_dim)
        scale = scale * m * m
    return scale
