"""SFT: worked arithmetic solutions agree with Python's own evaluation, only response tokens are
trained, a few steps on a fixed batch lower the loss, bad rows are reported with file and line,
and the embedded demo recipe equals configs/demo.yaml."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch
import yaml

from r1mega.config import Config, ModelConfig, OptimizerConfig, load_config
from r1mega.train.sft import (SFTDataError, SFTStep, encode_pair, load_sft_file,
                              worked_arithmetic)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_worked_arithmetic_matches_python_eval():
    rng = random.Random(0)
    for _ in range(500):
        terms = rng.randint(2, 4)
        expr = str(rng.randint(0, 99))
        for _ in range(terms - 1):
            expr += rng.choice("+-*") + str(rng.randint(0, 99))
        reasoning, answer = worked_arithmetic(expr)
        assert int(answer) == eval(expr), expr  # noqa: S307 -- digits and +-* only
        assert reasoning.count("=") == terms - 1
        # every line is itself a true equation
        for line in reasoning.split(","):
            lhs, rhs = line.split("=")
            assert eval(lhs) == int(rhs), (expr, line)  # noqa: S307


def test_builtin_source_and_mask():
    from r1mega.data import load_tokenizer
    from r1mega.train.sft import build_sft_source

    cfg = Config()
    cfg.data.source, cfg.data.template, cfg.data.num_examples = "builtin:arithmetic", "raw", 50
    src = build_sft_source(cfg.train, cfg.data)
    tok = load_tokenizer("char")
    prompt, response = src[3]
    assert response.startswith("<think>") and response.endswith("</answer>")
    s = encode_pair(prompt, response, cfg.data, tok, 512)
    n_prompt = len(tok.encode(prompt, add_bos=True))
    n_resp = len(tok.encode(response)) + 1  # + EOS
    assert s["input_ids"].numel() == n_prompt + n_resp
    assert int(s["loss_mask"].sum()) == n_resp
    # the first trained position predicts the first response token
    first = int(torch.nonzero(s["loss_mask"])[0])
    assert first == n_prompt - 1 and int(s["labels"][first]) == tok.encode(response)[0]


def test_bad_rows_name_file_and_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" +
                    json.dumps({"prompt": "c"}) + "\n")
    with pytest.raises(SFTDataError, match=r"sft.jsonl:2"):
        load_sft_file(str(path))
    stats = {}
    assert load_sft_file(str(path), "skip", stats) == [("a", "b")] and stats["bad_rows"] == 1
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{not json\n")
    with pytest.raises(SFTDataError, match=r"broken.jsonl:2: not valid JSON"):
        load_sft_file(str(broken))
    assert load_sft_file(str(broken), "skip", stats) == [("a", "b")] and stats["bad_rows"] == 1


def test_sft_steps_lower_the_loss(single_rank_runtime):
    from r1mega.data import load_tokenizer
    from r1mega.train.roles import Policy

    cfg = Config()
    cfg.model = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=64, vocab_size=128, max_position_embeddings=64)
    cfg.data.template = "raw"
    cfg.train.sft_batch_examples = 4
    cfg.optimizer = OptimizerConfig(lr=1e-2)
    rt = single_rank_runtime()
    torch.manual_seed(0)
    policy = Policy.build(cfg.model, cfg.precision, cfg.optimizer, rt, distributed_optimizer=True,
                          micro_batch_tokens=256, total_steps=30)
    pairs = [("1+2=", "<think>1+2=3</think><answer>3</answer>"),
             ("4-1=", "<think>4-1=3</think><answer>3</answer>")] * 2
    step = SFTStep(cfg, rt, policy, load_tokenizer("char"), pairs)
    losses = [step(i)["loss"] for i in range(1, 31)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_demo_recipe_equals_configs_demo_yaml():
    from r1mega.config import to_dict
    from r1mega.train.trainer import demo_config

    path = os.path.join(ROOT, "configs", "demo.yaml")
    with open(path) as f:
        yaml.safe_load(f)  # valid YAML
    assert to_dict(load_config(path)) == to_dict(demo_config())


def test_cold_start_keeps_its_own_lr_schedule(single_rank_runtime):
    """The demo's cold start holds its lr (train.sft_decay_style) while RL decays its own
    (optimizer.decay_style): one optimizer section, two schedules."""
    from r1mega.train import trainer

    cfg = trainer.demo_config(["model.num_layers=1"])
    rt = single_rank_runtime()
    sft = trainer._build_policy(cfg, rt, lr=cfg.train.sft_lr, total_steps=20,
                                decay_style=cfg.train.sft_decay_style)
    rl = trainer._build_policy(cfg, rt, total_steps=20)
    for _ in range(18):  # 10 warmup steps, then 8 of the 10 decay steps
        sft.optim.scheduler.step(1)
        rl.optim.scheduler.step(1)
    assert sft.optim.scheduler.get_lr(sft.optim.optimizer.param_groups[0]) == cfg.train.sft_lr
    assert rl.optim.scheduler.get_lr(rl.optim.optimizer.param_groups[0]) < 0.5 * cfg.optimizer.lr
