"""RoPE on q and k, and the K/V cache write, as one Triton kernel per layer (GPU only).

The unfused decode path spends five kernels per layer between the QKV projection and attention:
the RoPE elementwise kernel, two copies that make the split q/k/v contiguous, and two
``index_copy_`` writes of K and V into the paged cache. A decode step is bound by kernel count
(SmolLM2-135M at 64 rows: ~470 kernels, ~1.4 ms on an H200), so here one program per (token, KV
group) reads the group's q heads, k and v straight from the ``linear_qkv`` output, rotates q and k,
stores k and v at the token's cache slot and writes the rotated q heads for attention.

Input layout: megatron's mixed QKV, ``(T, 1, Hkv, (G + 2) * D)`` with G = Hq / Hkv, each KV group
holding its G query heads, then its key, then its value (``get_query_key_value_tensors`` with
``split_qkv=False``). The group's q heads and its k are D-wide rows back to back, so the kernel
rotates them as one (G + 1, D) tile.

Rotation: megatron's non-interleaved rotate-half over the full head width,
``y = x * cos + rotate_half(x) * sin`` with cos/sin in the activation dtype (what
``ModelRunner._rope_cos_sin`` gives). The kernel is written to round each product and the sum
to the activation dtype as PyTorch's eager ops do, and under Triton's interpreter it matches the
eager reference :func:`rope_kv_write_reference` bit for bit in bf16/fp16. Compiled for the H200
it does not: there the product ``x * cos`` is evidently not rounded before the sum. In every
bf16/fp16 test shape at least 99.95 % of the H200's elements (a diagnostic printed the share as
1.0 to three decimals) equal ``round(x * cos + round(rot * sin))`` with ``x * cos`` kept in fp32
(as a fused multiply-add would); they differ from eager by one ulp in about a quarter of the
elements. Simulated on CPU, that order has 0.81-0.86x eager's mean error. tests/gpu checks each
element against the rounding-error bound of the exact float64 rotation and the mean error
against eager's. The torch.compile'd module path differs from eager too (its inductor kernel
keeps the products in fp32).

FP8 cache (r1mega/rollout/kv_cache.py): the kernel quantises the rotated k row and the v row as
:func:`r1mega.rollout.kv_cache.quantize_rows` does (amax / 448 scale, float32 division rounded to
nearest, round to nearest even into e4m3) and stores the two scales at the token's slot; the
rotation and the q output are unchanged.

``rollout.exact`` needs the eager bits (its training forward rotates with the eager ops), so
its decode launches the kernel with ``exact=True``: bf16 rounding by the integer ops of
``RTNE_BITS`` (no compiler can drop a rounding written that way) and FP contraction off
(``enable_fp_fusion=False``), for bf16 and fp32 activations (:func:`exact_rounding_supported`).
tests/gpu checks that variant against :func:`rope_kv_write_reference` bit for bit.

FP8 rollout (r1mega/precision/rollout.py): with per-row activation scales the qkv GEMM can leave
its output unscaled; ``row_scale`` multiplies each token's row on the kernel's read (a power of
two: exact) and saves the decode step a pointwise pass over qkv per layer.

A fresh prefill runs the same kernel with ``kv_out``: it also stores the rotated k and the v
rows for the prefill's attention, which reads them rather than the (maybe FP8) cache
(:func:`rope_kv_write_prefill`).

Interleaved or partial rotary and Qwen3's q/k norms (applied between the split and RoPE) are not
covered: the runner keeps the unfused path for them.

Both the kernel and :func:`r1mega.rollout.triton_paged.decode_attention` are custom ops, so a
compiled decode forward is one graph, not one fragment per layer between graph breaks.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from r1mega.rollout.kv_cache import FP8_DTYPE, FP8_MAX, write_slots

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False


def rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Full-width rotate-half RoPE on q (T, 1, Hq, D) and k (T, 1, Hkv, D); cos/sin (T, 1, 1, D)
    in the activation dtype.

    megatron's exact elementwise sequence, ``t * cos + rotate_half(t) * sin``, with q and k rotated
    together in one set of kernels (the eager path and the reference of the Triton kernel)."""
    hq = q.shape[2]
    qk = torch.cat((q, k), dim=2)
    x1, x2 = torch.chunk(qk, 2, dim=-1)
    qk = (qk * cos) + (torch.cat((-x2, x1), dim=-1) * sin)
    return qk[:, :, :hq], qk[:, :, hq:]


def _split(qkv: torch.Tensor, k_cache: torch.Tensor):
    """(T, [1,] Hkv, (G + 2) * D) mixed QKV -> T, Hkv, G, D, checking it against the cache."""
    t = qkv.shape[0]
    hkv, d = k_cache.shape[-2], k_cache.shape[-1]
    group = qkv.shape[-1] // d - 2
    if group < 1 or qkv.shape[-2] != hkv or qkv.shape[-1] != (group + 2) * d \
            or qkv.numel() != t * hkv * (group + 2) * d:
        raise ValueError(
            f"rope_kv_write: mixed QKV of shape {tuple(qkv.shape)} is not (T, 1, Hkv={hkv}, "
            f"(G + 2) * D) with D={d} (the KV cache's head layout); pass linear_qkv's output as "
            f"get_query_key_value_tensors(..., split_qkv=False) returns it."
        )
    return t, hkv, group, d


def apply_row_scale(qkv: torch.Tensor, row_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """qkv (T, ...) times its rows' float32 scales (T,), rounded back to qkv's dtype: the FP8
    rollout's row-scaled GEMM output (r1mega/precision/gemm.py), applied here instead."""
    if row_scale is None:
        return qkv
    t = qkv.shape[0]
    return (qkv.float() * row_scale.reshape(t, *[1] * (qkv.dim() - 1))).to(qkv.dtype)


def rope_kv_write_reference(qkv, cos, sin, slots, k_cache, v_cache, k_scale=None,
                            v_scale=None, kv_out: bool = False, row_scale=None):
    """The unfused path: megatron's per-group split, :func:`rotate_qk`, the cache write.

    qkv (T, 1, Hkv, (G + 2) * D); cos/sin (T, 1, 1, D); slots (T,); caches (N, bs, Hkv, D)
    (written in place; an FP8 cache with its scales (N, bs, Hkv)); ``row_scale`` (T,) float32:
    qkv's rows are to be multiplied by it first (:func:`apply_row_scale`). Returns the rotated
    q (T, Hq, D), and with ``kv_out`` also the rotated k and the v rows (T, Hkv, D)."""
    t, hkv, group, d = _split(qkv, k_cache)
    qkv = apply_row_scale(qkv, row_scale)
    x = qkv.reshape(t, 1, hkv, (group + 2) * d)
    q, k, v = torch.split(x, [group * d, d, d], dim=3)  # what get_query_key_value_tensors does
    q, k = rotate_qk(q.reshape(t, 1, hkv * group, d), k, cos, sin)
    write_slots(k_cache, v_cache, slots, k, v, k_scale, v_scale)
    q = q.reshape(t, hkv * group, d).contiguous()
    if kv_out:
        return q, k.reshape(t, hkv, d).contiguous(), v.reshape(t, hkv, d).contiguous()
    return q


def rope_kv_write_prefill(qkv, cos, sin, slots, k_cache, v_cache, k_scale=None, v_scale=None):
    """A fresh prefill's RoPE and cache write: (q (T, Hq, D), k, v (T, Hkv, D)) for its attention,
    the caches written. The kernel (``kv_out``) where it runs, else the reference."""
    if not (HAVE_TRITON and (qkv.is_cuda or interpreting())):
        return rope_kv_write_reference(qkv, cos, sin, slots, k_cache, v_cache, k_scale, v_scale,
                                       kv_out=True)
    t, hkv, _, d = _split(qkv, k_cache)
    k = torch.empty(t, hkv, d, dtype=qkv.dtype, device=qkv.device)
    v = torch.empty_like(k)
    q = rope_kv_write_triton(qkv, cos, sin, slots, k_cache, v_cache, k_scale=k_scale,
                             v_scale=v_scale, kv_out=(k, v))
    return q, k, v


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if HAVE_TRITON:
    from r1mega.precision.triton_quant import _round_e4m3

    @triton.jit
    def _to_act(y, dtype: tl.constexpr, RTNE_BITS: tl.constexpr):
        # fp32 -> activation dtype. Triton's interpreter truncates fp32 -> bf16 where the GPU
        # (and PyTorch) round to nearest even; RTNE_BITS (interpreter only) rounds by integer ops,
        # as c10::BFloat16 does, so the CPU test checks the GPU's arithmetic bit for bit.
        if RTNE_BITS:
            bits = y.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return y.to(dtype)

    @triton.jit
    def _negate(x):
        # float32 -x as a sign-bit flip. Triton releases before triton-lang/triton#10270 lower
        # unary minus on floats to 0 - x, which gives +0 for +0 where torch gives -0, and the
        # sign of a zero reaches the cache (e4m3 byte 0x80, not 0x00).
        return (x.to(tl.uint32, bitcast=True) ^ 0x80000000).to(tl.float32, bitcast=True)

    @triton.jit
    def _fp8_rows(x, FP8_MAX: tl.constexpr):
        # (R, D) float32 rows -> (e4m3 rows, (R,) scales), as kv_cache.quantize_rows: div_rn is
        # the correctly rounded division torch does (Triton's "/" is an approximate one).
        amax = tl.max(tl.abs(x), 1)
        scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, FP8_MAX, tl.float32)), 1.0)
        y = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
        y = _round_e4m3(tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX))
        return y.to(tl.float8e4nv), scale  # exact: y is on the e4m3 grid

    @triton.jit
    def _scaled(x, s, ROW_SCALE: tl.constexpr, RTNE_BITS: tl.constexpr):
        # x (activation dtype) times its row's scale, rounded back: apply_row_scale's arithmetic
        if ROW_SCALE:
            return _to_act(x.to(tl.float32) * s, x.dtype, RTNE_BITS)
        else:
            return x

    @triton.jit
    def _rope_kv_write_kernel(
        QKV, COS, SIN, SLOTS, KC, VC, QO, KS, VS, KO, VO, RS,
        stride_xt, stride_ct, stride_s,
        stride_kb, stride_kt, stride_kh,
        stride_sb, stride_st,
        stride_qt, stride_ot,
        GROUP: tl.constexpr,
        ROWS: tl.constexpr,  # next power of two >= GROUP + 1: the group's q heads and its k
        D: tl.constexpr,
        BS: tl.constexpr,
        RTNE_BITS: tl.constexpr,
        FP8: tl.constexpr,  # e4m3 caches with float32 scales KS/VS (N, bs, Hkv); else unused
        FP8_MAX: tl.constexpr,
        KV_OUT: tl.constexpr,  # also the rotated k and the v rows at KO/VO (T, Hkv, D): prefill
        ROW_SCALE: tl.constexpr,  # qkv's rows times float32 scales RS (T,) first
    ):
        tok = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        r = tl.arange(0, ROWS)
        d = tl.arange(0, D)
        half = D // 2
        base = QKV + tok * stride_xt + g * ((GROUP + 2) * D)
        row_ok = (r < GROUP + 1)[:, None]
        if ROW_SCALE:
            rs = tl.load(RS + tok)
        else:
            rs = 1.0
        x = tl.load(base + r[:, None] * D + d[None, :], mask=row_ok, other=0.0)  # (ROWS, D)
        x = _scaled(x, rs, ROW_SCALE, RTNE_BITS)
        # rotate_half(x) = cat(-x2, x1): element d reads its partner d +- D/2.
        partner = tl.load(base + r[:, None] * D + ((d + half) % D)[None, :], mask=row_ok, other=0.0)
        partner = _scaled(partner, rs, ROW_SCALE, RTNE_BITS)
        partner = partner.to(tl.float32)  # negated in fp32, exact (the interpreter miscomputes bf16 -x)
        rot = tl.where((d < half)[None, :], _negate(partner), partner)
        cos = tl.load(COS + tok * stride_ct + d).to(tl.float32)[None, :]
        sin = tl.load(SIN + tok * stride_ct + d).to(tl.float32)[None, :]
        # Round each product and the sum to the activation dtype, as the eager ops do (the H200
        # build drops the first rounding: module docstring).
        a = _to_act(x.to(tl.float32) * cos, x.dtype, RTNE_BITS)
        b = _to_act(rot * sin, x.dtype, RTNE_BITS)
        y = _to_act(a.to(tl.float32) + b.to(tl.float32), x.dtype, RTNE_BITS)

        q_ptr = QO + tok * stride_qt + (g * GROUP + r)[:, None] * D + d[None, :]
        tl.store(q_ptr, y.to(QO.dtype.element_ty), mask=(r < GROUP)[:, None])

        v = _scaled(tl.load(base + (GROUP + 1) * D + d), rs, ROW_SCALE, RTNE_BITS)
        if KV_OUT:  # prefill's attention reads the fresh rows, not the (maybe FP8) cache
            o_off = tok * stride_ot + g * D
            tl.store(KO + o_off + r[:, None] * 0 + d[None, :], y.to(KO.dtype.element_ty),
                     mask=(r == GROUP)[:, None])
            tl.store(VO + o_off + d, v)
        slot = tl.load(SLOTS + tok * stride_s).to(tl.int64)
        off = (slot // BS) * stride_kb + (slot % BS) * stride_kt + g * stride_kh
        # Every row points at the key's slot; only the key row (r == GROUP) is stored.
        k_ptr = KC + off + r[:, None] * 0 + d[None, :]
        if FP8:
            s_off = (slot // BS) * stride_sb + (slot % BS) * stride_st + g
            # The key row rotated again on its own (the tile's arithmetic, written the same way)
            # and quantised alone: the quantiser's IEEE divisions over the whole tile, or picking
            # the row out of it (a cross-warp reduction), cost more than the rotation.
            kx = _scaled(tl.load(base + GROUP * D + d), rs, ROW_SCALE, RTNE_BITS).to(tl.float32)
            kp = _scaled(tl.load(base + GROUP * D + (d + half) % D), rs, ROW_SCALE,
                         RTNE_BITS).to(tl.float32)
            krot = tl.where(d < half, _negate(kp), kp)
            ka = _to_act(kx * cos, QKV.dtype.element_ty, RTNE_BITS)
            kb = _to_act(krot * sin, QKV.dtype.element_ty, RTNE_BITS)
            key = _to_act(ka.to(tl.float32) + kb.to(tl.float32), QKV.dtype.element_ty, RTNE_BITS)
            k8, k_sc = _fp8_rows(key.to(tl.float32), FP8_MAX)  # (1, D) (cos is), (1,)
            tl.store(KC + off + d[None, :], k8)
            tl.store(KS + s_off, tl.max(k_sc, 0))
            v8, v_sc = _fp8_rows(v.to(tl.float32)[None, :], FP8_MAX)  # (1, D), (1,)
            tl.store(VC + off + d[None, :], v8)
            tl.store(VS + s_off, tl.max(v_sc, 0))  # the one row's scale, as a scalar
        else:
            tl.store(k_ptr, y.to(KC.dtype.element_ty), mask=(r == GROUP)[:, None])
            tl.store(VC + off + d, v.to(VC.dtype.element_ty))


def exact_rounding_supported(dtype: torch.dtype) -> bool:
    """Activation dtypes whose ``exact=True`` kernel rounds as the eager ops do (fp16 would need
    its own integer rounding)."""
    return dtype in (torch.bfloat16, torch.float32)


def rope_kv_write_triton(qkv, cos, sin, slots, k_cache, v_cache, out=None, k_scale=None,
                         v_scale=None, exact: bool = False, kv_out=None, row_scale=None) -> torch.Tensor:
    """The Triton kernel; same arguments and result as :func:`rope_kv_write_reference` (``out``:
    a contiguous (T, Hq, D) tensor for the rotated q, else a new one). ``exact``: round as the
    eager reference does, bit for bit (module docstring; bf16 and fp32 only). ``kv_out``: two
    contiguous (T, Hkv, D) tensors of qkv's dtype that receive the rotated k and the v rows too
    (the prefill attends over them). ``row_scale``: (T,) float32 scales of qkv's rows, applied
    on the read (the FP8 rollout's qkv GEMM leaves them to this kernel)."""
    if not HAVE_TRITON:
        raise RuntimeError("rope_kv_write_triton needs Triton; use rope_kv_write_reference.")
    if exact and not exact_rounding_supported(qkv.dtype):
        raise ValueError(f"rope_kv_write_triton(exact=True) rounds bf16 and fp32 activations, not "
                         f"{qkv.dtype}; use rope_kv_write_reference for it.")
    t, hkv, group, d = _split(qkv, k_cache)
    if d & (d - 1) or d < 2:
        raise ValueError(f"rope_kv_write_triton needs a power-of-two head_dim, got {d}.")
    x = qkv.reshape(t, hkv * (group + 2) * d)  # a view of linear_qkv's output: no copy
    cos, sin = cos.reshape(t, d), sin.reshape(t, d)
    if x.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError("rope_kv_write_triton: qkv rows and cos/sin rows must be contiguous.")
    if cos.dtype != qkv.dtype or sin.dtype != qkv.dtype:
        raise ValueError(f"rope_kv_write_triton: cos/sin must be in the activation dtype "
                         f"{qkv.dtype} (the reference multiplies in it), got {cos.dtype}.")
    if k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("rope_kv_write_triton: K and V caches must share one layout with D innermost.")
    fp8 = k_cache.dtype == FP8_DTYPE
    if fp8 and (k_scale is None or v_scale is None or k_scale.shape != k_cache.shape[:3]
                or k_scale.stride() != v_scale.stride() or k_scale.stride(-1) != 1
                or k_scale.dtype != torch.float32 or v_scale.dtype != torch.float32):
        raise ValueError(f"rope_kv_write_triton: an FP8 cache {tuple(k_cache.shape)} needs float32 "
                         f"k_scale/v_scale of shape {tuple(k_cache.shape[:3])} sharing one layout "
                         f"(PagedKVCache.layer(i) gives them).")
    ks, vs = (k_scale, v_scale) if fp8 else (k_cache, v_cache)  # unused pointers without FP8
    q = out if out is not None else torch.empty((t, hkv * group, d), dtype=qkv.dtype, device=qkv.device)
    if q.shape != (t, hkv * group, d) or not q.is_contiguous():
        raise ValueError(f"rope_kv_write_triton: out must be a contiguous {(t, hkv * group, d)} tensor.")
    ko, vo = kv_out if kv_out is not None else (q, q)  # unused pointers without KV_OUT
    if row_scale is not None and (row_scale.dtype != torch.float32 or row_scale.numel() != t
                                  or not row_scale.is_contiguous()):
        raise ValueError(f"rope_kv_write_triton: row_scale must be {t} contiguous float32 scales, "
                         f"got {row_scale.dtype} of shape {tuple(row_scale.shape)}.")
    rs = row_scale if row_scale is not None else q  # an unused pointer without ROW_SCALE
    if kv_out is not None and any(o.shape != (t, hkv, d) or not o.is_contiguous() or o.dtype != qkv.dtype
                                  for o in kv_out):
        raise ValueError(f"rope_kv_write_triton: kv_out must be two contiguous {(t, hkv, d)} "
                         f"{qkv.dtype} tensors.")
    if t == 0:
        return q
    bs = k_cache.shape[1]
    _rope_kv_write_kernel[(t, hkv)](
        x, cos, sin, slots, k_cache, v_cache, q, ks, vs, ko, vo, rs,
        x.stride(0), cos.stride(0), slots.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        ks.stride(0), ks.stride(1),
        q.stride(0), ko.stride(0),
        GROUP=group,
        ROWS=triton.next_power_of_2(group + 1),
        D=d,
        BS=bs,
        RTNE_BITS=(exact or interpreting()) and qkv.dtype == torch.bfloat16,
        FP8=fp8,
        FP8_MAX=FP8_MAX,
        KV_OUT=kv_out is not None,
        ROW_SCALE=row_scale is not None,
        num_warps=1 if (group + 1) * d <= 512 else 4,
        **({"enable_fp_fusion": False} if exact else {}),  # the default variant: Triton's default
    )
    return q


# One opaque node for dynamo: inductor re-inplaces the cache mutation and fuses around it. The
# FP8 cache's variant takes its scales as required mutated arguments (see kv_cache.py: torch
# 2.11 mishandles optional mutated ones).
@torch.library.custom_op("r1mega::rope_kv_write", mutates_args=("k_cache", "v_cache"))
def rope_kv_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor,
                  row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RoPE + cache write of one layer: the Triton kernel on CUDA, the reference elsewhere."""
    if qkv.is_cuda and HAVE_TRITON:
        return rope_kv_write_triton(qkv, cos, sin, slots, k_cache, v_cache, row_scale=row_scale)
    return rope_kv_write_reference(qkv, cos, sin, slots, k_cache, v_cache, row_scale=row_scale)


@torch.library.custom_op("r1mega::rope_kv_write_fp8",
                         mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def rope_kv_write_fp8(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor,
                      v_scale: torch.Tensor, row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`rope_kv_write` into an FP8 cache with its per-(token, head) scales."""
    if qkv.is_cuda and HAVE_TRITON:
        return rope_kv_write_triton(qkv, cos, sin, slots, k_cache, v_cache, k_scale=k_scale,
                                    v_scale=v_scale, row_scale=row_scale)
    return rope_kv_write_reference(qkv, cos, sin, slots, k_cache, v_cache, k_scale, v_scale,
                                   row_scale=row_scale)


def _rope_kv_write_fake(qkv, cos, sin, slots, k_cache, v_cache, k_scale=None, v_scale=None,
                        row_scale=None):
    t = qkv.shape[0]
    hkv, d = k_cache.shape[-2], k_cache.shape[-1]
    group = qkv.shape[-1] // d - 2  # the last dim is one group's (G + 2) * D
    return qkv.new_empty((t, hkv * group, d))


rope_kv_write.register_fake(_rope_kv_write_fake)
rope_kv_write_fp8.register_fake(_rope_kv_write_fake)


def rope_kv_write_op(qkv, cos, sin, slots, k_cache, v_cache, k_scale=None, v_scale=None,
                     row_scale=None):
    """The op for this cache: bf16 (no scales) or FP8 (with its scales); ``row_scale`` (T,)
    float32: qkv's rows still to be scaled (the FP8 rollout's unscaled qkv GEMM)."""
    if k_scale is None:
        return torch.ops.r1mega.rope_kv_write(qkv, cos, sin, slots, k_cache, v_cache, row_scale)
    return torch.ops.r1mega.rope_kv_write_fp8(qkv, cos, sin, slots, k_cache, v_cache, k_scale,
                                              v_scale, row_scale)
