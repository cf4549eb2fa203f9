"""Environment switches for kernel choices (``R1MEGA_...``): read and checked in one place.

Kernel variants that a GPU run must be able to A/B without a config change (a bench process per
arm) are environment variables. A value that is not one of the choices is an error naming the
variable and what each choice means, never a silent default.
"""
from __future__ import annotations

import contextlib
import os


def choice(name: str, default: str, meanings: dict) -> str:
    """The value of ``name`` (``default`` when unset), one of ``meanings``' keys."""
    value = os.environ.get(name, default)
    if value not in meanings:
        options = " or ".join(f"{k!r} ({v}{', the default' if k == default else ''})"
                              for k, v in meanings.items())
        raise ValueError(f"{name}={value!r}: expected {options}")
    return value


def flag(name: str, default: bool, meaning: str) -> bool:
    """The 0/1 switch ``name``: 1 turns on ``meaning``."""
    return choice(name, "1" if default else "0", {"1": meaning, "0": "off"}) == "1"


@contextlib.contextmanager
def overridden(module, name: str, value):
    """``module.name`` set to ``value`` inside the block (benches and tests; runs read the
    environment at import)."""
    before = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, before)


@contextlib.contextmanager
def environment(pairs: dict):
    """The environment variables ``pairs`` set inside the block, as they were after it (a bench
    row built with switches that its code reads from the environment)."""
    before = {k: os.environ.get(k) for k in pairs}
    os.environ.update(pairs)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
