"""The FP8 KV cache on GPU (skipped without CUDA; needs sm_89+): the fused RoPE + write kernel and
the paged decode kernel against their references, and the engine with CUDA graphs and the
compiled decode on an FP8 cache. CPU counterparts: tests/unit/test_rollout_fp8_kv.py."""
from __future__ import annotations

import math

import pytest
import torch

from tests.unit.test_rollout_fp8_error import DECODE_SHAPES, RMS_BAND, error_against_model, paged_decode_case
from tests.unit.test_rollout_fp8_kv_kernels import e4m3_edge_values
from tests.unit.test_rollout_rope_kv_triton import SHAPES, make_inputs

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a CUDA device of sm_89 or newer")


def _fp8_state(kc, vc):
    from r1mega.rollout.kv_cache import quantize_rows

    k8, ks = quantize_rows(kc)
    v8, vs = quantize_rows(vc)
    return [k8, v8, ks, vs]


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{s[0]}-kv{s[1]}-g{s[2]}-d{s[3]}-bs{s[4]}" for s in SHAPES])
def test_fused_write_quantises_as_the_reference(dtype, shape):
    """With cos = 1, sin = 0 the rotation is exact whatever the compiler fuses (x*1 + rot*0), so the
    stored e4m3 bytes and scales of K must equal the reference's bit for bit; V never rotates, so
    its bytes and scales are bit for bit in the general case too."""
    from r1mega.rollout.kv_cache import dequantize_rows, quantize_rows
    from r1mega.rollout.triton_rope_kv import rope_kv_write_reference, rope_kv_write_triton

    qkv, cos, sin, slots, kc, vc = make_inputs(*shape, dtype, seed=0, device="cuda")
    for identity in (True, False):
        if identity:
            cos, sin = torch.ones_like(cos), torch.zeros_like(sin)
        ref, got = _fp8_state(kc, vc), _fp8_state(kc, vc)
        q_ref = rope_kv_write_reference(qkv, cos, sin, slots, *ref)
        q = torch.full_like(q_ref, float("nan"))
        rope_kv_write_triton(qkv, cos, sin, slots, got[0], got[1], out=q, k_scale=got[2], v_scale=got[3])
        assert not q.isnan().any()
        assert torch.equal(_bits(got[1]), _bits(ref[1])) and torch.equal(got[3], ref[3])  # V
        if identity:
            assert torch.equal(q, q_ref)
            assert torch.equal(_bits(got[0]), _bits(ref[0])) and torch.equal(got[2], ref[2])
        else:
            # The rotated k may differ from eager's by one ulp of the activation dtype (see
            # test_rope_kv_gpu.py), which can move its e4m3 rounding by one step: at most 1/14 of
            # the row amax (e4m3's top binade spacing, 32, over 448) plus that ulp (<= 2^-7 of it).
            hkv, d = kc.shape[-2], kc.shape[-1]
            rows = slots.long()
            a = dequantize_rows(got[0], got[2], torch.float64).view(-1, hkv, d)[rows]
            b = dequantize_rows(ref[0], ref[2], torch.float64).view(-1, hkv, d)[rows]
            amax = b.abs().amax(-1, keepdim=True)
            assert ((a - b).abs() <= amax * (1 / 14 + 2.0 ** -7)).all()
            # An ulp on a row's largest element changes the whole row's scale, so how many values
            # differ from eager's says little; exact instead: the bytes and scales are
            # quantize_rows of the kernel's own rotated k (the same kernel writing a cache in
            # the activation dtype).
            k_act, v_act = kc.clone(), vc.clone()
            rope_kv_write_triton(qkv, cos, sin, slots, k_act, v_act)
            k8, ks = quantize_rows(k_act.view(-1, hkv, d)[rows])
            assert torch.equal(_bits(got[0]).view(-1, hkv, d)[rows], _bits(k8))
            assert torch.equal(got[2].view(-1, hkv)[rows], ks)


def test_fused_write_rounds_every_e4m3_edge_as_torch():
    """Every e4m3 value, midpoint (ties to even) and midpoint neighbour, both signs, subnormals:
    rows of amax 448 have scale 1, so the bytes are the rounding of the values themselves."""
    from r1mega.rollout.triton_rope_kv import rope_kv_write_reference, rope_kv_write_triton

    vals = e4m3_edge_values()
    d = 64
    rows = -(-vals.numel() // (d - 1))
    body = torch.cat([vals, torch.zeros(rows * (d - 1) - vals.numel())]).view(rows, d - 1)
    kv = torch.cat([torch.full((rows, 1), 448.0), body], dim=1)
    qkv = torch.cat([torch.randn(rows, d), kv, kv.flip(1)], dim=1).view(rows, 1, 1, 3 * d).cuda()
    cos, sin = torch.ones(rows, 1, 1, d, device="cuda"), torch.zeros(rows, 1, 1, d, device="cuda")
    cache = torch.zeros(rows, 1, 1, d, device="cuda")
    ref, got = _fp8_state(cache, cache), _fp8_state(cache, cache)
    slots = torch.arange(rows, device="cuda")
    rope_kv_write_reference(qkv, cos, sin, slots, *ref)
    rope_kv_write_triton(qkv, cos, sin, slots, got[0], got[1], k_scale=got[2], v_scale=got[3])
    for name, r, g in zip(("k", "v", "k_scale", "v_scale"), ref, got):
        assert torch.equal(_bits(r), _bits(g)), f"{name}: {(_bits(r) != _bits(g)).sum()} differ"


def test_quantize_rows_on_cuda_equals_cpu():
    """The reference quantiser gives the same bytes and scales on CUDA as on the CPU: its scale is
    amax / 448 correctly rounded on both (ATen on CUDA turns a division by a Python scalar into a
    multiply by its float32 reciprocal, which is not)."""
    from r1mega.rollout.kv_cache import quantize_rows

    g = torch.Generator().manual_seed(5)
    x = torch.randn(4096, 64, generator=g) * torch.rand(4096, 1, generator=g) * 8
    x8, s = quantize_rows(x)
    x8c, sc = quantize_rows(x.cuda())
    assert torch.equal(sc.cpu(), s) and torch.equal(s, (x.double().abs().amax(-1) / 448).float())
    assert torch.equal(_bits(x8c).cpu(), _bits(x8))


@pytest.mark.parametrize("keys_major", [False, True], ids=["rows", "keys"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=["-".join(map(str, s)) for s in DECODE_SHAPES])
def test_paged_decode_on_fp8_cache(dtype, shape, keys_major):
    """Against float64 attention over the dequantised K/V (tight: the kernel's own rounding only),
    and against attention over the unquantised K/V within the error e4m3 predicts element by
    element (r1mega/rollout/fp8_error.py; the CPU test checks the prediction on these values)."""
    from r1mega.rollout.attention import attend_decode_gather
    from r1mega.rollout.fp8_error import decode_error_model
    from r1mega.rollout.kv_cache import dequantize_rows, quantize_rows
    from r1mega.rollout.triton_paged import paged_decode_attention

    q, k, v, bt, ctx = paged_decode_case(*shape, device="cuda")
    q = q.to(dtype)
    k8, ks = quantize_rows(k)
    v8, vs = quantize_rows(v)
    scale = 1 / math.sqrt(shape[2])
    ref = attend_decode_gather(q.double(), dequantize_rows(k8, ks, torch.float64),
                               dequantize_rows(v8, vs, torch.float64), bt, ctx, scale)
    exact, sigma = decode_error_model(q, k, v, bt, ctx, scale)
    tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}[dtype]
    # the default tile (64 keys here) and the smallest; f16_dots: fp16 operands (16-bit q only)
    for block_n, f16 in ((None, False), (16, False), (None, True), (16, True)):
        if f16 and dtype == torch.float32:
            continue
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, k8, v8, bt, ctx, scale, out=out, k_scale=ks, v_scale=vs,
                               block_n=block_n, f16_dots=f16, keys_major=keys_major)
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol, msg=f"block_n={block_n} f16={f16}")
        worst, rms = error_against_model(out, exact, sigma, kernel_tol=tol)
        assert worst <= 1 and RMS_BAND[0] <= rms <= RMS_BAND[1], (block_n, f16, worst, rms)
    if dtype == torch.float32:
        return
    # f8_dots (q and the probabilities in e4m3, FP8 x FP8 dots) against its float64 emulation
    from r1mega.rollout.attention import attend_decode_f8_dots

    for block_n in (64, 32):
        out = paged_decode_attention(q, k8, v8, bt, ctx, scale, k_scale=ks, v_scale=vs,
                                     block_n=block_n, f8_dots=True, keys_major=keys_major)
        emu = attend_decode_f8_dots(q, k8, v8, bt, ctx, scale, ks, vs, block_n)
        torch.testing.assert_close(out.double(), emu, atol=tol, rtol=tol, msg=f"f8_dots block_n={block_n}")


def _model(rt):
    from r1mega.config import ModelConfig
    from r1mega.models.gpt import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=8,
                                   num_query_groups=2, ffn_hidden_size=512, vocab_size=1000,
                                   max_position_embeddings=256), rt, wrap=False)


def _generate(rt, model, **cfg_kw):
    from r1mega.config import RolloutConfig
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    cfg = RolloutConfig(max_new_tokens=24, kv_block_tokens=16, max_batch_sequences=64,
                        kv_cache_dtype="fp8", **cfg_kw)
    eng = RolloutEngine(model, cfg, rt, eos_ids=[], vocab_size=1000)
    prompts = [[(i * 37 + j) % 1000 for j in range(5 + 11 * i)] for i in range(6)]
    outs = eng.generate([GenerationRequest(p, n=3, seed=i) for i, p in enumerate(prompts)])
    assert eng.cache.shape.dtype == torch.float8_e4m3fn
    used_graphs = eng.graphs is not None
    eng.release()
    return outs, prompts, used_graphs


def test_fp8_engine_cuda_graphs_equal_eager(single_rank_runtime):
    """fp32 model, FP8 cache: graph replay gives the eager engine's tokens and log-probs."""
    from r1mega.config import PrecisionConfig

    rt = single_rank_runtime(precision=PrecisionConfig(dtype="fp32"))
    model = _model(rt)
    graphed, _, g1 = _generate(rt, model, cuda_graphs=True, compile_decode=False)
    eager, _, g2 = _generate(rt, model, cuda_graphs=False, compile_decode=False)
    assert g1 and not g2
    for a, b in zip(graphed, eager):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_fp8_engine_compiled_graphs_logprobs_near_training(single_rank_runtime):
    """bf16 model, FP8 cache, the engine as the bench runs it (compiled decode in CUDA graphs):
    every sequence completes and its log-probs stay within the FP8 error of the training
    forward's (bf16 alone measured mean 1.8e-2, max 1.1e-1 on the 852M shape)."""
    from r1mega.bench.rollout import logprob_mismatch
    from r1mega.config import PrecisionConfig

    rt = single_rank_runtime(precision=PrecisionConfig(dtype="bf16"))
    model = _model(rt)
    outs, prompts, used = _generate(rt, model, cuda_graphs=True, compile_decode=True)
    assert used and all(len(c.token_ids) == 24 for c in outs)
    mean, worst = logprob_mismatch(model, outs, prompts)
    assert mean < 0.05 and worst < 0.5, (mean, worst)
