"""Triton decode attention for multi-head latent attention on the paged latent cache (GPU only).

MLA decodes with the key/value up-projections absorbed (r1mega/rollout/adapters/mla.py): every
head's query is [W_uk^T q_nope; q_pe] (r + d_r wide) and attends ONE cached row per token,
[c; k_pe], whose first r columns are also the value. The GQA kernel (triton_paged) wants a
power-of-two head size and a separate value cache; here the row is 512 + 64 for V3, so the score
is split into two dots (latent part, RoPE part) and the value is the latent part of the same
tile: each cache row is read once per sequence for all heads.

One program per (sequence, tile of ``BLOCK_H`` heads); the loop bound is the sequence's length
read on the device, so one compiled kernel serves every context and fits in a CUDA graph.
The PyTorch reference is :func:`r1mega.rollout.attention.attend_decode_gather` (with the cache
as both keys and values, output cut to the latent width); tests/gpu compares them.
"""
from __future__ import annotations

import torch

from r1mega.rollout.attention import attend_decode_gather

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit
    def _mla_decode_kernel(
        Q, KC, BT, CTX, O,
        stride_qb, stride_qh,
        stride_kb, stride_kt,
        stride_btb,
        stride_ob, stride_oh,
        SCALE: tl.constexpr,  # constexpr: under torch.compile a float argument would turn fp64
        H: tl.constexpr,
        BLOCK_H: tl.constexpr,
        DL: tl.constexpr,
        DR: tl.constexpr,
        BS: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = h < H
        ctx = tl.load(CTX + b)
        dl = tl.arange(0, DL)
        dr = tl.arange(0, DR)
        q_row = Q + b * stride_qb + h[:, None] * stride_qh
        q_l = tl.load(q_row + dl[None, :], mask=h_ok[:, None], other=0.0)          # (BH, DL)
        q_r = tl.load(q_row + DL + dr[None, :], mask=h_ok[:, None], other=0.0)     # (BH, DR)

        m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_H,), tl.float32)
        acc = tl.zeros((BLOCK_H, DL), tl.float32)
        for start in range(0, ctx, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < ctx
            blk = tl.load(BT + b * stride_btb + n // BS, mask=n_ok, other=0).to(tl.int64)
            row = KC + blk * stride_kb + (n % BS) * stride_kt                         # (BN,)
            k_l = tl.load(row[:, None] + dl[None, :], mask=n_ok[:, None], other=0.0)   # (BN, DL)
            k_r = tl.load(row[:, None] + DL + dr[None, :], mask=n_ok[:, None], other=0.0)
            s = tl.dot(q_l, tl.trans(k_l)) + tl.dot(q_r, tl.trans(k_r))                # (BH, BN)
            s = tl.where(n_ok[None, :], s * SCALE, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(k_l.dtype), k_l)
            m = m_new
        out = acc / l[:, None]
        o_ptr = O + b * stride_ob + h[:, None] * stride_oh + dl[None, :]
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=h_ok[:, None])


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def kernel_supports(latent_dim: int, rope_dim: int) -> bool:
    """Both widths must be powers of two (tl.arange); V3's 512 and 64 are."""
    return HAVE_TRITON and _pow2(latent_dim) and _pow2(rope_dim) and rope_dim >= 16


def mla_paged_decode(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor,
                     ctx_lens: torch.Tensor, scale: float, latent_dim: int) -> torch.Tensor:
    """q (B, H, r + d_r) absorbed queries; k_cache (N, bs, 1, r + d_r) latent rows; block_tables
    (B, max_blocks) int32; ctx_lens (B,) int32, every row >= 1 -> (B, H, r)."""
    if not HAVE_TRITON:
        raise RuntimeError("mla_paged_decode needs Triton; use attend_decode_gather instead.")
    bsz, heads, width = q.shape
    rope_dim = width - latent_dim
    if not kernel_supports(latent_dim, rope_dim) or k_cache.shape[-1] != width or k_cache.shape[-2] != 1:
        raise ValueError(f"MLA decode kernel: latent {latent_dim} + rope {rope_dim} (powers of two, "
                         f"rope >= 16) against a cache row of {tuple(k_cache.shape[-2:])}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1:
        raise ValueError("the latent cache rows must be contiguous")
    out = torch.empty(bsz, heads, latent_dim, dtype=q.dtype, device=q.device)
    block_h = max(16, min(64, triton.next_power_of_2(heads)))
    bs = k_cache.shape[1]
    _mla_decode_kernel[(bsz, triton.cdiv(heads, block_h))](
        q, k_cache, block_tables, ctx_lens, out,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        SCALE=float(scale), H=heads, BLOCK_H=block_h, DL=latent_dim, DR=rope_dim, BS=bs,
        BLOCK_N=32, num_warps=8, num_stages=2,
    )
    return out


@torch.library.custom_op("r1mega::mla_decode_attention", mutates_args=())
def mla_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor,
                         ctx_lens: torch.Tensor, scale: float, latent_dim: int) -> torch.Tensor:
    """Absorbed MLA decode over the paged latent cache: the Triton kernel on CUDA, the gather
    reference elsewhere. q (B, H, r + d_r) -> (B, H, r)."""
    if q.is_cuda and kernel_supports(latent_dim, q.shape[-1] - latent_dim):
        return mla_paged_decode(q, k_cache, block_tables, ctx_lens, scale, latent_dim)
    out = attend_decode_gather(q, k_cache, k_cache, block_tables, ctx_lens, scale)
    return out[..., :latent_dim].contiguous()


@mla_decode_attention.register_fake
def _(q, k_cache, block_tables, ctx_lens, scale, latent_dim):
    return q.new_empty(q.shape[0], q.shape[1], latent_dim)
