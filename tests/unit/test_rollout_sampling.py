"""Sampler against reference implementations: the sorted top-k/top-p filter of the usual
(HF-style) kind, empirical frequencies over many counter-based draws, and the log-probs."""
from __future__ import annotations

import torch

from r1mega.rollout.sampling import (
    SamplingBatch,
    VocabShard,
    hash32,
    hashed_vocab_ids,
    sample,
    sequence_key,
    step_keys,
)


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """(V,) the distribution to sample from: temperature, then top-k, then top-p (sort-based)."""
    z = logits.double() / temperature
    if top_k > 0:
        kth = z.sort(descending=True).values[top_k - 1]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        p_sorted, idx = torch.softmax(z, -1).sort(descending=True)
        before = p_sorted.cumsum(0) - p_sorted
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, idx, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return torch.softmax(z, -1)


def draw(logits, n, temperature, top_k, top_p, step=0):
    V = logits.shape[0]
    keys = step_keys(torch.tensor([sequence_key(99, j) for j in range(n)]), torch.full((n,), step))
    sb = SamplingBatch(
        temperature=torch.full((n,), temperature), top_k=torch.full((n,), top_k, dtype=torch.int64),
        top_p=torch.full((n,), top_p), keys=keys, top_k_max=top_k, use_top_p=top_p < 1.0,
        want_logprobs_t1=True,
    )
    return sample(logits.expand(n, V), sb, VocabShard(0, V, V), hashed_vocab_ids(0, V, "cpu"))


def test_hash_is_uniform_enough():
    h = hash32(torch.arange(200_000, dtype=torch.int64))
    assert int(h.min()) >= 0 and int(h.max()) < 2**32
    u = h.double() / 2**32
    counts = torch.histc(u.float(), bins=20, min=0, max=1)
    assert (counts / counts.mean() - 1).abs().max() < 0.05
    assert len(set(h.tolist())) > 199_000


def test_distribution_and_logprobs_match_reference():
    torch.manual_seed(0)
    V, n = 40, 30_000
    logits = torch.randn(V) * 2
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 8, 1.0), (1.3, 0, 0.8),
                                      (0.9, 12, 0.7)]:
        ref = reference_probs(logits, temperature, top_k, top_p)
        tokens, lps, lp1 = draw(logits, n, temperature, top_k, top_p)
        freq = torch.bincount(tokens, minlength=V).double() / n
        assert freq[ref == 0].sum() == 0, "sampled a token outside the top-k/top-p support"
        tv = 0.5 * (freq - ref).abs().sum().item()
        assert tv < 0.02, (temperature, top_k, top_p, tv)
        torch.testing.assert_close(lps.double(), ref[tokens].log(), atol=1e-5, rtol=0)
        t1 = torch.log_softmax(logits.double(), -1)[tokens]
        torch.testing.assert_close(lp1.double(), t1, atol=1e-5, rtol=0)


def test_greedy_row_is_argmax_with_t1_logprob():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    sb = SamplingBatch(temperature=torch.tensor([0.0, 0.0, 1.0]), top_k=torch.zeros(3, dtype=torch.int64),
                       top_p=torch.ones(3), keys=torch.tensor([1, 2, 3]), any_greedy=True)
    tok, lp, _ = sample(logits, sb, VocabShard(0, 50, 50), hashed_vocab_ids(0, 50, "cpu"))
    assert tok[:2].tolist() == logits[:2].argmax(-1).tolist()
    torch.testing.assert_close(lp[:2], torch.log_softmax(logits[:2], -1).gather(1, tok[:2, None])[:, 0])


def test_padded_vocab_never_sampled():
    logits = torch.zeros(2000, 64)
    logits[:, 60:] = 50.0  # padding rows that would win every draw
    keys = torch.arange(2000)
    sb = SamplingBatch(temperature=torch.ones(2000), top_k=torch.zeros(2000, dtype=torch.int64),
                       top_p=torch.ones(2000), keys=keys)
    tok, lp, _ = sample(logits, sb, VocabShard(0, 64, 60), hashed_vocab_ids(0, 64, "cpu"))
    assert int(tok.max()) < 60
    torch.testing.assert_close(lp, torch.full_like(lp, -torch.log(torch.tensor(60.0)).item()))


def test_vocab_sharded_draws_equal_unsharded():
    """The noise of a column depends on its global id only: slicing the vocabulary in two and
    taking the better half's winner reproduces the unsharded draw (what the TP all-reduce does)."""
    torch.manual_seed(2)
    B, V = 500, 96
    logits = torch.randn(B, V)
    keys = torch.arange(B) * 7919
    sb = SamplingBatch(temperature=torch.ones(B), top_k=torch.zeros(B, dtype=torch.int64),
                       top_p=torch.ones(B), keys=keys)
    full, _, _ = sample(logits, sb, VocabShard(0, V, V), hashed_vocab_ids(0, V, "cpu"))
    from r1mega.rollout.sampling import gumbel_noise
    halves = []
    for start in (0, V // 2):
        z = logits[:, start:start + V // 2] + gumbel_noise(keys, hashed_vocab_ids(start, V // 2, "cpu"))
        halves.append(z.max(-1))
    pick = torch.where(halves[0].values >= halves[1].values, halves[0].indices, halves[1].indices + V // 2)
    assert pick.tolist() == full.tolist()


def test_host_and_device_hash_agree():
    from r1mega.rollout.sampling import _hash32_int
    xs = [0, 1, 12345, 2**32 - 1, 2**31 + 7]
    assert hash32(torch.tensor(xs)).tolist() == [_hash32_int(x) for x in xs]


def test_step_keys_on_numpy_arrays_equal_the_tensor_ones():
    """The CUDA-graph step's keys are made on the host (numpy) from the same function."""
    import numpy as np

    from r1mega.rollout.sampling import _hash32_int, step_keys

    g = torch.Generator().manual_seed(3)
    keys = torch.cat([torch.randint(0, 2**32, (200,), generator=g), torch.tensor([0, 2**32 - 1])])
    steps = torch.cat([torch.randint(0, 70000, (200,), generator=g), torch.tensor([0, 2**20])])
    want = step_keys(keys, steps)
    got = step_keys(keys.numpy(), steps.numpy())
    assert got.dtype == np.int64 and got.tolist() == want.tolist()
    # and both against the scalar host hash
    k, s = int(keys[5]), int(steps[5])
    assert got[5] == _hash32_int(k ^ _hash32_int((s * 0x61C88647 + 0x7F4A7C15) & 0xFFFFFFFF))
