"""Math accuracy: is the final answer equal to the reference, up to symbolic equivalence?

Parsing and comparison are Hugging Face's ``math-verify`` (LaTeX, fractions, decimals, sets,
intervals, units, thousands separators; sympy underneath). Both of its steps are bounded in time
(``timeout_s``, enforced with SIGALRM in the main thread; the scorer's worker pool adds a hard
wall clock on top, because sympy can also hang in C code).

What is compared (``rewards.answer_form``, see ``answers.py`` for why):

* ``auto`` (default): a numeric reference (integer, decimal, fraction, percentage) is matched only
  by a number, the final answer of ``answers.final_answer`` (last ``<answer>`` block, else last
  ``\\boxed{}``, else the last number of the prose); an arithmetic expression scores 0 ("an
  expression, not a final answer"). A symbolic reference (``\\sqrt{8}``, an interval, a set) is
  compared by math-verify's symbolic equivalence, with LaTeX read as LaTeX without delimiters.
* ``number``: every reference must be a number (a symbolic one is an error, not a 0).
* ``expression``: always symbolic equivalence (an expression that evaluates to the reference
  counts); only for tasks that ask for an expression.

In every form an answer that restates the prompt's own expression (``76 * 16`` for "What is
76 * 16?") scores 0. ``exact_match`` is the cheap path for procedural tasks whose answers are
plain numbers (the CPU demo's arithmetic): string or exact-rational equality, no sympy.
"""
from __future__ import annotations

import re
import threading
import time
from fractions import Fraction

from r1mega.rewards.answers import (ANSWER_FORMS, final_answer, judge_numeric, parse_number,
                                    restates_prompt)
from r1mega.rewards.registry import RewardResult, extract_answer, register_reward, require

_BRACKETED = re.compile(r"\s*(\[|\(|\\\{)[^\n]*(\]|\)|\\\})\s*")


def _parse(text: str, timeout_s: int):
    from math_verify import parse

    # math-verify's timeouts use signal.alarm, which only works in the main thread.
    t = timeout_s if threading.current_thread() is threading.main_thread() else None
    bare = "$" not in text and "\\(" not in text and "\\[" not in text
    if bare and re.search(r"\\[A-Za-z]", text):
        # LaTeX without delimiters ("2\\sqrt{2}") is otherwise read as its last number ("2").
        parsed = parse(f"${text}$", parsing_timeout=t)
        if parsed:
            return parsed
    if bare and _BRACKETED.fullmatch(text):
        # A bare interval or set such as "[1, 2)" is only read as one inside math delimiters;
        # outside them math-verify takes its last number.
        parsed = parse(f"${text}$", parsing_timeout=t)
        if parsed:
            return parsed
    parsed = parse(text, parsing_timeout=t)
    if not parsed and bare:
        parsed = parse(f"${text}$", parsing_timeout=t)
    return parsed


def math_compare(predicted: str, gold: str, timeout_s: int = 5) -> tuple[bool, list, str]:
    """(equal, reasons, the answer math-verify extracted from ``predicted`` as text)."""
    from math_verify import verify

    t = timeout_s if threading.current_thread() is threading.main_thread() else None
    gold_p = _parse(gold, timeout_s)
    if not gold_p:
        return False, [f"reference answer {gold!r} could not be parsed; fix the data row"], ""
    pred_p = _parse(predicted, timeout_s)
    if not pred_p:
        return False, [f"no parsable answer in {predicted[-80:]!r}"], ""
    ok = bool(verify(gold_p, pred_p, timeout_seconds=t))
    return ok, [f"predicted {pred_p[-1]!s} vs reference {gold_p[-1]!s}: "
                + ("equal" if ok else "different")], str(pred_p[-1])


def math_equal(predicted: str, gold: str, timeout_s: int = 5) -> tuple[bool, list]:
    """``predicted`` (free text, may hold LaTeX) equals ``gold``? Returns (equal, reasons)."""
    ok, reasons, _ = math_compare(predicted, gold, timeout_s)
    return ok, reasons


# What a worker parses and compares before it takes work (registry.warm_up): the constructs whose
# first use in a process is slow (math-verify's LaTeX parser, sympy's radicals, logarithms, trig,
# sets, intervals, matrices, ...). Each answer is compared with a number, a fraction and a set.
# Paid once per worker before it takes work, so that no step's clock pays it.
WARMUP_ANSWERS = (
    "The answer is 42.", "3.75", "1,000", "50%", r"$\frac{3}{4}$", r"$2\frac{1}{2}$",
    r"$x = \sqrt{2}+1$", r"$\sqrt[3]{8}$", r"\boxed{\{1,2,3\}}", r"$[1, 2)$", r"$(1,2)$",
    r"$2x + 3 = 7$", r"$x^2-5x+6=0$", r"$x \le 5$", r"$|x-1|$", r"$\pi r^2$", r"$e^{i\pi}$",
    r"$10^{3}$", r"$\log_2 8$", r"$\ln 2$", r"$\sin(30^\circ)$", r"$\cos x \tan y$",
    r"$\angle ABC = 45^\circ$", r"$a^2+b^2=c^2$", r"$\begin{pmatrix}1\\2\end{pmatrix}$",
    r"$\infty$", r"$\binom{5}{2}$", r"$5!$", r"$\sum_{i=1}^n i$", r"$\int_0^1 x\,dx$",
    r"$\$5.00$", r"$3\text{ cm}$", r"$\overline{AB}$",
)
_WARMUP_GOLDS = ("2", r"\frac{1}{2}", r"\{1, 2\}")
_WARMUP_BUDGET_S = 15.0  # a worker must report ready within the scorer's start timeout


def warm_up_math() -> None:
    t0 = time.monotonic()
    for i, answer in enumerate(WARMUP_ANSWERS):
        if time.monotonic() - t0 > _WARMUP_BUDGET_S:
            return
        math_equal(answer, _WARMUP_GOLDS[i % len(_WARMUP_GOLDS)])


@register_reward("math_accuracy", warmup=warm_up_math)
def math_accuracy(completion: str, reference: dict, **context) -> RewardResult:
    require(reference, "answer", reward="math_accuracy")
    gold = str(reference["answer"])
    form = context.get("answer_form") or "auto"
    if form not in ANSWER_FORMS:
        raise ValueError(f"rewards.answer_form={form!r}: use one of {list(ANSWER_FORMS)}")
    prompt = context.get("prompt")
    answer = final_answer(completion, reference.get("answer_pattern"))
    if context.get("require_answer_tag") and answer.source != "answer_tag":
        return RewardResult(0.0, ["no <answer> block"])
    gold_number = parse_number(gold) if form != "expression" else None
    if form == "number" and gold_number is None:
        raise ValueError(f"rewards.answer_form=number but the reference {gold!r} is not a "
                         "number; use answer_form=auto for symbolic references")
    if gold_number is not None:
        verdict = judge_numeric(answer, gold_number, prompt)
        return RewardResult(1.0 if verdict.ok else 0.0, [verdict.reason])
    # Symbolic: the tagged or boxed answer, else the whole completion for math-verify to read.
    text = answer.text if answer.source in ("answer_tag", "boxed") else completion
    ok, reasons, extracted = math_compare(text, gold, int(context.get("math_timeout_s", 5)))
    judged = text if answer.source in ("answer_tag", "boxed") else extracted
    if restates_prompt(judged, prompt):
        return RewardResult(0.0, [f"restates the prompt's expression: {judged[:60]!r}"])
    return RewardResult(1.0 if ok else 0.0, reasons)


def _as_fraction(text: str) -> Fraction | None:
    text = text.strip().replace(",", "")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def exact_equal(predicted: str, gold: str) -> bool:
    """Same string after trimming, or the same exact rational ("0.50" == "1/2" == ".5")."""
    if predicted.strip() == gold.strip():
        return True
    a, b = _as_fraction(predicted), _as_fraction(gold)
    return a is not None and a == b


@register_reward("exact_match")
def exact_match(completion: str, reference: dict, **context) -> RewardResult:
    require(reference, "answer", reward="exact_match")
    answer = extract_answer(completion, reference.get("answer_pattern"))
    text = completion.strip() if answer is None else answer
    ok = exact_equal(text, str(reference["answer"]))
    return RewardResult(1.0 if ok else 0.0, [f"{text[:40]!r} vs {str(reference['answer'])!r}"])
