"""Code accuracy: the completion's Python must pass the task's unit tests in the sandbox.

Reference: ``{"tests": "...", "entry_point": "name", "prefix": "..."}`` or
``{"stdio": [{"input": "...", "output": "..."}, ...]}``.
* ``tests`` — HumanEval style (defines ``check(candidate)``, called with the ``entry_point``
  function) or plain module-level asserts that name the program's functions directly.
* ``stdio`` — competitive-programming style: the program runs as a script once per case on its
  ``input`` and must print ``output`` (trailing whitespace aside).
* ``prefix`` (optional) — text put before the extracted code, for tasks whose completion continues
  a given signature (HumanEval's ``prompt``).
The program is the last fenced code block of the ``<answer>`` block (or of the whole completion
when there is no answer block); without fences, the text itself.
"""
from __future__ import annotations

import re

from r1mega.rewards.registry import RewardResult, extract_answer, register_reward
from r1mega.rewards.sandbox import SandboxLimits, run_tests

_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_program(completion: str) -> str:
    answer = extract_answer(completion)
    text = completion if answer is None else answer
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


@register_reward("code_tests")
def code_tests(completion: str, reference: dict, **context) -> RewardResult:
    tests, stdio = reference.get("tests"), reference.get("stdio")
    if not tests and not stdio:
        return RewardResult(0.0, ["reference has neither 'tests' nor 'stdio'"])
    if stdio is not None and not (isinstance(stdio, list) and all(
            isinstance(c, dict) and "input" in c and "output" in c for c in stdio)):
        return RewardResult(0.0, ["reference 'stdio' must be a list of {input, output}"])
    program = reference.get("prefix", "") + extract_program(completion)
    limits = SandboxLimits(timeout_s=float(context.get("sandbox_timeout_s", 5.0)),
                           memory_mb=int(context.get("sandbox_memory_mb", 1024)))
    res = run_tests(program, tests or "", reference.get("entry_point"), limits, stdio=stdio)
    reasons = [f"{res.status} in {res.wall_s:.2f} s [{res.isolation}]"]
    if res.error:
        reasons.append(res.error[:300])
    return RewardResult(1.0 if res.passed else 0.0, reasons)
