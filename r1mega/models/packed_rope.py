"""RoPE on packed (THD) sequences without megatron's per-sequence Python loop.

megatron-core 0.16.1's unfused THD RoPE (``rope_utils._apply_rotary_pos_emb_thd``) reads the
sequence lengths back to the host (``.tolist()``, a device sync) and then slices and
concatenates the frequencies once per sequence, for q and for k, in every layer: a GRPO
micro-batch of 64 completions through SmolLM2's 30 layers is ~4,000 tiny kernels and 60 syncs per
forward. Here each token's position inside its sequence comes from ``cu_seqlens`` on the device
(searchsorted, no sync), the frequencies are gathered once per micro-batch (cached on the
``cu_seqlens`` tensor object that every layer receives) and the rotation is megatron's own bshd
function: the same arithmetic, bit for bit.

:func:`install` swaps the ``apply_rotary_pos_emb`` that megatron's attention module calls for a
wrapper that takes this path for unfused, context-parallel-free THD calls and hands every other
call (bshd, fused RoPE, context parallelism, MLA) to megatron unchanged.

Under torch.compile the cache is skipped (a dict of weakrefs is opaque to dynamo): the gather is
pure tensor code in the graph. A compiled layer from :func:`r1mega.models.compile.compile_layers`
receives per-token frequencies instead (gathered here, eagerly, once per micro-batch), so inside
the graph it takes the first branch of :func:`packed_freqs` and gathers nothing.
"""
from __future__ import annotations

import weakref

import torch
from megatron.core.models.common.embeddings import rope_utils

from r1mega.models.attention import packed_seq_ids

_original = rope_utils.apply_rotary_pos_emb
_cache: dict = {}  # "key" -> (weakref(cu_seqlens), weakref(freqs), T, packed freqs)


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(T,) position of each packed token inside its own sequence, computed on the device."""
    idx = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return (idx - cu_seqlens[packed_seq_ids(cu_seqlens, total)]).long()


def packed_freqs(freqs: torch.Tensor, cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """freqs (max_s, 1, 1, d) -> (T, 1, 1, d) for the packed tokens, as megatron maps them."""
    if freqs.size(0) == total:
        # megatron's "exact mapping" case: sequence i takes freqs[cu[i] : cu[i] + len_i], which
        # for sequences laid end to end is freqs itself.
        return freqs
    if torch.compiler.is_compiling():
        return freqs[packed_positions(cu_seqlens, total)]
    hit = _cache.get("key")
    if hit is not None and hit[0]() is cu_seqlens and hit[1]() is freqs and hit[2] == total:
        return hit[3]
    out = freqs[packed_positions(cu_seqlens, total)]
    _cache["key"] = (weakref.ref(cu_seqlens), weakref.ref(freqs), total, out)
    return out


def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale: float = 1.0, cp_group=None):
    """Drop-in for megatron's ``apply_rotary_pos_emb`` (same signature)."""
    if (cu_seqlens is None or config.apply_rope_fusion or config.multi_latent_attention
            or (cp_group is not None and cp_group.size() > 1) or t.dim() != 3):
        return _original(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)
    fp = packed_freqs(freqs, cu_seqlens, t.shape[0])
    return rope_utils._apply_rotary_pos_emb_bshd(
        t.unsqueeze(1), fp, rotary_interleaved=config.rotary_interleaved,
        multi_latent_attention=False, mscale=mscale,
    ).squeeze(1)


def install() -> None:
    """Route megatron's attention through :func:`apply_rotary_pos_emb` (idempotent)."""
    from megatron.core.transformer import attention

    attention.apply_rotary_pos_emb = apply_rotary_pos_emb
