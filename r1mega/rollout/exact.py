"""The rollout side of ``rollout.exact`` (see r1mega/ops/batch_invariant.py): what the engine
switches, and the cache attention that calls the training forward's per-query function."""
from __future__ import annotations

from typing import Optional

import torch

from r1mega.ops.batch_invariant import install_exact_forward
from r1mega.ops.exact_attention import exact_cache_attention
from r1mega.rollout.attention import AttentionBatch, gather_slots


def exact_runner_attention(q, k_cache, v_cache, batch: Optional[AttentionBatch], decode_tensors,
                           scale: float) -> torch.Tensor:
    """q (T, Hq, D) of this step's new tokens (their K/V already in the cache) -> (T, Hq, D)."""
    if decode_tensors is not None:  # one query per row, device tensors only (graph-capturable)
        block_tables, ctx_lens = decode_tensors
        bs = k_cache.shape[1]
        b = block_tables.shape[0]
        j = torch.arange(block_tables.shape[1] * bs, device=q.device)
        slots = block_tables.long().gather(1, (j // bs)[None, :].expand(b, -1)) * bs + j % bs
        return exact_cache_attention(q, k_cache, v_cache, slots, torch.arange(b, device=q.device),
                                     ctx_lens.long() - 1, scale)
    max_ctx = max(batch.ctx_lens_host)
    slots = gather_slots(batch, max_ctx)  # (B, max_ctx)
    lens = torch.tensor(batch.q_lens, dtype=torch.int64)
    q_seq = torch.repeat_interleave(torch.arange(len(batch.q_lens)), lens).to(q.device)
    return exact_cache_attention(q, k_cache, v_cache, slots, q_seq, batch.positions.long(), scale)


def enable_exact(engine) -> None:
    """Switch an engine (and the policy model it reads) to exact numerics: the training forward
    of the model runs batch-invariant from now on, and the rollout drops the decode paths whose
    reduction order is their own (the Triton paged decode kernel, the fused RoPE+KV write, the
    compiled decode forward: inductor would lower the matmuls to its own kernels)."""
    r = engine.runner
    install_exact_forward(r.model)
    r.decode_kernel_enabled = False
    r.fused_rope_kv_enabled = False
    engine.exact = True
