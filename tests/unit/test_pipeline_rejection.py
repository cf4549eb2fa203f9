"""Rejection sampling's filter on hand-made completions: each rule alone, dedup, best-k, the
provenance of every written row, and the non-reasoning mix."""
from __future__ import annotations

import pytest

from r1mega.pipeline.config import FilterSettings
from r1mega.pipeline.rejection import (filter_rows, language_share, mix_count, prompt_script,
                                       rejection_reasons)

GOOD = "<think>7-3=4,4+5=9</think><answer>9</answer>"


def _row(completion=GOOD, prompt_id="builtin:arithmetic#0", prompt="7-3+5=", correct=True,
         finish="stop", reward=1.1, sample=0, tokens=None):
    return {"phase": "gen", "step": 3, "prompt_id": prompt_id, "prompt": prompt, "kind": "arithmetic",
            "reference": {"answer": 9}, "completion": completion, "sample_index": sample,
            "finish_reason": finish, "num_tokens": tokens or len(completion), "reward": reward,
            "components": {"exact_match": float(correct), "format": 1.0}, "correct": correct}


def test_each_rule_rejects_its_case_alone():
    s = FilterSettings()
    assert rejection_reasons(_row(), s) == []
    assert rejection_reasons(_row(correct=False), s) == ["wrong"]
    assert rejection_reasons(_row("7-3=4,4+5=9 so 9"), s) == ["format"]
    assert rejection_reasons(_row(finish="length"), s) == ["truncated"]
    mixed = "<think>сначала 7-3=4, then 4+5=9 готово</think><answer>9</answer>"
    assert rejection_reasons(_row(mixed, prompt="What is 7-3+5?"), s) == ["language"]
    assert rejection_reasons(_row("   "), s) == ["empty", "format"]
    # The right answer through a false step (a lucky guess): SFT on it would teach 6+5=15.
    lucky = "<think>6+5=15,16-3=7</think><answer>9</answer>"
    assert rejection_reasons(_row(lucky), s) == ["false_step"]
    # Nothing to check (no "a op b = c" in the reasoning) is no reason to drop.
    assert rejection_reasons(_row("<think>seven minus three, plus five</think><answer>9</answer>"),
                             s) == []
    # Loosened settings keep what the defaults drop.
    loose = FilterSettings(require_correct=False, min_format=0.0, min_language_share=0.0,
                           drop_truncated=False, require_valid_steps=False)
    assert rejection_reasons(_row(lucky), loose) == []
    assert rejection_reasons(_row("no tags", correct=False, finish="length"), loose) == []


def test_language_share_follows_the_prompts_script():
    assert prompt_script("Сколько будет 2+2?") == "CYRILLIC"
    assert prompt_script("7-3+5=") == "LATIN"  # no letters: the default
    assert language_share("<think>два плюс два</think><answer>4</answer>", "Сколько будет 2+2?") == 1.0
    assert language_share("<think>two plus two</think>", "Сколько будет 2+2?") == 0.0
    assert language_share("<think>7-3=4</think><answer>4</answer>", "7-3=") == 1.0
    # Three Latin word units of four.
    assert language_share("one two three четыре", "count") == pytest.approx(0.75)


def test_duplicates_and_best_k_per_prompt():
    rows = [_row(sample=0, reward=1.0),
            _row("<think>7-3=4, 4+5=9</think><answer>9</answer>", sample=1, reward=1.1),
            _row(GOOD + "  ", sample=2, reward=1.1),                       # dup of 0 (whitespace)
            _row("<think>3+5=8,8-... no: 7-3=4,4+5=9</think><answer>9</answer>", sample=3, reward=1.2),
            _row(prompt_id="builtin:arithmetic#1", prompt="1+1+1=", sample=0, reward=1.0),
            _row(prompt_id="builtin:arithmetic#1", prompt="1+1+1=", correct=False, sample=1)]
    out, stats = filter_rows(rows, FilterSettings(best_k=2), phase="filt", phase_index=3)
    assert stats["rejected/duplicate"] == 1 and stats["rejected/wrong"] == 1
    assert stats["rejected/over_best_k"] == 1
    assert [(r["provenance"]["prompt_id"], r["provenance"]["sample_index"]) for r in out] == [
        ("builtin:arithmetic#0", 3), ("builtin:arithmetic#0", 1), ("builtin:arithmetic#1", 0)]
    assert stats["kept"] == 3 and stats["prompts_kept"] == 2 and stats["generated"] == 6


def test_provenance_fields():
    out, _ = filter_rows([_row(sample=5, reward=1.1)], FilterSettings(), phase="filt", phase_index=3)
    (row,) = out
    assert row["prompt"] == "7-3+5=" and row["response"] == GOOD
    p = row["provenance"]
    assert (p["phase"], p["phase_index"], p["source_phase"], p["step"], p["prompt_id"],
            p["sample_index"]) == ("filt", 3, "gen", 3, "builtin:arithmetic#0", 5)
    assert p["scores"]["reward"] == 1.1 and p["scores"]["correct"] is True
    assert p["scores"]["format"] == 1.0 and p["scores"]["language"] == 1.0
    assert p["scores"]["exact_match"] == 1.0


def test_non_reasoning_rows_make_the_configured_share():
    assert mix_count(30, 0.25) == 10 and mix_count(0, 0.5) == 0 and mix_count(7, 0.0) == 0
    rows = [_row(prompt_id=f"p#{i}", prompt=f"{i}+0=", sample=0) for i in range(6)]
    pairs = [("hello", "hi there"), ("name a colour", "blue"), ("say yes", "yes")]
    settings = FilterSettings(mix_share=0.5, mix_source="chat.jsonl", seed=1)
    out, stats = filter_rows(rows, settings, phase="filt", phase_index=3, mix_pairs=pairs)
    mixed = [r for r in out if r["provenance"].get("non_reasoning")]
    assert stats["mixed"] == 6 and len(mixed) == 6 and len(out) == 12
    # Drawn without replacement until the pool runs out, then again.
    assert sorted(r["provenance"]["row"] for r in mixed[:3]) == [0, 1, 2]
    assert all((r["prompt"], r["response"]) == pairs[r["provenance"]["row"]] for r in mixed)
    assert {r["provenance"]["source"] for r in mixed} == {"chat.jsonl"}
    again, _ = filter_rows(rows, settings, phase="filt", phase_index=3, mix_pairs=pairs)
    assert again == out  # seeded
