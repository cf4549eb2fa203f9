"""Fused Triton kernel for untruncated Gumbel-max sampling (GPU fast path of ``sample``).

The PyTorch code in :mod:`r1mega.rollout.sampling` makes about ten passes over a (B, V) float32
tensor per decode step (pad mask, division by the temperature, the int64 hash, two logs, the
argmax, two log-sum-exps, gathers). Without top-k/top-p every one of them is a per-row reduction
of an elementwise function of the logits, so one read of the (bf16) logits can feed them all:

- ``_partials_kernel``, grid (rows, column chunks): for its chunk, the best score ``z + g`` and
  its column (lowest column on ties), and online (max, sum of exp) of ``z`` -- and of the raw
  logits when temperature-1 log-probs are wanted. A tile whose best possible score
  (``max z + G_BOUND``) is below the chunk's best so far skips the hash and the two logs: exact,
  and it pays on peaked rows. Elsewhere the two precise logs per element make the kernel
  compute-bound rather than bandwidth-bound (roughly 130 instructions per element in the SASS).
- ``_combine_kernel``, grid (rows,): merges the chunks, reads the winner's logit, and writes
  what ``sample`` needs: the local winner, its z and raw value, the local (max, sum) pairs for a
  vocab-parallel log-sum-exp, and the finished log-probs for the unsharded case.

Bit-exactness with the reference: the hash runs on uint32 (wrapping multiply = ``& 0xFFFFFFFF``
of the int64 product; unsigned shifts are logical); ``raw / T`` uses IEEE division
(``div_rn``; Triton's ``/`` is the approximate ``div.full``); the Gumbel logs use libdevice's
``logf``, the CUDA math library routine behind eager ``torch.log``. So scores should match the
eager PyTorch reference bit for bit, and with them the argmax and its tie-breaking (Triton
flushes denormals in ``div_rn``, which cannot matter for a sampled token). The log-sum-exps use
``tl.exp`` and another summation order: log-probs agree to float32 rounding, not bit for bit.

Under ``TRITON_INTERPRET=1`` (CPU tests) libdevice cannot run; ``tl.log`` (numpy's log) stands in,
which may differ from torch's CPU log in the last ulp. The PyTorch reference is
:func:`r1mega.rollout.sampling.sample` with ``R1MEGA_TRITON_SAMPLING=0``; tests/gpu compares them.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False

libdevice = None
if HAVE_TRITON:
    try:
        from triton.language.extra import libdevice
    except ImportError:
        try:
            from triton.language.extra.cuda import libdevice
        except ImportError:
            libdevice = None

# The largest Gumbel draw is -log(-log(1 - 2^-24)) = 16.64 (u is clamped below 1, see
# sampling.gumbel_noise); a margin keeps the skip test exact under float32 rounding of
# max(z) + bound, which is monotone: no skipped score can reach or tie the best.
G_BOUND = 18.0
U_MAX = 1.0 - 2.0**-24

# Rows of the combine kernel's float32 output (n_fields, B).
BEST, Z_TOK, RAW_TOK, M_Z, S_Z, M_RAW, S_RAW, LP, LP_T1 = range(9)
_N_OUT = 9
_N_PART = 5  # planes of the partials: best, m_z, s_z, m_raw, s_raw


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if HAVE_TRITON:

    @triton.jit
    def _log(x, LIBDEVICE: tl.constexpr):
        if LIBDEVICE:
            return libdevice.log(x)
        else:
            return tl.log(x)

    @triton.jit
    def _hash32(x):
        # uint32 in, uint32 out: the products wrap mod 2^32 and the shifts are logical.
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x5BD1E995
        x = x ^ (x >> 16)
        return x

    @triton.jit
    def _online_lse(m, s, x, x_max):
        # (m, s) = running max and sum of exp(x - m); the safe max keeps all -inf tiles
        # (vocabulary padding) from producing exp(-inf + inf) = NaN.
        m_new = tl.maximum(m, x_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
        return m_new, s

    @triton.jit
    def _partials_kernel(
        L, stride_l, TEMP, KEYS, stride_k, VH, PART, IDX,
        n_cols, valid_cols, n_rows, n_chunks,
        BLOCK: tl.constexpr,
        TILES: tl.constexpr,  # tiles per chunk, a power of two: few variants, and a constexpr
        # trip count also runs under the interpreter, whose runtime ints numpy >= 2.3 can't int()
        WANT_RAW: tl.constexpr,
        LIBDEVICE: tl.constexpr,
        G_BOUND: tl.constexpr,
        U_MAX: tl.constexpr,
    ):
        b = tl.program_id(0)
        c = tl.program_id(1)
        t_in = tl.load(TEMP + b)
        noisy = t_in > 0.0  # temperature <= 0: greedy, no noise, T = 1
        temp = tl.where(noisy, t_in, 1.0)
        key = tl.load(KEYS + b * stride_k).to(tl.uint32)
        row = L + b.to(tl.int64) * stride_l
        offs = tl.arange(0, BLOCK)
        c0 = c * (TILES * BLOCK)

        best = float("-inf")
        idx = c0  # an all -inf chunk reports its first column, as torch.max reports index 0
        m_z = float("-inf")
        s_z = 0.0
        m_r = float("-inf")
        s_r = 0.0
        for t in range(0, TILES):
            cols = c0 + t * BLOCK + offs
            # Masked on n_cols (a multiple of 16 in practice), so the load vectorises; padding
            # columns (true_vocab is arbitrary) are set to -inf after it.
            x = tl.load(row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            x = tl.where(cols < valid_cols, x, float("-inf"))
            # x / 1 == x exactly, and R1-style RL samples at T = 1: skip the division and the
            # second log-sum-exp there (uniform branches, one per tile).
            if temp != 1.0:
                z = tl.math.div_rn(x, tl.broadcast_to(temp, [BLOCK]))
            else:
                z = x
            z_max = tl.max(z, 0)
            m_z, s_z = _online_lse(m_z, s_z, z, z_max)
            if WANT_RAW:
                if temp != 1.0:
                    m_r, s_r = _online_lse(m_r, s_r, x, tl.max(x, 0))
                else:
                    m_r, s_r = m_z, s_z
            score = z  # greedy rows; and skipped tiles, whose z < best - G_BOUND cannot win
            if noisy & (z_max + G_BOUND >= best):
                vh = tl.load(VH + cols, mask=cols < n_cols, other=0).to(tl.uint32)
                h = _hash32(key ^ vh)
                u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
                u = tl.minimum(u, U_MAX)
                score = z + -_log(-_log(u, LIBDEVICE), LIBDEVICE)
            t_best = tl.max(score, 0)
            t_idx = tl.min(tl.where(score == t_best, cols, 2147483647), 0)
            take = t_best > best  # strict: an earlier tile keeps a tie
            idx = tl.where(take, t_idx, idx)
            best = tl.where(take, t_best, best)

        plane = n_rows * n_chunks
        p = PART + b * n_chunks + c
        tl.store(p, best)
        tl.store(p + plane, m_z)
        tl.store(p + 2 * plane, s_z)
        tl.store(p + 3 * plane, m_r)
        tl.store(p + 4 * plane, s_r)
        tl.store(IDX + b * n_chunks + c, idx)

    @triton.jit
    def _merge_lse(m, s, ok):
        m = tl.where(ok, m, float("-inf"))
        s = tl.where(ok, s, 0.0)
        big = tl.max(m, 0)
        safe = tl.where(big == float("-inf"), 0.0, big)
        return big, tl.sum(s * tl.exp(m - safe), 0)

    @triton.jit
    def _combine_kernel(
        L, stride_l, TEMP, PART, IDX, OUT, TOK,
        n_rows, n_chunks, valid_cols, vocab_start,
        C_PAD: tl.constexpr,
        WANT_RAW: tl.constexpr,
        LIBDEVICE: tl.constexpr,
    ):
        b = tl.program_id(0)
        cc = tl.arange(0, C_PAD)
        ok = cc < n_chunks
        plane = n_rows * n_chunks
        p = PART + b * n_chunks + cc
        best_c = tl.load(p, mask=ok, other=float("-inf"))
        best = tl.max(best_c, 0)
        idx_c = tl.load(IDX + b * n_chunks + cc, mask=ok, other=2147483647)
        idx = tl.min(tl.where(ok & (best_c == best), idx_c, 2147483647), 0)  # lowest column
        m_z, s_z = _merge_lse(tl.load(p + plane, mask=ok), tl.load(p + 2 * plane, mask=ok), ok)

        t_in = tl.load(TEMP + b)
        temp = tl.where(t_in > 0.0, t_in, 1.0)
        raw = tl.load(L + b.to(tl.int64) * stride_l + idx, mask=idx < valid_cols,
                      other=float("-inf")).to(tl.float32)
        z = tl.math.div_rn(raw, temp)
        # Same operation order as the reference: x[tok] - (m + log(s)).
        lp = z - (m_z + _log(s_z, LIBDEVICE))

        o = OUT + b
        tl.store(o + 0 * n_rows, best)
        tl.store(o + 1 * n_rows, z)
        tl.store(o + 2 * n_rows, raw)
        tl.store(o + 3 * n_rows, m_z)
        tl.store(o + 4 * n_rows, s_z)
        tl.store(o + 7 * n_rows, lp)
        if WANT_RAW:
            m_r, s_r = _merge_lse(tl.load(p + 3 * plane, mask=ok), tl.load(p + 4 * plane, mask=ok), ok)
            tl.store(o + 5 * n_rows, m_r)
            tl.store(o + 6 * n_rows, s_r)
            tl.store(o + 8 * n_rows, raw - (m_r + _log(s_r, LIBDEVICE)))
        tl.store(TOK + b, idx.to(tl.int64) + vocab_start)


class FusedSample(NamedTuple):
    """Per-row results over this rank's columns (global token ids)."""

    tokens: torch.Tensor  # (B,) int64 best column, as a global id
    best: torch.Tensor  # (B,) float32 its score
    z_tok: torch.Tensor  # (B,) logits / T at that column
    raw_tok: torch.Tensor  # (B,) logits at that column (-inf if padding)
    m_z: torch.Tensor  # (B,) max of z over the local columns
    s_z: torch.Tensor  # (B,) sum of exp(z - m_z)
    m_raw: Optional[torch.Tensor]  # as m_z, s_z for the raw logits (want_raw only)
    s_raw: Optional[torch.Tensor]
    logprobs: torch.Tensor  # (B,) z_tok - lse(z): final when the vocabulary is not sharded
    logprobs_t1: Optional[torch.Tensor]  # (B,) raw_tok - lse(raw) (want_raw only)


_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SMS[key]


def _layout(n_rows: int, n_cols: int, device: torch.device, block: Optional[int]):
    """(BLOCK, num_warps, tiles per chunk, chunks): about 4 programs per SM, so that a batch of
    one row still spreads its vocabulary over the GPU and 256 rows do not over-split."""
    sms = _num_sms(device)
    if block is None:
        block = 2048 if n_rows * triton.cdiv(n_cols, 2048) >= 2 * sms else 1024
    n_tiles = max(1, triton.cdiv(n_cols, block))
    chunks = min(n_tiles, max(1, triton.cdiv(4 * sms, n_rows)))
    tiles_per_chunk = triton.next_power_of_2(triton.cdiv(n_tiles, chunks))
    chunks = triton.cdiv(n_tiles, tiles_per_chunk)
    return block, (8 if block >= 2048 else 4), tiles_per_chunk, chunks


def fused_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    keys: torch.Tensor,
    vocab_ids_hashed: torch.Tensor,
    vocab_start: int,
    true_vocab: int,
    want_raw: bool,
    block: Optional[int] = None,
) -> FusedSample:
    """Untruncated Gumbel-max over this rank's logits (B, V_local), any float dtype.

    temperature (B,) float32 (<= 0: greedy), keys (B,) integer step keys < 2^32,
    vocab_ids_hashed (V_local,) integer < 2^32. No host synchronisation: capturable.
    """
    if not HAVE_TRITON:
        raise RuntimeError("fused_sample needs Triton; use sampling.sample's PyTorch path.")
    n_rows, n_cols = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    temperature = temperature.to(torch.float32).contiguous()
    # keys may be a column of the CUDA-graph step's packed rows: read in place, by its stride
    vocab_ids_hashed = vocab_ids_hashed.contiguous()
    assert vocab_ids_hashed.numel() == n_cols and keys.numel() == n_rows == temperature.numel()
    dev = logits.device
    block, warps, tiles_per_chunk, chunks = _layout(n_rows, n_cols, dev, block)
    valid_cols = max(0, min(n_cols, true_vocab - vocab_start))
    libdev = libdevice is not None and not interpreting()

    part = torch.empty(_N_PART, n_rows, chunks, dtype=torch.float32, device=dev)
    idx = torch.empty(n_rows, chunks, dtype=torch.int32, device=dev)
    _partials_kernel[(n_rows, chunks)](
        logits, logits.stride(0), temperature, keys, keys.stride(0), vocab_ids_hashed, part, idx,
        n_cols, valid_cols, n_rows, chunks,
        BLOCK=block, TILES=tiles_per_chunk, WANT_RAW=bool(want_raw), LIBDEVICE=libdev, G_BOUND=G_BOUND, U_MAX=U_MAX,
        num_warps=warps,
    )
    out = torch.empty(_N_OUT, n_rows, dtype=torch.float32, device=dev)
    tokens = torch.empty(n_rows, dtype=torch.int64, device=dev)
    _combine_kernel[(n_rows,)](
        logits, logits.stride(0), temperature, part, idx, out, tokens,
        n_rows, chunks, valid_cols, vocab_start,
        C_PAD=max(16, triton.next_power_of_2(chunks)), WANT_RAW=bool(want_raw), LIBDEVICE=libdev,
        num_warps=1,
    )
    raw_or_none = (lambda i: out[i]) if want_raw else (lambda i: None)
    return FusedSample(
        tokens=tokens, best=out[BEST], z_tok=out[Z_TOK], raw_tok=out[RAW_TOK], m_z=out[M_Z],
        s_z=out[S_Z], m_raw=raw_or_none(M_RAW), s_raw=raw_or_none(S_RAW), logprobs=out[LP],
        logprobs_t1=raw_or_none(LP_T1),
    )
