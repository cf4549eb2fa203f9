"""The ``phases:`` list of a pipeline config, typed.

Each entry is one phase: a ``kind``, a ``name`` later phases refer to, where its weights start
(``init``), which phase's output it reads (``input``), and sections that override the top-level
ones for this phase only (``model``, ``data``, ``optimizer``, ``rollout``, ``grpo``, ``rewards``,
``train``). The overrides are merged onto a copy of the whole top-level tree, so every phase gets
a complete, validated :class:`r1mega.config.Config` and a misspelt key fails naming
``phases[k].section.key``. ``generate`` and ``filter`` have their own typed settings.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from r1mega.config import Config, ConfigError, _merge, _suggest

KINDS = ("sft", "grpo", "generate", "filter", "distill")
# Kinds whose phase trains weights (and so can be named by a later ``init``).
WEIGHT_KINDS = ("sft", "grpo", "distill")
# Kinds whose phase writes an SFT data file (and so can be named by a later ``input``).
DATA_KINDS = ("generate", "filter")
OVERRIDABLE = ("model", "data", "optimizer", "rollout", "grpo", "rewards", "train")


@dataclass
class GenerateSettings:
    # Completions sampled per prompt (R1's rejection sampling draws several and keeps the best).
    samples_per_prompt: int = 4
    # Prompts taken from the start of the phase's data.source (0: all of them).
    num_prompts: int = 0
    # Prompts per step over all DP ranks; each step's output is one file, the resume unit.
    prompts_per_step: int = 32


@dataclass
class FilterSettings:
    # A completion is kept only if the strict grader calls it correct.
    require_correct: bool = True
    # Drop a completion whose reasoning states a false "a op b = c" step (right by luck).
    require_valid_steps: bool = True
    # Minimum strict-format score (rewards/format.py: 0 or 1).
    min_format: float = 1.0
    # Minimum share of the response's letters in the prompt's script (pipeline/rejection.py).
    min_language_share: float = 0.95
    # Completions cut by max_new_tokens are dropped.
    drop_truncated: bool = True
    # At most this many distinct completions per prompt, best reward first.
    best_k: int = 1
    # Non-reasoning SFT rows ({"prompt","response"} JSONL, or builtin:<task> worked solutions).
    mix_source: Optional[str] = None
    # Share of the written rows that come from mix_source (0 <= share < 1).
    mix_share: float = 0.0
    seed: int = 0


@dataclass
class PhaseSpec:
    index: int
    name: str
    kind: str
    cfg: Config
    steps: int = 0
    init: str = "base"
    input: Optional[str] = None
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    filter: FilterSettings = field(default_factory=FilterSettings)

    @property
    def key(self) -> str:
        return f"phases[{self.index}]"


_ENTRY_KEYS = {"name", "kind", "steps", "init", "input", "generate", "filter", *OVERRIDABLE}


def _typed(cls, data, where: str):
    obj = cls()
    if data is not None:
        _merge(obj, data, where + ".")
    return obj


# train.* keys of the single-run trainer that a phase list replaces (phases[k].steps, its
# optimizer section) or that the pipeline does not run (intermediate evaluations).
REPLACED_TRAIN_KEYS = ("mode", "steps", "sft_steps", "sft_lr", "sft_decay_style",
                        "eval_every_steps")


def _check_replaced_keys(train, where: str) -> None:
    from r1mega.config import TrainConfig

    default = TrainConfig()
    for key in REPLACED_TRAIN_KEYS:
        if getattr(train, key) != getattr(default, key):
            raise ConfigError(f"{where}train.{key}={getattr(train, key)!r} has no effect in a "
                              "pipeline: each phase's steps are phases[k].steps, its lr and "
                              "schedule phases[k].optimizer, and the per-phase table is the "
                              f"evaluation. Remove {where}train.{key}.")


# Keys the loop reads once for the whole pipeline: a phase may not set its own.
PIPELINE_WIDE = (("train", "time_budget_s"), ("data", "eval_source"), ("data", "eval_examples"))


def _check_pipeline_wide(pcfg: Config, base: Config, where: str) -> None:
    for section, key in PIPELINE_WIDE:
        if getattr(getattr(pcfg, section), key) != getattr(getattr(base, section), key):
            raise ConfigError(f"{where}.{section}.{key}: the pipeline has one (the time budget "
                              "counts from its start; every phase is measured on the same "
                              f"held-out prompts); set {section}.{key} at the top level.")


def parse_phases(cfg: Config) -> list[PhaseSpec]:
    """``cfg.phases`` -> one :class:`PhaseSpec` per entry, every reference checked."""
    from r1mega.config_checks import validate

    if not isinstance(cfg.phases, list) or not cfg.phases:
        raise ConfigError("phases: expected a non-empty list of phase entries (see "
                          "configs/r1_demo.yaml).")
    _check_replaced_keys(cfg.train, "")
    base = copy.deepcopy(cfg)
    base.phases = []
    specs: list[PhaseSpec] = []
    by_name: dict[str, PhaseSpec] = {}
    for i, entry in enumerate(cfg.phases):
        where = f"phases[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with at least 'kind', got {entry!r}.")
        for key in entry:
            if key not in _ENTRY_KEYS:
                raise ConfigError(f"Unknown config key '{where}.{key}'."
                                  f"{_suggest(str(key), _ENTRY_KEYS, where + '.')}")
        kind = entry.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"{where}.kind: {kind!r} is not one of {list(KINDS)}."
                              f"{_suggest(str(kind), KINDS)}")
        for own in ("generate", "filter"):
            if own in entry and kind != own:
                raise ConfigError(f"{where}.{own}: only a {own} phase reads these settings; "
                                  f"remove them from this {kind} phase.")
        name = str(entry.get("name") or f"{kind}_{i}")
        if name in by_name or name in ("base",) or name.startswith("hf:"):
            raise ConfigError(f"{where}.name: '{name}' is taken (by an earlier phase, or it is "
                              "reserved: base, hf:...); give each phase its own name.")
        pcfg = copy.deepcopy(base)
        for section in OVERRIDABLE:
            if section in entry:
                _merge(getattr(pcfg, section), entry[section], f"{where}.{section}.")
        _check_replaced_keys(pcfg.train, where + ".")
        _check_pipeline_wide(pcfg, base, where)
        try:
            validate(pcfg)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        steps = entry.get("steps", 0)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"{where}.steps must be an integer >= 0, got {steps!r}.")
        if kind in WEIGHT_KINDS and steps < 1:
            raise ConfigError(f"{where}.steps: a {kind} phase needs steps >= 1.")
        spec = PhaseSpec(index=i, name=name, kind=kind, cfg=pcfg, steps=steps,
                         init=str(entry.get("init", "base")), input=entry.get("input"),
                         generate=_typed(GenerateSettings, entry.get("generate"), where + ".generate"),
                         filter=_typed(FilterSettings, entry.get("filter"), where + ".filter"))
        _check_references(spec, by_name, where)
        specs.append(spec)
        by_name[name] = spec
    return specs


def _check_references(spec: PhaseSpec, by_name: dict, where: str) -> None:
    kind, init = spec.kind, spec.init
    if kind in WEIGHT_KINDS or kind == "generate":
        if init != "base" and not init.startswith("hf:"):
            src = by_name.get(init)
            if src is None or src.kind not in WEIGHT_KINDS:
                names = [n for n, s in by_name.items() if s.kind in WEIGHT_KINDS]
                raise ConfigError(f"{where}.init: '{init}' is not base, hf:DIR or an earlier "
                                  f"weight-training phase ({names}).")
            if dataclasses.asdict(src.cfg.model) != dataclasses.asdict(spec.cfg.model):
                raise ConfigError(f"{where}.init: phase '{init}' trained another model shape; "
                                  f"give {where} the same model section, or init: base.")
    if kind in ("filter", "sft", "distill") or spec.input is not None:
        want = {"filter": ("generate",), "sft": ("filter",), "distill": ("filter",)}.get(kind, ())
        if spec.input is None and kind == "filter":
            raise ConfigError(f"{where}.input: a filter phase needs the name of a generate phase.")
        if spec.input is None and kind == "distill":
            raise ConfigError(f"{where}.input: a distill phase needs the name of the phase whose "
                              "samples it learns from (a filter phase).")
        if spec.input is not None:
            src = by_name.get(spec.input)
            if src is None or src.kind not in want:
                raise ConfigError(f"{where}.input: '{spec.input}' is not an earlier phase of kind "
                                  f"{list(want) or 'none: this kind reads no input'}.")
    if kind == "filter" and not 0.0 <= spec.filter.mix_share < 1.0:
        raise ConfigError(f"{where}.filter.mix_share must be in [0, 1), got {spec.filter.mix_share}.")
    if kind == "filter" and spec.filter.mix_share > 0 and not spec.filter.mix_source:
        raise ConfigError(f"{where}.filter.mix_share > 0 needs filter.mix_source.")
    if kind == "filter" and spec.filter.best_k < 1:
        raise ConfigError(f"{where}.filter.best_k must be >= 1.")
    if kind == "generate" and spec.generate.samples_per_prompt < 1:
        raise ConfigError(f"{where}.generate.samples_per_prompt must be >= 1.")


def legacy_phases(cfg: Config) -> list:
    """A config without ``phases:`` as the pipeline it always meant: ``train.mode=sft`` is one SFT
    phase; GRPO with ``train.sft_steps > 0`` is cold-start SFT, then GRPO from its weights."""
    sft = {"optimizer": {"lr": cfg.train.sft_lr or cfg.optimizer.lr,
                         "decay_style": cfg.train.sft_decay_style or cfg.optimizer.decay_style}}
    if cfg.train.mode == "sft":
        return [{"name": "sft", "kind": "sft", "steps": cfg.train.sft_steps or cfg.train.steps,
                 **sft}]
    out = []
    if cfg.train.sft_steps > 0:
        out.append({"name": "cold_start", "kind": "sft", "steps": cfg.train.sft_steps, **sft})
    out.append({"name": "grpo", "kind": "grpo", "steps": cfg.train.steps,
                "init": "cold_start" if out else "base"})
    return out
