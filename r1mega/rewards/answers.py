"""What counts as a final answer: the answer's text, whether it is a value or an expression, and
whether it merely restates the question.

A policy optimises what the reward pays for. Handing a whole completion to a symbolic checker
pays for ``76 * 16`` as if it were ``1216`` (the checker evaluates it), and a policy finds that
within about 120 steps (SmolLM2, lr 1e-5). So a numeric reference is only matched by a *number*:
a literal, a LaTeX number, with thousands separators, currency and unit words allowed around it,
never an arithmetic expression. These are pure functions on strings; ``math.py`` and the hack detectors
use them, the strict evaluation grader (``strict.py``) deliberately does not.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

from r1mega.rewards.registry import extract_answer

ANSWER_FORMS = ("auto", "number", "expression")

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_NUMBER_RE = re.compile(rf"[-+]?(?:{_NUM})(?:[eE][-+]?\d+)?")
_FRAC_RE = re.compile(r"([-+]?)\\[dt]?frac\s*\{\s*([-+]?\d+)\s*\}\s*\{\s*([-+]?\d+)\s*\}")
# An operator between two operands: 76*16, 1200+16, 76 \times 16, (17-5)*3, 2^10, 8 \div 2.
_OPERATOR = r"(?:[-+*/^×÷·x]|\\times|\\cdot|\\div|\\ast|\\pm)"
_OPERAND = r"(?:\d|\)|\}|\.)"
_EXPRESSION_RE = re.compile(rf"{_OPERAND}\s*{_OPERATOR}\s*[-+(\\{{]*\s*(?:\d|\(|\\frac|\\sqrt)")
_CURRENCY = re.compile(r"^(?:\\\$|\$|€|£|¥|USD|EUR|US\$|\\text\{\s*\\\$\s*\})\s*")
_UNIT_WORDS = re.compile(r"^(?:\s*(?:\\text\{[^{}]*\}|\\mathrm\{[^{}]*\}|\\%|%|°|\^\{?\\circ\}?|"
                         r"[A-Za-z][A-Za-z'.]*\.?))*\s*[.!]?\s*$")
_PROSE_PREFIX = re.compile(r"^(?:[A-Za-z][A-Za-z' ]*(?:is|are|=|:|equals)\s*[:=]?\s*)",
                           re.IGNORECASE)


@dataclass(frozen=True)
class Number:
    value: Fraction
    percent: bool = False

    def equals(self, other: "Number") -> bool:
        if self.value == other.value:
            return True
        # "50%" and "0.5" name the same quantity; "50" against "50%" is caught by the first test.
        if self.percent != other.percent:
            pct, plain = (self, other) if self.percent else (other, self)
            return pct.value / 100 == plain.value
        return False


def boxed_contents(text: str) -> Optional[str]:
    """The content of the LAST ``\\boxed{...}`` (braces balanced), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i = depth = starts[-1]
    depth = 1
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[starts[-1]:i - 1] if depth == 0 else None


def strip_math_delimiters(text: str) -> str:
    t = text.strip()
    for left, right in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
        if t.startswith(left) and t.endswith(right) and len(t) >= len(left) + len(right):
            t = t[len(left):len(t) - len(right)].strip()
    inner = boxed_contents(t)
    return t if inner is None else inner.strip()


def _normalise_number_text(text: str) -> str:
    t = strip_math_delimiters(text)
    t = t.replace("{,}", ",").replace("\\,", "").replace("\\!", "").replace("\\ ", " ")
    t = re.sub(r"\\left|\\right", "", t)
    t = t.replace("−", "-").replace("\u2009", "").replace("\u202f", "")
    return t.strip()


def parse_number(text: str) -> Optional[Number]:
    """``text`` as one number, or None when it is anything else (an expression, two numbers).

    Accepted: ``1216``, ``1,216``, ``1{,}216``, ``1216.0``, ``-3``, ``.5``, ``3/4``, ``\\frac{3}{4}``,
    ``-\\frac{1}{2}``, ``50%``, ``\\$18``, ``18 dollars``, ``1216 apples``, ``x = 4``, ``The answer is
    12``, any of them in ``$...$`` or ``\\boxed{}``. Not accepted: ``76 * 16``, ``1200+16``, ``2^3``.
    """
    t = _normalise_number_text(text)
    t = _PROSE_PREFIX.sub("", t, count=1) if not t[:1].isdigit() else t
    t = re.sub(r"^[A-Za-z]\s*=\s*", "", t)  # "x = 4"
    sign = ""
    if t[:1] in "-+" and _CURRENCY.match(t[1:].lstrip()):
        sign, t = t[0], t[1:].lstrip()
    t = _CURRENCY.sub("", t, count=1)
    t = sign + t
    m = _FRAC_RE.match(t)
    if m:
        num, den = int(m.group(2)), int(m.group(3))
        if den == 0:
            return None
        value, rest = Fraction(num, den) * (-1 if m.group(1) == "-" else 1), t[m.end():]
    else:
        m = _NUMBER_RE.match(t)
        if not m:
            return None
        rest = t[m.end():]
        mixed = _FRAC_RE.match(rest.lstrip())
        if mixed and not mixed.group(1) and re.fullmatch(r"[-+]?\d+", m.group(0)) \
                and int(mixed.group(3)) != 0:
            # "2\frac{1}{2}" is the mixed number 5/2, as it is read in school answers.
            whole, part = int(m.group(0)), Fraction(int(mixed.group(2)), int(mixed.group(3)))
            value = whole - part if m.group(0).startswith("-") else whole + part
            rest = rest.lstrip()[mixed.end():]
            return Number(value) if _UNIT_WORDS.match(rest) else None
        frac = re.match(r"\s*/\s*(\d+)(?![\d.])", rest)
        try:
            value = Fraction(m.group(0).replace(",", ""))
            if frac:
                if int(frac.group(1)) == 0 or "." in m.group(0):
                    return None
                value /= int(frac.group(1))
                rest = rest[frac.end():]
        except (ValueError, ZeroDivisionError):
            return None
    percent = bool(re.match(r"\s*\\?%", rest))
    if not _UNIT_WORDS.match(rest):
        return None
    return Number(value, percent)


def is_numeric_reference(reference_answer: str) -> bool:
    return parse_number(str(reference_answer)) is not None


def final_value_text(answer: str) -> str:
    """The right-hand side of the last ``=`` (``76*16 = 1216`` answers 1216; ``x = 4`` answers 4)."""
    t = strip_math_delimiters(answer)
    parts = re.split(r"(?<![<>!=])=(?!=)", t)
    return parts[-1].strip() if len(parts) > 1 and parts[-1].strip() else t


def is_expression(text: str) -> bool:
    """An arithmetic expression (an operator between operands), not a single value."""
    t = _normalise_number_text(text)
    return parse_number(t) is None and bool(_EXPRESSION_RE.search(t))


def _canonical_expression(text: str) -> str:
    t = _normalise_number_text(text).lower()
    for a, b in (("\\times", "*"), ("\\cdot", "*"), ("×", "*"), ("·", "*"), ("\\ast", "*"),
                 ("\\div", "/"), ("÷", "/"), (" x ", "*")):
        t = t.replace(a, b)
    return re.sub(r"[\s{}$]|\\left|\\right", "", t).rstrip(".?!")


_PROMPT_EXPR_RE = re.compile(r"[(\d][\d().\s]*(?:(?:[-+*/^×÷·]|\\times|\\cdot|\\div| x )"
                             r"\s*[(\d][\d().\s]*)+")


_PROMPT_MATH_RE = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)


def prompt_expressions(prompt: str) -> list[str]:
    """The expressions written in a prompt, canonicalised: arithmetic (``What is 76 * 16?`` ->
    ``76*16``) and math segments with an operator or a LaTeX command (``$\\sqrt{8}$``)."""
    out = []
    for m in _PROMPT_EXPR_RE.finditer(prompt or ""):
        c = _canonical_expression(m.group(0))
        if re.search(r"\d[-+*/^]", c):
            out.append(c)
    for m in _PROMPT_MATH_RE.finditer(prompt or ""):
        seg = next(g for g in m.groups() if g is not None)
        c = _canonical_expression(seg)
        if re.search(r"[-+*/^=]|\\[a-z]", c):
            out.append(c)
    return out


def restates_prompt(answer: str, prompt: Optional[str]) -> bool:
    """The answer contains one of the prompt's own expressions (``76 * 16`` for "What is
    76 * 16?"): a restatement, whatever it evaluates to."""
    if not prompt:
        return False
    a = _canonical_expression(answer)
    return any(len(e) >= 3 and e in a for e in prompt_expressions(prompt))


@dataclass(frozen=True)
class FinalAnswer:
    text: Optional[str]  # what is judged; None when nothing answer-like was found
    source: str  # "answer_tag" | "boxed" | "last_number" | "none"
    ends_with_expression: bool = False  # prose whose last number is an operand


_LAST_NUMBER_RE = re.compile(rf"(?:{_NUM}|\\[dt]?frac\{{\d+\}}\{{\d+\}})(?![\d])")


def final_answer(completion: str, pattern: Optional[str] = None) -> FinalAnswer:
    """The completion's final answer: the last ``<answer>`` block (or ``pattern``), else the last
    ``\\boxed{}``, else the last number of the prose. A last number that is an operand (the
    completion ends ``... 76 * 16``) is flagged: prose that ends with an expression has not
    answered."""
    tagged = extract_answer(completion, pattern)
    if tagged is not None:
        boxed = boxed_contents(tagged)
        return FinalAnswer(boxed if boxed is not None else tagged, "answer_tag")
    boxed = boxed_contents(completion)
    if boxed is not None:
        return FinalAnswer(boxed, "boxed")
    matches = list(_LAST_NUMBER_RE.finditer(completion))
    if not matches:
        return FinalAnswer(None, "none")
    m = matches[-1]
    before = completion[:m.start()].rstrip()
    # A "-" right before a number is its sign unless an operand precedes it ("5 - 3").
    operand_before = re.search(rf"{_OPERAND}\s*{_OPERATOR}\s*[(]?$", before) is not None
    start = m.start() - 1 if before.endswith("-") and not operand_before else m.start()
    return FinalAnswer(completion[start:m.end()], "last_number", operand_before)


@dataclass(frozen=True)
class AnswerVerdict:
    ok: Optional[bool]  # None: not decided here (a symbolic comparison is needed)
    reason: str
    value_text: Optional[str] = None  # the answer's text to compare symbolically


def judge_numeric(answer: FinalAnswer, gold: Number, prompt: Optional[str]) -> AnswerVerdict:
    """A numeric reference: only a number matches (see the module doc)."""
    if answer.text is None:
        return AnswerVerdict(False, "no final answer found")
    if answer.ends_with_expression:
        return AnswerVerdict(False, "an expression, not a final answer (the text ends with "
                                    f"an operand: {answer.text!r})")
    value_text = final_value_text(answer.text)
    if restates_prompt(value_text, prompt):
        return AnswerVerdict(False, f"restates the prompt's expression: {value_text[:60]!r}")
    got = parse_number(value_text)
    if got is None:
        why = "an expression, not a final answer" if is_expression(value_text) else \
            "not a number"
        return AnswerVerdict(False, f"{why}: {value_text[:60]!r}")
    ok = got.equals(gold)
    return AnswerVerdict(ok, f"{value_text[:40]!r} = {got.value}{'%' if got.percent else ''} vs "
                             f"reference {gold.value}{'%' if gold.percent else ''}: "
                             + ("equal" if ok else "different"))
