"""The decode attention op with o_proj's row quantiser (r1mega/rollout/cuda_paged.py,
``R1MEGA_PAGED_FP8_ROWS``) on the CPU: the switch (and the tiles epilogue's), and the contract of the op's fallback, which
the CUDA epilogue is held to on a GPU (tests/gpu/test_paged_rows_gpu.py): the attention, and its
output rows quantised to e4m3 with row scales, padded with zero rows of scale 1."""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from r1mega.rollout import cuda_paged
from tests.unit.test_rollout_fp8_error import paged_decode_case


@pytest.mark.parametrize("attr,var", [("ROWS", "R1MEGA_PAGED_FP8_ROWS"), ("TILES", "R1MEGA_PAGED_FP8_TILES"),
                                      ("ROWS_CLUSTER", "R1MEGA_PAGED_FP8_ROWS_CLUSTER")])
def test_switch_is_off_by_default_and_validated(monkeypatch, attr, var):
    assert getattr(cuda_paged, attr) is False
    monkeypatch.setenv(var, "on")
    with pytest.raises(ValueError, match=f"{var}='on'"):
        importlib.reload(cuda_paged)
    monkeypatch.setenv(var, "1")
    importlib.reload(cuda_paged)
    assert getattr(cuda_paged, attr) is True
    monkeypatch.delenv(var)
    importlib.reload(cuda_paged)
    assert getattr(cuda_paged, attr) is False


@pytest.mark.parametrize("power2", [True, False])
def test_fallback_is_the_attention_and_its_rows_quantised(monkeypatch, power2):
    from r1mega.precision.quantize import FP8_MAX, dequantize, Fp8Tensor
    from r1mega.rollout.attention import attend_decode_gather
    from r1mega.rollout.kv_cache import quantize_rows

    monkeypatch.setattr(cuda_paged, "ROWS", True)
    q, k, v, bt, ctx = paged_decode_case(16, 4, 64, 16)  # 8 sequences: 16 rows after padding
    q = q.to(torch.bfloat16)
    k8, ks = quantize_rows(k)
    v8, vs = quantize_rows(v)
    assert not cuda_paged.serves_rows(q, k8, ks)  # a CPU tensor: never the CUDA epilogue
    scale = 1 / math.sqrt(64)
    out, q8, s8 = torch.ops.r1mega.paged_decode_attention_rows(q, k8, v8, bt, ctx, scale, ks, vs,
                                                              power2, 16)
    ref = attend_decode_gather(q, k8, v8, bt, ctx, scale, ks, vs)
    assert torch.equal(out, ref)
    assert q8.shape == (16, 16 * 64) and q8.dtype == torch.float8_e4m3fn and s8.shape == (16, 1)
    assert torch.equal(s8[8:], torch.ones(8, 1)) and not q8[8:].view(torch.uint8).any()
    rows = out.reshape(8, -1).float()
    amax = rows.abs().amax(1, keepdim=True)
    assert torch.all(rows.abs().amax(1) / s8[:8, 0] <= FP8_MAX["e4m3"] * (1 + 2 ** -20))  # to rounding
    if power2:  # scales are powers of two, no coarser than needed
        assert torch.equal(torch.frexp(s8[:8])[0], torch.full_like(s8[:8], 0.5))
        assert torch.all(amax / s8[:8] > FP8_MAX["e4m3"] / 2)
    back = dequantize(Fp8Tensor(q8[:8], s8[:8], "row", "e4m3"))
    assert torch.all((back - rows).abs() <= amax * 2 ** -3)  # e4m3: 3 mantissa bits


def test_rows_route_takes_one_cta_of_heads_per_sequence():
    """The epilogue runs a sequence's KV heads in one CTA: 1, 2 or 4 of them, head_dim x heads
    <= 512 (its shared memory); other shapes are refused with the reason (and the op falls back)."""
    def case(hq, hkv, d):
        return (torch.zeros(3, hq, d, dtype=torch.bfloat16),
                torch.zeros(4, 16, hkv, d, dtype=torch.float8_e4m3fn))

    for hq, hkv, d in [(16, 4, 128), (12, 2, 256), (8, 1, 64), (32, 4, 64)]:
        q, k = case(hq, hkv, d)  # past the heads: only the CUDA device is missing
        assert "not a CUDA device" in cuda_paged.rows_why_not(q, k, torch.zeros(4, 16, hkv))
    for hq, hkv, d in [(24, 8, 64), (9, 3, 64), (32, 4, 256)]:
        q, k = case(hq, hkv, d)
        assert "one CTA a sequence takes 1, 2 or 4 heads" in cuda_paged.rows_why_not(q, k, None)


def test_cluster_rows_route_takes_one_cta_a_kv_head_of_head_dim_128(monkeypatch):
    """The cluster form keeps the one-CTA-a-KV-head grid with a thread a dim: head_dim 128, four
    warps a head, at most 8 KV heads (a portable cluster); a CPU tensor is never served, and
    with both switches on the route falls to the one-CTA-a-sequence form where the cluster's
    conditions fail."""
    def case(hq, hkv, d):
        return (torch.zeros(3, hq, d, dtype=torch.bfloat16),
                torch.zeros(4, 16, hkv, d, dtype=torch.float8_e4m3fn))

    for hq, hkv, d in [(16, 4, 128), (8, 8, 128), (6, 2, 128), (4, 1, 128)]:
        q, k = case(hq, hkv, d)
        assert "not a CUDA device" in cuda_paged.rows_cluster_why_not(q, k, torch.zeros(4, 16, hkv))
    q, k = case(12, 2, 64)
    assert "head_dim 64" in cuda_paged.rows_cluster_why_not(q, k, None)
    q, k = case(32, 16, 128)
    assert "16 KV heads" in cuda_paged.rows_cluster_why_not(q, k, None)
    monkeypatch.setattr(cuda_paged, "WARPS_PER_HEAD", 2)
    q, k = case(16, 4, 128)
    assert "four warps" in cuda_paged.rows_cluster_why_not(q, k, None)
    monkeypatch.setattr(cuda_paged, "ROWS_CLUSTER", True)
    monkeypatch.setattr(cuda_paged, "ROWS", True)
    assert cuda_paged.rows_mode(q, k, torch.zeros(4, 16, 4)) is None  # CPU: neither form
    assert not cuda_paged.serves_rows(q, k, torch.zeros(4, 16, 4))
