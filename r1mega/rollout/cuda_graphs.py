"""CUDA graphs of the decode step (forward + sampling) in batch-size buckets.

A decode step of a small model is hundreds of small kernels; launched one by one from Python the
GPU idles between them. A bucket's graph is captured when a step first needs it in a rollout
phase (the KV cache tensors it points at live for that phase) and replayed with the batch copied
into static input buffers. Rows past the real batch are padding: they write their K/V to the
scratch block and attend to one token, so they never touch a live sequence.

Captures are paid every rollout phase whose KV cache was freed (a warm-up step and a capture
each). Capturing all 15 buckets up front was part of why a SmolLM2 GRPO step's rollout took 1.6 s
on the H200 (0.3 s after this and the KV-cache changes). So a phase captures lazily, and a shrinking batch keeps replaying its bigger graph until it is less
than half full: at most one capture per halving (e.g. 64 -> 32 -> 16), padding rows meanwhile.

Host work per step is the other half of decode speed: every per-row integer of a step (token,
position, context length, the step's RNG key, the new token's cache slot, block table; the host
derives the key and the slot, so no small kernel of the step computes them) travels in ONE
pinned int64 buffer and one
host-to-device copy, and the outputs come back as one (B, 2) tensor in one copy -- the step's
only synchronisation. The host buffer is packed with the step's own row width, so the rows sent
are one contiguous range: a strided slice of a pinned tensor is staged by ``copy_`` through a
pageable temporary, and a copy from pageable memory may wait for the stream, i.e. for the step
still running, which is exactly what overlapped steps (overlap.py) must not do.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from r1mega.rollout.kv_cache import SCRATCH_BLOCK

# Columns of the packed int64 step input; the block table follows from column BT. KEY holds the
# row's step key (sampling.step_keys), SLOT the flat cache slot its new token's K/V goes to.
IDS, POS, CTX, KEY, SLOT, BT = range(6)
# A captured bucket is replayed for batches down to half its size, counting batches below this
# as this size: tiny batches cost the same as MIN_SHRINK rows, not worth a capture each.
MIN_SHRINK = 16


def default_buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, 16, 24, 32, 48, 64]
    b = 96
    while b < max_batch:
        sizes.append(b)
        b += 32 if b < 256 else 64
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


class DecodeGraphs:
    """``step_fn(ints (b, BT + W) int64, temperature (b,)) -> (b, 2) float64`` captured per bucket."""

    def __init__(self, step_fn: Callable, max_batch: int, max_blocks: int, device, buckets=None):
        self.step_fn = step_fn
        self.buckets = buckets or default_buckets(max_batch)
        self.max_batch = n = self.buckets[-1]
        self.width = BT + max_blocks
        self.ints = torch.zeros(n, self.width, dtype=torch.int64, device=device)
        self.ints[:, CTX] = 1  # padding rows attend to one (scratch) token
        # Rows [pad_from, n) of ``ints`` hold padding: a step rewrites only the rows that a
        # bigger earlier batch left behind, not every padding row of its bucket every step.
        self._pad_from = 0
        # Device landing place of the packed host rows (flat, like them): one contiguous copy,
        # then one device copy into the static (n, width) inputs the graphs read.
        self.ints_in = torch.zeros(n * self.width, dtype=torch.int64, device=device)
        self.temperature = torch.ones(n, dtype=torch.float32, device=device)
        pin = torch.cuda.is_available()
        # Two sets of pinned host buffers: with overlapped steps the host fills one while the
        # copy from the other may still be queued behind the running step.
        self.host_ints_slots = [torch.zeros(n * self.width, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self.host_temp_slots = [torch.ones(n, dtype=torch.float32, pin_memory=pin) for _ in range(2)]
        self.host_out_slots = [torch.zeros(n, 2, dtype=torch.float64, pin_memory=pin) for _ in range(2)]
        self.graphs: dict = {}
        self.outputs: dict = {}
        self.pool = None
        self.captures = 0  # graphs captured so far (stats)
        # Host seconds spent capturing, warm-ups included: the first capture of a shape also
        # compiles the decode step, a one-time cost (the trainer's time budget discounts it).
        self.capture_s = 0.0
        # Without CUDA the same packed-input code runs eagerly (tests exercise it on CPU).
        self.capture_enabled = torch.device(device).type == "cuda"
        assert SCRATCH_BLOCK == 0, "padding rows are zeroed, which must point at the scratch block"

    def bucket_for(self, n: int) -> int:
        """The graph a batch of ``n`` rows replays: an already captured bucket that is at most
        half padding (counting batches under ``MIN_SHRINK`` as that), else the smallest default
        bucket that fits (captured on first use)."""
        if n > self.max_batch:
            raise ValueError(f"batch of {n} sequences exceeds the largest CUDA-graph bucket {self.max_batch}")
        have = [b for b in self.graphs if b >= n]
        if have and min(have) <= 2 * max(n, MIN_SHRINK):
            return min(have)
        return next(b for b in self.buckets if b >= n)

    def capture(self, buckets=None) -> None:
        """Capture ``buckets`` (default: every one), largest first so smaller graphs reuse its
        memory pool. Rows 0..b-1 of the static inputs are reset to padding first."""
        if not self.capture_enabled:
            return
        todo = sorted(set(buckets or self.buckets) - set(self.graphs), reverse=True)
        if not todo:
            return
        t0 = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())  # after any step still reading the inputs
        with torch.cuda.stream(stream):
            pad = self.ints[: todo[0]]
            pad.zero_()  # token 0 at position 0, block table -> scratch block
            pad[:, CTX] = 1
            # Warm-up of each bucket outside capture: Triton compiles, cuBLAS picks kernels, and
            # megatron's torch.compile'd fusions (SwiGLU) compile for each shape -- a compile
            # inside capture would copy host tensors to the device and abort the capture.
            for b in todo:
                self.step_fn(self.ints[:b], self.temperature[:b])
        torch.cuda.current_stream().wait_stream(stream)
        for b in todo:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                out = self.step_fn(self.ints[:b], self.temperature[:b])
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[b], self.outputs[b] = g, out
        self.captures += len(todo)
        self.capture_s += time.perf_counter() - t0
        if self._pad_from <= todo[0]:
            self._pad_from = 0  # rows 0..todo[0]-1 were reset above

    def host_rows(self, slot: int, n: int, width: int) -> torch.Tensor:
        """The (n, width) view of pinned host buffer ``slot`` that ``run(n, width, slot)`` sends:
        row-major with the step's own width, so it is one contiguous range."""
        return self.host_ints_slots[slot][: n * width].view(n, width)

    def run(self, n: int, width: int, slot: int = 0, prev_tokens=None, gather: bool = False) -> torch.Tensor:
        """Replay for the ``n`` rows of ``host_rows(slot, n, width)`` and ``host_temp_slots[slot]``
        (filled by the caller). ``prev_tokens`` (m,) on the device, the previous step's samples
        that the host has not seen, replaces the token column: row i takes ``prev_tokens[i]``, or
        with ``gather`` ``prev_tokens[j]`` where j is what the host wrote in row i's token column
        (the previous row of a sequence when finished rows left the batch). Returns the (n, 2)
        [token, log-prob] output, still on the device and valid until the next replay."""
        b = self.bucket_for(n)
        if self.capture_enabled and b not in self.graphs:
            self.capture([b])
        k = n * width
        self.ints_in[:k].copy_(self.host_ints_slots[slot][:k], non_blocking=True)
        self.ints[:n, :width].copy_(self.ints_in[:k].view(n, width))
        self.temperature[:n].copy_(self.host_temp_slots[slot][:n], non_blocking=True)
        if prev_tokens is not None:
            # Stream order: this reads the previous replay's output before this replay rewrites it.
            src = prev_tokens.index_select(0, self.ints[:n, IDS]) if gather else prev_tokens[:n]
            self.ints[:n, IDS].copy_(src)
        if self._pad_from > n:  # a bigger batch left real rows where this one pads
            pad = self.ints[n:self._pad_from]
            pad.zero_()  # token 0 at position 0, block table -> scratch block
            pad[:, CTX] = 1
        self._pad_from = n
        if not self.capture_enabled:
            return self.step_fn(self.ints[:b], self.temperature[:b])[:n]
        self.graphs[b].replay()
        return self.outputs[b][:n]

    def clear(self) -> None:
        self.graphs.clear()
        self.outputs.clear()
        self.pool = None
