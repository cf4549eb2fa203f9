"""The rollout side of ``rollout.exact`` (see r1mega/ops/batch_invariant.py): what the engine
switches, and the cache attention that calls the training forward's per-query function."""
from __future__ import annotations

from typing import Optional

import torch

from r1mega.ops.batch_invariant import install_exact_forward
from r1mega.ops.last_key import LastKey
from r1mega.ops import triton_batch_invariant as tbi
from r1mega.ops import triton_exact_attention as tea
from r1mega.ops.exact_attention import exact_cache_attention
from r1mega.rollout import triton_rope_kv
from r1mega.rollout.attention import AttentionBatch, gather_slots


# The decode step's slot and tile tables, made by its first layer and read by the others: keyed
# on the step's input tensors and their versions (an engine refills its static graph inputs in
# place).
_decode_tables = LastKey()


def _decode_step_tables(block_tables, ctx_lens, bs: int, q: torch.Tensor, hkv: int):
    key = (block_tables, block_tables._version, ctx_lens, ctx_lens._version, bs, q.shape[1], hkv,
           torch.cuda.is_current_stream_capturing() if q.is_cuda else False)
    return _decode_tables.get(key, lambda: _make_decode_tables(block_tables, ctx_lens, bs, q, hkv))


def _make_decode_tables(block_tables, ctx_lens, bs: int, q: torch.Tensor, hkv: int):
    b = block_tables.shape[0]
    j = torch.arange(block_tables.shape[1] * bs, device=q.device)
    slots = block_tables.long().gather(1, (j // bs)[None, :].expand(b, -1)) * bs + j % bs
    q_seq = torch.arange(b, device=q.device)
    tiles = None
    if tea.supported(q):
        tiles = tea.tile_sizes(q_seq, tea.queries_per_tile(q.shape[1], hkv))
    return slots, q_seq, ctx_lens.long() - 1, tiles


def exact_runner_attention(q, k_cache, v_cache, batch: Optional[AttentionBatch], decode_tensors,
                           scale: float) -> torch.Tensor:
    """q (T, Hq, D) of this step's new tokens (their K/V already in the cache) -> (T, Hq, D)."""
    if decode_tensors is not None:  # one query per row, device tensors only (graph-capturable)
        block_tables, ctx_lens = decode_tensors
        slots, q_seq, q_pos, tiles = _decode_step_tables(block_tables, ctx_lens, k_cache.shape[1],
                                                         q, k_cache.shape[-2])
        small = tiles is not None and tea.decode_tiles_usable(q, k_cache.shape[-2])
        return exact_cache_attention(q, k_cache, v_cache, slots, q_seq, q_pos, scale, tiles=tiles,
                                     decode_tiles=small)
    slots, q_seq, train = _prefill_step_tables(batch, q, k_cache.shape[-2])
    return exact_cache_attention(q, k_cache, v_cache, slots, q_seq, batch.positions.long(), scale,
                                 train_tiles=train)


# A prefill step's tables, made by its first layer and read by the others (keyed on the step's
# batch): building them copies the query lengths to the device, which waits for the stream, once
# a step instead of once a layer.
_prefill_tables = LastKey()


def _prefill_step_tables(batch: AttentionBatch, q: torch.Tensor, hkv: int):
    """-> slots (B, max_ctx), q_seq (T,), and whether the kernel's training tiles serve (the
    same device check as training's: they give the default tiles' bits, and are faster on the
    many queries of a sequence that prefill has)."""
    def make():
        slots = gather_slots(batch, max(batch.ctx_lens_host))  # (B, max_ctx)
        lens = torch.tensor(batch.q_lens, dtype=torch.int64)
        q_seq = torch.repeat_interleave(torch.arange(len(batch.q_lens)), lens).to(q.device)
        return slots, q_seq, tea.supported(q) and tea.train_tiles_usable(q, hkv)

    return _prefill_tables.get((batch, q.shape, hkv), make)


def enable_exact(engine) -> None:
    """Switch an engine (and the policy model it reads) to exact numerics: the training forward
    of the model runs batch-invariant from now on, and the rollout drops the decode paths whose
    reduction order is their own (the Triton paged decode kernel, the compiled decode forward:
    inductor would lower the matmuls to its own kernels). The fused RoPE + KV write stays where
    its ``exact=True`` variant rounds as the training forward's eager RoPE does (bf16, fp32)."""
    r = engine.runner
    install_exact_forward(r.model)
    if r.device.type == "cuda" and tbi.HAVE_TRITON:
        # the device checks of the small-batch tiles now, eagerly: inside graph capture they
        # cannot run, and an unchecked device keeps the default tiles there
        tbi.small_tiles_usable(r.device, r.param_dtype)
        if r.mla is None:  # (validation refuses MLA models with the exact mode)
            q = torch.zeros(1, r.num_heads, r.head_dim, device=r.device, dtype=r.param_dtype)
            if tea.supported(q):
                tea.decode_tiles_usable(q, r.num_kv_heads)
    r.decode_kernel_enabled = False
    r.fused_rope_kv_enabled = (r.fused_rope_kv_enabled
                               and triton_rope_kv.exact_rounding_supported(r.param_dtype))
    engine.exact = True
