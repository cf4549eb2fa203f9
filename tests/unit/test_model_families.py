"""The per-family block-builder registry (r1mega/models/families.py)."""
from __future__ import annotations

import pytest

from r1mega.config import ModelConfig
from r1mega.models import families
from r1mega.models.families import BlockSpec, block_spec, register_block_builder


def test_every_validated_family_has_a_builder():
    for name in ("llama", "qwen2", "qwen3", "qwen3_moe"):
        assert name in families._BUILDERS


def test_a_new_family_plugs_in_its_own_builder():
    seen = {}

    @register_block_builder("test_family_x")
    def build(model, rt, *, first_layer, num_layers):
        seen.update(first=first_layer, n=num_layers)
        return BlockSpec("spec", "local", None)

    try:
        out = block_spec(ModelConfig(family="test_family_x"), None, first_layer=2, num_layers=3)
        assert out.spec == "spec" and seen == {"first": 2, "n": 3}
        with pytest.raises(ValueError, match="test_family_x.*already"):
            register_block_builder("test_family_x")(build)
    finally:
        families._BUILDERS.pop("test_family_x")


def test_unknown_family_names_the_key_and_the_known_ones():
    with pytest.raises(ValueError, match=r"model.family='nope'.*llama"):
        block_spec(ModelConfig(family="nope"), None, first_layer=0, num_layers=1)


def test_auto_spec_takes_transformer_engine_on_cuda_only(monkeypatch):
    """TE imports on a machine without a GPU too, but its layers run on CUDA alone: model.spec=auto
    keeps the local spec on the CPU, and an explicit model.spec=te there is an error naming the fix."""
    from r1mega.models import spec as spec_mod

    monkeypatch.setattr(spec_mod, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(spec_mod, "te_layer_spec", lambda qk_norm: "te-spec")
    assert spec_mod.layer_spec("auto", False, device_type="cpu")[1] == "local"
    assert spec_mod.layer_spec("auto", False, device_type="cuda") == ("te-spec", "te")
    assert spec_mod.layer_spec("local", False, device_type="cuda")[1] == "local"
    with pytest.raises(RuntimeError, match="model.spec=te.*CUDA.*model.spec=local"):
        spec_mod.layer_spec("te", False, device_type="cpu")
    monkeypatch.setattr(spec_mod, "transformer_engine_available", lambda: False)
    assert spec_mod.layer_spec("auto", False, device_type="cuda")[1] == "local"
    with pytest.raises(RuntimeError, match="not importable"):
        spec_mod.layer_spec("te", False, device_type="cuda")
