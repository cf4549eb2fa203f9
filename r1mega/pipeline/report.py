"""The per-phase table: what each phase's weights do on the same held-out prompts.

Columns: strict held-out accuracy (``rewards/strict.py``, independent of the training reward),
strict-format rate, language consistency (share of the response in the prompt's script,
``pipeline/rejection.py``) and mean response length in tokens. Greedy decoding by default
(``train.eval_temperature``), so two runs of one pipeline print the same table.
"""
from __future__ import annotations

from typing import Sequence

from r1mega.pipeline.rejection import language_share

COLUMNS = (("accuracy", "strict acc"), ("format_rate", "format"),
           ("language", "language"), ("length_mean", "mean len"))


def phase_eval(rollout, scorer, records: Sequence, tokenizer, cfg, rt) -> dict:
    """{accuracy, format_rate, language, length_mean, num_prompts} over every DP rank."""
    from r1mega.data.templates import encode_prompt
    from r1mega.rollout.types import GenerationRequest
    from r1mega.train.batch_stats import completion_stats, empty_stats, reduce_stats, summarise
    from r1mega.train.grpo import reward_item, request_seed

    temperature = cfg.train.eval_temperature
    n = 1 if temperature <= 0 else cfg.train.eval_samples
    mine = list(records)[rt.dp_rank::rt.dp_size]
    stats, lang_sum = empty_stats(), 0.0
    if mine:
        prompts = [encode_prompt(r.prompt, cfg.data.template, tokenizer, cfg.data.max_prompt_tokens)
                   for r in mine]
        requests = [GenerationRequest(p, n=n, temperature=temperature,
                                      seed=request_seed(cfg.rollout.seed + 7, 0, rt.dp_rank, i))
                    for i, p in enumerate(prompts)]
        completions = rollout.generate(requests)
        recs = [mine[c.prompt_index] for c in completions]
        scored = scorer.score([reward_item(r, c) for r, c in zip(recs, completions)])
        stats = completion_stats(completions, recs, scored, cfg.rewards.reflection_phrases)
        lang_sum = sum(language_share(c.text or "", r.prompt) for r, c in zip(recs, completions))
    stats["language_sum"] = float(lang_sum)
    stats = reduce_stats(stats, rt.dp_group if rt.dp_size > 1 else None)
    s = summarise(stats)
    n_all = max(stats["n"], 1.0)
    return {"accuracy": s["reward/strict_accuracy"], "format_rate": s["reward/format_rate"],
            "language": stats["language_sum"] / n_all, "length_mean": s["response/length_mean"],
            "num_prompts": float(len(records))}


def format_table(rows: Sequence[tuple[str, str, dict]]) -> str:
    """rows: (phase name, kind, eval dict or None) -> a plain-text table."""
    head = ["phase", "kind"] + [title for _, title in COLUMNS]
    body = []
    for name, kind, ev in rows:
        if ev:
            cells = [f"{100 * ev['accuracy']:.1f}%", f"{100 * ev['format_rate']:.1f}%",
                     f"{100 * ev['language']:.1f}%", f"{ev['length_mean']:.1f}"]
        else:
            cells = ["-"] * len(COLUMNS)
        body.append([name, kind] + cells)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
