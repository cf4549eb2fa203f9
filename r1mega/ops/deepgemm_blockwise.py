"""DeepGEMM's Hopper kernels for the blockwise FP8 recipe's forward and dgrad GEMMs: a (M, K)
with 1x128 tile scales times b (N, K) with 128x128 block scales, bf16 out (DeepGEMM's "1d2d"
kernel; DeepGEMM is DeepSeek's library for the scaling DeepSeek-V3 describes).

``R1MEGA_FP8_BLOCKWISE_GEMM`` picks who runs the recipe's GEMMs: ``auto`` (the default: DeepGEMM
where the optional ``deep_gemm`` package imports, cuBLAS otherwise), ``deepgemm`` (an error
where it does not import) or ``cublas`` (torch's scaled_mm). Products DeepGEMM cannot take (off
an sm_90 GPU, K not a multiple of 128, N not of 8, operands off a 16-byte boundary) go to cuBLAS
either way. The weight gradient (1x128 tiles on both operands) stays on cuBLAS: DeepGEMM's
kernel for it is no faster and adds into a float32 output, which a bf16 gradient would pay a
pass for. DeepGEMM compiles each kernel on first use (nvcc on the GPU machine) and caches it
(``DG_JIT_CACHE_DIR``).
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from r1mega import switches

_STATE: dict = {}


def choice() -> str:
    return switches.choice("R1MEGA_FP8_BLOCKWISE_GEMM", "auto", {
        "auto": "DeepGEMM where deep_gemm imports, else cuBLAS",
        "cublas": "torch.nn.functional.scaled_mm (cuBLAS)",
        "deepgemm": "DeepGEMM's kernels for the forward and dgrad (the deep_gemm package)"})


def get():
    """The ``deep_gemm`` module, or None where it does not import (its reason: :func:`load_error`)."""
    if "module" not in _STATE:
        try:
            module, error = importlib.import_module("deep_gemm"), None
        except Exception as exc:  # noqa: BLE001 - an absent or broken install: cuBLAS serves
            module, error = None, f"{type(exc).__name__}: {exc}"
        if module is not None and not hasattr(module, "fp8_gemm_nt"):
            # PyPI's deep_gemm 1.0.0 is an early, incomplete upload: the kernels come from the repository
            module, error = None, (f"deep_gemm {getattr(module, '__version__', '?')} has no fp8_gemm_nt "
                                   "(build DeepGEMM from github.com/deepseek-ai/DeepGEMM)")
        _STATE["module"], _STATE["error"] = module, error
    return _STATE["module"]


def load_error() -> Optional[str]:
    get()
    return _STATE["error"]


def serves(a_data: torch.Tensor, b_data: torch.Tensor, b_block: bool) -> bool:
    """Whether DeepGEMM takes this product: the switch not ``cublas``, a tiles x blocks product on
    an sm_90 device, K a multiple of 128, 16-byte-aligned operands (TMA reads them), the package
    present (``deepgemm`` without it is an error, not a silent cuBLAS); N a multiple of 8 (its
    bf16 output's TMA store)."""
    pick = choice()
    if pick == "cublas" or not b_block or not a_data.is_cuda:
        return False
    if torch.cuda.get_device_capability(a_data.device) != (9, 0):
        return False
    if get() is None:
        if pick == "deepgemm":
            raise RuntimeError(f"R1MEGA_FP8_BLOCKWISE_GEMM=deepgemm, but deep_gemm does not import "
                               f"({load_error()}); install DeepGEMM (github.com/deepseek-ai/DeepGEMM) "
                               "or unset the switch")
        return False
    k, n = a_data.shape[1], b_data.shape[0]
    aligned = a_data.data_ptr() % 16 == 0 and b_data.data_ptr() % 16 == 0
    return k % 128 == 0 and n % 8 == 0 and aligned


def blockwise_gemm(a_data: torch.Tensor, a_scale: torch.Tensor, b_data: torch.Tensor,
                   b_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """(M, K) e4m3 with (M, K/128) scales x (N, K) e4m3 with (N/128, K/128) scales -> (M, N)
    (bf16, cast after for another dtype). a's scales are best given with strides (1, M)
    (r1mega.precision.gemm._colmajor), which DeepGEMM takes without a copy."""
    m, n = a_data.shape[0], b_data.shape[0]
    y = torch.empty(m, n, dtype=torch.bfloat16, device=a_data.device)
    get().fp8_gemm_nt((a_data.contiguous(), a_scale), (b_data.contiguous(), b_scale.contiguous()), y)
    return y if out_dtype == torch.bfloat16 else y.to(out_dtype)
