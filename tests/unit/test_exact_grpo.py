"""The trainer's side of rollout.exact: a GRPO step whose recomputed log-probs equal the
rollout's bit for bit (rollout/logprob_max_abs_diff == 0), the same metric in the default mode,
and the per-step check stopping a run whose log-probs are not bitwise equal."""
from __future__ import annotations

import math

import pytest
import torch

from r1mega.config import ConfigError
from r1mega.config_checks import validate_exact
from r1mega.rl.logprob_check import ExactLogprobMismatch, LogprobCheck
from tests.unit.test_grpo_step import tiny_cfg


def run_step(single_rank_runtime, exact: bool, inner_epochs: int = 1) -> dict:
    from r1mega.data import PromptSampler, build_prompt_source, load_tokenizer
    from r1mega.rewards.scorer import RewardScorer
    from r1mega.train.grpo import GRPOStep
    from r1mega.train.roles import Policy, Rollout

    cfg = tiny_cfg()
    cfg.model.spec = "local"
    cfg.rollout.exact = exact
    cfg.rollout.compile_decode = False
    cfg.grpo.inner_epochs = inner_epochs
    validate_exact(cfg)
    rt = single_rank_runtime()
    torch.manual_seed(0)
    tok = load_tokenizer("char")
    policy = Policy.build(cfg.model, cfg.precision, cfg.optimizer, rt, distributed_optimizer=True,
                          micro_batch_tokens=cfg.data.micro_batch_tokens, total_steps=2)
    rollout = Rollout(policy, cfg.rollout, rt, eos_ids=[tok.eos_id], decode_fn=tok.decode,
                      vocab_size=tok.vocab_size)
    sampler = PromptSampler(build_prompt_source(cfg.data), rt.dp_rank, rt.dp_size)
    with RewardScorer(cfg.rewards, num_workers=0) as scorer:
        step = GRPOStep(cfg, rt, policy, rollout, scorer, sampler, tok)
        return [step(i).metrics for i in (1, 2)]


@pytest.mark.parametrize("inner_epochs", [1, 2])
def test_exact_step_logprobs_equal_rollout(single_rank_runtime, inner_epochs):
    # Two steps: the second generates from weights the first updated, and is checked again.
    for m in run_step(single_rank_runtime, exact=True, inner_epochs=inner_epochs):
        assert m["rollout/logprob_max_abs_diff"] == 0.0
        assert m["update_skipped"] == 0.0


def test_default_step_logs_the_gap(single_rank_runtime):
    for m in run_step(single_rank_runtime, exact=False):
        gap = m["rollout/logprob_max_abs_diff"]
        assert math.isfinite(gap) and 0.0 <= gap < 1e-3


def test_check_stops_on_one_ulp():
    lp = torch.tensor([-1.5, -2.25, -0.75, -3.0])
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0])
    check = LogprobCheck(exact=True)
    check.start_step()
    off = lp.clone()
    off[3] = torch.nextafter(off[3], torch.tensor(0.0))
    with pytest.raises(ExactLogprobMismatch, match="packed token 3"):
        check.observe(lp, off, mask)
    # Only the first micro-batch of a step is asserted; the max is kept for the metric.
    check.start_step()
    check.observe(lp, lp, mask)
    check.observe(lp, off, mask)
    assert check.finish_step() == float((lp[3] - off[3]).abs())
    # A masked token's difference does not count.
    masked = lp.clone()
    masked[2] = 0.0
    check.start_step()
    check.observe(lp, masked, mask)
    assert check.finish_step() == 0.0


@pytest.mark.parametrize("key,value", [
    ("precision.fp8", True), ("model.spec", "te"), ("model.num_experts", 4),
    ("model.compile_layers", True), ("rollout.compile_decode", True), ("rollout.top_k", 5),
    ("rollout.top_p", 0.9), ("parallel.pipeline", 2), ("parallel.tensor", 4),
])
def test_validation_refuses_what_exact_cannot_keep(key, value):
    cfg = tiny_cfg()
    cfg.rollout.exact = True
    cfg.rollout.compile_decode = False
    validate_exact(cfg)  # the base config is accepted
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=f"rollout.exact=true with {key}"):
        validate_exact(cfg)


def test_exact_takes_the_local_spec_where_auto_would_take_te():
    """model.spec=auto picks Transformer Engine's layers on a GPU where TE imports, which the
    exact mode cannot run (seen on the H200 once TE was installed: the engine refused layer 0):
    with rollout.exact validation resolves auto to local; the default mode keeps auto."""
    cfg = tiny_cfg()
    cfg.rollout.compile_decode = False
    assert cfg.model.spec == "auto"
    validate_exact(cfg)
    assert cfg.model.spec == "auto"
    cfg.rollout.exact = True
    validate_exact(cfg)
    assert cfg.model.spec == "local"


def test_check_importance_weight_stats():
    """The step's importance weights exp(recomputed - rollout) over active tokens, across
    micro-batches, against a direct computation; all exactly 1 when the two agree."""
    torch.manual_seed(0)
    check = LogprobCheck(exact=False)
    check.start_step()
    rec = [torch.randn(7) - 2, torch.randn(5) - 2]
    roll = [r + 0.1 * torch.randn_like(r) for r in rec]
    masks = [torch.tensor([1., 1., 0., 1., 1., 0., 1.]), torch.tensor([0., 1., 1., 1., 0.])]
    for a, b, m in zip(rec, roll, masks):
        check.observe(a, b, m)
    check.finish_step()
    act = torch.cat(masks) > 0
    w = torch.exp(torch.cat(rec) - torch.cat(roll))[act].double()
    d = (torch.cat(rec) - torch.cat(roll)).abs()[act].double()
    st = check.stats
    assert st["is_weight_mean"] == pytest.approx(float(w.mean()), rel=1e-6)
    assert st["is_weight_min"] == pytest.approx(float(w.min()), rel=1e-6)
    assert st["is_weight_max"] == pytest.approx(float(w.max()), rel=1e-6)
    assert st["logprob_mean_abs_diff"] == pytest.approx(float(d.mean()), rel=1e-6)
    check.start_step()
    check.observe(rec[0], rec[0], masks[0])
    check.finish_step()
    assert check.stats["is_weight_min"] == check.stats["is_weight_max"] == 1.0
