"""When a later run of the pipeline may reuse what a phase directory holds.

A phase directory is reused (finished) or continued (checkpoints, generation markers) only if the
phase would compute the same thing again: its settings fingerprint, written to ``settings.json``
when the phase first starts, must match the config of the run that finds it. The fingerprint
covers the phase's whole config tree (less where and how often a run writes: ``logging``,
``checkpoint``, ``train.time_budget_s``; and which prompts are held out, which the evaluation
below accounts for), its own entry (kind, steps, init, input, generate and
filter settings) and the fingerprints of the phases it starts from and reads, so a change
upstream invalidates everything built on it. A mismatch is an error naming the keys that
differ: silently reusing samples drawn under other settings would put wrong figures in the table.

The table's evaluation is a function of the weights and the held-out prompts, and the held-out
prompts depend on every phase of the list (none may be trained on). A finished phase whose
evaluation was made on another held-out set is therefore re-evaluated from its checkpoint, not
recomputed.

Paths in ``done.json`` are relative to the pipeline's root, so a run directory (or phases copied
from one into another) can move.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Optional

from r1mega.config import ConfigError

SETTINGS_FILE = "settings.json"
# Sections that say where a run writes and how often, never what a phase computes.
_NOT_SETTINGS = ("logging", "checkpoint")
# Pipeline-wide keys that choose the held-out prompts: a phase trains the same without them.
_EVAL_ONLY = ("eval_source", "eval_examples")


def phase_settings(spec, upstream: dict) -> dict:
    """What ``spec`` computes from, as plain JSON; ``upstream``: phase name -> its fingerprint."""
    cfg = dataclasses.asdict(spec.cfg)
    for section in _NOT_SETTINGS:
        cfg.pop(section, None)
    cfg["train"].pop("time_budget_s", None)
    for key in _EVAL_ONLY:
        cfg["data"].pop(key, None)
    cfg.pop("phases", None)
    deps = {role: {"phase": name, "fingerprint": upstream[name]}
            for role, name in (("init", spec.init), ("input", spec.input)) if name in upstream}
    return json.loads(json.dumps(
        {"kind": spec.kind, "name": spec.name, "steps": spec.steps, "init": spec.init,
         "input": spec.input, "generate": dataclasses.asdict(spec.generate),
         "filter": dataclasses.asdict(spec.filter), "config": cfg, "upstream": deps},
        sort_keys=True, default=str))


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def _flat(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def settings_diff(old: dict, new: dict, limit: int = 6) -> list[str]:
    """``key: old -> new`` for the first ``limit`` keys that differ."""
    a, b = _flat(old), _flat(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys[:limit]]


def check_settings(pdir: str, spec, settings: dict) -> Optional[str]:
    """Raise if ``pdir`` holds this phase computed under other settings. Returns a warning when
    ``pdir`` has content but no settings record (written before settings were recorded: its
    settings cannot be checked), else None."""
    path = os.path.join(pdir, SETTINGS_FILE)
    try:
        with open(path) as f:
            stored = json.load(f)
    except FileNotFoundError:
        if os.path.isdir(pdir) and os.listdir(pdir):
            return (f"{spec.key} '{spec.name}': {pdir} has no {SETTINGS_FILE} (an older run); "
                    "reusing it without checking that its settings match this config.")
        return None
    except ValueError as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); delete {pdir} and every later phase_<k> "
                          "to recompute from this phase.") from None
    if stored.get("fingerprint") != fingerprint(settings):
        diff = settings_diff(stored.get("settings", {}), settings)
        raise ConfigError(
            f"{spec.key} '{spec.name}': {pdir} was computed under other settings than this "
            f"config's ({'; '.join(diff) or 'fingerprint differs'}). Its outputs would not be "
            "what this config asks for: use a new run directory (logging.run_dir / "
            f"checkpoint.dir), or delete {pdir} and every later phase_<k> to recompute from here.")
    return None


def record_settings(pdir: str, settings: dict) -> None:
    from r1mega.pipeline.session import write_json_atomic

    write_json_atomic(os.path.join(pdir, SETTINGS_FILE),
                      {"fingerprint": fingerprint(settings), "settings": settings})


def eval_set_id(records, rewards) -> str:
    """Which held-out prompts (and top-level rewards) a phase's evaluation was made on."""
    blob = json.dumps([[r.prompt for r in records], dataclasses.asdict(rewards)],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _relative(path, root: str):
    if not isinstance(path, str) or not path:
        return path
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return path if rel.startswith("..") else rel


def _resolved(path, root: str):
    if not isinstance(path, str) or not path:
        return path
    return path if os.path.isabs(path) else os.path.join(root, path)


def done_for_disk(done: dict, root: str) -> dict:
    """``done`` with its checkpoint and output paths relative to ``root``."""
    return {**done, "checkpoint": _relative(done.get("checkpoint"), root),
            "outputs": {k: _relative(v, root) for k, v in (done.get("outputs") or {}).items()}}


def done_from_disk(done: dict, root: str) -> dict:
    """The inverse of :func:`done_for_disk`; absolute paths (older runs) stay as they are."""
    return {**done, "checkpoint": _resolved(done.get("checkpoint"), root),
            "outputs": {k: _resolved(v, root) for k, v in (done.get("outputs") or {}).items()}}
