"""The strict held-out grader against hand-made cases, and its independence: the hacks that the
training reward once paid for are wrong here too."""
from fractions import Fraction

import pytest

from r1mega.rewards.strict import exact_rational, grade_numeric, strict_grade

CORRECT = [
    ("<answer>1216</answer>", "1216"), ("<answer>1,216</answer>", "1216"),
    ("<answer>$1216$</answer>", "1216"), ("<answer>1216.0</answer>", "1216"),
    ("The answer is 1216.", "1216"), ("76 * 16 = 1216", "1216"), ("\\boxed{1216}", "1216"),
    ("<think>2+3=5</think><answer>5</answer>", "5"), ("<answer>x = -5</answer>", "-5"),
    ("<answer>-4</answer>", "-4"), ("<answer>3/4</answer>", "0.75"),
    ("<answer>\\frac{3}{4}</answer>", "3/4"), ("5 - 3 = 2", "2"),
    ("<answer>18 dollars</answer>", "18"),
]
WRONG = [
    ("<answer>76 * 16</answer>", "1216"), ("76 * 16", "1216"), ("59 - 7", "52"),
    ("<answer>1200+16</answer>", "1216"), ("<answer>(17-5)*3</answer>", "36"),
    ("<answer>76 \\times 16</answer>", "1216"), ("1216 = 76*16", "1216"),
    ("<answer>1215</answer>", "1216"), ("no number here", "3"), ("<answer></answer>", "3"),
    ("<answer>1216</answer> then <answer>7</answer>", "1216"),  # the last block counts
    ("5 -3", "-3"),  # "5 minus 3": 3 is an operand
]


@pytest.mark.parametrize("completion,gold", CORRECT)
def test_correct(completion, gold):
    ok, why = strict_grade(completion, {"answer": gold})
    assert ok, why


@pytest.mark.parametrize("completion,gold", WRONG)
def test_wrong(completion, gold):
    ok, why = strict_grade(completion, {"answer": gold})
    assert not ok, why


def test_exact_rational():
    assert exact_rational("1216") == 1216 and exact_rational("-3/4") == Fraction(-3, 4)
    assert exact_rational("0.50") == Fraction(1, 2) and exact_rational("1,000") == 1000
    assert exact_rational("\\sqrt{8}") is None and exact_rational("1+1") is None
    assert exact_rational("1,00") is None  # badly grouped: not a number


def test_non_numeric_reference_uses_the_verifier_score():
    ref = {"answer": "\\sqrt{8}"}
    assert strict_grade("<answer>2\\sqrt{2}</answer>", ref, verifier_score=1.0)[0]
    assert not strict_grade("<answer>2\\sqrt{2}</answer>", ref, verifier_score=0.0)[0]
    with pytest.raises(ValueError, match="verifier"):
        strict_grade("anything", {"numbers": [1, 2], "target": 3})


def test_grade_numeric_reason_names_the_expression():
    ok, why = grade_numeric("<answer>76 * 16</answer>", Fraction(1216))
    assert not ok and "expression" in why
