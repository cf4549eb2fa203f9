"""The decode attention op with o_proj's input in 1 x 128 head tiles (r1mega/rollout/cuda_paged.py,
``R1MEGA_PAGED_FP8_TILES``) on the CPU (its switch is tested beside the rows one in
test_paged_rows.py): the contract of the op's fallback (which the
CUDA epilogue is held to on a GPU, tests/gpu/test_paged_tiles_gpu.py), the shapes it refuses, and
the tile x tensor FP8 GEMM those tiles go to (the split-K kernel under Triton's interpreter)."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from r1mega.rollout import cuda_paged
from tests.unit.test_rollout_fp8_error import paged_decode_case


@pytest.mark.parametrize("power2", [True, False])
def test_fallback_is_the_attention_and_its_head_tiles_quantised(monkeypatch, power2):
    from r1mega.precision.quantize import FP8_MAX
    from r1mega.rollout.attention import attend_decode_gather
    from r1mega.rollout.kv_cache import quantize_rows

    monkeypatch.setattr(cuda_paged, "TILES", True)
    q, k, v, bt, ctx = paged_decode_case(8, 2, 128, 16)  # 8 sequences: 16 rows after padding
    q = q.to(torch.bfloat16)
    k8, ks = quantize_rows(k)
    v8, vs = quantize_rows(v)
    assert not cuda_paged.serves_tiles(q, k8, ks)  # a CPU tensor: never the CUDA epilogue
    scale = 1 / math.sqrt(128)
    out, q8, s8 = torch.ops.r1mega.paged_decode_attention_tiles(q, k8, v8, bt, ctx, scale, ks, vs,
                                                               power2, 16)
    assert torch.equal(out, attend_decode_gather(q, k8, v8, bt, ctx, scale, ks, vs))
    assert q8.shape == (16, 8 * 128) and q8.dtype == torch.float8_e4m3fn and s8.shape == (16, 8)
    assert s8.stride(1) == 1  # the layout the CUDA epilogue writes
    assert torch.equal(s8[8:], torch.ones(8, 8)) and not q8[8:].view(torch.uint8).any()
    heads = out.float()                                               # (8, Hq, 128)
    amax = heads.abs().amax(-1)                                       # (8, Hq)
    assert torch.all(amax / s8[:8] <= FP8_MAX["e4m3"] * (1 + 2 ** -20))
    if power2:  # each head's scale a power of two, no coarser than needed
        assert torch.equal(torch.frexp(s8[:8])[0], torch.full_like(s8[:8], 0.5))
        assert torch.all(amax / s8[:8] > FP8_MAX["e4m3"] / 2)
    back = q8[:8].float().reshape(8, 8, 128) * s8[:8, :, None]
    assert torch.all((back - heads).abs() <= amax[..., None] * 2 ** -3)  # e4m3: 3 mantissa bits


def test_tiles_route_takes_head_dim_128_and_one_cta_a_head(monkeypatch):
    q = torch.zeros(3, 16, 128, dtype=torch.bfloat16)
    k = torch.zeros(4, 16, 4, 128, dtype=torch.float8_e4m3fn)
    assert "not a CUDA device" in cuda_paged.tiles_why_not(q, k, torch.zeros(4, 16, 4))
    assert "takes 128" in cuda_paged.tiles_why_not(q[..., :64], k[..., :64], None)
    monkeypatch.setattr(cuda_paged, "WARPS_PER_HEAD", 2)
    assert "one CTA a KV head of four warps" in cuda_paged.tiles_why_not(q, k, None)


def _tile_gemm(rank, world):
    from r1mega.precision.gemm import emulated_gemm, fp8_gemm
    from r1mega.precision.quantize import quantize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 512, generator=g) * torch.logspace(-2, 2, 512)[None, :]
    a = quantize(x, "tile", "e4m3", True)
    w = quantize(torch.randn(96, 512, generator=g) * 0.05, "tensor", "e4m3", False)
    return fp8_gemm(a, w, torch.float32, emulate=False, fast_accum=True), emulated_gemm(a, w, torch.float64), a, w


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_tile_by_tensor_gemm_goes_to_the_split_k_kernel(monkeypatch):
    from r1mega.precision.gemm import fp8_gemm
    from r1mega.precision.quantize import dequantize
    from tests.distributed.harness import run_ranks

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ((y, ref, a, w),) = run_ranks(_tile_gemm, 1, timeout_s=300)
    mag = dequantize(a, torch.float64).abs() @ (w.data.double().abs() * w.scale.double()).t()
    assert ((y.double() - ref).abs() <= mag * 512 * 2.0 ** -23).all()
    # without the interpreter (a CPU tensor) the pair has no kernel: the error says which
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="only the split-K Triton kernel takes this pair"):
        fp8_gemm(a, w, torch.float32, emulate=False, fast_accum=True)
