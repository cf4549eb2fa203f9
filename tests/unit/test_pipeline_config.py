"""The typed phase list: overrides per phase, references between phases, errors naming the key."""
from __future__ import annotations

import os

import pytest

from r1mega.config import ConfigError, load_config, validate
from r1mega.pipeline.config import legacy_phases, parse_phases
from r1mega.pipeline.loop import pipeline_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cfg(phases):
    # demo.yaml's single-run keys (train.steps, sft_*) have no place beside a phase list.
    cfg = load_config(os.path.join(ROOT, "configs/r1_demo.yaml"))
    cfg.phases = phases
    return cfg


def test_each_phase_gets_the_top_level_tree_with_its_own_overrides():
    specs = parse_phases(_cfg([
        {"name": "cold", "kind": "sft", "steps": 5, "optimizer": {"lr": 3e-3}},
        {"name": "rl", "kind": "grpo", "steps": 7, "init": "cold",
         "rewards": {"spec": {"arithmetic": {"exact_match": 1.0}}}},
        {"name": "gen", "kind": "generate", "init": "rl", "generate": {"samples_per_prompt": 3}},
        {"name": "f", "kind": "filter", "input": "gen", "filter": {"best_k": 2}},
        {"name": "student", "kind": "distill", "steps": 2, "input": "f",
         "model": {"num_layers": 2, "hidden_size": 64}}]))
    cold, rl, gen, f, student = specs
    assert cold.cfg.optimizer.lr == 3e-3 and rl.cfg.optimizer.lr == 2e-4  # demo.yaml's
    assert rl.cfg.rewards.spec == {"arithmetic": {"exact_match": 1.0}}
    assert cold.cfg.rewards.spec["arithmetic"]["format"] == 0.1
    assert gen.generate.samples_per_prompt == 3 and f.filter.best_k == 2
    assert (student.cfg.model.num_layers, student.cfg.model.hidden_size) == (2, 64)
    assert cold.cfg.model.num_layers == 4 and cold.cfg.train.sft_batch_examples == 128
    assert [s.key for s in specs] == [f"phases[{i}]" for i in range(5)]


@pytest.mark.parametrize("phases, message", [
    ([{"kind": "sft", "steps": 1, "optimizer": {"lrr": 1}}], "phases[0].optimizer.lrr"),
    ([{"kind": "rl", "steps": 1}], "phases[0].kind"),
    ([{"kind": "sft", "step": 1}], "phases[0].step"),
    ([{"kind": "sft"}], "phases[0].steps"),
    ([{"kind": "grpo", "steps": 1, "init": "nowhere"}], "phases[0].init"),
    ([{"name": "a", "kind": "sft", "steps": 1}, {"name": "a", "kind": "sft", "steps": 1}],
     "phases[1].name"),
    ([{"kind": "filter"}], "phases[0].input"),
    ([{"name": "a", "kind": "sft", "steps": 1}, {"kind": "filter", "input": "a"}],
     "phases[1].input"),
    ([{"kind": "sft", "steps": 1, "filter": {"best_k": 2}}], "phases[0].filter"),
    ([{"name": "g", "kind": "generate"},
      {"kind": "filter", "input": "g", "filter": {"mix_share": 0.2}}], "mix_source"),
    ([{"name": "s", "kind": "sft", "steps": 1},
      {"kind": "grpo", "steps": 1, "init": "s", "model": {"num_layers": 1}}], "phases[1].init"),
    ([{"kind": "sft", "steps": 1, "optimizer": {"decay_style": "cosin"}}], "phases[0]"),
    ([{"kind": "sft", "steps": 1, "train": {"time_budget_s": 60}}], "phases[0].train.time_budget_s"),
    ([{"kind": "grpo", "steps": 1, "data": {"eval_examples": 5}}], "phases[0].data.eval_examples"),
])
def test_bad_phase_lists_name_the_key(phases, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(_cfg(phases))


def test_yaml_phases_load_through_the_one_config_tree(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("phases:\n  - {name: a, kind: sft, steps: 2, train: {sft_batch_examples: 8}}\n")
    cfg = validate(load_config(str(path)))
    (spec,) = parse_phases(cfg)
    assert spec.cfg.train.sft_batch_examples == 8 and cfg.train.sft_batch_examples == 32


def test_legacy_configs_are_their_one_or_two_phase_pipelines():
    demo = load_config(os.path.join(ROOT, "configs/demo.yaml"))
    assert legacy_phases(demo) == [
        {"name": "cold_start", "kind": "sft", "steps": 250,
         "optimizer": {"lr": 3e-3, "decay_style": "constant"}},
        {"name": "grpo", "kind": "grpo", "steps": 250, "init": "cold_start"}]
    sft = load_config(os.path.join(ROOT, "configs/demo.yaml"), ["train.mode=sft"])
    assert [p["kind"] for p in legacy_phases(sft)] == ["sft"]
    rl_only = load_config(os.path.join(ROOT, "configs/demo.yaml"), ["train.sft_steps=0"])
    assert legacy_phases(rl_only) == [{"name": "grpo", "kind": "grpo", "steps": 250, "init": "base"}]
    specs = parse_phases(pipeline_config(demo))
    assert specs[0].cfg.optimizer.lr == 3e-3 and specs[1].cfg.optimizer.lr == 2e-4
    with pytest.raises(ConfigError, match="checkpoint.load"):
        pipeline_config(load_config(os.path.join(ROOT, "configs/demo.yaml"),
                                    ["checkpoint.load=/x"]))


def test_the_r1_demo_config_validates():
    cfg = validate(load_config(os.path.join(ROOT, "configs/r1_demo.yaml")))
    kinds = [s.kind for s in parse_phases(cfg)]
    assert kinds == ["sft", "grpo", "generate", "filter", "sft", "grpo", "distill"]


def test_single_run_train_keys_are_rejected_beside_a_phase_list():
    cfg = load_config(os.path.join(ROOT, "configs/demo.yaml"))  # train.steps=250, sft_steps=250
    cfg.phases = [{"kind": "sft", "steps": 1}]
    with pytest.raises(ConfigError, match=r"train\.steps=250 has no effect in a pipeline"):
        validate(cfg)
    with pytest.raises(ConfigError, match=r"phases\[0\]\.train\.eval_every_steps"):
        validate(_cfg([{"kind": "sft", "steps": 1, "train": {"eval_every_steps": 5}}]))
