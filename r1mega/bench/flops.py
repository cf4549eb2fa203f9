"""The FLOP counts behind the benchmarks' MFU: a measured matmul rate (the denominator) and a
model's FLOPs per trained token (the numerator)."""
from __future__ import annotations

import time

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak_flops(device, dtype, n: int) -> float:
    """Measured FLOP/s of an n^3 matmul in ``dtype`` (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def model_flops_per_token(shape: dict, seq_len: int) -> float:
    """6 N (N: all parameters, embeddings included; the active ones for an MoE shape) + causal
    attention 6 L s (heads x head_dim): QK^T and AV are 4 s n_h d FLOPs per token forward, x3
    with the backward, halved by the causal mask."""
    from r1mega.config import ModelConfig
    from r1mega.models.gpt import count_parameters

    n = count_parameters(ModelConfig(**shape))
    heads = shape["num_attention_heads"]
    head_dim = shape.get("kv_channels") or shape["hidden_size"] // heads
    return 6 * n + 6 * shape["num_layers"] * heads * head_dim * seq_len
