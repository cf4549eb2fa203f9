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

from r1mega.rewards.registry import (MissingReference, RewardResult, RewardSetupError,
                                     extract_answer, register_reward)
from r1mega.rewards.sandbox import SandboxLimits, run_tests

_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_program(completion: str) -> str:
    answer = extract_answer(completion)
    text = completion if answer is None else answer
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


# The sandbox statuses that are the program's doing; any other ("crashed": the judge ended
# without a verdict, "error": it could not start or answered without the nonce) means the
# sandbox itself failed, which must be an error, never a 0 the policy learns from.
_PROGRAM_STATUSES = ("passed", "failed", "timeout")


class SandboxError(RuntimeError):
    """The sandbox failed to judge the program (not the program failing its tests)."""


def _limits(context: dict) -> SandboxLimits:
    return SandboxLimits(timeout_s=float(context.get("sandbox_timeout_s", 5.0)),
                         memory_mb=int(context.get("sandbox_memory_mb", 1024)))


_GOOD = "def add(a, b):\n    return a + b\n"
_BAD = "def add(a, b):\n    return a - b\n"
_CHECK_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def check_sandbox(**context) -> None:
    """The sandbox passes a known-good program and fails a known-bad one, for the right reason."""
    good = run_tests(_GOOD, _CHECK_TESTS, None, _limits(context))
    if not good.passed:
        raise RewardSetupError(
            f"the code sandbox [{good.isolation}] fails a known-good program "
            f"({good.status}: {(good.error or good.stderr).strip()[-300:]})")
    bad = run_tests(_BAD, _CHECK_TESTS, None, _limits(context))
    if bad.status != "failed" or "AssertionError" not in bad.error:
        raise RewardSetupError(
            f"the code sandbox [{bad.isolation}] does not fail a known-bad program by its "
            f"assertion (status {bad.status}: {bad.error.strip()[-300:]})")


@register_reward("code_tests", self_check=check_sandbox)
def code_tests(completion: str, reference: dict, **context) -> RewardResult:
    tests, stdio = reference.get("tests"), reference.get("stdio")
    if not tests and not stdio:
        raise MissingReference("code_tests: the reference has neither 'tests' nor 'stdio'; fix "
                               f"the data row (fields present: {sorted(reference)})")
    if stdio is not None and not (isinstance(stdio, list) and all(
            isinstance(c, dict) and "input" in c and "output" in c for c in stdio)):
        raise MissingReference("code_tests: the reference's 'stdio' must be a list of "
                               "{input, output} objects")
    program = reference.get("prefix", "") + extract_program(completion)
    res = run_tests(program, tests or "", reference.get("entry_point"), _limits(context),
                    stdio=stdio)
    if res.status not in _PROGRAM_STATUSES:
        raise SandboxError(f"the sandbox failed ({res.status}) [{res.isolation}]: "
                           f"{res.error.strip()[-400:]}")
    reasons = [f"{res.status} in {res.wall_s:.2f} s [{res.isolation}]"]
    if res.error:
        reasons.append(res.error[:300])
    return RewardResult(1.0 if res.passed else 0.0, reasons)
