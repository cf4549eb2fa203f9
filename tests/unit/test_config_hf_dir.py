"""An HF directory is the model description (model.init_from_hf), and YAML numbers as users
write them."""
import json

import pytest

from r1mega.config import load_config
from r1mega.errors import UserError

# SmolLM2-135M-Instruct's config.json fields (the architecture r1mega reads), written by hand.
SMOLLM2 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
           "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
           "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
           "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": True}


@pytest.fixture
def hf_dir(tmp_path):
    d = tmp_path / "smollm2-hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(SMOLLM2))
    return str(d)


def test_init_from_hf_fills_the_model_section_and_the_tokenizer(hf_dir):
    cfg = load_config(None, [f"model.init_from_hf={hf_dir}", "model.compile_layers=true"])
    m = cfg.model
    assert (m.family, m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups,
            m.ffn_hidden_size, m.vocab_size, m.max_position_embeddings) == \
        ("llama", 30, 576, 9, 3, 1536, 49152, 8192)
    assert m.rope_theta == 100000.0 and m.norm_epsilon == 1e-5 and m.tied_embeddings
    assert not m.qkv_bias and not m.qk_norm and m.rope_scaling.type == "none"
    assert m.compile_layers  # r1mega-only keys are the user's
    assert cfg.data.tokenizer == hf_dir


def test_agreeing_and_user_choosable_keys_are_kept(hf_dir, tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"model:\n  init_from_hf: {hf_dir}\n  num_layers: 30\n"
                         f"  max_position_embeddings: 1024\ndata:\n  tokenizer: char\n")
    cfg = load_config(str(yaml_file))
    assert cfg.model.num_layers == 30 and cfg.model.hidden_size == 576
    assert cfg.model.max_position_embeddings == 1024  # a shorter context is the user's call
    assert cfg.data.tokenizer == "char"


def test_contradicting_model_keys_name_both_values(hf_dir):
    with pytest.raises(UserError, match=r"model\.num_layers=12 but .*config\.json gives 30.*"
                                        r"model\.hidden_size=64 but .*gives 576.*Remove these"):
        load_config(None, [f"model.init_from_hf={hf_dir}", "model.num_layers=12",
                           "model.hidden_size=64"])


def test_missing_hf_dir_names_the_key_not_a_flag(tmp_path):
    with pytest.raises(UserError, match=r"model\.init_from_hf=.*nowhere.*config\.json does not exist"):
        load_config(None, [f"model.init_from_hf={tmp_path / 'nowhere'}"])


def test_shipped_gpu_config_needs_only_the_directory(hf_dir):
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_config(os.path.join(root, "configs/smollm2_grpo_gpu.yaml"),
                      [f"model.init_from_hf={hf_dir}", f"data.tokenizer={hf_dir}"])
    assert cfg.model.num_layers == 30 and cfg.model.num_query_groups == 3


@pytest.mark.parametrize("text, value", [("1e-6", 1e-6), ("3e4", 3e4), ("-2E+3", -2000.0),
                                         ("1.0e-6", 1e-6), ("2.5", 2.5)])
def test_yaml_floats_as_users_write_them(tmp_path, text, value):
    f = tmp_path / "c.yaml"
    f.write_text(f"optimizer:\n  lr: {text}\n")
    assert load_config(str(f)).optimizer.lr == value
    assert load_config(None, [f"optimizer.lr={text}"]).optimizer.lr == value


def test_yaml_quoted_numbers_stay_strings(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text('optimizer:\n  lr: "1e-6"\n')
    with pytest.raises(UserError, match="optimizer.lr: expected a number, got '1e-6'"):
        load_config(str(f))
