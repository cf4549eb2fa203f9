"""A pipeline whose phases are the demo's (cold-start SFT, then GRPO from it) computes what
`r1mega train` computes: the same loss, rewards and gradient norm at every step.

Both programs must start from the same weights for that to hold. With a random init they do not:
`run_train` builds its GRPO policy first and the cold start's second, so its cold start draws the
second init after seeding, the pipeline's the first (a different, equally random model; this is
why `r1mega demo` and an equivalent pipeline print different accuracies on one seed). Here both
start from one tiny Hugging Face checkpoint (``model.init_from_hf``), which both load the same
way, so any difference left would be the pipeline's: an optimizer or schedule override not
applied, another data order, other sampling seeds, another reward.
"""
from __future__ import annotations

import json
import os

import pytest

from tests.distributed.harness import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["data.num_examples=48", "data.eval_source=null", "data.global_batch_prompts=4",
         "rollout.group_size=4", "rollout.max_new_tokens=12", "train.sft_batch_examples=8",
         "logging.samples_every_steps=0", "logging.tensorboard=false",
         "logging.progress_bar=false", "logging.log_every_steps=1"]
SFT_STEPS, GRPO_STEPS = 4, 3
# The demo's steps and SFT settings, as `r1mega train` keys and as a phase list.
TRAIN_KEYS = [f"train.sft_steps={SFT_STEPS}", f"train.steps={GRPO_STEPS}",
              "train.eval_every_steps=0"]
PHASES = [{"name": "cold_start", "kind": "sft", "steps": SFT_STEPS,
           "optimizer": {"lr": 3e-3, "decay_style": "constant"}},
          {"name": "grpo", "kind": "grpo", "init": "cold_start", "steps": GRPO_STEPS}]


def _tiny_hf(path: str) -> None:
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    conf = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, max_position_embeddings=128,
                                    tie_word_embeddings=False, attention_dropout=0.0)
    transformers.LlamaForCausalLM(conf).save_pretrained(path)


def _both(rank, world_size, tmp):
    import contextlib
    import io

    from r1mega.config import TrainConfig, load_config
    from r1mega.pipeline.config import REPLACED_TRAIN_KEYS
    from r1mega.parallel.runtime import destroy_parallel
    from r1mega.pipeline.loop import run_pipeline
    from r1mega.train.trainer import run_train

    import yaml

    hf = os.path.join(tmp, "hf")
    _tiny_hf(hf)
    # configs/demo.yaml with the HF directory as its model (which then describes the model).
    recipe = yaml.safe_load(open(os.path.join(ROOT, "configs/demo.yaml")))
    recipe["model"] = {"init_from_hf": hf}
    demo = os.path.join(tmp, "demo.yaml")
    with open(demo, "w") as f:
        yaml.safe_dump(recipe, f)
    common = SMALL + ["data.tokenizer=char"]
    out = {}
    for name in ("train", "pipeline"):
        run_dir = os.path.join(tmp, name)
        if name == "train":
            cfg = load_config(demo, common + TRAIN_KEYS + [f"logging.run_dir={run_dir}"])
            fn = run_train
        else:
            cfg = load_config(demo, common + [f"logging.run_dir={run_dir}"])
            fresh = TrainConfig()  # the keys a phase list replaces, back at their defaults
            for key in REPLACED_TRAIN_KEYS:
                setattr(cfg.train, key, getattr(fresh, key))
            cfg.phases = PHASES
            fn = run_pipeline
        with contextlib.redirect_stdout(io.StringIO()):
            assert fn(cfg) == 0
        destroy_parallel()
        out[name] = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return out


def _series(rows, key):
    return [(r["step"], r[key]) for r in rows if key in r]


@pytest.mark.slow  # two tiny training runs in one spawned process (15-30 s on 2 shared cores)
def test_demo_phases_as_a_pipeline_match_r1mega_train(tmp_path):
    got = run_ranks(_both, world_size=1, args=(str(tmp_path),))[0]
    train, pipe = got["train"], got["pipeline"]
    checked = 0
    for train_key, pipe_key in [("sft/loss", "cold_start/loss"), ("sft/lr", "cold_start/lr"),
                                ("sft/grad_norm", "cold_start/grad_norm"),
                                ("loss", "grpo/loss"), ("lr", "grpo/lr"),
                                ("reward/mean", "grpo/reward/mean"),
                                ("grad_norm", "grpo/grad_norm"),
                                ("response/length_mean", "grpo/response/length_mean")]:
        a, b = _series(train, train_key), _series(pipe, pipe_key)
        assert len(a) == len(b) > 0, (train_key, a, b)
        assert a == b, f"{train_key} (train) vs {pipe_key} (pipeline): {a} != {b}"
        checked += len(a)
    assert checked == 3 * SFT_STEPS + 5 * GRPO_STEPS
