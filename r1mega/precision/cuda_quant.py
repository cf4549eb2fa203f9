"""The CUDA FP8 dual quantiser (csrc/fp8_quant*, extension ``r1mega_fp8_cuda``): x and x.T in FP8
from one read, for contiguous 16-bit matrices whose sides are multiples of 16 (the FP8 linear's
activations and output gradients, tokens padded to 16).

The same result as :func:`r1mega.precision.quantize.quantize_reference` of x and of x.T, bit for
bit (``tests/gpu/test_fp8_quant_cuda_gpu.py``), as the Triton kernel's ``quantize_dual_triton``.
Which of the two ``quantize_dual`` runs on CUDA is ``R1MEGA_FP8_QUANT`` (``triton``, the default
until a GPU has timed this kernel against it; ``cuda``); an input this kernel does not take goes
to Triton. ``R1MEGA_FP8_JIT=0`` forbids the just-in-time build.
"""
from __future__ import annotations

from typing import Optional

import torch

from r1mega import switches
from r1mega.ops.extension import CudaExtension
from r1mega.precision import triton_quant
from r1mega.precision.quantize import Fp8Tensor, _check_given_amax

_EXT = CudaExtension("r1mega_fp8_cuda", ["fp8_quant.cpp", "fp8_quant_kernel.cu"], "R1MEGA_FP8",
                     ["-lineinfo"], "the FP8 dual quantiser uses Triton")
SOURCES = _EXT.sources
get, load_error = _EXT.get, _EXT.load_error
_GRAN_CODE = {"tensor": 0, "tile": 1, "block": 2}


def dual_impl() -> str:
    """``R1MEGA_FP8_QUANT``: the CUDA kernel or Triton's for ``quantize_dual`` on CUDA (read at
    each call, so that a bench row may set it)."""
    return switches.choice("R1MEGA_FP8_QUANT", "triton", {
        "triton": "the Triton dual quantiser",
        "cuda": "csrc/fp8_quant_kernel.cu where the input allows, else Triton"})


# Read once at import too: a bad value fails the run's start, not its first FP8 step
dual_impl(), triton_quant.persistent_launch()


def why_not(x: torch.Tensor, granularity: str) -> Optional[str]:
    """None when the CUDA kernel takes ``x`` at ``granularity``, else the reason."""
    if granularity not in _GRAN_CODE:
        return f"granularity {granularity!r} is not tensor, tile or block"
    if not x.is_cuda:
        return f"x is on {x.device}, not a CUDA device"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"x is {x.dtype}; the kernel reads bfloat16 or float16"
    if x.dim() != 2 or not x.is_contiguous():
        return f"x must be a contiguous 2-D matrix (shape {tuple(x.shape)}, strides {x.stride()})"
    r, c = x.shape
    if r == 0 or c == 0 or r % 16 or c % 16:
        return f"x's sides {r} x {c} must be positive multiples of 16"
    if x.data_ptr() % 16:
        return "x's data is not 16-byte aligned"
    return None


def quantize_dual_cuda(x: torch.Tensor, granularity: str, fmt: str = "e4m3", power2: bool = False,
                       amax: Optional[torch.Tensor] = None,
                       out: Optional[tuple[Fp8Tensor, Fp8Tensor]] = None,
                       persistent: Optional[bool] = None) -> tuple[Fp8Tensor, Fp8Tensor]:
    """``(quantize(x), quantize(x.t()))`` by the CUDA kernel; ``amax``: tensorwise only, max |x|
    (computed here when not given); ``persistent``: the launch form (default the switch's).
    Raises with the reason when the kernel cannot run."""
    _check_given_amax(granularity, amax)
    reason = why_not(x, granularity)
    if reason is not None:
        raise ValueError(f"quantize_dual(impl='cuda'): {reason}")
    ext = get()
    if ext is None:
        raise RuntimeError(f"quantize_dual(impl='cuda'): r1mega_fp8_cuda is unavailable: {load_error()}")
    r, c = x.shape
    q, s = triton_quant.out_buffers(out[0] if out else None, r, c, granularity, fmt, x.device)
    qt, st = triton_quant.out_buffers(out[1] if out else None, c, r, granularity, fmt, x.device)
    if granularity == "tensor" and amax is None:
        amax = (triton_quant.tensor_amax(x) if triton_quant.available()
                else x.abs().amax().float().reshape(1))
    elif amax is not None:
        amax = amax.float().reshape(1).contiguous()
    ext.quant_dual(x, q, qt, s, st, amax, _GRAN_CODE[granularity], power2,
                   triton_quant.persistent_launch() if persistent is None else persistent)
    return Fp8Tensor(q, s, granularity, fmt), Fp8Tensor(qt, st, granularity, fmt)
