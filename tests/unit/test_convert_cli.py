"""`r1mega convert` end to end in one process: round trip, verification on by default, errors
that leave nothing at the output path."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from r1mega.convert import families as fam  # noqa: E402
from r1mega.convert.cli import main  # noqa: E402
from r1mega.convert.testing import free_port, load_safetensors_dir, make_tiny_hf_dir  # noqa: E402


@pytest.fixture(autouse=True)
def _own_port(monkeypatch):
    # The CLI starts its own one-rank world; never collide with another test's default port.
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def test_round_trip_through_cli_is_bit_identical(tmp_path, capsys):
    hf = make_tiny_hf_dir(str(tmp_path / "hf"), "qwen3", tied=True, dtype=torch.bfloat16,
                          max_shard_size="30KB", vocab_size=131)
    mcore, back = str(tmp_path / "mcore"), str(tmp_path / "back")
    assert main(["hf-to-mcore", "--hf", hf, "--out", mcore]) == 0
    out = capsys.readouterr().out
    assert "verify PASS" in out and "max|Δlogits|=" in out and "mean KL=" in out
    assert sorted(os.listdir(mcore)) == ["hf_assets", "meta.json", "model"]
    meta = json.load(open(os.path.join(mcore, "meta.json")))
    assert meta["hf_dtype"] == "bfloat16" and meta["verify"]["passed"]

    assert main(["mcore-to-hf", "--ckpt", mcore, "--out", back]) == 0
    assert "verify PASS" in capsys.readouterr().out
    a, b = load_safetensors_dir(hf), load_safetensors_dir(back)
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) and b[n].dtype == torch.bfloat16 for n in a)
    for name in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert open(os.path.join(hf, name)).read() == open(os.path.join(back, name)).read()
    src_cfg, out_cfg = (json.load(open(os.path.join(d, "config.json"))) for d in (hf, back))
    for key in ("model_type", "architectures", "num_key_value_heads", "head_dim", "vocab_size",
                "tie_word_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id"):
        assert src_cfg[key] == out_cfg[key], key
    assert sorted(os.listdir(tmp_path)) == ["back", "hf", "mcore"]


def test_qwen3_moe_round_trip_through_cli_verifies_by_default(tmp_path, capsys):
    hf = make_tiny_hf_dir(str(tmp_path / "hf"), "qwen3_moe", hidden_size=64, num_attention_heads=4,
                          dtype=torch.bfloat16, moe=dict(mlp_only_layers=[0]))
    mcore, back = str(tmp_path / "mcore"), str(tmp_path / "back")
    assert main(["hf-to-mcore", "--hf", hf, "--out", mcore]) == 0
    assert "verify PASS" in capsys.readouterr().out
    assert main(["mcore-to-hf", "--ckpt", mcore, "--out", back]) == 0
    assert "verify PASS" in capsys.readouterr().out
    a, b = load_safetensors_dir(hf), load_safetensors_dir(back)
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in a
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_llama3_rope_scaling_survives_hf_to_mcore_to_hf(tmp_path, capsys):
    import transformers

    rope = {"rope_type": "llama3", "factor": 5.0, "low_freq_factor": 1.5, "high_freq_factor": 6.0,
            "original_max_position_embeddings": 32}
    hf = make_tiny_hf_dir(str(tmp_path / "hf"), "llama", rope_scaling=rope)
    mcore, back = str(tmp_path / "mcore"), str(tmp_path / "back")
    # 64 probe tokens: past the original length, where the low frequencies are scaled.
    assert main(["hf-to-mcore", "--hf", hf, "--out", mcore, "--verify-tokens", "64"]) == 0
    assert "verify PASS" in capsys.readouterr().out
    meta = json.load(open(os.path.join(mcore, "meta.json")))
    want = {"type": "llama3", **{k: v for k, v in rope.items() if k != "rope_type"}}
    saved = meta["model_config"]["rope_scaling"]  # also holds the yarn-only fields, at defaults
    assert {k: saved[k] for k in want} == want
    assert main(["mcore-to-hf", "--ckpt", mcore, "--out", back, "--verify-tokens", "64"]) == 0
    assert "verify PASS" in capsys.readouterr().out
    src_cfg, out_cfg = (json.load(open(os.path.join(d, "config.json"))) for d in (hf, back))
    assert out_cfg["rope_parameters"] == src_cfg["rope_parameters"] == {**rope, "rope_theta": 10000.0}
    assert "rope_scaling" not in out_cfg  # the source was a transformers 5 file: its layout is kept
    assert transformers.AutoConfig.from_pretrained(back).rope_parameters == src_cfg["rope_parameters"]


def test_conversion_bug_fails_verification_and_writes_nothing(tmp_path, monkeypatch, capsys):
    hf = make_tiny_hf_dir(str(tmp_path / "hf"), "llama")
    # gate and up swapped: a silent bug without verification
    monkeypatch.setattr(fam, "concat_gate_up", lambda gate, up: torch.cat([up, gate], dim=0))
    out = str(tmp_path / "mcore")
    assert main(["hf-to-mcore", "--hf", hf, "--out", out]) == 2
    assert "verify FAIL" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    # --no-verify really skips the check (and so writes the broken model)
    assert main(["hf-to-mcore", "--hf", hf, "--out", out, "--no-verify"]) == 0
    assert os.path.isdir(os.path.join(out, "model"))


def test_unsupported_architecture_names_it_and_writes_nothing(tmp_path, capsys):
    hf = make_tiny_hf_dir(str(tmp_path / "hf"), "llama")
    cfg = json.load(open(os.path.join(hf, "config.json")))
    cfg["model_type"], cfg["architectures"] = "mixtral", ["MixtralForCausalLM"]
    json.dump(cfg, open(os.path.join(hf, "config.json"), "w"))
    assert main(["hf-to-mcore", "--hf", hf, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unsupported architecture model_type='mixtral'" in err and "MixtralForCausalLM" in err
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_missing_shard_and_bad_shape_write_nothing(tmp_path, capsys):
    hf = make_tiny_hf_dir(str(tmp_path / "hf"), "llama", max_shard_size="30KB")
    index = json.load(open(os.path.join(hf, "model.safetensors.index.json")))
    os.remove(os.path.join(hf, sorted(set(index["weight_map"].values()))[0]))
    assert main(["hf-to-mcore", "--hf", hf, "--out", str(tmp_path / "o")]) == 2
    assert "is missing" in capsys.readouterr().err

    hf2 = make_tiny_hf_dir(str(tmp_path / "hf2"), "llama")
    cfg = json.load(open(os.path.join(hf2, "config.json")))
    cfg["intermediate_size"] += 8
    json.dump(cfg, open(os.path.join(hf2, "config.json"), "w"))
    assert main(["hf-to-mcore", "--hf", hf2, "--out", str(tmp_path / "o")]) == 2
    assert "'model.layers.0.mlp.gate_proj.weight' has shape" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["hf", "hf2"]


def test_existing_output_and_wrong_rank_count_are_refused(tmp_path, capsys):
    from r1mega.config import ConfigError

    hf = make_tiny_hf_dir(str(tmp_path / "hf"), "llama")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert main(["hf-to-mcore", "--hf", hf, "--out", str(busy)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert os.listdir(busy) == ["keep.txt"]
    with pytest.raises(ConfigError, match="needs 2 ranks but 1 were launched"):
        main(["hf-to-mcore", "--hf", hf, "--out", str(tmp_path / "o"), "--tp", "2"])
    assert main(["mcore-to-hf", "--ckpt", hf, "--out", str(tmp_path / "o")]) == 2
    assert "not an r1mega model checkpoint" in capsys.readouterr().err


def test_export_bug_fails_verification_and_writes_nothing(tmp_path, monkeypatch, capsys):
    hf = make_tiny_hf_dir(str(tmp_path / "hf"), "qwen2")
    mcore = str(tmp_path / "mcore")
    assert main(["hf-to-mcore", "--hf", hf, "--out", mcore, "--no-verify"]) == 0
    real = fam.split_qkv

    def k_v_biases_swapped(*args):  # shape-preserving: transformers loads it without complaint
        q, k, v = real(*args)
        return (q, v, k) if args[0].dim() == 1 else (q, k, v)

    monkeypatch.setattr(fam, "split_qkv", k_v_biases_swapped)
    assert main(["mcore-to-hf", "--ckpt", mcore, "--out", str(tmp_path / "back")]) == 2
    assert "verify FAIL" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["hf", "mcore"]

    def q_bias_dropped(*args):  # wrong shapes: transformers refuses, reported as our error
        q, k, v = real(*args)
        return (q[:-1], k, v) if args[0].dim() == 1 else (q, k, v)

    monkeypatch.setattr(fam, "split_qkv", q_bias_dropped)
    assert main(["mcore-to-hf", "--ckpt", mcore, "--out", str(tmp_path / "back")]) == 2
    assert "transformers cannot load" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["hf", "mcore"]
