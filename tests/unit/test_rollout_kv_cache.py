"""Block allocator, slot mapping, and attention over the paged cache against naive attention."""
from __future__ import annotations

import math

import pytest
import torch

from r1mega.rollout.attention import AttentionBatch, attend_fresh, attend_gather, padded_query_index
from r1mega.rollout.kv_cache import BlockAllocator, KVCacheShape, OutOfBlocks, PagedKVCache, slots_for


def test_allocator_refcounts_and_scratch_block():
    a = BlockAllocator(4)
    got = [a.allocate() for _ in range(3)]
    assert sorted(got) == [1, 2, 3]  # block 0 is the scratch block, never handed out
    with pytest.raises(OutOfBlocks):
        a.allocate()
    a.share(got[0])
    a.free(got[0])
    assert a.num_free == 0  # still owned once
    a.free(got[0])
    assert a.num_free == 1
    with pytest.raises(RuntimeError, match="freed more often"):
        a.free(got[0])


def naive(q, k, v, q_pos, scale):
    """q (n, Hq, D) at absolute positions q_pos attending k/v (L, Hkv, D) causally."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    mask = torch.arange(k.shape[0])[None, :] <= torch.tensor(q_pos)[:, None]
    s = s.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


@pytest.mark.parametrize("prefix", [False, True])
def test_paged_attention_matches_naive(prefix):
    torch.manual_seed(0)
    bs, hq, hkv, d = 4, 6, 2, 8
    cache = PagedKVCache(KVCacheShape(1, hkv, d, bs, torch.float64), torch.device("cpu"))
    cache.allocate(40)
    # Sequences: (cached prefix length, new tokens); blocks deliberately out of order.
    layout = [(0, 5), (0, 1), (0, 9)] if not prefix else [(6, 3), (3, 1), (0, 4), (8, 1)]
    tables, qs, ks, vs, slots, full_k, full_v = [], [], [], [], [], [], []
    for cached, new in layout:
        n = cached + new
        blocks = [cache.allocator.allocate() for _ in range(-(-n // bs))][::-1]
        tables.append(blocks)
        kk, vv = torch.randn(n, hkv, d, dtype=torch.float64), torch.randn(n, hkv, d, dtype=torch.float64)
        if cached:
            cache.write(0, torch.tensor(slots_for(blocks, 0, cached, bs)), kk[:cached], vv[:cached])
        qs.append(torch.randn(new, hq, d, dtype=torch.float64))
        ks.append(kk[cached:]), vs.append(vv[cached:])
        slots += slots_for(blocks, cached, n, bs)
        full_k.append(kk), full_v.append(vv)
    q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    cache.write(0, torch.tensor(slots), k, v)
    q_lens = [new for _, new in layout]
    ctx = [c + n for c, n in layout]
    width = max(map(len, tables))
    batch = AttentionBatch(
        slots=torch.tensor(slots), positions=torch.zeros(len(slots), dtype=torch.int64), q_lens=q_lens,
        ctx_lens=torch.tensor(ctx, dtype=torch.int32), ctx_lens_host=ctx,
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        block_tokens=bs, q_index=padded_query_index(q_lens, "cpu"),
    )
    scale = 1 / math.sqrt(d)
    ref = torch.cat([naive(qq, kk, vv, list(range(c, c + n)), scale)
                     for qq, kk, vv, (c, n) in zip(qs, full_k, full_v, layout)])
    torch.testing.assert_close(attend_gather(q, cache.k[0], cache.v[0], batch, scale), ref)
    if not prefix:
        torch.testing.assert_close(attend_fresh(q, k, v, batch, scale), ref)


def test_release_frees_tensors():
    cache = PagedKVCache(KVCacheShape(2, 1, 4, 4, torch.float32), torch.device("cpu"))
    cache.allocate(8)
    assert cache.is_allocated and len(cache.k) == 2 and cache.k[0].shape == (8, 4, 1, 4)
    cache.release()
    assert not cache.is_allocated and cache.k == []


def test_copy_blocks_equals_block_by_block_copies():
    """The batched copy-on-write against one plain copy per block, layer and K/V (the reference):
    destinations get their source's contents in every layer; nothing else changes."""
    shape = KVCacheShape(3, 2, 4, 4, torch.float32)
    cache = PagedKVCache(shape, torch.device("cpu"))
    cache.allocate(12)
    g = torch.Generator().manual_seed(0)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=g))
    pairs = [(1, 5), (1, 6), (2, 7), (3, 11)]  # one source shared by two samples, as in a group
    want = [t.clone() for t in cache.k + cache.v]
    for t in want:
        for src, dst in pairs:
            t[dst] = t[src].clone()
    cache.copy_blocks(pairs)
    for got, ref in zip(cache.k + cache.v, want):
        assert torch.equal(got, ref)
    cache.copy_blocks([])  # no copies: no error, no change
    for got, ref in zip(cache.k + cache.v, want):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("bs", [1, 4, 16])
def test_prefill_positions_and_slots_equal_the_per_token_loop(bs):
    """The prefill's positions and cache slots built by tensor ops against the per-token loop they
    replaced: ragged prompts (one of a single token, one ending on a block edge), shuffled
    blocks, block tables padded with the scratch block."""
    from r1mega.rollout.attention import prefill_positions_slots

    g = torch.Generator().manual_seed(bs)
    q_lens = [5, 1, 2 * bs, 3 * bs + 1, 7]
    perm = (torch.randperm(200, generator=g) + 1).tolist()
    blocks, i = [], 0
    for n in q_lens:
        k = -(-n // bs) + (1 if n % 2 else 0)  # some rows hold a block beyond the prompt
        blocks.append(perm[i:i + k])
        i += k
    width = max(map(len, blocks))
    bt = torch.tensor([b + [0] * (width - len(b)) for b in blocks], dtype=torch.int32)
    positions, slots = prefill_positions_slots(q_lens, bt, bs)
    ref_pos = [p for n in q_lens for p in range(n)]
    ref_slots = [blk[p // bs] * bs + p % bs for blk, n in zip(blocks, q_lens) for p in range(n)]
    assert positions.dtype == slots.dtype == torch.int64
    assert positions.tolist() == ref_pos and slots.tolist() == ref_slots
