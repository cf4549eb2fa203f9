"""Llama 3.1/3.2 rope scaling ("llama3"): our scaled inverse frequencies are transformers', and a
converted checkpoint computes transformers' logits at positions where the scaling matters.
(config.json mapping: test_convert_families.py; hf -> mcore -> hf: test_convert_cli.py.)"""
import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from r1mega.config import PrecisionConfig, RopeScalingConfig  # noqa: E402
from r1mega.convert.hf_bridge import load_hf_into_model  # noqa: E402
from r1mega.convert.hf_config import model_config_from_hf  # noqa: E402
from r1mega.convert.hf_io import HFCheckpoint  # noqa: E402
from r1mega.convert.testing import make_tiny_hf_dir  # noqa: E402
from r1mega.convert.verify import (DEFAULT_MAX_ABS_TOL, compare_logits, hf_reference_logits,  # noqa: E402
                                   our_logits, probe_tokens)
from r1mega.models.rope_scaling import llama3_inv_freq  # noqa: E402

# Not Llama 3.1's 8 / 1 / 4 / 8192: megatron's hard-coded constants would give other logits.
# With head_dim 12 and theta 1e4 the wavelengths are 6.3, 29, 135, 628, 2917, 13546 positions, so
# with an original length of 64 all three bands are hit: < 64/6 kept, between blended,
# > 64/1.5 divided by 5.
ROPE = {"rope_type": "llama3", "factor": 5.0, "low_freq_factor": 1.5, "high_freq_factor": 6.0,
        "original_max_position_embeddings": 64}
SCALING = RopeScalingConfig(type="llama3", factor=5.0, low_freq_factor=1.5, high_freq_factor=6.0,
                            original_max_position_embeddings=64)
SEQ_LEN = 96  # past the original length of 64


def _plain_inv_freq(head_dim=12, theta=10000.0):
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def test_llama3_inv_freq_is_transformers_and_megatron_defaults():
    import transformers
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    plain = _plain_inv_freq()
    ours = llama3_inv_freq(plain, SCALING)
    hf_cfg = transformers.LlamaConfig(hidden_size=48, num_attention_heads=4, max_position_embeddings=256,
                                      rope_scaling=dict(ROPE))
    ref, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    assert attention_factor == 1.0 and torch.equal(ours, ref)
    kept, scaled = ours == plain, torch.isclose(ours, plain / 5.0)
    assert kept[0] and scaled[2:].all() and not kept[1] and not scaled[1]  # one per band
    # With Llama 3.1's own constants megatron's _apply_scaling agrees (it fixes all but factor).
    llama31 = RopeScalingConfig(type="llama3")
    wide = _plain_inv_freq(128, 500000.0)
    megatron = RotaryEmbedding._apply_scaling(None, wide.clone(), factor=8.0)
    assert torch.equal(llama3_inv_freq(wide, llama31), megatron)


@pytest.fixture(scope="module")
def rt(rt_fp32):
    return rt_fp32


def _converted_logits(hf_dir, rt, ids):
    from r1mega.models.gpt import build_model

    cfg = dataclasses.replace(model_config_from_hf(HFCheckpoint(hf_dir).config), spec="local")
    chunks = build_model(cfg, rt, PrecisionConfig(dtype="fp32"), wrap=False)
    load_hf_into_model(chunks, hf_dir, cfg, rt)
    return cfg, our_logits(chunks, ids, cfg.vocab_size, rt)


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    return make_tiny_hf_dir(str(tmp_path_factory.mktemp("llama3")), "llama", rope_scaling=ROPE,
                            hidden_size=48, num_attention_heads=4, num_key_value_heads=2)


def test_llama3_logits_match_transformers(llama3_dir, rt):
    ids = probe_tokens(97, batch=2, seq_len=SEQ_LEN, seed=1)
    cfg, ours = _converted_logits(llama3_dir, rt, ids)
    assert cfg.rope_scaling == SCALING
    report = compare_logits(hf_reference_logits(llama3_dir, ids), ours)
    print(report.line())
    assert report.max_abs_logit > 1.0  # the check is not vacuous
    assert report.max_abs_diff < 1e-4 and report.mean_kl < 1e-8, report.line()


@pytest.mark.parametrize("wrong", ["ignored", "megatron_constants"])
def test_wrong_scaling_fails_the_parity_check(llama3_dir, rt, monkeypatch, wrong):
    """The parity test above sees the scaling: plain RoPE, or megatron's GPTModel(rope_scaling=True)
    with its fixed 1 / 4 / 8192, moves the logits far past the verification threshold."""
    import r1mega.models.gpt as gpt_mod

    def megatron_constants(rotary, scaling, theta=None):
        rotary.inv_freq = rotary._apply_scaling(rotary.inv_freq, factor=scaling.factor)

    monkeypatch.setattr(gpt_mod, "apply_rope_scaling",
                        (lambda rotary, scaling, theta=None: None) if wrong == "ignored" else megatron_constants)
    ids = probe_tokens(97, batch=2, seq_len=SEQ_LEN, seed=1)
    _, ours = _converted_logits(llama3_dir, rt, ids)
    report = compare_logits(hf_reference_logits(llama3_dir, ids), ours)
    print(wrong, report.line())
    assert report.max_abs_diff > 10 * DEFAULT_MAX_ABS_TOL, report.line()
