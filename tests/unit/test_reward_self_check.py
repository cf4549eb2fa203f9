"""A reward that cannot run is an error, never a 0: the scorer's start-up self-check (the
sandbox against a known-good and a known-bad program, math-verify on a known pair), references
without the fields a reward needs, a sandbox that crashes, and every registered reward usable as
a kind of its own in ``r1mega reward``."""
from __future__ import annotations

import json
import sys

import pytest

from r1mega.config import RewardsConfig
from r1mega.rewards import sandbox
from r1mega.rewards import scorer as scorer_mod
from r1mega.rewards.cli import main as reward_cli
from r1mega.rewards.format import check_format
from r1mega.rewards.registry import RewardSetupError
from r1mega.rewards.scorer import RewardScorer

GOOD_CODE = "<answer>\n```python\ndef add(a, b):\n    return a + b\n```\n</answer>"
ADD_TESTS = {"tests": "assert add(2, 3) == 5\n"}


def _inline(**cfg) -> RewardScorer:
    return RewardScorer(RewardsConfig(num_workers=0, **cfg), max_new_tokens=64)


def _break_sandbox(monkeypatch):
    # The judge's script is gone: every sandbox run ends without a verdict, as it did when the
    # tmpfs over /tmp hid the interpreter. The real sandbox code runs; only its input is broken.
    monkeypatch.setattr(sandbox, "_HARNESS", "/nonexistent/r1mega/_sandbox_harness.py")


def test_self_check_passes_where_the_rewards_work():
    with _inline() as s:
        s.self_check({"math", "code", "countdown"})
        assert {"math_accuracy", "code_tests", "format", "countdown"} <= s._checked


def test_self_check_runs_once_per_reward(monkeypatch):
    calls = []
    real = scorer_mod.run_self_check
    monkeypatch.setattr(scorer_mod, "run_self_check",
                        lambda name, **ctx: calls.append(name) or real(name, **ctx))
    with _inline() as s:
        s.self_check({"code"})
        s.self_check({"code", "countdown"})
        s.self_check({"countdown"})
    assert sorted(calls) == ["code_tests", "countdown", "format"]


def test_broken_sandbox_stops_the_self_check(monkeypatch):
    _break_sandbox(monkeypatch)
    with _inline() as s:
        with pytest.raises(RewardSetupError) as err:
            s.self_check({"code"})
        msg = str(err.value)
        assert "code_tests" in msg and "known-good program" in msg and "crashed" in msg
        assert "\n" not in msg  # one line
        s.self_check({"countdown"})  # rewards that do not need the sandbox still pass


def test_missing_math_verify_stops_the_self_check(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify -> ImportError
    with _inline() as s:
        with pytest.raises(RewardSetupError, match="math_accuracy: math-verify is not importable"):
            s.self_check({"math"})


def test_a_kind_without_a_spec_fails_the_self_check():
    with _inline() as s:
        with pytest.raises(RewardSetupError, match="no reward spec for kind 'nope'"):
            s.self_check({"nope"})


def test_background_self_check_raises_at_the_first_scoring(monkeypatch):
    _break_sandbox(monkeypatch)
    with _inline() as s:
        s.self_check({"code"}, block=False)
        with pytest.raises(RewardSetupError, match="code_tests"):
            s.score([{"kind": "code", "completion": GOOD_CODE, "reference": ADD_TESTS}])


def test_sandbox_crash_is_an_error_not_a_zero(monkeypatch):
    _break_sandbox(monkeypatch)
    with _inline() as s:
        [res] = s.score([{"kind": "code", "completion": GOOD_CODE, "reference": ADD_TESTS}])
    assert res.components["code_tests"] == 0.0
    assert res.error and "code_tests" in res.error and "sandbox failed (crashed)" in res.error


@pytest.mark.parametrize("kind, reference, field", [
    ("code", {}, "neither 'tests' nor 'stdio'"),
    ("code", {"stdio": [{"input": "1"}]}, "list of {input, output}"),
    ("countdown", {"numbers": [1, 2]}, "'target'"),
    ("river_crossing", {"capacity": 2}, "'items'"),
    ("reasoning_gym", {"dataset": "x"}, "'entry'"),
])
def test_missing_reference_fields_are_errors(kind, reference, field):
    with _inline() as s:
        [res] = s.score([{"kind": kind, "completion": "<think>t</think><answer>1</answer>",
                          "reference": reference}])
    assert res.error is not None and field in res.error, res
    assert s.metrics()["errors"] == 1


def test_registered_reward_names_are_kinds():
    texts = ["<think>a</think>\n<answer>b</answer>", "no tags", "<think></think><answer>b</answer>"]
    with _inline() as s:
        got = s.score([{"kind": "format", "completion": t} for t in texts])
        # A task kind keeps its weighted spec: math is 1.0 accuracy + 0.1 format.
        [m] = s.score([{"kind": "math", "completion": "<think>a</think>\n<answer>7</answer>",
                        "reference": {"answer": "8"}}])
    assert [r.total for r in got] == [check_format(t).score for t in texts] == [1.0, 0.0, 0.0]
    assert all(r.error is None and list(r.components) == ["format"] for r in got)
    assert m.components == {"math_accuracy": 0.0, "format": 1.0} and m.total == pytest.approx(0.1)


def test_cli_scores_a_reward_kind_and_reports_a_broken_sandbox(tmp_path, monkeypatch, capsys):
    """Through the workers, as a user runs it: the broken sandbox is named on stderr, each code
    line carries a non-null error, other kinds are scored, and the exit code says it failed."""
    (tmp_path / "r1mega_broken_sandbox.py").write_text(
        "from r1mega.rewards import sandbox\n"
        "sandbox._HARNESS = '/nonexistent/r1mega/_sandbox_harness.py'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sandbox, "_HARNESS", sandbox._HARNESS)  # restored after the import
    lines = [{"kind": "format", "completion": "<think>a</think>\n<answer>b</answer>"},
             {"kind": "code", "completion": GOOD_CODE, "reference": ADD_TESTS}]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rc = reward_cli(["--input", str(path), "rewards.num_workers=1",
                     "rewards.modules=[r1mega_broken_sandbox]"])
    cap = capsys.readouterr()
    out = [json.loads(x) for x in cap.out.splitlines()]
    assert rc == 1
    assert "reward error" in cap.err and "code_tests" in cap.err and "known-good" in cap.err
    assert out[0]["score"] == 1.0 and out[0]["error"] is None
    assert out[1]["error"] and "sandbox failed (crashed)" in out[1]["error"], out[1]
