"""One-pass FP8 row quantisers for the FP8 rollout's GEMMs whose input no compiled kernel quantises.

In the compiled decode step inductor folds the row quantiser of the qkv and fc1 inputs into the
RMSNorm kernel that makes them. Two inputs have no such home:

  linear_proj  x comes from the paged attention kernel (an opaque op): inductor split the row
               amax and the quantise into a reduction and a pointwise kernel per layer.
  linear_fc2   x is SwiGLU of fc1's output: one reduction kernel that computed SwiGLU twice
               (for the row's amax, then to quantise it).

The eager prefill has no compiled kernels at all, so every row-scaled input of it comes here.

Here one program holds a row (R1MEGA_FP8_ROWS_MULTI=1: in a prefill's calls several) in
registers: it reads the row once (for fc2, the row's gate and up halves, and applies SwiGLU
first), takes the row's amax, and writes the e4m3 row and its dequantisation scale. The scale
arithmetic is :func:`r1mega.precision.quantize.quantize_reference`'s (the shared helpers of
r1mega/precision/triton_quant.py), so ``fp8_rows(x)`` equals ``quantize_reference(x, "row", ...)``
bit for bit, and ``fp8_rows(y, swiglu=True)`` equals it on
``r1mega.ops.triton_swiglu.swiglu_forward(y)`` (that kernel's formula and rounding, FP
contraction off in both; on a GPU up to its sigmoid's last bit, see the kernel). Rows are padded
to a multiple of ``pad`` with zero rows (scale 1): cuBLAS's FP8 kernels want M a multiple of 16.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from r1mega import switches
from r1mega.precision.quantize import FP8_DTYPES, FP8_MAX, Fp8Tensor

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False

MAX_COLS = 16384  # one row in registers: beyond this the rollout keeps the other quantisers


def supported(x: torch.Tensor, swiglu: bool) -> bool:
    """Whether :func:`fp8_rows` takes ``x`` (rows, C) (rows, 2C with ``swiglu``) on this device."""
    cols = x.shape[-1] // 2 if swiglu else x.shape[-1]
    runs_here = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return (HAVE_TRITON and runs_here and x.dim() == 2 and x.stride(-1) == 1
            and x.dtype in (torch.bfloat16, torch.float16) and 0 < cols <= MAX_COLS
            and (not swiglu or x.shape[-1] % 2 == 0))


if HAVE_TRITON:
    from r1mega.precision.triton_quant import _abs_bits, _multiplier, _round_e4m3

    @triton.jit
    def _fp8_rows_kernel(X, Q, S, IN_S, R, RP, C, stride_x, stride_q, BLOCK_C: tl.constexpr,
                         ROWS: tl.constexpr, FMAX: tl.constexpr, POWER2: tl.constexpr,
                         SWIGLU: tl.constexpr, HAS_IN_S: tl.constexpr, ROUND_BITS: tl.constexpr):
        row0 = tl.program_id(0).to(tl.int64) * ROWS
        rows = row0 + tl.arange(0, ROWS)[:, None]                          # (ROWS, 1)
        cols = tl.arange(0, BLOCK_C)[None, :]                              # (1, BLOCK_C)
        m = (cols < C) & (rows < R)  # rows past R are the padding: zeros, scale 1
        if SWIGLU:
            g = tl.load(X + rows * stride_x + cols, mask=m, other=0.0).to(tl.float32)
            u = tl.load(X + rows * stride_x + C + cols, mask=m, other=0.0).to(tl.float32)
            if HAS_IN_S:  # each row's power-of-two scale from the GEMM that made x: exact
                s_in = tl.load(IN_S + rows, mask=rows < R, other=1.0)          # (ROWS, 1)
                g = g * s_in
                u = u * s_in
            # triton_swiglu's formula, rounded to the activation dtype as its output is, but
            # for its correctly rounded division: an approximate one here (the IEEE division
            # made this kernel compute-bound). The interpreter divides exactly, so there it is
            # triton_swiglu's result to the bit.
            sig = 1.0 / (1.0 + tl.exp(-g))
            v = ((g * sig) * u).to(X.dtype.element_ty).to(tl.float32)
        else:
            v = tl.load(X + rows * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        amax = tl.max(_abs_bits(v), axis=1).to(tl.float32, bitcast=True)   # (ROWS,)
        mult = _multiplier(amax, FMAX, POWER2)
        v = v * mult[:, None]
        v = tl.where(v < -FMAX, -FMAX, tl.where(v > FMAX, FMAX, v))
        if ROUND_BITS:
            # onto the e4m3 grid before the cast (exact then): Triton's interpreter mis-rounds
            # the cast itself near a binade's top; the GPU's cast rounds to nearest even
            v = tl.where(v == v, _round_e4m3(v), v)  # a NaN row stays NaN
        tl.store(Q + rows * stride_q + cols, v.to(Q.dtype.element_ty), mask=(cols < C) & (rows < RP))
        scale = tl.math.div_rn(tl.zeros_like(mult) + 1.0, mult)
        out_rows = row0 + tl.arange(0, ROWS)
        tl.store(S + out_rows, scale, mask=out_rows < RP)


def _warps(block_c: int) -> int:
    return 4 if block_c <= 2048 else 8 if block_c <= 8192 else 16


# With MULTI_ROW, from this many rows (a prefill's calls; a decode step's are a few hundred) a
# program takes several rows, ~8,192 values, instead of one (a row of a few KB is little work for a
# program; the prefill's calls ran at about half their bytes floor). Off until a GPU has timed it.
MULTI_ROW = switches.flag("R1MEGA_FP8_ROWS_MULTI", False,
                          "the row quantiser takes several rows a program in prefill-sized calls")
MULTI_ROW_FROM = 4096


def rows_per_program(rows: int, block_c: int) -> int:
    """Rows one program quantises: 1 below MULTI_ROW_FROM (or with the switch off), else a power
    of two up to 16 (it divides the padded row count, a multiple of 16)."""
    if not MULTI_ROW or rows < MULTI_ROW_FROM:
        return 1
    return max(1, min(16, 8192 // block_c))


def fp8_rows_triton(x: torch.Tensor, power2: bool, swiglu: bool = False, pad: int = 16,
                    fmt: str = "e4m3", in_scale: Optional[torch.Tensor] = None,
                    rows: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, C) -> (FP8 data (R', C), float32 scales (R', 1)), R' = R rounded up to ``pad``;
    ``swiglu``: x is (R, 2C), [gate | up], quantised as silu(gate) * up; ``in_scale``: with
    ``swiglu``, (>= R, 1) power-of-two scales x's rows are multiplied by first (the row scales
    of the FP8 GEMM that made x, not yet applied: exact, so the result is that of the scaled x);
    ``rows``: rows a program takes (None: :func:`rows_per_program`; tests force others)."""
    if in_scale is not None and (not swiglu or in_scale.dtype != torch.float32
                                 or in_scale.shape[0] < x.shape[0] or in_scale.numel() != in_scale.shape[0]):
        raise ValueError(f"fp8_rows: in_scale goes with swiglu, float32 (rows, 1); got "
                         f"{None if in_scale is None else (tuple(in_scale.shape), in_scale.dtype)}")
    if not supported(x, swiglu):
        raise ValueError(f"fp8_rows: needs Triton and a CUDA bf16/fp16 matrix with unit column "
                         f"stride and at most {MAX_COLS} columns; got {tuple(x.shape)} {x.dtype} "
                         f"on {x.device}")
    r = x.shape[0]
    c = x.shape[1] // 2 if swiglu else x.shape[1]
    rp = -(-r // pad) * pad
    q = torch.empty(rp, c, dtype=FP8_DTYPES[fmt], device=x.device)
    s = torch.empty(rp, 1, dtype=torch.float32, device=x.device)
    if rp:
        block_c = triton.next_power_of_2(c)
        per = rows or rows_per_program(rp, block_c)
        s_in = s if in_scale is None else in_scale.reshape(-1).contiguous()
        _fp8_rows_kernel[(triton.cdiv(rp, per),)](
            x, q, s, s_in, r, rp, c, x.stride(0), q.stride(0), BLOCK_C=block_c, ROWS=per,
            FMAX=FP8_MAX[fmt], POWER2=power2, SWIGLU=swiglu, HAS_IN_S=in_scale is not None,
            ROUND_BITS=os.environ.get("TRITON_INTERPRET") == "1",
            num_warps=_warps(per * block_c), enable_fp_fusion=False)
    return q, s


# Opaque to dynamo: the compiled decode step launches this kernel where inductor would have made
# two of its own.
@torch.library.custom_op("r1mega::fp8_rows", mutates_args=())
def fp8_rows_op(x: torch.Tensor, power2: bool, swiglu: bool, pad: int,
                in_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    return fp8_rows_triton(x.contiguous() if x.stride(-1) != 1 else x, power2, swiglu, pad,
                           in_scale=in_scale)


@fp8_rows_op.register_fake
def _(x, power2, swiglu, pad, in_scale=None):
    rp = -(-x.shape[0] // pad) * pad
    c = x.shape[1] // 2 if swiglu else x.shape[1]
    return (x.new_empty((rp, c), dtype=FP8_DTYPES["e4m3"]),
            x.new_empty((rp, 1), dtype=torch.float32))


def fp8_rows(x: torch.Tensor, power2: bool, swiglu: bool = False, pad: int = 16,
             in_scale: Optional[torch.Tensor] = None) -> Fp8Tensor:
    """Row-quantised e4m3 ``x`` (or SwiGLU of it), rows padded to ``pad`` (the op above)."""
    q, s = torch.ops.r1mega.fp8_rows(x, power2, swiglu, pad, in_scale)
    return Fp8Tensor(q, s, "row", "e4m3")
