"""Rollout engine on a tiny CPU model (fp32), against the megatron model's own training forward.

References are independent of the engine's cache, scheduler and sampler: full recompute of the
whole sequence through ``GPTModel.forward`` (no KV cache) for greedy decoding and log-probs, and
the engine run on one request at a time for continuous batching.
"""
from __future__ import annotations

import pytest
import torch

from r1mega.config import ModelConfig, RolloutConfig, RopeScalingConfig
from r1mega.models.attention import make_packed_seqs
from r1mega.models.gpt import build_model
from r1mega.rollout.engine import RolloutEngine
from r1mega.rollout.types import GenerationRequest

VOCAB = 128


@pytest.fixture
def tiny(single_rank_runtime):
    def make(family="llama", **model_kw):
        rt = single_rank_runtime()
        torch.manual_seed(0)
        kw = dict(family=family, vocab_size=VOCAB, max_position_embeddings=128)
        if family == "qwen3":
            kw.update(qk_norm=True, rope_theta=1e6)
        if family == "qwen2":
            kw.update(qkv_bias=True, tied_embeddings=False)
        kw.update(model_kw)
        model = build_model(ModelConfig(**kw), rt, wrap=False)
        # Larger weights than the init default make the distribution peaked enough that greedy
        # decoding is not a string of near-ties.
        with torch.no_grad():
            for p in model[0].parameters():
                if p.dim() == 2:
                    p.mul_(4.0)
        return model, rt
    return make


def rollout_cfg(**kw) -> RolloutConfig:
    base = dict(kv_block_tokens=4, kv_cpu_tokens=4096, max_new_tokens=10, max_batch_sequences=64,
                temperature=1.0, cuda_graphs=False)
    base.update(kw)
    return RolloutConfig(**base)


def training_logits(model, tokens: list[int]) -> torch.Tensor:
    """(L, V) logits of one sequence by the model's own (packed, cache-free) training forward."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        out = model[0](input_ids=ids, position_ids=None, attention_mask=None,
                       packed_seq_params=make_packed_seqs([len(tokens)], "cpu"))
    return out[0].float()


def greedy_reference(model, prompt: list[int], n_new: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n_new):
        seq.append(int(training_logits(model, seq)[-1, :VOCAB].argmax()))
    return seq[len(prompt):]


PROMPTS = [
    [5, 17, 3],
    list(range(20, 37)),  # 17 tokens: 4 full blocks of 4 + 1
    [9],
    [(7 * i) % VOCAB for i in range(33)],
    [1, 2, 3, 4, 5, 6, 7, 8],  # exactly two blocks
]


@pytest.mark.parametrize("family,model_kw", [
    ("llama", {}), ("qwen3", {}),
    ("qwen3", {"kv_channels": 32}),  # head size != hidden/heads
    # Llama 3.1 rope scaling: the engine's own RoPE must read the scaled frequencies (original
    # length 16, so the prompts reach the scaled regime)
    ("llama", {"rope_scaling": RopeScalingConfig(type="llama3", factor=4.0,
                                                 original_max_position_embeddings=16)}),
], ids=["llama", "qwen3", "qwen3-head32", "llama3-rope"])
def test_greedy_equals_full_recompute(tiny, family, model_kw):
    model, rt = tiny(family, **model_kw)
    eng = RolloutEngine(model, rollout_cfg(temperature=0.0), rt, eos_ids=[], vocab_size=VOCAB)
    outs = eng.generate([GenerationRequest(p, n=1) for p in PROMPTS])
    assert [(c.prompt_index, c.sample_index) for c in outs] == [(i, 0) for i in range(len(PROMPTS))]
    for c, p in zip(outs, PROMPTS):
        assert c.token_ids == greedy_reference(model, p, 10), f"prompt {c.prompt_index}"
        assert c.finish_reason == "length"


def test_logprobs_equal_training_forward(tiny):
    model, rt = tiny("qwen2")
    eng = RolloutEngine(model, rollout_cfg(max_new_tokens=12), rt, eos_ids=[], vocab_size=VOCAB)
    outs = eng.generate([GenerationRequest(p, n=3, seed=7) for p in PROMPTS])
    worst = 0.0
    for c in outs:
        full = PROMPTS[c.prompt_index] + c.token_ids
        lp = torch.log_softmax(training_logits(model, full)[:, :VOCAB], dim=-1)
        L = len(PROMPTS[c.prompt_index])
        ref = lp[L - 1:-1].gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
        worst = max(worst, (ref - torch.tensor(c.logprobs)).abs().max().item())
    print(f"rollout vs training log-prob max |diff| (fp32, CPU): {worst:.3e}")
    assert worst <= 1e-5


def test_continuous_batching_equals_one_at_a_time(tiny):
    model, rt = tiny()
    reqs = [GenerationRequest(p, n=3, seed=11 + i, max_new_tokens=6 + 3 * i)
            for i, p in enumerate(PROMPTS)]
    # A batch limit of 5 sequences and a 17-block cache force waiting prompts to join as others
    # finish, and decode steps to preempt and recompute sequences.
    tight = RolloutEngine(model, rollout_cfg(max_batch_sequences=5, kv_cpu_tokens=64), rt,
                          eos_ids=[], vocab_size=VOCAB)
    together = tight.generate(reqs)
    assert tight.stats["preemptions"] > 0
    single = RolloutEngine(model, rollout_cfg(), rt, eos_ids=[], vocab_size=VOCAB)
    alone = [c for r in reqs for c in single.generate([r])]
    assert len(together) == len(alone) == 15
    for a, b in zip(together, alone):
        assert (a.sample_index, a.token_ids) == (b.sample_index, b.token_ids)
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    # the G samples of one prompt differ (they share the prefill, not the RNG stream)
    assert len({tuple(c.token_ids) for c in together[:3]}) > 1


def test_seeds_reproduce(tiny):
    model, rt = tiny()
    eng = RolloutEngine(model, rollout_cfg(top_k=20, top_p=0.9), rt, eos_ids=[], vocab_size=VOCAB)
    a = eng.generate([GenerationRequest(PROMPTS[1], n=4, seed=3)])
    b = eng.generate([GenerationRequest(PROMPTS[1], n=4, seed=3)])
    c = eng.generate([GenerationRequest(PROMPTS[1], n=4, seed=4)])
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_eos_stops_and_new_weights_are_seen(tiny):
    model, rt = tiny()
    eng = RolloutEngine(model, rollout_cfg(temperature=0.0), rt, eos_ids=[], vocab_size=VOCAB)
    ref = eng.generate([GenerationRequest(PROMPTS[0])])[0].token_ids
    eos = ref[4]
    first = ref.index(eos)
    eng2 = RolloutEngine(model, rollout_cfg(temperature=0.0), rt, eos_ids=[eos], vocab_size=VOCAB)
    out = eng2.generate([GenerationRequest(PROMPTS[0])])[0]
    assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop"
    # A "training step" changes the parameters in place: the engine must see it at once.
    with torch.no_grad():
        model[0].decoder.layers[0].mlp.linear_fc2.weight.mul_(-3.0)
    new = eng.generate([GenerationRequest(PROMPTS[0])])[0].token_ids
    assert new == greedy_reference(model, PROMPTS[0], 10)
    assert new != ref


def test_packed_graph_step_equals_plain_decode(tiny):
    """The CUDA-graph decode step's code (packed host inputs, device-only block-table decode,
    padding rows in a bucket) run eagerly on CPU gives the plain decode path's tokens."""
    model, rt = tiny()
    reqs = [GenerationRequest(p, n=3, seed=21 + i) for i, p in enumerate(PROMPTS)]
    reqs[2].temperature = 0.0  # a greedy request decodes through the same graph step
    reqs[3].temperature = 0.6
    plain = RolloutEngine(model, rollout_cfg(), rt, eos_ids=[], vocab_size=VOCAB).generate(reqs)
    packed = RolloutEngine(model, rollout_cfg(max_batch_sequences=7), rt, eos_ids=[], vocab_size=VOCAB)
    packed.use_graphs = True  # on CPU DecodeGraphs runs the step eagerly instead of replaying
    got = packed.generate(reqs)
    assert packed.graphs is not None and packed.graphs.buckets[-1] == 7
    assert got[6].token_ids == got[7].token_ids  # the greedy request's samples agree
    for a, b in zip(got, plain):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_overlapped_steps_equal_synchronous(tiny):
    """Decode step k+1 launched before step k is read (speculative tokens of sequences that hit
    EOS are dropped, waiting prompts drain the pipeline) gives the synchronous engine's output."""
    model, rt = tiny()
    reqs = [GenerationRequest(p, n=3, seed=31 + i, max_new_tokens=5 + 3 * i) for i, p in enumerate(PROMPTS)]
    reqs[1].temperature = 0.0
    base = RolloutEngine(model, rollout_cfg(max_batch_sequences=7), rt, eos_ids=[], vocab_size=VOCAB)
    ref = base.generate(reqs)
    eos = ref[4].token_ids[2]  # a token that really occurs mid-sequence
    sync = RolloutEngine(model, rollout_cfg(max_batch_sequences=7), rt, eos_ids=[eos], vocab_size=VOCAB)
    want = sync.generate(reqs)
    assert any(c.finish_reason == "stop" for c in want)
    ov = RolloutEngine(model, rollout_cfg(max_batch_sequences=7), rt, eos_ids=[eos], vocab_size=VOCAB,
                       overlap_steps=True)
    ov.use_graphs = True  # CPU: DecodeGraphs runs the packed step eagerly
    got = ov.generate(reqs)
    for a, b in zip(got, want):
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_a_lone_prompt_is_admitted_whatever_its_length(tiny):
    """The engine sizes its cache to the requests; a prompt whose completion ends inside the
    prompt's last block once stalled (the scheduler's admission watermark was not in the size)."""
    model, rt = tiny()
    for n_new in (1, 2, 5):
        eng = RolloutEngine(model, rollout_cfg(max_new_tokens=n_new, temperature=0.0), rt,
                            eos_ids=[], vocab_size=VOCAB)
        for prompt_len in range(1, 9):  # every offset in a 4-token block, twice
            prompt = list(range(1, prompt_len + 1))
            outs = eng.generate([GenerationRequest(prompt, n=1)])
            assert outs[0].token_ids == greedy_reference(model, prompt, n_new), (prompt_len, n_new)
            eng.release()
