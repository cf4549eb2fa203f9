"""r1mega/switches.py: the environment switches of kernel choices."""
from __future__ import annotations

import pytest

from r1mega import switches


def test_choice_reads_the_value_and_defaults_when_unset(monkeypatch):
    meanings = {"rows": "heads on M", "keys": "keys on M"}
    monkeypatch.delenv("R1MEGA_TEST_SWITCH", raising=False)
    assert switches.choice("R1MEGA_TEST_SWITCH", "rows", meanings) == "rows"
    monkeypatch.setenv("R1MEGA_TEST_SWITCH", "keys")
    assert switches.choice("R1MEGA_TEST_SWITCH", "rows", meanings) == "keys"


def test_a_value_outside_the_choices_is_an_error_naming_each(monkeypatch):
    monkeypatch.setenv("R1MEGA_TEST_SWITCH", "Keys")
    with pytest.raises(ValueError) as err:
        switches.choice("R1MEGA_TEST_SWITCH", "rows", {"rows": "heads on M", "keys": "keys on M"})
    assert str(err.value) == ("R1MEGA_TEST_SWITCH='Keys': expected 'rows' (heads on M, the "
                              "default) or 'keys' (keys on M)")


def test_flags_are_zero_or_one(monkeypatch):
    monkeypatch.delenv("R1MEGA_TEST_SWITCH", raising=False)
    assert switches.flag("R1MEGA_TEST_SWITCH", True, "x") is True
    assert switches.flag("R1MEGA_TEST_SWITCH", False, "x") is False
    monkeypatch.setenv("R1MEGA_TEST_SWITCH", "0")
    assert switches.flag("R1MEGA_TEST_SWITCH", True, "x") is False
    monkeypatch.setenv("R1MEGA_TEST_SWITCH", "true")
    with pytest.raises(ValueError, match="R1MEGA_TEST_SWITCH='true': expected '1' \\(x\\) or '0'"):
        switches.flag("R1MEGA_TEST_SWITCH", False, "x")
