"""Batch-invariant GEMM on CUDA: one fixed tile configuration for every M, no split-K.

cuBLAS picks its kernel, and with it the split of the K reduction, by the problem shape, so a
token's projection differs between a decode step (M = batch) and a packed micro-batch (M =
thousands). Here every output tile reduces K in ``BLOCK_K`` steps from 0 to K in one program,
whatever M is; a row's result depends only on its own values and the weight. The CPU/reference
path is :func:`r1mega.ops.batch_invariant.bi_mm` (fixed row blocks through ``torch.mm``); the
test compares the two and checks invariance over M (tests/gpu/test_exact_gpu.py).

Never split K. The output tile (BLOCK_M, BLOCK_N) may differ between row counts only where it
does not change a single bit: each output element is one chain of MMA steps over K in order, so
the tile decides which program computes an element, not how. That is a property of the GPU's MMA
unit and of the compiler, so it is checked, not assumed: the first GEMM on a device runs both
configurations on the same random operands (:func:`small_tiles_usable`) and uses the small-M
tiles only where the bits agree (``r1mega bench exact-gemm`` checks every candidate at the model's
shapes and times them).
"""
from __future__ import annotations

import os
import warnings
from typing import NamedTuple, Optional

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False

class Tiles(NamedTuple):
    """One compiled configuration of the GEMM kernel."""
    bm: int
    bn: int
    bk: int
    warps: int
    stages: int


GROUP_M = 8
LARGE = Tiles(128, 128, 64, 8, 3)  # every M, unless SMALL serves it
SMALL: Optional[Tiles] = Tiles(64, 64, 128, 4, 3)  # M <= SMALL_M_MAX if small_tiles_usable()
SMALL_M_MAX = 1024
# "BM,BN,BK,WARPS,STAGES": process-wide, so the rollout and the trainer of a run share them;
# R1MEGA_EXACT_GEMM_SMALL_TILES=none turns the small-M configuration off.
_TILES_ENV = "R1MEGA_EXACT_GEMM_TILES"
_SMALL_ENV = "R1MEGA_EXACT_GEMM_SMALL_TILES"
_small_ok: dict = {}  # (device, SMALL, LARGE) -> whether SMALL gives LARGE's bits there


def parse_tiles(spec: str, what: str = _TILES_ENV) -> Tiles:
    try:
        t = Tiles(*(int(v) for v in spec.split(",")))
    except (TypeError, ValueError):
        raise ValueError(f"{what}={spec!r}: expected five integers BM,BN,BK,WARPS,STAGES") from None
    if any(v & (v - 1) or v < 16 for v in (t.bm, t.bn, t.bk)) or t.warps not in (1, 2, 4, 8, 16) \
            or t.stages < 1:
        raise ValueError(f"{what}={spec!r}: tile sizes must be powers of two >= 16, "
                         f"warps a power of two <= 16, stages >= 1")
    return t


def set_tiles(spec: str) -> None:
    """Set the process-wide large-M configuration from "BM,BN,BK,WARPS,STAGES"."""
    global LARGE
    LARGE = parse_tiles(spec)
    _small_ok.clear()


def set_small_tiles(spec: Optional[str]) -> None:
    """Set (or with None / "none" drop) the small-M configuration."""
    global SMALL
    SMALL = None if spec in (None, "", "none") else parse_tiles(spec, _SMALL_ENV)
    _small_ok.clear()


if os.environ.get(_TILES_ENV):
    set_tiles(os.environ[_TILES_ENV])
if os.environ.get(_SMALL_ENV) is not None:
    set_small_tiles(os.environ[_SMALL_ENV])


if HAVE_TRITON:

    @triton.jit
    def _bi_mm_kernel(A, B, C, M, N, K, sam, sak, sbk, sbn, scm, scn,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, IEEE: tl.constexpr):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        # Grouped tile order for L2 reuse of B; it changes which program computes a tile, never
        # how a tile is computed.
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_size
        pid_n = (pid % per_group) // group_size
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(A + rm[:, None] * sam + kk[None, :] * sak,
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            b = tl.load(B + kk[:, None] * sbk + rn[None, :] * sbn,
                        mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
            if IEEE:  # float32 inputs: no TF32 rounding
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        tl.store(C + rm[:, None] * scm + rn[None, :] * scn, acc.to(C.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def small_tiles_usable(device) -> bool:
    """Whether SMALL computes LARGE's bits on ``device``: both run once on the same random
    operands (ragged M, N and K, so the masked edges are covered too). One host read per device
    and configuration pair; never inside CUDA graph capture (the caller falls back to LARGE)."""
    if SMALL is None or SMALL == LARGE:
        return False
    key = (str(device), SMALL, LARGE)
    if key not in _small_ok:
        gen = torch.Generator(device=device).manual_seed(0)
        ok = True
        for dtype in (torch.bfloat16, torch.float32):
            a = torch.randn(301, 1000, device=device, dtype=dtype, generator=gen)
            b = torch.randn(1000, 777, device=device, dtype=dtype, generator=gen)
            ok = ok and torch.equal(matmul(a, b, tiles=SMALL), matmul(a, b, tiles=LARGE))
        if not ok:
            warnings.warn(f"exact GEMM: the small-M tiles {tuple(SMALL)} do not give the bits of "
                          f"{tuple(LARGE)} on {device}; every M uses the latter (slower decode)")
        _small_ok[key] = ok
    return _small_ok[key]


def tiles_for(m: int, device) -> Tiles:
    """The configuration of an (m, K) @ (K, N) call: SMALL for small m where the device checked
    out, else LARGE. Inside CUDA graph capture an unchecked device gets LARGE (no host read)."""
    if SMALL is None or m > SMALL_M_MAX:
        return LARGE
    key = (str(device), SMALL, LARGE)
    if key not in _small_ok and torch.cuda.is_current_stream_capturing():
        return LARGE
    return SMALL if small_tiles_usable(device) else LARGE


def matmul(a: torch.Tensor, b: torch.Tensor, tiles: Optional[Tiles] = None) -> torch.Tensor:
    """(M, K) @ (K, N) -> (M, N) in a's dtype, float32 accumulation; any strides. ``tiles``:
    force a configuration (the benchmark and the check); by default :func:`tiles_for`."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"batch-invariant matmul: shapes {tuple(a.shape)} @ {tuple(b.shape)}")
    if b.dtype != a.dtype:
        b = b.to(a.dtype)
    m, k = a.shape
    n = b.shape[1]
    c = torch.empty(m, n, dtype=a.dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    t = tiles if tiles is not None else tiles_for(m, a.device)
    grid = (triton.cdiv(m, t.bm) * triton.cdiv(n, t.bn),)
    _bi_mm_kernel[grid](a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                        c.stride(0), c.stride(1), BLOCK_M=t.bm, BLOCK_N=t.bn,
                        BLOCK_K=t.bk, GROUP_M=GROUP_M, IEEE=a.dtype == torch.float32,
                        num_warps=t.warps, num_stages=t.stages)
    return c
