"""The fused Triton sampler (r1mega.rollout.triton_sampling) against the PyTorch reference on CPU,
under Triton's interpreter, unsharded and vocab-parallel over 2 gloo ranks; and the Gumbel draw at
the top of the hash range (no Triton needed).

The interpreter is switched on by TRITON_INTERPRET=1 before triton is imported, so the kernels run
in spawned processes (tests.distributed.harness). There libdevice cannot run and ``tl.log`` stands
in for it (see triton_sampling); the ops are otherwise the GPU kernel's.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.distributed.harness import run_ranks

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

# (rows, local vocab per rank x ranks, true vocab, logit scale, want T=1 log-probs, BLOCK or None)
CASES = [
    (7, 1000, 1000, 3.0, True, 128),  # vocab not a multiple of the block, several chunks
    (5, 320, 300, 10.0, False, 32),  # padding columns; spread logits: tiles skip the noise
    (3, 1000, 950, 1.0, True, None),  # the launcher's own layout
    (64, 256, 250, 2.0, True, 64),
    (9, 512, 250, 4.0, True, 64),  # with 2 ranks, rank 1 holds only padding
]


def _interpreted(rank, world, cases):
    import dataclasses
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch.distributed as dist

    from r1mega.rollout import sampling as S
    from r1mega.rollout import triton_sampling as T

    assert T.HAVE_TRITON and T.interpreting()
    group = None
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        group = dist.group.WORLD
    out = []
    for B, V, true_vocab, scale, want_t1, block in cases:
        g = torch.Generator().manual_seed(B * 1000 + V)
        logits = torch.randn(B, V, generator=g) * scale
        if B > 3:  # exact ties on a greedy row, in different tiles (or ranks): lowest id wins
            logits[1, [true_vocab - 3, 5]] = 40.0
            logits[1, true_vocab:] = 60.0  # padding: never sampled
        temps = torch.tensor([1.0, 0.0, 0.7, 1.3, -1.0, 1.0, 2.0, 0.5])[torch.arange(B) % 8]
        keys = S.step_keys(torch.arange(B, dtype=torch.int64) * 7919 + V, torch.full((B,), 3))
        sb = S.SamplingBatch(temperature=temps, top_k=torch.zeros(B, dtype=torch.int64),
                           top_p=torch.ones(B), keys=keys, any_greedy=bool((temps <= 0).any()),
                           want_logprobs_t1=want_t1)
        ref = S.sample(logits, sb, S.VocabShard(0, V, true_vocab), S.hashed_vocab_ids(0, V, "cpu"))
        size = V // world
        start = rank * size
        shard = S.VocabShard(start, size, true_vocab, group)
        # the keys as the CUDA-graph step passes them: a column of its packed int64 rows
        packed = torch.full((B, 6), -1, dtype=torch.int64)
        packed[:, 3] = keys
        sbf = dataclasses.replace(sb, keys=packed[:, 3])
        got = S._sample_fused(logits[:, start:start + size], sbf, shard,
                              S.hashed_vocab_ids(start, size, "cpu"), block=block)
        out.append((ref, got))
    if world > 1:
        dist.destroy_process_group()
    return out


def _check(results):
    for (ref, got), case in zip(results, CASES):
        assert got[0].tolist() == ref[0].tolist(), case
        torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=0, msg=str(case))
        assert (got[2] is None) == (ref[2] is None), case
        if ref[2] is not None:
            torch.testing.assert_close(got[2], ref[2], atol=1e-5, rtol=0, msg=str(case))


@needs_triton
@pytest.mark.parametrize("world", [1, 2])
def test_fused_sampler_matches_reference_under_interpreter(monkeypatch, world):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned ranks
    for rank_results in run_ranks(_interpreted, world, args=(CASES,), timeout_s=300):
        _check(rank_results)


def _hash32_inverse(y: int) -> int:
    """x with hash32(x) == y (each step of the mixer is a bijection on 32-bit words)."""
    m = 0xFFFFFFFF
    y ^= y >> 16
    y = (y * pow(0x5BD1E995, -1, 1 << 32)) & m
    y ^= (y >> 15) ^ (y >> 30)
    y = (y * pow(0x7FEB352D, -1, 1 << 32)) & m
    return y ^ (y >> 16)


def test_gumbel_noise_finite_at_the_top_of_the_hash_range():
    """h >> 8 = 2^24 - 1 once rounded u up to 1: g = +inf (NaN on a -inf padding column)."""
    from r1mega.rollout.sampling import (
        SamplingBatch, VocabShard, gumbel_noise, hash32, hashed_vocab_ids, sample)

    x = _hash32_inverse(0xFFFFFFFF)
    assert hash32(torch.tensor([x])).item() == 0xFFFFFFFF
    vh = hashed_vocab_ids(0, 8, "cpu")
    keys = torch.tensor([x ^ int(vh[7]), x ^ int(vh[2])])  # the top draw on column 7, then 2
    g = gumbel_noise(keys, vh)
    assert torch.isfinite(g).all() and g.max() < 16.7
    sb = SamplingBatch(temperature=torch.ones(2), top_k=torch.zeros(2, dtype=torch.int64),
                       top_p=torch.ones(2), keys=keys)
    tok, lp, _ = sample(torch.zeros(2, 8), sb, VocabShard(0, 8, 6), vh)  # column 7 is padding
    assert tok.tolist()[1] == 2 and tok.tolist()[0] < 6 and torch.isfinite(lp).all()
