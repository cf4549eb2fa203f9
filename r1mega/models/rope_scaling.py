"""Llama 3.1/3.2 RoPE scaling ("llama3") applied to megatron's rotary embedding.

megatron-core 0.16.1's ``RotaryEmbedding(rope_scaling=True, rope_scaling_factor=f)`` forwards only
the factor: ``low_freq_factor``, ``high_freq_factor`` and ``original_max_position_embeddings`` stay
at Llama 3.1's 1 / 4 / 8192 whatever the checkpoint says (Llama 3.2 and fine-tunes may differ). So
the model is built with plain RoPE and its inverse frequencies are then replaced here, from every
field of the config; the rule is transformers' ``_compute_llama3_parameters``, op for op.
"""
from __future__ import annotations

import math

import torch

from r1mega.config import RopeScalingConfig


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: RopeScalingConfig) -> torch.Tensor:
    """Scaled copy of the plain RoPE inverse frequencies ``inv_freq`` (head_dim/2,)."""
    factor = scaling.factor
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / low    # longer wavelengths: slowed down by `factor`
    high_freq_wavelen = old_context / high  # shorter wavelengths: untouched
    wavelen = 2 * math.pi / inv_freq                                              # (D/2,)
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    # In between, blend the two linearly in old_context / wavelen (0 at `low`, 1 at `high`).
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope_scaling(rotary: torch.nn.Module, scaling: RopeScalingConfig) -> None:
    """Replace ``rotary.inv_freq`` (a megatron ``RotaryEmbedding`` built without scaling) by its
    ``scaling`` version; a no-op for ``type: none``."""
    if scaling.type == "none":
        return
    if scaling.type != "llama3":
        raise ValueError(f"model.rope_scaling.type={scaling.type!r}: only 'none' and 'llama3' exist.")
    rotary.inv_freq = llama3_inv_freq(rotary.inv_freq, scaling)
    # megatron lru-caches the embedding per (module, length): drop any built from the old table.
    cache_clear = getattr(type(rotary).forward, "cache_clear", None)
    if cache_clear is not None:
        cache_clear()
