"""The reward registry: the one true extension point of the rewards package.

A reward is a plain function ``(completion: str, reference: dict, **context) -> RewardResult``.
``context`` carries what the scorer knows beyond the reference (``num_tokens``, ``truncated``,
``max_new_tokens`` and the reward options from ``cfg.rewards``); rewards take what they need and
ignore the rest, so adding a context key never breaks an existing reward.

A reward may also register a ``warmup``: a no-argument function that exercises its lazily
initialised paths (math-verify builds its LaTeX parser and sympy its simplification machinery on
first use, once per process). Reward workers run the warm-ups of the rewards they may be asked
for before they take work, so that cost is not paid on a step's clock.
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

RewardFn = Callable[..., "RewardResult"]
_REGISTRY: dict[str, RewardFn] = {}
_WARMUPS: dict[str, Callable[[], None]] = {}
_SELF_CHECKS: dict[str, Callable[..., None]] = {}


class MissingReference(ValueError):
    """The reference lacks a field the reward needs (or holds it in a form it cannot use). A
    data bug, not a wrong answer: the scorer reports it in the item's ``error``, not as a 0."""


class RewardSetupError(Exception):
    """A reward cannot run at all here (a missing package, a sandbox the kernel refuses). Not a
    RuntimeError, so that nothing that handles runtime failures (the trainer's dead-peer exit)
    mistakes it for one."""


def require(reference: dict, *fields: str, reward: str) -> None:
    """Raise :class:`MissingReference` naming every absent field of ``reference``."""
    missing = [f for f in fields if reference.get(f) in (None, "")]
    if missing:
        raise MissingReference(f"{reward}: the reference has no {', '.join(map(repr, missing))} "
                               f"field; fix the data row (fields present: {sorted(reference)})")


@dataclass
class RewardResult:
    score: float
    # Short human-readable notes on why (what was extracted, which rule failed).
    reasons: list = field(default_factory=list)


def register_reward(name: str, warmup: Callable[[], None] | None = None,
                    self_check: Callable[..., None] | None = None
                    ) -> Callable[[RewardFn], RewardFn]:
    """``self_check(**context)`` proves the reward can run here (its packages, its sandbox) on
    known cases and raises :class:`RewardSetupError` naming the cause when it cannot; the scorer
    runs it once before scoring (:meth:`RewardScorer.self_check`)."""

    def deco(fn: RewardFn) -> RewardFn:
        old = _REGISTRY.get(name)
        # The same function imported under two module names (a script run as __main__ and
        # imported, pytest's rootdir imports) is the same reward, not a clash.
        same = old is not None and (old.__qualname__, old.__code__.co_filename) == (
            fn.__qualname__, fn.__code__.co_filename)
        if old is not None and old is not fn and not same:
            raise ValueError(f"Reward '{name}' is registered twice ({_REGISTRY[name].__module__} "
                             f"and {fn.__module__}); pick another name.")
        _REGISTRY[name] = fn
        if warmup is not None:
            _WARMUPS[name] = warmup
        if self_check is not None:
            _SELF_CHECKS[name] = self_check
        return fn

    return deco


def warm_up(names, budget_s: float = 20.0) -> list[str]:
    """Run the registered warm-ups of ``names`` (unknown names and rewards without one are
    skipped), stopping once ``budget_s`` has passed. A failing warm-up is reported on stderr and
    otherwise ignored: the reward reports its own errors when it scores. Returns the names warmed."""
    _load_builtin()
    t0, done = time.monotonic(), []
    for name in dict.fromkeys(names):
        fn = _WARMUPS.get(name)
        if fn is None:
            continue
        if time.monotonic() - t0 > budget_s:
            break
        try:
            fn()
            done.append(name)
        except Exception as exc:  # noqa: BLE001 -- a warm-up must never stop a worker
            print(f"[r1mega] reward '{name}' warm-up failed: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
    return done


def register_self_check(name: str, fn: Callable[..., None]) -> None:
    """Add the self-check of a reward registered elsewhere (see ``register_reward``)."""
    _SELF_CHECKS[name] = fn


def run_self_check(name: str, **context) -> bool:
    """Run ``name``'s self-check; False when it has none. Raises :class:`RewardSetupError`."""
    _load_builtin()
    fn = _SELF_CHECKS.get(name)
    if fn is None:
        return False
    try:
        fn(**context)
    except RewardSetupError:
        raise
    except Exception as exc:  # noqa: BLE001 -- any failure of a check means the reward cannot run
        raise RewardSetupError(f"{type(exc).__name__}: {exc}") from None
    return True


def _load_builtin() -> None:
    # Imported for their @register_reward side effect; kept here so a plain
    # ``get_reward("math_accuracy")`` works without the caller knowing module names.
    from r1mega.rewards import code, format, language, length, math, puzzles, reasoning_gym  # noqa: F401
    from r1mega.rewards import reward_model  # noqa: F401
    from r1mega.rewards import self_checks  # noqa: F401 -- registers the built-in self-checks


def get_reward(name: str) -> RewardFn:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"Unknown reward '{name}' in rewards.spec.{hint} Known: "
                       f"{sorted(_REGISTRY)}.") from None


def list_rewards() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(completion: str, pattern: str | None = None) -> str | None:
    """The text of the LAST ``<answer>…</answer>`` block (or the last match of ``pattern``'s first
    group); None when there is none. Last, because a model that restates the question's example
    answer first and then its own should be judged on its own."""
    if pattern:
        found = re.findall(pattern, completion, flags=re.DOTALL)
        if not found:
            return None
        last = found[-1]
        return (last[0] if isinstance(last, tuple) else last).strip()
    found = _ANSWER_RE.findall(completion)
    return found[-1].strip() if found else None
