"""Pieces of the training step that need no process group: packing, SFT samples, the loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from r1mega.train.batching import (check_samples, collate, make_micro_batches, pack_first_fit,
                                   unpack_per_sample)
from r1mega.train.step import sft_sample, vocab_parallel_target_logprobs


def test_sft_sample_shifts_labels_and_masks_prompt():
    s = sft_sample(torch.tensor([10, 11, 12, 13, 14]), prompt_tokens=2)
    assert s["labels"][:4].tolist() == [11, 12, 13, 14]
    # predicts tokens 2.. (the response) from positions 1..3; the last position has no target
    assert s["loss_mask"].tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("seed", range(5))
def test_pack_first_fit_respects_budget_and_keeps_every_sample(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 20, (30,), generator=g).tolist()
    bins = pack_first_fit(lengths, 24)
    assert sorted(i for b in bins for i in b) == list(range(30))
    assert all(sum(lengths[i] for i in b) <= 24 for b in bins)
    assert len(bins) <= 2 * -(-sum(lengths) // 24)  # first-fit never needs 2x the lower bound


def test_collate_unpack_round_trip_with_padding():
    samples = [sft_sample(torch.arange(n) + 100 * n) for n in (3, 5, 2)]
    mbs = make_micro_batches(samples, 8, pad_to_multiple=4)
    assert all(mb.num_tokens % 4 == 0 for mb in mbs)
    values = [mb.input_ids[0].float() for mb in mbs]
    back = unpack_per_sample(values, mbs, len(samples))
    for s, v in zip(samples, back):
        assert torch.equal(v.long(), s["input_ids"])
    for mb in mbs:  # padding is its own sequence, masked out
        if -1 in mb.sample_index:
            pad_len = mb.seq_lengths[mb.sample_index.index(-1)]
            assert mb.fields["loss_mask"][-pad_len:].sum() == 0


def test_fixed_size_micro_batches():
    samples = [sft_sample(torch.arange(n)) for n in (3, 5, 7)]
    mbs = make_micro_batches(samples, 10, fixed_size=True, count_multiple=2)
    assert len(mbs) % 2 == 0 and {mb.num_tokens for mb in mbs} == {10}


@pytest.mark.parametrize("samples,match", [
    ([{"labels": torch.zeros(3)}], "missing 'input_ids'"),
    ([{"input_ids": torch.zeros(0, dtype=torch.long)}], "empty 'input_ids'"),
    ([{"input_ids": torch.zeros(9, dtype=torch.long)}], "data.micro_batch_tokens=8"),
    ([{"input_ids": torch.zeros(3, dtype=torch.long), "loss_mask": torch.zeros(2)}],
     "field 'loss_mask' has shape"),
])
def test_bad_samples_are_named(samples, match):
    with pytest.raises(ValueError, match=match):
        check_samples(samples, 8)


def test_missing_field_in_one_sample_is_named():
    a = sft_sample(torch.arange(3))
    b = {"input_ids": torch.arange(4)}
    with pytest.raises(ValueError, match=r"sample 1: missing field"):
        collate([a, b], [0, 1], 1)


def test_target_logprobs_match_log_softmax_and_ignore_vocab_padding():
    torch.manual_seed(0)
    logits = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)  # 16 = 12 real + 4 pad
    targets = torch.randint(0, 12, (7,))
    ours = vocab_parallel_target_logprobs(logits, targets, vocab_size=12)
    ref = F.log_softmax(logits[:, :12], -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(ours, ref.float() if ours.dtype == torch.float32 else ref)
    ours.sum().backward()
    assert logits.grad[:, 12:].abs().max() == 0  # padding columns get no gradient
