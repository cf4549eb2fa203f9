"""o_proj's input quantised in 1 x 128 head tiles by the FP8 decode kernel's epilogue
(csrc/paged_decode_rows.cuh's tiles, ``R1MEGA_PAGED_FP8_TILES``, one CTA a KV head): its attention
equals the plain tensor-core kernel's to the bit, its e4m3 tiles and scales equal the reference
tile quantiser (``quantize_reference(..., "tile")``) on that output to the bit, also under CUDA
graph replay; the op falls back to the same contract; an FP8 rollout decodes through it and the
split-K GEMM's tile route with the first greedy tokens of the row route."""
from __future__ import annotations

import math

import pytest
import torch

from tests.gpu.test_paged_rows_gpu import _case, _ext

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a GPU with e4m3 (sm_89+)")

# (Hq, Hkv, D, block tokens): head_dim 128, groups of 1 to 8
SHAPES = [(16, 4, 128, 16), (8, 8, 128, 32), (32, 4, 128, 16), (6, 2, 128, 16)]


def _tiles_reference(out, power2, pad=16):
    from r1mega.precision.linear import _pad_rows
    from r1mega.precision.quantize import quantize_reference

    a = quantize_reference(_pad_rows(out.reshape(out.shape[0], -1), pad), "tile", "e4m3", power2)
    return a.data, a.scale.contiguous()


@pytest.mark.parametrize("power2", [True, False], ids=["power2", "exact-scales"])
@pytest.mark.parametrize("repeat", [1, 5], ids=["8-seqs", "37-seqs"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=["-".join(map(str, s)) for s in SHAPES])
def test_epilogue_tiles_equal_the_reference_on_the_kernels_output(shape, dtype, repeat, power2):
    cp = _ext()
    q, k8, ks, v8, vs, bt, ctx = _case(shape, dtype, repeat)
    scale = 1 / math.sqrt(shape[2])
    plain = cp.paged_decode_fp8_cuda(q, k8, v8, bt, ctx, scale, ks, vs, tensor_cores=True)
    out, q8, s8 = cp.paged_decode_fp8_tiles(q, k8, v8, bt, ctx, scale, ks, vs, power2)
    assert torch.equal(out, plain)
    ref_q, ref_s = _tiles_reference(out, power2)
    assert q8.shape == ref_q.shape and s8.shape == ref_s.shape == (q8.shape[0], shape[0])
    assert torch.equal(q8.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(s8, ref_s)


def test_epilogue_refuses_what_it_cannot_take():
    cp = _ext()
    q, k8, ks, v8, vs, bt, ctx = _case((12, 2, 64, 32), torch.bfloat16)
    assert not cp.serves_tiles(q, k8, ks) or not cp.TILES
    with pytest.raises(ValueError, match="head_dim 64: the tiles epilogue takes 128"):
        cp.paged_decode_fp8_tiles(q, k8, v8, bt, ctx, 0.1, ks, vs)


def test_epilogue_replays_in_a_cuda_graph_and_the_op_falls_back(monkeypatch):
    cp = _ext()
    q, k8, ks, v8, vs, bt, ctx = _case((16, 4, 128, 16), torch.bfloat16, repeat=5)
    monkeypatch.setattr(cp, "TILES", True)
    args = (q, k8, v8, bt, ctx, 0.1, ks, vs, True, 16)
    eager = torch.ops.r1mega.paged_decode_attention_tiles(*args)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = torch.ops.r1mega.paged_decode_attention_tiles(*args)
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        for a, b in zip(captured, eager):
            assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                               b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
    monkeypatch.setattr(cp, "TILES", False)
    out, q8, s8 = torch.ops.r1mega.paged_decode_attention_tiles(*args)
    assert torch.equal(out, eager[0]) and torch.equal(s8, eager[2])
    assert torch.equal(q8.view(torch.uint8), eager[1].view(torch.uint8))


def test_rollout_decodes_through_the_tiles(single_rank_runtime, monkeypatch):
    """The FP8 rollout (FP8 weights and KV cache, head_dim 128) with o_proj's input in head tiles
    from the attention kernel and the split-K GEMM's tile route, against the row route: the
    route taken once per layer and step, eager and compiled with CUDA graphs, the compiled step
    not split by the route, and the rollout's log-probs as close to the bf16 training forward's
    as the row route's (another rounding of o_proj's input: a random model's near-tied greedy
    tokens may flip, so tokens are not compared)."""
    cp = _ext()
    from r1mega.bench.rollout import logprob_mismatch
    from r1mega.config import ModelConfig, PrecisionConfig, RolloutConfig
    from r1mega.models.gpt import build_model
    from r1mega.precision import rollout as rollout_mod
    from r1mega.precision.policy import resolve_rollout_fp8_policy
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest
    from torch._dynamo.utils import counters

    monkeypatch.delenv("R1MEGA_FP8_ROLLOUT_ACT", raising=False)
    monkeypatch.setattr(cp._EXT, "_tried", False)
    monkeypatch.setattr(cp._EXT, "_module", None)
    rt = single_rank_runtime()
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_layers=2, hidden_size=1024, num_attention_heads=8,
                                    num_query_groups=2, ffn_hidden_size=2048, vocab_size=1000,
                                    max_position_embeddings=256, spec="local"), rt, wrap=False)
    policy = resolve_rollout_fp8_policy(PrecisionConfig(fp8_rollout=True, fp8_recipe="tensorwise"), "cuda")
    prompts = [[(i * 37 + j) % 1000 for j in range(5 + 11 * i)] for i in range(6)]
    real = rollout_mod.proj_from_rows
    mismatch, taken, breaks = {}, {}, {}
    for compiled, tiles in ((False, False), (False, True), (True, False), (True, True)):
        calls = []
        monkeypatch.setattr(cp, "TILES", tiles)
        monkeypatch.setattr(rollout_mod, "proj_from_rows", lambda *a: calls.append(1) or real(*a))
        torch._dynamo.reset()
        counters.clear()
        fp8 = rollout_mod.Fp8RolloutWeights(model[0], policy)
        cfg = RolloutConfig(max_new_tokens=12, kv_block_tokens=16, max_batch_sequences=64,
                            temperature=1.0, compile_decode=compiled, cuda_graphs=compiled,
                            kv_cache_dtype="fp8")
        eng = RolloutEngine(model, cfg, rt, eos_ids=[], vocab_size=1000)
        with fp8.decoding():
            outs = eng.generate([GenerationRequest(p, n=2, seed=i) for i, p in enumerate(prompts)])
        eng.release()
        fp8.remove()
        mismatch[compiled, tiles] = logprob_mismatch(model, outs, prompts)
        taken[compiled, tiles] = len(calls)
        breaks[compiled, tiles] = sum(counters["graph_break"].values())
    assert taken[False, False] == 0 and taken[True, False] == 0
    assert taken[False, True] >= 2 * 11 and taken[False, True] % 2 == 0
    assert taken[True, True] > 0 and breaks[True, True] == breaks[True, False], breaks
    for compiled in (False, True):
        (rows_mean, rows_max), (tiles_mean, tiles_max) = mismatch[compiled, False], mismatch[compiled, True]
        # finer scales round o_proj's input no worse: the same error level, within sampling noise
        assert tiles_mean <= 1.25 * rows_mean and tiles_max <= 1.5 * rows_max, mismatch
