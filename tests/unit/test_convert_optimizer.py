"""init_from_hf after the optimizer exists: the optimizer's master weights must follow (bf16)."""
import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from r1mega.config import ParallelConfig, PrecisionConfig  # noqa: E402
from r1mega.convert.hf_bridge import load_hf_into_model  # noqa: E402
from r1mega.convert.hf_config import model_config_from_hf  # noqa: E402
from r1mega.convert.hf_io import HFCheckpoint  # noqa: E402
from r1mega.convert.testing import free_port, make_tiny_hf_dir  # noqa: E402


def test_loading_after_the_optimizer_exists_refreshes_its_master_weights(tmp_path):
    """bf16 parameters + distributed optimizer: fp32 master copies are taken at construction, so
    HF weights loaded afterwards must be pushed into them, else the first step restores the old
    weights. A zero-lr step must leave the loaded weights in place."""
    from r1mega.config import OptimizerConfig
    from r1mega.convert.hf_bridge import unwrap_chunk
    from r1mega.models.gpt import build_model
    from r1mega.parallel.launch_env import LaunchEnv
    from r1mega.parallel.runtime import destroy_parallel, init_parallel
    from r1mega.train.optimizer import build_optimizer

    prec = PrecisionConfig(dtype="bf16")
    rt = init_parallel(ParallelConfig(), prec, env=LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    try:
        hf_dir = make_tiny_hf_dir(str(tmp_path / "hf"), "llama", dtype=torch.bfloat16)
        cfg = dataclasses.replace(model_config_from_hf(HFCheckpoint(hf_dir).config), spec="local")
        chunks = build_model(cfg, rt, prec, wrap=True, distributed_optimizer=True)
        optim = build_optimizer(OptimizerConfig(lr=0.0, clip_grad=0.0), chunks, rt, distributed=True)
        load_hf_into_model(chunks, hf_dir, cfg, rt, optimizer=optim.optimizer)
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optim.optimizer.step()
        weight = unwrap_chunk(chunks[0]).decoder.layers[0].mlp.linear_fc2.weight
        assert torch.equal(weight, HFCheckpoint(hf_dir).get("model.layers.0.mlp.down_proj.weight"))
    finally:
        destroy_parallel()
