"""The persistent Triton dual quantiser (r1mega/precision/triton_quant.py, ``persistent=True``:
programs walk the 128 x 128 blocks, each loading its next block before working on one) under
Triton's CPU interpreter: every block of ragged matrices, for tensor, tile and block
granularities, written as the one-block-a-program kernel writes it, and the scales equal to the
PyTorch reference's. (The interpreter's float32 -> e4m3 conversion does not round like the GPU's,
so the FP8 bytes are held to the other kernel here and to the reference in tests/gpu.)"""
from __future__ import annotations

import importlib.util

import pytest
import torch

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

# (rows, cols): one block; blocks ragged on both sides; more blocks than programs, unevenly
SHAPES = [(16, 16), (272, 400), (144, 4112), (400, 272)]


def _interpreted(rank, world):
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"
    from r1mega.precision import triton_quant as tq
    from r1mega.precision.quantize import quantize_reference

    g = torch.Generator().manual_seed(0)
    out = []
    for shape in SHAPES:
        x = (torch.randn(shape, generator=g) * torch.logspace(-4, 4, shape[1])).bfloat16()
        x[0, : min(128, shape[1])] = 0                  # a zero tile
        x[min(2, shape[0] - 1), 5] = float("nan")       # a NaN tile
        for gran in ("tensor", "tile", "block"):
            one = tq.quantize_dual_triton(x, gran, "e4m3", persistent=False)
            walk = tq.quantize_dual_triton(x, gran, "e4m3", persistent=True)
            refs = (quantize_reference(x, gran, "e4m3"), quantize_reference(x.t(), gran, "e4m3"))
            out.append((shape, gran, one, walk, refs))
    return out


def _same_bits(a, b):
    nan = torch.isnan(a.float()) & torch.isnan(b.float())
    return bool(((a.view(torch.uint8) == b.view(torch.uint8)) | nan).all())


@needs_triton
def test_persistent_dual_quantizer_writes_every_block_like_the_one_block_kernel(monkeypatch):
    from tests.distributed.harness import run_ranks

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned process
    monkeypatch.delenv("R1MEGA_FP8_QUANT_PERSISTENT", raising=False)
    (out,) = run_ranks(_interpreted, 1, timeout_s=600)
    assert len(out) == 3 * len(SHAPES)
    for shape, gran, one, walk, refs in out:
        for o, w, ref in zip(one, walk, refs):
            assert w.data.shape == ref.data.shape and w.scale.stride() == o.scale.stride()
            assert _same_bits(w.data, o.data), (shape, gran)
            assert torch.equal(w.scale.nan_to_num(-1.0), ref.scale.nan_to_num(-1.0)), (shape, gran)
            assert torch.equal(o.scale.nan_to_num(-1.0), ref.scale.nan_to_num(-1.0)), (shape, gran)
