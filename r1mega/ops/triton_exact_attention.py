"""The CUDA kernel of :mod:`r1mega.ops.exact_attention`: one program per (query, KV head).

Each program reads its query's sequence through a slot table (``slots[b, j]`` = the row of
sequence b's j-th key in K/V: a packed row in training, a paged cache slot in the rollout) and
walks keys 0..pos in blocks of KEY_BLOCK with an online softmax. Training and the rollout launch
this same compiled kernel (the same HEAD_DIM / group / block constants), and a query walks the
same blocks in both, so its result is the same bits whatever else the launch holds. The PyTorch
code in exact_attention.py is the reference (and the path off CUDA or for head sizes that are
not a power of two); tests/gpu/test_exact_gpu.py compares them.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit
    def _exact_attn_kernel(Q, K, V, SLOTS, QSEQ, QPOS, O, scale,
                           stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                           stride_ot, stride_oh, stride_sb,
                           G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                           KB: tl.constexpr, IEEE: tl.constexpr):
        t = tl.program_id(0)
        h = tl.program_id(1)  # KV head; its G query heads share the program
        seq = tl.load(QSEQ + t).to(tl.int64)
        pos = tl.load(QPOS + t).to(tl.int64)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        kk = tl.arange(0, KB)
        qmask = g < G
        q = tl.load(Q + t * stride_qt + (h * G + g)[:, None] * stride_qh + d[None, :],
                    mask=qmask[:, None], other=0.0)  # (G_PAD, D)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        l = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        n_blocks = (pos + KB) // KB  # blocks holding keys 0..pos
        for j in range(0, n_blocks):
            idx = j * KB + kk
            valid = idx <= pos
            slot = tl.load(SLOTS + seq * stride_sb + idx, mask=valid, other=0).to(tl.int64)
            k = tl.load(K + slot[:, None] * stride_kt + h * stride_kh + d[None, :],
                        mask=valid[:, None], other=0.0)  # (KB, D)
            v = tl.load(V + slot[:, None] * stride_vt + h * stride_vh + d[None, :],
                        mask=valid[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(valid[None, :], s * scale, float("-inf"))  # (G_PAD, KB)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        out = acc / l[:, None]
        tl.store(O + t * stride_ot + (h * G + g)[:, None] * stride_oh + d[None, :],
                 out.to(O.dtype.element_ty), mask=qmask[:, None])


KEY_BLOCK = 16


def supported(q: torch.Tensor) -> bool:
    """The kernel's domain; the choice depends on device and head size only, so training and
    the rollout of one model always take the same path."""
    d = q.shape[-1]
    return HAVE_TRITON and q.is_cuda and d >= 16 and d & (d - 1) == 0 and d <= 256


def exact_attention_slots(q, k_rows, v_rows, slots, q_seq, q_pos, scale: float) -> torch.Tensor:
    """q (T, Hq, D); k_rows/v_rows (N, Hkv, D) with stride 1 on D; slots (B, L) int rows of
    each sequence's keys; q_seq/q_pos (T,) -> (T, Hq, D) in q's dtype."""
    t, hq, d = q.shape
    hkv = k_rows.shape[1]
    g = hq // hkv
    out = torch.empty_like(q)
    if t == 0:
        return out
    slots = slots.to(torch.int64).contiguous()
    _exact_attn_kernel[(t, hkv)](
        q, k_rows, v_rows, slots, q_seq.to(torch.int64).contiguous(),
        q_pos.to(torch.int64).contiguous(), out, float(scale),
        q.stride(0), q.stride(1), k_rows.stride(0), k_rows.stride(1),
        v_rows.stride(0), v_rows.stride(1), out.stride(0), out.stride(1), slots.stride(0),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, KB=KEY_BLOCK,
        IEEE=q.dtype == torch.float32, num_warps=4)
    return out
