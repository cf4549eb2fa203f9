"""Scoring while the rollout runs (RewardScorer.stream): the same results, in the same order, as
scoring everything at the end with ``score``, bad items and failing rewards included."""
import os
import time

import pytest

from r1mega.config import RewardsConfig
from r1mega.rewards.registry import RewardResult, register_reward
from r1mega.rewards.scorer import RewardScorer, worker_pids

THIS = __name__  # the workers import this module to get the rewards below


@register_reward("stream_length")
def _length(completion, reference, **ctx):
    return RewardResult(float(len(completion)), [f"num_tokens={ctx.get('num_tokens')}"])


@register_reward("stream_raisy")
def _raisy(completion, reference, **ctx):
    raise ValueError(f"cannot parse {completion!r}")


@register_reward("stream_crashy")
def _crashy(completion, reference, **ctx):
    os._exit(3)


@register_reward("stream_marker")
def _marker(completion, reference, **ctx):
    with open(reference["path"], "w") as f:  # proof that scoring ran before results()
        f.write(completion)
    return RewardResult(1.0)


SPEC = {"plain": {"stream_length": 1.0, "format": 0.5},
        "buggy": {"stream_raisy": 1.0, "stream_length": 2.0},
        "crash": {"stream_crashy": 1.0, "stream_length": 1.0},
        "mark": {"stream_marker": 1.0}}


def _item(kind, completion, n=3, **ref):
    return {"kind": kind, "completion": completion, "reference": ref, "num_tokens": n}


def _items():
    return [_item("plain", "<think>a</think><answer>1</answer>", 9),
            None,  # not a dict: a bad model output never reaches a worker
            _item("buggy", "oops", 2),
            {"kind": "plain", "completion": 7},  # completion is not a string
            _item("unknown_kind", "x"),
            {"kind": "plain", "completion": "x", "reference": "{not json"},
            _item("crash", "boom", 4),
            _item("plain", "short", 1),
            _item("buggy", "again", 5),
            _item("plain", "<answer>2</answer>", 6)]


def _fields(scored):
    return [(s.total, s.components, s.reasons, s.error) for s in scored]


@pytest.fixture(scope="module")
def scorer():
    s = RewardScorer(RewardsConfig(spec=SPEC, num_workers=2, timeout_s=30.0, modules=[THIS]))
    yield s
    s.close()


def test_streamed_equals_scored_at_the_end(scorer):
    items = _items()
    want = scorer.score(items)
    stream = scorer.stream()
    for lo, hi in ((0, 3), (3, 4), (4, 4), (4, 9), (9, 10)):  # as completions would finish
        stream.submit(items[lo:hi])
        time.sleep(0.05)  # decoding goes on meanwhile
    got = stream.results()
    assert _fields(got) == _fields(want)
    # the failures are reported, not lost: each item carries its own error
    assert got[1].error and got[3].error and "unknown_kind" in got[4].error
    assert "cannot parse 'oops'" in got[2].error and got[2].total == 8.0
    assert "died" in got[6].error and got[6].total == 4.0
    assert got[0].error is None and got[0].total == 34.5  # 34 characters + 0.5 * format
    # and the pool is whole and the scorer usable once the stream is done
    assert len(worker_pids(scorer)) == 2
    assert _fields(scorer.score(items[:1])) == _fields(want[:1])


def test_items_are_scored_before_results_is_called(scorer, tmp_path):
    stream = scorer.stream()
    stream.submit([_item("mark", "early", path=str(tmp_path / "early"))])
    deadline = time.monotonic() + 60
    while not (tmp_path / "early").exists():
        assert time.monotonic() < deadline, "the stream did not score while the caller worked"
        time.sleep(0.01)
    stream.submit([_item("mark", "late", path=str(tmp_path / "late"))])
    assert [s.total for s in stream.results()] == [1.0, 1.0]
    assert (tmp_path / "late").read_text() == "late"


def test_one_stream_at_a_time_and_cancel_frees_the_pool(scorer):
    stream = scorer.stream()
    stream.submit(_items()[:1])
    with pytest.raises(RuntimeError, match="results\\(\\)"):
        scorer.score(_items()[:1])
    stream.cancel()
    assert scorer.score(_items()[:1])[0].total == 34.5
    assert scorer.stream().results() == []


def test_inline_stream_equals_score():
    items = [i for i in _items() if not (isinstance(i, dict) and i.get("kind") == "crash")]
    s = RewardScorer(RewardsConfig(spec=SPEC, num_workers=0))
    want = s.score(items)
    stream = s.stream()
    stream.submit(items[:4])
    stream.submit(items[4:])
    assert _fields(stream.results()) == _fields(want)
