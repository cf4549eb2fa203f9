"""Reward warm-ups (registry.warm_up): run before a worker takes work, only for the rewards its
scorer's specs name, bounded in time, never fatal; math_accuracy's corpus all parses."""
import os

from r1mega.config import RewardsConfig
from r1mega.rewards.registry import RewardResult, register_reward, warm_up
from r1mega.rewards.scorer import RewardScorer

THIS = __name__  # the workers import this module to get the test rewards below
_WARMED: list = []  # per process: which warm-ups ran here


def _warm_marker():
    _WARMED.append(os.getpid())


def _warm_broken():
    raise RuntimeError("broken warm-up")


@register_reward("test_warmed", warmup=_warm_marker)
def _warmed(completion, reference, **ctx):
    # 1.0 when this process ran the warm-up before this call: the worker warmed up front.
    return RewardResult(1.0 if os.getpid() in _WARMED else 0.0)


@register_reward("test_broken_warmup", warmup=_warm_broken)
def _broken(completion, reference, **ctx):
    return RewardResult(0.5)


def test_warm_up_runs_registered_ones_and_survives_failures(capsys):
    _WARMED.clear()
    done = warm_up(["test_warmed", "test_broken_warmup", "format", "no_such_reward", "test_warmed"])
    assert done == ["test_warmed"] and _WARMED == [os.getpid()]  # once, despite the repeat
    assert "reward 'test_broken_warmup' warm-up failed: RuntimeError: broken warm-up" in capsys.readouterr().err


def test_warm_up_stops_at_its_budget():
    _WARMED.clear()
    assert warm_up(["test_warmed"], budget_s=-1.0) == [] and _WARMED == []


def test_workers_warm_up_before_their_first_call():
    cfg = RewardsConfig(spec={"w": {"test_warmed": 1.0}, "b": {"test_broken_warmup": 1.0}},
                        num_workers=2, timeout_s=30.0, modules=[THIS])
    with RewardScorer(cfg) as scorer:
        out = scorer.score([{"kind": "w", "completion": "x", "reference": {}} for _ in range(4)]
                           + [{"kind": "b", "completion": "x", "reference": {}}])
    assert [r.total for r in out] == [1.0, 1.0, 1.0, 1.0, 0.5]
    assert all(r.error is None for r in out)


def test_the_math_warm_up_corpus_parses():
    # Each answer must reach the parser's later stages, or it warms nothing.
    from r1mega.rewards.math import WARMUP_ANSWERS, math_equal

    unparsed = [a for a in WARMUP_ANSWERS if "no parsable answer" in math_equal(a, "2")[1][0]]
    assert unparsed == []
