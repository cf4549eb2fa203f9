"""A pipeline run reuses what a run directory holds only where the phase's settings did not change.

One tiny pipeline (cold-start SFT, generate, filter, SFT of the base on the filtered rows) runs in
a fresh spawned process. Its first two phases are copied into a new directory (the original is
then deleted: the copies must not point back into it) and the pipeline runs again with another
filter: the copies are reused, the filter and the SFT after it run. A run with other sampling
settings in the same directory is refused, naming the key. A run that holds out other prompts
re-evaluates the finished phases' weights instead of retraining them.
"""
from __future__ import annotations

import copy
import json
import os
import shutil

import pytest

from tests.distributed.harness import run_ranks
from tests.distributed.test_pipeline_resume import LOOSE, _pipeline

PHASES = [
    {"name": "cold", "kind": "sft", "steps": 3, "optimizer": {"lr": 3e-3}},
    {"name": "gen", "kind": "generate", "init": "cold",
     "generate": {"samples_per_prompt": 2, "num_prompts": 8, "prompts_per_step": 4}},
    {"name": "filt", "kind": "filter", "input": "gen", "filter": LOOSE},
    {"name": "again", "kind": "sft", "steps": 2, "init": "base", "input": "filt"},
]


def _run(rank, world_size, run_dir, phases, overrides=()):
    """_pipeline, with a ConfigError returned (as text) instead of failing the rank."""
    from r1mega.config import ConfigError

    try:
        return _pipeline(rank, world_size, run_dir, phases, None, overrides)
    except ConfigError as exc:
        return {"error": str(exc)}


def _done(run_dir, k):
    with open(os.path.join(run_dir, f"phase_{k}", "done.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_reuse_only_what_the_settings_still_describe(tmp_path):
    first_dir, run_dir = str(tmp_path / "first"), str(tmp_path / "run")
    first = run_ranks(_run, world_size=1, args=(first_dir, PHASES))[0]
    assert first["code"] == 0, first
    for k in (0, 1):
        shutil.copytree(os.path.join(first_dir, f"phase_{k}"), os.path.join(run_dir, f"phase_{k}"))
    rows_before = open(os.path.join(first_dir, "phase_1", "generated",
                                    "step_000001.dp000.jsonl")).read()
    shutil.rmtree(first_dir)

    # Another filter: the cold start and the samples are reused (no step of theirs runs), read
    # from the new directory; the filter and the SFT that reads it run.
    phases = copy.deepcopy(PHASES)
    phases[2]["filter"] = {**LOOSE, "best_k": 1}
    second = run_ranks(_run, world_size=1, args=(run_dir, phases))[0]
    assert second["code"] == 0, second
    assert [c for c in second["calls"] if c[0] in ("cold", "gen")] == []
    assert [c for c in second["calls"] if c[0] == "again"] == [("again", 1), ("again", 2)]
    for name in ("cold", "gen"):
        assert "finished earlier, reusing" in second["out"].split(f"'{name}'")[1].splitlines()[0]
    assert _done(run_dir, 0)["checkpoint"].startswith("phase_0")  # relative to the run
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "phase_2", "sft.jsonl"))]
    assert rows and all(r["provenance"]["source_phase"] == "gen" for r in rows)
    assert len({r["provenance"]["prompt_id"] for r in rows}) == len(rows)  # best 1 per prompt

    # Other sampling settings in the same directory: refused before anything runs or changes.
    changed = copy.deepcopy(phases)
    changed[1]["generate"] = {**changed[1]["generate"], "samples_per_prompt": 3}
    third = run_ranks(_run, world_size=1, args=(run_dir, changed))[0]
    assert "error" in third and "generate.samples_per_prompt: 2 -> 3" in third["error"], third
    assert "phases[1] 'gen'" in third["error"]
    assert open(os.path.join(run_dir, "phase_1", "generated",
                             "step_000001.dp000.jsonl")).read() == rows_before

    # Other held-out prompts: every phase is reused, the trained ones evaluated again.
    evals = {k: _done(run_dir, k)["eval"] for k in (0, 3)}
    fourth = run_ranks(_run, world_size=1, args=(run_dir, phases, ["data.eval_examples=40"]))[0]
    assert fourth["code"] == 0 and fourth["calls"] == [], fourth
    assert fourth["out"].count("evaluating its final weights") == 2
    for k in (0, 3):
        now = _done(run_dir, k)["eval"]
        assert now["num_prompts"] > evals[k]["num_prompts"], (now, evals[k])
