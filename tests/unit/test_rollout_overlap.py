"""Overlapped decode steps on CPU (DecodeGraphs runs the packed step eagerly): sequences that
finish leave the batch without draining the pipeline, and every token, log-prob and finish
reason is the synchronous engine's. Also the packed step inputs themselves (rows sent, padding,
device-side token gather) against hand-built expectations."""
from __future__ import annotations

import pytest
import torch

from r1mega.config import ModelConfig, RolloutConfig
from r1mega.models.gpt import build_model
from r1mega.rollout.cuda_graphs import BT, CTX, IDS, DecodeGraphs
from r1mega.rollout.engine import RolloutEngine
from r1mega.rollout.types import GenerationRequest

VOCAB = 128
PROMPTS = [[5, 17, 3], list(range(20, 37)), [9], [(7 * i) % VOCAB for i in range(33)], [1, 2, 3, 4, 5, 6, 7, 8]]


@pytest.fixture
def model_rt(single_rank_runtime):
    rt = single_rank_runtime()
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="llama", vocab_size=VOCAB, max_position_embeddings=128), rt, wrap=False)
    with torch.no_grad():  # peaked distributions: fewer near-ties between rows of different batches
        for p in model[0].parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model, rt


def _engine(model, rt, overlap: bool, eos, **kw):
    base = dict(kv_block_tokens=4, kv_cpu_tokens=4096, max_new_tokens=10, max_batch_sequences=64,
                temperature=1.0, cuda_graphs=False)
    base.update(kw)
    eng = RolloutEngine(model, RolloutConfig(**base), rt, eos_ids=list(eos), vocab_size=VOCAB,
                        overlap_steps=overlap)
    eng.use_graphs = True  # CPU: DecodeGraphs runs the packed step eagerly instead of replaying
    return eng


def _same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a.prompt_index, a.sample_index) == (b.prompt_index, b.sample_index)
        assert (a.token_ids, a.finish_reason, a.stop_reason) == (b.token_ids, b.finish_reason, b.stop_reason)
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_finishes_leave_the_batch_without_a_drain(model_rt):
    model, rt = model_rt
    reqs = [GenerationRequest(p, n=4, seed=40 + i, max_new_tokens=6 + 4 * i) for i, p in enumerate(PROMPTS)]
    free = _engine(model, rt, False, []).generate(reqs)
    # EOS ids that really occur early in some samples: finishes spread over many steps.
    eos = {free[0].token_ids[2], free[6].token_ids[4], free[13].token_ids[7]}
    sync = _engine(model, rt, False, eos)
    want = sync.generate(reqs)
    stop_steps = {len(c.token_ids) for c in want if c.finish_reason == "stop"}
    last = max(len(c.token_ids) for c in want)
    # What the test needs: EOS finishes at several steps while others still run, and length finishes.
    assert len(stop_steps - {last}) >= 3 and any(c.finish_reason == "length" for c in want), stop_steps

    ov = _engine(model, rt, True, eos)
    seen = []
    got = ov.generate(reqs, on_finish=seen.extend)
    _same(got, want)
    # All prompts fit at once: the old policy drained at every step with a finish; none now.
    assert ov.stats["overlap_drains"] == 0
    # At most one step more than synchronous decoding: the one launched before the host saw
    # that the last sequences had stopped.
    assert sync.stats["decode"] <= ov.stats["decode"] <= sync.stats["decode"] + 1
    # on_finish saw every completion once, as it finished (all started together: by length)
    assert sorted(seen, key=lambda c: (c.prompt_index, c.sample_index)) == got
    assert all(a is b for a, b in zip(sorted(seen, key=lambda c: (c.prompt_index, c.sample_index)), got))
    assert [len(c.token_ids) for c in seen] == sorted(len(c.token_ids) for c in seen)


def test_waiting_prompts_and_full_cache_still_drain(model_rt):
    """Waiting prompts and a cache too small for everyone (preemption) force drains; the output
    is still the synchronous engine's, which here also preempts."""
    model, rt = model_rt
    reqs = [GenerationRequest(p, n=3, seed=11 + i, max_new_tokens=6 + 3 * i) for i, p in enumerate(PROMPTS)]
    free = _engine(model, rt, False, []).generate(reqs)
    eos = {free[1].token_ids[3], free[8].token_ids[5]}
    tight = dict(max_batch_sequences=5, kv_cpu_tokens=64)
    sync = _engine(model, rt, False, eos, **tight)
    want = sync.generate(reqs)
    assert sync.stats["preemptions"] > 0 and any(c.finish_reason == "stop" for c in want)
    ov = _engine(model, rt, True, eos, **tight)
    _same(ov.generate(reqs), want)
    assert ov.stats["overlap_drains"] > 0


def _recording_graphs(max_batch=16, max_blocks=4):
    seen = []

    def step(ints, temperature):
        seen.append(ints.clone())
        return torch.zeros(ints.shape[0], 2, dtype=torch.float64)

    return DecodeGraphs(step, max_batch, max_blocks, torch.device("cpu")), seen


def _padding(rows, width):
    pad = torch.zeros(rows, width, dtype=torch.int64)
    pad[:, CTX] = 1
    return pad


def test_packed_rows_and_padding_reset_only_where_needed():
    g, seen = _recording_graphs()
    full = BT + 4
    w1 = BT + 3
    rows1 = torch.arange(1, 12 * w1 + 1, dtype=torch.int64).view(12, w1)
    g.host_rows(0, 12, w1).copy_(rows1)
    g.run(12, w1, slot=0)
    want = _padding(16, full)
    want[:12, :w1] = rows1
    assert torch.equal(seen[-1], want)  # bucket 16: rows 12..15 are padding
    # A smaller batch (bucket 8, narrower block table): rows 5..11 held real rows and must be
    # padding again; the rest of the buffer was padding already.
    w2 = BT + 2
    g.host_rows(1, 5, w2).fill_(7)
    g.run(5, w2, slot=1)
    want[5:] = _padding(11, full)
    want[:5, :w2] = 7
    assert torch.equal(seen[-1], want[:8])
    assert torch.equal(g.ints, want)


def test_token_column_comes_from_the_previous_step_on_the_device():
    g, seen = _recording_graphs()
    prev = torch.tensor([10.0, 11.0, 12.0, 13.0, 14.0, 15.0], dtype=torch.float64)  # a step's samples
    g.host_rows(0, 6, BT + 1).fill_(0)
    g.run(6, BT + 1, prev_tokens=prev)  # same rows: row i takes prev[i]
    assert seen[-1][:6, IDS].tolist() == [10, 11, 12, 13, 14, 15]
    host = g.host_rows(1, 4, BT + 1)
    host.fill_(0)
    host[:, IDS] = torch.tensor([5, 3, 0, 1])  # finished rows 2 and 4 left: survivors' old rows
    g.run(4, BT + 1, slot=1, prev_tokens=prev, gather=True)
    assert seen[-1][:4, IDS].tolist() == [15, 13, 10, 11]
