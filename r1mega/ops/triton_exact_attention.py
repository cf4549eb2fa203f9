"""The CUDA kernel of :mod:`r1mega.ops.exact_attention`: one program per (query tile, KV head).

A tile is up to ``BQ`` consecutive rows of one sequence (a training micro-batch packs a
sequence's queries together; a decode step has one query per sequence, so its tiles hold one).
The program reads the sequence's keys through a slot table (``slots[b, j]`` = the row of
sequence b's j-th key in K/V: a packed row in training, a paged cache slot in the rollout) and
walks keys 0..(the tile's last position) in blocks of KEY_BLOCK with an online softmax, every
row on its own. A query's result is the same bits in any tile and at any row of it:

- rows never mix: each output row of both dots reads only its own row of q and of p, and the
  softmax state is per row; the key block is one constant for training and the rollout. The
  rollout's tiles (TILE_ROWS rows, WARPS warps) also serve training unless the device check
  :func:`train_tiles_usable` finds that bigger ones give the same bits for the model's heads;
- keys past a row's position are masked to -inf (p = 0 exactly); a key block wholly past it
  leaves the row's state unchanged bit for bit (its max is -inf, the rescale is exp(0) = 1 and
  it adds exact zeros), so a tile walking further than one of its rows needs changes nothing.

Two kernels with these properties: the keys-major one (the default) holds a tile's (query, head)
pairs as the columns of its dots and the keys as their rows, so "rows" above reads "columns"
there, and a decode tile's few pairs fill a 16-wide MMA axis; the row-major one
(``R1MEGA_EXACT_ATTENTION=rows``) pads them to 64 rows. They round differently, so a run uses one.

The PyTorch code in exact_attention.py is the reference (and the path off CUDA or for head sizes
that are not a power of two); tests/gpu/test_exact_gpu.py compares them and checks that a query
gets the same bits decoded alone as inside a packed training tile.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from r1mega import switches
from r1mega.ops.last_key import LastKey

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit
    def _tile(t0, n, QSEQ, QPOS, G: tl.constexpr, G_PAD: tl.constexpr, BQ: tl.constexpr):
        """The tile at row t0 (n queries): its sequence, each of its BQ * G_PAD (query, head)
        slots' row, head in the group, validity and position, and the tile's last position."""
        seq = tl.load(QSEQ + t0).to(tl.int64)
        r = tl.arange(0, BQ * G_PAD)
        qi = r // G_PAD  # the tile's query of slot r
        gi = r % G_PAD  # its query head within the group
        in_tile = qi < n
        row = t0 + qi
        pos = tl.load(QPOS + row, mask=in_tile, other=0).to(tl.int64)
        return seq, row, gi, in_tile & (gi < G), pos, tl.max(pos, axis=0)

    @triton.jit
    def _kv_block(K, V, SLOTS, seq, h, j, last, stride_kt, stride_kh, stride_vt, stride_vh,
                  stride_sb, D: tl.constexpr, KB: tl.constexpr):
        """Key block j of the sequence (keys past ``last`` masked to zero): positions (KB,),
        k and v (KB, D)."""
        d = tl.arange(0, D)
        idx = j * KB + tl.arange(0, KB)
        kvalid = idx <= last
        slot = tl.load(SLOTS + seq * stride_sb + idx, mask=kvalid, other=0).to(tl.int64)
        k = tl.load(K + slot[:, None] * stride_kt + h * stride_kh + d[None, :],
                    mask=kvalid[:, None], other=0.0)
        v = tl.load(V + slot[:, None] * stride_vt + h * stride_vh + d[None, :],
                    mask=kvalid[:, None], other=0.0)
        return idx, k, v

    @triton.jit
    def _exact_attn_kernel(Q, K, V, SLOTS, QSEQ, QPOS, TILE_N, O, scale,
                           stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                           stride_ot, stride_oh, stride_sb,
                           G: tl.constexpr, G_PAD: tl.constexpr, BQ: tl.constexpr,
                           D: tl.constexpr, KB: tl.constexpr, IEEE: tl.constexpr):
        t0 = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)  # KV head; its G query heads share the program
        n = tl.load(TILE_N + t0)  # rows in the tile starting at t0 (0: no tile starts here)
        if n > 0:
            seq, row, gi, rmask, pos, last = _tile(t0, n, QSEQ, QPOS, G, G_PAD, BQ)  # (M,) each
            d = tl.arange(0, D)
            q = tl.load(Q + row[:, None] * stride_qt + (h * G + gi)[:, None] * stride_qh + d[None, :],
                        mask=rmask[:, None], other=0.0)  # (M, D)
            m = tl.full([BQ * G_PAD], float("-inf"), tl.float32)
            l = tl.zeros([BQ * G_PAD], tl.float32)
            acc = tl.zeros([BQ * G_PAD, D], tl.float32)
            for j in range(0, (last + KB) // KB):  # blocks holding keys 0..last
                idx, k, v = _kv_block(K, V, SLOTS, seq, h, j, last, stride_kt, stride_kh,
                                      stride_vt, stride_vh, stride_sb, D, KB)  # k, v (KB, D)
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                s = tl.where(idx[None, :] <= pos[:, None], s * scale, float("-inf"))  # (M, KB)
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
            tl.store(O + row[:, None] * stride_ot + (h * G + gi)[:, None] * stride_oh + d[None, :],
                     out.to(O.dtype.element_ty), mask=rmask[:, None])


    @triton.jit
    def _exact_attn_keys_kernel(Q, K, V, SLOTS, QSEQ, QPOS, TILE_N, O, scale,
                                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                                stride_ot, stride_oh, stride_sb,
                                G: tl.constexpr, G_PAD: tl.constexpr, BQ: tl.constexpr,
                                D: tl.constexpr, KB: tl.constexpr, IEEE: tl.constexpr):
        # _exact_attn_kernel with keys on the dots' M axis: s.T = k @ q.T (KB, N) and
        # acc.T += v.T @ p.T (D, N), the tile's N = BQ * G_PAD (query, head) columns. Hopper's
        # MMA takes 64 rows at least, while a decode tile has G_PAD real (query, head) pairs:
        # as columns they fill a 16-wide N instead of 4 of 64 rows. The softmax reduces along
        # keys (axis 0), one column each.
        t0 = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        n = tl.load(TILE_N + t0)
        if n > 0:
            seq, row, gi, cmask, pos, last = _tile(t0, n, QSEQ, QPOS, G, G_PAD, BQ)  # (N,) each
            d = tl.arange(0, D)
            qt = tl.load(Q + row[None, :] * stride_qt + (h * G + gi)[None, :] * stride_qh + d[:, None],
                         mask=cmask[None, :], other=0.0)  # (D, N)
            m = tl.full([BQ * G_PAD], float("-inf"), tl.float32)
            l = tl.zeros([BQ * G_PAD], tl.float32)
            acc = tl.zeros([D, BQ * G_PAD], tl.float32)
            for j in range(0, (last + KB) // KB):
                idx, k, v = _kv_block(K, V, SLOTS, seq, h, j, last, stride_kt, stride_kh,
                                      stride_vt, stride_vh, stride_sb, D, KB)
                if IEEE:
                    s = tl.dot(k, qt, input_precision="ieee")
                else:
                    s = tl.dot(k, qt)
                s = tl.where(idx[:, None] <= pos[None, :], s * scale, float("-inf"))  # (KB, N)
                m_new = tl.maximum(m, tl.max(s, axis=0))
                alpha = tl.exp(m - m_new)
                p = tl.exp(s - m_new[None, :])
                l = l * alpha + tl.sum(p, axis=0)
                if IEEE:
                    pv = tl.dot(tl.trans(v), p, input_precision="ieee")
                else:
                    pv = tl.dot(tl.trans(v), p.to(v.dtype))  # (D, N)
                acc = acc * alpha[None, :] + pv
                m = m_new
            out = acc / l[None, :]
            tl.store(O + row[None, :] * stride_ot + (h * G + gi)[None, :] * stride_oh + d[:, None],
                     out.to(O.dtype.element_ty), mask=cmask[None, :])

KEY_BLOCK = 64  # keys per online-softmax step, in training and decode alike
# The kernel, for the whole run (its bits differ from the other's, so training and the rollout
# must use the same): "keys" (the default), _exact_attn_keys_kernel, keys on the MMA's M axis and
# a decode step's (query, head) pairs on its 16-wide N; "rows", _exact_attn_kernel, whose decode
# tiles pad 4 real rows to 64 (R1MEGA_EXACT_ATTENTION=rows). Timings: bench decode-attention
# --exact, RECORDS.md.
KEYS_MAJOR = switches.choice("R1MEGA_EXACT_ATTENTION", "keys", {
    "keys": "the keys-major kernel", "rows": "the row-major kernel"}) == "keys"
# rows (queries x heads of a group) per program: BQ = TILE_ROWS // G_PAD queries
TILE_ROWS = 16 if KEYS_MAJOR else 64
WARPS = 4
# Training's packed rows may go through bigger tiles (fewer programs, K/V read once per 16 or 32
# queries instead of 4 or 16) where that changes no bit on the device: checked once per device,
# head layout and dtype by :func:`train_tiles_usable` (the same property as the GEMM's tiles).
TRAIN_TILES = {"rows": (128, 8), "keys": (64, 4)}
TRAIN_TILE_ROWS, TRAIN_WARPS = TRAIN_TILES["keys" if KEYS_MAJOR else "rows"]
# A decode step has one query per sequence, so a 64-row tile uses G_PAD of its rows; smaller
# decode tiles (R1MEGA_EXACT_DECODE_TILES="rows,warps", e.g. 16,2; used where
# decode_tiles_usable's check passes) stay an experiment: that check has missed bit differences
# (r1mega/bench/RECORDS.md, exact mode), so it does not make them safe.
_checked: dict = {}


def _decode_tiles_env(spec: str) -> tuple[int, int]:
    try:
        rows, warps = (int(v) for v in spec.split(","))
    except ValueError:
        rows = warps = 0
    if rows < 16 or rows & (rows - 1) or warps not in (1, 2, 4, 8):
        raise ValueError(f"R1MEGA_EXACT_DECODE_TILES={spec!r}: expected 'rows,warps', rows a power "
                         f"of two >= 16 and warps 1, 2, 4 or 8 (e.g. 16,2)")
    return rows, warps


DECODE_TILE_ROWS, DECODE_WARPS = _decode_tiles_env(os.environ.get("R1MEGA_EXACT_DECODE_TILES",
                                                                  f"{TILE_ROWS},{WARPS}"))
if (DECODE_TILE_ROWS, DECODE_WARPS) != (TILE_ROWS, WARPS):
    warnings.warn(f"R1MEGA_EXACT_DECODE_TILES={DECODE_TILE_ROWS},{DECODE_WARPS}: experimental decode "
                  f"tiles; their device check is known to miss bit differences, so rollout.exact "
                  f"may no longer match the training forward bit for bit")


# The last packed forward's tables, and the last tile table: every layer of a forward asks for
# the same ones, and building them copies the lengths to the device, which waits for the stream
# (a host-device sync per layer would leave the GPU idle while the host launches the next layer).
_packed_memo = LastKey()
_tiles_memo = LastKey()


def packed_tables(lengths: list, width: int, device) -> tuple:
    """Packed sequences of these lengths (rows back to back) -> slots (B, width): sequence b's
    j-th row, clamped to the last row past its end (masked by position); q_seq (T,) each row's
    sequence; q_pos (T,) its position. One host-to-device copy per new set of lengths: the last
    set's tensors are kept and returned again (callers only read them)."""
    lengths, width, device = [int(x) for x in lengths], int(width), torch.device(device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _packed_tables(lengths, width, device)  # a graph keeps its own tensors
    return _packed_memo.get((tuple(lengths), width, device), lambda: _packed_tables(lengths, width, device))


def _packed_tables(lengths: list, width: int, device) -> tuple:
    t = sum(lengths)
    lens = torch.tensor(lengths, dtype=torch.int64, device=device)
    starts = torch.cumsum(lens, 0) - lens
    slots = (starts[:, None] + torch.arange(width, device=device)[None, :]).clamp(max=t - 1)
    q_seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens, output_size=t)
    return slots, q_seq, torch.arange(t, device=device) - starts[q_seq]


def supported(q: torch.Tensor) -> bool:
    """The kernel's domain; the choice depends on device and head size only, so training and
    the rollout of one model always take the same path."""
    d = q.shape[-1]
    return HAVE_TRITON and q.is_cuda and d >= 16 and d & (d - 1) == 0 and d <= 256


def tile_sizes(q_seq: torch.Tensor, bq: int) -> torch.Tensor:
    """(T,) each row's sequence -> (T,) int32: at the first row of every tile the tile's row
    count, 0 elsewhere. A tile is up to ``bq`` consecutive rows of one run of equal ``q_seq``
    (tiles restart at every run). Device ops only (no host sync: decode steps are graphed)."""
    t = q_seq.shape[0]
    i = torch.arange(t, device=q_seq.device)
    new = torch.ones(t, dtype=torch.bool, device=q_seq.device)
    new[1:] = q_seq[1:] != q_seq[:-1]
    run_start = torch.cummax(torch.where(new, i, 0), 0).values
    starts = torch.where(new, i, t)
    # run end (exclusive) of row i: the first run start after i
    suffix = torch.flip(torch.cummin(torch.flip(starts, (0,)), 0).values, (0,))
    end = torch.cat([suffix[1:], suffix.new_full((1,), t)])
    first = (i - run_start) % bq == 0
    return torch.where(first, torch.clamp(end - i, max=bq), 0).to(torch.int32)


def _tile_table(q_seq: torch.Tensor, bq: int) -> torch.Tensor:
    """:func:`tile_sizes`, kept for the last (q_seq tensor, its version, bq) outside graph capture:
    the layers of one forward pass the same q_seq tensor."""
    if q_seq.is_cuda and torch.cuda.is_current_stream_capturing():
        return tile_sizes(q_seq, bq)
    return _tiles_memo.get((q_seq, q_seq._version, bq), lambda: tile_sizes(q_seq, bq))


def queries_per_tile(hq: int, hkv: int, tile_rows: int = TILE_ROWS) -> int:
    """BQ: queries per program, a function of the head layout (and the tile's rows) only."""
    g_pad = triton.next_power_of_2(hq // hkv)
    return max(1, tile_rows // g_pad, 16 // g_pad)  # 16: tl.dot's smallest M


def _same_bits(q: torch.Tensor, hkv: int, alt: tuple) -> bool:
    """Whether ``alt`` = (tile rows, warps) computes every row with the bits of (TILE_ROWS,
    WARPS) on q's device, for q's head layout and dtype: both run once on the same random packed
    sequences (ragged lengths, and one-query sequences as in decode). One host read per key;
    inside CUDA graph capture an unchecked key answers False (the caller keeps the default)."""
    if alt == (TILE_ROWS, WARPS):
        return False
    hq, d = q.shape[1], q.shape[2]
    key = (str(q.device), q.dtype, hq, hkv, d, alt, TILE_ROWS, WARPS)
    if key not in _checked:
        if q.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        gen = torch.Generator(device=q.device).manual_seed(0)
        lengths = [197, 1, 3, 330, 1, 1]
        t = sum(lengths)
        qq = torch.randn(t, hq, d, device=q.device, dtype=q.dtype, generator=gen)
        kk, vv = (torch.randn(t, hkv, d, device=q.device, dtype=q.dtype, generator=gen) for _ in range(2))
        slots, q_seq, q_pos = packed_tables(lengths, max(lengths) + KEY_BLOCK, q.device)
        scale = d ** -0.5
        a = exact_attention_slots(qq, kk, vv, slots, q_seq, q_pos, scale)
        b = exact_attention_slots(qq, kk, vv, slots, q_seq, q_pos, scale, _config=alt)
        _checked[key] = bool(torch.equal(a, b))
    return _checked[key]


def train_tiles_usable(q: torch.Tensor, hkv: int) -> bool:
    """Whether training's packed rows may use (TRAIN_TILE_ROWS, TRAIN_WARPS) on this device."""
    return _same_bits(q, hkv, (TRAIN_TILE_ROWS, TRAIN_WARPS))


def decode_tiles_usable(q: torch.Tensor, hkv: int) -> bool:
    """Whether decode steps may use (DECODE_TILE_ROWS, DECODE_WARPS) on this device."""
    return _same_bits(q, hkv, (DECODE_TILE_ROWS, DECODE_WARPS))


def exact_attention_slots(q, k_rows, v_rows, slots, q_seq, q_pos, scale: float,
                          tiles=None, train_tiles: bool = False, decode_tiles: bool = False,
                          _config: Optional[tuple] = None) -> torch.Tensor:
    """q (T, Hq, D); k_rows/v_rows (N, Hkv, D) with stride 1 on D; slots (B, L) int rows of
    each sequence's keys; q_seq/q_pos (T,) -> (T, Hq, D) in q's dtype. ``tiles``: the
    :func:`tile_sizes` of q_seq for :func:`queries_per_tile` when the caller has them (every
    layer of a step shares them). ``train_tiles`` / ``decode_tiles``: the bigger / smaller
    programs, for callers that checked :func:`train_tiles_usable` / :func:`decode_tiles_usable`."""
    t, hq, d = q.shape
    hkv = k_rows.shape[1]
    g = hq // hkv
    out = torch.empty_like(q)
    if t == 0:
        return out
    g_pad = triton.next_power_of_2(g)
    rows, warps, *more = _config or ((TRAIN_TILE_ROWS, TRAIN_WARPS) if train_tiles else
                                     (DECODE_TILE_ROWS, DECODE_WARPS) if decode_tiles else
                                     (TILE_ROWS, WARPS))
    # (rows, warps[, stages[, key block[, keys-major]]]): pipelining depth changes no bit; another
    # key block or kernel changes the softmax's order, so only a measurement tool passes one (it
    # compares like with like)
    launch = {"num_stages": more[0]} if more and more[0] else {}
    kb = more[1] if len(more) > 1 else KEY_BLOCK
    kernel = _exact_attn_keys_kernel if (more[2] if len(more) > 2 else KEYS_MAJOR) else _exact_attn_kernel
    bq = queries_per_tile(hq, hkv, rows)
    if (rows, warps) != (TILE_ROWS, WARPS) and not decode_tiles:
        tiles = None  # a caller's table is for the default tiles (decode tables hold 1s only)
    q_seq = q_seq.to(torch.int64).contiguous()
    slots = slots.to(torch.int64).contiguous()
    kernel[(t, hkv)](
        q, k_rows, v_rows, slots, q_seq, q_pos.to(torch.int64).contiguous(),
        _tile_table(q_seq, bq) if tiles is None else tiles, out, float(scale),
        q.stride(0), q.stride(1), k_rows.stride(0), k_rows.stride(1),
        v_rows.stride(0), v_rows.stride(1), out.stride(0), out.stride(1), slots.stride(0),
        G=g, G_PAD=g_pad, BQ=bq, D=d, KB=kb,
        IEEE=q.dtype == torch.float32, num_warps=warps, **launch)
    return out
