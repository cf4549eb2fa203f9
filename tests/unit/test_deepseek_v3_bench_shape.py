"""The `dsv3-small` benchmark shape: r1mega's model and the transformers peer built from the same
shape dict agree (config round trip, parameter count), and the smoke variant runs both on CPU."""
import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from r1mega.bench.shapes import get_shape  # noqa: E402
from r1mega.config import Config, ModelConfig, PrecisionConfig, validate  # noqa: E402
from r1mega.convert.hf_config import model_config_from_hf  # noqa: E402
from r1mega.models.deepseek_v3.hf_peer import hf_config_dict, hf_deepseek_v3  # noqa: E402


@pytest.mark.parametrize("smoke", [False, True])
def test_shape_validates_and_its_peer_config_reads_back(smoke):
    shape = get_shape("dsv3-small", smoke=smoke)
    cfg = Config()
    cfg.model = ModelConfig(**shape)
    cfg.model.spec = "local"
    validate(cfg, world_size=1)
    back = model_config_from_hf(hf_config_dict(shape))
    ours = ModelConfig(**shape)
    for f in ("num_layers", "hidden_size", "num_attention_heads", "mla", "rope_scaling", "num_experts",
              "moe_router_topk", "moe_num_groups", "moe_topk_groups", "moe_ffn_hidden_size",
              "moe_shared_expert_ffn_hidden_size", "moe_first_k_dense", "moe_routed_scaling_factor"):
        assert getattr(back, f) == getattr(ours, f), f


def test_smoke_peer_and_model_have_the_same_parameters(rt_fp32):
    from r1mega.models.gpt import build_model, count_parameters

    shape = get_shape("dsv3-small", smoke=True)
    peer = hf_deepseek_v3(shape)
    ids = torch.randint(0, shape["vocab_size"], (2, 16))
    assert peer(input_ids=ids).logits.shape == (2, 16, shape["vocab_size"])
    m = dataclasses.replace(ModelConfig(**shape), spec="local", make_vocab_size_divisible_by=1)
    ours = build_model(m, rt_fp32, PrecisionConfig(dtype="fp32"), wrap=False)[0]
    n_peer = sum(p.numel() for p in peer.parameters())
    assert sum(p.numel() for p in ours.parameters()) == n_peer
    # count_parameters counts what one token uses: k of the routed experts.
    experts = sum(p.numel() for n, p in peer.named_parameters() if ".experts." in n)
    active = n_peer - experts + experts * shape["moe_router_topk"] // shape["num_experts"]
    assert count_parameters(m) == active


def test_dsv3_train_step_bench_smoke(tmp_path):
    """`r1mega bench dsv3-train-step --smoke`: both sides train on CPU, last line one JSON object."""
    import json
    import os
    import subprocess
    import sys

    from r1mega.convert.testing import free_port

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root, MASTER_PORT=str(free_port()))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-m", "r1mega.cli", "bench", "dsv3-train-step", "--smoke"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["impls"]) == {"r1mega", "transformers"} and result["speedup_vs_hf"] > 0
    assert all(r["first_loss"] == r["first_loss"] for r in result["impls"].values())  # finite


def test_dsv3_rollout_bench_smoke():
    """`r1mega bench dsv3-rollout --smoke`: engine and transformers' generate() on CPU, the latent
    cache's bytes per token reported beside the per-head keys and values it replaces."""
    import json
    import os
    import subprocess
    import sys

    from r1mega.convert.testing import free_port

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root, MASTER_PORT=str(free_port()))
    out = subprocess.run([sys.executable, "-m", "r1mega.cli", "bench", "dsv3-rollout", "--smoke"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    shape = get_shape("dsv3-small", smoke=True)
    a = shape["mla"]
    assert result["kv_bytes_per_token"] == shape["num_layers"] * (a["kv_lora_rank"] + a["qk_rope_head_dim"]) * 4
    assert result["kv_bytes_per_token"] < result["expanded_kv_bytes_per_token"]
    (setting,) = result["settings"].values()
    assert setting["rollout_tokens_per_s"] > 0 and setting["hf_tokens_per_s"] > 0
