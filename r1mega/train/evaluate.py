"""Held-out accuracy through the same rollout engine and rewards the training uses.

Protocol (``train.eval_temperature``, ``train.eval_samples``): temperature 0 is greedy decoding,
one completion per prompt; a temperature > 0 draws ``eval_samples`` completions per prompt and
reports the mean (pass@1 estimated by sampling, as the R1 paper reports it). The prompts are
``data.eval_source`` with every prompt that also occurs in the training prompts removed, so the
number measures generalisation, not memorisation.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

from r1mega.data.templates import encode_prompt
from r1mega.rollout.types import GenerationRequest
from r1mega.train.grpo import completion_stats, reduce_stats, request_seed, summarise


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
             seed: int = 0) -> dict:
    """{'eval/accuracy', 'eval/format_rate', 'eval/reward_mean', 'eval/length_mean', ...} over
    all DP ranks (each evaluates its own slice of ``records``); 'eval/seconds' and 'eval/capture_s'
    are this rank's."""
    temperature = cfg.train.eval_temperature if temperature is None else temperature
    n = 1 if temperature <= 0 else (samples_per_prompt or cfg.train.eval_samples)
    t0 = time.perf_counter()
    capture_s = 0.0
    mine = list(records)[rt.dp_rank::rt.dp_size]
    stats = {"n": 0.0, "reward_sum": 0.0, "reward_sq_sum": 0.0, "accuracy_sum": 0.0,
             "format_sum": 0.0, "reflection_sum": 0.0, "length_sum": 0.0, "length_max": 0.0,
             "truncated_sum": 0.0}
    if mine:
        prompts = [encode_prompt(r.prompt, cfg.data.template, tokenizer, cfg.data.max_prompt_tokens)
                   for r in mine]
        requests = [GenerationRequest(p, n=n, temperature=temperature,
                                      seed=request_seed(seed, 0, rt.dp_rank, i))
                    for i, p in enumerate(prompts)]
        completions = rollout.generate(requests)
        capture_s = float(rollout.stats.get("capture_s", 0.0))
        items = [{"kind": mine[c.prompt_index].kind, "completion": c.text or "",
                  "reference": mine[c.prompt_index].reference,
                  "truncated": c.finish_reason == "length", "num_tokens": len(c.token_ids)}
                 for c in completions]
        scored = scorer.score(items)
        stats = completion_stats([c.text or "" for c in completions],
                                 [len(c.token_ids) for c in completions], scored,
                                 [c.finish_reason == "length" for c in completions],
                                 cfg.rewards.reflection_phrases)
    stats = reduce_stats(stats, rt.dp_group if rt.dp_size > 1 else None)
    s = summarise(stats)
    return {"eval/accuracy": s["reward/accuracy"], "eval/format_rate": s["reward/format_rate"],
            "eval/reward_mean": s["reward/mean"], "eval/length_mean": s["response/length_mean"],
            "eval/num_prompts": float(len(records)), "eval/num_completions": stats["n"],
            "eval/temperature": float(temperature),
            # This rank's wall time (generation, scoring, the reduction) and how much of it
            # went to CUDA-graph captures: the time budget predicts the final evaluation.
            "eval/seconds": time.perf_counter() - t0, "eval/capture_s": capture_s}
