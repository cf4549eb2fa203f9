"""Attention over the paged KV cache for a ragged batch of sequences.

A step's batch is a list of sequences; sequence ``b`` contributes ``q_len[b]`` new tokens (its
whole prompt in a prefill, one token in a decode) and, after this step's K/V were written into
the cache, has ``ctx_len[b]`` tokens cached. Its new tokens sit at positions
``ctx_len[b] - q_len[b] .. ctx_len[b] - 1``; each attends causally to every cached token up to
its own position.

Three implementations, all exact and interchangeable (tests compare them):

- :func:`attend_gather` reads the cache through the block tables into padded dense K/V and runs
  SDPA with a mask. It handles every batch (prefill on top of a cached prefix after a
  preemption, decode) and is the CPU path and the reference on GPU.
- :func:`attend_fresh` is a prefill of sequences with nothing cached before: it needs no cache
  read at all, only right-padded causal SDPA on the new q/k/v (flash kernels on GPU).
- the Triton kernel in :mod:`r1mega.rollout.triton_paged` reads the paged cache directly for
  decode steps on GPU, without a gather copy, and fits in a CUDA graph.

With an FP8 cache (kv_cache.py) the readers take its per-(token, head) scales too; the gather
paths dequantise what they gathered into q's dtype. :func:`attend_fresh` never reads the cache:
a fresh prefill attends over the unquantised K/V of its own tokens, and only later reads (decode,
a prefill on top of a cached prefix) see the FP8 copies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from r1mega.rollout.kv_cache import dequantize_rows


@dataclass
class AttentionBatch:
    """Per-step attention metadata; device tensors, plus host copies that size the padding."""

    slots: torch.Tensor  # (T,) int64 cache slot of each new token
    positions: torch.Tensor  # (T,) int64 position of each new token in its sequence
    q_lens: list[int]  # host, (B,)
    ctx_lens: torch.Tensor  # (B,) int32 cached tokens after this step
    ctx_lens_host: list[int]
    block_tables: torch.Tensor  # (B, max_blocks) int32
    block_tokens: int
    # (B, max_q) row of each padded query in the flat (T,) token order; -1 for padding.
    q_index: Optional[torch.Tensor] = None

    @property
    def is_decode(self) -> bool:
        return all(q == 1 for q in self.q_lens)

    @property
    def is_fresh_prefill(self) -> bool:
        return all(q == c for q, c in zip(self.q_lens, self.ctx_lens_host))


def prefill_positions_slots(q_lens: list[int], block_tables: torch.Tensor,
                            block_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefill's new tokens, sequence after sequence, each from position 0: their positions and
    cache slots, (T,) int64 each, on block_tables' device (B, max_blocks). Built there by tensor
    ops, not by a host loop over every prompt token (which keeps the GPU idle)."""
    dev = block_tables.device
    total = sum(q_lens)
    lens = torch.tensor(q_lens, dtype=torch.int64).to(dev, non_blocking=True)
    seq = torch.repeat_interleave(torch.arange(len(q_lens), device=dev), lens, output_size=total)
    starts = torch.cumsum(lens, 0) - lens
    positions = torch.arange(total, device=dev) - starts[seq]                      # (T,)
    slots = block_tables.long()[seq, positions // block_tokens] * block_tokens + positions % block_tokens
    return positions, slots


def padded_query_index(q_lens: list[int], device) -> torch.Tensor:
    """(B, max_q) flat token row of each sequence's i-th new token, -1 past its end."""
    max_q = max(q_lens)
    starts = torch.tensor([0] + q_lens[:-1], dtype=torch.int64).cumsum(0)
    i = torch.arange(max_q, dtype=torch.int64)
    lens = torch.tensor(q_lens, dtype=torch.int64)
    idx = torch.where(i[None, :] < lens[:, None], starts[:, None] + i[None, :], -1)
    return idx.to(device)


def _pad_rows(x: torch.Tensor, q_index: torch.Tensor) -> torch.Tensor:
    """(T, H, D) -> (B, H, max_q, D) gathering rows by q_index (padding rows read row 0)."""
    rows = x[q_index.clamp(min=0)]  # (B, max_q, H, D)
    return rows.transpose(1, 2)


def _unpad_rows(out: torch.Tensor, q_index: torch.Tensor, total: int) -> torch.Tensor:
    """(B, H, max_q, D) -> (T, H, D) keeping only real query rows.

    No boolean-mask indexing: its output size is data-dependent, a device sync per call (60 in one
    SmolLM2 GRPO step on the H200: 30 layers x 2 prefill steps). Each real row's padded position
    is scattered into a (T + 1,) map instead; padding rows all land in the spare last slot."""
    b, h, max_q, d = out.shape
    o = out.transpose(1, 2).reshape(b * max_q, h, d)
    dest = torch.where(q_index >= 0, q_index, total).reshape(-1)  # (B * max_q,)
    src = torch.arange(b * max_q, device=out.device)
    pos = torch.zeros(total + 1, dtype=torch.int64, device=out.device).scatter_(0, dest, src)
    return o.index_select(0, pos[:total])


def _sdpa(q, k, v, *, mask=None, is_causal=False, scale):
    """SDPA with grouped-query heads: q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D)."""
    # Query head h uses KV head h // (Hq / Hkv) (megatron's per-group interleaving gives this
    # order). enable_gqa reads the shared KV heads in place (3x faster on CPU than repeating
    # them) and is the call the training forward's core attention makes.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def attend_fresh(q, k, v, batch: AttentionBatch, scale: float) -> torch.Tensor:
    """Prefill with no cached prefix. q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D)."""
    if len(set(batch.q_lens)) == 1:
        # Equal lengths: the padded layout is a plain reshape.
        b, s = len(batch.q_lens), batch.q_lens[0]
        qb, kb, vb = (t.view(b, s, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        out = _sdpa(qb, kb, vb, is_causal=True, scale=scale)  # (B, Hq, S, D)
        return out.transpose(1, 2).reshape(q.shape)
    # Right padding keeps causal SDPA exact for the real rows: a real query's keys (positions up
    # to its own) are all real; padded query rows are computed and dropped.
    qi = batch.q_index
    out = _sdpa(_pad_rows(q, qi), _pad_rows(k, qi), _pad_rows(v, qi), is_causal=True, scale=scale)
    return _unpad_rows(out, qi, q.shape[0])


def gather_slots(batch: AttentionBatch, max_ctx: int) -> torch.Tensor:
    """(B, max_ctx) cache slot of each sequence's j-th token (entries past ctx_len are junk)."""
    bt = batch.block_tables.long()
    j = torch.arange(max_ctx, device=bt.device)
    blocks = bt.gather(1, (j // batch.block_tokens).clamp(max=bt.shape[1] - 1)[None, :].expand(bt.shape[0], -1))
    return blocks * batch.block_tokens + (j % batch.block_tokens)[None, :]


def gather_kv(q, k_cache, v_cache, slots, k_scale=None, v_scale=None):
    """K and V of the (B, L) cache slots as (B, Hkv, L, D) in q's dtype: an FP8 cache's rows are
    dequantised with their scales (N, bs, Hkv)."""
    hkv, d = k_cache.shape[-2], k_cache.shape[-1]
    if k_scale is None:
        k = k_cache.view(-1, hkv, d)[slots]  # (B, L, Hkv, D)
        v = v_cache.view(-1, hkv, d)[slots]
    else:  # e4m3 rows gathered as their bytes: indexing kernels need not cover float8 dtypes
        k = k_cache.view(torch.uint8).view(-1, hkv, d)[slots].view(k_cache.dtype)
        v = v_cache.view(torch.uint8).view(-1, hkv, d)[slots].view(v_cache.dtype)
        k = dequantize_rows(k, k_scale.view(-1, hkv)[slots], q.dtype)
        v = dequantize_rows(v, v_scale.view(-1, hkv)[slots], q.dtype)
    return k.transpose(1, 2), v.transpose(1, 2)


def attend_gather(q, k_cache, v_cache, batch: AttentionBatch, scale: float,
                  k_scale=None, v_scale=None) -> torch.Tensor:
    """Any batch, reading K/V from the cache. q (T, Hq, D); caches (N, bs, Hkv, D) -> (T, Hq, D);
    ``k_scale``/``v_scale`` (N, bs, Hkv): an FP8 cache's scales."""
    max_ctx = max(batch.ctx_lens_host)
    slots = gather_slots(batch, max_ctx)  # (B, max_ctx)
    k, v = gather_kv(q, k_cache, v_cache, slots, k_scale, v_scale)  # (B, Hkv, max_ctx, D)
    qi = batch.q_index
    q_lens = torch.tensor(batch.q_lens, device=q.device)
    i = torch.arange(qi.shape[1], device=q.device)
    ctx = batch.ctx_lens.long()
    q_pos = ctx[:, None] - q_lens[:, None] + i[None, :]  # (B, max_q)
    j = torch.arange(max_ctx, device=q.device)
    mask = j[None, None, :] <= q_pos[:, :, None]  # causal, and within ctx since q_pos < ctx
    # Padded query rows see key 0 only, so no row is fully masked (which would give NaN).
    mask = mask | ((qi < 0)[:, :, None] & (j == 0)[None, None, :])
    out = _sdpa(_pad_rows(q, qi), k, v, mask=mask[:, None], scale=scale)
    return _unpad_rows(out, qi, q.shape[0])


def attend_decode_gather(q, k_cache, v_cache, block_tables, ctx_lens, scale: float,
                         k_scale=None, v_scale=None) -> torch.Tensor:
    """Decode (one query per row) from device tensors only: the whole block-table width is
    gathered, so no host value sizes anything (the CPU stand-in of the Triton kernel, and what
    runs the packed graph-step code on CPU). q (B, Hq, D) -> (B, Hq, D); scales as attend_gather."""
    bs = k_cache.shape[1]
    max_ctx = block_tables.shape[1] * bs
    j = torch.arange(max_ctx, device=q.device)
    slots = block_tables.long().gather(1, (j // bs)[None, :].expand(block_tables.shape[0], -1)) * bs + j % bs
    k, v = gather_kv(q, k_cache, v_cache, slots, k_scale, v_scale)  # (B, Hkv, max_ctx, D)
    mask = j[None, :] < ctx_lens.long()[:, None]  # (B, max_ctx)
    out = _sdpa(q[:, :, None, :], k, v, mask=mask[:, None, None, :], scale=scale)
    return out[:, :, 0, :]


def _e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.float().to(torch.float8_e4m3fn).double()


def attend_decode_f8_dots(q, k_cache, v_cache, block_tables, ctx_lens, scale: float,
                          k_scale, v_scale, block_n: int) -> torch.Tensor:
    """float64 reference of the paged decode kernel's FP8 x FP8 dots (``f8_dots``,
    r1mega/rollout/triton_paged.py) on an FP8 cache: q rounded to e4m3 per head after scaling by
    the power of two that puts its largest entry in [128, 256); an online softmax over tiles of
    ``block_n`` keys, each tile's probabilities times v_scale / (the tile's largest v_scale)
    rounded to e4m3 after scaling by 2^8. q (B, Hq, D) -> (B, Hq, D) float64."""
    b, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    qd = q.double()
    bits = qd.abs().amax(-1, keepdim=True).float().view(torch.int32) >> 23   # amax's biased exponent
    mult = torch.exp2((134 - bits).clamp(-126, 126).double())
    q8 = _e4m3(qd * mult) / mult
    max_ctx = block_tables.shape[1] * bs
    j = torch.arange(max_ctx, device=q.device)
    slots = block_tables.long().gather(1, (j // bs)[None, :].expand(b, -1)) * bs + j % bs
    group = hq // hkv
    k = k_cache.reshape(-1, hkv, d)[slots].double().repeat_interleave(group, 2)  # (B, n, Hq, D)
    v = v_cache.reshape(-1, hkv, d)[slots].double().repeat_interleave(group, 2)
    ks = k_scale.reshape(-1, hkv)[slots].double().repeat_interleave(group, 2)    # (B, n, Hq)
    vs = v_scale.reshape(-1, hkv)[slots].double().repeat_interleave(group, 2)
    ctx = ctx_lens.long()[:, None]                                                # (B, 1)
    s = torch.einsum("bhd,bnhd->bhn", q8, k) * ks.transpose(1, 2) * scale        # (B, Hq, n)
    s = s.masked_fill(~(j[None, :] < ctx)[:, None, :], float("-inf"))
    m = torch.full((b, hq), float("-inf"), dtype=torch.float64, device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(b, hq, d, dtype=torch.float64, device=q.device)
    for t0 in range(0, max_ctx, block_n):
        live = (t0 < ctx)                                        # (B, 1): the kernel's loop bound
        st = s[..., t0:t0 + block_n]
        m_new = torch.maximum(m, st.amax(-1))
        alpha = torch.exp(m - m_new).nan_to_num(0.0)
        p = torch.exp(st - m_new[..., None])                     # masked keys: 0
        w = vs[:, t0:t0 + block_n].transpose(1, 2) * torch.isfinite(st)
        v_max = w.amax(-1, keepdim=True)
        p8 = _e4m3(p * (w / v_max.clamp(min=1e-300)) * 256.0) / 256.0
        pv = torch.einsum("bhn,bnhd->bhd", p8, v[:, t0:t0 + block_n]) * v_max
        acc = torch.where(live[..., None], acc * alpha[..., None] + pv, acc)
        l = torch.where(live, l * alpha + p.sum(-1), l)
        m = torch.where(live, m_new, m)
    return acc / l[..., None]
