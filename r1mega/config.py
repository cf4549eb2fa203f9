"""One typed config tree for every r1mega program.

Each component receives only its own section (``cfg.rollout`` goes to the rollout engine, never
``cfg``). YAML files in ``configs/`` fill the tree; ``key.sub=value`` overrides come last. Every
check that needs no process group runs in :func:`validate` so that a bad config fails before any
rank starts talking to another.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from r1mega.errors import UserValueError
from r1mega.models.deepseek_v3.config import MLAConfig
from r1mega.yaml_numbers import yaml_load as _yaml_load


class ConfigError(UserValueError):
    """A config problem, always naming the key at fault and the fix."""


@dataclass
class RopeScalingConfig:
    """Hugging Face ``rope_scaling`` / ``rope_parameters`` of Llama 3.1/3.2 (``rope_type: llama3``).

    "llama3" divides the inverse frequencies whose wavelength exceeds
    ``original_max_position_embeddings / low_freq_factor`` by ``factor``, keeps those shorter than
    ``original_max_position_embeddings / high_freq_factor``, and blends linearly in between.
    The defaults are Llama 3.1's; "none" is plain RoPE and ignores the other fields.
    """
    type: str = "none"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # "yarn" only (r1mega/models/yarn.py; DeepSeek-V3: factor 40, original 4096, 32, 1, 1, 1):
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass
class ModelConfig:
    # Llama 2/3, SmolLM2, Qwen2/2.5 (qkv_bias), Qwen3 (qk_norm) are all this one family;
    # qwen3_moe and deepseek_v3 (MLA, model.mla) are the others.
    family: str = "llama"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    # Per-head dimension; 0 means hidden_size / num_attention_heads. Qwen3 decouples the two
    # (e.g. Qwen3-0.6B: hidden 1024, 16 heads of 128).
    kv_channels: int = 0
    ffn_hidden_size: int = 176
    vocab_size: int = 128
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_epsilon: float = 1e-5
    qkv_bias: bool = False
    qk_norm: bool = False
    tied_embeddings: bool = True
    # The embedding is padded so that each TP rank holds an equal slice of this multiple.
    make_vocab_size_divisible_by: int = 64
    init_method_std: float = 0.02
    # "auto": Transformer Engine spec when TE imports and the run is on CUDA, else the local one.
    spec: str = "auto"
    # "auto" | "sdpa" | "varlen" | "flash": how core attention runs packed sequences.
    attention_backend: str = "auto"
    # torch.compile each decoder layer of the policy and reference (r1mega/models/compile.py):
    # one compiled region per layer, one graph for packed micro-batches of any size, less host
    # time per layer. Costs a compile on the first training and first log-prob pass. On CPU
    # inductor needs a C++ compiler and the small demo models do not gain from it: off there.
    compile_layers: bool = False
    # Load Hugging Face weights at start (a directory with config.json + safetensors).
    init_from_hf: Optional[str] = None
    # Activation recomputation: "none" | "selective" | "full".
    recompute: str = "none"
    # ---- Mixture of experts (0 experts: a dense model; the other moe_* keys must stay default).
    # Checked by r1mega/moe/settings.py (validate_moe), which also turns them into the layer's
    # settings. Qwen3-MoE: softmax router, norm_topk_prob. DeepSeek-V3: sigmoid_group router,
    # groups, routed scaling, bias balancing, a shared expert and the first layers dense.
    num_experts: int = 0
    moe_router_topk: int = 2
    # Width of each routed expert's SwiGLU (0: ffn_hidden_size).
    moe_ffn_hidden_size: int = 0
    # Width of the shared expert every token also passes through (0: none).
    moe_shared_expert_ffn_hidden_size: int = 0
    # "softmax" (Qwen3-MoE) | "sigmoid_group" (DeepSeek-V3 group-limited top-k)
    moe_router: str = "softmax"
    # Renormalise the k chosen weights to sum 1 (Qwen3-MoE norm_topk_prob; DeepSeek-V3 does).
    moe_norm_topk_prob: bool = True
    # sigmoid_group only: experts fall into moe_num_groups groups, tokens pick moe_topk_groups.
    moe_num_groups: int = 1
    moe_topk_groups: int = 1
    # Multiplies the routed output's weights (DeepSeek-V3: 2.5).
    moe_routed_scaling_factor: float = 1.0
    # Auxiliary-loss-free balancing: per-expert selection bias step per optimizer step (0: off).
    moe_bias_update_rate: float = 0.0
    # Sequence-level balance loss and router z-loss coefficients, added to the training loss.
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float = 0.0
    # The first k layers keep a dense FFN of ffn_hidden_size (DeepSeek-V3: 3).
    moe_first_k_dense: int = 0
    # Latent attention sizes of family deepseek_v3 (r1mega/models/deepseek_v3/config.py).
    mla: MLAConfig = field(default_factory=MLAConfig)
    # Multi-token prediction modules (deepseek_v3; r1mega/models/deepseek_v3/mtp.py) and the
    # weight of their loss in SFT/pre-training (DeepSeek-V3: 1 module, 0.3 then 0.1).
    mtp_num_layers: int = 0
    mtp_loss_weight: float = 0.1

    def __post_init__(self):
        # ModelConfig(**dataclasses.asdict(cfg)) (checkpoint meta.json) hands the section over
        # as a dict.
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScalingConfig(**self.rope_scaling)
        if isinstance(self.mla, dict):
            self.mla = MLAConfig(**self.mla)


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    # Virtual pipeline stages per rank (interleaved 1F1B); 1 means plain 1F1B.
    virtual_stages: int = 1
    context: int = 1
    expert: int = 1
    # Data parallel size; 0 derives it from the world size.
    data: int = 0
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    # "auto": nccl with CUDA, gloo without.
    backend: str = "auto"
    # Seconds before a collective that waits on a dead rank fails the job.
    timeout_s: int = 600
    seed: int = 1234


@dataclass
class PrecisionConfig:
    # "auto": bf16 on GPU, fp32 on CPU.
    dtype: str = "auto"
    fp8: bool = False
    # native: tensorwise | rowwise | blockwise; te: delayed | current | blockwise | mxfp8.
    fp8_recipe: str = "blockwise"
    # auto: Transformer Engine when it imports, else r1mega's native scaled_mm path.
    fp8_backend: str = "auto"
    # Transformer blocks kept in bf16 at the start / end of the model (sensitive ends).
    fp8_bf16_first_layers: int = 0
    fp8_bf16_last_layers: int = 0
    # FP8 format of activation/weight gradients in dgrad/wgrad (e4m3 | e5m2).
    fp8_grad_format: str = "e4m3"
    # Native path only: emulate FP8 GEMMs (quantise, dequantise, fp32 matmul) where no FP8 GPU is.
    fp8_emulate: bool = False
    # Rollout decodes with FP8 copies of the linear weights, refreshed after each update.
    fp8_rollout: bool = False
    # Native path: the MoE experts in FP8 too (routed: rowwise grouped GEMM; shared: the recipe).
    fp8_experts: bool = False
    grad_reduce_in_fp32: bool = True


@dataclass
class OptimizerConfig:
    name: str = "adam"
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    # "constant" | "cosine" | "linear"
    decay_style: str = "constant"
    decay_steps: int = 0
    # "fp32" | "bf16_remainder" (bf16 + int16 low bits, exact) | "bf16_stochastic" (no master).
    master_weights: str = "fp32"
    # Adam moments' storage dtype, "fp32" | "bf16" (computed in fp32 either way).
    moments_dtype: str = "fp32"


@dataclass
class DataConfig:
    # A JSONL/Parquet path, or "builtin:<task>" / "reasoning_gym:<name>" for procedural prompts.
    source: str = "builtin:arithmetic"
    eval_source: Optional[str] = None
    num_examples: int = 1000
    eval_examples: int = 100
    seed: int = 0
    # "r1_zero" | "chat" | "raw"
    template: str = "r1_zero"
    # "char" | a SentencePiece .model | a tokenizer.json | an HF directory
    tokenizer: str = "char"
    max_prompt_tokens: int = 256
    # "error" stops at a malformed row naming file and line; "skip" counts it and goes on.
    on_bad_row: str = "error"
    # Options of a builtin task, e.g. {"digits": 2, "operators": "+-"} for builtin:arithmetic.
    task_options: dict = field(default_factory=dict)
    # Prompts per optimizer step over all DP ranks.
    global_batch_prompts: int = 8
    # Token budget of one packed micro-batch on one rank (training forward/backward).
    micro_batch_tokens: int = 4096


@dataclass
class RolloutConfig:
    group_size: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list = field(default_factory=list)
    # Fraction of free accelerator memory the paged KV cache may take during rollout.
    kv_memory_fraction: float = 0.5
    # A KV cache no bigger than this share of the device's memory is KEPT between rollout phases,
    # and with it the captured decode graphs (each phase would otherwise re-zero it and recapture,
    # to hand a few hundred MB to training). Bigger caches are freed
    # before every training phase. 0: always free.
    kv_keep_max_fraction: float = 0.02
    kv_block_tokens: int = 16
    # "auto" (the model dtype) | "fp8": e4m3 K/V with per-(token, head) scales (r1mega/rollout/kv_cache.py).
    kv_cache_dtype: str = "auto"
    # Without a GPU there is no free memory to take a fraction of: the cache holds this many tokens.
    kv_cpu_tokens: int = 65536
    # Token budget of one prefill step (new prompts are batched up to it).
    max_prefill_tokens: int = 16384
    # Also return each token's log-prob at temperature 1 without top-k/top-p truncation.
    return_logprobs_t1: bool = False
    # Upper bound on sequences decoded together (continuous batching).
    max_batch_sequences: int = 256
    cuda_graphs: bool = True
    # GPU: torch.compile the decode forward (fuses its elementwise kernels at a one-time compile
    # cost per process); falls back to eager if compiling fails.
    compile_decode: bool = True
    # GPU with CUDA graphs: launch decode step k+1 before the host reads step k (see
    # r1mega/rollout/overlap.py); the tokens are identical, only the host's wait is hidden.
    # CPU runs ignore it.
    overlap_steps: bool = True
    # Batch-invariant numerics in the rollout and the policy's forward: rollout log-probs equal
    # the trainer's bit for bit (r1mega/ops/batch_invariant.py; checks in validate_exact).
    exact: bool = False
    seed: int = 0
    # MoE: record each token's experts in the rollout, replay them in training (r1mega/moe/replay.py).
    routing_replay: bool = False


@dataclass
class GRPOConfig:
    eps_low: float = 0.2
    eps_high: float = 0.28
    # Dual clip constant c > 1 bounds the loss for negative advantages; 0 disables.
    dual_clip: float = 0.0
    kl_beta: float = 0.0
    # "k1" | "k2" | "k3"
    kl_estimator: str = "k3"
    # "token_mean" | "seq_mean_token_mean" | "seq_mean_token_sum_norm"
    loss_agg: str = "token_mean"
    # Constant for seq_mean_token_sum_norm (Dr. GRPO); 0 uses rollout.max_new_tokens.
    loss_norm_tokens: int = 0
    scale_rewards: bool = True
    # Truncated importance weight cap against the rollout's log-probs; 0 disables.
    tis_cap: float = 0.0
    inner_epochs: int = 1
    # Drop groups whose rewards are all equal (DAPO dynamic sampling).
    drop_equal_groups: bool = False
    offload_reference: bool = False
    # "auto" | "cuda" | "torch"
    loss_impl: str = "auto"


@dataclass
class RewardsConfig:
    # task type -> {reward name: weight}
    spec: dict = field(default_factory=lambda: {"math": {"math_accuracy": 1.0, "format": 0.1}})
    num_workers: int = 2
    timeout_s: float = 10.0
    overlong_penalty_tokens: int = 0
    target_language: str = "en"
    reflection_phrases: list = field(
        default_factory=lambda: ["wait", "let me re-check", "let me check", "double-check"]
    )
    # "keep": a completion cut by max_new_tokens is scored as it is; "zero": its total is 0.
    truncated: str = "keep"
    math_timeout_s: int = 5
    # What a math answer must be (rewards/math.py): "auto" (a number when the reference is one,
    # else symbolic equivalence), "number", or "expression" (symbolic equivalence always).
    answer_form: str = "auto"
    sandbox_timeout_s: float = 5.0
    sandbox_memory_mb: int = 1024
    # Python modules that register extra rewards (@register_reward); imported in every worker.
    modules: list = field(default_factory=list)
    # The share of a step's completions whose reward failed to run (raised, timed out, killed
    # its worker, lacked a reference field) above which training stops: such completions score
    # 0 through no fault of their own, and a policy trained on them learns from noise.
    max_error_rate: float = 0.05
    # reward_model reward: an r1mega checkpoint directory of the judge (rewards/reward_model.py).
    reward_model_dir: Optional[str] = None


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    save_every_steps: int = 0
    keep_last: int = 3
    load: Optional[str] = None
    save_on_signal: bool = True
    # "fully_reshardable" (resume onto any layout) | "dp_reshardable" (faster; only DP may change)
    optimizer_format: str = "fully_reshardable"
    # Resume automatically from the newest valid checkpoint in `dir` when one exists.
    auto_resume: bool = True


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    tensorboard: bool = True
    log_every_steps: int = 1
    samples_every_steps: int = 10
    num_samples: int = 2
    progress_bar: bool = True
    # Profile one GRPO step (1-based, as the console counts) with torch.profiler: rank 0 writes
    # <run_dir>/profile/step<N>.txt (time per phase, top ops, device syncs) and a chrome trace
    # step<N>.json.gz. 0: off (no profiler, no ranges). Step 1 includes warm-up (CUDA graph
    # capture, allocator growth): profile step 2 or later for the steady state.
    profile_step: int = 0


@dataclass
class TrainConfig:
    # "grpo" | "sft"
    mode: str = "grpo"
    steps: int = 10
    # SFT: `r1mega sft` runs sft_steps (or steps when 0); `r1mega train` with sft_steps > 0 runs
    # that many cold-start SFT steps first (fresh runs only). lr 0 means optimizer.lr.
    sft_steps: int = 0
    sft_lr: float = 0.0
    # The SFT lr schedule ("constant" | "cosine" | "linear"); None means optimizer.decay_style.
    # Apart from optimizer.decay_style so that a cold start can keep its lr while RL decays its own.
    sft_decay_style: Optional[str] = None
    sft_batch_examples: int = 32
    # JSONL/Parquet of {"prompt", "response"} rows; None: data.source (builtin:arithmetic has
    # worked solutions).
    sft_source: Optional[str] = None
    eval_every_steps: int = 0
    # Held-out evaluation: temperature 0 is greedy (one completion per prompt); > 0 averages
    # eval_samples sampled completions per prompt.
    eval_temperature: float = 0.0
    eval_samples: int = 1
    # Stop after this many NaN/Inf steps in a row (0: never stop, only skip).
    max_consecutive_nonfinite: int = 0
    # Wall-clock budget of `r1mega train` in seconds (0: none), counted from the trainer's start.
    # GRPO ends early, as if `steps` were reached (final evaluation, final checkpoint), at the
    # first step boundary where one more step plus the final evaluation would overrun it (the
    # final evaluation's time is predicted from the first one: r1mega/train/budget.py).
    time_budget_s: float = 0.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # `r1mega pipeline`: the phase list, each entry checked by r1mega/pipeline/config.py.
    phases: list = field(default_factory=list)


# ----------------------------------------------------------------------------- loading


def _suggest(key: str, candidates, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return f" Did you mean '{prefix}{close[0]}'?" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints widen to floats, nothing else converts."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r} ({type(value).__name__}).")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r} ({type(value).__name__}).")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r} ({type(value).__name__}).")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r} ({type(value).__name__}).")
    if tp in (list, dict) or origin in (list, dict):
        want = origin or tp
        if isinstance(value, want):
            return value
        raise ConfigError(f"{key}: expected a {want.__name__}, got {value!r}.")
    return value


def _merge(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}.")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in names:
            raise ConfigError(f"Unknown config key '{full}'.{_suggest(str(key), names, prefix)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _apply_override(cfg: Any, key: str, value: Any) -> None:
    """``a.b.c=value``: sections are walked; a key that reaches inside a mapping field
    (``data.task_options.operators=+-``) changes that entry and keeps the others."""
    parts = key.split(".")
    obj, prefix = cfg, ""
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(obj)}
        if part not in names:
            raise ConfigError(f"Unknown config key '{prefix}{part}'.{_suggest(part, names, prefix)}")
        current, full, rest = getattr(obj, part), prefix + part, parts[i + 1:]
        if dataclasses.is_dataclass(current):
            if not rest:
                _merge(current, value, full + ".")
                return
            obj, prefix = current, full + "."
            continue
        if rest:
            if not isinstance(current, dict):
                raise ConfigError(f"Override '{key}': {full} is a value, not a section.")
            value = _set_in(copy.deepcopy(current), rest, value, full)
        setattr(obj, part, _coerce(value, typing.get_type_hints(type(obj))[part], full))
        return


def _set_in(mapping: dict, path: list, value: Any, where: str) -> dict:
    node = mapping
    for p in path[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}.{p} is a value, not a mapping.")
    node[path[-1]] = value
    return mapping


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"Override '{text}' must look like key.sub=value (e.g. parallel.tensor=2).")
    key, raw = text.split("=", 1)
    # YAML parsing gives 2 -> int, 1e-6 -> float (with our tweak), true -> bool, [a,b] -> list.
    try:
        value = _yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"Override '{text}': cannot parse value: {exc}") from None
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _dotted_keys(data: Any, prefix: str = "") -> set:
    """{"model": {"rope_scaling": {"factor": 2}}} -> {"model", "model.rope_scaling", ...}."""
    if not isinstance(data, dict):
        return set()
    out = set()
    for key, value in data.items():
        full = prefix + str(key)
        out |= {full} | _dotted_keys(value, full + ".")
    return out


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """YAML file (optional) + dotted overrides -> validated :class:`Config`."""
    cfg = Config()
    explicit: set = set()
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"Config file '{path}' does not exist.")
        with open(path) as f:
            try:
                data = _yaml_load(f) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"Config file '{path}' is not valid YAML: {exc}") from None
        _merge(cfg, data)
        explicit |= _dotted_keys(data)
    for text in overrides or []:
        key, value = _parse_override(text)
        _apply_override(cfg, key, value)
        explicit |= _dotted_keys(_nest(key, value))
    if cfg.model.init_from_hf:  # the HF directory describes the model (and its tokenizer)
        from r1mega.convert.hf_config import apply_init_from_hf

        apply_init_from_hf(cfg, explicit)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_resolved(cfg: Config, run_dir: str) -> str:
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.yaml")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(dump_yaml(cfg))
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- validation


# The checks live beside the tree (config_checks.py); imported last because they read its types.
from r1mega.config_checks import (  # noqa: E402,F401 -- public here too
    derive_data_parallel, validate, validate_rope_scaling)
