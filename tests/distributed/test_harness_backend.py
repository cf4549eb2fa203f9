"""The harness's backend switch (R1MEGA_TEST_BACKEND): gloo by default, with the GPUs hidden from
the ranks so that CPU mode is on exactly as on a CPU-only machine; anything but gloo/nccl is an
error naming the variable."""
from __future__ import annotations

import os

import pytest

from tests.distributed import harness


def _what_the_rank_sees(rank, world):
    import torch

    from r1mega.config import ParallelConfig, PrecisionConfig
    from r1mega.parallel.cpu_mode import cpu_mode_enabled
    from r1mega.parallel.runtime import init_parallel

    rt = init_parallel(ParallelConfig(), PrecisionConfig())
    return {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "cuda": torch.cuda.is_available(),
            "cpu_mode": cpu_mode_enabled(), "backend": torch.distributed.get_backend(),
            "device": str(rt.device), "dtype": str(rt.dtype)}


def test_default_is_gloo_on_cpu_ranks(monkeypatch):
    monkeypatch.delenv(harness.BACKEND_ENV, raising=False)
    assert harness.backend_name() == "gloo" and not harness.on_gpus()
    seen = harness.run_ranks(_what_the_rank_sees, 1)  # one rank shows it (and costs half of two)
    assert seen == [{"visible": "", "cuda": False, "cpu_mode": True, "backend": "gloo",
                     "device": "cpu", "dtype": "torch.float32"}]


def test_backend_names(monkeypatch):
    monkeypatch.setenv(harness.BACKEND_ENV, "NCCL")
    assert harness.on_gpus()
    monkeypatch.setenv(harness.BACKEND_ENV, "mpi")
    with pytest.raises(ValueError, match="R1MEGA_TEST_BACKEND='mpi'"):
        harness.backend_name()


def test_rel_close():
    import torch

    ref = torch.tensor([1.0, -2.0, 3.0])
    harness.assert_rel_close(ref * (1 + 1e-3), ref, "loss", "x")
    with pytest.raises(AssertionError, match="relative error .* > 2e-02 \\(loss"):
        harness.assert_rel_close(ref * 1.05, ref, "loss", "x")
