"""rollout.exact on the tiny CPU model (fp32): the log-prob the rollout reports for each sampled
token equals, bit for bit, the one the training forward gives for it, whatever the decode batch
(1, 3, 8 sequences), with preemption, and in packed micro-batches of different compositions.

The reference is the model's own training forward (megatron GPTModel on packed THD sequences,
no KV cache) followed by the trainer's log-prob function; nothing here is hard-coded.
"""
from __future__ import annotations

import random

import pytest
import torch

from r1mega.config import ModelConfig, RolloutConfig
from r1mega.models.attention import make_packed_seqs
from r1mega.models.gpt import build_model
from r1mega.ops.exact_logprobs import exact_token_logprobs
from r1mega.rollout.engine import RolloutEngine
from r1mega.rollout.types import GenerationRequest

VOCAB = 128
PROMPTS = [[5, 17, 3], list(range(20, 37)), [9], [(7 * i) % VOCAB for i in range(21)],
           [1, 2, 3, 4, 5, 6, 7, 8], [40, 41], [(3 * i + 1) % VOCAB for i in range(11)], [77] * 5]


@pytest.fixture
def tiny(single_rank_runtime):
    def make(**kw):
        rt = single_rank_runtime()
        torch.manual_seed(0)
        base = dict(vocab_size=VOCAB, max_position_embeddings=128, spec="local")
        base.update(kw)
        model = build_model(ModelConfig(**base), rt, wrap=False)
        with torch.no_grad():  # peaked enough that samples are not a string of near-ties
            for p in model[0].parameters():
                if p.dim() == 2:
                    p.mul_(4.0)
        return model, rt
    return make


def exact_cfg(**kw) -> RolloutConfig:
    base = dict(kv_block_tokens=4, kv_cpu_tokens=4096, max_new_tokens=9, max_batch_sequences=64,
                temperature=1.0, cuda_graphs=False, compile_decode=False, exact=True)
    base.update(kw)
    return RolloutConfig(**base)


def train_logprobs(model, seqs: list[tuple[list[int], list[int]]], temperature: float) -> list:
    """The training side: ONE packed forward over all (prompt, completion) pairs in the given
    order, then the trainer's log-prob function on each completion's predicting positions."""
    tokens = [p + c for p, c in seqs]
    ids = torch.tensor([sum(tokens, [])])
    with torch.no_grad():
        logits = model[0](input_ids=ids, position_ids=None, attention_mask=None,
                          packed_seq_params=make_packed_seqs([len(t) for t in tokens], "cpu"))[0]
    out, start = [], 0
    for (p, c), t in zip(seqs, tokens):
        rows = logits[start + len(p) - 1:start + len(t) - 1]  # (len(c), V)
        temp = torch.full((len(c),), temperature, dtype=torch.float32)
        out.append(exact_token_logprobs(rows, torch.tensor(c), temp, valid_cols=VOCAB))
        start += len(t)
    return out


def assert_bitwise(model, completions, prompts, temperature, order=None):
    seqs = [(prompts[c.prompt_index], c.token_ids) for c in completions]
    idx = list(range(len(seqs))) if order is None else order
    got = train_logprobs(model, [seqs[i] for i in idx], temperature)
    for i, lp in zip(idx, got):
        roll = torch.tensor(completions[i].logprobs, dtype=torch.float32)
        assert torch.equal(roll, lp), (
            f"completion {i}: max |diff| {float((roll - lp).abs().max()):.3e}")


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_decode_batch_sizes_bitwise_equal_training(tiny, batch):
    model, rt = tiny()
    eng = RolloutEngine(model, exact_cfg(max_batch_sequences=batch), rt, eos_ids=[], vocab_size=VOCAB)
    reqs = [GenerationRequest(p, n=1, seed=5 + i, max_new_tokens=6) for i, p in enumerate(PROMPTS)]
    outs = eng.generate(reqs)
    assert eng.stats["decode"] > 0
    assert_bitwise(model, outs, PROMPTS, 1.0)


def test_preemption_and_packing_compositions(tiny):
    model, rt = tiny(family="qwen3", qk_norm=True, rope_theta=1e6)
    reqs = [GenerationRequest(p, n=3, seed=11 + i, max_new_tokens=4 + 3 * i)
            for i, p in enumerate(PROMPTS[:4])]
    # 5 sequences at most and a 10-block cache: decode steps preempt and recompute sequences.
    eng = RolloutEngine(model, exact_cfg(max_batch_sequences=5, kv_cpu_tokens=40), rt,
                        eos_ids=[], vocab_size=VOCAB)
    outs = eng.generate(reqs)
    assert eng.stats["preemptions"] > 0
    # Micro-batches of several compositions: all together, reversed, shuffled in pairs, alone.
    assert_bitwise(model, outs, PROMPTS, 1.0)
    assert_bitwise(model, outs, PROMPTS, 1.0, order=list(reversed(range(len(outs)))))
    order = list(range(len(outs)))
    random.Random(0).shuffle(order)
    for i in range(0, 6, 2):
        assert_bitwise(model, outs, PROMPTS, 1.0, order=order[i:i + 2])
    assert_bitwise(model, outs, PROMPTS, 1.0, order=[order[0]])


def test_temperature_and_greedy_rows(tiny):
    model, rt = tiny(family="qwen2", qkv_bias=True, tied_embeddings=False)
    eng = RolloutEngine(model, exact_cfg(temperature=0.7), rt, eos_ids=[], vocab_size=VOCAB)
    outs = eng.generate([GenerationRequest(p, n=2, seed=3) for p in PROMPTS[:3]])
    assert_bitwise(model, outs, PROMPTS, 0.7)
    greedy = RolloutEngine(model, exact_cfg(temperature=0.0), rt, eos_ids=[], vocab_size=VOCAB)
    outs = greedy.generate([GenerationRequest(p) for p in PROMPTS[3:6]])
    assert_bitwise(model, outs, PROMPTS[3:6], 1.0)  # greedy rows report temperature-1 log-probs


def test_default_mode_is_not_bitwise_here(tiny):
    """Why the mode exists: on this CPU the default path differs in the low bits somewhere (if a
    future torch made it exact by itself, this test says so and can go)."""
    model, rt = tiny()
    eng = RolloutEngine(model, exact_cfg(exact=False), rt, eos_ids=[], vocab_size=VOCAB)
    outs = eng.generate([GenerationRequest(p, n=2, seed=5) for p in PROMPTS])
    seqs = [(PROMPTS[c.prompt_index], c.token_ids) for c in outs]
    ref = train_logprobs(model, seqs, 1.0)
    diffs = [float((torch.tensor(c.logprobs) - r).abs().max()) for c, r in zip(outs, ref)]
    assert max(diffs) < 1e-4  # close ...
    assert max(diffs) > 0.0   # ... but not bitwise


def test_graph_step_code_bitwise_equal_training(tiny):
    """The CUDA-graph decode step's code (device-only block tables, padding rows of a bucket),
    run eagerly on CPU, stays bitwise equal to training: the bucket's padding rows change nothing."""
    model, rt = tiny()
    eng = RolloutEngine(model, exact_cfg(max_batch_sequences=7), rt, eos_ids=[], vocab_size=VOCAB)
    eng.use_graphs = True  # on CPU DecodeGraphs runs the step eagerly instead of replaying
    outs = eng.generate([GenerationRequest(p, n=2, seed=9 + i) for i, p in enumerate(PROMPTS[:3])])
    assert eng.graphs is not None
    assert_bitwise(model, outs, PROMPTS, 1.0)


def test_overlapped_steps_keep_exact_bits(tiny, monkeypatch):
    """The trainer's default rollout overlaps decode steps (rollout.overlap_steps): in the exact
    mode too, every token is the synchronous engine's and every log-prob the training forward's,
    with finishes (EOS) at several steps and sequences leaving the batch without a drain."""
    model, rt = tiny()
    reqs = [GenerationRequest(p, n=2, seed=21 + i, max_new_tokens=5 + i) for i, p in enumerate(PROMPTS)]

    def run(overlap, eos):
        eng = RolloutEngine(model, exact_cfg(max_batch_sequences=16), rt, eos_ids=list(eos),
                            vocab_size=VOCAB, overlap_steps=overlap)
        eng.use_graphs = True  # CPU: DecodeGraphs runs the packed step eagerly
        return eng, eng.generate(reqs)

    from r1mega.rollout.overlap import OverlappedDecoder

    launches = []
    real_launch = OverlappedDecoder.launch
    monkeypatch.setattr(OverlappedDecoder, "launch",
                        lambda self, seqs, **kw: launches.append(kw.get("prev") is not None)
                        or real_launch(self, seqs, **kw))
    _, free = run(False, [])
    eos = {free[0].token_ids[2], free[5].token_ids[3]}
    _, sync = run(False, eos)
    assert not launches
    eng, ov = run(True, eos)
    # steps launched from the previous step's device tokens, before the host read them
    assert sum(launches) >= 3 and any(c.finish_reason == "stop" for c in ov)
    for a, b in zip(ov, sync):
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
        assert torch.equal(torch.tensor(a.logprobs), torch.tensor(b.logprobs))
    assert_bitwise(model, ov, PROMPTS, 1.0)


def test_decode_steps_call_the_exact_swiglu(tiny, monkeypatch):
    """With the fused SwiGLU wired into the MLPs (on CPU: the device check forced, the reference
    standing in for the kernel), each decode step's layers call it, once per layer with one row
    per sequence, and the training forward calls the same function; the log-probs stay bitwise
    equal. (On CUDA the wiring is on by itself: tests/gpu/test_exact_gpu.py.)"""
    from r1mega.ops import exact_mlp, triton_swiglu

    monkeypatch.setattr(exact_mlp, "fused_swiglu_wanted", lambda device: True)
    calls, phase = [], [None]

    def counting(y):
        calls.append((phase[0], y.reshape(-1, y.shape[-1]).shape[0]))
        return triton_swiglu.swiglu_reference(y)

    monkeypatch.setattr(triton_swiglu, "swiglu", counting)
    model, rt = tiny()
    eng = RolloutEngine(model, exact_cfg(max_batch_sequences=3), rt, eos_ids=[], vocab_size=VOCAB)
    decode, steps = eng._decode, []

    def spy(seqs):
        phase[0] = len(seqs)  # this decode step's rows
        steps.append(len(seqs))
        try:
            return decode(seqs)
        finally:
            phase[0] = None

    eng._decode = spy
    outs = eng.generate([GenerationRequest(p, n=1, seed=5 + i, max_new_tokens=5)
                         for i, p in enumerate(PROMPTS[:4])])
    layers = len(model[0].decoder.layers)
    in_decode = [c for c in calls if c[0] is not None]
    assert steps and len(in_decode) == layers * len(steps)
    assert all(rows == step_rows for step_rows, rows in in_decode)
    calls.clear()
    assert_bitwise(model, outs, PROMPTS, 1.0)
    assert len(calls) == layers  # the packed training forward: one call per layer


def test_decode_steps_use_the_exact_fused_rope(tiny, monkeypatch):
    """On CUDA the exact decode and prefill keep the fused RoPE + KV write, in its ``exact=True``
    variant (eager rounding). Here that path is forced on CPU with the eager reference standing
    in for the kernel: each prefill and decode step's layers call it with exact=True and the
    log-probs stay bitwise equal to training. (The kernel's own bits: the interpreter test and
    tests/gpu.)"""
    from r1mega.rollout import triton_rope_kv

    calls = []

    def stand_in(qkv, cos, sin, slots, k_cache, v_cache, out=None, exact=False):
        calls.append(exact)
        return triton_rope_kv.rope_kv_write_reference(qkv, cos, sin, slots, k_cache, v_cache)

    monkeypatch.setattr(triton_rope_kv, "rope_kv_write_triton", stand_in)
    model, rt = tiny()
    eng = RolloutEngine(model, exact_cfg(max_batch_sequences=3), rt, eos_ids=[], vocab_size=VOCAB)
    assert eng.runner.fused_rope_kv_supported()
    eng.runner.fused_rope_kv_enabled = True  # what enable_exact keeps on CUDA for fp32 and bf16
    eng.use_triton = True  # decode from device tensors (block tables), as on CUDA
    outs = eng.generate([GenerationRequest(p, n=1, seed=2 + i, max_new_tokens=5)
                         for i, p in enumerate(PROMPTS[:4])])
    assert calls and all(calls)
    steps = eng.stats["prefill"] + eng.stats["decode"]
    assert eng.stats["prefill"] >= 1 and len(calls) == steps * len(model[0].decoder.layers)
    assert_bitwise(model, outs, PROMPTS, 1.0)
