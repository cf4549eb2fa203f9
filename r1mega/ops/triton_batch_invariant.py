"""Batch-invariant GEMM on CUDA: one fixed tile configuration for every M, no split-K.

cuBLAS picks its kernel, and with it the split of the K reduction, by the problem shape, so a
token's projection differs between a decode step (M = batch) and a packed micro-batch (M =
thousands). Here every output tile reduces K in ``BLOCK_K`` steps from 0 to K in one program,
whatever M is; a row's result depends only on its own values and the weight. The CPU/reference
path is :func:`r1mega.ops.batch_invariant.bi_mm` (fixed row blocks through ``torch.mm``); the
test compares the two and checks invariance over M (tests/gpu/test_exact_gemm_gpu.py).

Never split K by shape. The output tile (BLOCK_M, BLOCK_N) may differ between row counts only
where it does not change a single bit: each output element is one chain of MMA steps over K in
order, so the tile decides which program computes an element, not how. That is a property of
the GPU's MMA unit and of the compiler, so it is checked, not assumed: a small-M candidate runs once beside
LARGE on the same random operands (:func:`tiles_usable`) and serves only where the bits agree;
among those that do, each GEMM shape gets the fastest, timed on the device
(:func:`tiles_for`; ``r1mega bench exact-gemm --per-shape`` times every candidate per shape).
On Hopper (unless ``R1MEGA_EXACT_GEMM_TMA=0``), where the operands allow it (a row-major, b a
transposed row-major weight), each candidate, LARGE included, also runs as a TMA variant
(:func:`_bi_mm_tma_kernel`: the tiles brought in by the tensor memory accelerator, the same MMAs)
under the same check and timing, and with ``R1MEGA_EXACT_GEMM_WS=1`` as a warp-specialised TMA
variant too. With ``R1MEGA_EXACT_GEMM_CUBLASLT=1`` fixed cuBLASLt algorithms
join them (r1mega/ops/cublaslt_gemm.py), under the same check and timing.

With ``R1MEGA_EXACT_GEMM_KCHUNKS=S`` (default 1) every call sums K as about S fixed chunks
instead (:func:`chunk_len`, a function of K alone), each chunk one chain from zero, the chunks
added in order: then a small-M call may also give each chunk a program of its own (``split``
tiles) and add them in a second kernel, in the same order: the same bits, under the same check.
"""
from __future__ import annotations

import os
import warnings
from typing import NamedTuple, Optional

import torch

from r1mega import switches
from r1mega.ops import cublaslt_gemm as clt

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False
try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

class Tiles(NamedTuple):
    """One compiled configuration of the GEMM kernel; ``tma``: operand tiles loaded by the
    Hopper tensor memory accelerator (another load path, the same MMAs: it serves only where the
    device check finds LARGE's bits with it, like any other candidate); ``ws`` (with tma): the K
    loop warp-specialised, producer warps issuing the loads while consumer warps run the MMAs
    (Triton's ``tl.range(warp_specialize=True)``; again the same MMAs, again checked);
    ``split``: see :func:`chunk_len`."""
    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    tma: int = 0
    ws: int = 0
    split: int = 0  # with K chunks (R1MEGA_EXACT_GEMM_KCHUNKS): one program per chunk, then a sum


GROUP_M = 8
LARGE = Tiles(128, 128, 64, 8, 3)  # every M, and the bits every other configuration must give
# Candidates for M <= SMALL_M_MAX, each used only where the device gave LARGE's bits with it
# (tiles_usable). Which one serves a call is timed per device, dtype, row bucket and weight
# shape (tiles_for): no one configuration is fastest at every shape and row count (bench
# exact-gemm --per-shape).
SMALL: tuple = (Tiles(64, 64, 128, 4, 3), Tiles(64, 128, 64, 4, 3), Tiles(64, 128, 128, 4, 3),
                 Tiles(64, 32, 128, 4, 5))
SMALL_M_MAX = 1024
CHUNK_MULTIPLE = 256  # K chunks are multiples of every tile's BK


def _k_chunks_from_env() -> int:
    raw = os.environ.get("R1MEGA_EXACT_GEMM_KCHUNKS", "1")
    if not raw.isdigit() or not 1 <= int(raw) <= 64:
        raise ValueError(f"R1MEGA_EXACT_GEMM_KCHUNKS={raw!r}: expected a whole number from 1 "
                         f"(one chain over K, the default) to 64")
    return int(raw)


# Every exact GEMM sums K as chunks, each one MMA chain from zero, added in order to a float32
# zero: the same bits whether one program walks the chunks (training's row counts) or each chunk
# has a program of its own and a second kernel adds them (``split`` tiles: a decode step's few
# hundred rows then fill the GPU, as cuBLAS's split-K does, without its shape-chosen split).
K_CHUNKS = _k_chunks_from_env()


def chunk_len(k: int) -> int:
    """The K chunk of a (M, K) @ (K, N) call: K itself with one chunk (the default), else K over
    ``K_CHUNKS`` rounded up to a multiple of CHUNK_MULTIPLE: a function of K alone, so every call
    on a weight, whatever its M, sums the same chunks."""
    if K_CHUNKS == 1:
        return k
    return max(CHUNK_MULTIPLE, -(-k // (K_CHUNKS * CHUNK_MULTIPLE)) * CHUNK_MULTIPLE)


# "BM,BN,BK,WARPS,STAGES": process-wide, so the rollout and the trainer of a run share them;
# R1MEGA_EXACT_GEMM_SMALL_TILES takes ";"-separated candidates, or "none" for LARGE everywhere.
_TILES_ENV = "R1MEGA_EXACT_GEMM_TILES"
_SMALL_ENV = "R1MEGA_EXACT_GEMM_SMALL_TILES"
_small_ok: dict = {}  # (device, dtype, tiles, LARGE) -> whether tiles give LARGE's bits there
_choice: dict = {}  # (device, dtype, row bucket, N, K, SMALL, LARGE) -> the timed fastest


def parse_tiles(spec: str, what: str = _TILES_ENV) -> Tiles:
    try:
        vals = [int(v) for v in spec.split(",")]
        if len(vals) not in (5, 6, 7, 8):
            raise ValueError
        t = Tiles(*vals)
    except (TypeError, ValueError):
        raise ValueError(f"{what}={spec!r}: expected five integers BM,BN,BK,WARPS,STAGES "
                         f"(and optionally TMA 0/1, then WS 0/1, then SPLIT 0/1)") from None
    if any(v & (v - 1) or v < 16 for v in (t.bm, t.bn, t.bk)) or t.warps not in (1, 2, 4, 8, 16) \
            or t.stages < 1 or t.tma not in (0, 1) or t.ws not in (0, 1) or (t.ws and not t.tma) \
            or t.split not in (0, 1) or t.bk > CHUNK_MULTIPLE:
        raise ValueError(f"{what}={spec!r}: tile sizes must be powers of two >= 16 (BK at most "
                         f"{CHUNK_MULTIPLE}), warps a power of two <= 16, stages >= 1, TMA 0 or 1, "
                         f"WS 0 or 1 (and only with TMA), SPLIT 0 or 1")
    return t


def set_tiles(spec: str) -> None:
    """Set the process-wide large-M configuration from "BM,BN,BK,WARPS,STAGES"."""
    global LARGE
    LARGE = parse_tiles(spec)
    _small_ok.clear()
    _choice.clear()


def set_small_tiles(spec: Optional[str]) -> None:
    """Set the small-M candidates from "BM,BN,BK,W,S;..." (or with None / "none" drop them)."""
    global SMALL
    SMALL = () if spec in (None, "", "none") else tuple(
        parse_tiles(s.strip(), _SMALL_ENV) for s in spec.split(";") if s.strip())
    _small_ok.clear()
    _choice.clear()


if os.environ.get(_TILES_ENV):
    set_tiles(os.environ[_TILES_ENV])
if os.environ.get(_SMALL_ENV) is not None:
    set_small_tiles(os.environ[_SMALL_ENV])


if HAVE_TRITON:

    @triton.jit
    def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        # Grouped tile order for L2 reuse of B; it changes which program computes a tile, never
        # how a tile is computed.
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size

    @triton.jit
    def _tma_chain(a_desc, w_desc, row, col, k_lo, k_hi, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                   WS: tl.constexpr):
        # One MMA chain from zero over K [k_lo, k_hi) of the tile at (row, col)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, warp_specialize=WS):
            a = a_desc.load([row, k0])
            w = w_desc.load([col, k0])
            if IEEE:
                acc = tl.dot(a, w.T, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w.T, acc)
        return acc

    @triton.jit
    def _store_tile(C, acc, pid_m, pid_n, M, N, scm, scn, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        tl.store(C + rm[:, None] * scm + rn[None, :] * scn, acc.to(C.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _bi_mm_tma_kernel(a_desc, w_desc, C, M, N, K, scm, scn, kc, scs,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, IEEE: tl.constexpr, WS: tl.constexpr,
                          CHUNKED: tl.constexpr, SPLIT: tl.constexpr):
        # _bi_mm_kernel with the tiles brought in by TMA: a (M, K) and the weight w = b.T (N, K),
        # both row-major; out-of-range elements arrive as zeros, as the masked loads' are
        pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        row, col = pid_m * BLOCK_M, pid_n * BLOCK_N
        if SPLIT:  # chunk program_id(1) alone, float32 into its slice of the workspace C
            c0 = tl.program_id(1) * kc
            acc = _tma_chain(a_desc, w_desc, row, col, c0, tl.minimum(c0 + kc, K), BLOCK_M,
                             BLOCK_N, BLOCK_K, IEEE, WS)
            C = C + tl.program_id(1).to(tl.int64) * scs
        elif CHUNKED:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for c0 in range(0, K, kc):
                acc += _tma_chain(a_desc, w_desc, row, col, c0, tl.minimum(c0 + kc, K), BLOCK_M,
                                  BLOCK_N, BLOCK_K, IEEE, WS)
        else:
            acc = _tma_chain(a_desc, w_desc, row, col, 0, K, BLOCK_M, BLOCK_N, BLOCK_K, IEEE, WS)
        _store_tile(C, acc, pid_m, pid_n, M, N, scm, scn, BLOCK_M, BLOCK_N)

    @triton.jit
    def _chain(A, B, rm, rn, k_lo, k_hi, M, N, sam, sak, sbk, sbn, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        # One MMA chain from zero over K [k_lo, k_hi) of the tile rows rm, columns rn
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + rk
            a = tl.load(A + rm[:, None] * sam + kk[None, :] * sak,
                        mask=(rm[:, None] < M) & (kk[None, :] < k_hi), other=0.0)
            b = tl.load(B + kk[:, None] * sbk + rn[None, :] * sbn,
                        mask=(kk[:, None] < k_hi) & (rn[None, :] < N), other=0.0)
            if IEEE:  # float32 inputs: no TF32 rounding
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def _bi_mm_kernel(A, B, C, M, N, K, sam, sak, sbk, sbn, scm, scn, kc, scs,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, IEEE: tl.constexpr, CHUNKED: tl.constexpr,
                      SPLIT: tl.constexpr):
        pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        if SPLIT:
            c0 = tl.program_id(1) * kc
            acc = _chain(A, B, rm, rn, c0, tl.minimum(c0 + kc, K), M, N, sam, sak, sbk, sbn,
                         BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
            C = C + tl.program_id(1).to(tl.int64) * scs
        elif CHUNKED:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for c0 in range(0, K, kc):
                acc += _chain(A, B, rm, rn, c0, tl.minimum(c0 + kc, K), M, N, sam, sak, sbk, sbn,
                              BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
        else:
            acc = _chain(A, B, rm, rn, 0, K, M, N, sam, sak, sbk, sbn, BLOCK_M, BLOCK_N,
                         BLOCK_K, IEEE)
        _store_tile(C, acc, pid_m, pid_n, M, N, scm, scn, BLOCK_M, BLOCK_N)

    @triton.jit
    def _chunk_sum_kernel(W, C, MN, N, S, scs, scm, scn, BLOCK: tl.constexpr):
        # C = ((0 + W[0]) + W[1]) + ... in float32, then C's dtype: the chunked tiles' order
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, S):
            acc += tl.load(W + s * scs + i, mask=ok, other=0.0)
        tl.store(C + (i // N) * scm + (i % N) * scn, acc.to(C.dtype.element_ty), mask=ok)


def tiles_usable(tiles, device, dtype: torch.dtype) -> bool:
    """Whether ``tiles`` (a Triton configuration or a cuBLASLt algorithm) compute LARGE's bits on
    ``device`` in ``dtype``. Per dtype, since what fits a multiprocessor depends on it (a float32
    TMA tile can exceed the shared memory its bf16 twin fits in). One host read per device,
    dtype and candidate; never inside CUDA graph capture (the caller falls back to LARGE)."""
    if tiles == LARGE:
        return True
    key = (str(device), dtype, tiles, LARGE)
    if key not in _small_ok:
        check = _lt_same_bits if isinstance(tiles, clt.LtAlgo) else _tiles_same_bits
        _small_ok[key] = check(tiles, device, dtype)
    return _small_ok[key]


def _tiles_same_bits(tiles: Tiles, device, dtype: torch.dtype) -> bool:
    """Both configurations once on the same random operands (ragged M, N and K, so the masked
    edges are covered too; b a transposed row-major weight, as the linear layers pass it). A
    TMA configuration that fails to compile or launch (an older Triton, too little shared
    memory) is unusable, with a warning."""
    gen = torch.Generator(device=device).manual_seed(0)

    def same() -> bool:
        a = torch.randn(301, 1000, device=device, dtype=dtype, generator=gen)
        b = torch.randn(777, 1000, device=device, dtype=dtype, generator=gen).t()
        return torch.equal(matmul(a, b, tiles=tiles), matmul(a, b, tiles=LARGE))

    return _verdict(same, f"the tiles {tuple(tiles)}", device, dtype, survive_errors=bool(tiles.tma))


def _lt_same_bits(algo, device, dtype: torch.dtype) -> bool:
    """A cuBLASLt algorithm is fixed per weight shape: checked on that shape, at decode-sized and
    ragged row counts, against LARGE row for row."""
    gen = torch.Generator(device=device).manual_seed(0)

    def same() -> bool:
        w = torch.randn(algo.n, algo.k, device=device, dtype=dtype, generator=gen)
        return all(torch.equal(clt.matmul(a, w.t(), algo), matmul(a, w.t(), tiles=LARGE))
                   for a in (torch.randn(m, algo.k, device=device, dtype=dtype, generator=gen)
                             for m in (1, 37, 301)))

    return _verdict(same, str(algo), device, dtype, survive_errors=True)


def _verdict(same, what: str, device, dtype: torch.dtype, survive_errors: bool) -> bool:
    """``same()``, with a warning where the candidate is not used: its bits differ from LARGE's,
    or it failed to run (an error only where ``survive_errors`` is false: a plain Triton tile
    that cannot run is a bug, not a candidate to skip)."""
    try:
        ok = same()
    except Exception as exc:
        if not survive_errors:
            raise
        warnings.warn(f"exact GEMM: {what} failed on {device} in {dtype} "
                      f"({type(exc).__name__}: {exc}); not used")
        return False
    if not ok:
        warnings.warn(f"exact GEMM: {what} does not give the bits of {tuple(LARGE)} on {device} "
                      f"in {dtype}; not used there")
    return ok


_tma_device: dict = {}
# The TMA variants join the candidates (R1MEGA_EXACT_GEMM_TMA=0 leaves them out)
TMA_CANDIDATES = switches.flag("R1MEGA_EXACT_GEMM_TMA", True, "TMA variants among the candidates")
# Their warp-specialised twins join too with R1MEGA_EXACT_GEMM_WS=1 (off until a GPU times them)
WS_CANDIDATES = switches.flag("R1MEGA_EXACT_GEMM_WS", False,
                              "warp-specialised TMA variants among the candidates")
# ... and, for every row count, two whole-warpgroup tiles that Triton specialises (its 8-warp
# LARGE it leaves as it is): Hopper's usual large-GEMM shapes, held to LARGE's bits like the rest
WS_TILES = (Tiles(128, 128, 64, 4, 3, 1, 1), Tiles(128, 256, 64, 4, 3, 1, 1))


def tma_eligible(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the TMA kernel can take a (M, K) @ b (K, N): Triton's host descriptors, a GPU of
    compute capability 9 or more, a and b.T row-major with 16-byte aligned rows and bases."""
    if TensorDescriptor is None or not getattr(a, "is_cuda", False):
        return False
    dev = str(a.device)
    if dev not in _tma_device:
        _tma_device[dev] = torch.cuda.get_device_capability(a.device)[0] >= 9
    return _tma_device[dev] and _tma_layout_ok(a, b)


def _tma_layout_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    e = a.element_size()
    return (a.stride(1) == 1 and b.stride(0) == 1 and (a.stride(0) * e) % 16 == 0
            and (b.stride(1) * e) % 16 == 0 and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0)


def small_tiles_usable(device, dtype: torch.dtype) -> bool:
    """Whether any small-M candidate gives LARGE's bits on ``device`` in ``dtype`` (checks them
    all, eagerly: what a caller runs before CUDA graph capture)."""
    return sum(tiles_usable(t, device, dtype) for t in SMALL if t != LARGE) > 0


def row_bucket(m: int) -> int:
    """Calls are timed per power-of-two row count (at least 16, tl.dot's smallest M)."""
    return max(16, 1 << max(0, m - 1).bit_length())


TIMING_ROUNDS = 5


def fastest(candidates: list, time_ms, rounds: int = TIMING_ROUNDS) -> Tiles:
    """The candidate with the least ``time_ms(tiles)`` over ``rounds`` interleaved rounds (each
    round times every candidate once, so a GPU clock that ramps up or drifts while they are timed
    favours none); the first of equals."""
    best = [float("inf")] * len(candidates)
    for _ in range(rounds):
        for i, tiles in enumerate(candidates):
            best[i] = min(best[i], time_ms(tiles))
    return candidates[best.index(min(best))]


def _graph_timer(tiles, a: torch.Tensor, b: torch.Tensor, calls: int = 8):
    """-> a function that replays ``calls`` back-to-back calls of ``tiles`` from one CUDA graph
    (as a decode step runs them; launched one by one from Python, launch latency would hide the
    small kernels' times) and returns ms per call."""
    matmul(a, b, tiles=tiles)  # compile outside the capture
    dev = a.device
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        graph.capture_begin()
        try:
            for _ in range(calls):
                matmul(a, b, tiles=tiles)
        finally:
            graph.capture_end()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def once() -> float:
        with torch.cuda.stream(side):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
        torch.cuda.current_stream(dev).wait_stream(side)
        return start.elapsed_time(end) / calls

    once()  # warm: the first replay uploads the graph
    return once


def _timer(a: torch.Tensor, b: torch.Tensor):
    """time_ms(tiles) for :func:`fastest` on the call's own operands, each candidate's graph
    captured once and replayed every round."""
    timers: dict = {}

    def time_ms(tiles) -> float:
        if tiles not in timers:
            timers[tiles] = _graph_timer(tiles, a, b)
        return timers[tiles]()

    return time_ms


def tiles_for(a: torch.Tensor, b: torch.Tensor, time_ms=None) -> Tiles:
    """The configuration of the call a (M, K) @ b (K, N): LARGE above SMALL_M_MAX rows, else the
    fastest of the bit-checked candidates for this device, dtype, row bucket and (N, K), timed on
    the call's own operands the first time such a call runs. Inside CUDA graph capture an
    untimed call gets LARGE (no host read): callers time their shapes eagerly first, as the
    rollout's graph warm-up does. ``time_ms(tiles)``: the timer (tests)."""
    m, k = a.shape
    n = b.shape[1]
    base = (LARGE,) if m > SMALL_M_MAX else SMALL + (LARGE,)
    tma = TMA_CANDIDATES and tma_eligible(a, b)
    lt = clt.ENABLED and clt.eligible(a, b)
    every = base + (tuple(t._replace(tma=1) for t in base) if tma else ()) \
        + (tuple(t._replace(tma=1, ws=1) for t in base) + WS_TILES if tma and WS_CANDIDATES else ()) \
        + (tuple(clt.algos_for(n, k, a.dtype, a.device)) if lt else ())
    if m <= SMALL_M_MAX and chunk_len(k) < k:  # K in chunks: each small tile also split
        every += tuple(t._replace(split=1) for t in every if isinstance(t, Tiles))
    if len(every) == 1 or (time_ms is None and not a.is_cuda):
        return LARGE  # (off CUDA: Triton's interpreter, nothing to time)
    key = (str(a.device), a.dtype, row_bucket(m), n, k, SMALL, LARGE, tma, WS_CANDIDATES, lt,
           K_CHUNKS)
    if key not in _choice:
        capturing = a.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing:
            return LARGE
        cands = [t for t in dict.fromkeys(every) if tiles_usable(t, a.device, a.dtype)]
        _choice[key] = cands[0] if len(cands) == 1 else fastest(cands, time_ms or _timer(a, b))
    return _choice[key]


def matmul(a: torch.Tensor, b: torch.Tensor, tiles: Optional[Tiles] = None) -> torch.Tensor:
    """(M, K) @ (K, N) -> (M, N) in a's dtype, float32 accumulation; any strides. ``tiles``:
    force a configuration (the benchmark and the checks); by default :func:`tiles_for`."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"batch-invariant matmul: shapes {tuple(a.shape)} @ {tuple(b.shape)}")
    if b.dtype != a.dtype:
        b = b.to(a.dtype)
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return torch.empty(m, n, dtype=a.dtype, device=a.device)
    t = tiles if tiles is not None else tiles_for(a, b)
    if isinstance(t, clt.LtAlgo):
        return clt.matmul(a, b, t)
    c = torch.empty(m, n, dtype=a.dtype, device=a.device)
    if t.tma and (TensorDescriptor is None or not _tma_layout_ok(a, b)):
        raise ValueError(f"batch-invariant matmul: TMA tiles need Triton's tensor descriptors and a "
                         f"and b.T row-major with 16-byte aligned rows (strides {a.stride()} and "
                         f"{b.stride()})")
    kc = chunk_len(k)
    chunks = triton.cdiv(k, kc)
    split = bool(t.split) and chunks > 1
    # split: each chunk's float32 partial into its slice of a workspace, summed by a second kernel
    out = torch.empty(chunks, m, n, dtype=torch.float32, device=a.device) if split else c
    scs, scm, scn = (out.stride(0), out.stride(1), out.stride(2)) if split else (0, *c.stride())
    grid = (triton.cdiv(m, t.bm) * triton.cdiv(n, t.bn), chunks if split else 1)
    common = dict(BLOCK_M=t.bm, BLOCK_N=t.bn, BLOCK_K=t.bk, GROUP_M=GROUP_M,
                  IEEE=a.dtype == torch.float32, CHUNKED=chunks > 1, SPLIT=split,
                  num_warps=t.warps, num_stages=t.stages)
    if t.tma:
        _bi_mm_tma_kernel[grid](TensorDescriptor.from_tensor(a, [t.bm, t.bk]),
                                TensorDescriptor.from_tensor(b.t(), [t.bn, t.bk]), out, m, n, k,
                                scm, scn, kc, scs, WS=bool(t.ws), **common)
    else:
        _bi_mm_kernel[grid](a, b, out, m, n, k, a.stride(0), a.stride(1), b.stride(0),
                            b.stride(1), scm, scn, kc, scs, **common)
    if split:
        _chunk_sum_kernel[(triton.cdiv(m * n, 1024),)](out, c, m * n, n, chunks, scs,
                                                      c.stride(0), c.stride(1), BLOCK=1024)
    return c
