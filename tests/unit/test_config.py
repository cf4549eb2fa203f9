"""Every check of r1mega.config: each bad config is refused with a message naming key and fix."""
from __future__ import annotations

import pytest

from r1mega.config import ConfigError, load_config, validate

# (overrides, world size or None, substrings the message must contain)
BAD = [
    (["parallel.tensor=0"], None, ["parallel.tensor must be >= 1"]),
    (["parallel.pipeline=0"], None, ["parallel.pipeline must be >= 1"]),
    (["model.family=lama"], None, ["model.family", "'lama'", "Did you mean 'llama'"]),
    (["model.spec=tee"], None, ["model.spec", "Did you mean 'te'"]),
    (["model.attention_backend=flsh"], None, ["model.attention_backend", "Did you mean 'flash'"]),
    (["model.recompute=ful"], None, ["model.recompute", "Did you mean 'full'"]),
    (["precision.dtype=bf61"], None, ["precision.dtype"]),
    (["optimizer.decay_style=cosin"], None, ["optimizer.decay_style", "Did you mean 'cosine'"]),
    (["train.sft_decay_style=constnt"], None, ["train.sft_decay_style", "Did you mean 'constant'"]),
    (["grpo.kl_estimator=k4"], None, ["grpo.kl_estimator"]),
    (["grpo.loss_agg=mean"], None, ["grpo.loss_agg"]),
    (["grpo.loss_impl=triton"], None, ["grpo.loss_impl"]),
    (["data.on_bad_row=ignore"], None, ["data.on_bad_row"]),
    (["train.mode=dpo"], None, ["train.mode"]),
    (["parallel.backend=mpi"], None, ["parallel.backend"]),
    (["model.num_attention_heads=4", "model.num_query_groups=3"], None,
     ["model.num_attention_heads=4", "model.num_query_groups=3"]),
    (["model.rope_scaling.type=llama31"], None, ["model.rope_scaling.type", "Did you mean 'llama3'"]),
    (["model.rope_scaling.type=llama3", "model.rope_scaling.factor=0.5"], None,
     ["model.rope_scaling.factor must be >= 1", "0.5"]),
    (["model.rope_scaling.type=llama3", "model.rope_scaling.low_freq_factor=0"], None,
     ["model.rope_scaling.low_freq_factor must be > 0"]),
    (["model.rope_scaling.type=llama3", "model.rope_scaling.high_freq_factor=1.0"], None,
     ["model.rope_scaling.high_freq_factor=1.0", "greater than", "low_freq_factor=1.0"]),
    (["model.rope_scaling.type=llama3", "model.rope_scaling.original_max_position_embeddings=0"],
     None, ["model.rope_scaling.original_max_position_embeddings must be >= 1"]),
    (["model.hidden_size=66"], None, ["model.hidden_size=66", "model.num_attention_heads=4"]),
    (["parallel.tensor=8"], None, ["model.num_attention_heads=4", "parallel.tensor=8",
                                   "whole heads"]),
    (["model.num_attention_heads=8", "model.hidden_size=64", "parallel.tensor=4"], None,
     ["model.num_query_groups=2", "KV", "parallel.tensor=4"]),
    (["model.ffn_hidden_size=175", "parallel.tensor=2"], None,
     ["model.ffn_hidden_size=175", "parallel.tensor=2"]),
    (["model.num_layers=3", "parallel.pipeline=2"], None,
     ["model.num_layers=3", "parallel.pipeline", "2×1"]),
    (["model.num_layers=4", "parallel.pipeline=2", "parallel.virtual_stages=4"], None,
     ["model.num_layers=4", "parallel.virtual_stages", "2×4 = 8"]),
    (["parallel.virtual_stages=2"], None, ["parallel.virtual_stages > 1 needs parallel.pipeline"]),
    (["model.num_experts=6", "parallel.expert=4"], None,
     ["model.num_experts=6", "parallel.expert=4"]),
    (["parallel.expert=2"], None, ["parallel.expert=2", "no experts"]),
    (["parallel.sequence_parallel=true"], None, ["parallel.sequence_parallel", "tensor > 1"]),
    (["rollout.group_size=0"], None, ["rollout.group_size"]),
    (["rollout.top_p=1.5"], None, ["rollout.top_p"]),
    (["rollout.temperature=-1"], None, ["rollout.temperature"]),
    (["rollout.kv_cache_dtype=fp16"], None, ["rollout.kv_cache_dtype", "'fp16'", "'auto', 'fp8'"]),
    (["rollout.kv_cache_dtype=fp8", "rollout.exact=true", "rollout.compile_decode=false"], None,
     ["rollout.kv_cache_dtype=fp8 with rollout.exact=true", "rollout.kv_cache_dtype=auto"]),
    (["rollout.kv_cache_dtype=fp8", "model.family=deepseek_v3", "model.num_query_groups=4"], None,
     ["rollout.kv_cache_dtype=fp8 with model.family=deepseek_v3", "MLA"]),
    (["rollout.kv_cache_dtype=fp8", "model.num_layers=4", "parallel.pipeline=2"], None,
     ["rollout.kv_cache_dtype=fp8 with parallel.pipeline=2", "rollout.kv_cache_dtype=auto"]),
    (["grpo.eps_low=-0.1"], None, ["grpo.eps_low"]),
    (["grpo.dual_clip=0.5"], None, ["grpo.dual_clip"]),
    (["optimizer.lr=-1"], None, ["optimizer.lr"]),
    (["parallel.tensor=2", "parallel.pipeline=2"], 6,
     ["World size 6", "parallel.tensor × parallel.pipeline", "= 4", "multiple of 4"]),
    (["parallel.tensor=2", "parallel.data=3"], 4, ["parallel.data=3", "= 2", "6 ranks"]),
    (["data.global_batch_prompts=3"], 2, ["data.global_batch_prompts=3", "data-parallel size 2"]),
]


@pytest.mark.parametrize("overrides,world,expected", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_each_check_names_key_and_fix(overrides, world, expected):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world)
    for text in expected:
        assert text in str(err.value), f"{text!r} not in {err.value}"


def test_fp8_on_cpu_without_transformer_engine_fails_loudly():
    # Without TE, precision.fp8 picks r1mega's native FP8 path, which needs an FP8 GPU; on the
    # CPU it is refused by key (the other FP8 checks: tests/unit/test_fp8_policy.py).
    pytest.importorskip("torch")
    from r1mega.config_checks import validate_fp8

    with pytest.raises(ConfigError, match="precision.fp8=true: native FP8 needs a CUDA GPU"):
        validate_fp8(load_config(None, ["precision.fp8=true", "precision.fp8_backend=native"]),
                     device_type="cpu")


@pytest.mark.parametrize("override,expected", [
    ("parallel.tensr=2", "Unknown config key 'parallel.tensr'. Did you mean 'parallel.tensor'?"),
    ("optimizr.lr=1e-6", "Unknown config key 'optimizr'. Did you mean 'optimizer'?"),
    ("model.rope_thta=1e6", "Did you mean 'model.rope_theta'?"),
    ("model.rope_scaling.facter=8", "Did you mean 'model.rope_scaling.factor'?"),
])
def test_typo_key_gets_suggestion(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)


def test_typo_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("parallel:\n  pipline: 2\n")
    with pytest.raises(ConfigError, match="parallel.pipline.*parallel.pipeline"):
        load_config(str(path))


@pytest.mark.parametrize("override,expected", [
    ("parallel.tensor=two", "parallel.tensor: expected an integer"),
    ("parallel.sequence_parallel=1", "parallel.sequence_parallel: expected true/false"),
    ("optimizer.lr=fast", "optimizer.lr: expected a number"),
    ("model.family=3", "model.family: expected a string"),
])
def test_wrong_types_are_named(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_good_layout_passes_and_overrides_apply():
    cfg = validate(load_config(None, ["parallel.tensor=2", "parallel.pipeline=2",
                                      "optimizer.lr=1e-6", "model.num_layers=4"]), world_size=8)
    assert (cfg.parallel.tensor, cfg.parallel.pipeline, cfg.optimizer.lr) == (2, 2, 1e-6)


def test_rope_scaling_section_from_yaml_validates_and_survives_asdict(tmp_path):
    import dataclasses

    from r1mega.config import ModelConfig

    path = tmp_path / "c.yaml"
    path.write_text("model:\n  rope_theta: 500000\n  rope_scaling:\n    type: llama3\n    factor: 32\n")
    m = validate(load_config(str(path))).model
    rs = m.rope_scaling
    assert (rs.type, rs.factor, rs.high_freq_factor) == ("llama3", 32.0, 4.0)  # 4.0: the default
    assert ModelConfig(**dataclasses.asdict(m)) == m  # how checkpoint meta.json rebuilds it
    validate(load_config(None, ["model.rope_scaling.factor=0.5"]))  # type none: the fields are unused


def test_override_inside_a_mapping_keeps_its_other_entries():
    from r1mega.config import load_config

    cfg = load_config("configs/demo.yaml", ["data.task_options.operators=+-*",
                                            "rewards.spec.arithmetic.format=0.5"])
    assert cfg.data.task_options == {"digits": 1, "terms": 3, "operators": "+-*"}
    assert cfg.rewards.spec["arithmetic"] == {"exact_match": 1.0, "format": 0.5}
    # A whole mapping given at once replaces it.
    cfg = load_config("configs/demo.yaml", ["data.task_options={digits: 2}"])
    assert cfg.data.task_options == {"digits": 2}
    with pytest.raises(ConfigError, match="not a section"):
        load_config(None, ["optimizer.lr.x=1"])
