"""The DeepGEMM blockwise GEMM route's host side (r1mega/ops/deepgemm_blockwise.py): the switch's
values and error, and that the route never claims a product it cannot run (the GPU tests run the
kernel: tests/gpu/test_fp8_blockwise_deepgemm_gpu.py)."""
from __future__ import annotations

import pytest
import torch


def test_switch_and_refusals(monkeypatch):
    from r1mega.ops import deepgemm_blockwise as dg

    assert dg.choice() == "auto"
    a, b = torch.zeros(128, 256, dtype=torch.float8_e4m3fn), torch.zeros(128, 256, dtype=torch.float8_e4m3fn)
    assert not dg.serves(a, b, True)               # the default
    monkeypatch.setenv("R1MEGA_FP8_BLOCKWISE_GEMM", "deepgemm")
    assert not dg.serves(a, b, True)               # no GPU: cuBLAS's (or the emulation's) route
    assert not dg.serves(a, b, False)              # wgrad's tiles x tiles: never
    monkeypatch.setenv("R1MEGA_FP8_BLOCKWISE_GEMM", "cutlass")
    with pytest.raises(ValueError, match="R1MEGA_FP8_BLOCKWISE_GEMM='cutlass'.*'auto'.*'cublas'.*'deepgemm'"):
        dg.choice()


def test_a_missing_package_is_reported_not_raised(monkeypatch):
    import builtins

    from r1mega.ops import deepgemm_blockwise as dg

    real = builtins.__import__

    def no_deep_gemm(name, *args, **kwargs):
        if name == "deep_gemm":
            raise ImportError("No module named 'deep_gemm'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(dg, "_STATE", {})
    monkeypatch.setattr(builtins, "__import__", no_deep_gemm)
    assert dg.get() is None and "deep_gemm" in dg.load_error()


def test_a_deep_gemm_without_the_kernels_is_not_used(monkeypatch):
    import sys
    import types

    from r1mega.ops import deepgemm_blockwise as dg

    stub = types.ModuleType("deep_gemm")
    stub.__version__ = "1.0.0"
    monkeypatch.setitem(sys.modules, "deep_gemm", stub)
    monkeypatch.setattr(dg, "_STATE", {})
    assert dg.get() is None and "1.0.0 has no fp8_gemm_nt" in dg.load_error()


def test_the_sweeps_gemms_are_the_linears_three_products():
    """tools/blockwise_*_sweep.py time these: each linear's forward (tokens x out x in), dgrad
    (tokens x in x out) and wgrad (out x in x tokens), the weights being the model's own."""
    from r1mega.bench.shapes import GEMM_HEAVY, linear_gemms

    # (out, in) of the gemm-heavy layer's linears: 32 query heads and 2 x 8 KV heads of 128
    weights = {"qkv": (4096 + 2 * 8 * 128, 4096), "o_proj": (4096, 4096), "fc1": (2 * 14336, 4096),
               "fc2": (4096, 14336)}
    want = []
    for name, (out, inp) in weights.items():
        want += [(f"{name} fwd", 16384, out, inp, True), (f"{name} dgrad", 16384, inp, out, True),
                 (f"{name} wgrad", out, inp, 16384, False)]
    assert list(linear_gemms(GEMM_HEAVY, 16384)) == want
