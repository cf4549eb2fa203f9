"""The exact attention's per-forward tables are built once and read by every layer (building them
copies lengths to the device, which waits for the stream): packed training tables and tile tables
are kept for the last key and rebuilt, with the right values, when the key changes; a rollout
prefill step's tables are kept for that step's batch only."""
from __future__ import annotations

import torch

from r1mega.ops import triton_exact_attention as tea
from r1mega.rollout import exact as rexact
from r1mega.rollout.attention import AttentionBatch


def test_packed_tables_kept_for_the_same_lengths_only():
    a = tea.packed_tables([3, 5, 1], 8, "cpu")
    assert tea.packed_tables((3, 5, 1), 8, torch.device("cpu")) is a
    b = tea.packed_tables([3, 5, 2], 8, "cpu")
    assert b is not a
    slots, q_seq, q_pos = b
    assert q_seq.tolist() == [0] * 3 + [1] * 5 + [2] * 2
    assert q_pos.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1]
    assert slots[1].tolist() == [3, 4, 5, 6, 7, 8, 9, 9]  # clamped to the last row
    assert tea.packed_tables([3, 5, 2], 9, "cpu") is not b  # another width


def test_tile_table_kept_per_tensor_version_and_bq():
    q_seq = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    t4 = tea._tile_table(q_seq, 4)
    assert tea._tile_table(q_seq, 4) is t4
    assert torch.equal(t4, tea.tile_sizes(q_seq, 4))
    t2 = tea._tile_table(q_seq, 2)
    assert torch.equal(t2, tea.tile_sizes(q_seq, 2)) and t2 is not t4
    q_seq[3:5] = 7  # in place: the version moves, the table is rebuilt from the new values
    t4b = tea._tile_table(q_seq, 2)
    assert t4b is not t2 and torch.equal(t4b, tea.tile_sizes(q_seq, 2))
    same_values = q_seq.clone()  # another tensor, even with equal values, is not trusted
    assert tea._tile_table(same_values, 2) is not t4b


def _batch(q_lens, ctx):
    bt = torch.arange(len(q_lens) * 4, dtype=torch.int32).view(len(q_lens), 4)
    return AttentionBatch(slots=torch.zeros(sum(q_lens), dtype=torch.long),
                          positions=torch.zeros(sum(q_lens), dtype=torch.long), q_lens=list(q_lens),
                          ctx_lens=torch.tensor(ctx, dtype=torch.int32), ctx_lens_host=list(ctx),
                          block_tables=bt, block_tokens=4)


def test_prefill_tables_kept_for_one_steps_batch():
    q = torch.zeros(6, 4, 16)
    b1 = _batch([2, 4], [2, 5])
    slots, q_seq, train = rexact._prefill_step_tables(b1, q, 2)
    assert q_seq.tolist() == [0, 0, 1, 1, 1, 1] and not train  # CPU: no Triton kernel
    assert slots.shape == (2, 5) and slots[1].tolist() == [16, 17, 18, 19, 20]
    assert rexact._prefill_step_tables(b1, q, 2)[0] is slots  # the step's other layers
    b2 = _batch([2, 4], [2, 5])  # the next step: a new batch, new tables
    again = rexact._prefill_step_tables(b2, q, 2)
    assert again[0] is not slots and torch.equal(again[0], slots) and torch.equal(again[1], q_seq)


def test_last_key_matches_objects_by_identity_and_values_by_value():
    from r1mega.ops.last_key import LastKey

    memo, made = LastKey(), []

    def make(tag):
        return lambda: (made.append(tag), tag)[1]

    t = torch.zeros(3)
    assert memo.get((t, 0, (1, 2), torch.Size([2, 3]), "cpu"), make("a")) == "a"
    assert memo.get((t, 0, (1, 2), torch.Size([2, 3]), "cpu"), make("b")) == "a"  # same key
    assert memo.get((t.clone(), 0, (1, 2), torch.Size([2, 3]), "cpu"), make("c")) == "c"  # equal values, other tensor
    assert memo.get((t, 0, (1, 3), torch.Size([2, 3]), "cpu"), make("d")) == "d"
    assert memo.get((t, 1, (1, 3), torch.Size([2, 3]), "cpu"), make("e")) == "e"  # a version moved
    b1, b2 = _batch([2], [2]), _batch([2], [2])  # dataclasses holding tensors: identity only
    assert memo.get((b1,), make("f")) == "f" and memo.get((b1,), make("g")) == "f"
    assert memo.get((b2,), make("h")) == "h"
    assert made == ["a", "c", "d", "e", "f", "h"]
