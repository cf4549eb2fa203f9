"""Routing replay on one CPU rank: the weights of replayed experts, replay of a forward's own
routes is bit-exact, forced routes really route (and the router still gets its gradient), the
rollout records every fed token's routes (also across preemption) and the training forward of
the packed samples routes as the rollout did; the MoE layer with zero tokens; the config check;
packing of the (T, L*k) routes field."""
from __future__ import annotations

import pytest
import torch

from r1mega.config import Config, ConfigError, ModelConfig, RolloutConfig, validate
from r1mega.models.attention import make_packed_seqs
from r1mega.models.gpt import build_model
from r1mega.moe import router as R
from r1mega.moe.balancing import moe_layers
from r1mega.moe.replay import ROUTES_FIELD, RoutingCapture, RoutingReplay, routes_field, routing_context
from r1mega.rollout.engine import RolloutEngine
from r1mega.rollout.types import GenerationRequest
from r1mega.train.batching import make_micro_batches
from r1mega.train.grpo import completion_sample, token_logprob_fn
from r1mega.train.step import _layout, forward_only

VOCAB = 128
DSV3 = dict(moe_router="sigmoid_group", moe_num_groups=4, moe_topk_groups=2,
            moe_routed_scaling_factor=2.5, moe_bias_update_rate=0.01,
            moe_shared_expert_ffn_hidden_size=16, moe_first_k_dense=1)


def moe_cfg(**kw) -> ModelConfig:
    base = dict(family="qwen3_moe", num_layers=3, hidden_size=32, num_attention_heads=4,
                num_query_groups=2, ffn_hidden_size=64, vocab_size=VOCAB, max_position_embeddings=128,
                qk_norm=True, spec="local", num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32)
    base.update(kw)
    return ModelConfig(**base)


def build(rt, **kw):
    torch.manual_seed(0)
    model = build_model(moe_cfg(**kw), rt, wrap=False)
    with torch.no_grad():
        for p in model[0].parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
        for layer in moe_layers(model):
            if layer.expert_bias is not None:
                layer.expert_bias.copy_(torch.randn(8) * 0.05)
    return model


def packed_forward(model, seqs):
    ids = torch.tensor([sum(seqs, [])])
    return model[0](input_ids=ids, position_ids=None, attention_mask=None,
                    packed_seq_params=make_packed_seqs([len(s) for s in seqs], "cpu"))[0]


# ----------------------------------------------------------------------------- pure pieces

@pytest.mark.parametrize("router,renorm,scale", [("softmax", True, 1.0), ("softmax", False, 1.0),
                                                 ("softmax", True, 2.5), ("sigmoid_group", True, 2.5),
                                                 ("sigmoid_group", False, 1.0)])
def test_replayed_weights_of_the_own_choice_are_bit_identical(router, renorm, scale):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(37, 16, generator=g)
    if router == "softmax":
        w, idx = R.softmax_topk(logits, 4, renorm)
        w = w * scale if scale != 1.0 else w
    else:
        bias = torch.randn(16, generator=g) * 0.1
        w, idx = R.group_limited_topk(logits, 4, 4, 2, bias=bias, renormalize=renorm, routed_scaling_factor=scale)
    assert torch.equal(R.replayed_weights(logits, idx, router, renorm, scale), w)


def test_routes_field_round_trips_through_packing():
    g = torch.Generator().manual_seed(2)
    routes = [torch.randint(0, 8, (3, n - 1, 2), generator=g) for n in (5, 9, 4)]
    samples = [{"input_ids": torch.arange(n), ROUTES_FIELD: routes_field(r, n)} for n, r in zip((5, 9, 4), routes)]
    mbs = make_micro_batches(samples, 10, pad_to_multiple=4)
    for mb in mbs:
        field = mb.fields[ROUTES_FIELD]                                           # (T, L*k)
        assert field.shape == (mb.num_tokens, 6) and field.dtype == torch.int32
        # One sequence-parallel rank of two sees its half of the positions; padding routes freely.
        replay = RoutingReplay.from_field(field, mb.num_tokens, 1, topk=2)
        start = 0
        for n, i in zip(mb.seq_lengths, mb.sample_index):
            got = replay.indices[:, start:start + n]                               # (L, n, k)
            if i < 0:
                assert (got == -1).all()
            else:
                assert torch.equal(got[:, :n - 1], routes[i]) and (got[:, n - 1] == -1).all()
            start += n
    with pytest.raises(ValueError, match="expected"):
        make_micro_batches([{"input_ids": torch.arange(4), ROUTES_FIELD: torch.zeros(3, 6)}], 10)


def test_from_field_follows_megatrons_seq_batch_layout_and_sequence_parallel_split():
    B, S, L, k = 3, 4, 2, 2
    routes = torch.arange(B * S * L * k, dtype=torch.int32).view(B * S, L * k) + 1   # packed order
    full = RoutingReplay.from_field(routes, S, B, k).indices                        # (L, S*B, k)
    for s in range(S):
        for b in range(B):
            assert torch.equal(full[:, s * B + b], routes[b * S + s].view(L, k).long() - 1)
    halves = [RoutingReplay.from_field(routes, S, B, k, sp_rank=r, sp_size=2).indices for r in (0, 1)]
    assert torch.equal(torch.cat(halves, dim=1), full)


def test_zero_tokens_through_the_moe_layer(single_rank_runtime):
    rt = single_rank_runtime()
    layer = moe_layers(build(rt, **DSV3))[0]
    x = torch.zeros(0, 1, 32, requires_grad=True)
    out, _ = layer(x)
    assert out.shape == (0, 1, 32)
    out.sum().backward()
    assert x.grad.shape == (0, 1, 32)


# ----------------------------------------------------------------------------- model forwards

@pytest.mark.parametrize("kw", [{}, DSV3], ids=["softmax", "dsv3-layout"])
def test_replaying_a_forwards_own_routes_is_bit_identical(single_rank_runtime, kw):
    rt = single_rank_runtime()
    model = build(rt, **kw)
    seqs = [[5, 17, 3, 9, 9], list(range(20, 31)), [7, 1]]
    cap = RoutingCapture()
    with torch.no_grad(), routing_context(model, capture=cap):
        free = packed_forward(model, seqs)
    routes = cap.take()                                                           # (L_moe, T, k)
    assert routes.shape == (len(moe_layers(model)), 18, 2)
    with torch.no_grad(), routing_context(model, replay=RoutingReplay(routes), capture=cap):
        replayed = packed_forward(model, seqs)
    assert torch.equal(cap.take(), routes)
    assert torch.equal(replayed, free)


def test_forced_routes_route_and_the_router_still_learns(single_rank_runtime):
    rt = single_rank_runtime()
    model = build(rt)
    seqs = [list(range(3, 15))]
    cap = RoutingCapture()
    with torch.no_grad(), routing_context(model, capture=cap):
        free = packed_forward(model, seqs)
    own = cap.take()
    # Every token of every layer forced onto its own top-2 shifted by one expert; first token free.
    forced = (own + 1) % 8
    forced[:, 0] = -1
    for layer in moe_layers(model):
        layer.router_weight.grad = None
    with routing_context(model, replay=RoutingReplay(forced), capture=cap):
        out = packed_forward(model, seqs)
        out.float().logsumexp(-1).sum().backward()
    got = cap.take()
    assert torch.equal(got[:, 1:], forced[:, 1:]) and torch.equal(got[:, 0], own[:, 0])
    assert not torch.allclose(out.detach(), free)
    assert all(layer.router_weight.grad is not None and layer.router_weight.grad.abs().sum() > 0
               for layer in moe_layers(model))
    with pytest.raises(ValueError, match="recorded routes are"):
        with torch.no_grad(), routing_context(model, replay=RoutingReplay(forced[:, :5])):
            packed_forward(model, seqs)


def _rollout(model, rt, **cfg_kw):
    cfg = RolloutConfig(kv_block_tokens=4, kv_cpu_tokens=2048, max_new_tokens=8, cuda_graphs=False,
                        routing_replay=True, temperature=0.0)
    for k, v in cfg_kw.items():
        setattr(cfg, k, v)
    eng = RolloutEngine(model, cfg, rt, eos_ids=[], vocab_size=VOCAB)
    prompts = [[5, 17, 3], list(range(20, 33)), [9]]
    outs = eng.generate([GenerationRequest(p, n=2, seed=i) for i, p in enumerate(prompts)])
    return prompts, outs, eng.stats


@pytest.mark.parametrize("kw", [{}, DSV3], ids=["softmax", "dsv3-layout"])
def test_training_forward_routes_as_the_rollout_did(single_rank_runtime, kw):
    rt = single_rank_runtime()
    model = build(rt, **kw)
    prompts, outs, _ = _rollout(model, rt, temperature=1.0)
    L = len(moe_layers(model))
    samples = []
    for c in outs:
        P, n = len(prompts[c.prompt_index]), len(c.token_ids)
        assert c.routes.shape == (L, P + n - 1, 2) and c.routes.dtype == torch.int32
        samples.append(completion_sample(prompts[c.prompt_index], c.token_ids, 1.0, c.logprobs, c.routes))
    fn = token_logprob_fn(vocab_size=VOCAB, tp_group=None, temperature=1.0)
    caps = []

    def logprobs_and_routes(logits, mb):
        caps.append(cap.take())                      # this micro-batch's routes, in packed order
        return fn(logits, mb)

    cap = RoutingCapture()
    with routing_context(model, capture=cap):
        lps = forward_only(model, rt, samples, logprobs_and_routes, micro_batch_tokens=64)
    mbs = make_micro_batches(samples, 64)
    assert len(mbs) == len(caps) > 1
    assert any(_layout(mb, rt, True)[1] > 1 for mb in mbs)  # the (S, B) layout is exercised too
    for mb, routes in zip(mbs, caps):
        # A micro-batch of equal-length sequences runs as megatron's (S, B): back to packed order.
        seq, batch = _layout(mb, rt, True)
        routes = routes.view(L, seq, batch, 2).transpose(1, 2).reshape(L, seq * batch, 2)
        start = 0
        for n, i in zip(mb.seq_lengths, mb.sample_index):
            if i >= 0:
                c = outs[i]
                rec = c.routes.shape[1]
                assert torch.equal(routes[:, start:start + rec].int(), c.routes), f"sample {i}"
            start += n
    # Same routes, same weights: the log-probs of the sampled tokens agree to float32 noise.
    for c, lp in zip(outs, lps):
        P = len(prompts[c.prompt_index])
        torch.testing.assert_close(lp[P - 1:P - 1 + len(c.token_ids)], torch.tensor(c.logprobs),
                                   rtol=0, atol=1e-5)


def test_preempted_sequences_keep_their_routes(single_rank_runtime):
    rt = single_rank_runtime()
    model = build(rt, **DSV3)
    _, roomy, _ = _rollout(model, rt)
    _, tight, stats = _rollout(model, rt, kv_cpu_tokens=40, max_batch_sequences=6)
    assert stats["preemptions"] > 0
    for a, b in zip(roomy, tight):
        assert a.token_ids == b.token_ids
        assert torch.equal(a.routes, b.routes), f"prompt {a.prompt_index} sample {a.sample_index}"


# ----------------------------------------------------------------------------- config

def test_routing_replay_config_is_validated():
    cfg = Config()
    cfg.rollout.routing_replay = True
    with pytest.raises(ConfigError, match="rollout.routing_replay"):
        validate(cfg)                                # dense model: nothing to replay
    cfg.model = moe_cfg()
    validate(cfg)
    cfg.model.recompute = "full"
    with pytest.raises(ConfigError, match="model.recompute"):
        validate(cfg)
    cfg.model.recompute = "none"
    cfg.parallel.pipeline = 2
    with pytest.raises(ConfigError, match="parallel.pipeline"):
        validate(cfg)


def test_a_rank_without_samples_packs_the_routes_field_with_its_row_shape(monkeypatch):
    """A DP rank with no samples learns the fields from a peer (agree_count): the routes field
    keeps its (T, L*k) row shape there, all zero (route freely)."""
    from r1mega.train import batching

    peer = [{"input_ids": torch.arange(4), ROUTES_FIELD: torch.ones(4, 6, dtype=torch.int32)}]
    spec = batching._field_spec(peer)
    monkeypatch.setattr(batching, "agree_count", lambda count, *a, **k: (2, spec))
    mbs = make_micro_batches([], 8, pad_to_multiple=4)
    assert len(mbs) == 2
    for mb in mbs:
        assert mb.fields[ROUTES_FIELD].shape == (mb.num_tokens, 6) and not mb.fields[ROUTES_FIELD].any()


# ----------------------------------------------------------------------------- GRPO step

def test_grpo_step_replays_the_rollouts_routes(single_rank_runtime):
    """With rollout.routing_replay every MoE forward of the step's training side (reference,
    old log-probs, two updates) replays the rollout's routes: summed over those forwards, the
    forced (recorded) rows are exactly 4 passes x every MoE layer x every recorded token."""
    from r1mega.data import PromptSampler, build_prompt_source, load_tokenizer
    from r1mega.rewards.registry import RewardResult, register_reward
    from r1mega.rewards.scorer import RewardScorer
    from r1mega.train.grpo import GRPOStep
    from r1mega.train.roles import Policy, Reference, Rollout

    @register_reward("test_moe_replay_digits")
    def _digits(completion: str, reference: dict, **context) -> RewardResult:
        return RewardResult(sum(c.isdigit() for c in completion) / max(len(completion), 1), [])

    cfg = Config()
    cfg.model = moe_cfg(**DSV3)
    cfg.data.source, cfg.data.template = "builtin:arithmetic", "raw"
    cfg.data.num_examples, cfg.data.global_batch_prompts, cfg.data.micro_batch_tokens = 64, 2, 128
    cfg.rollout.group_size, cfg.rollout.max_new_tokens = 3, 6
    cfg.rollout.kv_cpu_tokens, cfg.rollout.kv_block_tokens, cfg.rollout.cuda_graphs = 2048, 4, False
    cfg.rollout.routing_replay = True
    cfg.grpo.kl_beta, cfg.grpo.inner_epochs = 0.05, 2
    cfg.rewards.spec = {"arithmetic": {"test_moe_replay_digits": 1.0}}
    cfg.rewards.num_workers = 0
    validate(cfg)
    rt = single_rank_runtime()
    torch.manual_seed(0)
    tok = load_tokenizer("char")
    policy = Policy.build(cfg.model, cfg.precision, cfg.optimizer, rt, distributed_optimizer=True,
                          micro_batch_tokens=cfg.data.micro_batch_tokens, total_steps=1)
    reference = Reference.from_policy(policy, cfg.model, cfg.precision)
    rollout = Rollout(policy, cfg.rollout, rt, eos_ids=[tok.eos_id], decode_fn=tok.decode,
                      vocab_size=tok.vocab_size)
    rolled, forced_rows, free_forwards, rolling = [], [0], [0], [False]
    generate = rollout.generate

    def recording_generate(*a, **k):
        rolling[0] = True
        try:
            out = generate(*a, **k)
        finally:
            rolling[0] = False
        rolled.extend(out)
        return out

    def hook(m, args):
        if m.routing_replay is not None:
            forced_rows[0] += int((m.routing_replay.indices[m.moe_index] >= 0).all(-1).sum())
        elif args[0].shape[0] and not rolling[0]:
            free_forwards[0] += 1  # a training-side forward that routed freely

    rollout.generate = recording_generate
    layers = moe_layers(policy.chunks + reference.chunks)
    hooks = [m.register_forward_pre_hook(hook) for m in layers]
    sampler = PromptSampler(build_prompt_source(cfg.data), rt.dp_rank, rt.dp_size)
    with RewardScorer(cfg.rewards, num_workers=0) as scorer:
        GRPOStep(cfg, rt, policy, rollout, scorer, sampler, tok, reference=reference)(1)
    for h in hooks:
        h.remove()
    assert len(rolled) == 6 and free_forwards[0] == 0
    n_moe = len(moe_layers(policy.chunks))
    assert forced_rows[0] == 4 * n_moe * sum(c.routes.shape[1] for c in rolled)
