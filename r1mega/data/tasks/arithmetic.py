"""Arithmetic with configurable difficulty: ``23+58=`` → ``81``.

Options (``data.task_options``): ``digits`` (max digits per operand, default 2), ``operators``
(a string from ``+-*/``, default ``+-``), ``terms`` (operands, default 2), ``style``
(``bare``: ``23+58=`` for tiny char models; ``question``: ``What is 23 + 58?``). Division is
generated exactly (the dividend is a multiple), so every answer is an integer that both
``math_accuracy`` and the cheap ``exact_match`` check.
"""
from __future__ import annotations

import random

from r1mega.data.datasets import PromptRecord


def make_item(rng: random.Random, digits: int = 2, operators: str = "+-", terms: int = 2,
              style: str = "bare") -> PromptRecord:
    if digits < 1 or terms < 2 or not operators or set(operators) - set("+-*/"):
        raise TypeError("need digits >= 1, terms >= 2, operators drawn from '+-*/'")
    hi = 10 ** digits - 1
    nums = [rng.randint(0, hi)]
    ops = []
    for _ in range(terms - 1):
        op = rng.choice(operators)
        if op == "/":
            # Left-to-right evaluation with exact division needs the running value known, so
            # division is only drawn as the first operator (a / b, b | a).
            if ops:
                op = rng.choice([o for o in operators if o != "/"] or ["+"])
            else:
                b = rng.randint(1, max(1, hi // 10) if digits > 1 else 9)
                nums[0] = b * rng.randint(0, max(1, hi // b))
                nums.append(b)
                ops.append(op)
                continue
        ops.append(op)
        nums.append(rng.randint(0, hi))
    expr = str(nums[0])
    for op, n in zip(ops, nums[1:]):
        expr += op + str(n)
    # Python's precedence is the usual one; // keeps division exact and integer.
    value = eval(expr.replace("/", "//"), {"__builtins__": {}})  # noqa: S307 -- digits and +-*/ only
    if style == "bare":
        prompt = expr + "="
    elif style == "question":
        spaced = expr
        for o in "+-*/":
            spaced = spaced.replace(o, f" {o} ")
        prompt = f"What is {spaced}?"
    else:
        raise TypeError(f"style must be 'bare' or 'question', got {style!r}")
    return PromptRecord(prompt, "arithmetic", {"answer": str(value)}, {"expression": expr})
