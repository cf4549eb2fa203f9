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

FP8 cache (``rollout.kv_cache_dtype=fp8``): K and V are stored as float8_e4m3fn with one float32
scale per (token, KV head) beside them, ``(num_blocks, block_tokens, kv_heads)`` per layer. A
decode step reads the whole cache of every running sequence, so halving its bytes halves the
attention's share of the step. The scale is the row's amax / 448 (e4m3's largest finite value):
each head's row uses the whole format range, and an outlier token or head costs precision only in
its own row. Readers factor the scales out of their dot products (r1mega/rollout/triton_paged.py)
or dequantise (:func:`dequantize_rows`, the references).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

SCRATCH_BLOCK = 0
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


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
    def quantized(self) -> bool:
        """FP8 storage with per-(token, KV head) scales (module docstring)."""
        return self.dtype == FP8_DTYPE

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        # K and V (or K alone), every layer; plus a float32 scale per token and head of each.
        tensors = 1 if self.keys_only else 2
        row = self.head_dim * elem + (4 if self.quantized else 0)
        return tensors * self.num_layers * self.block_tokens * self.kv_heads * row


def kv_cache_dtype(setting: str, model_dtype: torch.dtype, device: torch.device, *,
                   keys_only: bool = False, exact: bool = False) -> torch.dtype:
    """The cache dtype for ``rollout.kv_cache_dtype``: "auto" = the model's, "fp8" = e4m3 with
    scales; refuses what the FP8 cache cannot serve (config_checks refuses those up front too)."""
    if setting == "auto":
        return model_dtype
    if setting != "fp8":
        raise ValueError(f"rollout.kv_cache_dtype={setting!r} is not one of 'auto', 'fp8'.")
    if exact:
        raise ValueError("rollout.kv_cache_dtype=fp8 with rollout.exact=true: exact log-probs need "
                         "the training forward's K/V numerics; set rollout.kv_cache_dtype=auto.")
    if keys_only:
        raise ValueError("rollout.kv_cache_dtype=fp8 is not implemented for MLA's latent cache "
                         "(r1mega/rollout/adapters/mla.py); set rollout.kv_cache_dtype=auto.")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"rollout.kv_cache_dtype=fp8 needs e4m3 conversions in hardware (sm_89 "
                         f"or newer), but {device} is sm_{major}{minor}; set rollout.kv_cache_dtype=auto.")
    return FP8_DTYPE


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
        # FP8 cache only: float32 (num_blocks, block_tokens, kv_heads) per layer; else empty.
        self.k_scale: list[torch.Tensor] = []
        self.v_scale: list[torch.Tensor] = []
        self.allocator: Optional[BlockAllocator] = None

    @property
    def is_allocated(self) -> bool:
        return self.allocator is not None

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks if self.allocator else 0

    def allocate(self, num_blocks: int) -> None:
        s = self.shape
        if s.quantized and s.keys_only:
            raise NotImplementedError("An FP8 KV cache of keys-only (MLA latent) rows is not "
                                      "implemented; set rollout.kv_cache_dtype=auto.")
        self.release()
        dims = (num_blocks, s.block_tokens, s.kv_heads, s.head_dim)
        # One tensor per layer (not one big one) so each layer's cache is a plain contiguous
        # buffer the attention kernels can index with a single base pointer.
        self.k = [torch.zeros(dims, dtype=s.dtype, device=self.device) for _ in range(s.num_layers)]
        self.v = self.k if s.keys_only else [torch.zeros(dims, dtype=s.dtype, device=self.device)
                                             for _ in range(s.num_layers)]
        if s.quantized:
            # Ones, not zeros: a never-written slot dequantises to 0 either way, and a scale of 1
            # is what a written zero row gets too.
            self.k_scale, self.v_scale = ([torch.ones(dims[:3], dtype=torch.float32, device=self.device)
                                           for _ in range(s.num_layers)] for _ in range(2))
        self.allocator = BlockAllocator(num_blocks)

    def layer(self, i: int) -> tuple:
        """(k, v, k_scale, v_scale) of layer ``i``; the scales are None unless FP8."""
        if self.shape.quantized:
            return self.k[i], self.v[i], self.k_scale[i], self.v_scale[i]
        return self.k[i], self.v[i], None, None

    def release(self) -> None:
        """Free the cache tensors (before the training phase)."""
        self.k, self.v, self.k_scale, self.v_scale = [], [], [], []
        self.allocator = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values. slots (T,), k/v (T, kv_heads, head_dim)."""
        kc, vc, *scales = self.layer(layer)  # scales: (k_scale, v_scale) of an FP8 cache
        cache_write(kc, vc, slots, k, v, *scales)

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
        tensors = self.k if self.shape.keys_only else (*self.k, *self.v)
        for cache in (*tensors, *self.k_scale, *self.v_scale):
            c = _as_bytes(cache)
            c.index_copy_(0, dst, c.index_select(0, src))


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """FP8 tensors as uint8 (same bytes): CPU torch has no index_copy_ for float8 dtypes."""
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) -> (e4m3 (..., D), float32 scale (...,)) with x ~= e4m3 * scale.

    scale = amax(|row|) / 448, so the row's largest element lands on e4m3's largest finite value;
    an all-zero row gets scale 1 (no division by zero). Division and the round to nearest even
    are float32 (what the Triton write does too, with div_rn)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    # 448 as a tensor, not a Python scalar: on CUDA, ATen divides by a CPU scalar as a multiply by
    # its float32 reciprocal (div_true_kernel_cuda), which is not the correctly rounded quotient
    # the CPU and the Triton write compute; the scales would then depend on the device.
    scale = torch.where(amax > 0, amax / torch.full_like(amax, FP8_MAX), torch.ones_like(amax))
    # The clamp only guards a quotient that rounds a hair past 448 (e4m3fn has no infinity).
    return (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize_rows(x8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 (..., D) * float32 scale (...,) -> (..., D) in ``dtype`` (the product in float32)."""
    return (x8.float() * scale[..., None]).to(dtype)


def write_slots(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor,
                k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None) -> None:
    """caches (N, bs, Hkv, D) <- k/v (T, Hkv, D) at the flat token slots (T,), cast to the cache
    dtype, or quantised (:func:`quantize_rows`) into an FP8 cache with its scales (N, bs, Hkv).
    Also the reference of the fused RoPE + write kernel (triton_rope_kv)."""
    hkv, d = k_cache.shape[-2], k_cache.shape[-1]
    k, v = k.reshape(-1, hkv, d), v.reshape(-1, hkv, d)
    if k_cache.dtype != FP8_DTYPE:
        k_cache.view(-1, hkv, d).index_copy_(0, slots, k.to(k_cache.dtype))
        v_cache.view(-1, hkv, d).index_copy_(0, slots, v.to(v_cache.dtype))
        return
    if k_scale is None or v_scale is None:
        raise ValueError("write_slots: an FP8 KV cache needs its k_scale and v_scale tensors "
                         "(PagedKVCache.layer(i) gives all four).")
    for cache, scales, x in ((k_cache, k_scale, k), (v_cache, v_scale, v)):
        x8, s = quantize_rows(x)  # (T, Hkv, D), (T, Hkv)
        _as_bytes(cache).view(-1, hkv, d).index_copy_(0, slots, _as_bytes(x8))
        scales.view(-1, hkv).index_copy_(0, slots, s)


# The write as one opaque op for dynamo. It was a graph break (torch.compiler.disable, after a
# traced index_copy_ had been functionalised into a copy of the whole cache), which cut the
# compiled decode forward into a fragment per layer. A custom op with ``mutates_args`` stays in
# the graph and inductor re-inplaces it: tests/unit/test_rollout_rope_kv_triton.py checks that
# the compiled code hands the op the cache tensors themselves, not copies.
# The FP8 cache's scales are mutated too: a second op with them as required arguments (torch
# 2.11 drops trailing None arguments before bumping the versions of mutated ones: an optional
# mutated argument raised IndexError in every bf16 write on the H200).
@torch.library.custom_op("r1mega::kv_cache_write", mutates_args=("k_cache", "v_cache"))
def _kv_cache_write_op(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor) -> None:
    write_slots(k_cache, v_cache, slots, k, v)


@_kv_cache_write_op.register_fake
def _(k_cache, v_cache, slots, k, v) -> None:
    return None


@torch.library.custom_op("r1mega::kv_cache_write_fp8",
                         mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def _kv_cache_write_fp8_op(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                           k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor,
                           v_scale: torch.Tensor) -> None:
    write_slots(k_cache, v_cache, slots, k, v, k_scale, v_scale)


@_kv_cache_write_fp8_op.register_fake
def _(k_cache, v_cache, slots, k, v, k_scale, v_scale) -> None:
    return None


def cache_write(k_cache, v_cache, slots, k, v, k_scale=None, v_scale=None) -> None:
    """The write op for this cache: bf16 (no scales) or FP8 (with its scales)."""
    if k_scale is None:
        torch.ops.r1mega.kv_cache_write(k_cache, v_cache, slots, k, v)
    else:
        torch.ops.r1mega.kv_cache_write_fp8(k_cache, v_cache, slots, k, v, k_scale, v_scale)


def slots_for(block_table: list[int], start: int, stop: int, block_tokens: int) -> list[int]:
    """Cache slots of token positions ``start..stop-1`` of one sequence."""
    return [block_table[p // block_tokens] * block_tokens + p % block_tokens for p in range(start, stop)]
