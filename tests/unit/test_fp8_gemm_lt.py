"""r1mega/precision/fp8_gemm_lt.py on the CPU: the choice among timed algorithms, the switch, and
that nothing off CUDA reaches the op (tests/gpu/test_fp8_gemm_lt_gpu.py holds the kernels to
float64 and to torch's scaled matmul)."""
from __future__ import annotations

import importlib

import pytest
import torch

from r1mega.precision import fp8_gemm_lt
from r1mega.precision.gemm import fp8_gemm
from r1mega.precision.quantize import quantize_reference


def test_fastest_algorithm_must_beat_torchs_kernel():
    assert fp8_gemm_lt.fastest({"torch": 7.4, 0: 8.0, 1: 5.1, 2: 6.0}) == 1
    assert fp8_gemm_lt.fastest({"torch": 5.0, 0: 5.0, 1: 6.0}) is None  # a tie keeps torch's
    assert fp8_gemm_lt.fastest({"torch": 5.0}) is None                  # no algorithm ran
    assert fp8_gemm_lt.fastest({0: 3.0, 1: 2.0}) == 1                    # torch's not timed


def test_switch_is_off_by_default_and_validated(monkeypatch):
    assert fp8_gemm_lt.ENABLED is False
    monkeypatch.setenv("R1MEGA_FP8_GEMM_LT", "yes")
    with pytest.raises(ValueError, match="R1MEGA_FP8_GEMM_LT='yes'"):
        importlib.reload(fp8_gemm_lt)
    monkeypatch.setenv("R1MEGA_FP8_GEMM_LT", "1")
    importlib.reload(fp8_gemm_lt)
    assert fp8_gemm_lt.ENABLED is True
    monkeypatch.delenv("R1MEGA_FP8_GEMM_LT")
    importlib.reload(fp8_gemm_lt)
    assert fp8_gemm_lt.ENABLED is False


def test_cpu_operands_never_reach_the_op(monkeypatch):
    """Switched on, a CPU product still takes torch's scaled matmul (the op would need cuBLASLt):
    the result equals the one with the switch off, and the op is never called."""
    calls = []
    monkeypatch.setattr(torch.ops.r1mega, "fp8_gemm_lt", lambda *a: calls.append(a), raising=False)
    g = torch.Generator().manual_seed(0)
    a = quantize_reference(torch.randn(32, 64, generator=g), "tensor")
    w = quantize_reference(torch.randn(48, 64, generator=g), "tensor")
    off = fp8_gemm(a, w, torch.float32, emulate=True, fast_accum=True)
    with fp8_gemm_lt.enabled():
        assert fp8_gemm_lt.ENABLED and not fp8_gemm_lt.serves(a.data, w.data)
        on = fp8_gemm(a, w, torch.float32, emulate=True, fast_accum=True)
    assert not fp8_gemm_lt.ENABLED and not calls and torch.equal(on, off)


def test_serves_only_aligned_decode_sized_shapes():
    """The shape rules (checked on meta tensors standing in for CUDA ones)."""
    class Cuda:  # a meta tensor reporting CUDA: shapes and strides only, as under tracing
        def __init__(self, *shape):
            self.t = torch.empty(*shape, dtype=torch.float8_e4m3fn, device="meta")
            self.is_cuda, self.dtype, self.shape = True, self.t.dtype, self.t.shape

        def stride(self, i):
            return self.t.stride(i)

    with fp8_gemm_lt.enabled():
        assert fp8_gemm_lt.serves(Cuda(256, 2048), Cuda(3072, 2048))
        assert not fp8_gemm_lt.serves(Cuda(4096, 2048), Cuda(3072, 2048))  # prefill-sized
        assert not fp8_gemm_lt.serves(Cuda(256, 2040), Cuda(3072, 2040))   # K not a multiple of 16
        assert not fp8_gemm_lt.serves(Cuda(256, 2048), Cuda(3000, 2048))   # N not a multiple of 16
    assert not fp8_gemm_lt.serves(Cuda(256, 2048), Cuda(3072, 2048))       # switched off
