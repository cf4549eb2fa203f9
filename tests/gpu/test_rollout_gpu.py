"""Rollout on GPU: the Triton paged decode kernel against the SDPA gather reference, and the
CUDA-graph decode path against the eager path (skipped without CUDA)."""
from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("keys_major", [False, True], ids=["rows", "keys"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d,bs", [(16, 4, 128, 16), (8, 8, 64, 16), (12, 2, 64, 32)])
def test_triton_paged_decode_matches_gather(dtype, hq, hkv, d, bs, keys_major):
    from r1mega.rollout.attention import AttentionBatch, attend_gather
    from r1mega.rollout.triton_paged import paged_decode_attention

    torch.manual_seed(0)
    dev = "cuda"
    ctx = [1, 7, 16, 17, 100, 333, 64, 5]
    n_blocks = sum(-(-c // bs) for c in ctx) + 1
    k_cache = torch.randn(n_blocks, bs, hkv, d, device=dev, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    perm = (torch.randperm(n_blocks - 1) + 1).tolist()  # scattered blocks, never the scratch one
    tables, i = [], 0
    for c in ctx:
        n = -(-c // bs)
        tables.append(perm[i:i + n])
        i += n
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev)
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device=dev)
    q = torch.randn(len(ctx), hq, d, device=dev, dtype=dtype)
    scale = 1 / math.sqrt(d)
    out = torch.full_like(q, float("nan"))  # poisoned: every row must be written
    paged_decode_attention(q, k_cache, v_cache, bt, ctx_t, scale, out=out, keys_major=keys_major)
    batch = AttentionBatch(slots=None, positions=None, q_lens=[1] * len(ctx), ctx_lens=ctx_t,
                           ctx_lens_host=ctx, block_tables=bt, block_tokens=bs,
                           q_index=torch.arange(len(ctx), device=dev)[:, None])
    ref = attend_gather(q.double(), k_cache.double(), v_cache.double(), batch, scale)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def _engine_outputs(rt, model, eos_ids=(), **cfg_kw):
    from r1mega.config import RolloutConfig
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    # compile_decode off: this compares graph replay with eager launches of the same kernels.
    cfg = RolloutConfig(max_new_tokens=24, kv_block_tokens=16, max_batch_sequences=64,
                        compile_decode=False, **cfg_kw)
    eng = RolloutEngine(model, cfg, rt, eos_ids=list(eos_ids), vocab_size=1000)
    prompts = [[(i * 37 + j) % 1000 for j in range(5 + 11 * i)] for i in range(6)]
    outs = eng.generate([GenerationRequest(p, n=3, seed=i) for i, p in enumerate(prompts)])
    used_graphs = eng.graphs is not None
    eng.release()
    return [(c.token_ids, c.logprobs) for c in outs], used_graphs


def test_cuda_graph_decode_equals_eager(single_rank_runtime):
    from r1mega.config import ModelConfig, PrecisionConfig
    from r1mega.models.gpt import build_model

    rt = single_rank_runtime(precision=PrecisionConfig(dtype="fp32"))
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=8,
                                    num_query_groups=2, ffn_hidden_size=512, vocab_size=1000,
                                    max_position_embeddings=256), rt, wrap=False)
    graphed, g1 = _engine_outputs(rt, model, cuda_graphs=True)
    eager, g2 = _engine_outputs(rt, model, cuda_graphs=False)
    assert g1 and not g2
    for (ta, la), (tb, lb) in zip(graphed, eager):
        assert ta == tb
        torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), atol=1e-5, rtol=0)


def test_overlapped_decode_equals_synchronous(single_rank_runtime):
    """Launching step k+1 before reading step k changes no token and no log-prob, also when
    sequences finish at different steps (many EOS ids: ~5% per step) and join late (18 samples)."""
    from r1mega.config import ModelConfig, PrecisionConfig
    from r1mega.models.gpt import build_model

    rt = single_rank_runtime(precision=PrecisionConfig(dtype="fp32"))
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=8,
                                    num_query_groups=2, ffn_hidden_size=512, vocab_size=1000,
                                    max_position_embeddings=256), rt, wrap=False)
    eos = range(0, 1000, 20)
    sync, g1 = _engine_outputs(rt, model, eos_ids=eos, cuda_graphs=True, overlap_steps=False)
    over, g2 = _engine_outputs(rt, model, eos_ids=eos, cuda_graphs=True, overlap_steps=True)
    assert g1 and g2
    lengths = [len(t) for t, _ in sync]
    assert min(lengths) < max(lengths), lengths  # some sequences stopped early
    for (ta, la), (tb, lb) in zip(sync, over):
        assert ta == tb
        torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), atol=1e-5, rtol=0)


def test_overlap_pipelines_through_finishes_and_bucket_shrinks(single_rank_runtime):
    """64 sequences admitted at once that stop at many different steps (EOS ~4% per step,
    max_new_tokens 8..38 per prompt): the overlapped engine never drains, keeps launching with
    the survivors (tokens gathered on the device) down into a smaller graph bucket captured
    mid-pipeline, and gives the synchronous graph engine's tokens."""
    from r1mega.config import ModelConfig, PrecisionConfig, RolloutConfig
    from r1mega.models.gpt import build_model
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    rt = single_rank_runtime(precision=PrecisionConfig(dtype="fp32"))
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=8,
                                    num_query_groups=2, ffn_hidden_size=512, vocab_size=1000,
                                    max_position_embeddings=256), rt, wrap=False)
    reqs = [GenerationRequest([(i * 37 + j) % 1000 for j in range(3 + 5 * i)], n=4, seed=i,
                              max_new_tokens=8 + 2 * i) for i in range(16)]
    runs = {}
    for overlap in (False, True):
        cfg = RolloutConfig(max_new_tokens=40, kv_block_tokens=16, max_batch_sequences=64,
                            compile_decode=False, cuda_graphs=True, overlap_steps=overlap)
        eng = RolloutEngine(model, cfg, rt, eos_ids=list(range(0, 1000, 25)), vocab_size=1000)
        runs[overlap] = (eng.generate(reqs), dict(eng.stats))
        eng.release()
    (want, _), (got, st) = runs[False], runs[True]
    assert any(c.finish_reason == "stop" for c in want)
    assert len({len(c.token_ids) for c in want}) > 5
    assert st["overlap_drains"] == 0
    assert st["graph_captures"] >= 2  # 64 rows, then fewer than 32: a smaller bucket
    assert 0 < st["capture_s"] < st["seconds"]
    for a, b in zip(got, want):
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_kept_cache_and_graphs_see_updated_weights(single_rank_runtime):
    """A small KV cache is kept across rollout phases with its CUDA graphs (kv_keep_max_fraction);
    after an in-place weight update (what the optimizer does) the replayed graphs must produce
    exactly what a fresh engine produces with the new weights."""
    from r1mega.config import ModelConfig, PrecisionConfig, RolloutConfig
    from r1mega.models.gpt import build_model
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    rt = single_rank_runtime(precision=PrecisionConfig(dtype="fp32"))
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=8,
                                    num_query_groups=2, ffn_hidden_size=512, vocab_size=1000,
                                    max_position_embeddings=256), rt, wrap=False)
    cfg = RolloutConfig(max_new_tokens=20, kv_block_tokens=16, max_batch_sequences=64,
                        compile_decode=False, cuda_graphs=True, temperature=0.0)
    reqs = [GenerationRequest([(i * 31 + j) % 1000 for j in range(4 + 5 * i)], n=2, seed=i) for i in range(5)]
    eng = RolloutEngine(model, cfg, rt, eos_ids=[], vocab_size=1000)
    eng.generate(reqs)
    graphs = eng.graphs
    eng.end_phase()
    assert eng.cache.is_allocated and eng.graphs is graphs  # kept: tiny cache
    with torch.no_grad():
        for p in model[0].parameters():
            p.add_(0.05 * torch.randn_like(p))
    again = eng.generate(reqs)
    assert eng.graphs is graphs and graphs.captures == 1  # replayed, not recaptured
    fresh = RolloutEngine(model, cfg, rt, eos_ids=[], vocab_size=1000).generate(reqs)
    for a, b in zip(again, fresh):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    eng.cfg = RolloutConfig(**{**cfg.__dict__, "kv_keep_max_fraction": 0.0})
    eng.end_phase()
    assert not eng.cache.is_allocated and eng.graphs is None
