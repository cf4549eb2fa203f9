"""Verifiers for puzzles whose answers are checked by simulation, not by comparison.

**Countdown** — reference ``{"numbers": [..], "target": N, "require_all": false}``. The answer is
an arithmetic expression (``+ - * /`` and parentheses, optionally followed by ``= N``). Each given
number may be used at most once (exactly once with ``require_all``, the reasoning-gym rule); the
value is computed with exact fractions, so ``6/4*4`` is 6, not 5.999….

**River crossing** — reference ``{"items": [...], "rowers": [...], "forbidden": [[a, b], ...],
"capacity": 2}``. Everything starts on the left bank with the boat; the answer is the sequence of
boat loads, as JSON (``[["farmer", "goat"], ["farmer"], ...]``) or one load per line / ``;``
(``farmer, goat``). Each load sits on the boat's bank, holds 1..capacity items including at least
one rower, and after each crossing no bank without a rower may hold a forbidden pair. Solved when
everything is on the right bank. ``rowers`` defaults to the first item (the farmer).
"""
from __future__ import annotations

import ast
import json
import re
from collections import Counter
from fractions import Fraction

from r1mega.rewards.registry import RewardResult, extract_answer, register_reward, require

_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
        ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


class PuzzleError(ValueError):
    pass


def _eval_countdown(node: ast.AST, used: list) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval_countdown(node.body, used)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval_countdown(node.left, used), _eval_countdown(node.right, used)
        if isinstance(node.op, ast.Div) and right == 0:
            raise PuzzleError("division by zero")
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval_countdown(node.operand, used)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    raise PuzzleError(f"only integers, + - * / and parentheses are allowed, not "
                      f"{ast.dump(node)[:60]}")


def check_countdown(expression: str, numbers: list, target, require_all: bool = False) -> tuple[bool, str]:
    text = expression.strip().replace("×", "*").replace("÷", "/").replace("−", "-")
    if "=" in text:
        text = text.split("=")[0]  # "expr = target" is accepted; the left side is what counts
    if len(text) > 500:
        return False, "expression longer than 500 characters"
    try:
        tree = ast.parse(text, mode="eval")
        used: list = []
        value = _eval_countdown(tree, used)
    except (SyntaxError, PuzzleError, RecursionError, ValueError) as exc:
        return False, f"invalid expression {text[:60]!r}: {exc}"
    have, want = Counter(used), Counter(int(n) for n in numbers)
    extra = have - want
    if extra:
        return False, f"uses numbers not given (or too often): {sorted(extra.elements())}"
    if require_all and have != want:
        return False, f"must use every number; unused: {sorted((want - have).elements())}"
    if value != Fraction(target):
        return False, f"evaluates to {value} (float {float(value):.6g}), not {target}"
    return True, f"{text.strip()} = {target}"


@register_reward("countdown")
def countdown_reward(completion: str, reference: dict, **context) -> RewardResult:
    require(reference, "numbers", "target", reward="countdown")
    answer = extract_answer(completion, reference.get("answer_pattern"))
    if answer is None:
        return RewardResult(0.0, ["no <answer> block"])
    ok, why = check_countdown(answer, reference["numbers"], reference["target"],
                              bool(reference.get("require_all", False)))
    return RewardResult(1.0 if ok else 0.0, [why])


def parse_moves(text: str) -> list[list[str]]:
    """JSON list of lists, or one load per line/semicolon with items split by , + & / 'and'."""
    text = text.strip()
    if text.startswith("["):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, list):
            return [[str(x).strip().lower() for x in (m if isinstance(m, list) else [m])]
                    for m in data]
    loads = []
    for part in re.split(r"[;\n]+", text):
        part = re.sub(r"^\s*(?:\d+[.):]|-|\*)\s*", "", part)  # list numbering
        items = [x.strip().lower() for x in re.split(r",|\+|&|/|\band\b", part) if x.strip()]
        if items:
            loads.append(items)
    return loads


def check_river_crossing(moves: list[list[str]], items: list, rowers: list | None = None,
                         forbidden: list | None = None, capacity: int = 2) -> tuple[bool, str]:
    items = [str(i).lower() for i in items]
    rowers = {str(r).lower() for r in (rowers or items[:1])}
    forbidden = [{str(a).lower(), str(b).lower()} for a, b in (forbidden or [])]
    left, right = set(items), set()
    boat_left = True
    if not moves:
        return False, "no moves"
    for step, load in enumerate(moves, 1):
        cargo = set(load)
        here, there = (left, right) if boat_left else (right, left)
        unknown = cargo - set(items)
        if unknown:
            return False, f"move {step}: unknown item(s) {sorted(unknown)}"
        if len(cargo) != len(load):
            return False, f"move {step}: an item is listed twice"
        if not cargo or len(cargo) > capacity:
            return False, f"move {step}: the boat carries 1..{capacity}, got {len(cargo)}"
        if not cargo <= here:
            return False, f"move {step}: {sorted(cargo - here)} not on the boat's bank"
        if not cargo & rowers:
            return False, f"move {step}: nobody in {sorted(rowers)} rows the boat"
        here -= cargo
        there |= cargo
        boat_left = not boat_left
        for bank, name in ((left, "left"), (right, "right")):
            if bank & rowers:
                continue
            for pair in forbidden:
                if pair <= bank:
                    return False, f"move {step}: {sorted(pair)} left alone on the {name} bank"
    if left:
        return False, f"after {len(moves)} moves {sorted(left)} are still on the left bank"
    return True, f"solved in {len(moves)} moves"


@register_reward("river_crossing")
def river_crossing_reward(completion: str, reference: dict, **context) -> RewardResult:
    require(reference, "items", reward="river_crossing")
    answer = extract_answer(completion, reference.get("answer_pattern"))
    if answer is None:
        return RewardResult(0.0, ["no <answer> block"])
    ok, why = check_river_crossing(parse_moves(answer), reference["items"],
                                   reference.get("rowers"), reference.get("forbidden"),
                                   int(reference.get("capacity", 2)))
    return RewardResult(1.0 if ok else 0.0, [why])
