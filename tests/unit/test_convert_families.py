"""Mapping tables and layout transforms, checked against hand-built references (no model needed)."""
import dataclasses

import pytest
import torch

from r1mega.config import ModelConfig, RopeScalingConfig
from r1mega.convert import families as fam
from r1mega.convert.families import ConversionError
from r1mega.convert.hf_bridge import check_layout
from r1mega.convert.hf_config import (check_model_matches_hf, hf_config_from_model_config,
                                      model_config_from_hf)


def _reference_interleave(q, k, v, nh, ng, d):
    """Row-by-row construction of megatron's per-group [q.., k, v] layout."""
    rows = []
    hpg = nh // ng
    for g in range(ng):
        for h in range(g * hpg, (g + 1) * hpg):
            rows.extend(q[h * d + i] for i in range(d))
        rows.extend(k[g * d + i] for i in range(d))
        rows.extend(v[g * d + i] for i in range(d))
    return torch.stack(rows)


@pytest.mark.parametrize("nh,ng,d", [(4, 2, 3), (6, 3, 2), (4, 4, 2), (8, 1, 2)])
def test_qkv_interleave_matches_reference_and_inverts(nh, ng, d):
    hidden = 5
    q, k, v = torch.randn(nh * d, hidden), torch.randn(ng * d, hidden), torch.randn(ng * d, hidden)
    qkv = fam.interleave_qkv(q, k, v, ng)
    assert torch.equal(qkv, _reference_interleave(q, k, v, nh, ng, d))
    q2, k2, v2 = fam.split_qkv(qkv, nh, ng, d)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)
    # biases (1-D) follow the same layout
    bq, bk, bv = torch.randn(nh * d), torch.randn(ng * d), torch.randn(ng * d)
    b = fam.interleave_qkv(bq, bk, bv, ng)
    assert torch.equal(b, _reference_interleave(bq[:, None], bk[:, None], bv[:, None], nh, ng, d)[:, 0])


def test_gate_up_and_vocab_padding():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fc1 = fam.concat_gate_up(gate, up)
    assert torch.equal(fc1[:6], gate) and torch.equal(fc1[6:], up)
    g2, u2 = fam.split_gate_up(fc1)
    assert torch.equal(g2, gate) and torch.equal(u2, up)
    w = torch.randn(97, 4)
    p = fam.pad_vocab(w, 128)
    assert p.shape == (128, 4) and torch.equal(p[:97], w) and not p[97:].any()
    assert torch.equal(fam.unpad_vocab(p, 97), w)
    with pytest.raises(ConversionError):
        fam.pad_vocab(w, 64)


def _cfg(**kw):
    return dataclasses.replace(ModelConfig(), **kw)


def test_tables_cover_each_family_and_te_names():
    llama = {e.mcore for e in fam.expand_table(_cfg(num_layers=2, tied_embeddings=False))}
    assert "output_layer.weight" in llama and "decoder.layers.1.mlp.linear_fc1.weight" in llama
    tied = {e.mcore for e in fam.expand_table(_cfg(num_layers=2, tied_embeddings=True))}
    assert "output_layer.weight" not in tied
    qwen2 = {e.mcore for e in fam.expand_table(_cfg(family="qwen2", qkv_bias=True))}
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in qwen2
    qwen3 = {e.mcore for e in fam.expand_table(_cfg(family="qwen3", qk_norm=True))}
    assert {"decoder.layers.0.self_attention.q_layernorm.weight",
            "decoder.layers.0.self_attention.k_layernorm.weight"} <= qwen3
    te = {e.mcore for e in fam.expand_table(_cfg(num_layers=1), te_names=True)}
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in te
    assert not any(n.endswith("input_layernorm.weight") for n in te)
    with pytest.raises(ConversionError, match="qkv_bias"):
        fam.expand_table(_cfg(family="llama", qkv_bias=True))


def test_check_hf_names_names_missing_and_unknown_tensors():
    cfg = _cfg(num_layers=1, tied_embeddings=True)
    names = [n for e in fam.expand_table(cfg) for n in e.hf]
    fam.check_hf_names(names + ["model.layers.0.self_attn.rotary_emb.inv_freq"], cfg)
    with pytest.raises(ConversionError, match="model.layers.0.mlp.up_proj.weight"):
        fam.check_hf_names([n for n in names if "up_proj" not in n], cfg)
    with pytest.raises(ConversionError, match="model.layers.0.self_attn.o_proj.bias"):
        fam.check_hf_names(names + ["model.layers.0.self_attn.o_proj.bias"], cfg)


def _hf(model_type, **kw):
    base = dict(model_type=model_type, architectures=["X"], num_hidden_layers=3, hidden_size=64,
                num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, vocab_size=101,
                rms_norm_eps=1e-6, max_position_embeddings=1024, tie_word_embeddings=True,
                hidden_act="silu")
    base.update(kw)
    return base


def test_hf_config_translation_both_formats_and_round_trip():
    cfg = model_config_from_hf(_hf("llama", rope_theta=50000.0))
    assert (cfg.family, cfg.num_layers, cfg.num_query_groups, cfg.ffn_hidden_size, cfg.vocab_size) == \
        ("llama", 3, 2, 96, 101)
    assert cfg.rope_theta == 50000.0 and cfg.tied_embeddings and not cfg.qkv_bias
    v5 = model_config_from_hf(_hf("qwen2", rope_parameters={"rope_theta": 1e6, "rope_type": "default"}))
    assert v5.family == "qwen2" and v5.qkv_bias and v5.rope_theta == 1e6
    q3 = model_config_from_hf(_hf("qwen3", head_dim=16))
    assert q3.qk_norm and not q3.qkv_bias
    back = model_config_from_hf(hf_config_from_model_config(q3))
    assert back == q3
    wide = model_config_from_hf(_hf("qwen3", head_dim=128))  # decoupled from hidden/heads
    assert wide.kv_channels == 128
    assert hf_config_from_model_config(wide)["head_dim"] == 128
    assert model_config_from_hf(hf_config_from_model_config(wide)) == wide


LLAMA31_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}


def test_llama3_rope_scaling_both_layouts_and_round_trip():
    want = RopeScalingConfig(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192)
    # transformers 4.x (Llama 3.1's own config.json): flat rope_theta + rope_scaling
    v4_hf = _hf("llama", rope_theta=500000.0, rope_scaling=dict(LLAMA31_ROPE))
    v4 = model_config_from_hf(v4_hf)
    assert v4.rope_theta == 500000.0 and v4.rope_scaling == want
    back = hf_config_from_model_config(v4, original=v4_hf)
    assert back["rope_scaling"] == LLAMA31_ROPE and "rope_parameters" not in back  # layout kept
    assert model_config_from_hf(back) == v4
    # transformers 5.x: everything in rope_parameters
    v5_hf = _hf("llama", rope_parameters={**LLAMA31_ROPE, "rope_theta": 500000.0})
    assert model_config_from_hf(v5_hf) == v4
    back = hf_config_from_model_config(v4, original=v5_hf)
    assert back["rope_parameters"] == v5_hf["rope_parameters"] and "rope_scaling" not in back
    fresh = hf_config_from_model_config(v4)  # no original: both keys, so 4.x readers scale too
    assert fresh["rope_scaling"] == LLAMA31_ROPE and model_config_from_hf(fresh) == v4
    # "type" is the older spelling of rope_type
    old_name = {k: v for k, v in LLAMA31_ROPE.items() if k != "rope_type"}
    old_hf = _hf("llama", rope_scaling={**old_name, "type": "llama3"})
    assert model_config_from_hf(old_hf).rope_scaling == want
    # transformers' fallbacks for original_max_position_embeddings
    no_len = {k: v for k, v in LLAMA31_ROPE.items() if k != "original_max_position_embeddings"}
    assert model_config_from_hf(_hf("llama", rope_scaling=no_len)).rope_scaling == \
        dataclasses.replace(want, original_max_position_embeddings=1024)
    top = _hf("llama", rope_scaling=dict(LLAMA31_ROPE), original_max_position_embeddings=4096)
    assert model_config_from_hf(top).rope_scaling.original_max_position_embeddings == 4096
    # a plain model written back carries no scaling anywhere
    plain = hf_config_from_model_config(model_config_from_hf(_hf("llama")), original=v4_hf)
    assert "rope_scaling" not in plain


def test_checkpoint_rope_scaling_mismatch_is_named():
    hf = _hf("llama", rope_scaling=dict(LLAMA31_ROPE))
    cfg = model_config_from_hf(hf)
    check_model_matches_hf(cfg, hf)
    # "none" ignores the other fields: a plain model matches a plain checkpoint whatever they hold
    plain = model_config_from_hf(_hf("llama"))
    check_model_matches_hf(dataclasses.replace(plain, rope_scaling=RopeScalingConfig(factor=2.0)),
                           _hf("llama"))
    with pytest.raises(ConversionError, match="model.rope_scaling=.*type='none'.*gives.*'llama3'"):
        check_model_matches_hf(dataclasses.replace(cfg, rope_scaling=RopeScalingConfig()), hf)
    wrong = dataclasses.replace(cfg.rope_scaling, original_max_position_embeddings=4096)
    with pytest.raises(ConversionError, match="original_max_position_embeddings=4096"):
        check_model_matches_hf(dataclasses.replace(cfg, rope_scaling=wrong), hf)


def test_hf_config_translation_against_transformers_classes():
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=96, num_hidden_layers=2, vocab_size=100,
                                  rope_theta=12345.0).to_dict()
    cfg = model_config_from_hf(hf)
    assert cfg.rope_theta == 12345.0 and cfg.num_query_groups == 2
    # and transformers reads our written config back to the same numbers
    out = transformers.Qwen2Config(**hf_config_from_model_config(cfg))
    assert out.num_key_value_heads == 2 and out.intermediate_size == 96


@pytest.mark.parametrize("hf,match", [
    (_hf("gpt2"), "unsupported architecture model_type='gpt2'"),
    (_hf("llama", rope_scaling={"rope_type": "yarn", "factor": 8.0}), "rope type 'yarn'"),
    (_hf("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     r"rope type 'llama3' without \['low_freq_factor', 'high_freq_factor'\]"),
    (_hf("llama", rope_scaling={**LLAMA31_ROPE, "high_freq_factor": 1.0}),
     "config.json rope_scaling.high_freq_factor=1.0 must be greater than"),
    (_hf("llama", attention_bias=True), "attention_bias"),
    (_hf("llama", hidden_act="gelu"), "hidden_act"),
    (_hf("qwen2", use_sliding_window=True), "use_sliding_window"),
])
def test_unsupported_configs_are_refused_by_key(hf, match):
    with pytest.raises(ConversionError, match=match):
        model_config_from_hf(hf)


def test_fewer_kv_groups_than_tp_ranks_is_refused_clearly():
    check_layout(_cfg(num_query_groups=2), 2)
    with pytest.raises(ConversionError, match="1 KV groups.*tensor parallel size 2"):
        check_layout(_cfg(num_attention_heads=4, num_query_groups=1), 2)


def test_te_spec_names_round_trip_through_the_table(tmp_path):
    """With the TE spec the norms live in the next linear; the same HF tensors map there and back."""
    from r1mega.convert.hf_bridge import hf_tensors_from_full
    from r1mega.convert.testing import load_safetensors_dir, make_tiny_hf_dir

    pytest.importorskip("transformers")
    hf = load_safetensors_dir(make_tiny_hf_dir(str(tmp_path / "hf"), "qwen3", tied=False))
    cfg = _cfg(family="qwen3", qk_norm=True, num_layers=2, hidden_size=48, num_attention_heads=4,
               num_query_groups=2, ffn_hidden_size=80, vocab_size=97, tied_embeddings=False)
    full = {e.mcore: fam.hf_to_mcore_tensor(e, hf.__getitem__, cfg, 128)
            for e in fam.expand_table(cfg, te_names=True)}
    assert torch.equal(full["decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"],
                       hf["model.layers.1.input_layernorm.weight"])
    assert torch.equal(full["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"],
                       hf["model.layers.0.post_attention_layernorm.weight"])
    back = dict(hf_tensors_from_full(full, cfg, torch.float32))
    assert set(back) == set(hf) and all(torch.equal(back[n], hf[n]) for n in hf)
