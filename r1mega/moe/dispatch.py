"""MoE token dispatch: routing metadata, permute into expert-contiguous rows, unpermute + combine.

Each operation has a CUDA kernel (csrc/moe_dispatch_kernel.cu, loaded by r1mega/moe/_cuda_ext.py)
and the PyTorch reference below, which runs on CPU or when the extension is missing. Both follow
one layout contract, so their outputs are equal element for element:

  indices (T, k)        the experts each token was routed to; flat entry i = t * k + j
  counts (E,) int32     entries per expert
  offsets (E+1,) int32  expert e owns permuted rows [offsets[e], offsets[e+1]): its counts[e] rows
                        in flat-entry order (token-major, as megatron-core orders them), then zero
                        rows up to a multiple of ``align`` (a grouped GEMM's block)
  row_map (T, k) int32  the permuted row of each entry; -1 for an entry that names no expert
  src_entry (R,) int32  the flat entry of each permuted row, -1 for padding

R = T*k + E*(align-1) rows are always allocated (the tail past offsets[E] is padding too), so that
no host-device synchronisation is needed to size the buffers and the whole path can be captured
in a CUDA graph; grouped GEMMs read only up to offsets[E].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from r1mega.moe import _cuda_ext, dispatch_ops

IMPLS = ("auto", "cuda", "torch")


@dataclass(frozen=True)
class RoutingMetadata:
    counts: torch.Tensor     # (E,) int32
    offsets: torch.Tensor    # (E+1,) int32
    row_map: torch.Tensor    # (T, k) int32
    src_entry: torch.Tensor  # (R,) int32
    num_experts: int
    align: int

    @property
    def num_tokens(self) -> int:
        return self.row_map.shape[0]

    @property
    def topk(self) -> int:
        return self.row_map.shape[1]

    @property
    def num_rows(self) -> int:
        return self.src_entry.shape[0]


def num_permuted_rows(num_tokens: int, topk: int, num_experts: int, align: int = 1) -> int:
    """Rows of the permuted buffer: every entry plus the worst-case padding of every expert."""
    return num_tokens * topk + num_experts * (align - 1)


def _kernels():
    """The CUDA kernels: the extension's functions, or under torch.compile the same kernels as
    custom ops (r1mega/moe/dispatch_ops.py), which the compiler traces instead of breaking at."""
    return dispatch_ops if torch.compiler.is_compiling() else _cuda_ext.get()


def _use_cuda(t: torch.Tensor, impl: str, what: str) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"{what}: impl={impl!r}, choose one of {IMPLS}")
    if impl == "torch" or not t.is_cuda:
        if impl == "cuda":
            raise RuntimeError(f"{what}: impl='cuda' needs a CUDA tensor, got one on {t.device}")
        return False
    if _cuda_ext.get() is None:
        if impl == "cuda":
            raise RuntimeError(f"{what}: impl='cuda' but r1mega_moe_cuda did not load: {_cuda_ext.load_error()}")
        return False
    return True


# ------------------------------------------------------------------------------------------------
# (a) routing metadata
# ------------------------------------------------------------------------------------------------
def routing_metadata(indices: torch.Tensor, num_experts: int, align: int = 1, impl: str = "auto",
                     validate: bool = True) -> RoutingMetadata:
    """indices (T, k) int -> RoutingMetadata. ``validate`` raises on an index outside
    [0, num_experts) (on CUDA that costs one synchronisation; a router cannot produce one, so the
    MoE layer may turn it off). Unvalidated out-of-range entries are dropped (row -1) by both paths."""
    if indices.dim() != 2 or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"routing_metadata: indices must be (tokens, topk) int32/int64, got "
                         f"{tuple(indices.shape)} {indices.dtype}")
    if not 1 <= num_experts <= 1024:
        raise ValueError(f"routing_metadata: num_experts={num_experts} outside [1, 1024]")
    if align < 1:
        raise ValueError(f"routing_metadata: align={align} must be >= 1")
    if validate and indices.numel() and bool(((indices < 0) | (indices >= num_experts)).any()):
        bad = indices[(indices < 0) | (indices >= num_experts)][0].item()
        raise ValueError(f"routing_metadata: expert index {bad} outside [0, {num_experts}); the router's "
                         f"num_experts and the dispatcher's disagree")
    num_rows = num_permuted_rows(indices.shape[0], indices.shape[1], num_experts, align)
    if _use_cuda(indices, impl, "routing_metadata"):
        counts, offsets, row_map, src_entry = _kernels().routing_metadata(
            indices.contiguous(), num_experts, align, num_rows)
        return RoutingMetadata(counts, offsets, row_map, src_entry, num_experts, align)
    return reference_routing_metadata(indices, num_experts, align)


def reference_routing_metadata(indices: torch.Tensor, num_experts: int, align: int = 1) -> RoutingMetadata:
    num_tokens, topk = indices.shape
    device = indices.device
    flat = indices.reshape(-1).long()                                  # (N,)
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))  # dropped entries sort last
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]  # (E,)
    padded = (counts + align - 1) // align * align
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    offsets[1:] = torch.cumsum(padded, 0)
    unpadded_start = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    unpadded_start[1:] = torch.cumsum(counts, 0)
    order = torch.argsort(key, stable=True)                            # stable: flat order within expert
    pos = torch.arange(flat.numel(), device=device)
    sorted_key = key[order]
    rank = pos - unpadded_start[sorted_key.clamp(max=num_experts - 1)]  # rank within the expert
    rows = torch.where(sorted_key < num_experts,
                       offsets[sorted_key.clamp(max=num_experts - 1)] + rank, torch.full_like(rank, -1))
    row_map = torch.empty_like(flat)
    row_map[order] = rows
    num_rows = num_permuted_rows(num_tokens, topk, num_experts, align)
    src_entry = torch.full((num_rows,), -1, dtype=torch.long, device=device)
    src_entry[row_map[valid]] = pos[valid]
    return RoutingMetadata(counts.int(), offsets.int(), row_map.view(num_tokens, topk).int(), src_entry.int(),
                           num_experts, align)


# ------------------------------------------------------------------------------------------------
# references of the copy kernels (no autograd inside: the Functions below own the backward)
# ------------------------------------------------------------------------------------------------
def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def reference_permute(x: torch.Tensor, row_map: torch.Tensor, src_entry: torch.Tensor) -> torch.Tensor:
    """x (T, H) -> (R, H): row r holds x[src_entry[r] // k], zero where src_entry[r] == -1."""
    topk = row_map.shape[1]
    src = src_entry.long()
    out = x.index_select(0, (src.clamp(min=0) // topk))               # (R, H)
    return out.masked_fill((src < 0).unsqueeze(-1), 0)


def reference_unpermute(y: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """y (R, H), row_map (T, k), weights (T, k) | None -> (T, H) = sum_j w[t,j] y[row_map[t,j]],
    accumulated in float32 (float64 for float64 inputs), rounded once."""
    acc = _acc_dtype(y)
    rows = row_map.long()
    valid = (rows >= 0).to(acc)                                        # (T, k)
    w = valid if weights is None else weights.to(acc) * valid
    gathered = y.index_select(0, rows.clamp(min=0).reshape(-1)).view(*rows.shape, y.shape[1])  # (T, k, H)
    return torch.einsum("tk,tkh->th", w, gathered.to(acc)).to(y.dtype)


def reference_unpermute_backward(grad_out: torch.Tensor, y: torch.Tensor, row_map: torch.Tensor,
                                 weights: torch.Tensor, src_entry: torch.Tensor):
    """-> grad_y (R, H) = w * grad_out at each routed row (zero on padding), grad_w (T, k) =
    <grad_out[t], y[row]> accumulated in float32/64."""
    acc = _acc_dtype(y)
    topk = row_map.shape[1]
    src = src_entry.long()
    w_flat = weights.reshape(-1).to(acc)
    scale = torch.where(src >= 0, w_flat[src.clamp(min=0)], torch.zeros((), dtype=acc, device=y.device))
    grad_y = (grad_out.index_select(0, src.clamp(min=0) // topk).to(acc) * scale.unsqueeze(-1)).to(y.dtype)
    rows = row_map.long()
    gathered = y.index_select(0, rows.clamp(min=0).reshape(-1)).view(*rows.shape, y.shape[1]).to(acc)
    grad_w = torch.einsum("th,tkh->tk", grad_out.to(acc), gathered) * (rows >= 0)
    return grad_y, grad_w.to(weights.dtype)


# ------------------------------------------------------------------------------------------------
# (b) permute and (c) unpermute + combine, as autograd Functions
# ------------------------------------------------------------------------------------------------
class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, row_map, src_entry, use_cuda):
        ctx.save_for_backward(row_map, src_entry)
        ctx.use_cuda = use_cuda
        if use_cuda:
            return _kernels().permute(x.contiguous(), row_map, src_entry)
        return reference_permute(x, row_map, src_entry)

    @staticmethod
    def backward(ctx, grad_out):
        row_map, src_entry = ctx.saved_tensors
        # Each token was copied to k rows: its gradient is the sum of theirs (padding rows drop out).
        if ctx.use_cuda:
            grad_x = _kernels().unpermute(grad_out.contiguous(), row_map, src_entry, None)
        else:
            grad_x = reference_unpermute(grad_out, row_map, None)
        return grad_x, None, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weights, row_map, src_entry, use_cuda):
        ctx.save_for_backward(y, weights, row_map, src_entry)
        ctx.use_cuda = use_cuda
        if use_cuda:
            return _kernels().unpermute(y.contiguous(), row_map, src_entry, weights)
        return reference_unpermute(y, row_map, weights)

    @staticmethod
    def backward(ctx, grad_out):
        y, weights, row_map, src_entry = ctx.saved_tensors
        if ctx.use_cuda:
            grad_y, grad_w = _kernels().unpermute_backward(grad_out.contiguous(), y.contiguous(), row_map,
                                                                weights, src_entry)
        else:
            grad_y, grad_w = reference_unpermute_backward(grad_out, y, row_map, weights, src_entry)
        return grad_y, (grad_w if ctx.needs_input_grad[1] else None), None, None, None


def permute_tokens(x: torch.Tensor, meta: RoutingMetadata, impl: str = "auto") -> torch.Tensor:
    """x (T, H) -> (R, H) expert-contiguous rows (see the module docstring for the layout)."""
    if x.dim() != 2 or x.shape[0] != meta.num_tokens:
        raise ValueError(f"permute_tokens: x must be ({meta.num_tokens}, hidden), got {tuple(x.shape)}")
    return _Permute.apply(x, meta.row_map, meta.src_entry, _use_cuda(x, impl, "permute_tokens"))


def unpermute_tokens(y: torch.Tensor, weights: torch.Tensor | None, meta: RoutingMetadata,
                     impl: str = "auto") -> torch.Tensor:
    """y (R, H) expert outputs, weights (T, k) -> (T, H) = sum_j weights[t, j] * y[row of (t, j)],
    accumulated in float32. ``weights=None`` sums with weight 1 (no gradient for weights).
    The weights' gradient is returned in float32 (the router's dtype) whatever y's dtype is."""
    if y.dim() != 2 or y.shape[0] != meta.num_rows:
        raise ValueError(f"unpermute_tokens: y must be ({meta.num_rows}, hidden) (the permuted rows), got "
                         f"{tuple(y.shape)}")
    use_cuda = _use_cuda(y, impl, "unpermute_tokens")
    if weights is None:
        # The sum of k rows is exactly the backward of permute: reuse that pair of kernels.
        return _PermuteTranspose.apply(y, meta.row_map, meta.src_entry, use_cuda)
    if weights.shape != meta.row_map.shape:
        raise ValueError(f"unpermute_tokens: weights must be {tuple(meta.row_map.shape)}, got {tuple(weights.shape)}")
    w = weights.to(_acc_dtype(y)).contiguous()
    return _Unpermute.apply(y, w, meta.row_map, meta.src_entry, use_cuda)


class _PermuteTranspose(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, row_map, src_entry, use_cuda):
        ctx.save_for_backward(row_map, src_entry)
        ctx.use_cuda = use_cuda
        if use_cuda:
            return _kernels().unpermute(y.contiguous(), row_map, src_entry, None)
        return reference_unpermute(y, row_map, None)

    @staticmethod
    def backward(ctx, grad_out):
        row_map, src_entry = ctx.saved_tensors
        if ctx.use_cuda:
            return _kernels().permute(grad_out.contiguous(), row_map, src_entry), None, None, None
        return reference_permute(grad_out, row_map, src_entry), None, None, None
