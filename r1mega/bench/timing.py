"""Timing for the benchmarks: median CUDA-event time of queued calls (wall clock on CPU)."""
from __future__ import annotations

import statistics
import time
from typing import Optional

import torch


def median_ms(fn, reps: int, warmup: int, cuda: Optional[bool] = None, *,
              sync_each: bool = False) -> float:
    """Median time of ``fn`` in ms. On CUDA the calls are queued back to back, as in a training
    step where the host runs ahead of the GPU: the time is the device's, and any host
    synchronisation inside ``fn`` shows as idle device time. ``sync_each`` starts every call on an
    idle device instead (adds the host's launch latency of the first kernel). ``cuda`` None:
    whether a GPU is present."""
    for _ in range(warmup):
        fn()
    if not (torch.cuda.is_available() if cuda is None else cuda):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
        if sync_each:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def graph_ms(fn, calls: int) -> float:
    """Device time per call: ``calls`` calls captured in one CUDA graph and replayed, so the
    host's Python and launch time (which a training step overlaps with earlier GPU work) is out."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median_ms(graph.replay, 5, 2, True) / calls


def copy_bandwidth(nbytes: int, reps: int, device="cuda") -> float:
    """Measured device-copy bandwidth in bytes/s (bytes read + written): the bytes floor of a
    memory-bound kernel is the bytes it must move divided by this."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), reps, 3, torch.device(device).type == "cuda")
    return 2 * nbytes / (ms * 1e-3)
