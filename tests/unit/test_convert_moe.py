"""Qwen3-MoE conversion: a small random transformers ``Qwen3MoeForCausalLM`` (the reference)
loaded into our MoE GPTModel computes its logits, the round trip HF -> mcore -> HF is bit-exact,
config.json's MoE keys map both ways and what r1mega does not implement is refused by key."""
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
from r1mega.convert.hf_config import hf_config_from_model_config, model_config_from_hf  # noqa: E402
from r1mega.convert.hf_io import HFCheckpoint  # noqa: E402
from r1mega.convert.testing import load_safetensors_dir, make_tiny_hf_dir  # noqa: E402
from r1mega.convert.verify import (compare_logits, hf_reference_logits, our_logits, probe_tokens,  # noqa: E402
                                   verify_against_hf)

VOCAB = 97  # padded to 128: the padding rows are exercised too
SHAPE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def rt(rt_fp32):
    return rt_fp32


def _hf(tmp_path, name="hf", **kw):
    return make_tiny_hf_dir(str(tmp_path / name), "qwen3_moe", **{**SHAPE, **kw})


def _build(hf_dir, rt, **overrides):
    from r1mega.models.gpt import build_model

    cfg = dataclasses.replace(model_config_from_hf(HFCheckpoint(hf_dir).config), spec="local", **overrides)
    return cfg, build_model(cfg, rt, PrecisionConfig(dtype="fp32"), wrap=False)


def _expert_choices(hf_dir, ids) -> set:
    """Which experts transformers' routers pick over ``ids`` (all layers, all top-k slots)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    k = model.config.num_experts_per_tok
    return {int(e) for logits in out.router_logits for e in logits.topk(k, dim=-1).indices.flatten()}


@pytest.mark.parametrize("moe", [
    dict(norm_topk_prob=True),
    dict(norm_topk_prob=False, mlp_only_layers=[0]),  # layer 0 dense (moe_first_k_dense=1)
])
def test_logits_match_transformers(tmp_path, rt, moe):
    hf_dir = _hf(tmp_path, moe=moe)
    cfg, chunks = _build(hf_dir, rt)
    assert cfg.family == "qwen3_moe" and cfg.num_experts == 8 and cfg.moe_router_topk == 2
    assert cfg.moe_ffn_hidden_size == 32 and cfg.moe_norm_topk_prob == moe["norm_topk_prob"]
    assert cfg.moe_first_k_dense == len(moe.get("mlp_only_layers", []))
    load_hf_into_model(chunks, hf_dir, cfg, rt)
    ids = probe_tokens(VOCAB, batch=2, seq_len=12, seed=1)
    # Non-vacuous routing: the tokens spread over most experts, so a swapped expert shows.
    assert len(_expert_choices(hf_dir, ids)) >= 6
    report = compare_logits(hf_reference_logits(hf_dir, ids), our_logits(chunks, ids, VOCAB, rt))
    assert report.max_abs_logit > 1.0
    assert report.max_abs_diff <= 1e-4 and report.mean_kl < 1e-8, report.line()


def test_swapped_experts_are_caught_by_verification(tmp_path, rt, monkeypatch):
    """Stacking the experts in the wrong order must fail the check, not pass silently."""
    hf_dir = _hf(tmp_path)
    cfg, chunks = _build(hf_dir, rt)
    real = fam.stack_experts_gate_up
    monkeypatch.setattr(fam, "stack_experts_gate_up", lambda parts: real(parts).flip(0))
    load_hf_into_model(chunks, hf_dir, cfg, rt)
    with pytest.raises(ConversionError, match="verify FAIL"):
        verify_against_hf(chunks, hf_dir, cfg, rt)


def test_hf_mcore_hf_round_trip_is_bit_identical(tmp_path, rt):
    hf_dir = _hf(tmp_path, dtype=torch.bfloat16, moe=dict(mlp_only_layers=[0]), num_layers=3)
    cfg, chunks = _build(hf_dir, rt)
    load_hf_into_model(chunks, hf_dir, cfg, rt)
    ckpt = str(tmp_path / "mcore")
    mcore_io.save_model_state(chunks, ckpt, cfg)
    cfg2 = mcore_io.model_config_from_meta(mcore_io.read_meta(ckpt))
    assert cfg2 == cfg
    _, fresh = _build(hf_dir, rt)
    mcore_io.load_model_state(fresh, ckpt)
    out = str(tmp_path / "back")
    original = HFCheckpoint(hf_dir).config
    export_hf(fresh, cfg2, rt, out, dtype=torch.bfloat16, original_config=original)
    a, b = load_safetensors_dir(hf_dir), load_safetensors_dir(out)
    assert set(a) == set(b) and "model.layers.2.mlp.experts.7.down_proj.weight" in a
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.bfloat16
        assert torch.equal(a[name], b[name]), name
    back = json.load(open(os.path.join(out, "config.json")))
    for key in ("num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "mlp_only_layers",
                "decoder_sparse_step", "architectures", "router_aux_loss_coef"):
        assert back[key] == original[key], key
    assert back["num_experts"] == 8
    assert dataclasses.replace(model_config_from_hf(back), spec="local") == cfg
    # transformers reads the exported directory as the same model.
    ids = probe_tokens(VOCAB, batch=1, seq_len=8, seed=2)
    assert torch.equal(hf_reference_logits(hf_dir, ids), hf_reference_logits(out, ids))


def test_init_from_hf_builds_and_loads_the_moe_model(tmp_path, rt):
    from r1mega.config import load_config
    from r1mega.models.gpt import build_model

    hf_dir = _hf(tmp_path, moe=dict(mlp_only_layers=[0]))
    cfg = load_config(None, [f"model.init_from_hf={hf_dir}", "model.spec=local",
                             "model.moe_aux_loss_coeff=0.001"])
    m = cfg.model
    assert (m.family, m.num_layers, m.hidden_size, m.num_experts, m.moe_router_topk) == ("qwen3_moe", 2, 64, 8, 2)
    assert m.moe_first_k_dense == 1 and m.kv_channels == 0 and not m.tied_embeddings  # 0: hidden/heads = 16
    assert m.moe_aux_loss_coeff == 0.001  # a training choice, the user's
    assert cfg.data.tokenizer == hf_dir
    # What the trainer and `r1mega generate` do with it: build, load, and match transformers.
    chunks = build_model(m, rt, PrecisionConfig(dtype="fp32"), wrap=False)
    load_hf_into_model(chunks, m.init_from_hf, m, rt)
    assert verify_against_hf(chunks, hf_dir, m, rt).max_abs_diff <= 1e-4
    # A stated architecture key that disagrees with config.json is named.
    hf16 = _hf(tmp_path, "hf16", moe=dict(num_experts=16))
    with pytest.raises(ConversionError, match="model.num_experts=8 but .*config.json gives 16"):
        load_config(None, [f"model.init_from_hf={hf16}", "model.num_experts=8"])


def _qwen3_moe_config(**kw) -> dict:
    base = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_hidden_layers=4,
                hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=128, vocab_size=100, num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    base.update(kw)
    return base


@pytest.mark.parametrize("kw,needle", [
    (dict(decoder_sparse_step=2), "decoder_sparse_step=2"),
    (dict(mlp_only_layers=[1]), r"mlp_only_layers=\[1\]"),
    (dict(mlp_only_layers=[0, 2]), r"mlp_only_layers=\[0, 2\]"),
    (dict(num_experts=0), "num_experts=0"),
    (dict(mlp_only_layers=[0, 1, 2, 3]), "mlp_only_layers lists all 4 layers"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(use_sliding_window=True), "use_sliding_window"),
])
def test_unimplemented_qwen3_moe_configs_are_refused_naming_the_key(kw, needle):
    with pytest.raises(ConversionError, match=needle):
        model_config_from_hf(_qwen3_moe_config(**kw))


def test_config_keys_both_ways():
    # transformers 5 writes num_local_experts; released checkpoints num_experts.
    hf = _qwen3_moe_config(num_experts=None, num_local_experts=8, mlp_only_layers=[1, 0])
    cfg = model_config_from_hf(hf)
    assert (cfg.num_experts, cfg.moe_first_k_dense, cfg.moe_ffn_hidden_size) == (8, 2, 32)
    out = hf_config_from_model_config(cfg, original=hf)
    assert "num_local_experts" not in out and out["num_experts"] == 8
    assert out["mlp_only_layers"] == [0, 1] and out["decoder_sparse_step"] == 1
    assert model_config_from_hf(out) == cfg
    # A dense family's config never carries MoE keys, and a dense config.json resets them.
    dense = dataclasses.replace(cfg, family="qwen3", num_experts=0, moe_first_k_dense=0, moe_ffn_hidden_size=0)
    assert "num_experts" not in hf_config_from_model_config(dense, original=hf | {"model_type": "qwen3"})
    qwen3 = dict(_qwen3_moe_config(), model_type="qwen3")
    assert model_config_from_hf(qwen3, base=cfg).num_experts == 0
    # Knobs Qwen3-MoE cannot express are refused on export, by key.
    with pytest.raises(ConversionError, match="model.moe_shared_expert_ffn_hidden_size=16"):
        hf_config_from_model_config(dataclasses.replace(cfg, moe_shared_expert_ffn_hidden_size=16))

