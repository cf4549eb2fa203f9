"""One GRPO step on a tiny single-rank model: it runs end to end and moves the weights; the
advantage -> per-token field -> GRPO loss -> gradient wiring equals a hand computation done with
plain autograd on an unwrapped copy of the model."""
from __future__ import annotations

import math

import pytest
import torch

from r1mega.config import Config, ModelConfig, OptimizerConfig
from r1mega.models.attention import make_packed_seqs
from r1mega.models.gpt import build_model
from r1mega.rewards.registry import RewardResult, register_reward
from r1mega.rl.advantages import group_advantages
from r1mega.train.grpo import GRPOStep, completion_sample, grpo_loss_fn
from r1mega.train.roles import Policy, Rollout

VOCAB = 128


@register_reward("test_digit_share")
def _digit_share(completion: str, reference: dict, **context) -> RewardResult:
    """A reward that differs between random completions, so advantages are not all zero."""
    return RewardResult(sum(c.isdigit() for c in completion) / max(len(completion), 1), [])


def tiny_cfg(**train) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=64, vocab_size=VOCAB, max_position_embeddings=64)
    cfg.data.source = "builtin:arithmetic"
    cfg.data.template = "raw"
    cfg.data.num_examples = 64
    cfg.data.global_batch_prompts = 2
    cfg.data.micro_batch_tokens = 128
    cfg.rollout.group_size = 4
    cfg.rollout.max_new_tokens = 8
    cfg.rollout.kv_cpu_tokens = 2048
    cfg.rollout.kv_block_tokens = 4
    cfg.rollout.cuda_graphs = False
    cfg.rewards.spec = {"arithmetic": {"test_digit_share": 1.0}}
    cfg.rewards.num_workers = 0
    cfg.optimizer = OptimizerConfig(lr=1e-2)
    return cfg


def test_grpo_step_runs_and_changes_weights(single_rank_runtime):
    from r1mega.data import PromptSampler, build_prompt_source, load_tokenizer
    from r1mega.rewards.scorer import RewardScorer

    cfg = tiny_cfg()
    rt = single_rank_runtime()
    torch.manual_seed(0)
    tok = load_tokenizer("char")
    policy = Policy.build(cfg.model, cfg.precision, cfg.optimizer, rt, distributed_optimizer=True,
                          micro_batch_tokens=cfg.data.micro_batch_tokens, total_steps=2)
    before = {n: p.detach().clone() for n, p in policy.modules()[0].named_parameters()}
    rollout = Rollout(policy, cfg.rollout, rt, eos_ids=[tok.eos_id], decode_fn=tok.decode,
                      vocab_size=tok.vocab_size)
    sampler = PromptSampler(build_prompt_source(cfg.data), rt.dp_rank, rt.dp_size)
    with RewardScorer(cfg.rewards, num_workers=0) as scorer:
        step = GRPOStep(cfg, rt, policy, rollout, scorer, sampler, tok)
        out = step(1)
    m = out.metrics
    for key in ("reward/mean", "reward/std", "reward/accuracy", "reward/format_rate",
                "reward/test_digit_share_mean", "response/length_mean", "response/length_max",
                "response/reflection_share", "kl", "entropy", "clip/low_frac", "clip/high_frac",
                "grad_norm", "lr", "throughput/tokens_per_s", "time/rollout_s", "time/reward_s",
                "time/logprobs_s", "time/train_s", "memory/host_rss_gb",
                "rollout/decode_steps", "rollout/decode_s", "rollout/prefill_steps",
                "rollout/prefill_s", "rollout/decode_ms_per_step"):
        assert key in m and math.isfinite(m[key]), (key, m.get(key))
    assert m["update_skipped"] == 0.0
    assert m["rollout/prefill_steps"] >= 1 and m["rollout/decode_steps"] >= 1
    assert m["reward/std"] > 0  # the test reward separates the samples
    assert 1 <= m["response/length_max"] <= cfg.rollout.max_new_tokens
    # On-policy, one update: the ratio is exactly 1, nothing can be clipped.
    assert m["clip/low_frac"] == 0.0 and m["clip/high_frac"] == 0.0
    after = dict(policy.modules()[0].named_parameters())
    moved = [n for n in before if not torch.equal(before[n], after[n].detach())]
    assert len(moved) == len(before), f"parameters that did not move: {set(before) - set(moved)}"


def _reference_logps(model, prompt: list, completion: list) -> torch.Tensor:
    """log p(completion token) under ``model``'s plain forward, with autograd."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids, position_ids=None, attention_mask=None,
                   packed_seq_params=make_packed_seqs([ids.shape[1]], "cpu"))[0].float()
    logits = logits.reshape(ids.shape[1], -1)[:, :VOCAB]
    logp = torch.log_softmax(logits, -1)
    p = len(prompt)
    rows = torch.arange(p - 1, p - 1 + len(completion))
    return logp[rows, torch.tensor(completion)]


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_loss_and_advantage_wiring_match_hand_computation(single_rank_runtime, loss_agg):
    cfg = tiny_cfg()
    cfg.grpo.loss_agg = loss_agg
    # SGD with lr 1 and no clipping: the first update is exactly -grad.
    cfg.optimizer = OptimizerConfig(name="sgd", lr=1.0, clip_grad=0.0)
    rt = single_rank_runtime()
    torch.manual_seed(0)
    policy = Policy.build(cfg.model, cfg.precision, cfg.optimizer, rt, distributed_optimizer=False,
                          micro_batch_tokens=cfg.data.micro_batch_tokens, total_steps=1)
    ref = build_model(cfg.model, rt, cfg.precision, wrap=False)[0]
    ref.load_state_dict(policy.modules()[0].state_dict())
    w0 = {n: p.detach().clone() for n, p in policy.modules()[0].named_parameters()}

    G = 4
    prompts = [[1, 20, 21], [1, 22]]
    comps = [[30, 31, 2], [32, 2], [33, 34, 35, 2], [36], [40, 2], [41, 42], [43], [44, 45, 2]]
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 1.5, 0.5]
    adv, _ = group_advantages(torch.tensor(rewards), G)
    # hand: (r - mean) / (unbiased std + eps), per group
    hand_adv = []
    for g in range(2):
        r = rewards[g * G:(g + 1) * G]
        mu = sum(r) / G
        sd = math.sqrt(sum((x - mu) ** 2 for x in r) / (G - 1))
        hand_adv += [(x - mu) / (sd + 1e-6) for x in r]
    assert torch.allclose(adv, torch.tensor(hand_adv), atol=1e-6)
    samples = [completion_sample(prompts[i // G], comps[i], float(adv[i])) for i in range(len(comps))]
    for s, c, a in zip(samples, comps, adv):
        assert s["loss_mask"].sum() == len(c)
        assert torch.all(s["advantages"][s["loss_mask"] > 0] == a)

    loss_fn = grpo_loss_fn(cfg.grpo, vocab_size=VOCAB, tp_group=None, temperature=1.0,
                           norm_tokens=cfg.rollout.max_new_tokens)
    res = policy.update(samples, loss_fn)
    assert res.update_successful

    # Hand-computed objective on the unwrapped copy: on-policy ratio = 1, so the surrogate's
    # gradient is that of -A * logp, aggregated as configured.
    total = torch.zeros(())
    for i, c in enumerate(comps):
        lp = _reference_logps(ref, prompts[i // G], c)
        if loss_agg == "token_mean":
            total = total - (float(adv[i]) * lp).sum()
        else:
            total = total - (float(adv[i]) * lp).mean()
    denom = sum(len(c) for c in comps) if loss_agg == "token_mean" else len(comps)
    (total / denom).backward()
    after = dict(policy.modules()[0].named_parameters())
    checked = 0
    for n, p in ref.named_parameters():
        delta = after[n].detach() - w0[n]
        assert torch.allclose(delta, -p.grad, rtol=1e-4, atol=1e-6), \
            (n, (delta + p.grad).abs().max().item(), p.grad.abs().max().item())
        checked += 1
    assert checked > 5


@register_reward("test_text_code")
def _text_code(completion: str, reference: dict, **context) -> RewardResult:
    """Differs between almost any two texts, so a reward put on the wrong completion shows."""
    return RewardResult(sum((i + 1) * ord(ch) for i, ch in enumerate(completion)) % 9973 / 9973, [])


class _ShuffledFinishes:
    """The real rollout, except that ``on_finish`` sees only half of the completions, in
    reverse order: the step must score the rest itself and give each reward to its own
    completion."""

    def __init__(self, inner):
        self.inner, self.outs = inner, None

    @property
    def stats(self) -> dict:
        return self.inner.stats

    def generate(self, requests, on_finish=None):
        self.outs = self.inner.generate(requests)
        on_finish(self.outs[::-1][: len(self.outs) // 2])
        return self.outs


def test_streamed_rewards_reach_their_completions(single_rank_runtime):
    from r1mega.data import PromptSampler, build_prompt_source, load_tokenizer
    from r1mega.rewards.scorer import RewardScorer

    cfg = tiny_cfg()
    cfg.rewards.spec = {"arithmetic": {"test_text_code": 1.0}}
    cfg.logging.num_samples = 8
    rt = single_rank_runtime()
    torch.manual_seed(0)
    tok = load_tokenizer("char")
    policy = Policy.build(cfg.model, cfg.precision, cfg.optimizer, rt, distributed_optimizer=False,
                          micro_batch_tokens=cfg.data.micro_batch_tokens, total_steps=1)
    rollout = _ShuffledFinishes(Rollout(policy, cfg.rollout, rt, eos_ids=[tok.eos_id],
                                        decode_fn=tok.decode, vocab_size=tok.vocab_size))
    sampler = PromptSampler(build_prompt_source(cfg.data), rt.dp_rank, rt.dp_size)
    with RewardScorer(cfg.rewards, num_workers=0) as scorer:
        out = GRPOStep(cfg, rt, policy, rollout, scorer, sampler, tok)(1)
    want = [_text_code(c.text, {}).score for c in rollout.outs]
    assert len(set(want)) == len(want)  # the check below can tell completions apart
    texts = [c.text for c in rollout.outs]
    # The logged samples are the top-rewarded completions, each with its own reward.
    assert [r for _, _, r in out.samples] == sorted(want, reverse=True)[:8]
    assert all(_text_code(c, {}).score == r for _, c, r in out.samples)
    assert all(c in texts for _, c, _ in out.samples)
    assert out.metrics["reward/mean"] == pytest.approx(sum(want) / len(want))
