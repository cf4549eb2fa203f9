"""Multi-head latent attention (DeepSeek-V3) at generation time: a paged latent KV cache and
decode with the key/value up-projections absorbed, so decode never rebuilds full keys and values.

Per token and layer the cache holds what MLA compresses the token to: the normed latent c
(kv_lora_rank) and the rotated RoPE key k_pe (qk_rope_head_dim), 576 numbers for V3 against
2 x 128 heads x 128..192 for the keys and values they stand for. With the up-projection
W_kv_up = [W_uk (n, d_nope, r); W_uv (n, d_v, r)] per head:

    score(q, s) = q_nope . (W_uk c_s) + q_pe . k_pe_s = (W_uk^T q_nope) . c_s + q_pe . k_pe_s
    out(q)      = sum_s p_s W_uv c_s              = W_uv (sum_s p_s c_s)

so a query is first moved into latent space (q_lat = W_uk^T q_nope, (n, r)), attends over the
cached latents directly, and its latent output is lifted by W_uv once (:func:`absorbed_attention`).
:func:`expanded_attention` is the textbook form (keys and values rebuilt) it is tested against.

Two users:
  :class:`MLARolloutAttention`  the rollout engine's attention for MLA models (``ModelRunner.mla``):
                                the engine's paged cache, batching, sampling and kernels, with the
                                latent row as a single key/value head (see the class);
  :class:`MLAGenerator`         a small standalone greedy generator on its own paged latent cache
                                (:class:`MLAPagedCache`), one sequence at a time, TP=1: the
                                step-by-step reference the engine path is tested beside.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from r1mega.rollout.kv_cache import BlockAllocator


def split_kv_up(weight: torch.Tensor, num_heads: int, nope_dim: int, v_dim: int):
    """linear_kv_up_proj.weight (n*(d_nope+d_v), r) -> W_uk (n, d_nope, r), W_uv (n, d_v, r)."""
    w = weight.view(num_heads, nope_dim + v_dim, -1)
    return w[:, :nope_dim], w[:, nope_dim:]


def _causal_mask(q_pos: torch.Tensor, k_len: int) -> torch.Tensor:
    """(Tq, K) True where key position <= the query's position."""
    return torch.arange(k_len, device=q_pos.device)[None, :] <= q_pos[:, None]


def absorbed_attention(q_nope, q_pe, latent, k_pe, w_uk, w_uv, scale: float, q_pos) -> torch.Tensor:
    """q_nope (Tq, n, d_nope), q_pe (Tq, n, d_r), latent (K, r), k_pe (K, d_r), q_pos (Tq,)
    -> (Tq, n, d_v); keys and values never expanded per head."""
    q_lat = torch.einsum("tnd,ndr->tnr", q_nope.float(), w_uk.float())              # (Tq, n, r)
    scores = (torch.einsum("tnr,kr->tnk", q_lat, latent.float())
              + torch.einsum("tnd,kd->tnk", q_pe.float(), k_pe.float())) * scale     # (Tq, n, K)
    scores = scores.masked_fill(~_causal_mask(q_pos, latent.shape[0])[:, None, :], float("-inf"))
    o_lat = torch.einsum("tnk,kr->tnr", scores.softmax(-1), latent.float())          # (Tq, n, r)
    return torch.einsum("tnr,nvr->tnv", o_lat, w_uv.float())                         # (Tq, n, d_v)


def expanded_attention(q_nope, q_pe, latent, k_pe, w_uk, w_uv, scale: float, q_pos) -> torch.Tensor:
    """The same attention with per-head keys [W_uk c; k_pe] and values W_uv c rebuilt."""
    n = q_nope.shape[1]
    k_nope = torch.einsum("kr,ndr->knd", latent.float(), w_uk.float())              # (K, n, d_nope)
    k = torch.cat([k_nope, k_pe.float()[:, None, :].expand(-1, n, -1)], -1)         # (K, n, d_qk)
    v = torch.einsum("kr,nvr->knv", latent.float(), w_uv.float())                   # (K, n, d_v)
    q = torch.cat([q_nope, q_pe], -1).float()                                       # (Tq, n, d_qk)
    scores = torch.einsum("tnd,knd->tnk", q, k) * scale
    scores = scores.masked_fill(~_causal_mask(q_pos, k.shape[0])[:, None, :], float("-inf"))
    return torch.einsum("tnk,knv->tnv", scores.softmax(-1), v)


class MLAPagedCache:
    """Per layer a pool of blocks of ``block_tokens`` latent rows [c; k_pe] (r + d_r wide)."""

    def __init__(self, num_layers: int, num_blocks: int, block_tokens: int, latent_dim: int,
                 rope_dim: int, dtype: torch.dtype, device):
        self.block_tokens, self.latent_dim = block_tokens, latent_dim
        self.pools = [torch.zeros(num_blocks, block_tokens, latent_dim + rope_dim, dtype=dtype, device=device)
                      for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_blocks)
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    @property
    def bytes_per_token(self) -> int:
        p = self.pools[0]
        return len(self.pools) * p.shape[-1] * p.element_size()

    def reserve(self, seq: int, length: int) -> None:
        """Blocks for the first ``length`` tokens of sequence ``seq``."""
        table = self.tables.setdefault(seq, [])
        while len(table) * self.block_tokens < length:
            table.append(self.allocator.allocate())
        self.lengths[seq] = max(self.lengths.get(seq, 0), length)

    def release(self, seq: int) -> None:
        for block in self.tables.pop(seq, []):
            self.allocator.free(block)
        self.lengths.pop(seq, None)

    def _slots(self, seq: int, positions: torch.Tensor):
        table = torch.tensor(self.tables[seq], device=positions.device)
        return table[positions // self.block_tokens], positions % self.block_tokens

    def write(self, layer: int, seq: int, positions: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor):
        blocks, offsets = self._slots(seq, positions)
        self.pools[layer][blocks, offsets] = torch.cat([latent, k_pe], -1).to(self.pools[layer].dtype)

    def read(self, layer: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent (L, r), k_pe (L, d_r)) of the sequence's cached tokens."""
        pos = torch.arange(self.lengths[seq], device=self.pools[layer].device)
        blocks, offsets = self._slots(seq, pos)
        rows = self.pools[layer][blocks, offsets]
        return rows[:, : self.latent_dim], rows[:, self.latent_dim:]


class MLAGenerator:
    """Greedy generation of a megatron deepseek_v3 GPTModel on a :class:`MLAPagedCache` (TP=1)."""

    def __init__(self, gpt, vocab_size: int, *, num_blocks: int = 256, block_tokens: int = 16,
                 absorbed: bool = True):
        cfg = gpt.config
        self.gpt, self.cfg, self.vocab_size, self.absorbed = gpt, cfg, vocab_size, absorbed
        if gpt.config.tensor_model_parallel_size != 1:
            raise NotImplementedError("MLAGenerator runs TP=1 (the latent cache is whole per rank).")
        self.layers = list(gpt.decoder.layers)
        p = next(gpt.parameters())
        self.cache = MLAPagedCache(len(self.layers), num_blocks, block_tokens, cfg.kv_lora_rank,
                                   cfg.qk_pos_emb_head_dim, p.dtype, p.device)
        self._next_seq = 0

    def _rope(self, t: torch.Tensor, attn, positions: torch.Tensor) -> torch.Tensor:
        """t (T, h, d_r) rotated at ``positions`` as megatron's MLA does (de-interleave, rotate)."""
        freqs = positions.float()[:, None] * attn.rotary_pos_emb.inv_freq.to(t.device)[None, :]
        emb = torch.cat([freqs, freqs], -1)[:, None, None, :]                       # (T, 1, 1, d_r)
        return _apply_rotary_pos_emb_bshd(t.unsqueeze(1), emb, rotary_interleaved=False,
                                          multi_latent_attention=True).squeeze(1)

    def _attention(self, li: int, attn, x: torch.Tensor, seq: int, positions: torch.Tensor):
        """x (T, 1, H) normed -> attention output (T, 1, H); writes the tokens' latents first."""
        c = self.cfg
        n = attn.num_attention_heads_per_partition
        if c.q_lora_rank:
            q, _ = attn.linear_q_up_proj(attn.q_layernorm(attn.linear_q_down_proj(x)[0]))
        else:
            q, _ = attn.linear_q_proj(x)
        q = q.view(-1, n, c.qk_head_dim + c.qk_pos_emb_head_dim)                    # (T, n, d_qk)
        q_nope, q_pe = q.split([c.qk_head_dim, c.qk_pos_emb_head_dim], -1)
        kv, _ = attn.linear_kv_down_proj(x)
        latent, k_pe = kv.view(-1, kv.shape[-1]).split([c.kv_lora_rank, c.qk_pos_emb_head_dim], -1)
        latent = attn.kv_layernorm(latent)                                          # (T, r)
        q_pe = self._rope(q_pe, attn, positions)
        k_pe = self._rope(k_pe[:, None, :], attn, positions)[:, 0]                 # (T, d_r)
        self.cache.write(li, seq, positions, latent, k_pe)
        cached_latent, cached_pe = self.cache.read(li, seq)
        w_uk, w_uv = split_kv_up(attn.linear_kv_up_proj.weight, n, c.qk_head_dim, c.v_head_dim)
        fn = absorbed_attention if self.absorbed else expanded_attention
        o = fn(q_nope, q_pe, cached_latent, cached_pe, w_uk, w_uv, attn.softmax_scale, positions)
        out, _ = attn.linear_proj(o.to(x.dtype).reshape(x.shape[0], 1, -1))
        return out

    @torch.no_grad()
    def _step(self, seq: int, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Run ``tokens`` (T,) at positions start.. of ``seq``; the last token's logits (V,)."""
        positions = torch.arange(start, start + tokens.numel(), device=tokens.device)
        self.cache.reserve(seq, start + tokens.numel())
        x = self.gpt.embedding(input_ids=tokens.view(1, -1), position_ids=None)     # (T, 1, H)
        for li, layer in enumerate(self.layers):
            x = x + self._attention(li, layer.self_attention, layer.input_layernorm(x), seq, positions)
            x = x + layer.mlp(layer.pre_mlp_layernorm(x))[0]
        x = self.gpt.decoder.final_layernorm(x[-1:])
        w = self.gpt.shared_embedding_or_output_weight() if self.gpt.share_embeddings_and_output_weights else None
        logits, _ = self.gpt.output_layer(x, weight=w)
        return logits.view(-1)[: self.vocab_size]

    def generate(self, prompts: list, max_new_tokens: int, eos_id: Optional[int] = None) -> list:
        """Greedy continuations (lists of token ids) of ``prompts`` (lists of token ids)."""
        device = next(self.gpt.parameters()).device
        outs = []
        for prompt in prompts:
            seq, self._next_seq = self._next_seq, self._next_seq + 1
            ids = torch.tensor(prompt, device=device)
            logits = self._step(seq, ids, 0)                                        # prefill
            new = []
            for _ in range(max_new_tokens):
                tok = int(logits.argmax())
                new.append(tok)
                if tok == eos_id or len(new) == max_new_tokens:
                    break
                logits = self._step(seq, torch.tensor([tok], device=device), len(prompt) + len(new) - 1)
            self.cache.release(seq)
            outs.append(new)
        return outs


def _whole(x: torch.Tensor, tp_group) -> torch.Tensor:
    """A latent down projection's output, gathered over the TP group (None: TP=1): megatron's
    local MLA spec makes the down projections column-parallel, each rank a slice of the latent."""
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    if tp_group is None:
        return x
    return gather_from_tensor_model_parallel_region(x, group=tp_group)


class MLARolloutAttention:
    """The rollout engine's attention for MLA layers (``ModelRunner.mla``).

    The engine's paged cache is used as multi-query attention with ONE key/value head per token
    of width r + d_r: the key row is [c; k_pe], and the same row serves as the value (only the
    latent part of the output is kept). Absorbed queries [W_uk^T q_nope; q_pe] (n heads) attend
    it through the engine's own kernels (fresh prefill, gather, decode), so the cache layout,
    paging, copy-on-write and preemption are the GQA path's. The value cache the engine also
    allocates is never written or read.
    """

    def __init__(self, layers, config, device, tp_group=None):
        """``tp_group``: the tensor-parallel group when TP > 1 (heads split over it), else None."""
        attn = layers[0].self_attention
        self.tp_group = tp_group
        self.latent_dim, self.rope_dim = config.kv_lora_rank, config.qk_pos_emb_head_dim
        self.nope_dim, self.v_dim = config.qk_head_dim, config.v_head_dim
        self.q_lora = bool(config.q_lora_rank)
        self.num_heads = attn.num_attention_heads_per_partition
        self.cache_width = self.latent_dim + self.rope_dim
        self.scale = attn.softmax_scale
        self.inv_freq = attn.rotary_pos_emb.inv_freq.detach().to(device, torch.float32)

    def _rope(self, t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """t (T, h, d_r) rotated at ``positions`` as megatron's MLA does (de-interleave, rotate)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], -1)[:, None, None, :]                       # (T, 1, 1, d_r)
        return _apply_rotary_pos_emb_bshd(t.unsqueeze(1), emb, rotary_interleaved=False,
                                          multi_latent_attention=True).squeeze(1)

    def attention(self, cache, layer_idx: int, attn, h: torch.Tensor, positions, slots, batch,
                  decode_tensors) -> torch.Tensor:
        """h (T, 1, H) normed hidden -> (T, n, d_v), input of ``attn.linear_proj``."""
        from r1mega.rollout import triton_mla
        from r1mega.rollout.attention import attend_fresh, attend_gather

        t, n = h.shape[0], self.num_heads
        if self.q_lora:
            q, _ = attn.linear_q_up_proj(attn.q_layernorm(_whole(attn.linear_q_down_proj(h)[0], self.tp_group)))
        else:
            q, _ = attn.linear_q_proj(h)
        q_nope, q_pe = q.view(t, n, -1).split([self.nope_dim, self.rope_dim], -1)
        kv = _whole(attn.linear_kv_down_proj(h)[0], self.tp_group)
        latent, k_pe = kv.view(t, -1).split([self.latent_dim, self.rope_dim], -1)
        row = torch.cat([attn.kv_layernorm(latent), self._rope(k_pe[:, None, :], positions)[:, 0]], -1)
        # The engine's cache op (opaque to dynamo, so a compiled decode writes in place); the
        # cache is keys-only (v aliases k), the second write lands on the same rows.
        cache.write(layer_idx, slots, row[:, None, :], row[:, None, :])
        k_cache = cache.k[layer_idx]                                                # (N, bs, 1, r + d_r)
        w_uk, w_uv = split_kv_up(attn.linear_kv_up_proj.weight, n, self.nope_dim, self.v_dim)
        q_lat = torch.einsum("tnd,ndr->tnr", q_nope, w_uk)                          # (T, n, r)
        query = torch.cat([q_lat, self._rope(q_pe, positions).to(q_lat.dtype)], -1)  # (T, n, r + d_r)
        if decode_tensors is not None:  # device tensors only: Triton kernel on CUDA, CUDA graphs
            o = triton_mla.mla_decode_attention(query, k_cache, *decode_tensors, self.scale,
                                                self.latent_dim)               # (T, n, r)
        elif batch.is_fresh_prefill:
            key = row[:, None, :].to(query.dtype)
            o = attend_fresh(query, key, key, batch, self.scale)
        else:
            o = attend_gather(query, k_cache, k_cache, batch, self.scale)
        return torch.einsum("tnr,nvr->tnv", o[..., : self.latent_dim], w_uv)        # (T, n, d_v)
