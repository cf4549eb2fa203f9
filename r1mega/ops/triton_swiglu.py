"""SwiGLU of ``rollout.exact`` on CUDA: one Triton kernel forward, one backward, batch-invariant.

megatron's fused SwiGLU is ``torch.compile``'d (inductor kernels outside the exact mode, whose
rounding could follow the fusion inductor picks for a shape), so the exact mode used to run the
unfused path: ``chunk``, ``silu``, ``+ offset``, ``mul`` forward and autograd's ``mul``s,
``silu_backward`` and ``cat`` backward, each a pass over the (tokens, 2F) activations. Here:

- forward ``y (..., 2F) -> (..., F)``: gate = first half, up = second half (megatron's
  ``torch.chunk(y, 2, -1)``), ``silu(gate) * up`` computed in float32 and rounded once;
- backward ``dy (..., F), y -> dy_gate_up (..., 2F)`` in one pass writing both halves (no cat);
  only ``y`` is saved.

Each output element is a fixed formula of its own inputs: the program grid (rows x column
blocks) decides which program computes an element, never how. So a token's bits are the same
in a one-row decode step and in a packed training micro-batch, and the rollout and the trainer
share the kernel through the same MLP modules (r1mega/ops/exact_mlp.py wires it). FP
contraction is off (``enable_fp_fusion=False``) and the one division is ``div_rn``, so the
compiler cannot change the rounding between builds of the two sides; ``tl.exp`` is the
hardware approximation, the same instruction wherever this kernel runs.

:func:`swiglu_reference` is the PyTorch path (megatron's unfused ``glu``), used off CUDA;
tests/unit/test_triton_swiglu.py checks the kernels under Triton's interpreter against float64
autograd and their row invariance; tests/gpu/test_exact_gpu.py does the same on the GPU.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False

BLOCK_F = 1024  # columns of one half per program (any value gives the same bits)
NUM_WARPS = 4
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def swiglu_reference(y: torch.Tensor) -> torch.Tensor:
    """(..., 2F) -> (..., F): silu(first half) * second half, as megatron's unfused ``glu``."""
    gate, up = torch.chunk(y, 2, dim=-1)
    return F.silu(gate) * up


def supported(y: torch.Tensor) -> bool:
    """The kernels run on CUDA tensors of a 16/32-bit float dtype with an even last dim."""
    return HAVE_TRITON and y.is_cuda and y.dtype in _DTYPES and y.shape[-1] % 2 == 0


if HAVE_TRITON:

    @triton.jit
    def _sigmoid(g):
        # 1 / (1 + e^-g): e^-g overflows to inf for g < -88, giving exactly 0 (silu -> -0).
        return tl.math.div_rn(tl.full(g.shape, 1.0, tl.float32), 1.0 + tl.exp(-g))

    @triton.jit
    def _swiglu_fwd_kernel(Y, OUT, F_HALF, stride_y, stride_o, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F_HALF
        g = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(Y + row * stride_y + F_HALF + cols, mask=mask, other=0.0).to(tl.float32)
        out = (g * _sigmoid(g)) * u
        tl.store(OUT + row * stride_o + cols, out.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(DOUT, Y, DY, ACT, F_HALF, stride_do, stride_y, stride_dy, stride_act,
                           BLOCK: tl.constexpr, WRITE_ACT: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F_HALF
        g = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(Y + row * stride_y + F_HALF + cols, mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DOUT + row * stride_do + cols, mask=mask, other=0.0).to(tl.float32)
        s = _sigmoid(g)
        # d silu(g)/dg = s (1 + g (1 - s)), the formula of megatron's fused swiglu_back.
        d_gate = (do * u) * (s * (1.0 + g * (1.0 - s)))
        d_up = do * (g * s)
        base = DY + row * stride_dy
        tl.store(base + cols, d_gate.to(DY.dtype.element_ty), mask=mask)
        tl.store(base + F_HALF + cols, d_up.to(DY.dtype.element_ty), mask=mask)
        if WRITE_ACT:  # the forward's output too, the forward kernel's formula: the same bits
            tl.store(ACT + row * stride_act + cols, ((g * s) * u).to(ACT.dtype.element_ty),
                     mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., W) -> (rows, W) with unit column stride (a view where it can be)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _grid(rows: int, f_half: int) -> tuple[int, int]:
    return rows, triton.cdiv(f_half, BLOCK_F)


def _out(out: Optional[torch.Tensor], shape, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or not out.is_contiguous():
        raise ValueError(f"swiglu: out is {tuple(out.shape)} {out.dtype}; expected a contiguous "
                         f"{tuple(shape)} {like.dtype} tensor")
    return out


def swiglu_forward(y: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(..., 2F) -> (..., F) in y's dtype (the Triton kernel; no autograd). ``out``: an
    optional contiguous (rows, F) buffer to write (the tests poison it first)."""
    f_half = y.shape[-1] // 2
    y2 = _rows(y)
    out = _out(out, (y2.shape[0], f_half), y)
    if out.numel():
        _swiglu_fwd_kernel[_grid(y2.shape[0], f_half)](
            y2, out, f_half, y2.stride(0), out.stride(0), BLOCK=BLOCK_F,
            num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out.view(*y.shape[:-1], f_half)


def _backward(dout: torch.Tensor, y: torch.Tensor, out: Optional[torch.Tensor],
              with_output: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    f_half = y.shape[-1] // 2
    if dout.shape[-1] != f_half or dout.numel() * 2 != y.numel():
        raise ValueError(f"swiglu backward: gradient of shape {tuple(dout.shape)} does not match "
                         f"the saved input {tuple(y.shape)} (expected (..., {f_half}))")
    y2 = _rows(y)
    do2 = _rows(dout)
    dy = _out(out, tuple(y2.shape), y)
    act = torch.empty((y2.shape[0], f_half), dtype=y.dtype, device=y.device) if with_output else None
    if dy.numel():
        _swiglu_bwd_kernel[_grid(y2.shape[0], f_half)](
            do2, y2, dy, dy if act is None else act, f_half, do2.stride(0), y2.stride(0),
            dy.stride(0), 0 if act is None else act.stride(0), BLOCK=BLOCK_F,
            WRITE_ACT=with_output, num_warps=NUM_WARPS, enable_fp_fusion=False)
    return dy.view(y.shape), None if act is None else act.view(*y.shape[:-1], f_half)


def swiglu_backward(dout: torch.Tensor, y: torch.Tensor,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dout (..., F), y (..., 2F) -> d y (..., 2F) in y's dtype, both halves in one pass;
    ``out`` as in :func:`swiglu_forward`, (rows, 2F)."""
    return _backward(dout, y, out, with_output=False)[0]


def swiglu_backward_with_output(dout: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`swiglu_backward` that also returns the forward's output (..., F), bit for bit
    :func:`swiglu_forward`'s, from the same pass: for a backward that needs both (the MoE
    experts' down projection takes the output for its weight gradient)."""
    return _backward(dout, y, None, with_output=True)


class SwiGLUFunction(torch.autograd.Function):
    """Autograd around the two kernels; saves only the input (the output is recomputed in the
    backward's registers, not stored)."""

    @staticmethod
    def forward(ctx, y):
        ctx.save_for_backward(y)
        return swiglu_forward(y)

    @staticmethod
    def backward(ctx, dout):
        (y,) = ctx.saved_tensors
        return swiglu_backward(dout, y)


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """(..., 2F) -> (..., F): the fused kernels where :func:`supported`, else the reference."""
    if y.shape[-1] % 2:
        raise ValueError(f"swiglu: last dim {y.shape[-1]} of the fc1 output is odd; it must hold "
                         f"the gate and up halves (gated_linear_unit=True)")
    if supported(y):
        return SwiGLUFunction.apply(y)
    return swiglu_reference(y)
