"""Math accuracy through math-verify: equivalent forms match in both directions, others do not."""
import pytest

from r1mega.rewards.math import exact_equal, exact_match, math_accuracy, math_equal

EQUIVALENT = [
    ("1/2", "0.5"),
    ("\\frac{1}{2}", "1/2"),
    ("\\dfrac{3}{4}", "0.75"),
    ("1,000", "1000"),
    ("1,234,567", "1234567"),
    ("[1, 2)", "[1,2)"),
    ("(-\\infty, 3]", "(-\\infty,3]"),
    ("\\{1, 2\\}", "\\{2, 1\\}"),
    ("5 cm", "5"),
    ("10\\%", "10"),
    ("The answer is 42.", "42"),
    ("\\boxed{3}", "3"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ("x = 3", "3"),
    ("3.0", "3"),
]
DIFFERENT = [
    ("1/3", "0.3"),
    ("41", "42"),
    ("(1, 2]", "[1, 2)"),
    ("\\{1, 2\\}", "\\{1, 3\\}"),
    ("2\\sqrt{2}", "\\sqrt{2}"),
    ("-5", "5"),
]


@pytest.mark.parametrize("a,b", EQUIVALENT)
def test_equivalent_both_directions(a, b):
    assert math_equal(a, b)[0], (a, b)
    assert math_equal(b, a)[0], (b, a)


@pytest.mark.parametrize("a,b", DIFFERENT)
def test_different_both_directions(a, b):
    assert not math_equal(a, b)[0], (a, b)
    assert not math_equal(b, a)[0], (b, a)


def test_answer_block_is_what_counts():
    ref = {"answer": "\\frac{7}{2}"}
    good = "<think>first guess 3, then 7/2</think><answer>3.5</answer>"
    assert math_accuracy(good, ref).score == 1.0
    # The reasoning's intermediate numbers must not be taken for the answer.
    bad = "<think>the answer is 3.5</think><answer>4</answer>"
    assert math_accuracy(bad, ref).score == 0.0
    # Without an answer block the last boxed value counts.
    assert math_accuracy("so we get \\boxed{\\frac{14}{4}}", ref).score == 1.0
    assert math_accuracy("nothing here", {"answer": "2"}).score == 0.0


def test_hedged_answers_get_no_credit():
    for hedge in ("1, 2, 3, 4, 5", "\\boxed{3} or \\boxed{4}", "x \\in \\{3, 4\\}"):
        assert math_accuracy(f"<answer>{hedge}</answer>", {"answer": "3"}).score == 0.0, hedge


def test_unparsable_reference_says_so():
    # An empty reference is a broken data row: an error (the scorer's ``error``), not a 0.
    from r1mega.rewards.registry import MissingReference

    with pytest.raises(MissingReference, match="answer"):
        math_accuracy("<answer>1</answer>", {"answer": ""})
    res = math_accuracy("<answer>1</answer>", {"answer": "\\frac{"})
    assert res.score == 0.0 and "reference" in res.reasons[0]


def test_exact_match_cheap_path():
    assert exact_equal("81", "81") and exact_equal(" 81 ", "81")
    assert exact_equal("0.50", "1/2") and exact_equal("1,000", "1000")
    assert not exact_equal("18", "81") and not exact_equal("81x", "81")
    assert exact_match("81", {"answer": "81"}).score == 1.0
    assert exact_match("<think>.</think><answer>-4</answer>", {"answer": "-4"}).score == 1.0
    assert exact_match("80", {"answer": "81"}).score == 0.0
