"""What a later run may reuse of a phase directory (r1mega/pipeline/reuse.py): a phase is reused
only under the settings it was computed with, a change upstream invalidates every phase built on
it, and settings that say only where a run writes do not."""
from __future__ import annotations

import copy
import os

import pytest

from r1mega.config import ConfigError, load_config
from r1mega.pipeline.config import parse_phases
from r1mega.pipeline.reuse import (SETTINGS_FILE, check_settings, done_for_disk, done_from_disk,
                                   fingerprint, phase_settings, record_settings)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _demo(overrides=()):
    return load_config(os.path.join(ROOT, "configs", "r1_demo.yaml"), list(overrides))


def _fingerprints(cfg) -> dict:
    out = {}
    for spec in parse_phases(cfg):
        out[spec.name] = fingerprint(phase_settings(spec, out))
    return out


def test_a_changed_phase_invalidates_itself_and_what_is_built_on_it_only():
    base = _fingerprints(_demo())
    cfg = _demo()
    gen = next(p for p in cfg.phases if p["kind"] == "generate")
    gen["generate"] = {**gen["generate"], "samples_per_prompt": gen["generate"]["samples_per_prompt"] + 1}
    changed = _fingerprints(cfg)
    same = {n for n in base if base[n] == changed[n]}
    # The two phases before the sampling keep theirs; the samples, the filter that reads them,
    # the SFT of the base and the student on the filtered rows, and the RL after that SFT change.
    assert same == {"cold_start", "reasoning_rl"}


def test_an_upstream_weight_change_reaches_the_phases_that_start_from_it():
    base = _fingerprints(_demo())
    cfg = _demo()
    cfg.phases = copy.deepcopy(cfg.phases)
    cfg.phases[0]["steps"] += 1  # the cold start
    changed = _fingerprints(cfg)
    # The student and the SFT of the base start from the base and read the filtered rows, which
    # come from samples of the RL model, which started from the cold start: all change.
    assert all(base[n] != changed[n] for n in base)


@pytest.mark.parametrize("override", ["logging.run_dir=/elsewhere", "checkpoint.save_every_steps=7",
                                      "train.time_budget_s=99", "data.eval_examples=5"])
def test_where_a_run_writes_and_what_it_holds_out_do_not_count(override):
    assert _fingerprints(_demo([override])) == _fingerprints(_demo())


@pytest.mark.parametrize("override", ["parallel.seed=3", "data.seed=2", "optimizer.lr=0.001",
                                      "rollout.temperature=0.7", "data.num_examples=900"])
def test_what_a_phase_computes_from_counts(override):
    base, changed = _fingerprints(_demo()), _fingerprints(_demo([override]))
    assert any(base[n] != changed[n] for n in base)


def test_check_settings_names_the_changed_key_and_leaves_the_directory_alone(tmp_path):
    specs = parse_phases(_demo())
    gen = specs[2]
    old = phase_settings(gen, {})
    pdir = str(tmp_path / "phase_2")
    record_settings(pdir, old)
    assert check_settings(pdir, gen, old) is None
    new = copy.deepcopy(old)
    new["generate"]["samples_per_prompt"] += 3
    before = open(os.path.join(pdir, SETTINGS_FILE)).read()
    with pytest.raises(ConfigError) as exc:
        check_settings(pdir, gen, new)
    msg = str(exc.value)
    assert "generate.samples_per_prompt" in msg and "phases[2]" in msg and "new run directory" in msg
    assert open(os.path.join(pdir, SETTINGS_FILE)).read() == before


def test_a_directory_without_a_settings_record(tmp_path):
    spec = parse_phases(_demo())[0]
    settings = phase_settings(spec, {})
    assert check_settings(str(tmp_path / "absent"), spec, settings) is None
    older = tmp_path / "phase_0"
    older.mkdir()
    assert check_settings(str(older), spec, settings) is None  # empty: nothing to reuse
    (older / "done.json").write_text("{}")
    assert "without checking" in check_settings(str(older), spec, settings)
    (older / SETTINGS_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match=SETTINGS_FILE):
        check_settings(str(older), spec, settings)


def test_done_paths_travel_with_the_run_directory(tmp_path):
    root = str(tmp_path / "run")
    done = {"name": "x", "kind": "generate", "checkpoint": os.path.join(root, "phase_1", "step_9"),
            "outputs": {"rows": os.path.join(root, "phase_2", "generated", "step_*.jsonl"),
                        "elsewhere": "/data/mix.jsonl"}, "eval": None}
    disk = done_for_disk(done, root)
    assert disk["checkpoint"] == os.path.join("phase_1", "step_9")
    assert disk["outputs"]["rows"] == os.path.join("phase_2", "generated", "step_*.jsonl")
    assert disk["outputs"]["elsewhere"] == "/data/mix.jsonl"  # outside the run: kept absolute
    moved = str(tmp_path / "moved")
    back = done_from_disk(disk, moved)
    assert back["checkpoint"] == os.path.join(moved, "phase_1", "step_9")
    assert back["outputs"]["elsewhere"] == "/data/mix.jsonl"
    # done.json files of older runs hold absolute paths: read as they are.
    assert done_from_disk(done, moved) == done
