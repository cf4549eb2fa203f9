"""The held-out grader: strict, and independent of the training reward.

A policy is trained against its reward; if the evaluation used the same code, a hole in it would
be reported as accuracy (a policy that restated ``76 * 16`` scored 100 %). So the evaluation has
its own grader, written separately and kept narrow on purpose:

* **numeric reference** (an integer, decimal or fraction): the final answer is the last number of
  the ``<answer>`` block (else of the last ``\\boxed{}``, else of the whole completion); it must
  not be an operand (a ``*``, ``+``, ``\\times`` ... on either side of it means the text ends in an
  expression), and it must equal the reference as an exact rational. No sympy, no evaluation.
* **any other reference**: the task's own verifier (the accuracy reward of its spec:
  ``math_accuracy``'s symbolic equivalence, ``countdown``, ``code_tests`` ...), whose rule checks
  the task itself rather than a parsed number.
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOX = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
# A number token: digits with correctly grouped thousands commas, an optional decimal part, an
# optional sign; or \frac{a}{b}; or a/b.
_TOKEN = re.compile(r"(?<![\w.])(-?)(?:\\[dt]?frac\{(\d+)\}\{(\d+)\}|(\d{1,3}(?:,\d{3})+(?:\.\d+)?"
                    r"|\d+(?:\.\d+)?|\.\d+)(?:/(\d+))?)(?![\d])")
_OPERATORS = ("+", "-", "*", "/", "^", "×", "÷", "·", "\\times", "\\cdot", "\\div", "\\ast")


def exact_rational(text: str) -> Optional[Fraction]:
    """``text`` as one exact rational when it is nothing but a number (``$...$`` allowed)."""
    t = text.strip().strip("$").strip().rstrip(".").strip()
    m = _TOKEN.fullmatch(t)
    return _token_value(m) if m else None


def _token_value(m: re.Match) -> Optional[Fraction]:
    sign = -1 if m.group(1) else 1
    try:
        if m.group(2) is not None:
            return sign * Fraction(int(m.group(2)), int(m.group(3)))
        value = Fraction(m.group(4).replace(",", ""))
        if m.group(5) is not None:
            if "." in m.group(4):
                return None
            value /= int(m.group(5))
        return sign * value
    except (ValueError, ZeroDivisionError):
        return None


def _answer_region(completion: str) -> tuple[str, str]:
    tags = _TAG.findall(completion)
    region, where = (tags[-1], "answer block") if tags else (completion, "completion")
    boxes = _BOX.findall(region)
    return (boxes[-1], "boxed answer") if boxes else (region, where)


def _is_operand(region: str, start: int, end: int) -> bool:
    """An operator joins the number at [start, end) to another operand on either side."""
    before = region[:start].rstrip().rstrip("(").rstrip()
    for op in _OPERATORS:
        if before.endswith(op) and re.search(r"[\d)}]\s*$", before[:-len(op)]):
            return True
    after = region[end:].lstrip().lstrip(")").lstrip()
    return any(after.startswith(op) and re.match(r"\s*[(\d\\.]", after[len(op):])
               for op in _OPERATORS)


def grade_numeric(completion: str, gold: Fraction) -> tuple[bool, str]:
    region, where = _answer_region(completion)
    tokens = list(_TOKEN.finditer(region))
    if not tokens:
        return False, f"no number in the {where}"
    last = tokens[-1]
    start = last.start()
    # "5 - 3": that minus is an operator, not the sign of 3.
    if last.group(1) and re.search(r"[\d)}]\s*$", region[:start]):
        start += 1
        value = _token_value(last)
        value = -value if value is not None else None
    else:
        value = _token_value(last)
    if _is_operand(region, start, last.end()):
        return False, f"the {where} ends in an expression: {region.strip()[-40:]!r}"
    if value is None:
        return False, f"{last.group(0)!r} is not a number"
    ok = value == gold
    return ok, f"{value} vs {gold}: " + ("equal" if ok else "different")


def strict_grade(completion: str, reference: dict,
                 verifier_score: Optional[float] = None) -> tuple[bool, str]:
    """(correct, reason) for one completion; see the module doc. ``verifier_score`` is the task
    verifier's score of this completion, used only when the reference is not a number."""
    gold = exact_rational(str(reference["answer"])) if "answer" in reference else None
    if gold is not None:
        return grade_numeric(completion, gold)
    if verifier_score is None:
        raise ValueError("strict grading of a non-numeric reference needs the task verifier's "
                         f"score (reference fields {sorted(reference)})")
    return verifier_score >= 1.0, "the task's verifier"
