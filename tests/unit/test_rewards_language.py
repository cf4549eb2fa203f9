"""Language consistency by writing system, and DAPO's soft overlong penalty."""
import pytest

from r1mega.rewards.language import language_consistency, target_share
from r1mega.rewards.length import soft_overlong_penalty


def test_language_share():
    assert target_share("Let us add the numbers first.", "en") == 1.0
    assert target_share("我们先把数字加起来", "zh") == 1.0
    mixed = "First 我们 add"  # 2 Latin words, 2 Han characters
    assert target_share(mixed, "en") == pytest.approx(0.5)
    assert target_share(mixed, "zh") == pytest.approx(0.5)
    assert target_share("\\frac{1}{2} + 3 = 4", "en") is None  # no words at all
    with pytest.raises(ValueError, match="target_language"):
        target_share("x", "klingon")


def test_language_reward_reads_the_reasoning():
    c = "<think>Сначала сложим. Then add.</think><answer>4</answer>"
    r = language_consistency(c, {}, target_language="en")
    assert r.score == pytest.approx(2 / 4)
    assert language_consistency(c, {"language": "ru"}).score == pytest.approx(2 / 4)


def test_soft_overlong_penalty():
    # L_max = 100, L_cache = 20: free up to 80, linear to -1 at 100, -1 beyond.
    assert soft_overlong_penalty(80, 100, 20) == 0.0
    assert soft_overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert soft_overlong_penalty(100, 100, 20) == pytest.approx(-1.0)
    assert soft_overlong_penalty(130, 100, 20) == -1.0
    assert soft_overlong_penalty(99, 100, 0) == 0.0


def test_completion_stats():
    from r1mega.rewards.stats import completion_stats

    batch = ["<think>2+2 is 5. Wait, let me check: 4.</think><answer>4</answer>",
             "<think>easy</think><answer>4</answer>",
             "the answer is 4, no await needed"]  # 'await' is not 'wait'
    s = completion_stats(batch, ["wait", "let me check"])
    assert s["reflection_share"] == pytest.approx(1 / 3)
    assert s["format_share"] == pytest.approx(2 / 3)
    assert s["mean_chars"] == pytest.approx(sum(map(len, batch)) / 3)
    assert completion_stats([], ["wait"])["reflection_share"] == 0.0
    assert completion_stats(batch, [])["reflection_share"] == 0.0
