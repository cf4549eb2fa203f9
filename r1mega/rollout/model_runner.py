"""Runs the training model's own megatron modules in inference mode over the paged KV cache.

Nothing is copied: the runner holds references to the GPTModel's submodules and calls them, so
it reads the very parameter tensors (and TP shards) the optimizer updates. After a training step
the next rollout sees the new weights with no refit.

The layer walk mirrors megatron's ``TransformerLayer`` forward, module by module:

    embedding.word_embeddings -> [input_layernorm -> self_attention.get_query_key_value_tensors
    (linear_qkv, the per-group q/k/v split, Qwen3 q/k norms) -> megatron's own RoPE -> write K/V to
    the cache -> attention over the cache -> linear_proj (the TP all-reduce) -> bias+residual ->
    pre_mlp_layernorm -> mlp -> bias+residual] x L -> final_layernorm -> output_layer.

Calling the modules rather than reading their weights also makes the TE spec work unchanged:
there ``input_layernorm`` is an identity and ``linear_qkv`` applies the fused norm itself.
The same holds for MoE models: ``layer.mlp`` is then r1mega's MoELayer (r1mega/moe/layer.py),
called with the MLP contract like the dense MLP (with expert parallelism the engine keeps the EP
ranks in step; ``empty_step`` is a rank's turn with nothing to generate). The rollout runs under ``no_grad``, which is
what makes that forward an inference one: the layer routes exactly as training does (same
float32 router, same expert bias) but counts no expert loads and records no balance losses,
so generating never moves the DeepSeek-V3 bias.

Tokens of all sequences of a step travel as one flat (T, 1, h) batch (megatron's [s, b, h] with
b = 1): linear layers do not care where a sequence ends, only attention does.

Decode steps on GPU take a shorter road between linear_qkv and linear_proj: one Triton kernel
rotates q and k and writes K/V to the cache straight from the unsplit QKV projection
(triton_rope_kv), then the paged decode kernel (triton_paged); both are custom ops, so the
compiled decode forward is one graph. The module-by-module path above is its reference and the
path everywhere else (CPU, prefill, Qwen3 q/k norms, interleaved or partial rotary).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from r1mega.rollout.attention import AttentionBatch, attend_decode_gather, attend_fresh, attend_gather
from r1mega.rollout.kv_cache import PagedKVCache
from r1mega.ops.batch_invariant import exact_active
from r1mega.rollout.exact import exact_runner_attention
from r1mega.precision import rollout as fp8_rollout
from r1mega.precision import triton_skinny_gemm
from r1mega.rollout import cuda_paged, cuda_paged_rope, triton_paged, triton_rope_kv


def unwrap_model(module):
    """GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module") and not hasattr(module, "decoder"):
        module = module.module
    return module


def _bda(out_with_bias, residual: torch.Tensor) -> torch.Tensor:
    """megatron's bias-dropout-add in eval: (x + bias) + residual, in x's dtype."""
    x, bias = out_with_bias
    if bias is not None:
        x = x + bias
    return residual.to(x.dtype) + x


@contextlib.contextmanager
def sequence_parallel_off(model):
    """Sequence parallelism splits activations over the sequence dim between TP ranks; a decode
    step has one token per sequence, so generation runs without it: the linear layers and the
    embedding read their ``sequence_parallel`` flags at call time, and we flip them for the
    rollout only (restored afterwards, also on error)."""
    saved = []
    for m in model.modules():
        for attr in ("sequence_parallel", "reduce_scatter_embeddings"):
            if getattr(m, attr, None) is True:
                saved.append((m, attr))
                setattr(m, attr, False)
    try:
        yield
    finally:
        for m, attr in saved:
            setattr(m, attr, True)


class ModelRunner:
    """Forward passes of one model chunk for prefill and decode steps."""

    def __init__(self, model_chunks, ctx, *, attention_backend: str = "auto"):
        chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        pp_size = getattr(ctx, "pp_size", 1)
        if len(chunks) != 1 or pp_size > 1:
            raise NotImplementedError(
                f"The rollout engine runs a whole model on each rank, but this model is split into "
                f"{pp_size} pipeline stages x {len(chunks)} virtual chunks. Set parallel.pipeline=1 "
                f"and parallel.virtual_stages=1 (use parallel.tensor for model parallelism) for "
                f"colocated generation."
            )
        self.model = unwrap_model(chunks[0])
        m = self.model
        if not hasattr(m, "decoder") or not hasattr(m, "embedding"):
            raise TypeError(f"Expected a megatron GPTModel, got {type(m).__name__}.")
        self.config = m.config
        if getattr(m, "position_embedding_type", "rope") != "rope":
            raise NotImplementedError(
                f"The rollout engine implements RoPE only; model has position_embedding_type="
                f"{m.position_embedding_type!r}."
            )
        self.layers = list(m.decoder.layers)
        # Expert parallelism: every MoE layer is an all-to-all over the EP group, so the engine
        # steps the group's ranks together and a rank without work runs empty_step.
        # The group is the one the layers' dispatchers exchange over (None: no EP).
        self.moe_layers = [layer for layer in self.layers if hasattr(layer.mlp, "dispatcher")]
        ep = [layer.mlp.dispatcher for layer in self.moe_layers
              if getattr(layer.mlp.dispatcher, "ep_size", 1) > 1]
        self.ep_group = ep[0].ep_group if ep else None
        attn = self.layers[0].self_attention
        self.num_heads = attn.num_attention_heads_per_partition
        self.num_kv_heads = attn.num_query_groups_per_partition
        self.head_dim = attn.hidden_size_per_attention_head
        self.scale = self.config.softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.mla = None
        if getattr(self.config, "multi_latent_attention", False):
            # DeepSeek-V3: the cache holds one latent row per token (r1mega/rollout/adapters/mla.py).
            from r1mega.rollout.adapters.mla import MLARolloutAttention

            tp_group = getattr(ctx, "tp_group", None) if getattr(ctx, "tp_size", 1) > 1 else None
            self.mla = MLARolloutAttention(self.layers, self.config, next(m.parameters()).device, tp_group)
            self.num_kv_heads, self.head_dim, self.scale = 1, self.mla.cache_width, self.mla.scale
        self.tp_group = getattr(ctx, "tp_group", None)
        self.tp_rank = getattr(ctx, "tp_rank", 0)
        self.tp_size = getattr(ctx, "tp_size", 1)
        self.device = next(m.parameters()).device
        self.param_dtype = next(m.parameters()).dtype
        self.attention_backend = attention_backend
        rope = m.rotary_pos_emb if self.mla is None else self.layers[0].self_attention.rotary_pos_emb
        self.inv_freq = rope.inv_freq.detach().to(self.device, torch.float32)
        self.rope_interp = rope.seq_len_interpolation_factor
        self.rotary_interleaved = bool(self.config.rotary_interleaved)
        self.max_positions = int(getattr(m, "max_sequence_length", 0) or 0)
        out = m.output_layer
        w = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else out.weight
        self.vocab_local = w.shape[0]
        self.vocab_start = self.tp_rank * self.vocab_local
        self.cache: Optional[PagedKVCache] = None
        on_gpu = self.device.type == "cuda"
        pow2_heads = self.head_dim & (self.head_dim - 1) == 0
        # Plain attributes (tests flip them): the decode kernels, as custom ops.
        self.decode_kernel_enabled = on_gpu and triton_paged.HAVE_TRITON and pow2_heads and self.mla is None
        self.fused_rope_kv_enabled = (self.decode_kernel_enabled and triton_rope_kv.HAVE_TRITON
                                      and self.fused_rope_kv_supported())
        # MoE layers whose forward reads routing counts back to the host cannot be captured in
        # a CUDA graph; the engine then decodes eagerly.
        self.graph_capturable = all(getattr(layer.mlp, "host_sync_free", lambda dt: True)(self.param_dtype)
                                    for layer in self.layers)
        if on_gpu:
            # The engine compiles the decode forward (rollout.compile_decode); without the shim,
            # megatron's TP-group deprecation warning breaks the graph at every RowParallelLinear
            # on rank 0. Idempotent; the same settings the training compile uses.
            from r1mega.models.compile import prepare_dynamo

            prepare_dynamo()
            if cuda_paged.ROWS or cuda_paged.ROWS_CLUSTER or cuda_paged.TILES or cuda_paged_rope.ROPE:
                # loaded now: an import (or a capability query) inside the traced decode step breaks it
                cuda_paged.prepare(self.device)

    def _mixed_qkv(self, attn, h: torch.Tensor, i: int):
        """(linear_qkv's output as (T, 1, Hkv, (G + 2) * D), None), or under the FP8 rollout's row
        scales (its output before them, the (T,) scales the RoPE kernel applies)."""
        rows = None
        if not exact_active() and attn.config.num_query_groups >= attn.world_size:
            rows = fp8_rollout.qkv_unscaled(attn.linear_qkv, h)
        if rows is None:
            return attn.get_query_key_value_tensors(h, split_qkv=False)[0], None
        y, row_scale = rows
        return y.view(y.shape[0], 1, self.cache.k[i].shape[-2], -1), row_scale

    def fused_rope_kv_supported(self) -> bool:
        """Whether triton_rope_kv covers this model: full-width rotate-half RoPE right after the
        per-group split of linear_qkv's output, and that output holding whole KV groups."""
        from megatron.core.transformer.identity_op import IdentityOp

        def absent(norm) -> bool:  # the local spec puts an IdentityOp where Qwen3 has a norm
            return norm is None or isinstance(norm, IdentityOp)

        no_qk_norm = all(absent(getattr(layer.self_attention, "q_layernorm", None))
                         and absent(getattr(layer.self_attention, "k_layernorm", None))
                         for layer in self.layers)
        # With fewer KV groups than TP ranks megatron all-gathers the QKV output and slices this
        # rank's q heads out of a group: not the layout the kernel reads.
        whole_groups = (self.config.num_query_groups or self.config.num_attention_heads) >= self.tp_size
        return (not self.rotary_interleaved and 2 * self.inv_freq.numel() == self.head_dim
                and no_qk_norm and whole_groups
                and not getattr(self.config, "attention_output_gate", False))

    # ------------------------------------------------------------------ pieces

    def rope_freqs(self, positions: torch.Tensor) -> torch.Tensor:
        """(T,) -> (T, 1, 1, rot_dim), the same values megatron's RotaryEmbedding.get_emb gives."""
        seq = positions.to(torch.float32)
        if self.rope_interp is not None:
            seq = seq * (1 / self.rope_interp)
        freqs = seq[:, None] * self.inv_freq[None, :]  # == torch.outer, elementwise
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
        return emb[:, None, None, :]

    def _apply_rope(self, t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

        return _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=self.rotary_interleaved)

    def _rope_qk(self, q, k, freqs, cos_sin):
        """RoPE on q (T, 1, Hq, D) and k (T, 1, Hkv, D).

        Common case (full-width, non-interleaved rotary): megatron's exact elementwise sequence,
        ``t * cos + rotate_half(t) * sin`` with cos/sin cast to the activation dtype, but with
        cos/sin computed once per step rather than per layer and q and k rotated together: a
        decode step is bound by kernel count, and this is the same arithmetic in 6 kernels
        instead of 24 per layer.
        """
        if cos_sin is None:
            return self._apply_rope(q, freqs), self._apply_rope(k, freqs)
        return triton_rope_kv.rotate_qk(q, k, *cos_sin)

    def _rope_cos_sin(self, freqs: torch.Tensor, dtype: torch.dtype):
        if self.rotary_interleaved or freqs.shape[-1] != self.head_dim:
            return None
        return torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(T,) -> (T, 1, h)."""
        x = self.model.embedding.word_embeddings(ids[None, :]).transpose(0, 1).contiguous()
        if self.config.fp32_residual_connection:
            x = x.float()
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, 1, h) final hidden -> (N, V/tp) this rank's vocabulary slice."""
        m = self.model
        w = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else None
        out, _ = m.output_layer(hidden, weight=w)
        return out.view(hidden.shape[0], -1)

    # ------------------------------------------------------------------ forward

    def _attention(self, layer_idx, q, k, v, batch: Optional[AttentionBatch], decode_tensors):
        kc, vc, ks, vs = self.cache.layer(layer_idx)  # scales: None unless an FP8 cache
        if exact_active():  # rollout.exact: the training forward's per-query attention function
            return exact_runner_attention(q, kc, vc, batch, decode_tensors, self.scale)
        if decode_tensors is not None:  # decode from device tensors only (graph-capturable)
            block_tables, ctx_lens = decode_tensors
            if self.decode_kernel_enabled:
                return torch.ops.r1mega.paged_decode_attention(q, kc, vc, block_tables, ctx_lens,
                                                               self.scale, ks, vs)
            return attend_decode_gather(q, kc, vc, block_tables, ctx_lens, self.scale, ks, vs)
        if batch.is_fresh_prefill and self.attention_backend != "gather":
            return attend_fresh(q, k, v, batch, self.scale)
        return attend_gather(q, kc, vc, batch, self.scale, ks, vs)

    def _proj_from_rows(self, layer_idx, attn, q, dtype, decode_tensors):
        """linear_proj's output with its input quantised by the decode attention kernel itself
        (the FP8 rollout's row route, the tensor-core kernel): whole rows under
        ``R1MEGA_PAGED_FP8_ROWS``, one scale a head under ``R1MEGA_PAGED_FP8_TILES`` (for the
        split-K FP8 GEMM); or None where that road is not taken."""
        if ((not cuda_paged.ROWS and not cuda_paged.ROWS_CLUSTER and not cuda_paged.TILES)
                or decode_tensors is None
                or not self.decode_kernel_enabled or exact_active() or q.dtype != dtype):
            return None
        kc, vc, ks, vs = self.cache.layer(layer_idx)
        block_tables, ctx_lens = decode_tensors
        # the tiles' GEMM (tile x tensor) is the split-K kernel's alone, for decode-sized batches
        if (cuda_paged.TILES and q.shape[0] <= triton_skinny_gemm.MAX_ROWS
                and triton_skinny_gemm.HAVE_TRITON and cuda_paged.serves_tiles(q, kc, ks)):
            op = torch.ops.r1mega.paged_decode_attention_tiles
        elif cuda_paged.serves_rows(q, kc, ks):
            op = torch.ops.r1mega.paged_decode_attention_rows
        else:
            return None

        def make_rows(power2: bool):
            _, data, scale = op(q, kc, vc, block_tables, ctx_lens, self.scale, ks, vs, power2, 16)
            return data, scale

        return fp8_rollout.proj_from_rows(attn.linear_proj, make_rows, q.shape[0], dtype)

    def _rope_in_attention(self, layer_idx, qkv, dtype, decode_tensors) -> bool:
        """Whether this decode layer's RoPE and cache write run inside the attention kernel
        (``R1MEGA_PAGED_FP8_ROPE``, r1mega/rollout/cuda_paged_rope.py)."""
        if (not cuda_paged_rope.ROPE or decode_tensors is None or not self.decode_kernel_enabled
                or qkv.dtype != dtype):
            return False
        kc, _, ks, _ = self.cache.layer(layer_idx)
        return ks is not None and cuda_paged_rope.serves(qkv.flatten(1, 2), kc, ks)

    def _rope_attention_proj(self, layer_idx, attn, qkv, cos_sin, slots, row_scale, dtype,
                             decode_tensors):
        """linear_proj's output for a decode layer whose RoPE, cache write and attention are one
        kernel; o_proj's input rows come from its cluster epilogue where the FP8 rollout's row
        route takes them (``R1MEGA_PAGED_FP8_ROWS_CLUSTER``), else from o_proj's own quantiser."""
        kc, vc, ks, vs = self.cache.layer(layer_idx)
        block_tables, ctx_lens = decode_tensors
        t = qkv.shape[0]
        x = qkv.flatten(1, 2)  # (T, Hkv, (G + 2) * D)
        cos, sin = (c.reshape(t, -1) for c in cos_sin)

        def run(rows: bool, power2: bool = True):
            return torch.ops.r1mega.paged_decode_attention_rope(
                x, cos, sin, slots, row_scale, kc, vc, ks, vs, block_tables, ctx_lens, self.scale,
                rows, power2, 16)

        if cuda_paged.ROWS_CLUSTER and cuda_paged_rope.serves(x, kc, ks, rows=True):
            def make_rows(power2: bool):
                _, data, scale = run(True, power2)
                return data, scale

            proj = fp8_rollout.proj_from_rows(attn.linear_proj, make_rows, t, dtype)
            if proj is not None:
                return proj
        o, _, _ = run(False)
        return attn.linear_proj(o.reshape(t, 1, -1).to(dtype))

    def empty_step(self) -> None:
        """A step with zero tokens, for an expert-parallel rank that has nothing to generate
        while its peers do: each MoE layer still takes part in its all-to-alls (with zero-sized
        splits), in layer order, as a real step would. Nothing else of a layer talks to the EP
        group, so attention and the dense layers are skipped."""
        x = self.embed(torch.empty(0, dtype=torch.long, device=self.device))  # (0, 1, h)
        for layer in self.moe_layers:
            layer.mlp(layer.pre_mlp_layernorm(x))

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        logit_rows: Optional[torch.Tensor],
        batch: Optional[AttentionBatch] = None,
        decode_tensors: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """ids/positions/slots (T,) -> logits (N, V/tp) of the rows ``logit_rows`` (None: all).

        ``batch`` drives the SDPA paths; ``decode_tensors`` = (block_tables, ctx_lens) selects the
        Triton decode kernel (one new token per sequence, rows in sequence order).
        """
        T = ids.shape[0]
        freqs = self.rope_freqs(positions)
        # The exact mode's prefill too: its attention reads K/V from the cache, not from k, v,
        # and the eager RoPE + copies + cache write cost it several passes over q|k per layer
        fused = self.fused_rope_kv_enabled and (decode_tensors is not None or exact_active())
        # A fresh prefill through the same kernel, which also hands its attention the rotated k
        # and v rows: the eager RoPE, copies and cache write are ~10 kernels a layer over every
        # prompt token
        fused_prefill = (self.fused_rope_kv_enabled and not fused and batch is not None
                         and batch.is_fresh_prefill and self.attention_backend != "gather")
        x = self.embed(ids)
        for i, layer in enumerate(self.layers):
            residual = x
            h = layer.input_layernorm(x)
            attn = layer.self_attention
            proj = None  # linear_proj's output, where a road below gives it whole
            if self.mla is not None:
                o = self.mla.attention(self.cache, i, attn, h, positions, slots, batch, decode_tensors)
            elif fused:
                # (T, 1, Hkv, (G + 2) * D): each KV group's q heads, k, v, as linear_qkv wrote them
                qkv, row_scale = self._mixed_qkv(attn, h, i)
                if i == 0:
                    cos_sin = self._rope_cos_sin(freqs, qkv.dtype)
                if exact_active():  # rollout.exact: the variant with the eager (training) bits
                    q = triton_rope_kv.rope_kv_write_triton(qkv, *cos_sin, slots, self.cache.k[i],
                                                            self.cache.v[i], exact=True)
                elif self._rope_in_attention(i, qkv, h.dtype, decode_tensors):
                    proj = self._rope_attention_proj(i, attn, qkv, cos_sin, slots, row_scale,
                                                     h.dtype, decode_tensors)
                else:
                    q = triton_rope_kv.rope_kv_write_op(qkv, *cos_sin, slots, *self.cache.layer(i),
                                                        row_scale=row_scale)
                k = v = None  # in the cache now; decode attention reads them there
            elif fused_prefill:
                qkv, _ = attn.get_query_key_value_tensors(h, split_qkv=False)
                if i == 0:
                    cos_sin = self._rope_cos_sin(freqs, qkv.dtype)
                q, k, v = triton_rope_kv.rope_kv_write_prefill(qkv, *cos_sin, slots, *self.cache.layer(i))
            else:
                q, k, v = attn.get_query_key_value_tensors(h)  # (T, 1, Hq, D), (T, 1, Hkv, D) x2
                if i == 0:
                    cos_sin = self._rope_cos_sin(freqs, q.dtype)
                q, k = self._rope_qk(q, k, freqs, cos_sin)
                q = q.reshape(T, -1, self.head_dim)
                k = k.reshape(T, -1, self.head_dim)
                v = v.reshape(T, -1, self.head_dim)
                self.cache.write(i, slots, k, v)
            if proj is None and self.mla is None:
                proj = self._proj_from_rows(i, attn, q, h.dtype, decode_tensors)
            if proj is None:
                if self.mla is None:
                    o = self._attention(i, q, k, v, batch, decode_tensors)  # (T, Hq, D)
                proj = attn.linear_proj(o.reshape(T, 1, -1).to(h.dtype))
            x = _bda(proj, residual)
            residual = x
            x = _bda(layer.mlp(layer.pre_mlp_layernorm(x)), residual)  # dense MLP or MoELayer
        if logit_rows is not None:
            x = x[logit_rows]
        x = self.model.decoder.final_layernorm(x)
        return self.logits(x)
