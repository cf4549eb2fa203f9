"""`r1mega pipeline` resumes at (phase, step), bit-identical to an uninterrupted run.

The reference is one uninterrupted tiny pipeline (cold-start SFT, GRPO, generate, filter, SFT of
the base model on the filtered rows), one CPU rank in a fresh spawned process. Then the same
pipeline is stopped by SIGTERM raised inside a chosen step of a chosen phase and run again: the
second run must reuse every finished phase (no step of it runs again), continue the stopped one at
its step, and end with the same metrics, the same generated rows and the same final weights.
A 2-rank run checks the DP layout through sft -> generate -> filter -> sft.
"""
from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
import torch

from tests.distributed.harness import run_ranks

from r1mega.rewards.registry import RewardResult, register_reward

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
        "model.num_attention_heads=2", "model.num_query_groups=1",
        "data.num_examples=64", "data.eval_examples=16", "data.global_batch_prompts=4",
        "rollout.group_size=2", "rollout.max_new_tokens=8", "grpo.kl_beta=0.05",
        "optimizer.warmup_steps=1", "train.sft_batch_examples=4",
        "checkpoint.save_every_steps=2", "checkpoint.keep_last=10",
        "logging.samples_every_steps=0", "logging.tensorboard=false",
        "logging.progress_bar=false"]
WALL_CLOCK = ("time", "throughput", "memory", "eval/seconds")
LOOSE = {"require_correct": False, "require_valid_steps": False, "min_format": 0.0,
         "drop_truncated": False, "best_k": 2}
PHASES = [
    {"name": "cold", "kind": "sft", "steps": 4, "optimizer": {"lr": 3e-3}},
    {"name": "rl", "kind": "grpo", "steps": 3, "init": "cold"},
    {"name": "gen", "kind": "generate", "init": "rl",
     "generate": {"samples_per_prompt": 2, "num_prompts": 8, "prompts_per_step": 4}},
    {"name": "filt", "kind": "filter", "input": "gen", "filter": LOOSE},
    {"name": "again", "kind": "sft", "steps": 3, "init": "base", "input": "filt"},
]


@register_reward("test_digit_share_pipe")
def _digit_share(completion: str, reference: dict, **context) -> RewardResult:
    """Differs between random completions, so GRPO's gradients are not zero."""
    return RewardResult(sum(c.isdigit() for c in completion) / max(len(completion), 1), [])


def _pipeline(rank, world_size, run_dir, phases, stop, overrides=()):
    """run_pipeline on the tiny config; ``stop``: None or (phase name, step) to SIGTERM in.
    Returns the console, the parameters each phase started from / ended with (this process's
    phases only) and which (phase, step) calls ran."""
    import contextlib
    import io
    import signal

    from r1mega.config import load_config
    from r1mega.parallel.sharding import named_global_parameters
    from r1mega.pipeline import phases as phase_mod
    from r1mega.pipeline.loop import run_pipeline
    from r1mega.pipeline.session import Session
    from r1mega.train.grpo import GRPOStep
    from r1mega.train.sft import SFTStep

    calls, starts, policies = [], {}, {}
    init = Session.init_weights

    def recording_init(self, spec, policy):
        init(self, spec, policy)
        starts[spec.name] = {k: p.detach().clone() for k, p in named_global_parameters(policy.chunks)}
        policies[spec.name] = policy

    Session.init_weights = recording_init
    current = {"phase": None}
    run = phase_mod.Phase.__init__

    def phase_init(self, session, spec, *a, **k):
        current["phase"] = spec.name
        run(self, session, spec, *a, **k)

    phase_mod.Phase.__init__ = phase_init

    def wrap(cls):
        original = cls.__call__

        def call(self, step):
            calls.append((current["phase"], step))
            if stop and (current["phase"], step) == tuple(stop):
                signal.raise_signal(signal.SIGTERM)
            return original(self, step)

        cls.__call__ = call

    wrap(SFTStep)
    wrap(GRPOStep)
    gen = phase_mod.GeneratePhase._generate

    def generate(self, step, *a, **k):
        calls.append((self.spec.name, step))
        if stop and (self.spec.name, step) == tuple(stop):
            signal.raise_signal(signal.SIGTERM)
        return gen(self, step, *a, **k)

    phase_mod.GeneratePhase._generate = generate
    cfg = load_config(os.path.join(ROOT, "configs/r1_demo.yaml"),
                      TINY + [f"logging.run_dir={run_dir}", *overrides])
    cfg.rewards.spec = {"arithmetic": {"exact_match": 1.0, "test_digit_share_pipe": 0.5}}
    cfg.phases = phases
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_pipeline(cfg)
    ends = {name: {k: p.detach().clone() for k, p in named_global_parameters(p.chunks)}
            for name, p in policies.items()}
    return {"code": code, "out": out.getvalue(), "calls": calls, "starts": starts, "ends": ends}


def _metric_rows(run_dir) -> dict:
    """(tag prefix, step) -> row, the last one written for each (a resumed run appends)."""
    rows = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        row = json.loads(line)
        if "text" in row:
            continue
        keys = [k for k in row if k not in ("step", "time")]
        # Wall-clock figures differ between any two runs; everything else must not.
        rows[(keys[0].split("/")[0], row["step"])] = {
            k: row[k] for k in keys if not k.split("/", 1)[1].startswith(WALL_CLOCK)
            and not k.endswith(("_s", "_ms_per_step"))}
    return rows


def _generated(run_dir) -> list:
    return [json.loads(line) for path in sorted(glob.glob(os.path.join(run_dir, "phase_2/generated/*.jsonl")))
            for line in open(path)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("ref"))
    res = run_ranks(_pipeline, world_size=1, args=(run_dir, PHASES, None))[0]
    return run_dir, res


def test_uninterrupted_pipeline_and_phase3_starts_from_base(reference):
    run_dir, res = reference
    assert res["code"] == 0
    # Every phase ran each of its steps once.
    assert res["calls"] == ([("cold", s) for s in range(1, 5)] + [("rl", s) for s in range(1, 4)]
                            + [("gen", 1), ("gen", 2)] + [("again", s) for s in range(1, 4)])
    # Phase 3 starts from the base init, the cold start did too; RL started from the cold start.
    base, again, rl = res["starts"]["cold"], res["starts"]["again"], res["starts"]["rl"]
    for k in base:
        assert torch.equal(base[k], again[k]), k
    assert any(not torch.equal(res["ends"]["cold"][k], base[k]) for k in base)
    for k in base:
        assert torch.equal(rl[k], res["ends"]["cold"][k]), k
    # The table names every phase.
    assert "strict acc" in res["out"] and all(p["name"] in res["out"] for p in PHASES)
    assert os.path.exists(os.path.join(run_dir, "phases.txt"))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "phase_3/sft.jsonl"))]
    assert rows and all(r["provenance"]["source_phase"] == "gen" for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [("cold", 3), ("rl", 2), ("gen", 1), ("again", 2)])
def test_killed_pipeline_resumes_bit_identical(reference, tmp_path, stop):
    ref_dir, ref = reference
    run_dir = str(tmp_path / "run")
    first = run_ranks(_pipeline, world_size=1, args=(run_dir, PHASES, stop))[0]
    assert first["code"] == 0 and "stopped (preempted)" in first["out"]
    assert first["calls"][-1] == tuple(stop)
    second = run_ranks(_pipeline, world_size=1, args=(run_dir, PHASES, None))[0]
    order = [p["name"] for p in PHASES]
    stopped = order.index(stop[0])
    # Finished phases are reused, not rerun; the stopped one continues after its last checkpoint
    # (training phases save every 2 steps and on the signal; generate steps are their own unit).
    for name in order[:stopped]:
        assert "finished earlier, reusing" in second["out"].split(f"'{name}'")[1].splitlines()[0]
    assert second["calls"][0] == (stop[0], stop[1] + 1)
    got, want = _metric_rows(run_dir), _metric_rows(ref_dir)
    assert got.keys() == want.keys()
    diff = [(key, k) for key in want for k in want[key] if got[key].get(k) != want[key][k]]
    assert not diff, diff[:5]
    assert _generated(run_dir) == _generated(ref_dir)
    for k, v in ref["ends"]["again"].items():
        assert torch.equal(second["ends"]["again"][k], v), k
    assert open(os.path.join(run_dir, "phases.txt")).read() == \
        open(os.path.join(ref_dir, "phases.txt")).read()


@pytest.mark.slow
def test_time_budget_stops_at_a_step_boundary_and_the_rerun_continues(reference, tmp_path):
    ref_dir, ref = reference
    run_dir = str(tmp_path / "run")
    # A budget already spent: the loop stops after the first step (it always makes one).
    first = run_ranks(_pipeline, world_size=1,
                      args=(run_dir, PHASES, None, ["train.time_budget_s=0.001"]))[0]
    assert first["code"] == 0 and "stopped (time_budget)" in first["out"]
    assert first["calls"] == [("cold", 1)]
    second = run_ranks(_pipeline, world_size=1, args=(run_dir, PHASES, None))[0]
    assert second["calls"][0] == ("cold", 2)
    for k, v in ref["ends"]["again"].items():
        assert torch.equal(second["ends"]["again"][k], v), k


def test_three_phases_on_two_ranks(tmp_path):
    phases = [{"name": "cold", "kind": "sft", "steps": 2, "optimizer": {"lr": 3e-3}},
              {"name": "gen", "kind": "generate", "init": "cold",
               "generate": {"samples_per_prompt": 2, "num_prompts": 6, "prompts_per_step": 4}},
              {"name": "filt", "kind": "filter", "input": "gen", "filter": LOOSE}]
    run_dir = str(tmp_path / "run")
    res = run_ranks(_pipeline, world_size=2, args=(run_dir, phases, None))
    assert [r["code"] for r in res] == [0, 0]
    gen = [json.loads(line) for p in sorted(glob.glob(os.path.join(run_dir, "phase_1/generated/*.jsonl")))
           for line in open(p)]
    # 6 prompts (the second step has 2, one per rank) x 2 samples, each prompt written once.
    assert len(gen) == 12 and len({r["prompt_id"] for r in gen}) == 6
    assert len(glob.glob(os.path.join(run_dir, "phase_1/generated/step_000002.dp*.jsonl"))) == 2
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "phase_2/sft.jsonl"))]
    assert rows and {r["provenance"]["phase"] for r in rows} == {"filt"}
    # Both ranks trained the same replicated weights.
    for k in res[0]["ends"]["cold"]:
        assert torch.equal(res[0]["ends"]["cold"][k], res[1]["ends"]["cold"][k]), k
