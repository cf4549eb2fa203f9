"""Rollout with tensor parallelism (2 CPU ranks, gloo) equals the single-rank rollout.

Both layouts build the same initial weights (megatron draws master weights whole on CPU and
splits them), so greedy decoding must give the same tokens and sampling the same tokens too: the
counter-based noise of a vocabulary column depends on its global id only, and the vocab-parallel
argmax/log-sum-exp reductions see the same values as the unsharded sampler. Sequence parallelism
(switched off for generation) must not change anything either.
"""
from __future__ import annotations

import torch

from tests.distributed.harness import run_ranks

VOCAB = 100  # padded to 128: the padding columns must never be sampled
PROMPTS = [[5, 17, 3], list(range(20, 37)), [9], [(7 * i) % VOCAB for i in range(21)]]


def _generate(rank, world_size, tensor, kv_cache_dtype="auto"):
    from r1mega.config import ModelConfig, ParallelConfig, RolloutConfig
    from r1mega.models.gpt import build_model
    from r1mega.parallel.runtime import init_parallel
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    rt = init_parallel(ParallelConfig(tensor=tensor, seed=3))
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=96, vocab_size=VOCAB, qk_norm=True, qkv_bias=True,
                      max_position_embeddings=128)
    results = {}
    for sp in ([False, True] if tensor > 1 and kv_cache_dtype == "auto" else [False]):
        rt.sequence_parallel = sp
        torch.manual_seed(0)
        model = build_model(cfg, rt, wrap=False)
        with torch.no_grad():
            for p in model[0].parameters():
                if p.dim() == 2:
                    p.mul_(4.0)
        rcfg = RolloutConfig(kv_block_tokens=4, kv_cpu_tokens=2048, max_new_tokens=8,
                             cuda_graphs=False, return_logprobs_t1=True, kv_cache_dtype=kv_cache_dtype)
        eng = RolloutEngine(model, rcfg, rt, eos_ids=[], vocab_size=VOCAB)
        reqs = [GenerationRequest(p, n=1, temperature=0.0) for p in PROMPTS]
        reqs += [GenerationRequest(p, n=2, seed=9) for p in PROMPTS]
        reqs += [GenerationRequest(p, n=2, seed=4, top_k=7, top_p=0.8) for p in PROMPTS]
        outs = eng.generate(reqs)
        results[sp] = [(c.prompt_index, c.sample_index, c.token_ids, c.logprobs, c.logprobs_t1)
                       for c in outs]
        eng.release()
    return results


def test_tp2_equals_tp1():
    ref = run_ranks(_generate, 1, args=(1,))[0][False]
    for rank_result in run_ranks(_generate, 2, args=(2,)):
        for sp, outs in rank_result.items():
            assert len(outs) == len(ref)
            worst = 0.0
            for a, b in zip(outs, ref):
                assert a[:3] == b[:3], f"sequence_parallel={sp}: prompt {a[0]} sample {a[1]}"
                for x, y in ((a[3], b[3]), (a[4], b[4])):
                    worst = max(worst, (torch.tensor(x) - torch.tensor(y)).abs().max().item())
            assert worst < 1e-5, worst


def test_tp2_equals_tp1_with_fp8_kv_cache():
    """rollout.kv_cache_dtype=fp8 under TP: each rank quantises its own KV heads' rows, which are
    the rows the single rank quantises, so the rollouts agree as closely as the K/V entering the
    cache do (TP's split sums differ in the last fp32 bits, which can move an element across an
    e4m3 rounding boundary: hence 1e-3, not 1e-5)."""
    ref = run_ranks(_generate, 1, args=(1, "fp8"))[0][False]
    for rank_result in run_ranks(_generate, 2, args=(2, "fp8")):
        outs = rank_result[False]
        assert len(outs) == len(ref)
        worst = 0.0
        for a, b in zip(outs, ref):
            assert a[:3] == b[:3], f"prompt {a[0]} sample {a[1]}"
            for x, y in ((a[3], b[3]), (a[4], b[4])):
                worst = max(worst, (torch.tensor(x) - torch.tensor(y)).abs().max().item())
        print(f"fp8 KV cache, TP=2 vs TP=1 log-prob max |diff|: {worst:.2e}")
        assert worst < 1e-3, worst


def _generate_cli(rank, world_size, cfg_path, prompts_path, out_path):
    from r1mega.rollout import generate_cli

    return generate_cli.main([cfg_path, "--prompts", prompts_path, "--out", out_path, "--no-progress"])


def test_generate_cli_data_parallel_equals_single_rank(tmp_path):
    """DP=2: each rank samples its own prompts; rank 0 writes all of them, in prompt order, with
    the same completions a single rank gives (the RNG is per request, not per rank)."""
    import json

    cfg = {"model": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                         ffn_hidden_size=96, vocab_size=128, max_position_embeddings=128),
           "data": {"tokenizer": "char"},
           "rollout": {"max_new_tokens": 6, "group_size": 2, "kv_cpu_tokens": 1024, "cuda_graphs": False}}
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(json.dumps(cfg))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"{i} + {i} ="}) for i in range(5)) + "\n")
    outs = {}
    for world in (1, 2):
        out = tmp_path / f"out{world}.jsonl"
        run_ranks(_generate_cli, world, args=(str(cfg_path), str(prompts), str(out)))
        outs[world] = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in outs[2]] == [(i, j) for i in range(5) for j in range(2)]
    assert [r["token_ids"] for r in outs[2]] == [r["token_ids"] for r in outs[1]]
