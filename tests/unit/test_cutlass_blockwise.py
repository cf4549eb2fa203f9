"""The CUTLASS blockwise GEMM route's host side (r1mega/ops/cutlass_blockwise.py): where the
headers are looked for, the switches' values and errors, and that the route never claims a
product off an sm_90 GPU (the GPU tests run the kernels: tests/gpu/test_fp8_blockwise_cutlass_gpu.py)."""
from __future__ import annotations

import pytest
import torch


def test_cutlass_headers_found_in_the_package_or_a_checkout(tmp_path, monkeypatch):
    from r1mega.ops.cuda_libs import cutlass_include_dirs

    monkeypatch.delenv("R1MEGA_CUTLASS_DIR", raising=False)
    assert cutlass_include_dirs([str(tmp_path)]) is None
    src = tmp_path / "site" / "cutlass_library" / "source"
    (src / "include" / "cutlass" / "detail").mkdir(parents=True)
    assert cutlass_include_dirs([str(tmp_path / "site")]) is None  # not a CUTLASS with blockwise scaling
    (src / "include" / "cutlass" / "detail" / "blockwise_scale_layout.hpp").write_text("")
    assert cutlass_include_dirs([str(tmp_path / "site")]) == [str(src / "include"),
                                                              str(src / "tools" / "util" / "include")]
    checkout = tmp_path / "cutlass"
    (checkout / "include" / "cutlass" / "detail").mkdir(parents=True)
    (checkout / "include" / "cutlass" / "detail" / "blockwise_scale_layout.hpp").write_text("")
    monkeypatch.setenv("R1MEGA_CUTLASS_DIR", str(checkout))
    assert cutlass_include_dirs([str(tmp_path / "site")])[0] == str(checkout / "include")


def test_switches_and_refusals(monkeypatch):
    from r1mega.ops import cutlass_blockwise as cb

    assert cb.choice() == "cublas" and cb.config() == 1
    a, b = torch.zeros(128, 256, dtype=torch.float8_e4m3fn), torch.zeros(128, 256, dtype=torch.float8_e4m3fn)
    assert not cb.serves(a, b)                      # the default
    monkeypatch.setenv("R1MEGA_FP8_BLOCKWISE_GEMM", "cutlass")
    assert not cb.serves(a, b)                      # no GPU: cuBLAS's (or the emulation's) route
    monkeypatch.setenv("R1MEGA_FP8_BLOCKWISE_GEMM", "deepgemm")
    with pytest.raises(ValueError, match="R1MEGA_FP8_BLOCKWISE_GEMM='deepgemm'.*'cublas'.*'cutlass'"):
        cb.choice()
    monkeypatch.setenv("R1MEGA_FP8_CUTLASS_CONFIG", "7")
    with pytest.raises(ValueError, match="R1MEGA_FP8_CUTLASS_CONFIG='7'"):
        cb.config()


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
