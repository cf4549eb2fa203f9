"""The lean AdamW kernel's launch configuration (r1mega/ops/lean_adam_triton.py): the default,
R1MEGA_LEAN_ADAM_TILES, and a clear error for a malformed value; `r1mega bench lean-adam` is
listed and refuses to run without a GPU instead of timing nothing."""
from __future__ import annotations

import pytest
import torch


def test_launch_config_default_and_environment(monkeypatch):
    from r1mega.ops import lean_adam_triton as lat

    monkeypatch.delenv("R1MEGA_LEAN_ADAM_TILES", raising=False)
    assert lat.launch_config() == (lat.BLOCK, lat.NUM_WARPS)
    monkeypatch.setenv("R1MEGA_LEAN_ADAM_TILES", "4096,8")
    assert lat.launch_config() == (4096, 8)
    for bad in ("4096", "3000,8", "4096,3", "a,b", "2,4"):
        monkeypatch.setenv("R1MEGA_LEAN_ADAM_TILES", bad)
        with pytest.raises(ValueError, match="R1MEGA_LEAN_ADAM_TILES"):
            lat.launch_config()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_bench_is_listed_and_needs_a_gpu(capsys):
    from r1mega.bench import BENCHMARKS, lean_adam

    assert BENCHMARKS["lean-adam"] == "r1mega.bench.lean_adam"
    assert lean_adam.main([]) == 2
    assert "needs CUDA" in capsys.readouterr().err
