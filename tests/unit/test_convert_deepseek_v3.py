"""DeepSeek-V3 conversion: a small random transformers ``DeepseekV3ForCausalLM`` (the reference)
loaded into r1mega's deepseek_v3 model (megatron MLA + MoE) computes its logits, the round trip
HF -> mcore -> HF is bit-identical, FP8 block-scaled weights dequantise to within FP8 error, and
config.json keys r1mega does not implement are refused by key."""
import dataclasses
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from r1mega.config import PrecisionConfig  # noqa: E402
from r1mega.convert import fp8_blocks, mcore_io  # noqa: E402
from r1mega.convert.families import ConversionError  # noqa: E402
from r1mega.convert.hf_bridge import export_hf, load_hf_into_model  # noqa: E402
from r1mega.convert.hf_config import model_config_from_hf  # noqa: E402
from r1mega.convert.hf_io import HFCheckpoint, write_safetensors  # noqa: E402
from r1mega.convert.testing import load_safetensors_dir  # noqa: E402
from r1mega.convert.verify import compare_logits, hf_reference_logits, our_logits, probe_tokens  # noqa: E402
from r1mega.models.deepseek_v3.hf_peer import TINY, make_tiny_deepseek_v3_dir  # noqa: E402

VOCAB = TINY["vocab_size"]


@pytest.fixture(scope="module")
def rt(rt_fp32):
    return rt_fp32


def _build(hf_dir, rt, **overrides):
    from r1mega.models.gpt import build_model

    cfg = dataclasses.replace(model_config_from_hf(HFCheckpoint(hf_dir).config), spec="local", **overrides)
    return cfg, build_model(cfg, rt, PrecisionConfig(dtype="fp32"), wrap=False)


def _logits_report(hf_dir, chunks, rt, seq_len=40):
    # 40 tokens: past YaRN's ramp, so the interpolated frequencies matter too.
    ids = probe_tokens(VOCAB, batch=2, seq_len=seq_len, seed=1)
    return compare_logits(hf_reference_logits(hf_dir, ids), our_logits(chunks, ids, VOCAB, rt))


@pytest.mark.parametrize("shape", [
    {},                                                             # V3 layout, YaRN, MoE
    {"mla": dict(TINY["mla"], q_lora_rank=0), "rope_scaling": {"type": "none"}},  # V2-Lite-style q
    {"num_experts": 0, "moe_router": "softmax", "moe_router_topk": 2, "moe_ffn_hidden_size": 0,
     "moe_shared_expert_ffn_hidden_size": 0, "moe_num_groups": 1, "moe_topk_groups": 1,
     "moe_routed_scaling_factor": 1.0, "moe_first_k_dense": 0},    # all layers dense
])
def test_logits_match_transformers(tmp_path, rt, shape):
    hf_dir = make_tiny_deepseek_v3_dir(str(tmp_path / "hf"), shape)
    cfg, chunks = _build(hf_dir, rt)
    assert cfg.family == "deepseek_v3" and cfg.mla.kv_lora_rank == 32
    load_hf_into_model(chunks, hf_dir, cfg, rt)
    report = _logits_report(hf_dir, chunks, rt)
    assert report.max_abs_logit > 1.0
    assert report.max_abs_diff <= 1e-4 and report.mean_kl < 1e-8, report.line()


def test_router_bias_and_rope_layout_are_not_vacuous(tmp_path, rt):
    """The loaded selection bias changes routing, and rotating the RoPE channels without
    DeepSeek's de-interleave (a plausible converter bug) is caught by the logits."""
    hf_dir = make_tiny_deepseek_v3_dir(str(tmp_path / "hf"))
    cfg, chunks = _build(hf_dir, rt)
    load_hf_into_model(chunks, hf_dir, cfg, rt)
    layer = chunks[0].decoder.layers[1]
    assert layer.mlp.expert_bias.abs().sum() > 0
    layer.mlp.expert_bias.mul_(20)  # large enough to flip top-k choices
    assert _logits_report(hf_dir, chunks, rt).max_abs_diff > 1e-2
    load_hf_into_model(chunks, hf_dir, cfg, rt)
    # Permute the rope rows of kv_a (the shared rope key) to the de-interleaved order.
    w = chunks[0].decoder.layers[0].self_attention.linear_kv_down_proj.weight
    r = cfg.mla.kv_lora_rank
    rope = w.data[r:].clone()
    w.data[r:] = torch.cat([rope[0::2], rope[1::2]])
    assert _logits_report(hf_dir, chunks, rt).max_abs_diff > 1e-2


def test_hf_mcore_hf_round_trip_is_bit_identical(tmp_path, rt):
    hf_dir = make_tiny_deepseek_v3_dir(str(tmp_path / "hf"), dtype=torch.bfloat16)
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
    assert set(a) == set(b) and "model.layers.2.mlp.gate.e_score_correction_bias" in a
    for name in a:
        if name.endswith(("e_score_correction_bias", "mlp.gate.weight")):
            # transformers keeps the router in float32; r1mega does too, but exports one dtype.
            assert torch.equal(a[name].to(torch.bfloat16), b[name]), name
            continue
        assert a[name].dtype == b[name].dtype == torch.bfloat16, name
        assert torch.equal(a[name], b[name]), name
    back = json.load(open(os.path.join(out, "config.json")))
    for key in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                "n_routed_experts", "n_shared_experts", "n_group", "topk_group", "first_k_dense_replace",
                "routed_scaling_factor", "num_experts_per_tok", "moe_intermediate_size", "architectures"):
        assert back[key] == original[key], key
    assert back["rope_parameters"] == original["rope_parameters"]
    assert dataclasses.replace(model_config_from_hf(back), spec="local") == cfg


def test_fp32_round_trip_is_bit_identical_including_the_router(tmp_path, rt):
    hf_dir = make_tiny_deepseek_v3_dir(str(tmp_path / "hf"))
    cfg, chunks = _build(hf_dir, rt)
    load_hf_into_model(chunks, hf_dir, cfg, rt)
    out = str(tmp_path / "back")
    export_hf(chunks, cfg, rt, out, dtype=torch.float32, original_config=HFCheckpoint(hf_dir).config)
    a, b = load_safetensors_dir(hf_dir), load_safetensors_dir(out)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _fp8_copy(src: str, dst: str) -> dict:
    """DeepSeek's release format: the linear weights (not embeddings, head, norms or router) as
    float8_e4m3fn with 128x128 block scales, the rest bfloat16 (the router and its bias float32).
    Returns the original tensors."""
    import shutil

    os.makedirs(dst)
    for f in os.listdir(src):
        if not f.endswith(".safetensors"):
            shutil.copy(os.path.join(src, f), dst)
    full = load_safetensors_dir(src)
    out = []
    for name, t in full.items():
        quantised = (t.dim() == 2 and "proj" in name and "embed" not in name)
        if quantised:
            q, s = fp8_blocks.quantize_blockwise(t)
            out += [(name, q), (fp8_blocks.scale_name(name), s)]
        elif name.endswith(("e_score_correction_bias", "mlp.gate.weight")):
            out.append((name, t))
        else:
            out.append((name, t.to(torch.bfloat16)))
    write_safetensors(iter(out), dst, 5 * 2**30)
    return full


def test_fp8_block_scaled_checkpoint_dequantises_within_fp8_error(tmp_path, rt):
    # 160 columns: edge blocks narrower than 128 are exercised too.
    hf_dir = make_tiny_deepseek_v3_dir(str(tmp_path / "hf"), {"hidden_size": 160})
    full = _fp8_copy(hf_dir, str(tmp_path / "fp8"))
    ckpt = HFCheckpoint(str(tmp_path / "fp8"))
    assert ckpt.dtype() == torch.bfloat16
    n_fp8 = 0
    for name, ref in full.items():
        got = ckpt.get(name)
        assert got.shape == ref.shape
        if ckpt._handles[ckpt.weight_map[name]].get_slice(name).get_dtype().startswith("F8"):
            n_fp8 += 1
            scale = fp8_blocks._expand(ckpt._handles[ckpt.weight_map[name]].get_tensor(
                fp8_blocks.scale_name(name)), *ref.shape, fp8_blocks.BLOCK)
            # e4m3: 3 mantissa bits -> half an ulp is 2^-4 relative; subnormals 2^-10 of the scale.
            bound = ref.abs() * 2 ** -4 + scale * 2 ** -9
            assert ((got - ref).abs() <= bound * 1.0001).all(), name
            assert not torch.equal(got, ref)
        else:
            assert torch.equal(got, ref.to(got.dtype)), name
    assert n_fp8 > 10
    cfg, chunks = _build(str(tmp_path / "fp8"), rt)
    load_hf_into_model(chunks, str(tmp_path / "fp8"), cfg, rt)
    # The model holds the dequantised weights (the random tiny model is too chaotic for a logits
    # bound: 6% weight rounding flips its expert choices).
    attn = chunks[0].decoder.layers[2].self_attention
    assert torch.equal(attn.linear_kv_up_proj.weight, ckpt.get("model.layers.2.self_attn.kv_b_proj.weight"))
    experts = chunks[0].decoder.layers[2].mlp.experts
    assert torch.equal(experts.down[5], ckpt.get("model.layers.2.mlp.experts.5.down_proj.weight"))


def test_fp8_without_scales_is_refused_by_name(tmp_path):
    hf_dir = make_tiny_deepseek_v3_dir(str(tmp_path / "hf"))
    full = load_safetensors_dir(hf_dir)
    name = "model.layers.0.self_attn.o_proj.weight"
    full[name] = full[name].to(torch.float8_e4m3fn)
    os.remove(os.path.join(hf_dir, "model.safetensors"))
    write_safetensors(iter(full.items()), hf_dir, 5 * 2**30)
    with pytest.raises(ConversionError, match="o_proj.weight.*without.*weight_scale_inv"):
        HFCheckpoint(hf_dir).get(name)


def test_mtp_layer_of_released_checkpoints_is_skipped(tmp_path, rt):
    """Released V3 checkpoints append the MTP module as layer L; the causal LM ignores it."""
    hf_dir = make_tiny_deepseek_v3_dir(str(tmp_path / "hf"))
    full = load_safetensors_dir(hf_dir)
    full["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    full["model.layers.3.self_attn.kv_b_proj.weight"] = torch.zeros(112, 32)
    os.remove(os.path.join(hf_dir, "model.safetensors"))
    write_safetensors(iter(full.items()), hf_dir, 5 * 2**30)
    cfg, chunks = _build(hf_dir, rt)
    load_hf_into_model(chunks, hf_dir, cfg, rt)
    assert _logits_report(hf_dir, chunks, rt, seq_len=8).max_abs_diff <= 1e-4


def _v3_config(**kw) -> dict:
    from r1mega.models.deepseek_v3.hf_peer import hf_config_dict

    return {**hf_config_dict(TINY), **kw}


@pytest.mark.parametrize("kw,needle", [
    (dict(rope_interleave=False), "rope_interleave=false"),
    (dict(topk_method="greedy"), "topk_method='greedy'"),
    (dict(scoring_func="softmax"), "scoring_func='softmax'"),
    (dict(num_key_value_heads=2), "num_key_value_heads=2"),
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(moe_layer_freq=2), "moe_layer_freq=2"),
    (dict(kv_lora_rank=None), "without 'kv_lora_rank'"),
])
def test_unimplemented_deepseek_configs_are_refused_naming_the_key(kw, needle):
    with pytest.raises(ConversionError, match=needle):
        model_config_from_hf(_v3_config(**kw))


def test_config_json_of_the_full_v3_layout():
    """DeepSeek-V3's released config.json (its rope_scaling spelt the 4.x way) reads as the
    671B layout and validates."""
    from r1mega.config import Config, validate

    hf = dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], hidden_size=7168,
              intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
              num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
              n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
              qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc",
              n_group=8, topk_group=4, num_experts_per_tok=8, moe_layer_freq=1,
              first_k_dense_replace=3, norm_topk_prob=True, scoring_func="sigmoid",
              max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000, vocab_size=129280,
              tie_word_embeddings=False, num_nextn_predict_layers=1,
              rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                            "type": "yarn"})
    m = model_config_from_hf(hf)
    assert (m.num_experts, m.moe_first_k_dense, m.moe_shared_expert_ffn_hidden_size) == (256, 3, 2048)
    assert (m.mla.q_lora_rank, m.mla.kv_lora_rank, m.rope_scaling.factor) == (1536, 512, 40.0)
    cfg = Config()
    cfg.model = dataclasses.replace(m, spec="local")
    cfg.parallel.expert = 8
    validate(cfg, world_size=8)


def test_mtp_module_converts_both_ways(tmp_path, rt):
    """r1mega's MTP module <-> the released layout (model.layers.{L}: a decoder layer, enorm,
    hnorm, eh_proj, shared_head.norm and copies of embedding and head): export, re-import into a
    fresh model bit-identically, and transformers still reads the causal LM."""
    from r1mega.config import ModelConfig
    from r1mega.models.gpt import build_model

    cfg = dataclasses.replace(ModelConfig(**TINY), spec="local", mtp_num_layers=1)
    torch.manual_seed(0)
    a = build_model(cfg, rt, PrecisionConfig(dtype="fp32"), wrap=False)
    out = str(tmp_path / "hf")
    export_hf(a, cfg, rt, out, dtype=torch.float32)
    names = set(load_safetensors_dir(out))
    for n in ("model.layers.3.eh_proj.weight", "model.layers.3.enorm.weight", "model.layers.3.hnorm.weight",
              "model.layers.3.shared_head.norm.weight", "model.layers.3.shared_head.head.weight",
              "model.layers.3.embed_tokens.weight", "model.layers.3.self_attn.kv_b_proj.weight",
              "model.layers.3.mlp.experts.7.down_proj.weight", "model.layers.3.mlp.gate.e_score_correction_bias"):
        assert n in names, n
    assert json.load(open(os.path.join(out, "config.json")))["num_nextn_predict_layers"] == 1
    torch.manual_seed(1)
    b = build_model(cfg, rt, PrecisionConfig(dtype="fp32"), wrap=False)
    load_hf_into_model(b, out, cfg, rt)
    sa, sb = a[0].state_dict(), b[0].state_dict()
    assert any(k.startswith("mtp_heads.layers.0.layer.") for k in sa)
    for k, v in sa.items():
        if k in ("embedding.word_embeddings.weight", "output_layer.weight"):
            v, sb[k] = v[:VOCAB], sb[k][:VOCAB]  # random padding rows are not exported
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state"):
            assert torch.equal(v, sb[k]), k
    assert _logits_report(out, b, rt, seq_len=8).max_abs_diff <= 1e-4  # transformers skips layer 3
    # Without MTP modules the same checkpoint loads as the plain causal LM.
    plain = dataclasses.replace(cfg, mtp_num_layers=0)
    load_hf_into_model(build_model(plain, rt, PrecisionConfig(dtype="fp32"), wrap=False), out, plain, rt)
    # An MTP embedding that is not the model's own is refused by name.
    full = load_safetensors_dir(out)
    full["model.layers.3.embed_tokens.weight"] = full["model.layers.3.embed_tokens.weight"] + 1
    bad = str(tmp_path / "bad")
    os.makedirs(bad)
    write_safetensors(iter(full.items()), bad, 5 * 2**30)
    import shutil

    shutil.copy(os.path.join(out, "config.json"), bad)
    with pytest.raises(ConversionError, match="model.layers.3.embed_tokens.weight' differs"):
        load_hf_into_model(b, bad, cfg, rt)


def test_init_from_hf_builds_and_loads_deepseek_v3(tmp_path, rt):
    from r1mega.config import load_config
    from r1mega.convert.verify import verify_against_hf
    from r1mega.models.gpt import build_model

    hf_dir = make_tiny_deepseek_v3_dir(str(tmp_path / "hf"))
    cfg = load_config(None, [f"model.init_from_hf={hf_dir}", "model.spec=local"])
    m = cfg.model
    assert (m.family, m.mla.q_lora_rank, m.rope_scaling.type, m.num_experts) == ("deepseek_v3", 24, "yarn", 8)
    assert m.mtp_num_layers == 0  # a training choice: transformers' checkpoint holds no MTP weights
    chunks = build_model(m, rt, PrecisionConfig(dtype="fp32"), wrap=False)
    load_hf_into_model(chunks, m.init_from_hf, m, rt)
    assert verify_against_hf(chunks, hf_dir, m, rt).max_abs_diff <= 1e-4
    with pytest.raises(ConversionError, match=r"model.mla=.* but .*config.json gives"):
        load_config(None, [f"model.init_from_hf={hf_dir}", "model.mla.kv_lora_rank=16"])
