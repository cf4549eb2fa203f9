"""Every config check that needs no process group: a bad config fails before any rank starts
talking to another, with the key at fault and the fix in the message."""
from __future__ import annotations

from typing import Optional

from r1mega.config import Config, ConfigError, ParallelConfig, RopeScalingConfig, _suggest
from r1mega.train.lean_adam_math import MASTER_MODES, MOMENT_DTYPES


def _choice(key: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{key}: '{value}' is not one of {sorted(allowed)}.{_suggest(value, allowed)}"
        )


def derive_data_parallel(par: ParallelConfig, world_size: int) -> int:
    """DP size from the world size; raises naming the sizes when they do not divide."""
    model_parallel = par.tensor * par.pipeline * par.context
    if world_size % model_parallel != 0:
        raise ConfigError(
            f"World size {world_size} is not divisible by parallel.tensor × parallel.pipeline × "
            f"parallel.context = {par.tensor}×{par.pipeline}×{par.context} = {model_parallel}. "
            f"Launch a multiple of {model_parallel} ranks or change the parallel sizes."
        )
    dp = world_size // model_parallel
    if par.data not in (0, dp):
        raise ConfigError(
            f"parallel.data={par.data} but world size {world_size} / (TP×PP×CP = {model_parallel}) "
            f"= {dp}. Set parallel.data={dp} or 0 (derive), or launch "
            f"{par.data * model_parallel} ranks."
        )
    return dp


def validate_rope_scaling(rs: RopeScalingConfig, key: str = "model.rope_scaling") -> None:
    """``key`` names where the values came from (the HF import passes its config.json key)."""
    _choice(f"{key}.type", rs.type, {"none", "llama3", "yarn"})
    if rs.type == "none":
        return
    # transformers only warns about these; then a zero divides, the bands swap, or (factor < 1)
    # the long wavelengths get shorter, none of which any checkpoint means.
    if rs.factor < 1.0:
        raise ConfigError(
            f"{key}.factor must be >= 1 (how much longer than the original context the long "
            f"wavelengths get), got {rs.factor}. Copy it from the checkpoint's config.json."
        )
    if rs.original_max_position_embeddings < 1:
        raise ConfigError(
            f"{key}.original_max_position_embeddings must be >= 1, got "
            f"{rs.original_max_position_embeddings} (Llama 3.1: 8192, DeepSeek-V3: 4096)."
        )
    if rs.type == "yarn":
        # The ramp between the two correction dimensions divides by their difference.
        if not rs.beta_fast > rs.beta_slow > 0:
            raise ConfigError(f"{key}.beta_fast={rs.beta_fast} must exceed {key}.beta_slow="
                              f"{rs.beta_slow} > 0 (DeepSeek-V3: 32 and 1).")
        return
    if rs.low_freq_factor <= 0:
        raise ConfigError(
            f"{key}.low_freq_factor must be > 0, got {rs.low_freq_factor} (Llama 3.1 uses 1.0)."
        )
    if rs.high_freq_factor <= rs.low_freq_factor:
        raise ConfigError(
            f"{key}.high_freq_factor={rs.high_freq_factor} must be greater than "
            f"{key}.low_freq_factor={rs.low_freq_factor} (Llama 3.1: 4.0 and 1.0); "
            f"the blend between the two bands divides by their difference."
        )


def validate_fp8(cfg: Config, device_type: Optional[str] = None) -> None:
    """FP8 recipe/backend/device checks (r1mega/precision/policy.py) and the layer counts."""
    from r1mega.precision.policy import (default_device_type, resolve_fp8_policy,
                                         resolve_rollout_fp8_policy)

    device_type = device_type or default_device_type()
    if resolve_rollout_fp8_policy(cfg.precision, device_type) is not None:
        # The FP8 copies replace the GEMMs of megatron's own parallel linears; TE's fused
        # norm+linear modules are other classes, and with them the decode would stay bf16.
        if cfg.model.spec == "te":
            raise ConfigError("precision.fp8_rollout=true decodes through FP8 copies of the "
                              "weights of r1mega's local-spec linears; Transformer Engine's fused "
                              "layers (model.spec=te) are not covered. Set model.spec=local (or "
                              "auto) or precision.fp8_rollout=false.")
        cfg.model.spec = "local"  # auto would take TE's layers on a GPU where TE imports
    policy = resolve_fp8_policy(cfg.precision, device_type)
    if policy is None:
        return
    if policy.backend == "te" and cfg.model.num_experts:
        # The MoE layers are r1mega's own (local spec): TE's fp8_autocast would not reach them.
        raise ConfigError("precision.fp8 with the Transformer Engine backend has no MoE layer here "
                          "(model.num_experts > 0 builds r1mega's local-spec MoE layers, which TE's "
                          "fp8_autocast does not reach); set precision.fp8_backend=native.")
    kept = policy.bf16_first_layers + policy.bf16_last_layers
    if kept >= cfg.model.num_layers:
        raise ConfigError(
            f"precision.fp8_bf16_first_layers + precision.fp8_bf16_last_layers = {kept} keeps "
            f"every one of model.num_layers={cfg.model.num_layers} in bf16; lower them or set "
            f"precision.fp8=false.")


def validate_lean_optimizer(cfg: Config, device_type: Optional[str] = None) -> None:
    """optimizer.master_weights / optimizer.moments_dtype (r1mega/train/lean_adam.py): the
    combinations that are implemented, and the precision settings they need."""
    o = cfg.optimizer
    _choice("optimizer.master_weights", o.master_weights, set(MASTER_MODES))
    _choice("optimizer.moments_dtype", o.moments_dtype, set(MOMENT_DTYPES))
    if o.master_weights == "fp32" and o.moments_dtype == "fp32":
        return
    what = f"optimizer.master_weights={o.master_weights}, optimizer.moments_dtype={o.moments_dtype}"
    if o.name == "sgd":
        raise ConfigError(f"{what} is an AdamW state; optimizer.name=sgd has no moments. Set both "
                          f"back to fp32 or use optimizer.name=adam.")
    if cfg.parallel.distributed_optimizer:
        raise ConfigError(f"{what} is implemented for the non-distributed optimizer only (megatron's "
                          f"distributed optimizer shards fp32 masters); set "
                          f"parallel.distributed_optimizer=false.")
    if o.master_weights == "fp32":
        return
    dtype = cfg.precision.dtype
    if dtype == "auto":
        from r1mega.precision.policy import default_device_type

        dtype = "bf16" if (device_type or default_device_type()) == "cuda" else "fp32"
    if dtype != "bf16":
        raise ConfigError(f"optimizer.master_weights={o.master_weights} keeps the master in (or "
                          f"beside) bf16 parameters, but precision.dtype={cfg.precision.dtype} gives "
                          f"{dtype} ones; set precision.dtype=bf16 or optimizer.master_weights=fp32.")
    if cfg.precision.grad_reduce_in_fp32:
        raise ConfigError(f"optimizer.master_weights={o.master_weights} steps from a bf16 gradient "
                          f"buffer (no fp32 grad buffer is the point of it); set "
                          f"precision.grad_reduce_in_fp32=false.")


def validate(cfg: Config, world_size: Optional[int] = None) -> Config:
    """Every check that needs no process group. ``world_size`` None skips the layout check."""
    m, p = cfg.model, cfg.parallel
    for key in ("tensor", "pipeline", "virtual_stages", "context", "expert"):
        if getattr(p, key) < 1:
            raise ConfigError(f"parallel.{key} must be >= 1, got {getattr(p, key)}.")
    _choice("model.family", m.family, {"llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3"})
    _choice("model.spec", m.spec, {"auto", "local", "te"})
    _choice("model.attention_backend", m.attention_backend, {"auto", "sdpa", "varlen", "flash"})
    _choice("model.recompute", m.recompute, {"none", "selective", "full"})
    _choice("precision.dtype", cfg.precision.dtype, {"auto", "fp32", "bf16", "fp16"})
    _choice("optimizer.decay_style", cfg.optimizer.decay_style, {"constant", "cosine", "linear"})
    if cfg.train.sft_decay_style is not None:
        _choice("train.sft_decay_style", cfg.train.sft_decay_style, {"constant", "cosine", "linear"})
    _choice("grpo.kl_estimator", cfg.grpo.kl_estimator, {"k1", "k2", "k3"})
    _choice("grpo.loss_agg", cfg.grpo.loss_agg,
            {"token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"})
    _choice("grpo.loss_impl", cfg.grpo.loss_impl, {"auto", "cuda", "torch"})
    _choice("data.on_bad_row", cfg.data.on_bad_row, {"error", "skip"})
    _choice("rewards.answer_form", cfg.rewards.answer_form, {"auto", "number", "expression"})
    if not 0.0 <= cfg.rewards.max_error_rate <= 1.0:
        raise ConfigError(f"rewards.max_error_rate must be a share in [0, 1] (1: never stop on "
                          f"reward errors), got {cfg.rewards.max_error_rate}.")
    _choice("train.mode", cfg.train.mode, {"grpo", "sft"})
    if cfg.train.time_budget_s < 0:
        raise ConfigError(f"train.time_budget_s must be >= 0 (0: no budget), got "
                          f"{cfg.train.time_budget_s}.")
    if cfg.logging.profile_step < 0:
        raise ConfigError(f"logging.profile_step must be >= 0 (0: off, N: profile GRPO step N), got "
                          f"{cfg.logging.profile_step}.")
    _choice("parallel.backend", p.backend, {"auto", "nccl", "gloo"})
    _choice("checkpoint.optimizer_format", cfg.checkpoint.optimizer_format,
            {"fully_reshardable", "dp_reshardable"})

    if m.num_attention_heads % m.num_query_groups != 0:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"model.num_query_groups={m.num_query_groups}; grouped-query attention needs whole groups."
        )
    if m.kv_channels < 0:
        raise ConfigError(f"model.kv_channels must be >= 0 (0: hidden/heads), got {m.kv_channels}.")
    if not m.kv_channels and m.family != "deepseek_v3" and m.hidden_size % m.num_attention_heads != 0:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by "
            f"model.num_attention_heads={m.num_attention_heads}; set model.kv_channels to the "
            f"head dimension if the model decouples them."
        )
    validate_rope_scaling(m.rope_scaling)
    if m.num_attention_heads % p.tensor != 0:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"parallel.tensor={p.tensor}: each TP rank needs whole heads. Use a parallel.tensor that "
            f"divides {m.num_attention_heads}."
        )
    if m.num_query_groups % p.tensor != 0:
        raise ConfigError(
            f"model.num_query_groups={m.num_query_groups} (KV heads) is not divisible by "
            f"parallel.tensor={p.tensor}: each TP rank needs whole KV groups. Use a parallel.tensor "
            f"that divides {m.num_query_groups}."
        )
    if m.ffn_hidden_size % p.tensor != 0:
        raise ConfigError(
            f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by parallel.tensor={p.tensor}."
        )
    stages = p.pipeline * p.virtual_stages
    if m.num_layers % stages != 0:
        raise ConfigError(
            f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline × "
            f"parallel.virtual_stages = {p.pipeline}×{p.virtual_stages} = {stages}; every "
            f"pipeline stage needs the same number of layers."
        )
    if p.virtual_stages > 1 and p.pipeline < 2:
        raise ConfigError("parallel.virtual_stages > 1 needs parallel.pipeline >= 2.")
    from r1mega.moe.settings import validate_moe

    validate_moe(m, p, ConfigError)
    from r1mega.models.deepseek_v3.config import validate_mla

    validate_mla(m, p, ConfigError)
    if p.sequence_parallel and p.tensor == 1:
        raise ConfigError("parallel.sequence_parallel needs parallel.tensor > 1.")
    validate_fp8(cfg)
    validate_lean_optimizer(cfg)
    if cfg.rollout.group_size < 1:
        raise ConfigError(f"rollout.group_size must be >= 1, got {cfg.rollout.group_size}.")
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        raise ConfigError(f"rollout.top_p must be in (0, 1], got {cfg.rollout.top_p}.")
    if cfg.rollout.temperature < 0:
        raise ConfigError(f"rollout.temperature must be >= 0, got {cfg.rollout.temperature}.")
    _validate_kv_cache_dtype(cfg)
    for key in ("kv_memory_fraction", "kv_keep_max_fraction"):
        value = getattr(cfg.rollout, key)
        if not 0.0 <= value <= 1.0 or (key == "kv_memory_fraction" and value == 0.0):
            raise ConfigError(f"rollout.{key} must be a fraction of device memory in "
                              f"{'(0' if key == 'kv_memory_fraction' else '[0'}, 1], got {value}.")
    if cfg.rollout.routing_replay:
        if not m.num_experts:
            raise ConfigError("rollout.routing_replay=true needs an MoE model (model.num_experts > 0): a "
                              "dense model has no routes to replay. Set rollout.routing_replay=false.")
        if p.pipeline > 1:
            raise ConfigError("rollout.routing_replay=true is implemented by the rollout engine, which runs "
                              "with parallel.pipeline=1 only (the pipeline generator records no routes). "
                              "Set parallel.pipeline=1 or rollout.routing_replay=false.")
        if p.tensor > 1 and p.expert > 1:
            raise ConfigError("rollout.routing_replay=true with parallel.tensor > 1 and parallel.expert > 1 "
                              "is not implemented: the rollout then routes a 1/TP share of the tokens on "
                              "each rank and records only that share. Use parallel.tensor=1 or "
                              "rollout.routing_replay=false.")
        if m.recompute == "full":
            raise ConfigError("rollout.routing_replay=true with model.recompute=full: the recomputed forward "
                              "in the backward would route freely, not as replayed. Use model.recompute="
                              "selective or none, or rollout.routing_replay=false.")
    validate_exact(cfg)
    if cfg.grpo.eps_low < 0 or cfg.grpo.eps_high < 0:
        raise ConfigError("grpo.eps_low and grpo.eps_high must be >= 0.")
    if cfg.grpo.dual_clip and cfg.grpo.dual_clip <= 1.0:
        raise ConfigError(f"grpo.dual_clip must be > 1 (or 0 to disable), got {cfg.grpo.dual_clip}.")
    if cfg.optimizer.lr < 0:
        raise ConfigError(f"optimizer.lr must be >= 0, got {cfg.optimizer.lr}.")
    if world_size is not None:
        dp = derive_data_parallel(p, world_size)
        # Experts are never split over TP (expert-TP = 1, r1mega/parallel/runtime.py), so the
        # expert-parallel groups are carved out of the tensor x data x context ranks of a stage.
        if (p.tensor * dp * p.context) % p.expert:
            raise ConfigError(
                f"parallel.expert={p.expert} does not divide the tensor x data x context parallel "
                f"size {p.tensor}x{dp}x{p.context}: expert-parallel groups are carved out of those "
                f"ranks. Launch a multiple of {p.expert * p.pipeline} ranks or change parallel.expert."
            )
        if cfg.data.global_batch_prompts % dp != 0:
            raise ConfigError(
                f"data.global_batch_prompts={cfg.data.global_batch_prompts} is not divisible by the "
                f"data-parallel size {dp}; every DP rank needs the same number of prompts."
            )
    _validate_reward_model(cfg)
    if cfg.phases:  # each phase's section overrides are checked against the whole tree
        from r1mega.pipeline.config import parse_phases

        parse_phases(cfg)
    return cfg


def _validate_kv_cache_dtype(cfg: Config) -> None:
    """``rollout.kv_cache_dtype=fp8`` is implemented by the rollout engine's GQA cache only (the
    device's sm_89 check happens when the engine is built: r1mega/rollout/kv_cache.py)."""
    r, m, p = cfg.rollout, cfg.model, cfg.parallel
    _choice("rollout.kv_cache_dtype", r.kv_cache_dtype, ("auto", "fp8"))
    if r.kv_cache_dtype != "fp8":
        return
    refuse = [
        (r.exact, "rollout.exact=true",
         "exact log-probs need the training forward's K/V numerics, not FP8 copies"),
        (m.family == "deepseek_v3", "model.family=deepseek_v3",
         "MLA's latent cache (r1mega/rollout/adapters/mla.py) has no FP8 layout"),
        (p.pipeline > 1 or p.virtual_stages > 1, f"parallel.pipeline={p.pipeline}",
         "pipeline-parallel rollouts decode by full recompute, with no KV cache to store in FP8"),
    ]
    for bad, what, why in refuse:
        if bad:
            raise ConfigError(f"rollout.kv_cache_dtype=fp8 with {what}: {why}; set "
                              f"rollout.kv_cache_dtype=auto.")


def validate_exact(cfg: Config) -> None:
    """``rollout.exact`` promises bitwise-equal rollout and training log-probs; every setting
    under which the code could not keep that promise is refused here, with the key to change."""
    r, m, p = cfg.rollout, cfg.model, cfg.parallel
    if not r.exact:
        return
    if m.spec == "auto":  # auto would take TE's layers on a GPU where TE imports; the exact
        m.spec = "local"  # mode needs r1mega's (below: an explicit te is refused)
    refuse = [
        (cfg.precision.fp8, "precision.fp8=true",
         "FP8 GEMMs are not batch-invariant kernels here (and TE's FP8 weights would differ from "
         "the rollout's); set precision.fp8=false"),
        (cfg.precision.fp8_rollout, "precision.fp8_rollout=true",
         "the rollout would decode with FP8 copies of the weights the training forward reads in "
         "bf16; set precision.fp8_rollout=false"),
        (m.spec == "te", "model.spec=te",
         "Transformer Engine's fused layers bypass the batch-invariant ops; set model.spec=local"),
        (m.num_experts > 0, f"model.num_experts={m.num_experts}",
         "the exact mode covers dense models (MoE routing/dispatch kernels are not covered)"),
        (m.compile_layers, "model.compile_layers=true",
         "inductor would lower the matmuls to its own kernels; set model.compile_layers=false"),
        (r.compile_decode, "rollout.compile_decode=true",
         "inductor would lower the decode matmuls to its own kernels; set rollout.compile_decode=false"),
        (r.top_k > 0, f"rollout.top_k={r.top_k}",
         "the trainer recomputes untruncated log-probs; set rollout.top_k=0"),
        (r.top_p < 1.0, f"rollout.top_p={r.top_p}",
         "the trainer recomputes untruncated log-probs; set rollout.top_p=1.0"),
        (p.pipeline > 1, f"parallel.pipeline={p.pipeline}",
         "the pipeline generator's sampler is not covered; use parallel.pipeline=1"),
        (p.context > 1, f"parallel.context={p.context}",
         "context-parallel attention splits keys over ranks; use parallel.context=1"),
        (p.tensor > 2, f"parallel.tensor={p.tensor}",
         "an all-reduce over more than two ranks may order its sum by message size; use "
         "parallel.tensor <= 2 (a sum of two partials has one order)"),
    ]
    for bad, what, why in refuse:
        if bad:
            raise ConfigError(f"rollout.exact=true with {what}: {why}, or set rollout.exact=false.")


def _validate_reward_model(cfg: Config) -> None:
    uses = any("reward_model" in (spec or {}) for spec in cfg.rewards.spec.values()
               if isinstance(spec, dict))
    if uses and not cfg.rewards.reward_model_dir:
        raise ConfigError("rewards.spec names reward_model but rewards.reward_model_dir is not "
                          "set; give the judge's directory (r1mega/rewards/reward_model.py).")
    if uses and cfg.rewards.num_workers < 1:
        raise ConfigError("rewards.spec names reward_model, which runs its judge model in the "
                          "reward workers; set rewards.num_workers >= 1.")
