"""rollout.decode_streams=2: a decode graph's two halves on two streams, against one stream."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


_W = {}


def _slow_rows(ints: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Row-wise work long enough that a missing join would read the second half unfinished."""
    if ints.device not in _W:  # made before any capture: no host copy inside one
        g = torch.Generator(device="cpu").manual_seed(0)
        _W[ints.device] = (torch.randn(512, 512, generator=g) / 512 ** 0.5).to(ints.device)
    w = _W[ints.device]
    x = torch.sin(ints[:, :8].double().repeat(1, 64).float() * 0.37 + temperature[:, None])
    for _ in range(40):
        x = torch.tanh(x @ w + 0.1)
    return torch.stack([x.sum(1).double(), x[:, 0].double()], dim=1)


def test_graph_of_two_halves_equals_the_halves_run_eagerly():
    from r1mega.rollout.cuda_graphs import BT, CTX, DecodeGraphs

    dev = torch.device("cuda")
    g = DecodeGraphs(_slow_rows, 256, 6, dev, streams=2)
    for n in (256, 200, 130, 96):  # 96: a bucket of its own, split 48 + 48
        host = g.host_rows(0, n, BT + 6)
        host.copy_(torch.arange(n * (BT + 6)).view(n, -1) % 997)
        host[:, CTX] = 1
        g.host_temp_slots[0][:n] = torch.linspace(0.5, 1.5, n)
        out = g.run(n, BT + 6).clone()
        b = g.bucket_for(n)
        h = g.split_at(b)
        assert h < b
        want = torch.cat([_slow_rows(g.ints[:h], g.temperature[:h]),
                          _slow_rows(g.ints[h:b], g.temperature[h:b])])[:n]
        assert torch.equal(out, want), n
    assert g.captures == 2  # 256 (down to 130) and 96


def _model(rt):
    from r1mega.config import ModelConfig
    from r1mega.models.gpt import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=8,
                                   num_query_groups=2, ffn_hidden_size=512, vocab_size=1000,
                                   max_position_embeddings=256), rt, wrap=False)


def _generate(rt, model, streams, fp8=None, **cfg_kw):
    from r1mega.config import RolloutConfig
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    cfg = RolloutConfig(max_new_tokens=24, kv_block_tokens=16, max_batch_sequences=128,
                        decode_streams=streams, **cfg_kw)
    eng = RolloutEngine(model, cfg, rt, eos_ids=list(range(0, 1000, 40)), vocab_size=1000)
    prompts = [[(i * 37 + j) % 1000 for j in range(5 + 3 * i)] for i in range(32)]
    reqs = [GenerationRequest(p, n=3, seed=i) for i, p in enumerate(prompts)]  # 96 rows
    if fp8 is None:
        outs = eng.generate(reqs)
    else:
        with fp8.decoding():
            outs = eng.generate(reqs)
    graphs = eng.graphs
    split = graphs is not None and any(graphs.split_at(b) < b for b in graphs.graphs)
    eng.release()
    return outs, prompts, split


def test_two_streams_decode_as_one(single_rank_runtime):
    """fp32 model: the same tokens and log-probs (a half's GEMMs have fewer rows, so cuBLAS may
    pick another kernel: float32 rounding, not a different result), also when sequences stop at
    different steps and the batch shrinks under the overlapped decoder."""
    from r1mega.config import PrecisionConfig

    rt = single_rank_runtime(precision=PrecisionConfig(dtype="fp32"))
    model = _model(rt)
    one, _, s1 = _generate(rt, model, 1, compile_decode=False)
    two, _, s2 = _generate(rt, model, 2, compile_decode=False)
    assert s2 and not s1
    assert len({len(c.token_ids) for c in one}) > 3  # finished at different steps
    for a, b in zip(two, one):
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8-weights-fp8-kv"])
def test_two_streams_compiled_logprobs_near_training(single_rank_runtime, fp8):
    """bf16 model, compiled decode in CUDA graphs as the bench runs it: every sequence's
    log-probs stay as close to the training forward's with two streams as with one."""
    from r1mega.bench.rollout import logprob_mismatch
    from r1mega.config import PrecisionConfig
    from r1mega.precision.policy import resolve_rollout_fp8_policy
    from r1mega.precision.rollout import Fp8RolloutWeights

    rt = single_rank_runtime(precision=PrecisionConfig(dtype="bf16"))
    model = _model(rt)
    kw = {"compile_decode": True}
    weights = None
    if fp8:
        kw["kv_cache_dtype"] = "fp8"
        policy = resolve_rollout_fp8_policy(PrecisionConfig(fp8_rollout=True, fp8_recipe="tensorwise"), "cuda")
        weights = Fp8RolloutWeights(model[0], policy)
    got = {}
    for streams in (1, 2):
        outs, prompts, split = _generate(rt, model, streams, fp8=weights, **kw)
        assert split == (streams == 2)
        got[streams] = logprob_mismatch(model, outs, prompts)
    if weights is not None:
        weights.remove()
    (m1, w1), (m2, w2) = got[1], got[2]
    assert m2 < 1.5 * m1 + 0.01 and w2 < 1.5 * w1 + 0.05, got
