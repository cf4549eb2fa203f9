"""The R1-Zero format reward, strict and lenient."""
import pytest

from r1mega.rewards.format import check_format

CASES = [  # (completion, strict, lenient)
    ("<think>a</think><answer>b</answer>", 1, 1),
    ("  <think>\nreason\n</think>\n<answer> 42 </answer>\n", 1, 1),
    ("<think>a</think> some words <answer>b</answer>", 0, 1),
    ("Sure! <think>a</think><answer>b</answer>", 0, 1),
    ("<think>a</think><answer>b</answer> trailing", 0, 1),
    ("<answer>b</answer><think>a</think>", 0, 0),
    ("<think>a</think>", 0, 0),
    ("<answer>b</answer>", 0, 0),
    ("<think></think><answer>b</answer>", 0, 0),
    ("<think>a</think><answer>  </answer>", 0, 0),
    ("<think>a</think><answer>b</answer><answer>c</answer>", 0, 0),
    ("<think>a<think>b</think><answer>c</answer>", 0, 0),
    ("<think>a</think><answer>b", 0, 0),
    ("", 0, 0),
    ("plain text answer 42", 0, 0),
]


@pytest.mark.parametrize("text,strict,lenient", CASES)
def test_format(text, strict, lenient):
    assert check_format(text, strict=True).score == strict
    assert check_format(text, strict=False).score == lenient
    assert check_format(text).reasons
