"""The FP8 GEMM ``out = a @ b.T`` on quantised operands: cuBLAS through torch, or emulated.

Both operands are row-major (rows, K) matrices quantised along K (r1mega/precision/quantize.py),
so every GEMM of a linear layer has this one form:
  forward  y  = x  @ w.T      a = x (tokens, in),   b = w (out, in)
  dgrad    dx = dy @ w        a = dy (tokens, out), b = w.T (in, out)
  wgrad    dw = dy.T @ x      a = dy.T (out, tokens), b = x.T (in, tokens)

cuBLAS wants ``mat_b`` column-major, which ``b.data.t()`` of a row-major (N, K) matrix is, and
the blockwise scales in the layouts torch's ``scaled_mm`` checks (torch/_meta_registrations.py,
``meta_scaled_mm_v2``):
  1x128  x 128x128  scale_a (M, K/128) strides (1, M); scale_b (L4, N/128) strides (1, L4),
                    L4 = K/128 rounded up to 4 (the padding rows are never read)
  1x128  x 1x128    scale_a (M, K/128) strides (1, M); scale_b (N, K/128) strides (1, N)
  rowwise           scale_a (M, 1), scale_b (1, N), contiguous
  tensorwise        one float32 each
  row x tensor      (the FP8 rollout's per-row activations on tensorwise weights) the tensorwise
                    kernel with a unit scale for a, then each output row times a's scale (decode
                    sizes); above ROWWISE_KERNEL_MIN_ROWS rows the rowwise kernel
Blockwise needs K and (128x128) N to be multiples of 128, the others multiples of 16; the FP8
linear pads the token dimension and checks the layer sizes at build time.

``emulate``: dequantise both to float32 and multiply: the CPU path, and the reference the GPU
tests hold cuBLAS to (same quantised inputs, so the only difference is accumulation order).
"""
from __future__ import annotations

import torch

from r1mega.precision.quantize import BLOCK, Fp8Tensor, dequantize
from r1mega.ops import deepgemm_blockwise
from r1mega.precision import fp8_gemm_lt, triton_skinny_gemm, wgmma_gemm


def _colmajor(s: torch.Tensor) -> torch.Tensor:
    """(R, T) scales with strides (1, R) (what the Triton quantiser already writes)."""
    r, t = s.shape
    if s.stride(0) == 1 and (s.stride(1) == r or t == 1):
        return s
    return s.t().contiguous().t()


def _block_scale_b(s: torch.Tensor) -> torch.Tensor:
    """128x128 scales of b, logical (N/128, K/128) -> (L4, N/128) with strides (1, L4)."""
    nb, kb = s.shape
    l4 = -(-kb // 4) * 4
    buf = torch.ones(nb, l4, dtype=torch.float32, device=s.device)
    buf[:, :kb] = s
    return buf.t()


# Above this many rows a row x tensor GEMM is a prefill's (eager), where no later kernel folds the
# row scales in: cuBLAS's rowwise kernel (a little under its tensorwise one at these sizes, issue
# #17's table) applies them instead of a pass over the output (not yet timed against that pass).
ROWWISE_KERNEL_MIN_ROWS = 2048

_UNIT: dict = {}


def _unit_scale(device: torch.device) -> torch.Tensor:
    """A float32 1 kept per device: a fresh one is a fill kernel in every captured decode GEMM."""
    one = _UNIT.get(device)
    if one is None:
        if torch.compiler.is_compiling():  # not stored from inside a graph (see unit_scale_ready)
            return torch.ones((), dtype=torch.float32, device=device)
        one = _UNIT[device] = torch.ones((), dtype=torch.float32, device=device)
    return one


def unit_scale_ready(device: torch.device) -> None:
    """Make the device's unit scale (and the split-K kernel's tile counters, and load the wgmma
    kernel's extension) before a decode step compiles, so the graph reads them."""
    _unit_scale(torch.device(device))
    if wgmma_gemm.ENABLED:
        wgmma_gemm.ready(device)
    if torch.device(device).type == "cuda" and triton_skinny_gemm.HAVE_TRITON:
        triton_skinny_gemm.counters_ready(device)


def alignment(a_gran: str, b_gran: str) -> int:
    """Multiple of which K (and N) must be for cuBLAS's kernels of this scaling pair."""
    return BLOCK if "tile" in (a_gran, b_gran) or "block" in (a_gran, b_gran) else 16


def emulated_gemm(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """(M, K) x (N, K) -> (M, N): float32 matmul of the dequantised operands."""
    return (dequantize(a) @ dequantize(b).t()).to(out_dtype)


def scaled_gemm(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype,
                fast_accum: bool = False) -> torch.Tensor:
    """(M, K) x (N, K) -> (M, N) through torch's FP8 scaled matmul (cuBLAS)."""
    (m, k), (n, k2) = a.shape, b.shape
    if k != k2:
        raise ValueError(f"fp8 gemm: contraction sizes differ, a {tuple(a.shape)} b {tuple(b.shape)}")
    align = alignment(a.granularity, b.granularity)
    if k % align or (b.granularity == "block" and n % BLOCK) or (align == 16 and n % 16):
        raise ValueError(f"fp8 gemm ({a.granularity} x {b.granularity}): K={k} and N={n} must be "
                         f"multiples of {align} for cuBLAS; pad the operands (the FP8 linear "
                         f"pads tokens) or use sizes that divide.")
    pair = (a.granularity, b.granularity)
    mat_a, mat_b = a.data, b.data.t()
    if pair == ("tensor", "tensor"):
        if fast_accum and fp8_gemm_lt.serves(a.data, b.data):
            return torch.ops.r1mega.fp8_gemm_lt(a.data, a.scale.reshape(()), b.data, b.scale.reshape(()),
                                                out_dtype)
        return torch._scaled_mm(mat_a, mat_b, scale_a=a.scale.reshape(()), scale_b=b.scale.reshape(()),
                                out_dtype=out_dtype, use_fast_accum=fast_accum)
    if pair == ("row", "tensor"):
        # cuBLAS's tensorwise kernels (faster at decode sizes than its rowwise ones) and x's row
        # scales on the output: with power-of-two row scales that product rounds nowhere, so the
        # result is what a GEMM scaling x by rows would round to.
        if m > ROWWISE_KERNEL_MIN_ROWS:
            # a prefill-sized GEMM runs eagerly: no later kernel would fold the row scales in,
            # so cuBLAS's rowwise kernel applies them, the weight's one scale as a column vector
            return torch._scaled_mm(mat_a, mat_b, scale_a=a.scale.reshape(m, 1).contiguous(),
                                    scale_b=b.scale.reshape(1, 1).expand(1, n).contiguous(),
                                    out_dtype=out_dtype, use_fast_accum=fast_accum)
        if fast_accum and wgmma_gemm.serves(a.data, b.data, out_dtype, a.scale):
            return torch.ops.r1mega.fp8_wgmma_gemm(a.data, b.data, b.scale, out_dtype, a.scale)
        if fast_accum and triton_skinny_gemm.serves(a.data, b.data):
            return torch.ops.r1mega.fp8_skinny_gemm(a.data, b.data, b.scale, out_dtype, a.scale)
        y = row_tensor_gemm_unscaled(a, b, out_dtype, fast_accum)
        return (y.float() * a.scale.reshape(m, 1)).to(out_dtype)
    if pair == ("tile", "tensor"):
        # 1 x 128 tiles of a on tensorwise weights (the attention kernel's per-head output
        # scales): no cuBLAS kernel scales this pair; the split-K kernel promotes each K block
        why = triton_skinny_gemm.why_not(a.data, b.data)
        if why is not None or b.scale.numel() != 1:
            raise ValueError(f"fp8 gemm (tile x tensor): only the split-K Triton kernel takes this "
                             f"pair, and not here: {why or 'the weight has more than one scale'}")
        return torch.ops.r1mega.fp8_skinny_gemm(a.data, b.data, b.scale, out_dtype, a.scale)
    if pair == ("row", "row"):
        return torch._scaled_mm(mat_a, mat_b, scale_a=a.scale.reshape(m, 1).contiguous(),
                                scale_b=b.scale.reshape(1, n).contiguous(), out_dtype=out_dtype,
                                use_fast_accum=fast_accum)
    if pair not in (("tile", "block"), ("tile", "tile")):
        raise ValueError(f"fp8 gemm: no cuBLAS kernel for scaling {pair}")
    b_block = pair[1] == "block"
    if torch.compiler.is_compiling():
        # torch 2.11's dynamo cannot trace _scaled_mm_v2 (scaled_mm's blockwise entry): it broke
        # the FP8 rollout's compiled decode graph. As an opaque op the graph holds.
        return torch.ops.r1mega.scaled_mm_blockwise(a.data, a.scale, b.data, b.scale, b_block,
                                                    out_dtype)
    return _blockwise_mm(a.data, a.scale, b.data, b.scale, b_block, out_dtype)


def row_tensor_gemm_unscaled(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype,
                             fast_accum: bool = False) -> torch.Tensor:
    """(M, K) row-scaled x (N, K) tensorwise -> (M, N) *before* a's row scales: the tensorwise
    kernel with a unit scale for a. The caller applies ``a.scale`` (a consumer that reads the
    rows anyway, as the FP8 rollout's SwiGLU quantiser does)."""
    if fast_accum and wgmma_gemm.serves(a.data, b.data, out_dtype):
        return torch.ops.r1mega.fp8_wgmma_gemm(a.data, b.data, b.scale, out_dtype)
    if fast_accum and triton_skinny_gemm.serves(a.data, b.data):
        return torch.ops.r1mega.fp8_skinny_gemm(a.data, b.data, b.scale, out_dtype)
    if fast_accum and fp8_gemm_lt.serves(a.data, b.data):
        return torch.ops.r1mega.fp8_gemm_lt(a.data, _unit_scale(b.scale.device), b.data,
                                            b.scale.reshape(()), out_dtype)
    return torch._scaled_mm(a.data, b.data.t(), scale_a=_unit_scale(b.scale.device),
                            scale_b=b.scale.reshape(()), out_dtype=out_dtype, use_fast_accum=fast_accum)


def _blockwise_mm(a_data: torch.Tensor, a_scale: torch.Tensor, b_data: torch.Tensor,
                  b_scale: torch.Tensor, b_block: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """(M, K) 1x128-tile operand x (N, K) 128x128-block (or 1x128-tile) operand, row-major data and
    logical scales of any strides -> (M, N) through ``torch.nn.functional.scaled_mm``, or
    DeepGEMM's kernel for tiles x blocks where deep_gemm imports (R1MEGA_FP8_BLOCKWISE_GEMM:
    r1mega/ops/deepgemm_blockwise.py)."""
    if deepgemm_blockwise.serves(a_data, b_data, b_block):
        return deepgemm_blockwise.blockwise_gemm(a_data, _colmajor(a_scale), b_data, b_scale, out_dtype)
    F = torch.nn.functional
    st, sw = F.ScalingType, F.SwizzleType
    if b_block:
        scale_b, recipe_b = _block_scale_b(b_scale), st.BlockWise128x128
    else:
        scale_b, recipe_b = _colmajor(b_scale), st.BlockWise1x128
    # No fast accumulation for blockwise: the per-128 scales are applied as partial sums are
    # promoted, which is the point of the recipe (DeepSeek-V3 section 3.3.2).
    return F.scaled_mm(a_data, b_data.t(), _colmajor(a_scale), st.BlockWise1x128, scale_b, recipe_b,
                       swizzle_a=sw.NO_SWIZZLE, swizzle_b=sw.NO_SWIZZLE, output_dtype=out_dtype)


# The op takes row-major data and logical scales and makes cuBLAS's layouts itself, so whatever
# strides inductor gives its inputs, the call is the eager one.
@torch.library.custom_op("r1mega::scaled_mm_blockwise", mutates_args=())
def _scaled_mm_blockwise_op(a_data: torch.Tensor, a_scale: torch.Tensor, b_data: torch.Tensor,
                            b_scale: torch.Tensor, b_block: bool,
                            out_dtype: torch.dtype) -> torch.Tensor:
    return _blockwise_mm(a_data.contiguous(), a_scale, b_data.contiguous(), b_scale, b_block,
                         out_dtype)


@_scaled_mm_blockwise_op.register_fake
def _(a_data, a_scale, b_data, b_scale, b_block, out_dtype):
    return a_data.new_empty((a_data.shape[0], b_data.shape[0]), dtype=out_dtype)


def fp8_gemm(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype, *, emulate: bool,
             fast_accum: bool = False) -> torch.Tensor:
    if emulate:
        return emulated_gemm(a, b, out_dtype)
    return scaled_gemm(a, b, out_dtype, fast_accum)
