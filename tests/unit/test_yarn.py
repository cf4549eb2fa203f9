"""YaRN RoPE: frequencies and attention factor against transformers' ``ROPE_INIT_FUNCTIONS['yarn']``
(the reference DeepSeek-V3 and Qwen checkpoints run with), and a yarn-scaled Llama/Qwen2
checkpoint converts to the same logits as transformers."""
import dataclasses
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from r1mega.config import Config, ConfigError, RopeScalingConfig, validate  # noqa: E402
from r1mega.models.yarn import mla_softmax_scale, yarn_attention_factor, yarn_inv_freq  # noqa: E402


def _hf_yarn(config):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")


CASES = [
    # DeepSeek-V3's own: 64 rope channels, factor 40 over 4096, mscale 1/1.
    dict(dim=64, base=10000.0, factor=40.0, old=4096, beta_fast=32, beta_slow=1, mscale=1.0, all_dim=1.0),
    # DeepSeek-V2's: mscale 0.707 on both.
    dict(dim=64, base=10000.0, factor=40.0, old=4096, beta_fast=32, beta_slow=1, mscale=0.707, all_dim=0.707),
    # Qwen2.5's long-context recipe: factor 4 over 32768, no mscale (the paper's default factor).
    dict(dim=128, base=1000000.0, factor=4.0, old=32768, beta_fast=32, beta_slow=1, mscale=None, all_dim=None),
    # A ramp of one dimension (low == high after rounding) and other betas.
    dict(dim=16, base=10000.0, factor=2.0, old=64, beta_fast=8, beta_slow=2, mscale=None, all_dim=None),
]


@pytest.mark.parametrize("case", CASES)
def test_frequencies_and_attention_factor_match_transformers(case):
    params = {"rope_type": "yarn", "rope_theta": case["base"], "factor": case["factor"],
              "original_max_position_embeddings": case["old"], "beta_fast": case["beta_fast"],
              "beta_slow": case["beta_slow"]}
    if case["mscale"] is not None:
        params.update(mscale=case["mscale"], mscale_all_dim=case["all_dim"])
    hf_cfg = transformers.LlamaConfig(hidden_size=case["dim"] * 2, num_attention_heads=2, head_dim=case["dim"],
                                      max_position_embeddings=case["old"] * 4, rope_parameters=params)
    want_freq, want_factor = _hf_yarn(hf_cfg)
    ours = RopeScalingConfig(type="yarn", factor=case["factor"], original_max_position_embeddings=case["old"],
                             beta_fast=case["beta_fast"], beta_slow=case["beta_slow"],
                             mscale=case["mscale"] or 1.0, mscale_all_dim=case["all_dim"] or 0.0)
    got = yarn_inv_freq(case["dim"], case["base"], ours)
    assert got.dtype == torch.float32 and got.shape == want_freq.shape
    assert torch.equal(got, want_freq.float())
    assert yarn_attention_factor(ours) == pytest.approx(want_factor, rel=1e-12)
    # Not vacuous: the scaled frequencies differ from plain RoPE in the low-frequency half.
    plain = 1.0 / case["base"] ** (torch.arange(0, case["dim"], 2).float() / case["dim"])
    assert not torch.allclose(got, plain) and torch.equal(got[0], plain[0])


def test_mla_softmax_scale_matches_transformers_deepseek_v3():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    rope = {"rope_type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096}
    ours = RopeScalingConfig(type="yarn", factor=40.0, mscale=0.707, mscale_all_dim=0.707,
                             original_max_position_embeddings=4096)
    assert mla_softmax_scale(192, ours) == pytest.approx(yarn_apply_mscale(rope, 192 ** -0.5), rel=1e-12)
    assert mla_softmax_scale(192, RopeScalingConfig()) == 192 ** -0.5
    # megatron's MLA computes its own from the same fields (r1mega passes them through).
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_mscale

    m = _yarn_get_mscale(40.0, 0.707)
    assert mla_softmax_scale(192, ours) == pytest.approx(m * m / math.sqrt(192), rel=1e-12)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_yarn_checkpoint_converts_to_transformers_logits(tmp_path, rt_fp32, family):
    from r1mega.config import PrecisionConfig
    from r1mega.convert.hf_bridge import load_hf_into_model
    from r1mega.convert.hf_config import hf_config_from_model_config, model_config_from_hf
    from r1mega.convert.hf_io import HFCheckpoint
    from r1mega.convert.testing import make_tiny_hf_dir
    from r1mega.convert.verify import compare_logits, hf_reference_logits, our_logits, probe_tokens
    from r1mega.models.gpt import build_model

    hf_dir = make_tiny_hf_dir(str(tmp_path / "hf"), family, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    hf = HFCheckpoint(hf_dir).config
    cfg = dataclasses.replace(model_config_from_hf(hf), spec="local")
    assert cfg.rope_scaling.type == "yarn" and cfg.rope_scaling.factor == 4.0
    chunks = build_model(cfg, rt_fp32, PrecisionConfig(dtype="fp32"), wrap=False)
    load_hf_into_model(chunks, hf_dir, cfg, rt_fp32)
    ids = probe_tokens(97, batch=2, seq_len=48, seed=1)
    report = compare_logits(hf_reference_logits(hf_dir, ids), our_logits(chunks, ids, 97, rt_fp32))
    assert report.max_abs_logit > 1.0
    assert report.max_abs_diff <= 1e-4 and report.mean_kl < 1e-8, report.line()
    # Exported config.json reads back as the same scaling.
    back = hf_config_from_model_config(cfg, original=hf)
    assert model_config_from_hf(back).rope_scaling == cfg.rope_scaling


@pytest.mark.parametrize("overrides,needle", [
    (dict(type="yarn", beta_fast=1.0, beta_slow=2.0), "beta_fast=1.0 must exceed"),
    (dict(type="yarn", factor=0.5), "factor must be >= 1"),
    (dict(type="ntk"), "'ntk' is not one of"),
])
def test_bad_yarn_configs_are_refused_by_key(overrides, needle):
    cfg = Config()
    cfg.model.rope_scaling = RopeScalingConfig(**overrides)
    with pytest.raises(ConfigError, match=needle):
        validate(cfg)


def test_rollout_engine_applies_yarn(tmp_path, rt_fp32):
    """The engine's own RoPE and softmax scale follow YaRN (frequencies and attention factor):
    greedy tokens equal transformers' greedy by full forward passes on a yarn-scaled Qwen2 past
    the original length. (Not its generate(): with this config transformers 5.24's cached
    generation picks other tokens than its own cache-free forward, from the third token on.)"""
    from r1mega.config import PrecisionConfig, RolloutConfig
    from r1mega.convert.hf_bridge import load_hf_into_model
    from r1mega.convert.hf_config import model_config_from_hf
    from r1mega.convert.hf_io import HFCheckpoint
    from r1mega.convert.testing import make_tiny_hf_dir
    from r1mega.models.gpt import build_model
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    hf_dir = make_tiny_hf_dir(str(tmp_path / "hf"), "qwen2", std=0.1, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8})
    cfg = dataclasses.replace(model_config_from_hf(HFCheckpoint(hf_dir).config), spec="local")
    chunks = build_model(cfg, rt_fp32, PrecisionConfig(dtype="fp32"), wrap=False)
    load_hf_into_model(chunks, hf_dir, cfg, rt_fp32)
    prompt = [(11 * j) % 97 for j in range(12)]
    eng = RolloutEngine(chunks, RolloutConfig(kv_block_tokens=4, kv_cpu_tokens=1024, temperature=0.0,
                                              max_new_tokens=8, cuda_graphs=False),
                        rt_fp32, eos_ids=[], vocab_size=97)
    ours = eng.generate([GenerationRequest(prompt, n=1)])[0].token_ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(hf(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    assert ours == seq[len(prompt):]
