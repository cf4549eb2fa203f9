"""``build_prompt_source(data_cfg)``: ``data.source`` → an indexable sequence of PromptRecords."""
from __future__ import annotations

from r1mega.data.datasets import load_prompt_file
from r1mega.data.tasks import make_builtin
from r1mega.data.tasks.reasoning_gym import ReasoningGymSource


def build_prompt_source(data_cfg, eval: bool = False, stats: dict | None = None):
    """Training prompts, or with ``eval=True`` those of ``data.eval_source`` (None if unset).

    ``builtin:<task>`` and ``reasoning_gym:<name>`` make ``data.num_examples`` (eval:
    ``eval_examples``) items from ``data.seed`` (eval: ``seed + 1``, so they differ from the
    training items); a path loads a JSONL/Parquet file; ``stats`` receives ``bad_rows``.
    """
    spec = data_cfg.eval_source if eval else data_cfg.source
    if spec is None:
        return None
    size = data_cfg.eval_examples if eval else data_cfg.num_examples
    seed = data_cfg.seed + (1 if eval else 0)
    if spec.startswith("builtin:"):
        return make_builtin(spec.split(":", 1)[1], size, seed, data_cfg.task_options)
    if spec.startswith("reasoning_gym:"):
        return ReasoningGymSource(spec.split(":", 1)[1], size, seed, data_cfg.task_options)
    return load_prompt_file(spec, data_cfg.on_bad_row, stats,
                            key="data.eval_source" if eval else "data.source")


def source_kinds(source) -> set:
    """The task kinds a prompt source holds: every record of a list (a loaded file); the first
    record of a lazy source (a procedural or reasoning-gym task makes one kind only, and reading
    all of its items would generate them)."""
    if source is None or len(source) == 0:
        return set()
    if isinstance(source, list):
        return {r.kind for r in source}
    return {source[0].kind}
