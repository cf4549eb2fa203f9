"""`r1mega bench lean-adam` is listed and refuses to run without a GPU instead of timing
nothing (its candidates and bit checks run on the GPU: tools/gpu_all.sh)."""
from __future__ import annotations

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_bench_is_listed_and_needs_a_gpu(capsys):
    from r1mega.bench import BENCHMARKS, lean_adam

    assert BENCHMARKS["lean-adam"] == "r1mega.bench.lean_adam"
    assert lean_adam.main([]) == 2
    assert "needs CUDA" in capsys.readouterr().err
