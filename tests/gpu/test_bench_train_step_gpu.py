"""`r1mega bench train-step --smoke` on the GPU (skipped without CUDA): the tiny shapes in bf16
through the device paths, a seconds-long check before the full-size measurement."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args: str) -> dict:
    # prepend: the GPU machine brings megatron-core on PYTHONPATH (tools/gpu_all.sh)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "r1mega.cli", "bench", "train-step", "--smoke", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_moe_smoke_on_cuda_runs_the_device_moe_path_beside_transformers():
    out = _run("--model", "qwen3-moe-small", "--hf-experts", "default,grouped_mm,eager", "--profile")
    assert out["device"].startswith("cuda") and out["dtype"] == "torch.bfloat16"
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert out["r1mega_experts"] == ("grouped_mm" if hopper else "loop")
    assert out["r1mega_dispatch"] == "cuda", out["r1mega_dispatch"]  # the extension built and loaded
    for name, row in out["impls"].items():
        assert abs(row["first_loss"] - math.log(256)) < 0.2, (name, row)
        assert row["peak_memory_gb"] > 0 and row["allocated_before_gb"] < 1.0, (name, row)
        assert 0 < row["optimizer_ms"] < row["ms_per_step"], (name, row)
    kinds = out["profile_device_ms_by_kind"]
    r1 = next(v for k, v in kinds.items() if k.startswith("r1mega"))
    assert r1["total"] > 0 and r1.get("moe dispatch", 0) > 0
    if hopper:
        assert r1.get("grouped gemm", 0) > 0


def test_dense_smoke_on_cuda():
    out = _run()
    assert out["device"].startswith("cuda") and set(out["impls"]) >= {"transformers"}
