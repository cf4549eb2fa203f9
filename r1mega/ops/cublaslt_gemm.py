"""cuBLASLt as a candidate of the exact mode's GEMM (r1mega/ops/triton_batch_invariant.py).

cuBLAS picks its kernel per problem shape, splitting K for small M, so a row's bits depend on
the batch. With one algorithm fixed per weight shape (kernel, tile, stages, cluster, no K
split, no workspace: csrc/exact_gemm_lt.cpp) every output element is one chain of MMA steps over
K in order whatever M is, as in the Triton kernel; whether it is the same chain as the Triton
kernel's LARGE tiles is the device's property, so an algorithm serves only where the tiles'
device check found LARGE's bits (``tiles_usable``), and among those the timing picks, as for
the Triton candidates. ``R1MEGA_EXACT_GEMM_CUBLASLT=1`` adds them; off until a GPU has timed
them (``r1mega bench exact-gemm`` lists them as ``cublaslt:I``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from r1mega import switches
from r1mega.ops.cuda_libs import cublaslt_flags
from r1mega.ops.extension import CudaExtension


def _libraries():
    from torch.utils.cpp_extension import CUDA_HOME

    return cublaslt_flags(CUDA_HOME)


_EXT = CudaExtension("r1mega_gemm_cuda", ["gemm_lt.cpp", "exact_gemm_lt.cpp", "fp8_gemm_lt.cpp"],
                     "R1MEGA_GEMM", [], "the exact GEMM runs Triton only, the FP8 rollout torch's "
                     "scaled matmul", libraries=_libraries)
get, load_error = _EXT.get, _EXT.load_error

ENABLED = switches.flag("R1MEGA_EXACT_GEMM_CUBLASLT", False,
                        "fixed cuBLASLt algorithms among the exact GEMM's candidates")
# heuristic queries per weight shape: a training-sized and a decode-sized M, each's best few
HEURISTIC_ROWS = (8192, 256)
PER_QUERY = 4
# one call's rows at most: a larger product runs in row slices, the same bits per row (the
# algorithm is fixed and splits no K), so an algorithm need only be checked up to here
MAX_ROWS = 1 << 16
# an algorithm is offered only if it runs without workspace at these row counts too, up to its
# own ``max_rows`` (its calls' slice: one that wants workspace at some M would have no exact twin
# to serve it there), and only if that reaches MIN_ROWS (smaller slices would cut training's GEMMs
# thin)
WORKSPACE_ROWS = (1, 301, 4096, 16384, MAX_ROWS)
MIN_ROWS = 4096


class LtAlgo(NamedTuple):
    """One cuBLASLt algorithm for y = a @ w.T with w (n, k): ``blob`` its bytes, ``config`` what
    it is (algorithm id, tile, stages, K splits, reduction, swizzle, custom option, inner and
    cluster shape)."""
    n: int
    k: int
    dtype: torch.dtype
    blob: bytes
    config: tuple
    max_rows: int = MAX_ROWS  # rows per call: larger products run in slices of this many

    def __repr__(self):
        return f"LtAlgo(n={self.n}, k={self.k}, {str(self.dtype).replace('torch.', '')}, config={self.config})"


_algos: dict = {}  # (device, dtype, n, k) -> [LtAlgo]
# (device, dtype, n, k) -> [(config, workspace bytes at each of WORKSPACE_ROWS, -1 refused)]
rejected: dict = {}


ALIGN = 16  # bytes: every operand's base and row, and the output's rows (csrc/exact_gemm_lt.cpp)


def eligible(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a (M, K) @ b (K, N) can go to cuBLASLt here: CUDA, bf16/fp16, a row-major and b
    a transposed row-major weight (b.T row-major), bases and rows 16-byte aligned, the
    extension built or buildable."""
    if not (getattr(a, "is_cuda", False) and a.dtype in (torch.bfloat16, torch.float16)
            and b.dtype == a.dtype and a.stride(1) == 1 and b.stride(0) == 1):
        return False
    e = a.element_size()
    aligned = all(v % ALIGN == 0 for v in (a.data_ptr(), b.data_ptr(), a.stride(0) * e,
                                           b.stride(1) * e, b.shape[1] * e))
    return aligned and get() is not None


def _rows_without_workspace(ws: tuple) -> int:
    """The largest of WORKSPACE_ROWS up to which (from 1 row) every count wants no workspace
    (``ws``: bytes at each, -1 refused), 0 where even one row wants some."""
    rows = 0
    for r, w in zip(WORKSPACE_ROWS, ws):
        if w != 0:
            break
        rows = r
    return rows


def algos_for(n: int, k: int, dtype: torch.dtype, device) -> list:
    """The no-split, no-workspace algorithms cuBLASLt's heuristic offers for the weight shape
    (n, k) at HEURISTIC_ROWS, best first, each once, that need no workspace from 1 up to at least
    MIN_ROWS of WORKSPACE_ROWS either; each is used in slices of the rows it was found free at.
    One query per device, dtype and shape; what was dropped, and why, is kept in ``rejected``
    for the error that follows when nothing is left."""
    key = (str(device), dtype, n, k)
    if key not in _algos:
        ext = get()
        seen, out, dropped = set(), [], []
        with torch.cuda.device(device):
            for m in HEURISTIC_ROWS:
                for blob in ext.algos(m, n, k, dtype, PER_QUERY):
                    raw = bytes(blob.numpy().tobytes())
                    config = tuple(ext.describe(blob))
                    if config not in seen:
                        seen.add(config)
                        ws = tuple(ext.workspace(r, n, k, dtype, blob) for r in WORKSPACE_ROWS)
                        rows = _rows_without_workspace(ws)
                        if rows >= MIN_ROWS:
                            out.append(LtAlgo(n, k, dtype, raw, config, rows))
                        else:
                            dropped.append((config, ws))
        _algos[key], rejected[key] = out, dropped
    return _algos[key]


def why_none(n: int, k: int, dtype: torch.dtype, device) -> str:
    """What :func:`algos_for` dropped for the shape: each algorithm's workspace bytes per row
    count (-1: cuBLASLt refuses it there), for an error message."""
    dropped = rejected.get((str(device), dtype, n, k), [])
    if not dropped:
        return "the heuristic offered no algorithm without workspace and K splits"
    return f"dropped for workspace below {MIN_ROWS} of rows {WORKSPACE_ROWS}: " + "; ".join(
        f"{cfg}: {ws}" for cfg, ws in dropped)


_blobs: dict = {}  # algorithm bytes -> the CPU tensor the extension reads


def matmul(a: torch.Tensor, b: torch.Tensor, algo: LtAlgo) -> torch.Tensor:
    """(M, K) @ (K, N) through ``algo`` (b = w.T, w row-major (N, K))."""
    w = b.t()
    if (w.shape[0], w.shape[1], a.dtype) != (algo.n, algo.k, algo.dtype):
        raise ValueError(f"cuBLASLt exact GEMM: {algo} for a {tuple(a.shape)} @ {tuple(b.shape)} "
                         f"{a.dtype} call")
    blob = _blobs.get(algo.blob)
    if blob is None:
        blob = _blobs[algo.blob] = torch.frombuffer(bytearray(algo.blob), dtype=torch.uint8)
    ext, step = get(), algo.max_rows
    if a.shape[0] <= step:
        return ext.matmul(a, w, blob)
    return torch.cat([ext.matmul(a[i:i + step], w, blob) for i in range(0, a.shape[0], step)])
