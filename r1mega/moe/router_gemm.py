"""The router's float32 product on bf16 tensor cores: float32 operands split into bf16 parts.

The router is float32 (r1mega/moe/router.py): its weight is a float32 parameter and its logits,
and the gradients through them, are float32. On a GPU a float32 GEMM runs on the CUDA cores,
far below the bf16 tensor-core rate, and the bf16 activations must first be widened to a float32
copy. Instead each float32 operand is written as a sum of bf16 parts, ``x = x_1 + x_2 + x_3``
(three parts hold a float32 value exactly: each takes the next 8 significant bits of the
remainder, cut by a bit mask), and the product is a sum of bf16 x bf16 products. A product of
two bf16 values is exact in float32 and the tensor cores accumulate in float32, so the result is
a float32 GEMM's up to the order and rounding of the accumulation (tests/gpu checks it against
float64 with a float32-accumulation bound):

  logits      = x W^T          x bf16 (one part), W float32 (three): one GEMM of 3E outputs
  grad_hidden = g W            g, W float32: the six part products with i + j < 3 (the dropped
                               ones are below float32's last bit), one GEMM with K = 6E
  grad_weight = g^T x          g three parts: one GEMM of 3E rows, the three summed

Used for bf16 activations on CUDA only; the CPU (the tests' reference), float32 activations and
``rollout.exact``'s batch-invariant forward keep the plain float32 GEMM.
"""
from __future__ import annotations

import torch

PARTS = 3  # bf16 parts of a float32 value: 3 x 8 significant bits hold its 24 exactly


def split_bf16(x: torch.Tensor, parts: int = PARTS) -> list[torch.Tensor]:
    """float32 x -> ``parts`` bf16 tensors of x's shape whose float32 sum is x (exactly for 3).

    Each part is the remainder's top 16 bits (sign, exponent, 7 mantissa bits), cut with an
    integer mask: a bf16 value, so its conversion to bf16 and ``rest - head`` are exact. Rounding
    with ``.to(bfloat16)`` instead breaks under inductor, which keeps the unrounded float32 inside
    a fused kernel (``emulate_precision_casts`` is off) and so computes a zero remainder."""
    out, rest = [], x.float()
    for i in range(parts):
        head = (rest.view(torch.int32) & -65536).view(torch.float32)   # low 16 bits cleared
        out.append(head.to(torch.bfloat16))
        if i + 1 < parts:
            rest = rest - head
    return out


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) bf16 @ (K, N) bf16 -> (M, N) float32, accumulated in float32. On CUDA one cuBLAS
    GEMM writing float32 (no split-K reduction in bf16); elsewhere the float32 matmul of the
    widened parts, the same products (each exact in float32)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def logits_split(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(T, H) bf16 x (E, H) float32 -> (T, E) float32 logits."""
    num_experts = weight.shape[0]
    w = torch.cat(split_bf16(weight), dim=0)                         # (3E, H) bf16
    return _sum_parts(mm_f32(hidden, w.t()), num_experts, dim=1)      # (T, 3E) -> (T, E)


def grad_hidden_split(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(T, E) float32 @ (E, H) float32 -> (T, H) float32, from the part products i + j < 3."""
    g, w = split_bf16(grad), split_bf16(weight)
    pairs = [(i, j) for i in range(PARTS) for j in range(PARTS) if i + j < PARTS]
    a = torch.cat([g[i] for i, _ in pairs], dim=1)                   # (T, 6E)
    b = torch.cat([w[j] for _, j in pairs], dim=0)                   # (6E, H)
    return mm_f32(a, b)


def grad_weight_split(grad: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """(T, E) float32 ^T @ (T, H) bf16 -> (E, H) float32."""
    num_experts = grad.shape[1]
    g = torch.cat(split_bf16(grad), dim=1)                           # (T, 3E)
    return _sum_parts(mm_f32(g.t(), hidden), num_experts, dim=0)      # (3E, H) -> (E, H)


def _sum_parts(out: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """The PARTS products stacked along ``dim`` (n each), summed in float32, first to last."""
    parts = out.split(n, dim=dim)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


class SplitLogits(torch.autograd.Function):
    """:func:`logits_split` with its backward in split products; keeps the bf16 activations."""

    @staticmethod
    def forward(ctx, hidden, weight):
        ctx.save_for_backward(hidden, weight)
        return logits_split(hidden, weight)

    @staticmethod
    def backward(ctx, grad):                                         # grad (T, E) float32
        hidden, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = grad_hidden_split(grad, weight).to(hidden.dtype)   # (T, H)
        if ctx.needs_input_grad[1]:
            grad_weight = grad_weight_split(grad, hidden).to(weight.dtype)   # (E, H)
        return grad_hidden, grad_weight


def use_split(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the split path serves: bf16 activations, a float32 weight, on CUDA, with a torch
    whose ``mm`` takes ``out_dtype``."""
    return (hidden.is_cuda and hidden.dtype == torch.bfloat16 and weight.dtype == torch.float32
            and _HAS_OUT_DTYPE)


_HAS_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()
