"""Every YAML in configs/ loads and passes validation, and the two MoE configs say what their
comments say: the GPU config is the MoE benchmark's shape, and DeepSeek-V3's paper-scale layout
validates against its world size (no process group, nothing built)."""
from __future__ import annotations

import glob
import os

import pytest
import yaml

from r1mega.config import ConfigError, load_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def _load(path: str, overrides=()):
    with open(path) as f:
        hf_dir = ((yaml.safe_load(f) or {}).get("model") or {}).get("init_from_hf")
    overrides = list(overrides)
    if hf_dir and not os.path.isabs(hf_dir) and not os.path.isdir(os.path.join(ROOT, hf_dir)):
        # A converted checkpoint (a run artefact, e.g. runs/smollm2-hf) supplies the architecture
        # at run time; without it the rest of the file is still checked.
        overrides.append("model.init_from_hf=null")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return load_config(path, overrides)
    finally:
        os.chdir(cwd)


def test_the_config_directory_is_not_empty():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"qwen3_moe_small_gpu.yaml", "deepseek_v3_layout.yaml", "moe_tiny_cpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads_and_validates(path):
    cfg = validate(_load(path))
    # The layout check against the smallest world the file's parallel sizes allow.
    p = cfg.parallel
    world = p.tensor * p.pipeline * p.context * max(p.expert, p.data or 1)
    validate(cfg, world_size=world)


def test_qwen3_moe_gpu_config_is_the_benchmark_shape():
    from r1mega.bench.shapes import get_shape

    m = _load(os.path.join(ROOT, "configs", "qwen3_moe_small_gpu.yaml")).model
    for key, value in get_shape("qwen3-moe-small").items():
        assert getattr(m, key) == value, key
    assert validate(_load(os.path.join(ROOT, "configs", "qwen3_moe_small_gpu.yaml")), world_size=1)


def test_deepseek_v3_layout_has_the_paper_numbers_and_validates_on_1024_ranks():
    path = os.path.join(ROOT, "configs", "deepseek_v3_layout.yaml")
    cfg = validate(_load(path), world_size=1024)
    m, p = cfg.model, cfg.parallel
    assert (m.num_layers, m.hidden_size, m.vocab_size, m.ffn_hidden_size) == (61, 7168, 129280, 18432)
    assert (m.num_experts, m.moe_router_topk, m.moe_ffn_hidden_size) == (256, 8, 2048)
    assert (m.moe_router, m.moe_num_groups, m.moe_topk_groups) == ("sigmoid_group", 8, 4)
    assert (m.moe_routed_scaling_factor, m.moe_shared_expert_ffn_hidden_size, m.moe_first_k_dense) == \
        (2.5, 2048, 3)
    assert m.moe_bias_update_rate > 0 and m.moe_norm_topk_prob and not m.tied_embeddings
    assert (p.expert, p.tensor, p.pipeline) == (64, 1, 1)
    # The MoE settings a layer would be built from (pure Python: no torch model here).
    from r1mega.moe.settings import MoESettings

    s = MoESettings.from_model(m)
    assert [s.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]


@pytest.mark.parametrize("overrides,world,needle", [
    # 61 layers cannot make DeepSeek's 16 equal pipeline stages (its stages are uneven).
    (["parallel.pipeline=16"], 1024, "model.num_layers=61"),
    # Expert-parallel groups are carved out of the data-parallel ranks.
    ([], 96, "parallel.expert=64"),
    # 256 experts do not split over 48 expert-parallel ranks.
    (["parallel.expert=48"], 1536, "parallel.expert=48"),
    # One prompt per data-parallel rank: 1024 prompts over 2048 ranks leave half without one.
    ([], 2048, "data.global_batch_prompts=1024"),
])
def test_deepseek_v3_layout_refuses_plans_that_do_not_fit(overrides, world, needle):
    cfg = _load(os.path.join(ROOT, "configs", "deepseek_v3_layout.yaml"), overrides)
    with pytest.raises(ConfigError, match=needle):
        validate(cfg, world_size=world)
