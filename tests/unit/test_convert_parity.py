"""Our megatron model loaded from HF weights computes transformers' logits (the reference), and
the dist-checkpoint round trip is bit-exact. One process, TP=PP=1 (TP=2/PP=2: tests/distributed)."""
import dataclasses
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from r1mega.config import PrecisionConfig  # noqa: E402
from r1mega.convert import families as fam  # noqa: E402
from r1mega.convert import mcore_io  # noqa: E402
from r1mega.convert.families import ConversionError  # noqa: E402
from r1mega.convert.hf_bridge import export_hf, load_hf_into_model  # noqa: E402
from r1mega.convert.hf_config import model_config_from_hf  # noqa: E402
from r1mega.convert.hf_io import HFCheckpoint  # noqa: E402
from r1mega.convert.testing import load_safetensors_dir, make_tiny_hf_dir  # noqa: E402
from r1mega.convert.verify import (compare_logits, hf_reference_logits, our_logits, probe_tokens,  # noqa: E402
                                   verify_against_hf)


@pytest.fixture(scope="module")
def rt(rt_fp32):
    return rt_fp32


def _build(hf_dir, rt, **overrides):
    from r1mega.models.gpt import build_model

    cfg = model_config_from_hf(HFCheckpoint(hf_dir).config)
    cfg = dataclasses.replace(cfg, spec="local", **overrides)
    chunks = build_model(cfg, rt, PrecisionConfig(dtype="fp32"), wrap=False)
    return cfg, chunks


CASES = [
    # family, tied, heads, kv groups, hidden, vocab (97 and 131 need padding to 128 / 192)
    ("llama", False, 4, 2, 48, 97),
    ("llama", True, 6, 3, 48, 131),
    ("qwen2", False, 4, 2, 32, 97),
    ("qwen2", True, 4, 1, 32, 131),
    ("qwen3", False, 4, 2, 32, 97),
    ("qwen3", True, 6, 2, 48, 131),
]


@pytest.mark.parametrize("family,tied,heads,kv,hidden,vocab", CASES)
def test_logits_match_transformers(tmp_path, rt, family, tied, heads, kv, hidden, vocab):
    hf_dir = make_tiny_hf_dir(str(tmp_path / "hf"), family, tied=tied, num_attention_heads=heads,
                              num_key_value_heads=kv, hidden_size=hidden, vocab_size=vocab)
    cfg, chunks = _build(hf_dir, rt)
    load_hf_into_model(chunks, hf_dir, cfg, rt)
    emb = chunks[0].embedding.word_embeddings.weight
    assert emb.shape[0] > vocab and not emb[vocab:].any()  # padded with zero rows
    ids = probe_tokens(vocab, batch=2, seq_len=12, seed=1)
    ref = hf_reference_logits(hf_dir, ids)
    ours = our_logits(chunks, ids, vocab, rt)
    report = compare_logits(ref, ours)
    assert report.max_abs_logit > 1.0  # the check is not vacuous
    assert report.max_abs_diff < 1e-4 and report.mean_kl < 1e-8, report.line()


def test_qwen3_with_decoupled_head_dim_matches_transformers(tmp_path, rt):
    # Real Qwen3 checkpoints (e.g. 0.6B: hidden 1024, 16 heads of 128) decouple head_dim from
    # hidden/heads; here hidden 32, 4 heads of 16 (not 8).
    hf_dir = make_tiny_hf_dir(str(tmp_path / "hf"), "qwen3", hidden_size=32, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, vocab_size=97)
    cfg, chunks = _build(hf_dir, rt)
    assert cfg.kv_channels == 16
    load_hf_into_model(chunks, hf_dir, cfg, rt)
    ids = probe_tokens(97, batch=2, seq_len=12, seed=1)
    report = compare_logits(hf_reference_logits(hf_dir, ids), our_logits(chunks, ids, 97, rt))
    assert report.max_abs_logit > 1.0
    assert report.max_abs_diff < 1e-4 and report.mean_kl < 1e-8, report.line()


def test_wrong_qkv_order_is_caught_by_verification(tmp_path, rt, monkeypatch):
    """The classic converter bug ([all q, all k, all v] instead of per-group) must fail loudly."""
    hf_dir = make_tiny_hf_dir(str(tmp_path / "hf"), "llama", num_attention_heads=4, num_key_value_heads=2)
    cfg, chunks = _build(hf_dir, rt)

    def naive(q, k, v, num_query_groups):
        return torch.cat([q, k, v], dim=0)

    monkeypatch.setattr(fam, "interleave_qkv", naive)
    load_hf_into_model(chunks, hf_dir, cfg, rt)
    with pytest.raises(ConversionError, match="verify FAIL"):
        verify_against_hf(chunks, hf_dir, cfg, rt)


def test_mcore_round_trip_is_bit_identical_bf16(tmp_path, rt):
    hf_dir = make_tiny_hf_dir(str(tmp_path / "hf"), "qwen2", dtype=torch.bfloat16, tied=False,
                              max_shard_size="40KB")
    cfg, chunks = _build(hf_dir, rt)
    load_hf_into_model(chunks, hf_dir, cfg, rt)
    ckpt = str(tmp_path / "mcore")
    mcore_io.save_model_state(chunks, ckpt, cfg)
    assert sorted(os.listdir(tmp_path)) == ["hf", "mcore"]  # no partial dir left behind
    meta = json.loads(open(os.path.join(ckpt, "meta.json")).read())
    assert meta["format_version"] == 1 and meta["model_config"]["family"] == "qwen2"
    assert meta["padded_vocab_size"] == 128

    cfg2 = mcore_io.model_config_from_meta(mcore_io.read_meta(ckpt))
    assert cfg2 == cfg
    _, fresh = _build(hf_dir, rt)
    mcore_io.load_model_state(fresh, ckpt)
    out = str(tmp_path / "back")
    export_hf(fresh, cfg2, rt, out, dtype=torch.bfloat16, original_config=HFCheckpoint(hf_dir).config,
              max_shard_bytes=30_000)
    a, b = load_safetensors_dir(hf_dir), load_safetensors_dir(out)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.bfloat16
        assert torch.equal(a[name], b[name]), name
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))


def test_checkpoint_loads_onto_another_vocab_padding(tmp_path, rt):
    """TP changes the padded vocab size; the stored embedding is re-padded, logits unchanged."""
    hf_dir = make_tiny_hf_dir(str(tmp_path / "hf"), "llama", vocab_size=97)
    cfg, chunks = _build(hf_dir, rt)
    load_hf_into_model(chunks, hf_dir, cfg, rt)
    ckpt = str(tmp_path / "mcore")
    mcore_io.save_model_state(chunks, ckpt, cfg)
    for divisible_by in (256, 1):  # pad to 256 (more), and to 97 (less than stored 128)
        cfg2, other = _build(hf_dir, rt, make_vocab_size_divisible_by=divisible_by)
        mcore_io.load_model_state(other, ckpt)
        assert other[0].output_layer.weight.shape[0] == (256 if divisible_by == 256 else 97)
        report = verify_against_hf(other, hf_dir, cfg2, rt)
        assert report.max_abs_diff < 1e-4


def test_loading_into_the_wrong_model_names_the_tensor(tmp_path, rt):
    hf_dir = make_tiny_hf_dir(str(tmp_path / "hf"), "qwen2")
    cfg, chunks = _build(hf_dir, rt)
    load_hf_into_model(chunks, hf_dir, cfg, rt)
    ckpt = str(tmp_path / "mcore")
    mcore_io.save_model_state(chunks, ckpt, cfg)
    _, llama = _build(hf_dir, rt, family="llama", qkv_bias=False)
    with pytest.raises(Exception, match="linear_qkv.bias"):
        mcore_io.load_model_state(llama, ckpt)
    _, deeper = _build(hf_dir, rt, hidden_size=64)
    with pytest.raises(ConversionError, match="'embedding.word_embeddings.weight' has global shape"):
        mcore_io.load_model_state(deeper, ckpt)
    with pytest.raises(ConversionError, match="meta.json does not exist"):
        mcore_io.load_model_state(chunks, str(tmp_path / "hf"))


def test_model_config_that_disagrees_with_hf_is_named(tmp_path, rt):
    from r1mega.convert.hf_config import model_config_from_hf_dir

    hf_dir = make_tiny_hf_dir(str(tmp_path / "hf"), "llama")
    cfg, chunks = _build(hf_dir, rt)
    assert dataclasses.replace(model_config_from_hf_dir(hf_dir), spec="local") == cfg
    bad = dataclasses.replace(cfg, ffn_hidden_size=cfg.ffn_hidden_size + 16, rope_theta=5.0)
    with pytest.raises(ConversionError, match="model.ffn_hidden_size=96 but .*config.json gives 80; "
                                              "model.rope_theta=5.0"):
        load_hf_into_model(chunks, hf_dir, bad, rt)


def test_tied_config_with_a_different_head_is_refused(tmp_path, rt):
    from safetensors.torch import save_file

    hf_dir = make_tiny_hf_dir(str(tmp_path / "hf"), "llama", tied=True)
    tensors = load_safetensors_dir(hf_dir)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
    cfg, chunks = _build(hf_dir, rt)
    load_hf_into_model(chunks, hf_dir, cfg, rt)  # an identical copy of the embedding is fine
    tensors["lm_head.weight"][0, 0] += 1.0
    save_file(tensors, os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="'lm_head.weight' differs"):
        load_hf_into_model(chunks, hf_dir, cfg, rt)


def test_checkpoint_with_te_spec_names_loads_into_local_spec(tmp_path, rt):
    """A checkpoint whose norms carry Transformer Engine's fused names (written here by renaming
    the keys, TE itself is not installed) loads into the local spec model: same tensors."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from r1mega.convert.mcore_io import _walk, model_sharded_state_dict

    hf_dir = make_tiny_hf_dir(str(tmp_path / "hf"), "qwen3")
    cfg, chunks = _build(hf_dir, rt)
    load_hf_into_model(chunks, hf_dir, cfg, rt)
    ckpt = str(tmp_path / "mcore")
    mcore_io.save_model_state(chunks, ckpt, cfg)
    sharded = model_sharded_state_dict(chunks)
    renamed = set()
    for _, st in _walk(sharded):
        if isinstance(st, ShardedTensor) and st.key.endswith(("input_layernorm.weight", "pre_mlp_layernorm.weight")):
            st.key = mcore_io._spec_alias(st.key)
            renamed.add(st.key)
    assert len(renamed) == 2  # one key per norm, each layer a slice along the layer axis
    te_model_dir = os.path.join(ckpt + "_te", "model")
    os.makedirs(te_model_dir)
    dist_checkpointing.save(sharded, te_model_dir)
    os.replace(os.path.join(ckpt, "meta.json"), os.path.join(ckpt + "_te", "meta.json"))
    stored = dist_checkpointing.load_tensors_metadata(te_model_dir)
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in stored
    assert "decoder.layers.input_layernorm.weight" not in stored

    _, fresh = _build(hf_dir, rt)
    mcore_io.load_model_state(fresh, ckpt + "_te")
    for (name, a), (_, b) in zip(chunks[0].named_parameters(), fresh[0].named_parameters()):
        assert torch.equal(a, b), name

