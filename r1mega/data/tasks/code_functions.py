"""Small function-writing tasks with unit tests computed by a trusted reference implementation.

Each family has a name, a docstring, a generator of inputs and a reference solution; the tests
are module-level asserts over inputs drawn with the item's seed, plus the family's edge cases
(``factorial`` must give 1 for 0 and raise ``ValueError`` for negatives, the seed's example).
"""
from __future__ import annotations

import math
import random

from r1mega.data.datasets import PromptRecord


def _factorial_tests(rng):
    cases = [0, 1] + rng.sample(range(2, 15), 4)
    lines = [f"assert factorial({n}) == {math.factorial(n)}" for n in cases]
    neg = -rng.randint(1, 9)
    lines += ["try:", f"    factorial({neg})", "    raise AssertionError('no ValueError for "
              f"{neg}')", "except ValueError:", "    pass"]
    return lines


def _cases(fn, name, inputs):
    return [f"assert {name}({', '.join(map(repr, args))}) == {fn(*args)!r}" for args in inputs]


def _words(rng, k):
    pool = ["apple", "river", "stone", "cloud", "tiger", "level", "noon", "moon", "radar", "sky"]
    return " ".join(rng.choice(pool) for _ in range(k))


_FAMILIES = {
    "factorial": ("factorial(n)", "returns n! for an integer n >= 0 and raises ValueError for "
                  "negative n", None),
    "sum_digits": ("sum_digits(n)", "returns the sum of the decimal digits of the integer n "
                   "(ignoring a minus sign)", lambda n: sum(int(c) for c in str(abs(n)))),
    "is_palindrome": ("is_palindrome(s)", "returns True when the string s reads the same "
                      "backwards, ignoring case and spaces",
                      lambda s: s.replace(" ", "").lower() == s.replace(" ", "").lower()[::-1]),
    "count_vowels": ("count_vowels(s)", "returns how many of the characters of s are vowels "
                     "(a, e, i, o, u, either case)", lambda s: sum(c in "aeiouAEIOU" for c in s)),
    "gcd": ("gcd(a, b)", "returns the greatest common divisor of two non-negative integers "
            "(gcd(0, 0) == 0)", math.gcd),
    "reverse_words": ("reverse_words(s)", "returns the words of s in reverse order, joined by "
                      "single spaces", lambda s: " ".join(s.split()[::-1])),
}


def _inputs(name, rng):
    if name == "sum_digits":
        return [(0,)] + [(rng.randint(-10 ** 6, 10 ** 6),) for _ in range(5)]
    if name == "is_palindrome":
        return [("",), ("Never odd or even",), ("ab",)] + [(_words(rng, 1),) for _ in range(4)]
    if name == "count_vowels":
        return [("",), ("xyz",)] + [(_words(rng, rng.randint(1, 4)).title(),) for _ in range(4)]
    if name == "gcd":
        return [(0, 0), (0, 7)] + [(rng.randint(0, 500), rng.randint(1, 500)) for _ in range(5)]
    if name == "reverse_words":
        return [("one",)] + [(_words(rng, rng.randint(2, 5)),) for _ in range(4)]
    raise KeyError(name)


def make_item(rng: random.Random, families: list | None = None) -> PromptRecord:
    names = families or sorted(_FAMILIES)
    unknown = set(names) - set(_FAMILIES)
    if unknown:
        raise TypeError(f"unknown code families {sorted(unknown)}; known: {sorted(_FAMILIES)}")
    name = rng.choice(names)
    signature, doc, fn = _FAMILIES[name]
    lines = _factorial_tests(rng) if name == "factorial" else _cases(fn, name, _inputs(name, rng))
    prompt = (f"Write a Python function `{signature}` that {doc}. Put the code in a ```python "
              f"block inside <answer> </answer>, after your reasoning in <think> </think>.")
    ref = {"tests": "\n".join(lines) + "\n", "entry_point": name}
    return PromptRecord(prompt, "code", ref, {"family": name})
