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

from tests.gpu.test_paged_rows_gpu import _case, _ext, check_replays_and_falls_back, epilogue_rollouts

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
    check_replays_and_falls_back(monkeypatch, cp, "TILES", torch.ops.r1mega.paged_decode_attention_tiles)


def test_rollout_decodes_through_the_tiles(single_rank_runtime, monkeypatch):
    """The FP8 rollout (FP8 weights and KV cache, head_dim 128) with o_proj's input in head tiles
    from the attention kernel and the split-K GEMM's tile route, against the row route: the
    route taken once per layer and step, eager and compiled with CUDA graphs, the compiled step
    not split by the route, and the rollout's log-probs as close to the bf16 training forward's
    as the row route's (another rounding of o_proj's input: a random model's near-tied greedy
    tokens may flip, so tokens are not compared)."""
    cp = _ext()
    from r1mega.bench.rollout import logprob_mismatch

    r = epilogue_rollouts(single_rank_runtime, monkeypatch, cp, "TILES", 1024, 1.0, 2)
    keys = [(c, on) for c in (False, True) for on in (False, True)]
    mismatch = {k: logprob_mismatch(r["model"], r[k][0], r["prompts"]) for k in keys}
    taken = {k: r[k][1] for k in keys}
    breaks = {k: r[k][2] for k in keys}
    assert taken[False, False] == 0 and taken[True, False] == 0
    assert taken[False, True] >= 2 * 11 and taken[False, True] % 2 == 0
    assert taken[True, True] > 0 and breaks[True, True] == breaks[True, False], breaks
    for compiled in (False, True):
        (rows_mean, rows_max), (tiles_mean, tiles_max) = mismatch[compiled, False], mismatch[compiled, True]
        # finer scales round o_proj's input no worse: the same error level, within sampling noise
        assert tiles_mean <= 1.25 * rows_mean and tiles_max <= 1.5 * rows_max, mismatch
