"""The MoE model end to end on one CPU rank: config checks, the balance losses in the training
step's gradient (against a hand computation on an unwrapped copy), GRPO steps, and greedy
rollout against a full-recompute reference through the model's own training forward."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from r1mega.config import (Config, ConfigError, ModelConfig, OptimizerConfig, RolloutConfig, load_config,
                           validate)
from r1mega.models.attention import make_packed_seqs
from r1mega.models.gpt import build_model
from r1mega.moe.balancing import moe_layers
from r1mega.moe.layer import MoELayer
from r1mega.rewards.registry import RewardResult, register_reward
from r1mega.rollout.engine import RolloutEngine
from r1mega.rollout.types import GenerationRequest
from r1mega.train.roles import Policy, Rollout
from r1mega.train.step import sft_loss_fn, sft_sample

VOCAB = 128
# The DeepSeek-V3 layout in small: sigmoid group-limited routing, bias balancing, shared expert,
# first layer dense (the override set configs/moe_tiny_cpu.yaml documents).
DSV3 = dict(moe_router="sigmoid_group", moe_num_groups=4, moe_topk_groups=2,
            moe_routed_scaling_factor=2.5, moe_bias_update_rate=0.01,
            moe_shared_expert_ffn_hidden_size=32, moe_first_k_dense=1)


def moe_model(**kw) -> ModelConfig:
    base = dict(family="qwen3_moe", num_layers=3, hidden_size=32, num_attention_heads=4,
                num_query_groups=2, ffn_hidden_size=64, vocab_size=VOCAB, max_position_embeddings=128,
                qk_norm=True, spec="local", num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32)
    base.update(kw)
    return ModelConfig(**base)


# ----------------------------------------------------------------------------- config


def test_yaml_config_and_its_dsv3_overrides_validate():
    cfg = validate(load_config("configs/moe_tiny_cpu.yaml"))
    assert cfg.model.num_experts == 8 and cfg.model.moe_router == "softmax"
    over = [f"model.{k}={v}" for k, v in DSV3.items()]
    cfg = validate(load_config("configs/moe_tiny_cpu.yaml", over))
    assert cfg.model.moe_first_k_dense == 1 and cfg.model.moe_router == "sigmoid_group"


@pytest.mark.parametrize("model_kw,par_kw,needle", [
    (dict(family="llama", num_experts=0, moe_router_topk=4), {}, "model.moe_router_topk"),
    (dict(family="qwen3_moe", num_experts=0, moe_router_topk=2), {}, "model.family=qwen3_moe"),
    (dict(moe_bias_update_rate=0.1), {}, "moe_bias_update_rate"),
    (dict(moe_num_groups=2), {}, "moe_num_groups"),
    (dict(moe_router="sigmoid_group", moe_num_groups=3), {}, "moe_num_groups=3"),
    (dict(moe_router="sigmoid_group", moe_num_groups=4, moe_topk_groups=1, moe_router_topk=4), {},
     "moe_topk_groups"),
    (dict(moe_router="topk"), {}, "model.moe_router"),
    (dict(moe_router_topk=9), {}, "moe_router_topk"),
    (dict(moe_first_k_dense=3), {}, "moe_first_k_dense"),
    (dict(spec="te"), {}, "model.spec=te"),
    (dict(moe_aux_loss_coeff=-1.0), {}, "moe_aux_loss_coeff"),
    (dict(recompute="full"), {}, "model.recompute"),
    (dict(), dict(tensor=2, expert=2), "parallel.sequence_parallel=true"),
    (dict(moe_aux_loss_coeff=0.01), dict(tensor=2, sequence_parallel=True), "parallel.sequence_parallel"),
    (dict(moe_aux_loss_coeff=0.01), dict(pipeline=3), "parallel.pipeline"),
    (dict(), dict(expert=3), "parallel.expert=3"),
])
def test_bad_moe_knobs_are_rejected_naming_the_key(model_kw, par_kw, needle):
    cfg = Config()
    cfg.model = moe_model(**model_kw)
    for k, v in par_kw.items():
        setattr(cfg.parallel, k, v)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        validate(cfg)


def test_expert_parallel_size_must_divide_the_data_parallel_ranks():
    cfg = Config()
    cfg.model = moe_model()
    cfg.data.global_batch_prompts = 12
    cfg.parallel.expert = 2
    validate(cfg, world_size=4)
    with pytest.raises(ConfigError, match="parallel.expert=2 does not divide"):
        validate(cfg, world_size=3)


# ----------------------------------------------------------------------------- training


def _hand_gradients(ref, tokens: torch.Tensor, aux_coeff_on: bool) -> dict:
    """Gradient of mean next-token NLL (+ the collected balance losses) on the unwrapped copy."""
    for p in ref.parameters():
        p.grad = None
    ref.moe_aux_losses.begin()
    ids = tokens[None, :]
    logits = ref(input_ids=ids, position_ids=None, attention_mask=None,
                 packed_seq_params=make_packed_seqs([tokens.numel()], "cpu"))
    logp = torch.log_softmax(logits.reshape(tokens.numel(), -1)[:, :VOCAB].float(), -1)
    nll = -logp[torch.arange(tokens.numel() - 1), tokens[1:]].mean()
    aux = ref.moe_aux_losses.take()
    (nll + (aux if aux_coeff_on else 0.0)).backward()
    return {n: p.grad.clone() for n, p in ref.named_parameters()}, nll.item()


def test_balance_losses_reach_the_training_gradient(single_rank_runtime):
    """SGD lr 1 without clipping: the update is exactly -grad, and the grad must be that of
    NLL + aux_coeff * aux + z_coeff * z, summed over the MoE layers."""
    model = moe_model(moe_aux_loss_coeff=0.5, moe_z_loss_coeff=0.05)
    opt = OptimizerConfig(name="sgd", lr=1.0, clip_grad=0.0)
    rt = single_rank_runtime()
    torch.manual_seed(0)
    policy = Policy.build(model, Config().precision, opt, rt, distributed_optimizer=False,
                          micro_batch_tokens=256, total_steps=1)
    ref = build_model(model, rt, wrap=False)[0]
    ref.load_state_dict(policy.modules()[0].state_dict())
    w0 = {n: p.detach().clone() for n, p in policy.modules()[0].named_parameters()}
    tokens = torch.randint(0, VOCAB, (40,))
    with_aux, nll = _hand_gradients(ref, tokens, True)
    without, _ = _hand_gradients(ref, tokens, False)
    res = policy.update([sft_sample(tokens)], sft_loss_fn(VOCAB))
    assert res.update_successful
    after = dict(policy.modules()[0].named_parameters())
    routers = [n for n in with_aux if n.endswith("router_weight")]
    assert len(routers) == model.num_layers
    for n in routers:
        # the balance losses change the router's gradient by far more than the tolerance
        assert (with_aux[n] - without[n]).abs().max() > 1e-3, n
    for n, g in with_aux.items():
        delta = after[n].detach() - w0[n]
        torch.testing.assert_close(delta, -g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    # The reported loss is the task loss alone (mean NLL), not the balance terms.
    assert res.loss == pytest.approx(nll, rel=1e-5)


@register_reward("test_moe_digit_share")
def _digit_share(completion: str, reference: dict, **context) -> RewardResult:
    return RewardResult(sum(c.isdigit() for c in completion) / max(len(completion), 1), [])


def test_grpo_two_steps_on_the_moe_model(single_rank_runtime):
    from r1mega.data import PromptSampler, build_prompt_source, load_tokenizer
    from r1mega.rewards.scorer import RewardScorer
    from r1mega.train.grpo import GRPOStep

    cfg = Config()
    cfg.model = moe_model(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001, **DSV3)
    cfg.data.source, cfg.data.template = "builtin:arithmetic", "raw"
    cfg.data.num_examples, cfg.data.global_batch_prompts = 64, 2
    cfg.data.micro_batch_tokens = 128
    cfg.rollout.group_size, cfg.rollout.max_new_tokens = 4, 8
    cfg.rollout.kv_cpu_tokens, cfg.rollout.kv_block_tokens, cfg.rollout.cuda_graphs = 2048, 4, False
    cfg.rewards.spec = {"arithmetic": {"test_moe_digit_share": 1.0}}
    cfg.rewards.num_workers = 0
    cfg.optimizer = OptimizerConfig(lr=1e-2)
    validate(cfg)
    rt = single_rank_runtime()
    torch.manual_seed(0)
    tok = load_tokenizer("char")
    policy = Policy.build(cfg.model, cfg.precision, cfg.optimizer, rt, distributed_optimizer=True,
                          micro_batch_tokens=cfg.data.micro_batch_tokens, total_steps=2)
    layers = moe_layers(policy.chunks)
    assert len(layers) == cfg.model.num_layers - 1  # the first layer is dense
    assert not isinstance(policy.modules()[0].decoder.layers[0].mlp, MoELayer)
    before = {n: p.detach().clone() for n, p in policy.modules()[0].named_parameters()}
    rollout = Rollout(policy, cfg.rollout, rt, eos_ids=[tok.eos_id], decode_fn=tok.decode,
                      vocab_size=tok.vocab_size)
    sampler = PromptSampler(build_prompt_source(cfg.data), rt.dp_rank, rt.dp_size)
    with RewardScorer(cfg.rewards, num_workers=0) as scorer:
        step = GRPOStep(cfg, rt, policy, rollout, scorer, sampler, tok)
        metrics = [step(1).metrics, step(2).metrics]
    for m in metrics:
        assert m["update_skipped"] == 0.0 and math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])
        assert m["rollout/decode_steps"] >= 1
    after = dict(policy.modules()[0].named_parameters())
    moved = [n for n in before if not torch.equal(before[n], after[n].detach())]
    assert len(moved) == len(before), f"parameters that did not move: {set(before) - set(moved)}"
    # Two bias steps of +-rate each: every bias is a multiple of the rate, and some moved.
    rate = cfg.model.moe_bias_update_rate
    for layer in layers:
        b = layer.expert_bias
        assert b.abs().max() > 0
        torch.testing.assert_close(b / rate, (b / rate).round(), atol=1e-4, rtol=0)
        assert layer.expert_load_accum.sum() == 0  # consumed by the step
    # Rollout and forward-only passes neither count loads nor move the biases.
    biases = [layer.expert_bias.clone() for layer in layers]
    rollout.generate([GenerationRequest([5, 6, 7], n=2, seed=3)])
    samples = [sft_sample(torch.randint(0, VOCAB, (12,)))]
    policy.forward_only(samples, lambda logits, mb: logits[:, 0].float())
    for layer, b in zip(layers, biases):
        assert layer.expert_load_accum.sum() == 0 and torch.equal(layer.expert_bias, b)
    assert all(layer.collector.take() is None for layer in layers)


# ----------------------------------------------------------------------------- rollout


def _training_logits(model, tokens: list[int]) -> torch.Tensor:
    ids = torch.tensor([tokens])
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=None, attention_mask=None,
                    packed_seq_params=make_packed_seqs([len(tokens)], "cpu"))
    return out[0].float()


@pytest.mark.parametrize("kw", [{}, DSV3], ids=["softmax", "dsv3-layout"])
def test_rollout_greedy_equals_full_recompute(single_rank_runtime, kw):
    rt = single_rank_runtime()
    torch.manual_seed(0)
    model = build_model(moe_model(**kw), rt, wrap=False)
    with torch.no_grad():
        for p in model[0].parameters():
            if p.dim() >= 2:
                p.mul_(4.0)  # peaked logits: greedy decoding is not a string of near-ties
        for layer in moe_layers(model):
            if layer.expert_bias is not None:
                layer.expert_bias.copy_(torch.randn(8) * 0.05)
    cfg = RolloutConfig(kv_block_tokens=4, kv_cpu_tokens=2048, max_new_tokens=6, temperature=0.0,
                        cuda_graphs=False)
    prompts = [[5, 17, 3], list(range(20, 33)), [9]]
    outs = RolloutEngine(model, cfg, rt, eos_ids=[], vocab_size=VOCAB).generate(
        [GenerationRequest(p, n=1) for p in prompts])
    for c, p in zip(outs, prompts):
        seq = list(p)
        for _ in range(6):
            seq.append(int(_training_logits(model[0], seq)[-1, :VOCAB].argmax()))
        assert c.token_ids == seq[len(p):], f"prompt {c.prompt_index}"
    assert all(layer.expert_load_accum is None or layer.expert_load_accum.sum() == 0
               for layer in moe_layers(model))


def test_checkpoint_round_trip_keeps_weights_and_expert_biases(single_rank_runtime, tmp_path):
    """DeepSeek-V3 layout (a dense first layer beside MoE layers): model + optimizer through
    r1mega's dist checkpoint and back into a freshly built policy."""
    from r1mega.config import CheckpointConfig
    from r1mega.train.checkpoint import CheckpointManager

    model = moe_model(**DSV3)
    rt = single_rank_runtime()

    def build(seed):
        torch.manual_seed(seed)
        return Policy.build(model, Config().precision, OptimizerConfig(lr=1e-2), rt,
                            distributed_optimizer=True, micro_batch_tokens=256, total_steps=4)

    policy = build(0)
    policy.update([sft_sample(torch.randint(0, VOCAB, (30,)))], sft_loss_fn(VOCAB))
    assert all(layer.expert_bias.abs().max() > 0 for layer in moe_layers(policy.chunks))
    mgr = CheckpointManager(CheckpointConfig(dir=str(tmp_path)), {"tp": 1, "pp": 1, "dp": 1})
    path = mgr.save(1, policy.chunks, policy.optim.optimizer)
    fresh = build(1)
    mgr.load(path, fresh.chunks, fresh.optim.optimizer)
    saved = policy.modules()[0].state_dict()
    loaded = fresh.modules()[0].state_dict()
    keys = [k for k in saved if not k.endswith("_extra_state")]
    assert any(k.endswith("mlp.expert_bias") for k in keys)
    for k in keys:
        assert torch.equal(saved[k], loaded[k]), k


@pytest.mark.parametrize("par_kw,world", [
    (dict(tensor=2), 2),                                  # TP alone: experts whole on both ranks
    (dict(tensor=2, sequence_parallel=True, expert=2), 4),  # EP carved from TP x DP
    (dict(tensor=2, sequence_parallel=True, expert=2), 2),  # the EP group is the TP group
])
def test_tensor_parallel_moe_layouts_validate(par_kw, world):
    cfg = Config()
    cfg.model = moe_model()
    cfg.data.global_batch_prompts = 12
    for k, v in par_kw.items():
        setattr(cfg.parallel, k, v)
    validate(cfg, world_size=world)


def test_fp8_moe_model_says_its_experts_stay_bf16(single_rank_runtime):
    """Native FP8 swaps megatron's parallel linears; the MoE experts are not among them unless
    precision.fp8_experts is on, and the build says so rather than leaving it to be found."""
    from r1mega.config import PrecisionConfig
    from r1mega.models.gpt import build_model
    from r1mega.precision.linear import Fp8ColumnParallelLinear

    prec = PrecisionConfig(dtype="fp32", fp8=True, fp8_emulate=True, fp8_backend="native",
                           fp8_recipe="tensorwise")
    rt = single_rank_runtime(precision=prec)
    with pytest.warns(UserWarning, match=r"MoE experts \(routed grouped GEMM and shared expert\) stay "
                                         r"bf16 unless precision.fp8_experts=true"):
        chunks = build_model(moe_model(), rt, prec, wrap=False)
    kinds = {type(m).__name__ for m in chunks[0].modules()}
    assert "GroupedExperts" in kinds
    assert any(isinstance(m, Fp8ColumnParallelLinear) for m in chunks[0].modules())
    # the FP8 rollout alone trains bf16: no such notice, and model.spec=auto builds the local spec
    rollout_only = PrecisionConfig(dtype="fp32", fp8_rollout=True, fp8_emulate=True,
                                   fp8_recipe="tensorwise")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chunks = build_model(moe_model(spec="auto"), rt, rollout_only, wrap=False)
    assert not [w for w in caught if "fp8_experts" in str(w.message)]
    assert not any(isinstance(m, Fp8ColumnParallelLinear) for m in chunks[0].modules())
