"""Language consistency (DeepSeek-R1): the share of the reasoning written in the target language.

Measured by writing system, which needs no model and cannot be fooled by a few foreign words in
the prompt: Latin-script languages count Latin words, Chinese counts Han characters, Japanese
Han + kana, and so on. Digits, symbols and LaTeX commands count for no side. A CJK character is
one unit, as a word is one unit in spaced scripts. It cannot tell English from French; that
residual mixing is rare in practice and would need a language-ID model.
"""
from __future__ import annotations

import re
import unicodedata

from r1mega.rewards.registry import RewardResult, register_reward

_LATIN = {"en", "fr", "de", "es", "it", "pt", "nl", "sv", "pl", "tr", "vi", "id"}
_SCRIPTS = {"zh": {"CJK"}, "ja": {"CJK", "HIRAGANA", "KATAKANA"}, "ko": {"HANGUL"},
            "ru": {"CYRILLIC"}, "uk": {"CYRILLIC"}, "ar": {"ARABIC"}, "hi": {"DEVANAGARI"},
            "el": {"GREEK"}, "he": {"HEBREW"}, "th": {"THAI"}}
_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)
_LATEX_CMD = re.compile(r"\\[A-Za-z]+")
_SEPARATE = {"CJK", "HIRAGANA", "KATAKANA", "THAI"}  # unspaced scripts: one char, one unit


def _script(ch: str) -> str:
    name = unicodedata.name(ch, "")
    for s in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "CYRILLIC", "ARABIC", "DEVANAGARI",
              "GREEK", "HEBREW", "THAI", "LATIN"):
        if name.startswith(s) or f" {s} " in f" {name} ".replace("-", " "):
            return s
    return "OTHER"


def script_units(text: str) -> list[str]:
    """Script of each unit of text: a run of letters in one spaced script, or one CJK char."""
    units, run = [], None
    for ch in _LATEX_CMD.sub(" ", text):
        s = _script(ch) if ch.isalpha() else None
        if s in _SEPARATE:
            units.append(s)
            run = None
        elif s is None or s == "OTHER":
            run = None
        elif s != run:
            units.append(s)
            run = s
    return units


def target_share(text: str, language: str) -> float | None:
    want = {"LATIN"} if language in _LATIN else _SCRIPTS.get(language)
    if want is None:
        raise ValueError(f"rewards.target_language='{language}' is not known; use one of "
                         f"{sorted(_LATIN | set(_SCRIPTS))}")
    units = script_units(text)
    if not units:
        return None
    return sum(u in want for u in units) / len(units)


@register_reward("language_consistency")
def language_consistency(completion: str, reference: dict, **context) -> RewardResult:
    language = reference.get("language") or context.get("target_language", "en")
    blocks = _THINK.findall(completion)
    text = "\n".join(blocks) if blocks else completion
    share = target_share(text, language)
    if share is None:
        return RewardResult(0.0, ["no words in the reasoning"])
    return RewardResult(share, [f"{share:.0%} of the reasoning is in '{language}' script"])
