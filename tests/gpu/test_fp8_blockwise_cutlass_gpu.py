"""CUTLASS's blockwise FP8 GEMMs (csrc/fp8_blockwise_gemm.cu, r1mega/ops/cutlass_blockwise.py) on
an sm_90 GPU: every tile configuration, tiles x tiles (wgrad) and tiles x 128x128 blocks (forward,
dgrad), against the float32 product of the dequantised operands (``emulated_gemm``) and against
cuBLAS's scaled_mm of the same operands; the switch routes the FP8 GEMM through it; refusals."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="needs an sm_90 GPU")

from r1mega.ops import cutlass_blockwise  # noqa: E402
from r1mega.precision.gemm import _blockwise_mm, _colmajor, emulated_gemm, scaled_gemm  # noqa: E402
from r1mega.precision.quantize import Fp8Tensor, quantize  # noqa: E402


@pytest.fixture(scope="module")
def ext():
    m = cutlass_blockwise.get()
    if m is None:
        pytest.skip(f"r1mega_cutlass_cuda unavailable: {cutlass_blockwise.load_error()}")
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


@pytest.mark.parametrize("config", [0, 1, 2])
@pytest.mark.parametrize("block", [False, True], ids=["tiles", "blocks"])
@pytest.mark.parametrize("mnk", [(256, 512, 1024), (384, 256, 4096)])
def test_cutlass_gemm_matches_emulation_and_cublas(ext, config, block, mnk):
    a, b = _operands(*mnk, block, seed=sum(mnk) + config)
    y = ext.gemm(a.data, _colmajor(a.scale), b.data, _colmajor(b.scale),
                 block, config)
    assert y.dtype == torch.bfloat16 and y.shape == (mnk[0], mnk[1])
    # Hopper's FP8 MMA sums each block of 128 in less than float32; bf16 output rounding on top
    ok, err = _close(y, emulated_gemm(a, b, torch.float32), 1e-2)
    assert ok, f"max |y - emulation| {err:.3e}"
    ok, err = _close(y, _blockwise_mm(a.data, a.scale, b.data, b.scale, block, torch.bfloat16), 1e-2)
    assert ok, f"max |y - cuBLAS| {err:.3e}"


def test_the_switch_routes_the_blockwise_gemm(ext, monkeypatch):
    a, b = _operands(256, 256, 512, False, 7)
    ref = scaled_gemm(a, b, torch.bfloat16)
    monkeypatch.setenv("R1MEGA_FP8_BLOCKWISE_GEMM", "cutlass")
    assert cutlass_blockwise.serves(a.data, b.data)
    got = scaled_gemm(a, b, torch.bfloat16)
    want = ext.gemm(a.data, _colmajor(a.scale), b.data, _colmajor(b.scale),
                    False, cutlass_blockwise.config())
    assert torch.equal(got, want)                  # CUTLASS's kernel ran, not cuBLAS's
    assert _close(got, ref, 1e-2)[0]
    # sizes it cannot take go to cuBLAS
    a2, b2 = _operands(256, 256, 512, False, 8)
    a2 = Fp8Tensor(a2.data[:200].contiguous(), a2.scale[:200], "tile", "e4m3")
    assert not cutlass_blockwise.serves(a2.data, b2.data)
    # nor an operand starting off a 16-byte boundary (TMA cannot read it)
    buf = torch.empty(256 * 512 + 8, dtype=torch.float8_e4m3fn, device="cuda")
    odd = buf[8:].view(256, 512)
    odd.copy_(a.data)
    assert odd.data_ptr() % 16 and torch.equal(odd.float(), a.data.float())
    assert not cutlass_blockwise.serves(odd, b.data)


def test_refusals(ext):
    a, b = _operands(256, 256, 512, False, 9)
    sa, sb = _colmajor(a.scale), _colmajor(b.scale)
    with pytest.raises(RuntimeError, match="column-major"):
        ext.gemm(a.data, a.scale.contiguous(), b.data, sb, False, 0)
    with pytest.raises(RuntimeError, match="multiples of 128"):
        ext.gemm(a.data[:100].contiguous(), sa[:100], b.data, sb, False, 0)
    with pytest.raises(RuntimeError, match="config"):
        ext.gemm(a.data, sa, b.data, sb, False, 9)
