"""The reward pool: weighted sums per kind, time boxes, crashes and errors scored 0 and counted,
the pool recovering, and the ``r1mega reward`` CLI."""
import json
import os
import time

import pytest

from r1mega.config import RewardsConfig
from r1mega.rewards.cli import main as reward_cli
from r1mega.rewards.registry import RewardResult, register_reward
from r1mega.rewards.scorer import RewardScorer, worker_pids

THIS = __name__  # the workers import this module to get the test rewards below


@register_reward("test_sleepy")
def _sleepy(completion, reference, **ctx):
    time.sleep(60)
    return RewardResult(1.0)


@register_reward("test_crashy")
def _crashy(completion, reference, **ctx):
    os._exit(3)


@register_reward("test_raisy")
def _raisy(completion, reference, **ctx):
    raise RuntimeError("a bug in a reward")


@register_reward("test_length")
def _length(completion, reference, **ctx):
    return RewardResult(float(len(completion)), [f"num_tokens={ctx.get('num_tokens')}"])


def _item(kind, completion, **ref):
    return {"kind": kind, "completion": completion, "reference": ref}


@pytest.fixture(scope="module")
def scorer():
    cfg = RewardsConfig(spec={"math": {"math_accuracy": 1.0, "format": 0.5},
                              "flaky": {"test_sleepy": 1.0, "test_length": 1.0},
                              "crash": {"test_crashy": 1.0, "test_length": 1.0},
                              "buggy": {"test_raisy": 1.0, "test_length": 2.0}},
                        num_workers=2, timeout_s=2.0, modules=[THIS])
    s = RewardScorer(cfg, max_new_tokens=64)
    yield s
    s.close()


def test_weighted_sum_per_kind(scorer):
    items = [_item("math", "<think>x</think><answer>1/2</answer>", answer="0.5"),
             _item("math", "<answer>0.5</answer>", answer="0.5"),
             _item("math", "<think>x</think><answer>3</answer>", answer="0.5"),
             _item("countdown", "<think>x</think><answer>3*4</answer>", numbers=[3, 4], target=12)]
    out = scorer.score(items)
    assert [r.total for r in out] == [1.5, 1.0, 0.5, 1.1]
    assert out[0].components == {"math_accuracy": 1.0, "format": 1.0}
    assert out[0].reasons["math_accuracy"] and out[0].error is None


def test_timeout_crash_and_error_score_zero_and_are_counted(scorer):
    before = scorer.metrics()
    out = scorer.score([_item("flaky", "abc"), _item("crash", "abcd"), _item("buggy", "ab"),
                        _item("math", "<think>x</think><answer>2</answer>", answer="2")])
    assert out[0].components == {"test_sleepy": 0.0, "test_length": 3.0}
    assert out[0].total == 3.0 and "timed out" in out[0].error
    assert out[1].total == 4.0 and "died" in out[1].error
    assert out[2].total == 4.0 and "a bug in a reward" in out[2].error
    assert out[3].total == 1.5 and out[3].error is None
    after = scorer.metrics()
    assert after["timeouts"] - before["timeouts"] == 1
    assert after["crashes"] - before["crashes"] == 1
    assert after["errors"] - before["errors"] == 1
    assert after["worker_restarts"] - before["worker_restarts"] == 2
    # The pool is whole again and keeps scoring.
    assert len(worker_pids(scorer)) == 2
    assert scorer.score([_item("math", "<answer>7</answer>", answer="7")])[0].total == 1.0


def test_bad_items_never_raise(scorer):
    out = scorer.score([None, {"kind": "math"}, _item("unknown_kind", "x"),
                        {"kind": "math", "completion": "x", "reference": "not json"}])
    assert all(r.total == 0.0 and r.error for r in out)
    assert "unknown_kind" in out[2].error
    assert scorer.score([]) == []


def test_context_reaches_rewards(scorer):
    item = dict(_item("flaky", "abc"), num_tokens=17)
    item["kind"] = "buggy"
    assert scorer.score([item])[0].reasons["test_length"] == ["num_tokens=17"]


def test_truncated_and_overlong():
    cfg = RewardsConfig(spec={"math": {"exact_match": 1.0}}, truncated="zero",
                        overlong_penalty_tokens=10, num_workers=0)
    s = RewardScorer(cfg, max_new_tokens=20)
    ok = _item("math", "5", answer="5")
    out = s.score([dict(ok, num_tokens=5), dict(ok, num_tokens=15), dict(ok, num_tokens=20),
                   dict(ok, num_tokens=20, truncated=True)])
    assert [r.total for r in out] == [1.0, 0.5, 0.0, 0.0]


def test_unknown_reward_name_fails_at_start():
    with pytest.raises(KeyError, match="math_acuracy.*Did you mean 'math_accuracy'"):
        RewardScorer(RewardsConfig(spec={"math": {"math_acuracy": 1.0}}, num_workers=0))


def test_cli_scores_lines_and_reports_bad_ones(tmp_path, capsys):
    lines = [json.dumps(_item("math", "<think>t</think><answer>\\frac{1}{4}</answer>",
                              answer="0.25")),
             "{broken json",
             json.dumps(["not", "an", "object"]),
             json.dumps(_item("code", "```python\ndef f(x):\n    return x * 2\n```",
                              tests="assert f(3) == 6", entry_point="f")),
             json.dumps(_item("countdown", "<answer>3+3</answer>", numbers=[3], target=6))]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    assert reward_cli(["--input", str(src), "--out", str(out), "rewards.num_workers=1"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["score"] == pytest.approx(1.1)
    assert rows[1]["score"] is None and "in.jsonl:2" in rows[1]["error"]
    assert rows[2]["score"] is None and "in.jsonl:3" in rows[2]["error"]
    assert rows[3]["components"]["code_tests"] == 1.0
    assert rows[4]["score"] == 0.0 and "too often" in rows[4]["reasons"]["countdown"][0]
    assert reward_cli(["--input", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl is not a file" in capsys.readouterr().err


def test_workers_do_not_rerun_an_unguarded_main_script(tmp_path):
    """A launch script without ``if __name__ == "__main__"`` must run once, not once per
    worker (what multiprocessing's spawn would do)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    marker = tmp_path / "runs.txt"
    script = tmp_path / "train_like.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {root!r})\n"
        f"open({str(marker)!r}, 'a').write('x')\n"
        "from r1mega.config import RewardsConfig\n"
        "from r1mega.rewards.scorer import RewardScorer\n"
        "s = RewardScorer(RewardsConfig(num_workers=2))\n"
        "out = s.score([{'kind': 'arithmetic', 'completion': '81', 'reference': {'answer': '81'}}"
        "] * 4)\n"
        "print(sum(o.total for o in out))\n"
        "s.close()\n")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "4.0"
    assert marker.read_text() == "x"
