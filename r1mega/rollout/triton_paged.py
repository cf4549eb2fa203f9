"""Triton decode attention that reads the paged KV cache in place (GPU only).

One program per (sequence, KV head): it loads the query heads of that KV group (grouped-query
attention: the group's heads share each K/V tile it loads, so KV is read once per group, not per
query head), walks the sequence's block table in tiles of ``BLOCK_N`` tokens and keeps an online
softmax. The loop bound is the sequence's length read on the device, so one compiled kernel
serves every context length and the launch fits in a CUDA graph.

The PyTorch reference is :func:`r1mega.rollout.attention.attend_gather`; tests/gpu compares them.

FP8 cache (``FP8`` constexpr, r1mega/rollout/kv_cache.py): the e4m3 tiles are converted to q's
dtype (exact: e4m3 is a subset of bf16/fp16/fp32), or with ``F16_DOTS`` to fp16 with q scaled
into fp16 by a power of two, and the per-(token, head) scales factor out of
the dots, s_j = scale * k_scale_j * (q . k8_j) and acc += (p_j * v_scale_j) . v8_j, so the tile
products stay tensor-core dots and only a (BLOCK_N,) vector of scales is read per tile. With
``F8_DOTS`` no tile is converted: q (once) and each tile's weighted probabilities are rounded to
e4m3 and both dots are FP8 x FP8. With ``FP8`` false the kernel compiles to exactly the bf16
kernel.

Two kernels, one contract: the default puts a group's query heads on the dots' M axis (padded
to 16 rows); the keys-major one (``R1MEGA_PAGED_DECODE=keys``) computes the transposed products,
keys on M and the group's heads on N, so the (FP8-converted) K/V tile is the operand the MMA
takes from registers.

:func:`decode_attention` is the launch as a custom op: one opaque node for dynamo, so the compiled
decode forward is not cut into a fragment per layer around it (see triton_rope_kv for the other
half of that, the RoPE + cache write).
"""
from __future__ import annotations

from typing import Optional

import torch

from r1mega import switches
from r1mega.rollout import cuda_paged
from r1mega.rollout.attention import attend_decode_gather

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False


if HAVE_TRITON:
    from r1mega.precision.triton_quant import _round_e4m3

    @triton.jit
    def _q_in_f16(q):
        # e4m3 converts to fp16 in one instruction (to bf16 only by a detour through wider
        # types), so the dots take fp16: q is scaled by a power of two that puts its largest
        # entry in [2^8, 2^9), exact for a bf16 q (fp16 has more mantissa bits) down to entries
        # 2^-22 of that largest one; the power (returned) goes back into the logits' scale
        qf = q.to(tl.float32)
        e = tl.maximum((tl.max(tl.max(qf.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 1), 0) >> 23) - 8, 1)
        q16 = (qf * ((254 - e) << 23).to(tl.float32, bitcast=True)).to(tl.float16)
        return q16, (e << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _q_in_f8(q, AXIS: tl.constexpr):
        # q in e4m3 for FP8 x FP8 dots (F8_DOTS): each head scaled by the power of two that puts
        # its largest entry in [128, 256) (the scaling is exact; e4m3's rounding is the error);
        # returns q8 and each head's factor back (along the other axis), for the logits. Rounded
        # by _round_e4m3 before the (then exact) conversion, as the cache write does: the same
        # values under Triton's interpreter, which mis-rounds fp32 -> e4m3
        bits = tl.max(q.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF, AXIS)
        m_exp = tl.minimum(tl.maximum(261 - (bits >> 23), 1), 253)  # 2^(7 - e), e = amax's exponent
        mult = (m_exp << 23).to(tl.float32, bitcast=True)
        back = ((254 - m_exp) << 23).to(tl.float32, bitcast=True)
        if AXIS == 1:
            q8 = _round_e4m3(q.to(tl.float32) * mult[:, None]).to(tl.float8e4nv)
        else:
            q8 = _round_e4m3(q.to(tl.float32) * mult[None, :]).to(tl.float8e4nv)
        return q8, back

    @triton.jit
    def _k_tile(K, KS, VS, BT, b, h, start, ctx, stride_kb, stride_kt, stride_kh, stride_sb,
                stride_st, stride_btb, q, D: tl.constexpr, BS: tl.constexpr,
                BLOCK_N: tl.constexpr, FP8: tl.constexpr):
        # Keys [start, start + BLOCK_N) of sequence b, head h, through its block table: n_ok (BN,)
        # the keys inside the context, off (BN,) their cache offsets, k (BN, D) (an FP8 tile
        # converted to q's dtype), and an FP8 cache's per-key scales (ones otherwise).
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < ctx
        blk = tl.load(BT + b * stride_btb + n // BS, mask=n_ok, other=0).to(tl.int64)
        off = blk * stride_kb + (n % BS) * stride_kt + h * stride_kh  # (BN,)
        k = tl.load(K + off[:, None] + tl.arange(0, D)[None, :], mask=n_ok[:, None], other=0.0)
        k_sc = tl.full((BLOCK_N,), 1.0, tl.float32)
        v_sc = k_sc
        if FP8:
            k = k.to(q.dtype)
            s_off = blk * stride_sb + (n % BS) * stride_st + h  # (BN,)
            k_sc = tl.load(KS + s_off, mask=n_ok, other=0.0)
            v_sc = tl.load(VS + s_off, mask=n_ok, other=0.0)
        return n_ok, off, k, k_sc, v_sc

    @triton.jit
    def _v_tile(V, off, n_ok, v_sc, q, D: tl.constexpr, FP8: tl.constexpr):
        # The values of _k_tile's keys (BN, D), and for an FP8 cache each key's weight on its
        # probability with the factor that undoes it: the scales weight values, not
        # probabilities (p's sum stays unscaled), and enter relative to the tile's largest
        # (> 0: every tile has a real key), so the 16-bit dot operand stays <= 1 and a
        # small-valued V cannot underflow fp16.
        v = tl.load(V + off[:, None] + tl.arange(0, D)[None, :], mask=n_ok[:, None], other=0.0)
        w = v_sc
        v_max = 1.0
        if FP8:
            v = v.to(q.dtype)
            v_max = tl.max(v_sc, 0)
            w = v_sc / v_max
        return v, w, v_max

    @triton.jit
    def _paged_decode_kernel(
        Q, K, V, BT, CTX, O, KS, VS,
        stride_qb, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_sb, stride_st,
        stride_btb,
        stride_ob, stride_oh,
        SCALE: tl.constexpr,  # constexpr: under torch.compile a float argument would turn fp64
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        D: tl.constexpr,
        BS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
        FP8: tl.constexpr,  # K/V in e4m3 with float32 scales KS/VS (N, bs, Hkv); else unused
        F16_DOTS: tl.constexpr,  # FP8 with a 16-bit q: the dots take fp16 operands
        F8_DOTS: tl.constexpr,  # FP8: q and p quantised to e4m3, the dots FP8 x FP8
        HEADS_INNER: tl.constexpr,  # grid (Hkv, B): a sequence's KV heads are neighbouring programs
    ):
        b = tl.program_id(1 if HEADS_INNER else 0)
        h = tl.program_id(0 if HEADS_INNER else 1)
        ctx = tl.load(CTX + b)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, D)
        g_ok = g < GROUP
        q_ptr = Q + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptr, mask=g_ok[:, None], other=0.0)  # (GP, D)
        q_pow = 1.0
        q_back = tl.full((GROUP_PAD,), 1.0, tl.float32)
        if F16_DOTS:
            q, q_pow = _q_in_f16(q)
        if F8_DOTS:
            q, q_back = _q_in_f8(q, 1)

        m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        l = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, D), tl.float32)
        for start in range(0, ctx, BLOCK_N):
            n_ok, off, k, k_sc, v_sc = _k_tile(K, KS, VS, BT, b, h, start, ctx, stride_kb,
                                               stride_kt, stride_kh, stride_sb, stride_st,
                                               stride_btb, q, D, BS, BLOCK_N, FP8)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            if FP8:
                s = s * (k_sc * q_pow)[None, :]
            if F8_DOTS:
                s = s * q_back[:, None]
            s = tl.where(n_ok[None, :], s * SCALE, float("-inf"))  # (GP, BN)
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            v, v_w, v_max = _v_tile(V, off, n_ok, v_sc, q, D, FP8)
            pv_w = p
            if FP8:
                pv_w = p * v_w[None, :]
            if IEEE:
                pv = tl.dot(pv_w.to(v.dtype), v, input_precision="ieee")
            elif F8_DOTS:  # p <= 1 scaled by 2^8: e4m3 keeps 3 bits down to p ~ 2^-14
                pv = tl.dot(_round_e4m3(pv_w * 256.0).to(tl.float8e4nv), v) * (1.0 / 256.0)
            else:
                pv = tl.dot(pv_w.to(v.dtype), v)
            if FP8:
                pv = pv * v_max
            acc = acc * alpha[:, None] + pv
            m = m_new
        out = acc / l[:, None]
        o_ptr = O + b * stride_ob + (h * GROUP + g)[:, None] * stride_oh + d[None, :]
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=g_ok[:, None])

    @triton.jit
    def _paged_decode_keys_kernel(
        Q, K, V, BT, CTX, O, KS, VS,
        stride_qb, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_sb, stride_st,
        stride_btb,
        stride_ob, stride_oh,
        SCALE: tl.constexpr,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        D: tl.constexpr,
        BS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
        FP8: tl.constexpr,
        F16_DOTS: tl.constexpr,
        F8_DOTS: tl.constexpr,
        HEADS_INNER: tl.constexpr,
    ):
        # _paged_decode_kernel with keys on the dots' M axis: s.T = k @ q.T (BLOCK_N, GP) and
        # acc.T += v.T @ p.T (D, GP). A group's few query heads fill the MMA's N (16 wide) instead
        # of GROUP of its 64 rows, and the tile an FP8 cache converts in registers is the dot's
        # first operand, which the MMA reads from registers (the second one it reads from shared
        # memory). The softmax runs down the columns (axis 0).
        b = tl.program_id(1 if HEADS_INNER else 0)
        h = tl.program_id(0 if HEADS_INNER else 1)
        ctx = tl.load(CTX + b)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, D)
        g_ok = g < GROUP
        qt_ptr = Q + b * stride_qb + (h * GROUP + g)[None, :] * stride_qh + d[:, None]
        qt = tl.load(qt_ptr, mask=g_ok[None, :], other=0.0)  # (D, GP)
        q_pow = 1.0
        q_back = tl.full((GROUP_PAD,), 1.0, tl.float32)
        if F16_DOTS:
            qt, q_pow = _q_in_f16(qt)
        if F8_DOTS:
            qt, q_back = _q_in_f8(qt, 0)

        m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        l = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((D, GROUP_PAD), tl.float32)
        for start in range(0, ctx, BLOCK_N):
            n_ok, off, k, k_sc, v_sc = _k_tile(K, KS, VS, BT, b, h, start, ctx, stride_kb,
                                               stride_kt, stride_kh, stride_sb, stride_st,
                                               stride_btb, qt, D, BS, BLOCK_N, FP8)
            if IEEE:
                s = tl.dot(k, qt, input_precision="ieee")
            else:
                s = tl.dot(k, qt)  # (BN, GP)
            if FP8:
                s = s * (k_sc * q_pow)[:, None]
            if F8_DOTS:
                s = s * q_back[None, :]
            s = tl.where(n_ok[:, None], s * SCALE, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[None, :])
            l = l * alpha + tl.sum(p, 0)
            v, v_w, v_max = _v_tile(V, off, n_ok, v_sc, qt, D, FP8)  # (BN, D)
            pv_w = p
            if FP8:
                pv_w = p * v_w[:, None]
            if IEEE:
                pv = tl.dot(tl.trans(v), pv_w, input_precision="ieee")
            elif F8_DOTS:
                pv = tl.dot(tl.trans(v), _round_e4m3(pv_w * 256.0).to(tl.float8e4nv)) * (1.0 / 256.0)
            else:
                pv = tl.dot(tl.trans(v), pv_w.to(v.dtype))  # (D, GP)
            if FP8:
                pv = pv * v_max
            acc = acc * alpha[None, :] + pv
            m = m_new
        out = acc / l[None, :]
        o_ptr = O + b * stride_ob + (h * GROUP + g)[None, :] * stride_oh + d[:, None]
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=g_ok[None, :])


def _kernel_from_env() -> bool:
    return switches.choice("R1MEGA_PAGED_DECODE", "rows", {
        "rows": "a KV group's query heads on the dots' M axis", "keys": "keys on it"}) == "keys"


# The decode kernel of every paged_decode_attention call that does not choose: process-wide, so
# an A/B of whole rollouts is one variable (`r1mega bench decode-attention` times both kernels
# side by side; the keys-major one is not the default until a GPU has timed it).
KEYS_MAJOR = _kernel_from_env()


def _fp8_dots_from_env() -> str:
    return switches.choice("R1MEGA_PAGED_FP8_DOTS", "q", {
        "q": "an FP8 cache's tiles converted to q's dtype", "f16": "converted to fp16 (f16_dots)",
        "f8": "FP8 x FP8 dots, q and p quantised to e4m3 (f8_dots)"})


# The FP8 cache's dot operands of every paged_decode_attention call that does not choose.
FP8_DOTS = _fp8_dots_from_env()


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    block_n: int | None = None,
    f16_dots: bool | None = None,
    f8_dots: bool | None = None,
    keys_major: bool | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    heads_inner: bool | None = None,
) -> torch.Tensor:
    """q (B, Hq, D); caches (N, bs, Hkv, D); block_tables (B, max_blocks) int32; ctx_lens (B,) int32;
    ``k_scale``/``v_scale`` (N, bs, Hkv) float32: an FP8 (e4m3) cache's scales; ``block_n``: keys
    per tile (a power of two >= 16; None: the default below; `r1mega bench decode-attention` sweeps it);
    ``f16_dots``: an FP8 cache's dots in fp16 rather than q's dtype (not the default: its GPU test
    has not run yet; `r1mega bench decode-attention` times both); ``f8_dots``: an FP8 cache's
    dots FP8 x FP8, q (per head, by a power of two) and the probabilities quantised to e4m3 in
    the kernel, as FlashAttention-3's FP8 path does (more error than the cache's own; not the
    default until a GPU has timed it); both None: :data:`FP8_DOTS`, from
    ``R1MEGA_PAGED_FP8_DOTS``; ``keys_major``: the
    keys-major kernel (None: :data:`KEYS_MAJOR`, from ``R1MEGA_PAGED_DECODE``); ``num_warps``,
    ``num_stages``: the launch (None: Triton's default stages), for the bench's sweeps;
    ``heads_inner``: the (Hkv, B) grid (None: ``R1MEGA_PAGED_GRID``, r1mega/rollout/cuda_paged.py).

    Every row must have ctx_len >= 1 (padded CUDA-graph rows point at the scratch block).
    """
    if not HAVE_TRITON:
        raise RuntimeError("paged_decode_attention needs Triton; use attend_gather instead.")
    bsz, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    group = hq // hkv
    if d & (d - 1):
        raise ValueError(f"Triton paged decode needs a power-of-two head_dim, got {d}.")
    if q.stride(-1) != 1:
        q = q.contiguous()  # rows and heads may be strided (a slice of the rotated q|k), D may not
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8:
        if k_scale is None or v_scale is None or k_scale.shape != k_cache.shape[:3] \
                or k_scale.stride() != v_scale.stride() or k_scale.stride(-1) != 1 \
                or k_scale.dtype != torch.float32 or v_scale.dtype != torch.float32:
            raise ValueError(f"paged_decode_attention: an FP8 cache {tuple(k_cache.shape)} needs float32 "
                             f"k_scale/v_scale of shape {tuple(k_cache.shape[:3])} sharing one layout "
                             f"(PagedKVCache.layer(i) gives them).")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if f16_dots is None and f8_dots is None:
        f16_dots, f8_dots = FP8_DOTS == "f16", FP8_DOTS == "f8"
    f8 = fp8 and bool(f8_dots) and q.dtype != torch.float32
    # FP8 dots default to the keys-major kernel: there both take Hopper's e4m3 wgmma (the
    # row kernel's 16-row M takes mma.sync)
    keys = (KEYS_MAJOR or f8) if keys_major is None else keys_major
    if f8 and f16_dots:
        raise ValueError("paged_decode_attention: f16_dots and f8_dots are two choices of the FP8 "
                         "cache's dot operands; pass one.")
    if block_n is None:
        # An FP8 tile also loads and applies a scale per key: longer tiles amortise that (the
        # block_n sweep of `r1mega bench decode-attention` is where the two defaults come from).
        # The keys-major kernel holds a converted 128-key FP8 tile in registers only by spilling
        # (sm_90, 4 warps), so it takes at most 64.
        block_n = max(32 if f8 else 16, min(128, 8 * bs) if fp8 and not keys else min(64, 4 * bs))
    elif block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"paged_decode_attention: block_n={block_n} must be a power of two >= 16.")
    if f8 and block_n < 32:
        raise ValueError(f"paged_decode_attention: f8_dots reduces over a tile's keys in FP8 dots, "
                         f"which take at least 32; block_n={block_n}.")
    ks, vs = (k_scale, v_scale) if fp8 else (k_cache, v_cache)  # unused pointers without FP8
    kernel = _paged_decode_keys_kernel if keys else _paged_decode_kernel
    launch = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps,
                                                                  "num_stages": num_stages}
    if heads_inner is None:
        heads_inner = cuda_paged.HEADS_INNER
    if heads_inner and bsz > 65535:
        raise ValueError(f"paged_decode_attention: {bsz} sequences on the heads-inner grid's second "
                         f"axis (at most 65535); set R1MEGA_PAGED_GRID=seqs.")
    kernel[(hkv, bsz) if heads_inner else (bsz, hkv)](
        q, k_cache, v_cache, block_tables, ctx_lens, out, ks, vs,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        ks.stride(0), ks.stride(1),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        SCALE=float(scale),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        D=d,
        BS=bs,
        BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32,
        FP8=fp8,
        F16_DOTS=fp8 and bool(f16_dots) and q.dtype != torch.float32,
        F8_DOTS=f8,
        HEADS_INNER=bool(heads_inner),
        **launch,
    )
    return out


@torch.library.custom_op("r1mega::paged_decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float,
                     k_scale: Optional[torch.Tensor] = None,
                     v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decode attention over the paged cache: the Triton kernel on CUDA (an FP8 cache's calls go
    to r1mega/rollout/cuda_paged.py's kernels unless ``R1MEGA_PAGED_FP8=triton``), the gather
    reference elsewhere. q (B, Hq, D) -> (B, Hq, D); the scales: an FP8 cache's (None otherwise)."""
    if cuda_paged.serves(q, k_cache, k_scale):
        return cuda_paged.paged_decode_fp8_cuda(q, k_cache, v_cache, block_tables, ctx_lens, scale,
                                                k_scale, v_scale)
    if q.is_cuda and HAVE_TRITON:
        return paged_decode_attention(q, k_cache, v_cache, block_tables, ctx_lens, scale,
                                      k_scale=k_scale, v_scale=v_scale)
    return attend_decode_gather(q, k_cache, v_cache, block_tables, ctx_lens, scale,
                                k_scale, v_scale).contiguous()


@decode_attention.register_fake
def _(q, k_cache, v_cache, block_tables, ctx_lens, scale, k_scale=None, v_scale=None):
    return q.new_empty(q.shape)
