"""Which dual quantiser runs (r1mega/precision/cuda_quant.py, quantize.quantize_dual): the
``R1MEGA_FP8_QUANT`` switch, the CUDA kernel's input conditions and their errors, and the CPU
path staying the reference whatever the switch says. (The kernel's bits: tests/gpu.)"""
from __future__ import annotations

import pytest
import torch

from r1mega.precision import cuda_quant, triton_quant
from r1mega.precision.quantize import quantize_dual, quantize_reference


def test_switch_rejects_an_unknown_value(monkeypatch):
    monkeypatch.setenv("R1MEGA_FP8_QUANT", "cutlass")
    with pytest.raises(ValueError, match="R1MEGA_FP8_QUANT='cutlass'.*'triton'.*'cuda'"):
        cuda_quant.dual_impl()
    monkeypatch.delenv("R1MEGA_FP8_QUANT")
    assert cuda_quant.dual_impl() == "triton"
    monkeypatch.setenv("R1MEGA_FP8_QUANT", "cuda")    # read at the call: a bench row may set it
    assert cuda_quant.dual_impl() == "cuda"


def test_persistent_launch_switch_is_read_at_the_call_and_checked(monkeypatch):
    monkeypatch.delenv("R1MEGA_FP8_QUANT_PERSISTENT", raising=False)
    assert triton_quant.persistent_launch() is False
    monkeypatch.setenv("R1MEGA_FP8_QUANT_PERSISTENT", "1")
    assert triton_quant.persistent_launch() is True
    monkeypatch.setenv("R1MEGA_FP8_QUANT_PERSISTENT", "yes")
    with pytest.raises(ValueError, match="R1MEGA_FP8_QUANT_PERSISTENT='yes'"):
        triton_quant.persistent_launch()


@pytest.mark.parametrize("x,gran,reason", [
    (torch.zeros(16, 16, dtype=torch.bfloat16), "row", "granularity 'row'"),
    (torch.zeros(16, 16, dtype=torch.bfloat16), "tile", "not a CUDA device"),
])
def test_why_not_names_the_condition(x, gran, reason):
    assert reason in cuda_quant.why_not(x, gran)


def test_why_not_checks_dtype_layout_and_sides(monkeypatch):
    # the device condition comes first; pretend x is on CUDA to reach the others
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    ok = torch.zeros(32, 48, dtype=torch.bfloat16)
    assert cuda_quant.why_not(ok, "tile") is None
    assert cuda_quant.why_not(ok.half(), "block") is None
    assert "float32" in cuda_quant.why_not(ok.float(), "tile")
    assert "contiguous" in cuda_quant.why_not(torch.zeros(48, 32, dtype=torch.bfloat16).t(), "tile")
    assert "multiples of 16" in cuda_quant.why_not(torch.zeros(33, 48, dtype=torch.bfloat16), "tile")
    assert "multiples of 16" in cuda_quant.why_not(torch.zeros(32, 40, dtype=torch.bfloat16), "tile")


def test_forcing_cuda_off_cuda_is_an_error_naming_why():
    with pytest.raises(ValueError, match="impl='cuda'.*not a CUDA device"):
        quantize_dual(torch.zeros(16, 16, dtype=torch.bfloat16), "tile", impl="cuda")
    with pytest.raises(ValueError, match="a given amax is one value"):
        cuda_quant.quantize_dual_cuda(torch.zeros(16, 16), "tile", amax=torch.ones(1))


@pytest.mark.parametrize("gran", ["tensor", "tile", "block"])
def test_cpu_path_is_the_reference_under_either_switch(gran, monkeypatch):
    x = (torch.randn(48, 272) * torch.logspace(-3, 3, 272)).bfloat16()
    for impl in ("triton", "cuda"):
        monkeypatch.setenv("R1MEGA_FP8_QUANT", impl)
        q, qt = quantize_dual(x, gran)
        for got, src in ((q, x), (qt, x.t())):
            ref = quantize_reference(src, gran)
            assert torch.equal(got.data.view(torch.uint8), ref.data.view(torch.uint8))
            assert torch.equal(got.scale, ref.scale)
