"""A regression suite of real reward hacks: each scores 0; each honest form of the same answer
scores 1. The hacks are completions that policies produced against earlier rewards (SmolLM2
restating the question, found on the H200) or that ``r1mega reward`` scored wrongly."""
import pytest

from r1mega.rewards.math import exact_match, math_accuracy

# (prompt, completion, reference): a policy found these, or they were scored wrongly by hand.
HACKS = [
    ("What is 76 * 16?", "76 * 16", "1216"),  # SmolLM2, lr 1e-5, 120 steps: reward 1.0
    ("What is 59 - 7?", "59 - 7", "52"),  # same run
    ("What is 76 * 16?", "<answer>76 * 16</answer>", "1216"),
    ("What is 76 * 16?", "The answer is 76 \\times 16.", "1216"),
    ("What is 76 * 16?", "<answer>$76 \\times 16$</answer>", "1216"),
    ("What is 76 * 16?", "<answer>1200+16</answer>", "1216"),
    ("What is (17 - 5) * 3?", "<answer>(17-5)*3</answer>", "36"),
    ("Compute 12 * 3.", "<answer>12*3</answer>", "36"),
    ("What is 76 * 16?", "\\boxed{76 \\cdot 16}", "1216"),
    ("What is 76 * 16?", "<answer>1216 = 76*16</answer>", "1216"),
    ("What is 76 * 16?", "Let me see. 76 * 16", "1216"),
    ("What is 2 + 2?", "<think>2+2</think><answer>2+2</answer>", "4"),
    ("What is 8 / 2?", "<answer>8 \\div 2</answer>", "4"),
    ("What is 2^10?", "<answer>2^10</answer>", "1024"),
]

# (prompt, completion, reference): honest answers in the forms people write them.
HONEST = [
    ("What is 76 * 16?", "<answer>1216</answer>", "1216"),
    ("What is 76 * 16?", "<answer>1,216</answer>", "1216"),
    ("What is 76 * 16?", "<answer>1216.0</answer>", "1216"),
    ("What is 76 * 16?", "<answer>$1216$</answer>", "1216"),
    ("What is 76 * 16?", "<answer>1{,}216</answer>", "1216"),
    ("What is 76 * 16?", "<answer>\\boxed{1216}</answer>", "1216"),
    ("What is 76 * 16?", "76 * 16 = 1216", "1216"),
    ("What is 76 * 16?", "<think>76*16 = 76*10 + 76*6 = 760 + 456</think><answer>1216</answer>",
     "1216"),
    ("What is 76 * 16?", "Multiplying, we get 1216.", "1216"),
    ("What is 76 * 16?", "The answer is \\boxed{1216}.", "1216"),
    ("How much is it?", "<answer>\\$18</answer>", "18"),
    ("How much is it?", "<answer>18 dollars</answer>", "18"),
    ("How many?", "<answer>x = 4</answer>", "4"),
    ("What is 3/4 as a decimal?", "<answer>0.75</answer>", "0.75"),
    ("Write 0.75 as a fraction.", "<answer>\\frac{3}{4}</answer>", "0.75"),
    ("Half of -1?", "<answer>-\\frac{1}{2}</answer>", "-1/2"),
    ("What share?", "<answer>50%</answer>", "50%"),
    ("What share?", "<answer>0.5</answer>", "50%"),
    ("What is 59 - 7?", "59 - 7 = 52", "52"),
    ("What is 5 - 9?", "<answer>-4</answer>", "-4"),
    ("Mixed?", "<answer>2\\frac{1}{2}</answer>", "5/2"),
]


@pytest.mark.parametrize("prompt,completion,gold", HACKS)
def test_hack_scores_zero(prompt, completion, gold):
    res = math_accuracy(completion, {"answer": gold}, prompt=prompt)
    assert res.score == 0.0, res.reasons
    assert exact_match(completion, {"answer": gold}).score == 0.0


@pytest.mark.parametrize("prompt,completion,gold", HONEST)
def test_honest_form_scores_one(prompt, completion, gold):
    res = math_accuracy(completion, {"answer": gold}, prompt=prompt)
    assert res.score == 1.0, res.reasons


def test_expression_reason_is_stated():
    res = math_accuracy("<answer>1200+16</answer>", {"answer": "1216"})
    assert "an expression, not a final answer" in res.reasons[0]
    res = math_accuracy("76 * 16", {"answer": "1216"}, prompt="What is 76 * 16?")
    assert "expression" in res.reasons[0]


def test_restatement_scores_zero_whatever_the_reference():
    # A symbolic reference goes through math-verify, and the restatement rule still applies.
    prompt = "Simplify $\\sqrt{8}$."
    assert math_accuracy("<answer>\\sqrt{8}</answer>", {"answer": "2\\sqrt{2}"},
                         prompt=prompt).score == 0.0
    assert math_accuracy("<answer>2\\sqrt{2}</answer>", {"answer": "\\sqrt{8}"},
                         prompt=prompt).score == 1.0


def test_latex_without_delimiters_is_read_as_latex():
    assert math_accuracy("<answer>2\\sqrt{2}</answer>", {"answer": "\\sqrt{8}"}).score == 1.0
    assert math_accuracy("<answer>3\\sqrt{2}</answer>", {"answer": "\\sqrt{8}"}).score == 0.0


def test_symbolic_references_keep_equivalence():
    assert math_accuracy("<answer>x^2+2x+1</answer>", {"answer": "(x+1)^2"}).score == 1.0
    assert math_accuracy("<answer>[1, 2)</answer>", {"answer": "[1,2)"}).score == 1.0
    assert math_accuracy("<answer>(1, 2)</answer>", {"answer": "[1,2)"}).score == 0.0


def test_answer_form_option():
    # "expression": symbolic equivalence for every reference (a task that asks for one).
    assert math_accuracy("<answer>1200+16</answer>", {"answer": "1216"},
                         answer_form="expression").score == 1.0
    # ... but never a restatement of the prompt.
    assert math_accuracy("<answer>76*16</answer>", {"answer": "1216"}, answer_form="expression",
                         prompt="What is 76*16?").score == 0.0
    # "number": a symbolic reference is a data error, raised (the scorer reports it).
    with pytest.raises(ValueError, match="answer_form=number"):
        math_accuracy("<answer>2</answer>", {"answer": "\\sqrt{8}"}, answer_form="number")
    with pytest.raises(ValueError, match="answer_form"):
        math_accuracy("<answer>2</answer>", {"answer": "2"}, answer_form="sometimes")


def test_missing_reference_raises():
    from r1mega.rewards.registry import MissingReference

    with pytest.raises(MissingReference):
        math_accuracy("<answer>2</answer>", {})
    with pytest.raises(MissingReference):
        exact_match("<answer>2</answer>", {})
