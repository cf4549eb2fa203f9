"""Procedural tasks: deterministic per seed, configurable, and consistent with the rewards."""
import pytest

from r1mega.config import DataConfig, RewardsConfig
from r1mega.data import build_prompt_source
from r1mega.data.tasks import make_builtin
from r1mega.rewards.scorer import RewardScorer


def test_items_are_a_function_of_seed_and_index():
    a = make_builtin("arithmetic", 50, seed=3)
    b = make_builtin("arithmetic", 50, seed=3)
    c = make_builtin("arithmetic", 50, seed=4)
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert [r.prompt for r in a] != [r.prompt for r in c]
    assert a[17].prompt == a[17].prompt and a[17].metadata["index"] == 17
    with pytest.raises(IndexError):
        a[50]


def test_arithmetic_difficulty_options():
    easy = make_builtin("arithmetic", 100, 0, {"digits": 1, "operators": "+"})
    for r in easy:
        x, y = r.prompt.rstrip("=").split("+")
        assert len(x) == 1 and len(y) == 1 and int(r.reference["answer"]) == int(x) + int(y)
    hard = make_builtin("arithmetic", 100, 0, {"digits": 3, "operators": "+-*/", "terms": 3})
    for r in hard:
        # Independent check: Python's own arithmetic on the shown expression (exact division).
        expr = r.prompt.rstrip("=")
        assert eval(expr) == int(r.reference["answer"])  # noqa: S307 -- digits and +-*/ only
    q = make_builtin("arithmetic", 3, 0, {"style": "question"})[0]
    assert q.prompt.startswith("What is ")
    with pytest.raises(ValueError, match="task_options"):
        make_builtin("arithmetic", 3, 0, {"digit": 2})
    with pytest.raises(ValueError, match="task_options"):
        make_builtin("arithmetic", 3, 0, {"operators": "^"})


def test_reference_answers_score_full_marks():
    """Each task's own solution, written as a model would, gets the top score from the rewards
    the scorer uses for that kind: generator and verifier agree."""
    items = []
    for task in ("arithmetic", "countdown", "river_crossing"):
        for rec in make_builtin(task, 10, seed=1):
            if task == "arithmetic":
                answer = rec.reference["answer"]
            elif task == "countdown":
                answer = rec.metadata["solution"]
            else:
                answer = "\n".join(", ".join(m) for m in rec.metadata["solution"])
            completion = f"<think>solve it</think><answer>{answer}</answer>"
            items.append({"kind": rec.kind, "completion": completion, "reference": rec.reference})
    cfg = RewardsConfig(spec={"arithmetic": {"math_accuracy": 1.0, "exact_match": 1.0}},
                        num_workers=0)
    out = RewardScorer(cfg).score(items)
    assert [r.total for r in out[:10]] == [2.0] * 10
    assert [r.total for r in out[10:]] == [1.1] * 20
    wrong = dict(items[0], completion="<think>x</think><answer>-99999</answer>")
    assert RewardScorer(cfg).score([wrong])[0].total == 0.0


def test_code_tasks_pass_with_a_correct_solution_and_fail_otherwise():
    solutions = {
        "factorial": "def factorial(n):\n    if n < 0:\n        raise ValueError(n)\n"
                     "    r = 1\n    for k in range(2, n + 1):\n        r *= k\n    return r\n",
        "sum_digits": "def sum_digits(n):\n    return sum(int(c) for c in str(abs(n)))\n",
        "is_palindrome": "def is_palindrome(s):\n    t = s.replace(' ', '').lower()\n"
                         "    return t == t[::-1]\n",
        "count_vowels": "def count_vowels(s):\n    return sum(c in 'aeiouAEIOU' for c in s)\n",
        "gcd": "import math\ndef gcd(a, b):\n    return math.gcd(a, b)\n",
        "reverse_words": "def reverse_words(s):\n    return ' '.join(reversed(s.split()))\n",
    }
    task = make_builtin("code", 12, seed=0)
    items, seen = [], set()
    for rec in task:
        fam = rec.metadata["family"]
        seen.add(fam)
        good = f"<think>.</think><answer>\n```python\n{solutions[fam]}```\n</answer>"
        bad = good.replace("return", "return None and ", 1) if fam != "factorial" else \
            good.replace("raise ValueError(n)", "return 1")
        items += [{"kind": "code", "completion": good, "reference": rec.reference},
                  {"kind": "code", "completion": bad, "reference": rec.reference}]
    cfg = RewardsConfig(spec={"code": {"code_tests": 1.0}}, num_workers=2)
    with RewardScorer(cfg) as scorer:
        out = scorer.score(items)
    assert len(seen) >= 4
    assert [r.total for r in out[0::2]] == [1.0] * len(task), [r.reasons for r in out[0::2]]
    assert [r.total for r in out[1::2]] == [0.0] * len(task)


def test_reasoning_gym_adapter_scores_with_its_own_verifier():
    pytest.importorskip("reasoning_gym")
    src = build_prompt_source(DataConfig(source="reasoning_gym:basic_arithmetic", num_examples=5))
    items = []
    for rec in src:
        items.append({"kind": rec.kind, "reference": rec.reference,
                      "completion": f"<think>.</think><answer>{rec.reference['entry']['answer']}"
                                    "</answer>"})
        items.append({"kind": rec.kind, "reference": rec.reference,
                      "completion": "<think>.</think><answer>123456789</answer>"})
    out = RewardScorer(RewardsConfig(spec={"reasoning_gym": {"reasoning_gym": 1.0}},
                                     num_workers=0)).score(items)
    assert [r.total for r in out[0::2]] == [1.0] * 5
    assert all(r.total < 1.0 for r in out[1::2])
    with pytest.raises(ValueError, match="reasoning_gym:no_such_task"):
        build_prompt_source(DataConfig(source="reasoning_gym:no_such_task"))
