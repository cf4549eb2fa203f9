"""RoPE scaling applied to megatron's rotary embedding: Llama 3.1/3.2's "llama3" and YaRN ("yarn",
r1mega/models/yarn.py).

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


def apply_rope_scaling(rotary: torch.nn.Module, scaling: RopeScalingConfig,
                       theta: float = 10000.0) -> None:
    """Replace ``rotary.inv_freq`` (a megatron ``RotaryEmbedding`` built without scaling, RoPE base
    ``theta``) by its ``scaling`` version; a no-op for ``type: none``. YaRN's attention factor is
    not in the frequencies: the caller puts it into the softmax scale (see gpt.py)."""
    if scaling.type == "none":
        return
    if scaling.type == "llama3":
        new = llama3_inv_freq(rotary.inv_freq, scaling)
    elif scaling.type == "yarn":
        from r1mega.models.yarn import yarn_inv_freq

        new = yarn_inv_freq(2 * rotary.inv_freq.numel(), theta, scaling)
    else:
        raise ValueError(f"model.rope_scaling.type={scaling.type!r}: only 'none', 'llama3' and "
                         f"'yarn' exist.")
    rotary.inv_freq = new.to(device=rotary.inv_freq.device, dtype=rotary.inv_freq.dtype)
    # megatron lru-caches the embedding per (module, length): drop any built from the old table.
    cache_clear = getattr(type(rotary).forward, "cache_clear", None)
    if cache_clear is not None:
        cache_clear()
