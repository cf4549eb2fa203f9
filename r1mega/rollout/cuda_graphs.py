"""CUDA graphs of the decode step (forward + sampling) in batch-size buckets.

A decode step of a small model is hundreds of small kernels; launched one by one from Python the
GPU idles between them. Each bucket's graph is captured once per rollout phase (the KV cache
tensors it points at live for that phase) and replayed with the batch copied into static input
buffers. Rows past the real batch are padding: they write their K/V to the scratch block and
attend to one token, so they never touch a live sequence.

The graph holds no host synchronisation; the engine reads the sampled tokens back once per step.
"""
from __future__ import annotations

from typing import Callable

import torch

from r1mega.rollout.kv_cache import SCRATCH_BLOCK


def default_buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, 16, 24, 32, 48, 64]
    b = 96
    while b < max_batch:
        sizes.append(b)
        b += 32 if b < 256 else 64
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


class DecodeGraphs:
    """Static buffers + one captured graph per bucket for ``step_fn(**inputs) -> tuple[Tensor]``."""

    INPUTS = ("ids", "positions", "block_tables", "ctx_lens", "seq_keys", "steps", "temperature")

    def __init__(self, step_fn: Callable, max_batch: int, max_blocks: int, device, buckets=None):
        self.step_fn = step_fn
        self.buckets = buckets or default_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        n = self.max_batch
        i64, i32 = torch.int64, torch.int32
        self.static = {
            "ids": torch.zeros(n, dtype=i64, device=device),
            "positions": torch.zeros(n, dtype=i64, device=device),
            "block_tables": torch.full((n, max_blocks), SCRATCH_BLOCK, dtype=i32, device=device),
            "ctx_lens": torch.ones(n, dtype=i32, device=device),
            "seq_keys": torch.zeros(n, dtype=i64, device=device),
            "steps": torch.zeros(n, dtype=i64, device=device),
            "temperature": torch.ones(n, dtype=torch.float32, device=device),
        }
        self.graphs: dict = {}
        self.outputs: dict = {}
        self.pool = None

    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"batch of {n} sequences exceeds the largest CUDA-graph bucket {self.max_batch}")

    def _view(self, b: int) -> dict:
        return {k: v[:b] for k, v in self.static.items()}

    def capture(self) -> None:
        """Capture every bucket, largest first so smaller graphs reuse its memory pool."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks kernels, outside capture
                self.step_fn(**self._view(self.max_batch))
        torch.cuda.current_stream().wait_stream(stream)
        for b in sorted(self.buckets, reverse=True):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                out = self.step_fn(**self._view(b))
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[b], self.outputs[b] = g, out
        torch.cuda.synchronize()

    def run(self, n: int, inputs: dict) -> tuple:
        """Copy the first ``n`` rows in, reset the padding rows, replay; outputs sliced to ``n``."""
        b = self.bucket_for(n)
        s = self.static
        for k in self.INPUTS:
            src = inputs[k]
            if k == "block_tables":
                s[k][:n, : src.shape[1]].copy_(src, non_blocking=True)
                s[k][:n, src.shape[1]:].fill_(SCRATCH_BLOCK)
            else:
                s[k][:n].copy_(src, non_blocking=True)
        if b > n:
            s["block_tables"][n:b].fill_(SCRATCH_BLOCK)
            s["positions"][n:b].zero_()
            s["ctx_lens"][n:b].fill_(1)
            s["ids"][n:b].zero_()
        self.graphs[b].replay()
        return tuple(o[:n] for o in self.outputs[b])

    def clear(self) -> None:
        self.graphs.clear()
        self.outputs.clear()
        self.pool = None
