import math

import pytest
import torch

from r1mega.rl.advantages import broadcast_to_tokens, group_advantages, seq_ids_from_cu_seqlens


def test_hand_computed_group():
    # group of 4: rewards 1,0,0,1 -> mean 0.5, unbiased std = sqrt(((.5^2)*4)/3) = sqrt(1/3)
    adv, equal = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), 4, eps=0.0)
    s = math.sqrt(1 / 3)
    assert torch.allclose(adv[:4], torch.tensor([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s]))
    assert equal.tolist() == [False, True]
    assert (adv[4:] == 0).all()  # all-equal group: zero advantage, not NaN


def test_without_std_scaling_is_centred_rewards():
    r = torch.tensor([3.0, 1.0, 2.0, 0.0, 0.0, 6.0])
    adv, equal = group_advantages(r, 3, scale_by_std=False)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, 0.0, -2.0, -2.0, 4.0]))
    assert not equal.any()


def test_matches_per_group_loop():
    torch.manual_seed(0)
    r = torch.randint(0, 3, (5 * 8,)).double()
    adv, equal = group_advantages(r, 8, eps=1e-6)
    for gi in range(5):
        grp = r[gi * 8:(gi + 1) * 8].tolist()
        mean = sum(grp) / 8
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / 7)
        want = [0.0 if std == 0 else (x - mean) / (std + 1e-6) for x in grp]
        assert adv[gi * 8:(gi + 1) * 8].tolist() == pytest.approx(want, abs=1e-9)
        assert bool(equal[gi]) == (len(set(grp)) == 1)


@pytest.mark.parametrize("rewards,group,match", [
    (torch.zeros(7), 4, "multiple of group_size"),
    (torch.zeros(4), 1, ">= 2"),
    (torch.tensor([0.0, float("nan")]), 2, "non-finite"),
    (torch.zeros(2, 2), 2, "1-D"),
])
def test_bad_input_is_named(rewards, group, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, group)


def test_broadcast_to_tokens():
    vals = torch.tensor([1.5, -2.0, 0.25])
    cu = torch.tensor([0, 2, 2, 5])  # the middle sequence is empty
    assert seq_ids_from_cu_seqlens(cu).tolist() == [0, 0, 2, 2, 2]
    assert broadcast_to_tokens(vals, cu_seqlens=cu).tolist() == [1.5, 1.5, 0.25, 0.25, 0.25]
    assert broadcast_to_tokens(vals, seq_ids=torch.tensor([2, 0, 1])).tolist() == [0.25, 1.5, -2.0]
    with pytest.raises(ValueError, match="exactly one"):
        broadcast_to_tokens(vals)
    with pytest.raises(ValueError, match="one more"):
        broadcast_to_tokens(vals, cu_seqlens=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        broadcast_to_tokens(vals, seq_ids=torch.tensor([3]))
