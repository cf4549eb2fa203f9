"""configs/r1_demo.yaml against the demo it builds on and the baselines it is measured against:
the same model, task, rewards and held-out prompts; baselines with the recipe's step counts; a
held-out set no phase trains on."""
from __future__ import annotations

import dataclasses
import os

import pytest

from r1mega.config import load_config
from r1mega.data import build_prompt_source
from r1mega.pipeline.config import WEIGHT_KINDS, parse_phases
from r1mega.pipeline.session import Session

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = ("model", "data", "rollout", "grpo", "rewards", "optimizer", "parallel")


def _specs(name):
    return parse_phases(load_config(os.path.join(ROOT, "configs", name)))


def _load(name):
    return load_config(os.path.join(ROOT, "configs", name))


def test_the_recipe_shares_the_demos_sections():
    demo, r1 = _load("demo.yaml"), _load("r1_demo.yaml")
    for section in SHARED:
        assert dataclasses.asdict(getattr(r1, section)) == dataclasses.asdict(getattr(demo, section)), section
    for spec in _specs("r1_demo.yaml"):
        opt = spec.cfg.optimizer
        if spec.kind in ("sft", "distill"):
            # The demo's cold start: its lr and constant schedule, after the demo's warmup; the
            # student a third of that lr (configs/r1_demo.yaml says why).
            lr = demo.train.sft_lr / 3 if spec.kind == "distill" else demo.train.sft_lr
            assert opt.lr == pytest.approx(lr)
            assert (opt.decay_style, opt.warmup_steps) == (demo.train.sft_decay_style,
                                                           demo.optimizer.warmup_steps)
            assert spec.cfg.train.sft_batch_examples == demo.train.sft_batch_examples
        if spec.kind == "grpo":
            assert dataclasses.asdict(opt) == dataclasses.asdict(demo.optimizer)


def test_baselines_follow_the_recipes_step_counts_and_data():
    r1 = {s.name: s for s in _specs("r1_demo.yaml")}
    (zero,) = _specs("r1_demo_zero.yaml")
    (student_sft,) = _specs("r1_demo_student_sft.yaml")
    # R1-Zero: GRPO from the base, as many updates as every phase that trains the R1 model.
    r1_model = [s for s in r1.values() if s.kind in WEIGHT_KINDS and s.kind != "distill"]
    assert zero.kind == "grpo" and zero.init == "base"
    assert zero.steps == sum(s.steps for s in r1_model)
    # The student baseline: the recipe's student, steps and optimizer, on the cold-start data.
    student, cold = r1["student"], r1["cold_start"]
    assert student_sft.kind == "sft" and student_sft.init == "base" and not student_sft.input
    assert student_sft.steps == student.steps
    for section in ("model", "optimizer", "train"):
        assert dataclasses.asdict(getattr(student_sft.cfg, section)) == \
            dataclasses.asdict(getattr(student.cfg, section)), section
    assert dataclasses.asdict(student_sft.cfg.data) == dataclasses.asdict(cold.cfg.data)
    # The filter's non-reasoning share is drawn from the cold-start data, nothing more.
    assert dataclasses.asdict(r1["filtered"].cfg.data) == dataclasses.asdict(cold.cfg.data)
    # Every config measures on the same held-out prompts.
    tops = [_load(n).data for n in ("r1_demo.yaml", "r1_demo_zero.yaml", "r1_demo_student_sft.yaml")]
    assert all(dataclasses.asdict(t) == dataclasses.asdict(tops[0]) for t in tops)


def test_heldout_prompts_exclude_every_phases_training_prompts():
    cfg = _load("r1_demo.yaml")
    cfg.data.num_examples = 100
    cfg.phases = [{"name": "a", "kind": "sft", "steps": 1},
                  {"name": "b", "kind": "grpo", "steps": 1, "data": {"num_examples": 2000}}]
    session = Session(cfg, rt=None, logger=None, root="")
    session.specs = parse_phases(cfg)
    held = session.eval_records()
    wide = {build_prompt_source(session.specs[1].cfg.data)[i].prompt for i in range(2000)}
    assert held and not {r.prompt for r in held} & wide
    # Against the top-level source alone, some of phase b's prompts would count as held out.
    alone = Session(cfg, rt=None, logger=None, root="").eval_records()
    assert len(alone) > len(held) and {r.prompt for r in alone} & wide


def test_every_config_holds_out_the_same_several_hundred_prompts():
    """The bar compares configs on one held-out set: the same prompts, none trained on by any
    phase of any of them, and enough that a 5-point gap is more than noise."""
    held = {}
    for name in ("r1_demo.yaml", "r1_demo_zero.yaml", "r1_demo_student_sft.yaml"):
        cfg = _load(name)
        session = Session(cfg, rt=None, logger=None, root="")
        session.specs = parse_phases(cfg)
        held[name] = [r.prompt for r in session.eval_records()]
    assert len(held["r1_demo.yaml"]) >= 500
    assert all(h == held["r1_demo.yaml"] for h in held.values())
