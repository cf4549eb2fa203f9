"""The output projection's row quantiser as the FP8 decode kernel's epilogue
(csrc/paged_decode_rows.cuh, ``R1MEGA_PAGED_FP8_ROWS``, one CTA a sequence): its attention equals
the tensor-core kernel's (one CTA a KV head) to the bit, its e4m3 rows and scales equal the
one-pass row kernel's (r1mega/precision/triton_fp8_rows.py) on that output to the bit, also
under CUDA graph replay, and an FP8 rollout decodes the same tokens and log-probs with it as
without."""
from __future__ import annotations

import math

import pytest
import torch

from tests.unit.test_rollout_fp8_error import paged_decode_case

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a GPU with e4m3 (sm_89+)")

# (Hq, Hkv, D, block tokens) the epilogue takes: 1, 2 or 4 KV heads, Hkv x D <= 512
SHAPES = [(16, 4, 128, 16), (12, 2, 64, 32), (8, 1, 64, 16), (32, 4, 64, 16), (16, 2, 256, 16)]


def _ext():
    from r1mega.rollout import cuda_paged

    if cuda_paged.get() is None:
        pytest.skip(f"r1mega_attn_cuda unavailable: {cuda_paged.load_error()}")
    return cuda_paged


def _case(shape, dtype, repeat=1):
    from r1mega.rollout.kv_cache import quantize_rows

    q, k, v, bt, ctx = paged_decode_case(*shape, device="cuda")
    if repeat > 1:  # more sequences (37 rows: padded to 48) over the same cache blocks
        q, bt, ctx = (t.repeat(repeat, *([1] * (t.dim() - 1)))[:37] for t in (q, bt, ctx))
    k8, ks = quantize_rows(k)
    v8, vs = quantize_rows(v)
    return q.to(dtype), k8, ks, v8, vs, bt, ctx


def _rows_reference(out, power2):
    from r1mega.precision.triton_fp8_rows import fp8_rows_triton

    return fp8_rows_triton(out.reshape(out.shape[0], -1), power2)


@pytest.mark.parametrize("power2", [True, False], ids=["power2", "exact-scales"])
@pytest.mark.parametrize("repeat", [1, 5], ids=["8-seqs", "37-seqs"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=["-".join(map(str, s)) for s in SHAPES])
def test_epilogue_rows_equal_the_row_kernel_on_the_kernels_output(shape, dtype, repeat, power2):
    cp = _ext()
    q, k8, ks, v8, vs, bt, ctx = _case(shape, dtype, repeat)
    scale = 1 / math.sqrt(shape[2])
    plain = cp.paged_decode_fp8_cuda(q, k8, v8, bt, ctx, scale, ks, vs, tensor_cores=True)
    out, q8, s8 = cp.paged_decode_fp8_rows(q, k8, v8, bt, ctx, scale, ks, vs, power2)
    # one CTA a sequence: every head's output as the one-head CTAs compute it, to the bit
    assert torch.equal(out, plain)
    ref_q, ref_s = _rows_reference(out, power2)
    assert q8.shape == ref_q.shape and s8.shape == ref_s.shape
    assert torch.equal(q8.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(s8, ref_s)


CLUSTER_SHAPES = [(16, 4, 128, 16), (8, 8, 128, 32), (32, 4, 128, 16), (6, 2, 128, 16), (4, 1, 128, 16)]


def _clusters_or_skip(cp):
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("thread-block clusters need sm_90+")
    return cp


@pytest.mark.parametrize("heads_inner", [False, True], ids=["seqs-grid", "heads-grid"])
@pytest.mark.parametrize("power2", [True, False], ids=["power2", "exact-scales"])
@pytest.mark.parametrize("repeat", [1, 5], ids=["8-seqs", "37-seqs"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", CLUSTER_SHAPES, ids=["-".join(map(str, s)) for s in CLUSTER_SHAPES])
def test_cluster_epilogue_rows_equal_the_row_kernel_on_the_kernels_output(monkeypatch, shape, dtype,
                                                                         repeat, power2, heads_inner):
    """One CTA a KV head, a sequence's CTAs one cluster exchanging the row's amax: the attention
    of the plain kernel and the one-pass row kernel's e4m3 rows and scales, to the bit."""
    cp = _clusters_or_skip(_ext())
    monkeypatch.setattr(cp, "HEADS_INNER", heads_inner)
    q, k8, ks, v8, vs, bt, ctx = _case(shape, dtype, repeat)
    scale = 1 / math.sqrt(shape[2])
    plain = cp.paged_decode_fp8_cuda(q, k8, v8, bt, ctx, scale, ks, vs, tensor_cores=True)
    out, q8, s8 = cp.paged_decode_fp8_rows(q, k8, v8, bt, ctx, scale, ks, vs, power2, cluster=True)
    assert torch.equal(out, plain)
    ref_q, ref_s = _rows_reference(out, power2)
    assert q8.shape == ref_q.shape and s8.shape == ref_s.shape
    assert torch.equal(q8.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(s8, ref_s)


def test_cluster_epilogue_refuses_what_it_cannot_take():
    cp = _clusters_or_skip(_ext())
    q, k8, ks, v8, vs, bt, ctx = _case((12, 2, 64, 32), torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim 64: the cluster rows epilogue takes 128"):
        cp.paged_decode_fp8_rows(q, k8, v8, bt, ctx, 0.1, ks, vs, cluster=True)
    q, k8, ks, v8, vs, bt, ctx = _case((16, 4, 128, 16), torch.bfloat16)
    out = torch.empty_like(q)
    q8 = torch.empty(16, 16 * 128, dtype=torch.float8_e4m3fn, device="cuda")
    s8 = torch.empty(16, 2, dtype=torch.float32, device="cuda")  # tiles' layout, not a row's
    with pytest.raises(RuntimeError, match="cluster"):
        cp.get().paged_decode_fp8(q, k8, v8, ks, vs, bt, ctx, out, 0.1, True, False, q8, s8, True,
                                  tiles=True, cluster=True)


def test_cluster_epilogue_replays_in_a_cuda_graph_and_the_op_falls_back(monkeypatch):
    cp = _clusters_or_skip(_ext())
    check_replays_and_falls_back(monkeypatch, cp, "ROWS_CLUSTER", torch.ops.r1mega.paged_decode_attention_rows)


def test_rollout_decodes_the_same_with_the_cluster_epilogue(single_rank_runtime, monkeypatch):
    """As the one-CTA-a-sequence test below, for the cluster form (head_dim 128)."""
    cp = _clusters_or_skip(_ext())
    check_rollouts_equal(epilogue_rollouts(single_rank_runtime, monkeypatch, cp, "ROWS_CLUSTER", 1024, 0.0, 1))


def test_epilogue_refuses_heads_it_cannot_hold():
    cp = _ext()
    for shape in [(8, 8, 64, 16), (9, 3, 64, 16), (32, 4, 256, 16)]:
        q, k8, ks, v8, vs, bt, ctx = _case(shape, torch.bfloat16)
        assert not cp.serves_rows(q, k8, ks)
        with pytest.raises(ValueError, match="one CTA a sequence takes 1, 2 or 4 heads"):
            cp.paged_decode_fp8_rows(q, k8, v8, bt, ctx, 0.1, ks, vs)


def check_replays_and_falls_back(monkeypatch, cp, switch: str, op):
    """``op`` (an epilogue op) switched on: graph replays give the eager call's bits; switched
    off: the fallback (the decode op's attention and the reference quantiser) gives them too."""
    q, k8, ks, v8, vs, bt, ctx = _case((16, 4, 128, 16), torch.bfloat16, repeat=5)
    monkeypatch.setattr(cp, switch, True)
    args = (q, k8, v8, bt, ctx, 0.1, ks, vs, True, 16)
    eager = op(*args)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = op(*args)
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        for a, b in zip(captured, eager):
            assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                               b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
    monkeypatch.setattr(cp, switch, False)
    out, q8, s8 = op(*args)
    assert torch.equal(out, eager[0]) and torch.equal(s8, eager[2])
    assert torch.equal(q8.view(torch.uint8), eager[1].view(torch.uint8))


def test_epilogue_replays_in_a_cuda_graph_and_the_op_falls_back(monkeypatch):
    cp = _ext()
    check_replays_and_falls_back(monkeypatch, cp, "ROWS", torch.ops.r1mega.paged_decode_attention_rows)


def epilogue_rollouts(single_rank_runtime, monkeypatch, cp, switch: str, hidden: int,
                      temperature: float, samples: int, switch_owner=None, counted=None) -> dict:
    """Rollouts of a 2-layer local-spec model (8 q / 2 KV heads of hidden / 8, FP8 tensorwise
    weights and FP8 KV cache) with the epilogue ``switch`` (of ``switch_owner``, default ``cp``)
    off and on, eager and compiled with CUDA graphs, from an extension not yet loaded (as in a
    fresh process, where no call has loaded it before the step is traced). (compiled, on) ->
    (completions, the route's calls (of ``counted`` = (module, function name), default
    precision.rollout's proj_from_rows), dynamo's graph breaks, whether the step ran compiled);
    also "model" and "prompts"."""
    from torch._dynamo.utils import counters

    from r1mega.config import ModelConfig, PrecisionConfig, RolloutConfig
    from r1mega.models.gpt import build_model
    from r1mega.precision import rollout as rollout_mod
    from r1mega.precision.policy import resolve_rollout_fp8_policy
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    monkeypatch.delenv("R1MEGA_FP8_ROLLOUT_ACT", raising=False)
    monkeypatch.setattr(cp._EXT, "_tried", False)
    monkeypatch.setattr(cp._EXT, "_module", None)
    rt = single_rank_runtime()
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_layers=2, hidden_size=hidden, num_attention_heads=8,
                                    num_query_groups=2, ffn_hidden_size=2 * hidden, vocab_size=1000,
                                    max_position_embeddings=256, spec="local"), rt, wrap=False)
    policy = resolve_rollout_fp8_policy(PrecisionConfig(fp8_rollout=True, fp8_recipe="tensorwise"), "cuda")
    prompts = [[(i * 37 + j) % 1000 for j in range(5 + 11 * i)] for i in range(6)]
    owner, name = counted or (rollout_mod, "proj_from_rows")
    real = getattr(owner, name)
    result = {"model": model, "prompts": prompts}
    for compiled, on in ((False, False), (False, True), (True, False), (True, True)):
        calls = []
        monkeypatch.setattr(switch_owner or cp, switch, on)
        monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(1) or real(*a, **k))
        torch._dynamo.reset()
        counters.clear()
        fp8 = rollout_mod.Fp8RolloutWeights(model[0], policy)
        cfg = RolloutConfig(max_new_tokens=12, kv_block_tokens=16, max_batch_sequences=64,
                            temperature=temperature, compile_decode=compiled, cuda_graphs=compiled,
                            kv_cache_dtype="fp8")
        eng = RolloutEngine(model, cfg, rt, eos_ids=[], vocab_size=1000)
        with fp8.decoding():
            outs = eng.generate([GenerationRequest(p, n=samples, seed=i) for i, p in enumerate(prompts)])
        held = eng._compiled_decode != eng._decode_logits
        eng.release()
        fp8.remove()
        result[compiled, on] = (outs, len(calls), sum(counters["graph_break"].values()), held)
    return result


def check_rollouts_equal(r: dict) -> None:
    """:func:`epilogue_rollouts`' greedy runs: with the epilogue on, the same tokens and log-probs
    as off to the bit (the same e4m3 rows reach the same GEMM), the route taken once per layer and
    decode step; compiled with CUDA graphs, the route traced into the step without breaking its
    graph, and the same tokens."""
    keys = [(c, on) for c in (False, True) for on in (False, True)]
    runs = {k: [(c.token_ids, c.logprobs) for c in r[k][0]] for k in keys}
    taken = {k: r[k][1] for k in keys}
    breaks = {k: r[k][2] for k in keys}
    held = {k: r[k][3] for k in keys}
    assert taken[False, False] == 0 and taken[True, False] == 0
    assert runs[False, True] == runs[False, False]
    assert taken[False, True] >= 2 * 11 and taken[False, True] % 2 == 0
    # a data_ptr() in the route's check, then the extension's first load, split the step at
    # every layer once
    assert taken[True, True] > 0 and held[True, True] and held[True, False]
    assert breaks[True, True] == breaks[True, False], breaks
    assert runs[True, True] == runs[True, False]
    for (t0, _), (t1, _) in zip(runs[False, True], runs[True, True]):
        assert t0[:4] == t1[:4]


def test_rollout_decodes_the_same_with_the_epilogue(single_rank_runtime, monkeypatch):
    """The FP8 rollout (FP8 weights and KV cache) with o_proj's input quantised in the attention
    kernel, one CTA a sequence (head_dim 64; the kernel takes 64, 128, 256; groups of 4), against
    the same rollout with the one-pass row kernel (:func:`check_rollouts_equal`)."""
    cp = _ext()
    check_rollouts_equal(epilogue_rollouts(single_rank_runtime, monkeypatch, cp, "ROWS", 512, 0.0, 1))
