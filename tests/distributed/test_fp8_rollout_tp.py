"""The FP8 rollout's decode chain of a dense SwiGLU MLP (r1mega/precision/rollout.py) under
tensor parallelism: two gloo ranks, the row kernels under Triton's interpreter and cuBLAS's part
played by torch's CPU scaled matmul. Each rank quantises its own shard's rows, exactly as the
per-linear route (megatron's MLP forward through the FP8 hooks) does, so the chain must equal that
route up to e4m3 ties a bf16 rounding moves, and both ranks must hold the whole (all-reduced)
output: a chain without fc2's all-reduce would give each rank half of the sum."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.distributed.harness import run_ranks

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")]


def _chain_vs_route(rank, world):
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"
    from tests.unit.test_fp8_rows_interpreter import row_model

    model, fp8 = row_model(tensor=world)
    mlp = model[0].decoder.layers[0].mlp
    assert fp8.mlps == [mlp]
    x = (torch.randn(6, 1, 128, generator=torch.Generator().manual_seed(2)) * 2).bfloat16()
    with torch.no_grad():
        with fp8.decoding():
            chain, _ = mlp(x)
            route, _ = type(mlp).forward(mlp, x)  # megatron's forward: the per-linear FP8 hooks
        plain, _ = mlp(x)                         # outside decoding: bf16 megatron
    fp8.remove()
    return chain.float(), route.float(), plain.float()


def test_fp8_rollout_mlp_chain_under_tp2(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned ranks
    results = run_ranks(_chain_vs_route, 2, timeout_s=300)
    (c0, r0, p0), (c1, r1, p1) = results
    assert torch.equal(c0, c1) and torch.equal(p0, p1)  # every rank the whole reduced output
    scale = float(p0.abs().max())
    assert (c0 - r0).abs().max() < 3e-2 * scale, float((c0 - r0).abs().max() / scale)
    err = float((c0 - p0).abs().max() / scale)
    assert 0 < err < 0.15, err  # FP8 against bf16: close, not equal


def test_fp8_rollout_qkv_rows_under_tp2(monkeypatch):
    """Each rank's qkv shard (one KV group of two) left unscaled for the RoPE kernel: with its
    scales applied, the per-linear route's shard to the bit."""
    from tests.unit.test_fp8_rows_interpreter import qkv_rows_vs_route

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    results = run_ranks(qkv_rows_vs_route, 2, timeout_s=300)
    for got, route, scales, refused in results:
        assert got.shape == route.shape == (6, 1, 1, 4 * 32) and refused
        assert torch.equal(got, route)
    assert torch.equal(results[0][2], results[1][2])  # one row's scale on every rank: x is replicated
