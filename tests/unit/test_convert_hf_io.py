"""HF directory IO: sharded safetensors with the index, error messages, nothing half-written."""
import json
import os

import pytest
import torch

from r1mega.convert import hf_io
from r1mega.convert.families import ConversionError
from r1mega.convert.testing import load_safetensors_dir, make_tiny_hf_dir


def test_sharded_writer_is_read_back_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    src = make_tiny_hf_dir(str(tmp_path / "src"), "llama")
    tensors = load_safetensors_dir(src)
    out = tmp_path / "out"
    out.mkdir()
    files = hf_io.write_safetensors(tensors.items(), str(out), max_shard_bytes=20_000)
    assert hf_io.INDEX_NAME in files and len(files) > 3
    index = json.loads((out / hf_io.INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    # our reader and transformers' loader (independent) both see the same tensors
    back = load_safetensors_dir(str(out))
    assert all(torch.equal(back[n], tensors[n]) for n in tensors)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    sd = model.state_dict()
    assert all(torch.equal(sd[n], tensors[n]) for n in tensors)


def test_reader_reads_transformers_sharded_output(tmp_path):
    src = make_tiny_hf_dir(str(tmp_path / "src"), "qwen2", max_shard_size="30KB")
    assert os.path.exists(tmp_path / "src" / hf_io.INDEX_NAME)
    ckpt = hf_io.HFCheckpoint(src)
    assert "model.layers.1.self_attn.q_proj.bias" in ckpt.names()
    assert ckpt.dtype() == torch.float32
    assert ckpt.shape("model.embed_tokens.weight") == (97, 48)


def test_missing_shard_is_named(tmp_path):
    src = make_tiny_hf_dir(str(tmp_path / "src"), "llama", max_shard_size="30KB")
    index = json.loads((tmp_path / "src" / hf_io.INDEX_NAME).read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(os.path.join(src, victim))
    with pytest.raises(ConversionError, match=f"shard '{victim}'.*missing"):
        hf_io.HFCheckpoint(src)


def test_no_weights_and_pickled_weights_are_explained(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConversionError, match="neither model.safetensors"):
        hf_io.HFCheckpoint(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ConversionError, match="pickled .bin"):
        hf_io.HFCheckpoint(str(tmp_path))
    with pytest.raises(ConversionError, match="config.json does not exist"):
        hf_io.HFCheckpoint(str(tmp_path / "nowhere"))


def test_mixed_dtypes_and_wrong_shapes_are_named(tmp_path):
    from safetensors.torch import save_file

    d = tmp_path / "mixed"
    d.mkdir()
    (d / "config.json").write_text("{}")
    save_file({"a": torch.zeros(2, dtype=torch.float32), "b": torch.zeros(2, dtype=torch.bfloat16)},
              str(d / "model.safetensors"))
    with pytest.raises(ConversionError, match="mixes dtypes"):
        hf_io.HFCheckpoint(str(d)).dtype()
    with pytest.raises(ConversionError, match="'a' has shape \\[2\\].*implies \\[3\\]"):
        hf_io.check_shapes(hf_io.HFCheckpoint(str(d)), {"a": (3,)})


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "result"
    with pytest.raises(RuntimeError):
        with hf_io.atomic_dir(str(out)) as tmp:
            (open(os.path.join(tmp, "model.safetensors"), "w")).write("half")
            raise RuntimeError("crash mid-write")
    assert not out.exists() and os.listdir(tmp_path) == []
    with hf_io.atomic_dir(str(out)) as tmp:
        (open(os.path.join(tmp, "x"), "w")).write("done")
    assert (out / "x").read_text() == "done" and os.listdir(tmp_path) == ["result"]
    with pytest.raises(ConversionError, match="exists and is not empty"):
        with hf_io.atomic_dir(str(out)):
            pass


def test_carry_files_copies_tokenizer_and_generation_files(tmp_path):
    src = make_tiny_hf_dir(str(tmp_path / "src"), "llama")
    copied = hf_io.carry_files(src, str(tmp_path / "dst"))
    assert {"tokenizer_config.json", "chat_template.jinja", "generation_config.json"} <= set(copied)
    assert (tmp_path / "dst" / "chat_template.jinja").read_text() == \
        (tmp_path / "src" / "chat_template.jinja").read_text()
