"""Qwen3-MoE conversion under expert parallelism (EP=2 over 2 gloo ranks): each rank loads only
its half of the experts, the logits match transformers, and the export gathers the experts back
into a HF checkpoint bit-identical to the source."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers")

from tests.distributed.harness import run_ranks  # noqa: E402


def _worker(rank, world_size, hf_dir, out_dir):
    import dataclasses

    import torch.distributed as dist

    from r1mega.config import ParallelConfig, PrecisionConfig
    from r1mega.convert.hf_bridge import export_hf, load_hf_into_model
    from r1mega.convert.hf_config import model_config_from_hf
    from r1mega.convert.hf_io import HFCheckpoint
    from r1mega.convert.verify import verify_against_hf
    from r1mega.models.gpt import build_model
    from r1mega.parallel.runtime import init_parallel

    rt = init_parallel(ParallelConfig(expert=2), PrecisionConfig(dtype="fp32"))
    ckpt = HFCheckpoint(hf_dir)
    cfg = dataclasses.replace(model_config_from_hf(ckpt.config), spec="local")
    chunks = build_model(cfg, rt, wrap=False)
    load_hf_into_model(chunks, ckpt, cfg, rt)
    ep_rank = dist.get_rank(rt.ep_group)
    local = dict(chunks[0].named_parameters())["decoder.layers.1.mlp.experts.down"].detach()
    # This rank's experts are the HF experts [4 * ep_rank, 4 * ep_rank + 4).
    want = torch.stack([ckpt.get(f"model.layers.1.mlp.experts.{e}.down_proj.weight").float()
                        for e in range(4 * ep_rank, 4 * ep_rank + 4)])
    own = torch.equal(local, want)
    diff = verify_against_hf(chunks, hf_dir, cfg, rt).max_abs_diff
    export_hf(chunks, cfg, rt, out_dir, dtype=ckpt.dtype(), original_config=ckpt.config)
    return {"own_experts": own, "diff": diff}


@pytest.mark.slow  # one 2-rank start-up (megatron + transformers imports dominate)
def test_qwen3_moe_conversion_under_expert_parallelism(tmp_path):
    from r1mega.convert.testing import load_safetensors_dir, make_tiny_hf_dir

    hf = make_tiny_hf_dir(str(tmp_path / "hf"), "qwen3_moe", hidden_size=64, num_attention_heads=4,
                          num_key_value_heads=2, dtype=torch.bfloat16, moe=dict(mlp_only_layers=[0]))
    out = str(tmp_path / "back")
    results = run_ranks(_worker, 2, args=(hf, out))
    assert all(r["own_experts"] for r in results), results
    assert all(r["diff"] <= 1e-4 for r in results), results
    a, b = load_safetensors_dir(hf), load_safetensors_dir(out)
    assert set(a) == set(b)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]
