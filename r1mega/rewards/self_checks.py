"""Self-checks of built-in rewards whose own modules declare none (see ``register_reward``).

A self-check proves, on known cases, that a reward can run on this machine before any score of
it is trusted: a missing package or a broken parser would otherwise score every completion 0 and
training would learn nothing and say nothing. Each check is cheap (tens of ms once warm).
"""
from __future__ import annotations

from r1mega.rewards.registry import RewardSetupError, get_reward, register_self_check


def check_math_verify(**context) -> None:
    """math-verify imports, parses a known pair and tells equal from different; then the reward
    itself scores an answer identical to its reference 1 and a different number 0."""
    try:
        from math_verify import parse, verify
    except ImportError as exc:
        raise RewardSetupError(f"math-verify is not importable ({exc}): pip install "
                               "'math-verify[antlr4_13_2]'") from None
    half, same, third = parse(r"$\frac{1}{2}$"), parse("$0.5$"), parse(r"$\frac{1}{3}$")
    if not (half and same and third):
        raise RewardSetupError("math-verify parses nothing from $\\frac{1}{2}$, $0.5$ or "
                               "$\\frac{1}{3}$ (its LaTeX parser is missing: install "
                               "'math-verify[antlr4_13_2]')")
    if not verify(half, same) or verify(half, third):
        raise RewardSetupError("math-verify does not find 1/2 = 0.5 != 1/3")
    reward = get_reward("math_accuracy")
    ref = {"answer": r"\frac{1}{2}"}
    good = reward(r"<think>half</think><answer>\frac{1}{2}</answer>", ref, **context)
    bad = reward("<think>guess</think><answer>7</answer>", ref, **context)
    if good.score != 1.0 or bad.score != 0.0:
        raise RewardSetupError(f"math_accuracy scores a known-right answer {good.score} "
                               f"({good.reasons}) and a known-wrong one {bad.score} ({bad.reasons})")


register_self_check("math_accuracy", check_math_verify)
