"""Held-out accuracy: the same rollout engine, graded by the strict grader (``rewards/strict.py``),
independent of the training reward, which is reported beside it (``eval/reward_mean``,
``eval/reward_accuracy``) so a reward that the policy games shows up as a gap.

Protocol (``train.eval_temperature``, ``train.eval_samples``): temperature 0 is greedy decoding,
one completion per prompt; a temperature > 0 draws ``eval_samples`` completions per prompt and
reports the mean (pass@1 estimated by sampling, as the R1 paper reports it). The prompts are
``data.eval_source`` with every prompt that also occurs in the training prompts removed, so the
number measures generalisation, not memorisation.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional, Sequence

from r1mega.data.templates import encode_prompt
from r1mega.rollout.types import GenerationRequest
from r1mega.rewards.strict import strict_grade
from r1mega.train.batch_stats import (completion_stats, empty_stats, reduce_stats, summarise,
                                      verifier_score)
from r1mega.train.grpo import reward_item, request_seed


def heldout_records(eval_source, train_sources: Sequence) -> list:
    """Eval records whose prompt text never appears in any training source, each prompt once."""
    seen = set()
    for src in train_sources:
        for i in range(len(src)):
            item = src[i]
            seen.add(item[0] if isinstance(item, tuple) else item.prompt)
    out = []
    for r in (eval_source[i] for i in range(len(eval_source))):
        if r.prompt not in seen:  # also drops repeats within the eval draws
            seen.add(r.prompt)
            out.append(r)
    return out


def evaluate(rollout, scorer, records: Sequence, tokenizer, cfg, rt, *,
             temperature: Optional[float] = None, samples_per_prompt: Optional[int] = None,
             seed: int = 0, dump_path: Optional[str] = None) -> dict:
    """{'eval/accuracy' (strict), 'eval/reward_mean', 'eval/format_rate', ...} over
    all DP ranks (each evaluates its own slice of ``records``); 'eval/seconds' and 'eval/capture_s'
    are this rank's. ``dump_path``: this rank's completions, one JSON line each (prompt,
    completion, strict verdict and reason, training reward), to read what the numbers count."""
    temperature = cfg.train.eval_temperature if temperature is None else temperature
    n = 1 if temperature <= 0 else (samples_per_prompt or cfg.train.eval_samples)
    t0 = time.perf_counter()
    capture_s = 0.0
    mine = list(records)[rt.dp_rank::rt.dp_size]
    stats = empty_stats()
    if mine:
        prompts = [encode_prompt(r.prompt, cfg.data.template, tokenizer, cfg.data.max_prompt_tokens)
                   for r in mine]
        requests = [GenerationRequest(p, n=n, temperature=temperature,
                                      seed=request_seed(seed, 0, rt.dp_rank, i))
                    for i, p in enumerate(prompts)]
        completions = rollout.generate(requests)
        capture_s = float(rollout.stats.get("capture_s", 0.0))
        scored = scorer.score([reward_item(mine[c.prompt_index], c) for c in completions])
        stats = completion_stats(completions, [mine[c.prompt_index] for c in completions], scored,
                                 cfg.rewards.reflection_phrases)
        if dump_path:
            dump_completions(dump_path, [mine[c.prompt_index] for c in completions], completions,
                             scored)
    stats = reduce_stats(stats, rt.dp_group if rt.dp_size > 1 else None)
    s = summarise(stats)
    return {"eval/accuracy": s["reward/strict_accuracy"],
            "eval/reward_accuracy": s["reward/accuracy"], "eval/format_rate": s["reward/format_rate"],
            "eval/reward_mean": s["reward/mean"], "eval/length_mean": s["response/length_mean"],
            "eval/reward_error_share": s["reward/error_share"],
            **{f"eval/{k}": v for k, v in s.items() if k.startswith("hack/")},
            "eval/num_prompts": float(len(records)), "eval/num_completions": stats["n"],
            "eval/temperature": float(temperature),
            # This rank's wall time (generation, scoring, the reduction) and how much of it
            # went to CUDA-graph captures: the time budget predicts the final evaluation.
            "eval/seconds": time.perf_counter() - t0, "eval/capture_s": capture_s}


def dump_completions(path: str, records, completions, scored) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r, c, s in zip(records, completions, scored):
            try:
                ok, why = strict_grade(c.text or "", r.reference, verifier_score(s))
            except ValueError as exc:
                ok, why = False, str(exc)
            f.write(json.dumps({"prompt": r.prompt, "kind": r.kind, "reference": r.reference,
                                "completion": c.text or "", "strict": ok, "strict_reason": why,
                                "reward": s.total, "components": s.components,
                                "error": s.error, "finish_reason": c.finish_reason},
                               ensure_ascii=False) + "\n")
