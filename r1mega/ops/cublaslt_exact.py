"""The exact mode's GEMM on cuBLASLt alone (``R1MEGA_EXACT_GEMM=cublaslt``).

The default exact GEMM is a Triton kernel whose LARGE tiles give the bits every other candidate,
a fixed cuBLASLt algorithm included, must give (r1mega/ops/triton_batch_invariant.py). Whether
any cuBLAS kernel computes Triton's bits is the device's business; if none does, cuBLAS can still
be the exact mode's GEMM on its own terms, which is what this module does: per weight shape one
fixed algorithm is the reference for every row count, training's and the rollout's alike.

Why that is batch-invariant: a cuBLASLt algorithm fixes the kernel, its tile and stages and
(asked for here: csrc/exact_gemm_lt.cpp) no split of K and no workspace, so each output element
is one chain of MMA steps over K in order, whatever M is. That is checked, not assumed: an
algorithm becomes a shape's reference only after its rows came out bit-equal at 1, 37 and 301
rows to the same rows of a 1,024-row product, and with other rows beside them
(:func:`_batch_invariant`). Decode-sized calls (M <= SMALL_M_MAX) may take another of the
shape's algorithms where it gives the reference's bits (:func:`_same_bits`) and is faster,
timed once per device, dtype, row bucket and shape, as the Triton candidates are.

Calls this module cannot take (float32, no CUDA, the extension missing, K or N not a whole
number of 16-byte rows: :func:`supported`, a property of dtype, weight shape and machine, so the
rollout and the trainer always agree) stay on the Triton kernel. Operands whose rows or bases are not 16-byte aligned are copied to aligned ones, so a
view cannot send one side to another kernel.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from r1mega.ops import cublaslt_gemm as clt
from r1mega.ops import triton_batch_invariant as tbi

CHECK_ROWS = (1, 37, 301)  # decode-sized and ragged row counts against a 1,024-row product
_ref: dict = {}     # (device, dtype, n, k) -> the shape's reference LtAlgo
_same: dict = {}    # (device, dtype, reference config, algorithm config, n, k) -> bits equal
_choice: dict = {}  # (device, dtype, row bucket, n, k) -> the timed fastest algorithm


def _capturing(device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


def supported(a: torch.Tensor, b: Optional[torch.Tensor] = None) -> bool:
    """Whether a (M, K) @ b (K, N) goes to cuBLASLt in this mode: CUDA, bf16/fp16, the extension,
    and K and N whole multiples of 16 bytes (rows cuBLASLt's aligned algorithms can take; other
    weight shapes stay on the Triton kernel, in training and the rollout alike)."""
    if not (getattr(a, "is_cuda", False) and a.dtype in (torch.bfloat16, torch.float16)
            and clt.get() is not None):
        return False
    if b is None:
        return True
    e = a.element_size()
    return a.shape[-1] * e % clt.ALIGN == 0 and b.shape[-1] * e % clt.ALIGN == 0


def _operands(gen, n: int, k: int, device, dtype, rows: int):
    w = torch.randn(n, k, device=device, dtype=dtype, generator=gen) / k ** 0.5
    return w, torch.randn(rows, k, device=device, dtype=dtype, generator=gen)


def _batch_invariant(algo: clt.LtAlgo, device, dtype: torch.dtype) -> bool:
    """Rows of ``algo``'s product do not depend on how many rows, or which, come with them."""
    gen = torch.Generator(device=device).manual_seed(1)
    w, a = _operands(gen, algo.n, algo.k, device, dtype, 1024)
    try:
        full = clt.matmul(a, w.t(), algo)
        for m in CHECK_ROWS:
            if not torch.equal(clt.matmul(a[:m].clone(), w.t(), algo), full[:m]):
                return False
            other = torch.cat([torch.randn(m, algo.k, device=device, dtype=dtype, generator=gen), a[5:6]])
            if not torch.equal(clt.matmul(other, w.t(), algo)[-1], full[5]):
                return False
    except Exception as exc:  # an algorithm the library refuses for these operands
        warnings.warn(f"exact GEMM (cuBLASLt): {algo} failed on {device} ({type(exc).__name__}: "
                      f"{exc}); it is not used")
        return False
    return True


def _same_bits(algo: clt.LtAlgo, ref: clt.LtAlgo, device, dtype: torch.dtype) -> bool:
    key = (str(device), dtype, ref.config, algo.config, algo.n, algo.k)
    if key not in _same:
        gen = torch.Generator(device=device).manual_seed(2)
        w, a = _operands(gen, algo.n, algo.k, device, dtype, max(CHECK_ROWS))
        try:
            _same[key] = all(torch.equal(clt.matmul(a[:m].clone(), w.t(), algo),
                                         clt.matmul(a[:m].clone(), w.t(), ref)) for m in CHECK_ROWS)
        except Exception:
            _same[key] = False
    return _same[key]


def reference(n: int, k: int, dtype: torch.dtype, device) -> clt.LtAlgo:
    """The shape's reference: the first of the heuristic's no-split algorithms (training-sized
    query first) that the check finds batch-invariant. Chosen eagerly: inside CUDA graph capture
    an unchosen shape is an error (the rollout's warm-up steps run eagerly first)."""
    key = (str(device), dtype, n, k)
    if key not in _ref:
        if _capturing(device):
            raise RuntimeError(f"exact GEMM (cuBLASLt): the weight shape ({n}, {k}) met first inside "
                               f"CUDA graph capture; run one eager step before capturing")
        found = clt.algos_for(n, k, dtype, device)
        for algo in found:
            if _batch_invariant(algo, device, dtype):
                _ref[key] = algo
                break
        else:
            raise RuntimeError(
                f"exact GEMM (cuBLASLt): none of the {len(found)} no-split algorithms cuBLASLt offers "
                f"for the weight shape ({n}, {k}) in {dtype} on {device} is batch-invariant "
                f"({clt.why_none(n, k, dtype, device)}); unset R1MEGA_EXACT_GEMM (the Triton "
                f"kernel) for rollout.exact")
    return _ref[key]


def algo_for(a: torch.Tensor, b: torch.Tensor, time_ms=None) -> clt.LtAlgo:
    """The algorithm of a (M, K) @ b (K, N): the shape's reference above SMALL_M_MAX rows (and
    inside capture for an untimed bucket), else the fastest of the algorithms with its bits.
    ``time_ms(algo)``: the timer (tests)."""
    m, k = a.shape
    n = b.shape[1]
    ref = reference(n, k, a.dtype, a.device)
    if m > tbi.SMALL_M_MAX:
        return ref
    key = (str(a.device), a.dtype, tbi.row_bucket(m), n, k)
    if key not in _choice:
        if _capturing(a.device):
            return ref
        cands = [ref] + [x for x in clt.algos_for(n, k, a.dtype, a.device)
                         if x.config != ref.config and _same_bits(x, ref, a.device, a.dtype)]
        _choice[key] = cands[0] if len(cands) == 1 else tbi.fastest(cands, time_ms or tbi._timer(a, b))
    return _choice[key]


def _row_major_aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` (R, C) itself where csrc/exact_gemm_lt.cpp takes it (unit column stride, base and
    row stride whole multiples of 16 bytes), else a fresh row-major copy (which is: a new
    allocation is aligned, and C is checked by the caller). Strides are read as they are: a
    one-row view may carry any row stride."""
    e = t.element_size()
    if t.stride(1) == 1 and t.data_ptr() % clt.ALIGN == 0 and (t.stride(0) * e) % clt.ALIGN == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) @ (K, N) -> (M, N) in a's dtype through the shape's algorithm (:func:`algo_for`);
    a row-major and b = w.T of a row-major w, copied into that layout where they are not."""
    if b.dtype != a.dtype:
        b = b.to(a.dtype)
    a, b = _row_major_aligned(a), _row_major_aligned(b.t()).t()
    if b.shape[1] * b.element_size() % clt.ALIGN or a.shape[1] * a.element_size() % clt.ALIGN:
        raise ValueError(f"exact GEMM (cuBLASLt): {tuple(a.shape)} @ {tuple(b.shape)} in {a.dtype}: "
                         f"K and N must be multiples of {clt.ALIGN // a.element_size()} elements "
                         f"(16-byte rows); unset R1MEGA_EXACT_GEMM for this model")
    if a.shape[0] == 0 or b.shape[1] == 0:
        return torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    return clt.matmul(a, b, algo_for(a, b))
