"""DP sharding and exact resume of the prompt cursor."""
import pytest

from r1mega.data import PromptSampler


def _run(sampler, steps, per_rank):
    return [sampler.next_indices(per_rank) for _ in range(steps)]


def test_ranks_partition_each_step_and_epochs_cover_everything():
    n, dp, per_rank = 10, 2, 3
    ranks = [PromptSampler(range(n), r, dp, seed=5) for r in range(dp)]
    steps = [[s.next_indices(per_rank) for s in ranks] for _ in range(5)]  # 30 = 3 epochs
    flat = [i for step in steps for part in step for i in part]
    for e in range(3):
        assert sorted(flat[e * n:(e + 1) * n]) == list(range(n))  # each epoch: all, once
    for a, b in steps:
        assert len(a) == len(b) == per_rank
    orders = [flat[e * n:(e + 1) * n] for e in range(3)]
    assert orders[0] != orders[1]  # reshuffled per epoch


def test_resume_is_exact_even_with_another_dp_size():
    ref = PromptSampler(range(23), 0, 1, seed=1)
    expected = _run(ref, 12, 4)
    first = PromptSampler(range(23), 0, 1, seed=1)
    got = _run(first, 5, 4)
    state = first.state_dict()
    again = PromptSampler(range(23), 0, 1, seed=1)
    again.load_state_dict(state)
    got += _run(again, 7, 4)
    assert got == expected
    # Resumed at DP=2 with 2 per rank: the two ranks together continue the same global order.
    r0, r1 = (PromptSampler(range(23), r, 2, seed=1) for r in range(2))
    r0.load_state_dict(state)
    r1.load_state_dict(state)
    merged = [a + b for a, b in zip(_run(r0, 7, 2), _run(r1, 7, 2))]
    assert merged == expected[5:]


def test_state_from_another_dataset_is_refused():
    s = PromptSampler(range(10), 0, 1, seed=0)
    with pytest.raises(ValueError, match="num_examples"):
        PromptSampler(range(11), 0, 1, seed=0).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="dp_rank"):
        PromptSampler(range(10), 2, 2)
    with pytest.raises(ValueError, match="empty"):
        PromptSampler([], 0, 1)


def test_next_batch_returns_records():
    s = PromptSampler(["a", "b", "c"], 0, 1, seed=0, shuffle=False)
    assert s.next_batch(2) == ["a", "b"] and s.next_batch(2) == ["c", "a"]
