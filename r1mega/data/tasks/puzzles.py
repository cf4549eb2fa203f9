"""Countdown and river-crossing puzzles, generated solvable, with references the rewards check.

Countdown options: ``count`` (numbers given, default 4), ``max_value`` (default 100),
``require_all`` (default False: each number at most once, the issue's rule). The target is the
value of a random expression over a subset of the numbers, so a solution exists (kept in
metadata). River-crossing options: ``extra_items`` (items besides the rower, default 3),
``capacity`` (boat places including the rower, default 2), ``classic`` (default: one item in four
is the wolf-goat-cabbage original). Variants are checked solvable by breadth-first search.
"""
from __future__ import annotations

import itertools
import random
from collections import deque
from fractions import Fraction

from r1mega.data.datasets import PromptRecord

_ANSWER_HINT = "Show your reasoning in <think> </think> and the final answer in <answer> </answer>."


def make_countdown(rng: random.Random, count: int = 4, max_value: int = 100,
                   require_all: bool = False) -> PromptRecord:
    if count < 2 or max_value < 2:
        raise TypeError("countdown needs count >= 2 and max_value >= 2")
    while True:
        numbers = [rng.randint(1, max_value) for _ in range(count)]
        k = count if require_all else rng.randint(2, count)
        chosen = rng.sample(numbers, k)
        value, text = Fraction(chosen[0]), str(chosen[0])
        for n in chosen[1:]:
            op = rng.choice("+-*/")
            if op == "/" and (n == 0 or (value / n).denominator != 1):
                op = "+"
            if op == "-" and value - n <= 0:
                op = "+"
            if op == "*" and value * n > 10 * max_value ** 2:
                op = "+"
            value = {"+": value + n, "-": value - n, "*": value * n, "/": value / n}[op]
            text = f"({text}){op}{n}" if op in "*/" and any(c in text for c in "+-") else f"{text}{op}{n}"
        if value.denominator == 1 and value > 0:
            break
    target = int(value)
    rule = "each exactly once" if require_all else "each at most once"
    prompt = (f"Using the numbers {numbers}, write an arithmetic expression that equals {target}. "
              f"Use + - * / and parentheses; use the numbers {rule}. {_ANSWER_HINT}")
    ref = {"numbers": numbers, "target": target, "require_all": require_all}
    return PromptRecord(prompt, "countdown", ref, {"solution": text})


_CLASSIC = ("farmer", ["wolf", "goat", "cabbage"], [["wolf", "goat"], ["goat", "cabbage"]])
_ROWERS = ["farmer", "shepherd", "ferryman", "boatman"]
_THINGS = ["wolf", "goat", "cabbage", "fox", "chicken", "grain", "dog", "cat", "mouse", "cheese",
           "lion", "sheep", "hay"]


def solve_river_crossing(items: list, rowers: list, forbidden: list, capacity: int):
    """Shortest list of boat loads, or None. States: (frozenset on the left, boat on the left)."""
    everything = frozenset(items)
    bad = [frozenset(p) for p in forbidden]
    rowers = set(rowers)

    def safe(bank):
        return bool(bank & rowers) or not any(p <= bank for p in bad)

    start = (everything, True)
    prev = {start: None}
    queue = deque([start])
    while queue:
        left, boat_left = state = queue.popleft()
        if not left:
            moves = []
            while prev[state] is not None:
                state, load = prev[state]
                moves.append(sorted(load))
            return moves[::-1]
        here = left if boat_left else everything - left
        for size in range(1, capacity + 1):
            for load in itertools.combinations(sorted(here), size):
                load = frozenset(load)
                if not load & rowers:
                    continue
                new_left = left - load if boat_left else left | load
                if not (safe(new_left) and safe(everything - new_left)):
                    continue
                nxt = (new_left, not boat_left)
                if nxt not in prev:
                    prev[nxt] = (state, load)
                    queue.append(nxt)
    return None


def make_river_crossing(rng: random.Random, extra_items: int = 3, capacity: int = 2,
                        classic: bool | None = None) -> PromptRecord:
    if extra_items < 1 or capacity < 2:
        raise TypeError("river crossing needs extra_items >= 1 and capacity >= 2")
    use_classic = (rng.random() < 0.25) if classic is None else classic
    while True:
        if use_classic and extra_items == 3 and capacity == 2:
            rower, things, forbidden = _CLASSIC
        else:
            rower = rng.choice(_ROWERS)
            things = rng.sample(_THINGS, extra_items)
            pairs = list(itertools.combinations(things, 2))
            forbidden = [list(p) for p in rng.sample(pairs, rng.randint(1, min(3, len(pairs))))]
        items = [rower] + list(things)
        solution = solve_river_crossing(items, [rower], forbidden, capacity)
        if solution is not None:
            break
        use_classic = False
    rules = "; ".join(f"the {a} cannot be left with the {b} without the {rower}"
                      for a, b in forbidden)
    prompt = (f"A {rower} must take {', '.join(things)} across a river. The boat holds at most "
              f"{capacity} (including the {rower}), and only the {rower} can row. Rules: {rules}. "
              f"Give the crossings in order, one boat load per line (e.g. '{rower}, {things[0]}'). "
              f"{_ANSWER_HINT}")
    ref = {"items": items, "rowers": [rower], "forbidden": forbidden, "capacity": capacity}
    return PromptRecord(prompt, "river_crossing", ref, {"solution": solution})
