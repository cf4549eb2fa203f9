"""The FP8 rollout's decode GEMMs through cuBLASLt with an algorithm chosen by timing.

``torch._scaled_mm`` takes cuBLASLt's heuristic's first algorithm. At a decode step's row
counts the tensorwise GEMMs of the 852M rollout run at a fraction of their bytes floor, where an
algorithm that splits K or tiles differently might do better. Here each problem (rows, N, K, output dtype, device)
times the heuristic's candidates and their K splits (``csrc/fp8_gemm_lt.cpp``) against
``torch._scaled_mm`` once, graph-replayed with the weight read from HBM (``_time``), and keeps
the fastest; a choice is made outside any CUDA graph capture: a problem first met under capture runs
torch's kernel (timing would break the capture) and is timed at its next eager call.

Switched by ``R1MEGA_FP8_GEMM_LT=1``; off, since on an H100 no listed algorithm beat torch's
kernel by enough to move the rollout (bench/RECORDS.md; ``r1mega bench fp8-decode-gemm`` lists
it as ``tensorwise+lt``). Tensor scales only (the tensorwise recipe and
the row route's unscaled GEMM); a different algorithm may split K, so its sums round differently
from torch's kernel: the same error bound, not the same bits.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

import torch

from r1mega import switches
from r1mega.ops import cublaslt_gemm

ENABLED = switches.flag("R1MEGA_FP8_GEMM_LT", False,
                        "cuBLASLt FP8 GEMMs with the algorithm chosen by timing, for decode-sized calls")
MAX_ROWS = 2048          # decode-sized calls only; prefill-sized ones keep torch's kernel
CANDIDATES = 16          # heuristic algorithms timed per problem
MAX_WORKSPACE = 32 << 20  # bytes an algorithm may ask for (K splits need some)
REPEATS = 20

# (device index, m, n, k, out dtype) -> the chosen algorithm's bytes, or None: torch's kernel
_chosen: dict = {}
timings: dict = {}  # same key -> {"torch": ms, "lt:i": ms, ...}: what the choice saw (bench output)


def enabled(on: bool = True):
    """The switch set to ``on`` inside a with-block (benches and tests; runs read R1MEGA_FP8_GEMM_LT)."""
    return switches.overridden(sys.modules[__name__], "ENABLED", on)


def serves(a: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether (M, K) x (N, K) e4m3 operands go to the op: switched on, CUDA, decode-sized,
    shapes and rows the kernel takes. Shapes only (safe while torch.compile traces): the op
    itself runs torch's kernel where the extension is missing or a base is not 16-byte aligned."""
    return (ENABLED and a.is_cuda and a.shape[0] <= MAX_ROWS and a.dtype == torch.float8_e4m3fn
            and w.dtype == a.dtype and a.stride(1) == 1 and w.stride(1) == 1
            and all(v % 16 == 0 for v in (a.shape[1], w.shape[0], a.stride(0), w.stride(0))))


def fastest(times: dict) -> Optional[int]:
    """{"torch": ms, i: ms, ...} -> the index of the fastest cuBLASLt algorithm, or None where
    torch's kernel is at least as fast (or no algorithm ran)."""
    best = min((ms, i) for i, ms in times.items() if i != "torch")[1] if len(times) > 1 else None
    if best is None or times[best] >= times.get("torch", float("inf")):
        return None
    return best


def _time(run: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor) -> float:
    """Device ms a call of ``run(weight)``: the calls captured in one CUDA graph and replayed (a
    decode step replays its graph; timed eagerly, a 7 µs GEMM measures the host's launch), each
    on the next of copies of ``w`` that together exceed twice the L2 cache (a decode step reads
    every weight from HBM; one weight timed again and again would sit in L2)."""
    l2 = torch.cuda.get_device_properties(w.device).L2_cache_size
    copies = [w] + [w.clone() for _ in range(max(0, -(-2 * l2 // w.nbytes) - 1))]
    calls = max(REPEATS, len(copies))
    run(w)  # eagerly first: an algorithm cuBLASLt refuses raises here, not inside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            run(copies[i % len(copies)])
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def _torch_mm(a, scale_a, w, scale_w, out_dtype):
    return torch._scaled_mm(a, w.t(), scale_a=scale_a, scale_b=scale_w, out_dtype=out_dtype,
                            use_fast_accum=True)


def _name(ext, blobs, i) -> str:
    """A timed candidate's name in ``timings``: "torch", or "lt:I" with "/kS" for a K split in S."""
    if i == "torch":
        return i
    split = ext.describe(blobs[i])[3]
    return f"lt:{i}" + (f"/k{split}" if split > 1 else "")


def _choose(a, scale_a, w, scale_w, out_dtype, key) -> Optional[torch.Tensor]:
    ext = cublaslt_gemm.get()
    m, k = a.shape
    n = w.shape[0]
    blobs = ext.fp8_algos(m, n, k, out_dtype, CANDIDATES, MAX_WORKSPACE)
    times = {"torch": _time(lambda wi: _torch_mm(a, scale_a, wi, scale_w, out_dtype), w)}
    for i, blob in enumerate(blobs):
        try:
            times[i] = _time(lambda wi, blob=blob: ext.fp8_matmul(a, scale_a, wi, scale_w, out_dtype, blob), w)
        except RuntimeError:  # the heuristic listed it, AlgoCheck refuses it here: not a candidate
            continue
    best = fastest(times)
    timings[key] = {_name(ext, blobs, i): ms for i, ms in times.items()}
    return None if best is None else blobs[best]


@torch.library.custom_op("r1mega::fp8_gemm_lt", mutates_args=())
def fp8_gemm_lt(a: torch.Tensor, scale_a: torch.Tensor, w: torch.Tensor, scale_w: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
    """(a (M, K) * scale_a) @ (w (N, K) * scale_w).T in ``out_dtype``: e4m3 operands, float32
    scalar scales, fast accumulation (``torch._scaled_mm(..., use_fast_accum=True)``'s product)."""
    if cublaslt_gemm.get() is None or a.data_ptr() % 16 or w.data_ptr() % 16:
        return _torch_mm(a, scale_a, w, scale_w, out_dtype)
    key = (a.device.index, a.shape[0], w.shape[0], a.shape[1], out_dtype)
    if key not in _chosen:
        if torch.cuda.is_current_stream_capturing():
            return _torch_mm(a, scale_a, w, scale_w, out_dtype)
        _chosen[key] = _choose(a, scale_a, w, scale_w, out_dtype, key)
    blob = _chosen[key]
    if blob is None:
        return _torch_mm(a, scale_a, w, scale_w, out_dtype)
    return cublaslt_gemm.get().fp8_matmul(a, scale_a, w, scale_w, out_dtype, blob)


@fp8_gemm_lt.register_fake
def _(a, scale_a, w, scale_w, out_dtype):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)
