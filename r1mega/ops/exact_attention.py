"""Attention with one reduction order per query, shared by training and the rollout (``rollout.exact``).

Training attends packed sequences (THD) with a block-causal kernel; the rollout attends a paged
KV cache, decode steps one query per sequence. Their kernels split the keys differently, so the
same query gets different bits. Here both call :func:`exact_attention`: each query walks its own
sequence's keys from position 0 in blocks of :data:`KEY_BLOCK`, with an online softmax whose
every reduction is a fixed tree (r1mega/ops/batch_invariant.py). A query's result depends only on
its own q and its sequence's K/V up to its position:

- keys past the query's position (and junk cache slots past a sequence's end) are masked with
  ``where``, so they contribute exact zeros whatever they hold;
- a block wholly past the query changes nothing bit for bit (its max is -inf, the rescale factor
  is exp(0) = 1 and the added sums are 0), so walking more blocks than a query needs (a decode
  batch sized by its longest context, a micro-batch by its longest sequence) is harmless.

This is plain tensor code (elementwise products and tree sums), hence batch-invariant on CPU and
CUDA alike; it materialises q*k per key block, so it is a correctness path, not a fast one. On
CUDA with power-of-two head sizes both entry points run one Triton kernel instead
(r1mega/ops/triton_exact_attention.py: the same walk, the same kernel in training and rollout).
Backward recomputes through the native packed SDPA (gradients need no bitwise match).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from r1mega.ops import triton_exact_attention as tea
from r1mega.ops.batch_invariant import det_exp, tree_max, tree_sum

KEY_BLOCK = 16  # keys per online-softmax step; fixed, so every path splits keys the same way
_CHUNK_ELEMENTS = 1 << 24  # bound on one block's (queries, keys, heads, dim) product


def exact_attention(q: torch.Tensor, k_seq: torch.Tensor, v_seq: torch.Tensor, q_seq: torch.Tensor,
                    q_pos: torch.Tensor, scale: float, num_blocks: Optional[int] = None) -> torch.Tensor:
    """q (N, Hq, D); k_seq/v_seq (B, L, Hkv, D), sequence b's keys by position (L a multiple of
    KEY_BLOCK); q_seq (N,) each query's sequence; q_pos (N,) its position -> (N, Hq, D), causal.
    ``num_blocks``: key blocks to walk (default all of L; must cover every query's position)."""
    n, hq, d = q.shape
    b, L, hkv, _ = k_seq.shape
    if L % KEY_BLOCK:
        raise ValueError(f"exact_attention: key length {L} is not a multiple of {KEY_BLOCK}")
    nb = L // KEY_BLOCK if num_blocks is None else int(num_blocks)
    per_query = KEY_BLOCK * hq * d
    step = max(1, _CHUNK_ELEMENTS // per_query)
    outs = [_attend_chunk(q[i:i + step], k_seq, v_seq, q_seq[i:i + step], q_pos[i:i + step], scale, nb)
            for i in range(0, n, step)]
    return (torch.cat(outs) if outs else q.new_zeros(q.shape)).to(q.dtype)


def _attend_chunk(q, k_seq, v_seq, q_seq, q_pos, scale: float, nb: int) -> torch.Tensor:
    n, hq, d = q.shape
    hkv = k_seq.shape[2]
    g = hq // hkv
    qf = q.float().view(n, 1, hkv, g, d)
    m = torch.full((n, hkv, g), float("-inf"), device=q.device)
    l = torch.zeros(n, hkv, g, device=q.device)
    acc = torch.zeros(n, hkv, g, d, device=q.device)
    kidx = torch.arange(KEY_BLOCK, device=q.device)
    seq = q_seq.long()
    for j in range(nb):
        start = j * KEY_BLOCK
        kb = k_seq[seq, start:start + KEY_BLOCK].float()  # (n, KB, Hkv, D)
        vb = v_seq[seq, start:start + KEY_BLOCK].float()
        valid = (start + kidx)[None, :] <= q_pos[:, None]  # (n, KB)
        s = tree_sum(qf * kb[:, :, :, None, :], -1) * scale  # (n, KB, Hkv, G)
        s = torch.where(valid[:, :, None, None], s, float("-inf")).permute(0, 2, 3, 1)  # (n, Hkv, G, KB)
        m_new = torch.maximum(m, tree_max(s, -1))
        alpha = det_exp(m - m_new)  # 0 on the first block (m = -inf), 1 when the max holds
        p = det_exp(s - m_new[..., None])
        pv = p[..., None] * vb.permute(0, 2, 1, 3)[:, :, None]  # (n, Hkv, G, KB, D)
        pv = torch.where(valid[:, None, None, :, None], pv, 0.0)
        l = l * alpha + tree_sum(p, -1)
        acc = acc * alpha[..., None] + tree_sum(pv, -2)
        m = m_new
    return (acc / l[..., None]).reshape(n, hq, d)


def _d_contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _round_up(n: int) -> int:
    return -(-max(int(n), 1) // KEY_BLOCK) * KEY_BLOCK


class _PackedExact(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seq_lengths, scale):
        ctx.seq_lengths, ctx.scale = seq_lengths, scale
        ctx.save_for_backward(q, k, v)
        # rows (B, L): rows past a sequence are masked by position
        rows, q_seq, q_pos = tea.packed_tables(list(seq_lengths), _round_up(max(seq_lengths)), q.device)
        if tea.supported(q):  # the CUDA kernel, on the packed rows directly
            return tea.exact_attention_slots(_d_contig(q), _d_contig(k), _d_contig(v), rows,
                                             q_seq, q_pos, scale,
                                             train_tiles=tea.train_tiles_usable(q, k.shape[1]))
        return exact_attention(q, k[rows], v[rows], q_seq, q_pos, scale)

    @staticmethod
    def backward(ctx, grad):
        from r1mega.models.attention import sdpa_packed

        q, k, v = (x.detach().requires_grad_(True) for x in ctx.saved_tensors)
        with torch.enable_grad():
            out = sdpa_packed(q, k, v, ctx.seq_lengths, ctx.scale)
        gq, gk, gv = torch.autograd.grad(out, (q, k, v), grad)
        return gq, gk, gv, None, None


def exact_packed_attention(q, k, v, seq_lengths: Sequence[int], scale: float) -> torch.Tensor:
    """Packed (THD) training attention. q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D)."""
    return _PackedExact.apply(q, k, v, tuple(int(x) for x in seq_lengths), float(scale))


def exact_cache_attention(q, k_cache, v_cache, slots: torch.Tensor, q_seq: torch.Tensor,
                          q_pos: torch.Tensor, scale: float, num_blocks: Optional[int] = None,
                          tiles: Optional[torch.Tensor] = None, decode_tiles: bool = False,
                          train_tiles: bool = False):
    """The rollout's attention over the paged cache. q (T, Hq, D); caches (N, bs, Hkv, D);
    slots (B, L) cache slot of sequence b's j-th token (junk past its context) -> (T, Hq, D).
    ``tiles``: the CUDA kernel's tile table of q_seq, when the caller keeps it across layers;
    ``decode_tiles``: one query per sequence, through the kernel's small tiles (checked by the
    caller with triton_exact_attention.decode_tiles_usable); ``train_tiles``: many queries per
    sequence (prefill), through training's tiles (checked with train_tiles_usable)."""
    hkv, d = k_cache.shape[-2], k_cache.shape[-1]
    if tea.supported(q):  # the kernel training runs too, reading the cache through the slots
        return tea.exact_attention_slots(_d_contig(q), k_cache.view(-1, hkv, d),
                                         v_cache.view(-1, hkv, d), slots, q_seq, q_pos, scale,
                                         tiles=tiles, decode_tiles=decode_tiles,
                                         train_tiles=train_tiles)
    L = slots.shape[1]
    pad = _round_up(L) - L
    if pad:
        slots = torch.cat([slots, slots[:, -1:].expand(-1, pad)], dim=1)
    k_seq = k_cache.view(-1, hkv, d)[slots]  # (B, L, Hkv, D)
    v_seq = v_cache.view(-1, hkv, d)[slots]
    return exact_attention(q, k_seq, v_seq, q_seq, q_pos, scale, num_blocks)
