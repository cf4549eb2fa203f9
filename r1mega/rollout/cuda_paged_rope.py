"""RoPE and the FP8 cache write inside the decode attention kernel (``R1MEGA_PAGED_FP8_ROPE``).

The FP8 decode step runs, per layer, :mod:`r1mega.rollout.triton_rope_kv`'s kernel (rotate q and
k, write k and v into the cache, write q back out) and then the tensor-core attention kernel
(:mod:`r1mega.rollout.cuda_paged`), which reads that q back. Here the attention kernel's CTA for
(sequence, KV head) does its head's part of the first kernel itself (csrc/paged_decode_rope.cuh):
one launch a layer fewer and no q round trip. The arithmetic is the eager reference's
(:func:`r1mega.rollout.triton_rope_kv.rope_kv_write_reference`: every product rounded to the
activation dtype, no fused multiply-add), which the Triton kernel on a GPU is not, so the cache
and the attention equal the reference path's bit for bit (tests/gpu/test_paged_rope_gpu.py).

The op keeps the decode ops' contract where the kernel cannot run (a CPU tensor, a shape it does
not take, the extension missing): the reference RoPE and cache write, then the decode op (and,
with ``rows``, the rows op) on the rotated q.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from r1mega import switches
from r1mega.rollout import cuda_paged

ROPE = switches.flag("R1MEGA_PAGED_FP8_ROPE", False,
                     "the FP8 rollout's decode attention kernel (tensor cores, one CTA a KV head) also "
                     "applies RoPE to q and k and writes the new K/V rows into the FP8 cache, from "
                     "linear_qkv's output (one kernel a layer fewer)")


class _QLike(NamedTuple):
    """What the decode kernel's checks read of q, for the q that qkv holds (no tensor made)."""
    is_cuda: bool
    dtype: torch.dtype
    device: torch.device
    shape: tuple


def _q_like(qkv: torch.Tensor, k_cache: torch.Tensor) -> _QLike:
    d, hkv = k_cache.shape[-1], k_cache.shape[-2]
    return _QLike(qkv.is_cuda, qkv.dtype, qkv.device, (qkv.shape[0], hkv * (qkv.shape[2] // d - 2), d))


def _layout_why_not(qkv: torch.Tensor, k_cache: torch.Tensor) -> Optional[str]:
    if cuda_paged.IMPL != "mma":
        return f"R1MEGA_PAGED_FP8={cuda_paged.IMPL}: RoPE in the kernel is the tensor-core kernel's"
    if cuda_paged.SEQ_CTA or cuda_paged.WARPS_PER_HEAD != 4:
        return ("RoPE in the kernel runs one CTA a KV head of four warps (R1MEGA_PAGED_GRID=seq or "
                "R1MEGA_PAGED_FP8_WARPS set otherwise)")
    d, hkv = k_cache.shape[-1], k_cache.shape[-2]
    if qkv.dim() != 3 or qkv.shape[1] != hkv or qkv.shape[2] % d or qkv.shape[2] // d < 3:
        return f"qkv of shape {tuple(qkv.shape)} is not (T, Hkv={hkv}, (G + 2) * D) with D={d}"
    if qkv.stride(-1) != 1 or qkv.stride(0) % 4 or qkv.stride(1) % 4:
        return f"qkv's strides {qkv.stride()} are not (4k, 4k, 1): a lane reads four elements at once"
    return None


def operands_why_not(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Optional[str]:
    """The base addresses' alignment (8 bytes: a lane reads four elements of each at once) and
    cos/sin's layout, checked eagerly where the op runs."""
    t, d = qkv.shape[0], qkv.shape[-1]
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] != t or cos.stride() != sin.stride() \
            or cos.stride(-1) != 1 or cos.stride(0) % 4:
        return f"cos/sin of shapes {tuple(cos.shape)}, {tuple(sin.shape)} and strides {cos.stride()}, " \
               f"{sin.stride()} are not one (T, D) layout with unit stride on D and rows of 4k"
    if any(x.data_ptr() % 8 for x in (qkv, cos, sin)):
        return "qkv, cos or sin does not start on 8 bytes"
    return None


def why_not(qkv: torch.Tensor, k_cache: torch.Tensor, k_scale: Optional[torch.Tensor],
            pointers: bool = True) -> Optional[str]:
    """None when the kernel takes linear_qkv's output ``qkv`` (T, Hkv, (G + 2) * D) with RoPE,
    else the reason: the tensor-core kernel (``R1MEGA_PAGED_FP8=mma``) with one CTA a KV head of
    four warps, besides the decode kernel's own conditions on the q it stands for."""
    return (_layout_why_not(qkv, k_cache)
            or cuda_paged.why_not(_q_like(qkv, k_cache), k_cache, k_scale, pointers))


def rows_why_not(qkv: torch.Tensor, k_cache: torch.Tensor, k_scale: Optional[torch.Tensor],
                 pointers: bool = True) -> Optional[str]:
    """As :func:`why_not`, for the call that also writes o_proj's input rows: the cluster rows
    epilogue's conditions too (:func:`r1mega.rollout.cuda_paged.rows_cluster_why_not`)."""
    return (_layout_why_not(qkv, k_cache)
            or cuda_paged.rows_cluster_why_not(_q_like(qkv, k_cache), k_cache, k_scale, pointers))


def serves(qkv: torch.Tensor, k_cache: torch.Tensor, k_scale: Optional[torch.Tensor],
           rows: bool = False) -> bool:
    """Whether the model runner should take this road: the switch, the conditions, the extension
    (while tracing: the shapes only, and an extension loaded before; as cuda_paged.serves_rows)."""
    if not ROPE:
        return False
    tracing = torch.compiler.is_compiling()
    if (cuda_paged.loaded() if tracing else cuda_paged.get()) is None:
        return False
    check = rows_why_not if rows else why_not
    return check(qkv, k_cache, k_scale, pointers=not tracing) is None


def paged_decode_fp8_rope(qkv, cos, sin, slots, row_scale, k_cache, v_cache, k_scale, v_scale,
                          block_tables, ctx_lens, scale: float, rows: bool = False,
                          power2: bool = True, pad: int = 16):
    """The kernel: qkv (T, Hkv, (G + 2) * D), cos/sin (T, D) -> (out (T, G * Hkv, D), e4m3 rows
    (T', Hq * D), float32 scales (T', 1)) with T' a multiple of ``pad`` (zero rows of scale 1),
    or 0-row tensors without ``rows``; the caches written at ``slots``. Raises with the reason
    where it cannot run."""
    reason = (rows_why_not if rows else why_not)(qkv, k_cache, k_scale) or operands_why_not(qkv, cos, sin)
    if reason is not None:
        raise ValueError(f"paged_decode_fp8_rope: {reason}")
    ext = cuda_paged.get()
    if ext is None:
        raise RuntimeError(f"paged_decode_fp8_rope: r1mega_attn_cuda is unavailable: {cuda_paged.load_error()}")
    t, hkv, d = qkv.shape[0], k_cache.shape[-2], k_cache.shape[-1]
    hq = hkv * (qkv.shape[2] // d - 2)
    out = qkv.new_empty((t, hq, d))
    q8, s8 = _rows_buffers(qkv, t, hq * d, rows, pad)
    ext.paged_decode_fp8_rope(qkv, cos, sin, slots, row_scale, k_cache, v_cache, k_scale, v_scale,
                              block_tables, ctx_lens, out, float(scale), bool(cuda_paged.HEADS_INNER),
                              q8 if rows else None, s8.view(-1) if rows else None, bool(power2),
                              cluster=rows)
    return out, q8, s8


def _rows_buffers(like: torch.Tensor, t: int, width: int, rows: bool, pad: int):
    if not rows:
        return (like.new_empty((0, width), dtype=torch.float8_e4m3fn),
                like.new_empty((0, 1), dtype=torch.float32))
    tp = -(-t // pad) * pad
    q8 = like.new_empty((tp, width), dtype=torch.float8_e4m3fn)
    s8 = like.new_empty((tp, 1), dtype=torch.float32)
    if tp > t:
        q8[t:].view(torch.uint8).zero_()
        s8[t:].fill_(1.0)
    return q8, s8


def reference(qkv, cos, sin, slots, row_scale, k_cache, v_cache, k_scale, v_scale, block_tables,
              ctx_lens, scale: float, rows: bool = False, power2: bool = True, pad: int = 16):
    """The op's contract by the unfused road: the eager RoPE and cache write, then the decode op
    (with ``rows``, the rows op) on the rotated q."""
    from r1mega.rollout import triton_paged  # noqa: F401  (registers the decode op)
    from r1mega.rollout.triton_rope_kv import rope_kv_write_reference

    t = qkv.shape[0]
    q = rope_kv_write_reference(qkv.unsqueeze(1), cos.reshape(t, 1, 1, -1), sin.reshape(t, 1, 1, -1),
                                slots, k_cache, v_cache, k_scale, v_scale, row_scale=row_scale)
    if rows:
        return cuda_paged.decode_attention_rows(q, k_cache, v_cache, block_tables, ctx_lens, scale,
                                                k_scale, v_scale, power2, pad)
    out = torch.ops.r1mega.paged_decode_attention(q, k_cache, v_cache, block_tables, ctx_lens, scale,
                                                  k_scale, v_scale)
    q8, s8 = _rows_buffers(qkv, t, q.shape[1] * q.shape[2], False, pad)
    return out, q8, s8


@torch.library.custom_op("r1mega::paged_decode_attention_rope",
                         mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def decode_attention_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                          row_scale: Optional[torch.Tensor], k_cache: torch.Tensor, v_cache: torch.Tensor,
                          k_scale: torch.Tensor, v_scale: torch.Tensor, block_tables: torch.Tensor,
                          ctx_lens: torch.Tensor, scale: float, rows: bool, power2: bool,
                          pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`paged_decode_fp8_rope` where the kernel takes the operands (checked again here,
    eagerly, with the pointers' alignment), else :func:`reference`."""
    check = rows_why_not if rows else why_not
    if (qkv.is_cuda and cuda_paged.get() is not None and check(qkv, k_cache, k_scale) is None
            and operands_why_not(qkv, cos, sin) is None):
        return paged_decode_fp8_rope(qkv, cos, sin, slots, row_scale, k_cache, v_cache, k_scale,
                                     v_scale, block_tables, ctx_lens, scale, rows, power2, pad)
    return reference(qkv, cos, sin, slots, row_scale, k_cache, v_cache, k_scale, v_scale,
                     block_tables, ctx_lens, scale, rows, power2, pad)


@decode_attention_rope.register_fake
def _(qkv, cos, sin, slots, row_scale, k_cache, v_cache, k_scale, v_scale, block_tables, ctx_lens,
      scale, rows, power2, pad):
    t, d = qkv.shape[0], k_cache.shape[-1]
    hq = k_cache.shape[-2] * (qkv.shape[2] // d - 2)
    tp = -(-t // pad) * pad if rows else 0
    return (qkv.new_empty((t, hq, d)), qkv.new_empty((tp, hq * d), dtype=torch.float8_e4m3fn),
            qkv.new_empty((tp, 1), dtype=torch.float32))
