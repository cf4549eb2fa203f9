"""DeepGEMM's blockwise FP8 GEMM (r1mega/ops/deepgemm_blockwise.py; the optional deep_gemm package)
on an sm_90 GPU: 1x128 tiles x 128x128 blocks (the forward and dgrad) against the float32 product
of the dequantised operands (``emulated_gemm``) and against cuBLAS's scaled_mm of the same
operands; the switch routes the FP8 GEMM through it, and leaves the weight gradient and what it
cannot take to cuBLAS."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="needs an sm_90 GPU")

from r1mega.ops import deepgemm_blockwise  # noqa: E402
from r1mega.precision.gemm import _blockwise_mm, _colmajor, emulated_gemm, scaled_gemm  # noqa: E402
from r1mega.precision.quantize import quantize  # noqa: E402


@pytest.fixture(scope="module")
def dg():
    m = deepgemm_blockwise.get()
    if m is None:
        pytest.skip(f"deep_gemm unavailable: {deepgemm_blockwise.load_error()}")
    return m


def _operands(m, n, k, block, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    # every K block of 128 at its own magnitude (and the rows too): a scale applied to the wrong
    # block or row cannot pass
    octaves = torch.logspace(-3, 3, k // 128, device="cuda").repeat_interleave(128)
    a = torch.randn(m, k, device="cuda", generator=g) * octaves * torch.logspace(-2, 2, m, device="cuda")[:, None]
    b = torch.randn(n, k, device="cuda", generator=g) * octaves.flip(0)
    return quantize(a.bfloat16(), "tile"), quantize(b.bfloat16(), "block" if block else "tile")


def _close(got, ref, rel):
    err = (got.float() - ref.float()).abs().max().item()
    return err <= rel * ref.float().abs().max().item(), err


@pytest.mark.parametrize("mnk", [(256, 512, 1024), (384, 256, 4096), (200, 384, 512)])
def test_deepgemm_matches_emulation_and_cublas(dg, mnk):
    a, b = _operands(*mnk, True, seed=sum(mnk))
    y = deepgemm_blockwise.blockwise_gemm(a.data, _colmajor(a.scale), b.data, b.scale, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.shape == (mnk[0], mnk[1])
    # Hopper's FP8 MMA sums each block of 128 in less than float32; bf16 output rounding on top
    ok, err = _close(y, emulated_gemm(a, b, torch.float32), 1e-2)
    assert ok, f"max |y - emulation| {err:.3e}"
    ok, err = _close(y, _blockwise_mm(a.data, a.scale, b.data, b.scale, True, torch.bfloat16), 1e-2)
    assert ok, f"max |y - cuBLAS| {err:.3e}"


def test_the_switch_routes_the_forward_and_dgrad_only(dg, monkeypatch):
    a, b = _operands(256, 256, 512, True, 7)
    ref = scaled_gemm(a, b, torch.bfloat16)
    monkeypatch.delenv("R1MEGA_FP8_BLOCKWISE_GEMM", raising=False)
    assert deepgemm_blockwise.serves(a.data, b.data, True)      # the default, where it imports
    monkeypatch.setenv("R1MEGA_FP8_BLOCKWISE_GEMM", "cublas")
    assert not deepgemm_blockwise.serves(a.data, b.data, True)
    monkeypatch.setenv("R1MEGA_FP8_BLOCKWISE_GEMM", "deepgemm")
    assert deepgemm_blockwise.serves(a.data, b.data, True)
    got = scaled_gemm(a, b, torch.bfloat16)
    want = deepgemm_blockwise.blockwise_gemm(a.data, _colmajor(a.scale), b.data, b.scale, torch.bfloat16)
    assert torch.equal(got, want) and _close(got, ref, 1e-2)[0]
    # the weight gradient's tiles x tiles stay on cuBLAS
    at, bt = _operands(256, 256, 512, False, 8)
    assert not deepgemm_blockwise.serves(at.data, bt.data, False)
    # nor an N that is not a multiple of 8
    assert not deepgemm_blockwise.serves(a.data, b.data[:100].contiguous(), True)
    # nor an operand starting off a 16-byte boundary (TMA cannot read it)
    buf = torch.empty(256 * 512 + 8, dtype=torch.float8_e4m3fn, device="cuda")
    odd = buf[8:].view(256, 512)
    odd.copy_(a.data)
    assert odd.data_ptr() % 16 and not deepgemm_blockwise.serves(odd, b.data, True)


def test_asking_for_deepgemm_without_it_is_an_error(monkeypatch):
    a, b = _operands(256, 256, 512, True, 10)
    monkeypatch.setattr(deepgemm_blockwise, "_STATE", {"module": None, "error": "ImportError: gone"})
    monkeypatch.delenv("R1MEGA_FP8_BLOCKWISE_GEMM", raising=False)
    assert not deepgemm_blockwise.serves(a.data, b.data, True)  # auto: cuBLAS
    monkeypatch.setenv("R1MEGA_FP8_BLOCKWISE_GEMM", "deepgemm")
    with pytest.raises(RuntimeError, match="deep_gemm does not import.*gone"):
        deepgemm_blockwise.serves(a.data, b.data, True)
