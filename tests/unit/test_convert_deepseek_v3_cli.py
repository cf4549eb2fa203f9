"""`r1mega convert` on a DeepSeek-V3 checkpoint (FP8 block-scaled, with its MTP layer): verified
against transformers by default both ways, MTP kept with model.mtp_num_layers."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from r1mega.convert.cli import main  # noqa: E402
from r1mega.convert.testing import free_port, load_safetensors_dir  # noqa: E402


@pytest.fixture(autouse=True)
def _own_port(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def test_cli_round_trip_of_a_deepseek_v3_checkpoint(tmp_path, capsys):
    from r1mega.models.deepseek_v3.hf_peer import make_tiny_deepseek_v3_dir

    hf = make_tiny_deepseek_v3_dir(str(tmp_path / "hf"), dtype=torch.bfloat16)
    mcore, back = str(tmp_path / "mcore"), str(tmp_path / "back")
    assert main(["hf-to-mcore", "--hf", hf, "--out", mcore]) == 0
    assert "verify PASS" in capsys.readouterr().out
    meta = json.load(open(os.path.join(mcore, "meta.json")))
    assert meta["model_config"]["family"] == "deepseek_v3"
    assert meta["model_config"]["mla"]["kv_lora_rank"] == 32
    assert main(["mcore-to-hf", "--ckpt", mcore, "--out", back]) == 0
    assert "verify PASS" in capsys.readouterr().out
    a, b = load_safetensors_dir(hf), load_safetensors_dir(back)
    assert set(a) == set(b)
    for n in a:
        assert torch.equal(a[n].to(b[n].dtype), b[n]), n
