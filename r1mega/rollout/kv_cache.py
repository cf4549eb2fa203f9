"""Paged KV cache: fixed-size blocks, a ref-counted block allocator, and per-layer K/V tensors.

The cache lives only for the rollout phase: :meth:`PagedKVCache.allocate` takes the memory right
before generation and :meth:`PagedKVCache.release` hands it back before the training phase, so
the optimizer states and activations of the update see the whole device again.

Layout per layer: ``(num_blocks, block_tokens, kv_heads_local, head_dim)`` for K and for V. A
token's *slot* is ``block_id * block_tokens + offset``; writing and reading use slots and block
tables only, so a sequence's blocks need not be contiguous and the G samples of one prompt can
point at the same prompt blocks (prefix sharing through reference counts).

Block 0 is reserved as a scratch block: padded rows of a CUDA-graph batch write their K/V there,
so a graph replay never touches a live sequence's cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

SCRATCH_BLOCK = 0


class OutOfBlocks(RuntimeError):
    """The allocator has no free block; the scheduler preempts a sequence and retries."""


class BlockAllocator:
    """Free list + reference counts over block ids ``1..num_blocks-1`` (0 is the scratch block)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(
                f"The paged KV cache needs at least 2 blocks (one is scratch), got {num_blocks}. "
                f"Raise rollout.kv_memory_fraction (GPU) or the token budget (CPU)."
            )
        self.num_blocks = num_blocks
        # Pop from the end: low ids first keeps early sequences' blocks close together.
        self._free = list(range(num_blocks - 1, 0, -1))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks("no free KV block")
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def share(self, block: int) -> int:
        """One more owner of ``block`` (a sample of the same prompt reading the prompt's KV)."""
        if self._refs[block] <= 0:
            raise RuntimeError(f"KV block {block} is shared but not allocated (allocator bug).")
        self._refs[block] += 1
        return block

    def free(self, block: int) -> None:
        refs = self._refs[block] - 1
        if refs < 0:
            raise RuntimeError(f"KV block {block} freed more often than allocated (allocator bug).")
        self._refs[block] = refs
        if refs == 0:
            self._free.append(block)

    def free_all(self, blocks: list[int]) -> None:
        for b in blocks:
            self.free(b)

    def refcount(self, block: int) -> int:
        return self._refs[block]


@dataclass
class KVCacheShape:
    num_layers: int
    kv_heads: int  # KV heads held by this TP rank
    head_dim: int
    block_tokens: int
    dtype: torch.dtype
    # The values are the keys themselves (MLA's latent rows, r1mega/rollout/adapters/mla.py):
    # one tensor per layer, ``v`` aliases ``k``.
    keys_only: bool = False

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        # K and V (or K alone), every layer.
        tensors = 1 if self.keys_only else 2
        return tensors * self.num_layers * self.block_tokens * self.kv_heads * self.head_dim * elem


def blocks_for_budget(
    shape: KVCacheShape,
    device: torch.device,
    *,
    memory_fraction: float,
    cpu_token_budget: int,
    max_blocks: Optional[int] = None,
) -> int:
    """How many blocks fit: a fraction of the free device memory on GPU, a token budget on CPU."""
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        n = int(free_bytes * memory_fraction) // shape.bytes_per_block
    else:
        n = -(-cpu_token_budget // shape.block_tokens) + 1
    if max_blocks is not None:
        n = min(n, max_blocks)
    return n


class PagedKVCache:
    """K/V block tensors for every layer of this rank's model chunk, plus their allocator."""

    def __init__(self, shape: KVCacheShape, device: torch.device):
        self.shape = shape
        self.device = device
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.allocator: Optional[BlockAllocator] = None

    @property
    def is_allocated(self) -> bool:
        return self.allocator is not None

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks if self.allocator else 0

    def allocate(self, num_blocks: int) -> None:
        s = self.shape
        self.release()
        dims = (num_blocks, s.block_tokens, s.kv_heads, s.head_dim)
        # One tensor per layer (not one big one) so each layer's cache is a plain contiguous
        # buffer the attention kernels can index with a single base pointer.
        self.k = [torch.zeros(dims, dtype=s.dtype, device=self.device) for _ in range(s.num_layers)]
        self.v = self.k if s.keys_only else [torch.zeros(dims, dtype=s.dtype, device=self.device)
                                             for _ in range(s.num_layers)]
        self.allocator = BlockAllocator(num_blocks)

    def release(self) -> None:
        """Free the cache tensors (before the training phase)."""
        self.k, self.v = [], []
        self.allocator = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values. slots (T,), k/v (T, kv_heads, head_dim)."""
        torch.ops.r1mega.kv_cache_write(self.k[layer], self.v[layer], slots, k, v)

    def copy_blocks(self, pairs) -> None:
        """Copy-on-write of many blocks at once: (src, dst) pairs, destinations distinct and not
        sources. Two kernels per layer and K/V whatever the count: a block-by-block copy is
        ~3,400 launches in each GRPO prefill of 8 prompts x 8 samples on SmolLM2 (56 blocks x 30
        layers x K/V; the H200 step profile counted 3,362 device-to-device copies)."""
        if not pairs:
            return
        idx = torch.tensor(pairs, dtype=torch.int64).t()  # (2, n): sources, destinations
        if self.device.type == "cuda":
            idx = idx.pin_memory().to(self.device, non_blocking=True)
        else:
            idx = idx.to(self.device)
        src, dst = idx[0], idx[1]
        for cache in self.k if self.shape.keys_only else (*self.k, *self.v):
            cache.index_copy_(0, dst, cache.index_select(0, src))


def write_slots(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor) -> None:
    """caches (N, bs, Hkv, D) <- k/v (T, Hkv, D) at the flat token slots (T,), cast to the cache
    dtype. Also the reference of the fused RoPE + write kernel (triton_rope_kv)."""
    hkv, d = k_cache.shape[-2], k_cache.shape[-1]
    k_cache.view(-1, hkv, d).index_copy_(0, slots, k.reshape(-1, hkv, d).to(k_cache.dtype))
    v_cache.view(-1, hkv, d).index_copy_(0, slots, v.reshape(-1, hkv, d).to(v_cache.dtype))


# The write as one opaque op for dynamo. It was a graph break (torch.compiler.disable, after a
# traced index_copy_ had been functionalised into a copy of the whole cache), which cut the
# compiled decode forward into a fragment per layer. A custom op with ``mutates_args`` stays in
# the graph and inductor re-inplaces it: tests/unit/test_rollout_rope_kv_triton.py checks that
# the compiled code hands the op the cache tensors themselves, not copies.
@torch.library.custom_op("r1mega::kv_cache_write", mutates_args=("k_cache", "v_cache"))
def _kv_cache_write_op(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor) -> None:
    write_slots(k_cache, v_cache, slots, k, v)


@_kv_cache_write_op.register_fake
def _(k_cache, v_cache, slots, k, v) -> None:
    return None


def slots_for(block_table: list[int], start: int, stop: int, block_tokens: int) -> list[int]:
    """Cache slots of token positions ``start..stop-1`` of one sequence."""
    return [block_table[p // block_tokens] * block_tokens + p % block_tokens for p in range(start, stop)]
