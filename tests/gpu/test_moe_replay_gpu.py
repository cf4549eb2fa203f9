"""Routing replay and the zero-token MoE step on GPU in bf16 (skipped without CUDA): the device
path (CUDA dispatch kernels, grouped GEMM experts on sm_90+) with zero tokens, forward and
backward; replaying a forward's own routes gives bit-identical logits; a recording rollout (eager,
the decode graphs are off while recording) returns every fed token's routes, and the training
forward with the recorded routes matches its log-probs no worse than the freely routed one."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

VOCAB = 1000


def _model(rt):
    from r1mega.config import ModelConfig
    from r1mega.models.gpt import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(family="qwen3_moe", num_layers=3, hidden_size=256, num_attention_heads=4,
                      num_query_groups=2, kv_channels=64, ffn_hidden_size=512, vocab_size=VOCAB,
                      max_position_embeddings=256, qk_norm=True, spec="local", num_experts=16,
                      moe_router_topk=4, moe_ffn_hidden_size=128)
    return build_model(cfg, rt, wrap=False)


def _forward(model, seqs):
    from r1mega.models.attention import make_packed_seqs

    ids = torch.tensor([sum(seqs, [])], device="cuda")
    return model[0](input_ids=ids, position_ids=None, attention_mask=None,
                    packed_seq_params=make_packed_seqs([len(s) for s in seqs], "cuda"))[0]


def test_zero_tokens_on_the_device_path(single_rank_runtime):
    from r1mega.config import PrecisionConfig
    from r1mega.moe.balancing import moe_layers

    rt = single_rank_runtime(precision=PrecisionConfig(dtype="bf16"))
    layer = moe_layers(_model(rt))[0]
    x = torch.zeros(0, 1, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, _ = layer(x)
    assert out.shape == (0, 1, 256)
    out.float().sum().backward()
    assert x.grad.shape == (0, 1, 256)


def test_replay_of_own_routes_is_bit_identical(single_rank_runtime):
    from r1mega.config import PrecisionConfig
    from r1mega.moe.replay import RoutingCapture, RoutingReplay, routing_context

    rt = single_rank_runtime(precision=PrecisionConfig(dtype="bf16"))
    model = _model(rt)
    seqs = [list(range(1, 120)), list(range(300, 337)), [5, 6, 7]]
    cap = RoutingCapture()
    with torch.no_grad(), routing_context(model, capture=cap):
        free = _forward(model, seqs)
    routes = cap.take()
    with torch.no_grad(), routing_context(model, replay=RoutingReplay(routes), capture=cap):
        replayed = _forward(model, seqs)
    assert torch.equal(cap.take(), routes)
    assert torch.equal(replayed, free)


def test_recording_rollout_and_replayed_logprobs(single_rank_runtime):
    from r1mega.bench.rollout import logprob_mismatch
    from r1mega.config import PrecisionConfig, RolloutConfig
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    rt = single_rank_runtime(precision=PrecisionConfig(dtype="bf16"))
    model = _model(rt)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, VOCAB, (16, 24), generator=g).tolist()
    reqs = [GenerationRequest(p, n=1, seed=i, temperature=0.0) for i, p in enumerate(prompts)]
    outs = {}
    for record in (False, True):
        cfg = RolloutConfig(max_new_tokens=32, kv_memory_fraction=0.1, routing_replay=record)
        eng = RolloutEngine(model, cfg, rt, eos_ids=[], vocab_size=VOCAB)
        outs[record] = eng.generate(reqs)
        if record:
            assert eng.graphs is None  # recording reads routes back every step: eager decode
        eng.release()
    for a, b in zip(outs[False], outs[True]):
        assert a.routes is None and b.routes.shape == (3, 24 + 32 - 1, 4)
    off = logprob_mismatch(model, outs[True], prompts)
    on = logprob_mismatch(model, outs[True], prompts, replay=True)
    print(f"bf16 log-prob |diff| replay off: mean {off[0]:.2e} max {off[1]:.2e}; "
          f"on: mean {on[0]:.2e} max {on[1]:.2e}")
    assert on[1] <= off[1] + 1e-3 and on[0] <= off[0] + 1e-4
