"""Countdown and river-crossing verifiers, and agreement with reasoning-gym's own verifier."""
import random

import pytest

from r1mega.data.tasks.puzzles import make_countdown, make_river_crossing, solve_river_crossing
from r1mega.rewards.puzzles import check_countdown, check_river_crossing, parse_moves

CLASSIC = dict(items=["farmer", "wolf", "goat", "cabbage"], rowers=["farmer"],
               forbidden=[["wolf", "goat"], ["goat", "cabbage"]], capacity=2)
SOLUTION = "farmer, goat\nfarmer\nfarmer, wolf\nfarmer, goat\nfarmer, cabbage\nfarmer\nfarmer, goat"


def test_countdown_rules():
    nums = [25, 5, 4, 7]
    assert check_countdown("(25 - 5) * 4", nums, 80)[0]
    assert check_countdown("(25-5)*4 = 80", nums, 80)[0]
    assert check_countdown("25 * 4 / 5 * 7", nums, 140)[0]
    assert not check_countdown("(25 - 5) * 4 * 1", nums, 80)[0]      # 1 was not given
    assert not check_countdown("25 + 25 + 25 + 5", nums, 80)[0]      # 25 used three times
    assert not check_countdown("(25 - 5) * 4", nums, 81)[0]          # wrong value
    assert not check_countdown("25 / (5 - 5)", nums, 0)[0]           # 5 twice, division by zero
    assert not check_countdown("__import__('os')", nums, 0)[0]      # only arithmetic
    assert not check_countdown("2 ** 5", [2, 5], 32)[0]
    assert check_countdown("7 / 4 * 4", [7, 4, 4], 7)[0]            # exact fractions
    assert not check_countdown("(25 - 5) * 4", nums, 80, require_all=True)[0]
    assert check_countdown("(25 - 5) * 4 + 7 - 7", nums + [7], 80, require_all=True)[0]


def test_river_crossing_classic():
    assert check_river_crossing(parse_moves(SOLUTION), **CLASSIC)[0]
    assert check_river_crossing(parse_moves('[["farmer","goat"],["farmer"],["farmer","cabbage"],'
                                            '["farmer","goat"],["farmer","wolf"],["farmer"],'
                                            '["farmer","goat"]]'), **CLASSIC)[0]
    ok, why = check_river_crossing(parse_moves("farmer, wolf\nfarmer\nfarmer, goat"), **CLASSIC)
    assert not ok and "goat" in why and "cabbage" in why
    assert not check_river_crossing(parse_moves("wolf, goat"), **CLASSIC)[0]           # no rower
    assert not check_river_crossing(parse_moves("farmer, wolf, goat"), **CLASSIC)[0]   # too many
    assert not check_river_crossing(parse_moves("farmer, goat\nfarmer, goat"), **CLASSIC)[0]
    assert not check_river_crossing(parse_moves(SOLUTION)[:-1], **CLASSIC)[0]          # unfinished
    assert not check_river_crossing(parse_moves("farmer, dragon"), **CLASSIC)[0]
    assert not check_river_crossing([], **CLASSIC)[0]


def test_generated_river_variants_are_solvable_and_checked():
    for i in range(20):
        rec = make_river_crossing(random.Random(i), extra_items=random.Random(i).randint(2, 4),
                                  capacity=2 + i % 2)
        ref = rec.reference
        moves = rec.metadata["solution"]
        assert check_river_crossing(moves, ref["items"], ref["rowers"], ref["forbidden"],
                                    ref["capacity"])[0]
        text = "\n".join(", ".join(m) for m in moves)
        assert check_river_crossing(parse_moves(text), ref["items"], ref["rowers"],
                                    ref["forbidden"], ref["capacity"])[0]
    assert solve_river_crossing(["farmer", "a", "b", "c"], ["farmer"],
                                [["a", "b"], ["b", "c"], ["a", "c"]], 2) is None


def test_generated_countdown_items_are_solvable():
    for i in range(50):
        rec = make_countdown(random.Random(i))
        ref = rec.reference
        assert check_countdown(rec.metadata["solution"], ref["numbers"], ref["target"])[0]


def _mutations(expr: str, rng: random.Random):
    yield expr
    ops = [i for i, c in enumerate(expr) if c in "+-*/"]
    if ops:
        i = rng.choice(ops)
        yield expr[:i] + rng.choice([o for o in "+-*" if o != expr[i]]) + expr[i + 1:]
    digits = [i for i, c in enumerate(expr) if c.isdigit()]
    i = rng.choice(digits)
    yield expr[:i] + str((int(expr[i]) + 1) % 10) + expr[i + 1:]
    yield expr + " + 1"
    yield f"({expr}) * 2"
    yield "(" + expr + ")"


def test_countdown_agrees_with_reasoning_gym():
    reasoning_gym = pytest.importorskip("reasoning_gym")
    ds = reasoning_gym.create_dataset("countdown", size=40, seed=7)
    rng = random.Random(0)
    checked = agree_pos = 0
    for entry in ds:
        meta = entry["metadata"]
        for answer in _mutations(entry["answer"], rng):
            theirs = ds.score_answer(answer, entry) == 1.0
            ours = check_countdown(answer, meta["numbers"], meta["target"], require_all=True)[0]
            assert ours == theirs, (answer, meta["numbers"], meta["target"], ours, theirs)
            checked += 1
            agree_pos += ours
    assert checked >= 200 and agree_pos >= 40
