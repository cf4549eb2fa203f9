"""Routed experts as one grouped GEMM over expert-contiguous rows, SwiGLU, and the shared expert.

Weights use transformers' stacked layout (Qwen3-MoE / DeepSeek-V3 ``*Experts``): ``gate_up``
(E, 2F, H) with the gate half first, ``down`` (E, H, F), so conversion is a copy.

Two implementations of the same math over the permuted rows of r1mega/moe/dispatch.py:
- ``grouped``: ``torch._grouped_mm`` (one kernel per projection for all experts; Hopper, bf16),
  with the group ends taken from the routing offsets on the device, so nothing synchronises;
- ``loop``: one pair of matmuls per expert (CPU, other dtypes), which needs the offsets on the host.
Padding rows are zero, and SwiGLU(0) = 0, so they stay zero and cost only their FLOPs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from r1mega.ops import triton_swiglu
from r1mega.moe.dispatch import RoutingMetadata, permute_tokens, routing_metadata, unpermute_tokens

IMPLS = ("auto", "grouped", "loop")


def grouped_mm_available(x: torch.Tensor) -> bool:
    """``torch._grouped_mm`` runs bf16 on sm_90+; elsewhere the loop is used."""
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] >= 9)


def _fused(gate_up: torch.Tensor) -> bool:
    """The one-pass Triton kernels (r1mega/ops/triton_swiglu.py) serve CUDA tensors outside a
    compiled region (inductor fuses the eager formula there itself)."""
    return triton_swiglu.supported(gate_up) and not torch.compiler.is_compiling()


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """(.., 2F) -> (.., F): silu(gate) * up, gate first as in transformers' chunk(2). On CUDA
    one kernel computes it in float32 and rounds once (eager rounds silu(gate) first)."""
    if _fused(gate_up):
        return triton_swiglu.swiglu(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class _RecomputedSwiGLU(torch.autograd.Function):
    """:func:`swiglu` that keeps only its input for backward. Autograd would also keep
    silu(gate) (.., F); here the backward recomputes it (elementwise, cheap) and applies the
    same ops autograd would (mul's two products, silu_backward), so gradients are identical
    off CUDA; on CUDA both directions are the fused kernels (float32 inside, one rounding)."""

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return swiglu(gate_up)

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        if _fused(gate_up):  # one pass writing both halves, where eager takes five and a cat
            return triton_swiglu.swiglu_backward(grad, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        d_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return torch.cat([d_gate, grad * F.silu(gate)], dim=-1)


def swiglu_into(linear, gate_up: torch.Tensor) -> torch.Tensor:
    """``linear(swiglu(gate_up))`` keeping only ``gate_up`` for backward: (rows, 2F) -> the
    linear's output. The linear's own saved input, swiglu(gate_up) (rows, F), is rebuilt from
    ``gate_up`` when backward unpacks it. Per routed row that leaves (H + 2F) saved values of
    the expert MLP instead of (H + 4F)."""
    if not (torch.is_grad_enabled() and gate_up.requires_grad):
        return linear(swiglu(gate_up))
    if torch.compiler.is_compiling():
        # dynamo does not trace saved-tensor hooks; the partitioner picks what backward keeps
        return linear(swiglu(gate_up))
    act = _RecomputedSwiGLU.apply(gate_up)
    key = (act.data_ptr(), act.shape, act.dtype)

    def pack(t):
        if (t.data_ptr(), t.shape, t.dtype) == key:
            return _Rebuild(gate_up)  # gate_up is saved by the swiglu already: no new memory
        return t

    def unpack(obj):
        if isinstance(obj, _Rebuild):
            with torch.no_grad():
                return swiglu(obj.gate_up)
        return obj

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return linear(act)


class _Rebuild:
    __slots__ = ("gate_up",)

    def __init__(self, gate_up: torch.Tensor):
        self.gate_up = gate_up


class _GroupedSwiGLUDown(torch.autograd.Function):
    """down(swiglu(h)) over expert groups, keeping only h: the backward's one fused SwiGLU pass
    gives both dh and the activation the down projection's weight gradient needs (swiglu_into's
    autograd path recomputes the activation in a pass of its own)."""

    @staticmethod
    def forward(ctx, h, down, ends):
        ctx.save_for_backward(h, down, ends)
        a = triton_swiglu.swiglu_forward(h)                               # (R, F)
        return torch._grouped_mm(a, down.transpose(-2, -1), offs=ends)   # (R, H)

    @staticmethod
    def backward(ctx, dy):
        h, down, ends = ctx.saved_tensors
        dy = dy.contiguous()
        da = torch._grouped_mm(dy, down, offs=ends)                       # (R, F)
        dh, a = triton_swiglu.swiglu_backward_with_output(da, h)          # (R, 2F), (R, F)
        d_down = torch._grouped_mm(dy.t(), a, offs=ends) if ctx.needs_input_grad[1] else None
        return dh, d_down, None                                           # d_down (E, H, F)


def grouped_swiglu_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                           offsets: torch.Tensor) -> torch.Tensor:
    """x (R, H) expert-contiguous rows, gate_up (E, 2F, H), down (E, H, F), offsets (E+1,) int32
    -> (R, H). Rows past offsets[E] (the padding tail) are left as _grouped_mm leaves them:
    nothing reads them, and their gradient is zero."""
    ends = offsets[1:].to(torch.int32)                                   # (E,) cumulative row ends
    h = torch._grouped_mm(x, gate_up.transpose(-2, -1), offs=ends)      # (R, 2F)
    if torch.is_grad_enabled() and _fused(h):
        return _GroupedSwiGLUDown.apply(h, down, ends)
    return swiglu_into(lambda a: torch._grouped_mm(a, down.transpose(-2, -1), offs=ends), h)  # (R, H)


def loop_swiglu_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                        offsets: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`grouped_swiglu_experts`, one expert at a time; the tail is zero."""
    bounds = offsets.tolist()                                           # one host sync per layer
    pieces = []
    for e in range(gate_up.shape[0]):
        rows = x[bounds[e]:bounds[e + 1]]                               # (n_e, H)
        pieces.append(swiglu_into(lambda a, w=down[e]: F.linear(a, w), F.linear(rows, gate_up[e])))
    pieces.append(x.new_zeros(x.shape[0] - bounds[-1], down.shape[1]))
    return torch.cat(pieces, dim=0)


def fp8_swiglu_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                       offsets: torch.Tensor, ops: tuple) -> torch.Tensor:
    """:func:`grouped_swiglu_experts` with both projections' forward and dgrad GEMMs in FP8
    (r1mega/precision/grouped.py); ``ops`` = (gate_up's, down's Fp8GroupedOps)."""
    from r1mega.precision.grouped import fp8_grouped_linear

    ends = offsets[1:].to(torch.int32)
    h = fp8_grouped_linear(x, gate_up, ends, ops[0])                                # (R, 2F)
    return swiglu_into(lambda a: fp8_grouped_linear(a, down, ends, ops[1]), h)      # (R, H)


class GroupedExperts(nn.Module):
    """E SwiGLU experts of width F over expert-contiguous rows; ``fp8``: an Fp8Policy whose
    ``experts`` flag puts both projections in FP8."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, impl: str = "auto",
                 device=None, dtype=None, fp8=None):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"GroupedExperts: impl={impl!r}, choose one of {IMPLS}")
        self.impl = impl
        self.num_experts = num_experts
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * ffn_size, hidden_size, device=device, dtype=dtype))
        self.down = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size, device=device, dtype=dtype))
        self.reset_parameters()
        self.fp8_ops = None
        if fp8 is not None and fp8.experts:
            from r1mega.precision.grouped import Fp8GroupedOps, check_expert_sizes

            why = check_expert_sizes(hidden_size, ffn_size, fp8.emulate)
            if why:
                raise ValueError(why)
            self.fp8_ops = (Fp8GroupedOps(fp8), Fp8GroupedOps(fp8))

    def reset_parameters(self, std: float | None = None) -> None:
        for w in (self.gate_up, self.down):
            nn.init.normal_(w, std=std if std is not None else 1.0 / math.sqrt(w.shape[-1]))

    def forward(self, x: torch.Tensor, meta: RoutingMetadata) -> torch.Tensor:
        if meta.num_experts != self.num_experts:
            raise ValueError(f"GroupedExperts: routing has {meta.num_experts} experts, the module "
                             f"{self.num_experts}")
        use_grouped = self.impl == "grouped" or (self.impl == "auto" and grouped_mm_available(x))
        if self.impl == "grouped" and not grouped_mm_available(x):
            raise RuntimeError("GroupedExperts: impl='grouped' needs torch._grouped_mm with bf16 on sm_90+; "
                               "use impl='auto' to fall back to the per-expert loop")
        if self.fp8_ops is not None:
            # the parameters themselves: the FP8 copies are cached by their identity and version
            return fp8_swiglu_experts(x, self.gate_up, self.down, meta.offsets, self.fp8_ops)
        fn = grouped_swiglu_experts if use_grouped else loop_swiglu_experts
        return fn(x, self.gate_up.to(x.dtype), self.down.to(x.dtype), meta.offsets)


class SwiGLUMLP(nn.Module):
    """The shared expert (and the dense FFN): down(silu(gate(x)) * up(x)), same stacked layout;
    ``fp8``: an Fp8Policy whose ``experts`` flag runs both linears as the FP8 dense linear."""

    def __init__(self, hidden_size: int, ffn_size: int, device=None, dtype=None, fp8=None):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(2 * ffn_size, hidden_size, device=device, dtype=dtype))
        self.down = nn.Parameter(torch.empty(hidden_size, ffn_size, device=device, dtype=dtype))
        nn.init.normal_(self.gate_up, std=1.0 / math.sqrt(hidden_size))
        nn.init.normal_(self.down, std=1.0 / math.sqrt(ffn_size))
        self.fp8_ops = None
        if fp8 is not None and fp8.experts:
            from r1mega.precision.linear import Fp8LinearOps, weight_alignment

            align = weight_alignment(fp8)
            if hidden_size % align or ffn_size % align:
                raise ValueError(f"precision.fp8_experts: the shared expert's FP8 {fp8.recipe} GEMMs "
                                 f"need hidden ({hidden_size}) and FFN ({ffn_size}) sizes that are "
                                 f"multiples of {align}; set precision.fp8_experts=false, use "
                                 f"precision.fp8_recipe=tensorwise, or change the model.")
            self.fp8_ops = (Fp8LinearOps(fp8), Fp8LinearOps(fp8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_ops is not None:
            from r1mega.precision.linear import fp8_linear

            gu, dn = self.fp8_ops
            return swiglu_into(lambda a: fp8_linear(a, self.down, None, dn),
                               fp8_linear(x, self.gate_up, None, gu))
        return swiglu_into(lambda a: F.linear(a, self.down), F.linear(x, self.gate_up))


def moe_feed_forward(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: GroupedExperts,
                     shared: nn.Module | None = None, align: int = 1, dispatch_impl: str = "auto",
                     validate: bool = True) -> torch.Tensor:
    """x (T, H), router weights (T, k) float32 and indices (T, k) -> (T, H):
    sum_j weights[t, j] * expert_{indices[t, j]}(x[t]) (+ shared(x[t])), on one device (no
    expert parallelism here: the all-to-all goes between permute and the experts)."""
    meta = routing_metadata(indices, experts.num_experts, align=align, impl=dispatch_impl, validate=validate)
    routed = experts(permute_tokens(x, meta, impl=dispatch_impl), meta)       # (R, H)
    out = unpermute_tokens(routed, weights, meta, impl=dispatch_impl)         # (T, H)
    return out if shared is None else out + shared(x)
