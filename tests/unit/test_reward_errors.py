"""Reward failures during GRPO: counted per step (summed over completions), warned about on the
console, and fatal past ``rewards.max_error_rate`` -- by hand-made scores and through a real
GRPO step on a tiny model whose reward raises."""
from __future__ import annotations

import pytest
import torch

from r1mega.config import Config, ConfigError, ModelConfig, OptimizerConfig, load_config, validate
from r1mega.rewards.registry import RewardResult, register_reward
from r1mega.rewards.scorer import ScoredItem
from r1mega.train.reward_errors import (RewardErrorRateError, check_reward_errors, error_metrics,
                                        error_sums, first_error)


def _scored(n_ok: int, errors: list) -> list:
    return [ScoredItem(1.0) for _ in range(n_ok)] + [ScoredItem(0.0, error=e) for e in errors]


def _metrics(scored, before=None, after=None) -> dict:
    stats = dict(error_sums(scored), n=float(len(scored)))
    return error_metrics(stats, before or {}, after or {})


def test_counts_and_rate():
    scored = _scored(18, ["code_tests: timed out after 10 s", "math_accuracy raised KeyError"])
    m = _metrics(scored, {"timeouts": 3, "errors": 1, "crashes": 0},
                 {"timeouts": 4, "errors": 2, "crashes": 0})
    assert m["reward/errors"] == 2 and m["reward/error_rate"] == pytest.approx(0.1)
    assert (m["reward/timeouts"], m["reward/raised"], m["reward/worker_deaths"]) == (1, 1, 0)


def test_no_errors_is_silent(capsys):
    scored = _scored(8, [])
    check_reward_errors(3, _metrics(scored), first_error(scored), 0.0)
    check_reward_errors(3, {"loss": 1.0}, None, 0.0)  # an SFT step: no reward counts
    assert capsys.readouterr().out == ""


def test_below_the_limit_warns_with_the_first_error(capsys):
    scored = _scored(99, ["code_tests: the sandbox failed (crashed)\n  judge ended"])
    check_reward_errors(7, _metrics(scored), first_error(scored), 0.05)
    out = capsys.readouterr().out
    assert "WARNING" in out and "step 7" in out and "1 of 100" in out
    assert "the sandbox failed (crashed) judge ended" in out  # one line
    check_reward_errors(7, _metrics(scored), first_error(scored), 0.05, rank=1)
    assert capsys.readouterr().out == ""  # rank 0 speaks for all


def test_over_the_limit_stops_the_run():
    scored = _scored(9, ["countdown: the reference has no 'target' field"] * 3)
    with pytest.raises(RewardErrorRateError) as err:
        check_reward_errors(2, _metrics(scored), first_error(scored), 0.05)
    msg = str(err.value)
    assert "3 of 12" in msg and "rewards.max_error_rate=0.05" in msg and "'target'" in msg
    assert not isinstance(err.value, RuntimeError)  # the trainer's dead-peer exit ignores it
    check_reward_errors(2, _metrics(scored), first_error(scored), 1.0)  # 1: never stop


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_max_error_rate_is_validated(value):
    with pytest.raises(ConfigError, match="rewards.max_error_rate"):
        validate(load_config(None, [f"rewards.max_error_rate={value}"]))


def test_max_error_rate_default():
    assert validate(load_config(None, [])).rewards.max_error_rate == 0.05


@register_reward("test_always_raises")
def _always_raises(completion: str, reference: dict, **context) -> RewardResult:
    raise ValueError("a broken reward")


def _tiny_cfg(max_error_rate: float) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=64, vocab_size=128, max_position_embeddings=64)
    cfg.data.source = "builtin:arithmetic"
    cfg.data.template = "raw"
    cfg.data.num_examples = 16
    cfg.data.global_batch_prompts = 2
    cfg.data.micro_batch_tokens = 128
    cfg.rollout.group_size = 2
    cfg.rollout.max_new_tokens = 4
    cfg.rollout.kv_cpu_tokens = 1024
    cfg.rollout.kv_block_tokens = 4
    cfg.rollout.cuda_graphs = False
    cfg.rewards.spec = {"arithmetic": {"test_always_raises": 1.0, "format": 0.1}}
    cfg.rewards.num_workers = 0
    cfg.rewards.max_error_rate = max_error_rate
    cfg.optimizer = OptimizerConfig(lr=1e-3)
    return cfg


class _Logger:
    def __init__(self):
        self.logged = []

    def log(self, step, metrics, prefix=""):
        self.logged.append((step, metrics.get("reward/errors")))

    def console(self, step, metrics, total=None):
        pass

    def text(self, step, tag, text):
        pass


@pytest.mark.parametrize("max_error_rate", [1.0, 0.05])
def test_grpo_steps_count_reward_errors_and_the_loop_stops(single_rank_runtime, capsys,
                                                           max_error_rate):
    """A real GRPO step on a tiny model whose reward always raises, driven by the trainer's
    loop: every completion's error is counted; at the default limit the first step's metrics
    are logged (even off the logging cadence) and then the run stops."""
    from r1mega.data import PromptSampler, build_prompt_source, load_tokenizer
    from r1mega.rewards.scorer import RewardScorer
    from r1mega.train.grpo import GRPOStep
    from r1mega.train.roles import Policy, Rollout
    from r1mega.train.trainer import _loop

    cfg = _tiny_cfg(max_error_rate)
    cfg.logging.log_every_steps = 10
    rt = single_rank_runtime()
    torch.manual_seed(0)
    tok = load_tokenizer("char")
    policy = Policy.build(cfg.model, cfg.precision, cfg.optimizer, rt, distributed_optimizer=False,
                          micro_batch_tokens=cfg.data.micro_batch_tokens, total_steps=2)
    rollout = Rollout(policy, cfg.rollout, rt, eos_ids=[tok.eos_id], decode_fn=tok.decode,
                      vocab_size=tok.vocab_size)
    sampler = PromptSampler(build_prompt_source(cfg.data), rt.dp_rank, rt.dp_size)
    logger, n = _Logger(), cfg.data.global_batch_prompts * cfg.rollout.group_size
    with RewardScorer(cfg.rewards, num_workers=0) as scorer:
        step = GRPOStep(cfg, rt, policy, rollout, scorer, sampler, tok)

        def run():
            return _loop(cfg, rt, logger, None, step, start=0, total=2, prefix="",
                         state_fn=None, policy=policy)

        if max_error_rate < 1.0:
            with pytest.raises(RewardErrorRateError, match=f"{n} of {n} completions.*a broken "
                                                           "reward.*max_error_rate=0.05"):
                run()
            assert logger.logged == [(1, n)]
            return
        m = step(1).metrics
        assert run() == (2, "done")
    assert m["reward/errors"] == n and m["reward/error_rate"] == 1.0 and m["reward/raised"] == n
    assert logger.logged == [(2, n)]  # the cadence: only the last step
    out = capsys.readouterr().out
    assert out.count("WARNING: step") == 2  # the loop warns, once per step; step(1) alone not
    assert "test_always_raises raised ValueError: a broken reward" in out
