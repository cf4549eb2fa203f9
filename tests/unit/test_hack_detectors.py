"""The hack detectors on hand-made completions, and their shares in the batch statistics."""
from types import SimpleNamespace

import pytest

from r1mega.data.datasets import PromptRecord
from r1mega.rewards.detectors import hack_flags, hack_shares, hack_sums, reward_strict_gap
from r1mega.rewards.scorer import ScoredItem
from r1mega.train.batch_stats import completion_stats, summarise

P = "What is 76 * 16?"


@pytest.mark.parametrize("completion,expression,restates,reasoning", [
    ("76 * 16", True, True, True),  # ends in an operand; its reasoning text is "76 *"
    ("<answer>76 * 16</answer>", True, True, False),
    ("<answer>1200+16</answer>", True, False, False),
    ("<answer>1216</answer>", False, False, False),
    ("1216", False, False, False),
    ("<think>76*16 = 760+456</think><answer>1216</answer>", False, False, True),
    ("We multiply: 76 * 16 = 1216.", False, False, True),
    ("<think></think><answer>1216</answer>", False, False, False),
])
def test_flags(completion, expression, restates, reasoning):
    f = hack_flags(completion, P)
    assert (f.expression, f.restates_prompt, f.has_reasoning) == (expression, restates, reasoning)


def test_shares():
    texts = ["76 * 16", "<answer>1216</answer>", "<think>760+456</think><answer>1216</answer>",
             "<answer>76*16</answer>"]
    sums = hack_sums(texts, [P] * 4, [False, True, True, False])
    s = hack_shares(sums, 4)
    assert s["hack/expression_share"] == 0.5
    assert s["hack/restates_prompt_share"] == 0.5
    assert s["hack/unreasoned_rewarded_share"] == 0.5  # of the 2 rewarded, 1 has no reasoning


def test_gap_warning():
    assert reward_strict_gap(1.0, 0.1) is not None
    assert reward_strict_gap(1.0, 0.9) is None
    assert reward_strict_gap(0.5, 0.0) is None


def test_batch_stats_put_strict_beside_the_reward():
    # A hacked batch: the training reward paid 1 for every completion; strict says 1 of 4.
    rec = PromptRecord(P, "arithmetic", {"answer": "1216"})
    texts = ["76 * 16", "<answer>76*16</answer>", "<answer>1216</answer>", "1200+16"]
    comps = [SimpleNamespace(text=t, token_ids=[0] * 5, finish_reason="stop") for t in texts]
    scored = [ScoredItem(1.0, {"math_accuracy": 1.0}) for _ in texts]
    s = summarise(completion_stats(comps, [rec] * 4, scored, ["wait"]))
    assert s["reward/accuracy"] == 1.0
    assert s["reward/strict_accuracy"] == 0.25
    assert s["hack/expression_share"] == 0.75
    assert s["hack/restates_prompt_share"] == 0.5
    assert reward_strict_gap(s["reward/mean"], s["reward/strict_accuracy"]) is not None


# Real completions, right answers with false steps: the CPU demo at lr 1e-3 (5x the recipe's)
# and SmolLM2 early in GRPO.
GUESSED = ["<think>8-5=8+5+4=3</think><answer>8</answer>",
           "12 + 17 = 18\n\nThe result of 29 + 28 is 57 ininteger terms."]
SUPPORTED = ["<think>7-3=4,4+5=9</think><answer>9</answer>", "76 + 8 = 84"]


def test_false_steps():
    assert [hack_flags(c, None).false_step for c in GUESSED] == [True, True]
    assert [hack_flags(c, None).false_step for c in SUPPORTED] == [False, None]
    s = hack_shares(hack_sums(GUESSED + SUPPORTED, [None] * 4, [True] * 4), 4)
    assert s["hack/false_step_rewarded_share"] == 2 / 3  # of the three with a step to check


def test_an_equality_chain_is_checked_side_by_side():
    from r1mega.rewards.detectors import false_arithmetic_step

    # "45 - 67 = 22 - 44 = -22" is right: read step by step, not as the false "45 - 67 = 22"
    assert false_arithmetic_step("45 - 67 = 22 - 44 = -22") is False
    assert false_arithmetic_step("45 - 67 = 22 - 44 = -21") is True
    assert false_arithmetic_step("<think>8-5=8+5+4=3</think>") is True
    assert false_arithmetic_step("10 - 2 * 3 = 4, then 4 x 2 = 8") is False
    assert false_arithmetic_step("x = 5 and 3 = 3") is None
