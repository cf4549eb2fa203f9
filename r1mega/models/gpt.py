"""The dense decoder family (Llama 2/3, SmolLM2, Qwen2/2.5, Qwen3) as megatron-core ``GPTModel``.

Model code stays plain megatron; parallelism comes from outside in a fixed order:
  1. TransformerConfig carries the parallel sizes (without them every PP stage silently builds
     every layer);
  2. one GPTModel per virtual pipeline stage, with pre/post-process set by stage position;
  3. parameters on the runtime device in the runtime dtype;
  4. (optional) megatron DDP around each chunk, sharing one config so that grad buffers and the
     distributed optimizer see all chunks.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from r1mega.config import ModelConfig, PrecisionConfig
from r1mega.models.batch_first_logits import batch_first_logits
from r1mega.models.ddp import FirstWriteDDP

from r1mega.models import packed_rope
from r1mega.models.rope_scaling import apply_rope_scaling
from r1mega.models.families import block_spec
from r1mega.moe.settings import MoESettings
from r1mega.parallel.runtime import ParallelRuntime
from r1mega.precision.policy import resolve_fp8_policy, te_transformer_config_kwargs
from r1mega.precision.spec import fp8_layer_specs


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Smallest multiple of ``divisible_by * tp_size`` >= ``vocab_size`` (equal TP shards)."""
    multiple = max(1, divisible_by) * tp_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def make_transformer_config(model: ModelConfig, rt: ParallelRuntime,
                            precision: Optional[PrecisionConfig] = None) -> TransformerConfig:
    """megatron TransformerConfig for ``model`` (cfg.model) on the layout of ``rt``."""
    precision = precision or PrecisionConfig()
    on_gpu = rt.device.type == "cuda"
    dtype = rt.dtype
    # Transformer Engine FP8: megatron's TransformerBlock enters fp8_autocast from these fields.
    te_fp8 = te_transformer_config_kwargs(resolve_fp8_policy(precision, rt.device.type),
                                          model.num_layers)
    recompute = {"none": (None, None, None), "selective": ("selective", None, None),
                 "full": ("full", "uniform", 1)}[model.recompute]
    config_class, extra = TransformerConfig, {}
    if model.family == "deepseek_v3":
        from megatron.core.transformer import MLATransformerConfig

        from r1mega.models.deepseek_v3.spec import mla_config_kwargs

        config_class, extra = MLATransformerConfig, mla_config_kwargs(model)
    elif model.rope_scaling.type == "yarn":
        # YaRN's attention factor multiplies cos and sin, i.e. every q.k by its square.
        from r1mega.models.yarn import yarn_attention_factor

        head_dim = model.kv_channels or model.hidden_size // model.num_attention_heads
        extra["softmax_scale"] = yarn_attention_factor(model.rope_scaling) ** 2 / head_dim ** 0.5
    return config_class(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=extra.pop("kv_channels", None) or model.kv_channels or model.hidden_size // model.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        qk_layernorm=model.qk_norm,
        gated_linear_unit=True,
        activation_func=F.silu,
        # megatron's jit-scripted SwiGLU: one fused elementwise kernel on GPU.
        bias_activation_fusion=on_gpu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        # parallel layout (see module docstring, step 1)
        tensor_model_parallel_size=rt.tp_size,
        pipeline_model_parallel_size=rt.pp_size,
        virtual_pipeline_model_parallel_size=rt.vp_size if rt.vp_size > 1 else None,
        context_parallel_size=rt.cp_size,
        # megatron's batched p2p posts [send_prev, recv_prev, send_next, recv_next] on one group;
        # at PP=2 prev == next, so when the interleaved schedule sends both ways at once the
        # activation and the gradient cross. The unbatched path splits directions over two groups.
        batch_p2p_comm=not (rt.pp_size == 2 and rt.vp_size > 1),
        expert_model_parallel_size=rt.ep_size,
        # megatron refuses expert parallelism without an expert count. Its own MoE modules are
        # not built (r1mega's MoELayer sits in the spec) and its router-bias and aux-loss hooks
        # stay off (moe_router_enable_expert_bias, moe_aux_loss_coeff keep their defaults).
        num_moe_experts=model.num_experts or None,
        moe_router_topk=model.moe_router_topk if model.num_experts else 2,
        moe_ffn_hidden_size=(model.moe_ffn_hidden_size or model.ffn_hidden_size) if model.num_experts else None,
        sequence_parallel=rt.sequence_parallel,
        # precision
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # RL batches: every micro-batch has its own packed length.
        variable_seq_lengths=True,
        # (megatron refuses variable lengths with the default allgather MoE dispatcher, even for
        # a dense model.)
        moe_token_dispatcher_type="alltoall",
        # Loss functions return (loss_sum, num_tokens); megatron divides by the global count.
        calculate_per_token_loss=True,
        # CPU: master weights drawn whole and then split, so a TP layout starts identical to TP=1.
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # These fusions need apex / TE kernels that are not guaranteed to exist.
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=on_gpu,
        deallocate_pipeline_outputs=True,
        recompute_granularity=recompute[0],
        recompute_method=recompute[1],
        recompute_num_layers=recompute[2],
        # Dense and MoE layers hold different tensors, so checkpoints key them per layer rather
        # than stacking one tensor over all layers (which would miss the dense layers' shards).
        hetereogenous_dist_checkpoint=bool(model.num_experts and model.moe_first_k_dense),
        **te_fp8,
        **extra,
    )


def _stage_flags(rt: ParallelRuntime, vp_stage: int) -> tuple[bool, bool]:
    """(pre_process, post_process) of virtual stage ``vp_stage`` on this pipeline rank."""
    first = rt.pp_rank == 0 and vp_stage == 0
    last = rt.pp_rank == rt.pp_size - 1 and vp_stage == rt.vp_size - 1
    return first, last


def build_gpt_chunks(model: ModelConfig, rt: ParallelRuntime,
                     precision: Optional[PrecisionConfig] = None) -> list[GPTModel]:
    """One GPTModel per virtual pipeline stage of this rank (a list of 1 without interleaving)."""
    config = make_transformer_config(model, rt, precision)
    fp8 = resolve_fp8_policy(precision or PrecisionConfig(), rt.device.type)
    if fp8 is not None:
        # TE's FP8 needs the TE spec, the native FP8 linears the local one.
        model = dataclasses.replace(model, spec="te" if fp8.backend == "te" else "local")
        if model.num_experts and not fp8.experts and rt.rank == 0:
            warnings.warn("precision.fp8: the attention and dense linears run in FP8; the MoE "
                          "experts (routed grouped GEMM and shared expert) stay bf16 unless "
                          "precision.fp8_experts=true.", stacklevel=2)
    elif precision is not None and precision.fp8_rollout and model.spec == "auto":
        # the rollout's FP8 weight copies hook megatron's local linears (r1mega/precision/rollout.py)
        model = dataclasses.replace(model, spec="local")
    packed_rope.install()  # packed (THD) RoPE without a host sync and loop per sequence
    layers_per_chunk = model.num_layers // (rt.pp_size * rt.vp_size)
    vocab = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, rt.tp_size)
    theta = model.rope_theta
    chunks = []
    for vp_stage in range(rt.vp_size):
        pre, post = _stage_flags(rt, vp_stage)
        first = get_transformer_layer_offset(config, vp_stage=vp_stage if rt.vp_size > 1 else None,
                                             pp_rank=rt.pp_rank)
        # The family lays out the chunk's layers (r1mega/models/families.py).
        block = block_spec(model, rt, first_layer=first, num_layers=layers_per_chunk)
        chunk_spec, collector = block.spec, block.collector
        if fp8 is not None and fp8.backend == "native":
            chunk_spec = dataclasses.replace(chunk_spec, layer_specs=fp8_layer_specs(
                chunk_spec.layer_specs, fp8, first_layer=first, num_layers=model.num_layers))
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=chunk_spec,
            vocab_size=vocab,
            max_sequence_length=model.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            parallel_output=True,  # logits stay vocab-parallel: (T, V/tp) per TP rank
            share_embeddings_and_output_weights=model.tied_embeddings,
            position_embedding_type="rope",
            rotary_base=int(theta) if float(theta).is_integer() else theta,
            pg_collection=rt.pg_collection,
            vp_stage=vp_stage if rt.vp_size > 1 else None,
        )
        # Not GPTModel(rope_scaling=True): megatron would keep Llama 3.1's low/high frequency
        # factors and original length whatever model.rope_scaling says (see rope_scaling.py).
        if model.family == "deepseek_v3":
            from r1mega.models.deepseek_v3.spec import apply_mla_rope

            apply_mla_rope(gpt, model)  # each MLA layer owns its rotary embedding
        else:
            apply_rope_scaling(gpt.rotary_pos_emb, model.rope_scaling, model.rope_theta)
        if block.mtp_layer_specs and post:
            from r1mega.models.deepseek_v3.mtp import attach_mtp

            attach_mtp(gpt, config, block.mtp_layer_specs, model.num_layers, rt.pg_collection)
        if post:
            batch_first_logits(gpt.output_layer)  # megatron's logits transpose becomes free
        # The train step clears it before and adds it to the loss after each micro-batch forward.
        gpt.moe_aux_losses = collector
        gpt.to(device=rt.device)
        chunks.append(gpt)
    return chunks


def make_ddp_config(precision: Optional[PrecisionConfig], distributed_optimizer: bool,
                    overlap: bool = False) -> DistributedDataParallelConfig:
    precision = precision or PrecisionConfig()
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=precision.grad_reduce_in_fp32,
        overlap_grad_reduce=overlap,
        # Param all-gather stays in the optimizer step (overlapping it needs the optimizer and
        # forward pre-hooks configured together; not worth it at our DP sizes yet).
        overlap_param_gather=False,
        use_distributed_optimizer=distributed_optimizer,
        # Gradients are summed over DP; the 1/global_tokens scale comes from finalize_model_grads.
        average_in_collective=False,
    )


def wrap_ddp(chunks: list[torch.nn.Module], rt: ParallelRuntime,
             ddp_config: DistributedDataParallelConfig) -> list[FirstWriteDDP]:
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(FirstWriteDDP(
            config=chunk.config, ddp_config=ddp_config, module=chunk,
            # Only the first chunk's bucket can start early in interleaved schedules.
            disable_bucketing=i > 0,
            pg_collection=rt.pg_collection,
        ))
    return wrapped


def build_model(model: ModelConfig, rt: ParallelRuntime,
                precision: Optional[PrecisionConfig] = None, *, wrap: bool = True,
                distributed_optimizer: bool = True, overlap_grad_reduce: bool = False) -> list:
    """Model chunks of this rank; ``wrap`` puts each in megatron DDP (needed for training).

    Forward-only roles (reference policy) pass ``wrap=False``.
    """
    chunks = build_gpt_chunks(model, rt, precision)
    if not wrap:
        return chunks
    return wrap_ddp(chunks, rt, make_ddp_config(precision, distributed_optimizer,
                                                overlap_grad_reduce))


def unwrap(chunk: torch.nn.Module) -> GPTModel:
    """The GPTModel inside DDP (or the chunk itself)."""
    while hasattr(chunk, "module") and not isinstance(chunk, GPTModel):
        chunk = chunk.module
    return chunk


def count_parameters(model: ModelConfig) -> int:
    """Parameters of the whole (unsharded, vocab-padded to 1 TP rank) model; for FLOP counts.
    For an MoE model: the parameters one token is computed with (k of the routed experts)."""
    h, f, L = model.hidden_size, model.ffn_hidden_size, model.num_layers
    d = model.kv_channels or h // model.num_attention_heads
    qkv = h * (model.num_attention_heads + 2 * model.num_query_groups) * d
    bias = (model.num_attention_heads + 2 * model.num_query_groups) * d if model.qkv_bias else 0
    per_layer = qkv + bias + model.num_attention_heads * d * h + 2 * h
    if model.qk_norm:
        per_layer += 2 * d
    if model.family == "deepseek_v3":
        from r1mega.models.deepseek_v3.config import mla_parameters

        per_layer = mla_parameters(model) + 2 * h
    embed = model.vocab_size * h
    ffn = L * 3 * h * f
    if model.num_experts:
        # Active parameters: what one token's FLOPs scale with (router, k experts, shared expert).
        from r1mega.moe.layer import num_active_parameters

        moe = MoESettings.from_model(model)
        n_moe = L - moe.first_k_dense
        ffn = moe.first_k_dense * 3 * h * f + n_moe * num_active_parameters(moe, h)
    return L * per_layer + ffn + embed * (1 if model.tied_embeddings else 2) + h
