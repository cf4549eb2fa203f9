"""Row reductions of ``rollout.exact`` on CUDA: one program per row, one fixed reduction order.

A program reduces its own row with a tree fixed by the row length (``BLOCK``, the chunk loop),
never by the number of rows, so a token's RMSNorm or log-softmax sum is the same bits in a
decode step and in a packed training micro-batch. These replace the elementwise tree sums of
r1mega/ops/batch_invariant.py on CUDA (one kernel instead of a dozen per call); the tree
versions stay the CPU path. tests/gpu/test_exact_gpu.py checks the kernels against torch's
``F.rms_norm`` and a float64 ``log_softmax``, and their bits over subsets of rows.
"""
from __future__ import annotations

from typing import Optional

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False

VOCAB_CHUNK = 2048  # columns per step of the log-softmax kernels (fixed: part of the order)


def supported(x: torch.Tensor) -> bool:
    return HAVE_TRITON and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


if HAVE_TRITON:

    @triton.jit
    def _rms_norm_kernel(X, W, Y, N, stride_x, stride_y, eps,
                         HAS_W: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        ms = tl.sum(x * x, axis=0) / N
        y = (x * (1.0 / tl.sqrt(ms + eps))).to(Y.dtype.element_ty)
        if HAS_W:  # the weight in the input dtype, the product rounded once (as torch's bf16 mul)
            w = tl.load(W + cols, mask=mask, other=0.0).to(Y.dtype.element_ty).to(tl.float32)
            y = (y.to(tl.float32) * w).to(Y.dtype.element_ty)
        tl.store(Y + row * stride_y + cols, y, mask=mask)

    @triton.jit
    def _row_max_kernel(X, INV_T, OUT, V, VALID, stride_x, CHUNK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        inv_t = tl.load(INV_T + row)
        cols = tl.arange(0, CHUNK)
        best = tl.full([CHUNK], float("-inf"), tl.float32)
        for c0 in range(0, V, CHUNK):
            c = c0 + cols
            x = tl.load(X + row * stride_x + c, mask=c < V, other=float("-inf")).to(tl.float32)
            x = tl.where(c < VALID, x * inv_t, float("-inf"))
            best = tl.maximum(best, x)
        tl.store(OUT + row, tl.max(best, axis=0))

    @triton.jit
    def _row_sumexp_kernel(X, INV_T, M, OUT, V, VALID, stride_x, CHUNK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        inv_t = tl.load(INV_T + row)
        m = tl.load(M + row)
        cols = tl.arange(0, CHUNK)
        acc = tl.zeros([CHUNK], tl.float32)
        for c0 in range(0, V, CHUNK):
            c = c0 + cols
            x = tl.load(X + row * stride_x + c, mask=c < V, other=float("-inf")).to(tl.float32)
            x = tl.where(c < VALID, x * inv_t, float("-inf"))
            acc += tl.exp(x - m)
        tl.store(OUT + row, tl.sum(acc, axis=0))


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: float32 statistics, output in x's dtype (as
    :func:`r1mega.ops.batch_invariant.bi_rms_norm`)."""
    n = x.shape[-1]
    x2 = _rows(x)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(n)
        w = weight.contiguous() if weight is not None else x2
        _rms_norm_kernel[(x2.shape[0],)](x2, w, y, n, x2.stride(0), y.stride(0), float(eps),
                                         HAS_W=weight is not None, BLOCK=block,
                                         num_warps=min(16, max(4, block // 512)))
    return y.view(x.shape)


def row_max(logits: torch.Tensor, inv_t: torch.Tensor, valid_cols: int) -> torch.Tensor:
    """(N, V) logits, (N,) float32 1/T -> (N,) float32 max over columns < valid_cols of
    float32(logits) * 1/T."""
    x = _rows(logits)
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    if x.shape[0]:
        _row_max_kernel[(x.shape[0],)](x, inv_t.contiguous(), out, x.shape[1], int(valid_cols),
                                       x.stride(0), CHUNK=VOCAB_CHUNK, num_warps=8)
    return out


def row_sumexp(logits: torch.Tensor, inv_t: torch.Tensor, m: torch.Tensor,
               valid_cols: int) -> torch.Tensor:
    """(N,) float32 sum over columns < valid_cols of exp(float32(logits) * 1/T - m)."""
    x = _rows(logits)
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    if x.shape[0]:
        _row_sumexp_kernel[(x.shape[0],)](x, inv_t.contiguous(), m.contiguous(), out, x.shape[1],
                                          int(valid_cols), x.stride(0), CHUNK=VOCAB_CHUNK,
                                          num_warps=8)
    return out
