"""Rejection sampling's filter (R1 phase 3), as pure functions over generated rows.

A generated row (written by the generate phase, one per completion)::

    {"prompt_id", "prompt", "kind", "reference", "completion", "sample_index", "step",
     "finish_reason", "num_tokens", "reward", "components", "correct"}

A completion is kept when it is correct (strict grader), its reasoning states no false
arithmetic step (a right answer reached through ``6+5=15`` is a lucky guess, and SFT on it teaches
the false step), well formatted, written in the prompt's
script, and not cut by the token limit; duplicates of one prompt are dropped; the best ``best_k``
per prompt survive. The output rows are SFT rows with their provenance, so a trained model's
behaviour can be traced back to the sampling phase, step and scores that produced its data.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from typing import Iterable, Optional, Sequence

from r1mega.rewards.detectors import false_arithmetic_step, reasoning_text
from r1mega.rewards.format import check_format
from r1mega.rewards.language import script_units

_WS = re.compile(r"\s+")
# The format's own tags are Latin words in every language; they are markup, not the response.
_TAGS = re.compile(r"</?(?:think|answer)>")


def prompt_script(prompt: str, default: str = "LATIN") -> str:
    """The script most of the prompt's letters are in; ``default`` when it has none (arithmetic)."""
    units = script_units(prompt)
    return Counter(units).most_common(1)[0][0] if units else default


def language_share(response: str, prompt: str) -> float:
    """Share of the response's word units in the prompt's script; 1.0 with no letters at all
    (digits and symbols mix no language)."""
    units = script_units(_TAGS.sub(" ", response))
    if not units:
        return 1.0
    script = prompt_script(prompt)
    return sum(u == script for u in units) / len(units)


def rejection_reasons(row: dict, settings) -> list[str]:
    """Why ``row`` fails ``settings`` (:class:`FilterSettings`); empty when it is kept."""
    text = row.get("completion") or ""
    # An empty response teaches nothing and is no valid SFT row.
    out = [] if text.strip() else ["empty"]
    if settings.require_correct and not row.get("correct"):
        out.append("wrong")
    if settings.require_valid_steps and false_arithmetic_step(reasoning_text(text)):
        out.append("false_step")
    if check_format(text).score < settings.min_format:
        out.append("format")
    if language_share(text, row.get("prompt") or "") < settings.min_language_share:
        out.append("language")
    if settings.drop_truncated and row.get("finish_reason") == "length":
        out.append("truncated")
    return out


def dedup_key(row: dict) -> tuple:
    # Whitespace differences do not make a new sample worth training on twice.
    return row["prompt_id"], _WS.sub(" ", (row.get("completion") or "").strip())


def select(rows: Sequence[dict], settings) -> tuple[list[dict], Counter]:
    """Kept rows (best ``best_k`` per prompt, in prompt order) and the count of each rejection
    reason ("duplicate", "over_best_k" included)."""
    counts: Counter = Counter()
    by_prompt: dict = {}
    seen = set()
    for row in rows:
        reasons = rejection_reasons(row, settings)
        if reasons:
            counts.update(reasons)
            continue
        key = dedup_key(row)
        if key in seen:
            counts["duplicate"] += 1
            continue
        seen.add(key)
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    kept = []
    for pid in sorted(by_prompt, key=_natural):
        group = sorted(by_prompt[pid], key=lambda r: (-float(r.get("reward", 0.0)),
                                                      int(r.get("num_tokens", 0)),
                                                      int(r.get("sample_index", 0))))
        kept.extend(group[:settings.best_k])
        counts["over_best_k"] += max(0, len(group) - settings.best_k)
    return kept, counts


def _natural(pid) -> tuple:
    s = str(pid)
    tail = s.rsplit("#", 1)[-1]
    return (s.rsplit("#", 1)[0], int(tail)) if tail.isdigit() else (s, -1)


def sft_row(row: dict, phase: str, phase_index: int) -> dict:
    """An SFT row (prompt, response) carrying where it came from and how it scored."""
    return {"prompt": row["prompt"], "response": row["completion"],
            "provenance": {"phase": phase, "phase_index": phase_index,
                           "source_phase": row.get("phase"), "step": row.get("step"),
                           "prompt_id": row["prompt_id"], "sample_index": row.get("sample_index"),
                           "scores": {"reward": row.get("reward"), "correct": row.get("correct"),
                                      "format": check_format(row.get("completion") or "").score,
                                      "language": language_share(row.get("completion") or "",
                                                                 row.get("prompt") or ""),
                                      **{k: v for k, v in (row.get("components") or {}).items()}}}}


def mix_count(kept: int, share: float) -> int:
    """Rows to add so that they are ``share`` of the total: m / (kept + m) = share."""
    if share <= 0 or kept == 0:
        return 0
    return int(round(kept * share / (1.0 - share)))


def mix_rows(pairs: Sequence, count: int, seed: int, source: str) -> list[dict]:
    """``count`` (prompt, response) pairs drawn without replacement (with, past the pool's size)."""
    if count <= 0:
        return []
    if len(pairs) == 0:
        raise ValueError(f"filter.mix_source={source!r} has no rows to mix in.")
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    picks = [order[i % len(order)] for i in range(count)]
    out = []
    for i in picks:
        p, r = pairs[i]
        out.append({"prompt": p, "response": r,
                    "provenance": {"source": source, "row": i, "non_reasoning": True}})
    return out


def filter_rows(rows: Iterable[dict], settings, *, phase: str, phase_index: int,
                mix_pairs: Optional[Sequence] = None) -> tuple[list[dict], dict]:
    """The whole filter: (SFT rows, statistics)."""
    rows = list(rows)
    kept, counts = select(rows, settings)
    out = [sft_row(r, phase, phase_index) for r in kept]
    n_mix = mix_count(len(out), settings.mix_share)
    out += mix_rows(mix_pairs or [], n_mix, settings.seed, settings.mix_source or "")
    stats = {"generated": len(rows), "kept": len(kept), "mixed": n_mix,
             "prompts": len({r["prompt_id"] for r in rows}),
             "prompts_kept": len({r["prompt_id"] for r in kept}),
             **{f"rejected/{k}": v for k, v in sorted(counts.items())}}
    return out, stats
