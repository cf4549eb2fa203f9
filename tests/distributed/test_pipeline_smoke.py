"""Each phase kind alone, and configs/r1_demo.yaml end to end with every budget shrunk (the
smoke version of the recipe: all seven phases, the table, the student)."""
from __future__ import annotations

import copy
import json
import os

import pytest

from tests.distributed.harness import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["data.num_examples=48", "data.eval_examples=12", "data.global_batch_prompts=4",
         "rollout.group_size=2", "rollout.max_new_tokens=12", "train.sft_batch_examples=4",
         "logging.samples_every_steps=0", "logging.tensorboard=true", "logging.progress_bar=false"]
TINY_MODEL = ["model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64",
              "model.num_attention_heads=2", "model.num_query_groups=1"]
LOOSE = {"require_correct": False, "require_valid_steps": False, "min_format": 0.0,
         "drop_truncated": False}


def smoke_phases(phases: list) -> list:
    """r1_demo.yaml's phases with two steps each and a handful of prompts."""
    out = copy.deepcopy(phases)
    for p in out:
        if "steps" in p:
            p["steps"] = 2
        if "train" in p:
            p["train"]["sft_batch_examples"] = 4
        if "num_examples" in p.get("data", {}):  # a subset of the 48 training prompts
            p["data"]["num_examples"] = 16
        if p["kind"] == "generate":
            p["generate"].update(num_prompts=6, prompts_per_step=4)
        if p["kind"] == "filter":
            # An untrained model is never right: keep its samples so later phases have data.
            p["filter"].update(LOOSE)
    return out


def _run(rank, world_size, run_dir, overrides, phases, prepare=None):
    import contextlib
    import io

    from r1mega.config import load_config
    from r1mega.parallel.runtime import destroy_parallel
    from r1mega.pipeline.loop import run_pipeline

    cfg = load_config(os.path.join(ROOT, "configs/r1_demo.yaml"),
                      SMALL + overrides + [f"logging.run_dir={run_dir}"])
    cfg.phases = smoke_phases(cfg.phases) if phases is None else phases
    if prepare:
        for path, text in prepare.items():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_pipeline(cfg)
    destroy_parallel()
    return {"code": code, "out": out.getvalue()}


def _done(run_dir, k) -> dict:
    return json.load(open(os.path.join(run_dir, f"phase_{k}", "done.json")))


def test_r1_demo_smoke(tmp_path):
    run_dir = str(tmp_path / "r1")
    res = run_ranks(_run, world_size=1, args=(run_dir, [], None))[0]
    assert res["code"] == 0
    names = ["cold_start", "reasoning_rl", "samples", "filtered", "sft_base", "all_rl", "student"]
    for k, name in enumerate(names):
        assert _done(run_dir, k)["name"] == name
    table = open(os.path.join(run_dir, "phases.txt")).read()
    assert all(name in table for name in names) and "strict acc" in table
    for k in (0, 1, 4, 5, 6):  # the weight-training phases are evaluated
        ev = _done(run_dir, k)["eval"]
        assert 0.0 <= ev["accuracy"] <= 1.0 and 0.0 <= ev["language"] <= 1.0 and ev["num_prompts"] > 0
    # The student is the smaller model, trained on the filtered rows; done.json paths are
    # relative to the run directory (so that it can move).
    ckpt = _done(run_dir, 6)["checkpoint"]
    assert ckpt.startswith("phase_6") and os.path.isdir(os.path.join(run_dir, ckpt))
    meta = json.load(open(os.path.join(run_dir, "phase_3", "filter_stats.json")))
    assert meta["generated"] == 6 * 4 and meta["mixed"] > 0
    assert os.listdir(os.path.join(run_dir, "tensorboard"))  # one run directory for all phases


STUDENT = {"num_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "num_query_groups": 1,
           "ffn_hidden_size": 32}
SPM = os.path.join(ROOT, "tests/assets/botchan_en_unigram_1000.model")
CASES = {
    "sft": ([{"name": "a", "kind": "sft", "steps": 2}], None),
    "grpo": ([{"name": "a", "kind": "grpo", "steps": 2}], None),
    "generate": ([{"name": "a", "kind": "generate", "generate": {
        "samples_per_prompt": 2, "num_prompts": 3, "prompts_per_step": 2}}], None),
    # filter and distill read an earlier phase's output: that phase is marked finished with
    # hand-made files, so only the phase under test runs.
    "filter": ([{"name": "g", "kind": "generate"},
                {"name": "a", "kind": "filter", "input": "g"}], "g"),
    "distill": ([{"name": "g", "kind": "generate"},
                 {"name": "f", "kind": "filter", "input": "g"},
                 {"name": "a", "kind": "distill", "steps": 2, "input": "f", "model": STUDENT}], "f"),
    # The student may read the teacher's text with a tokenizer of its own.
    "distill_own_tokenizer": (
        [{"name": "g", "kind": "generate"},
         {"name": "f", "kind": "filter", "input": "g"},
         {"name": "a", "kind": "distill", "steps": 2, "input": "f",
          "model": {**STUDENT, "vocab_size": 1024}, "data": {"tokenizer": SPM}}], "f"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_phase_kind_alone(tmp_path, case):
    row = {"prompt": "1+2+3=", "response": "<think>1+2=3,3+3=6</think><answer>6</answer>"}
    gen_row = {"phase": "g", "step": 1, "prompt_id": "x#0", "prompt": "1+2+3=", "kind": "arithmetic",
               "reference": {"answer": 6}, "completion": row["response"], "sample_index": 0,
               "finish_reason": "stop", "num_tokens": 40, "reward": 1.1, "components": {},
               "correct": True}
    phases, fake = CASES[case]
    kind = phases[-1]["kind"]
    run_dir = str(tmp_path / case)
    prepare = {}
    if fake:
        rows = os.path.join(run_dir, "phase_0", "generated", "step_000001.dp000.jsonl")
        sft = os.path.join(run_dir, "phase_1", "sft.jsonl")
        prepare = {rows: json.dumps(gen_row) + "\n",
                   os.path.join(run_dir, "phase_0", "done.json"): json.dumps(
                       {"name": "g", "kind": "generate", "checkpoint": None, "eval": None,
                        "outputs": {"rows": rows}})}
        if fake == "f":
            prepare[sft] = (json.dumps(row) + "\n") * 4
            prepare[os.path.join(run_dir, "phase_1", "done.json")] = json.dumps(
                {"name": "f", "kind": "filter", "checkpoint": None, "eval": None,
                 "outputs": {"data": sft}})
    res = run_ranks(_run, world_size=1, args=(run_dir, TINY_MODEL, phases, prepare))[0]
    assert res["code"] == 0, kind
    k = len(phases) - 1
    done = _done(run_dir, k)
    assert done["kind"] == kind and f"'a' ({kind}) starts" in res["out"]
    if kind in ("sft", "grpo", "distill"):
        assert os.path.basename(done["checkpoint"]) == "step_00000002"
        assert done["eval"]["num_prompts"] > 0
    if kind == "generate":
        rows = [json.loads(line) for name in ("step_000001.dp000.jsonl", "step_000002.dp000.jsonl")
                for line in open(os.path.join(run_dir, "phase_0", "generated", name))]
        assert len(rows) == 6 and {r["prompt_id"] for r in rows} == {
            "builtin:arithmetic#0", "builtin:arithmetic#1", "builtin:arithmetic#2"}
    if kind == "filter":
        (out,) = [json.loads(line) for line in open(os.path.join(run_dir, done["outputs"]["data"]))]
        assert out["response"] == row["response"] and out["provenance"]["prompt_id"] == "x#0"
