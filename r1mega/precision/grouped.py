"""FP8 for the routed MoE experts: torch's scaled grouped GEMM with rowwise scales.

The experts' rows are expert-contiguous (r1mega/moe/dispatch.py): group e is rows
[ends[e-1], ends[e]) and multiplies expert e's weight. ``torch._scaled_grouped_mm`` (sm_90)
takes e4m3 operands with float32 scales per row of each operand along the contraction, so every
recipe maps to rowwise here (per token for activations and gradients, per (expert, output row)
for weights):

  forward  y  = x @ W_e.T    a = x  (R, K) scaled along K;  b = W   (E, N, K) per (e, n)
  dgrad    dx = dy @ W_e     a = dy (R, N) scaled along N;  b = W.T (E, K, N) per (e, k)
  wgrad    dW_e = dy_e.T @ x_e   in bf16 (``torch._grouped_mm``): FP8 here would need scales
                                  per group along the tokens, which are not built

Both FP8 copies of a weight are derived state, cached per pass like the dense layers' (the
weight generation of r1mega/precision/linear.py). ``emulate`` dequantises to float32 and loops
over the groups on the host: the CPU path, and the reference the GPU test holds cuBLAS to.
"""
from __future__ import annotations

from typing import Optional

import torch

from r1mega.precision.linear import Fp8WeightCache
from r1mega.precision.policy import GROUPED_E4M3_ONLY, Fp8Policy
from r1mega.precision.quantize import Fp8Tensor, quantize

ALIGN = 16  # K and N: 16-byte aligned FP8 rows for the grouped GEMM's TMA loads


def quantize_rows_3d(w: torch.Tensor, power2: bool) -> Fp8Tensor:
    """(E, N, K) -> FP8 data (E, N, K) and float32 scales (E, N), one per row along K."""
    e, n, k = w.shape
    q = quantize(w.reshape(e * n, k), "row", "e4m3", power2)
    return Fp8Tensor(q.data.view(e, n, k), q.scale.reshape(e, n), "row", "e4m3")


def _group_rows(ends: torch.Tensor):
    """(group, slice of its rows) for cumulative ends (a host read: the emulated paths only)."""
    start = 0
    for g, end in enumerate(ends.tolist()):
        yield g, slice(start, end)
        start = end


def grouped_scaled_gemm(a: Fp8Tensor, b: Fp8Tensor, ends: torch.Tensor, out_dtype: torch.dtype,
                        emulate: bool) -> torch.Tensor:
    """a (R, K) rows scaled (R, 1); b (E, N, K) scaled (E, N); ends (E,) int32 cumulative ->
    (R, N): rows of group e times b[e].T. Rows past ends[-1] are zero when emulated and left as
    the kernel leaves them on the GPU (the experts' contract: nothing reads them)."""
    r, n = a.data.shape[0], b.data.shape[1]
    if emulate:
        out = torch.zeros(r, n, dtype=torch.float32, device=a.data.device)
        av = a.data.float() * a.scale.reshape(-1, 1)
        bv = b.data.float() * b.scale.unsqueeze(-1)
        for g, rows in _group_rows(ends):
            out[rows] = av[rows] @ bv[g].t()
        return out.to(out_dtype)
    # the kernel writes bf16 only (an fp32 model gets its output cast)
    return torch._scaled_grouped_mm(a.data, b.data.transpose(-2, -1), a.scale.reshape(-1),
                                    b.scale, offs=ends, out_dtype=torch.bfloat16).to(out_dtype)


def grouped_wgrad(dy: torch.Tensor, x: torch.Tensor, ends: torch.Tensor,
                  num_groups: int) -> torch.Tensor:
    """dy (R, N), x (R, K) -> (E, N, K): dy_e.T @ x_e per group (zero for an empty group)."""
    if dy.is_cuda and dy.dtype == torch.bfloat16:
        return torch._grouped_mm(dy.t(), x, offs=ends)
    out = dy.new_zeros(num_groups, dy.shape[1], x.shape[1])
    for g, rows in _group_rows(ends):
        out[g] = dy[rows].t() @ x[rows]
    return out


class Fp8GroupedOps:
    """One grouped projection's FP8 state: the policy and the cached FP8 weight copies."""

    def __init__(self, policy: Fp8Policy):
        if policy.grad_format != "e4m3":
            raise ValueError(f"FP8 experts with {policy.grad_format} gradients: {GROUPED_E4M3_ONLY}")
        self.policy = policy
        self.cache = Fp8WeightCache()

    def weight(self, w: torch.Tensor, which: str) -> Fp8Tensor:
        p2 = self.policy.power2_scales
        make = ((lambda: quantize_rows_3d(w.detach(), p2)) if which == "fwd" else
                (lambda: quantize_rows_3d(w.detach().transpose(1, 2).contiguous(), p2)))
        return self.cache.get_with(w, which, make)


class _Fp8GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, ends, ops: Fp8GroupedOps):
        ctx.ops = ops
        ctx.save_for_backward(x, w, ends)
        a = quantize(x, "row", "e4m3", ops.policy.power2_scales)
        return grouped_scaled_gemm(a, ops.weight(w, "fwd"), ends, x.dtype, ops.policy.emulate)

    @staticmethod
    def backward(ctx, dy):
        x, w, ends = ctx.saved_tensors
        ops = ctx.ops
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            g = quantize(dy, "row", "e4m3", ops.policy.power2_scales)
            dx = grouped_scaled_gemm(g, ops.weight(w, "dgrad"), ends, dy.dtype, ops.policy.emulate)
        if ctx.needs_input_grad[1]:
            dw = grouped_wgrad(dy, x, ends, w.shape[0]).to(w.dtype)
        return dx, dw, None, None


@torch.compiler.disable
def fp8_grouped_linear(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor,
                       ops: Fp8GroupedOps) -> torch.Tensor:
    """x (R, K) expert-contiguous rows, w (E, N, K), ends (E,) int32 -> (R, N) in x's dtype."""
    return _Fp8GroupedLinear.apply(x, w, ends, ops)


def check_expert_sizes(hidden: int, ffn: int, emulate: bool) -> Optional[str]:
    """Why the grouped FP8 GEMM cannot take these expert sizes (None when it can)."""
    if emulate or (hidden % ALIGN == 0 and ffn % ALIGN == 0):
        return None
    return (f"precision.fp8_experts: the scaled grouped GEMM needs the hidden size ({hidden}) and "
            f"the expert FFN size ({ffn}) to be multiples of {ALIGN}; set "
            f"precision.fp8_experts=false or change the model.")
