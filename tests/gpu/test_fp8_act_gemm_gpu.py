"""The FP8 rollout's fused decode GEMM (r1mega/precision/triton_act_gemm.py) compiled on Hopper
(skipped elsewhere): against the emulated GEMM of the reference-quantised operands and against
the quantiser + cuBLAS route of the same recipe, at the 852M shape's decode sizes; and the FP8
rollout decoding through it (compiled forward, CUDA graphs) like the quantiser route."""
from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
    reason="needs Hopper (e4m3 wgmma; blockwise scaled_mm for the cuBLAS route)")

from r1mega.precision.gemm import emulated_gemm, scaled_gemm  # noqa: E402
from r1mega.precision.quantize import quantize_reference  # noqa: E402
from r1mega.precision.triton_act_gemm import act_quant_gemm  # noqa: E402

# (N, K) of the 852M shape's linears: qkv, proj, fc1, fc2
LINEARS = [(3072, 2048), (2048, 2048), (11264, 2048), (2048, 5632)]


@pytest.mark.parametrize("m", [1, 16, 100, 256, 512])
@pytest.mark.parametrize("n,k", LINEARS)
def test_fused_gemm_against_emulation_and_cublas(m, n, k):
    g = torch.Generator(device="cuda").manual_seed(m + n + k)
    x = (torch.randn(m, k, device="cuda", generator=g) * 3).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
    wq = quantize_reference(w, "block", "e4m3", power2=True)
    xq = quantize_reference(x, "tile", "e4m3", power2=True)
    ref = emulated_gemm(xq, wq, torch.float32)
    got = act_quant_gemm(x, wq, torch.float32)
    # Same FP8 operands; Hopper's FP8 MMA keeps fewer accumulator bits within each 128-deep
    # block (about 14, DeepSeek-V3 section 3.3.2), then float32 across blocks
    scale = float(ref.abs().max())
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-3 * scale)
    pad = -m % 16
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad))
    cublas = scaled_gemm(quantize_reference(xp, "tile", "e4m3", power2=True), wq, torch.float32)[:m]
    torch.testing.assert_close(got, cublas, rtol=0, atol=2e-3 * scale)
    # bf16 out: the same sums, rounded once
    torch.testing.assert_close(act_quant_gemm(x, wq, torch.bfloat16).float(), got, rtol=1e-2,
                               atol=2e-3 * scale)


@pytest.mark.parametrize("m", [1, 100, 256])
@pytest.mark.parametrize("n,k", LINEARS)
def test_fused_gemm_with_a_tensorwise_weight(m, n, k):
    """One weight scale, read as every block's (the op decode calls), against the emulation of
    the same operands: x in 1x128 tiles, w per tensor."""
    g = torch.Generator(device="cuda").manual_seed(m * n + k)
    x = (torch.randn(m, k, device="cuda", generator=g) * 3).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
    wq = quantize_reference(w, "tensor", "e4m3", power2=False)
    ref = emulated_gemm(quantize_reference(x, "tile", "e4m3", power2=True), wq, torch.float32)
    got = torch.ops.r1mega.fp8_act_gemm(x, wq.data, wq.scale, torch.float32)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-3 * float(ref.abs().max()))


def test_fp8_rollout_through_the_fused_gemm_decodes_like_the_quantiser_route(single_rank_runtime,
                                                                              monkeypatch):
    from r1mega.config import ModelConfig, PrecisionConfig, RolloutConfig
    from r1mega.models.gpt import build_model
    from r1mega.precision.policy import resolve_rollout_fp8_policy
    from r1mega.precision.rollout import Fp8RolloutWeights
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    rt = single_rank_runtime()
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=8,
                                    num_query_groups=2, ffn_hidden_size=512, vocab_size=1000,
                                    max_position_embeddings=256), rt, wrap=False)
    policy = resolve_rollout_fp8_policy(PrecisionConfig(fp8_rollout=True, fp8_recipe="blockwise"), "cuda")
    prompts = [[(i * 37 + j) % 1000 for j in range(5 + 11 * i)] for i in range(6)]
    runs = {}
    for route in ("quantize", "fused"):
        monkeypatch.setenv("R1MEGA_FP8_ROLLOUT_GEMM", route)
        fp8 = Fp8RolloutWeights(model[0], policy)
        assert fp8.fused_gemm == (route == "fused")
        cfg = RolloutConfig(max_new_tokens=16, kv_block_tokens=16, max_batch_sequences=64,
                            temperature=0.0, compile_decode=True, cuda_graphs=True)
        eng = RolloutEngine(model, cfg, rt, eos_ids=[], vocab_size=1000)
        with fp8.decoding():
            outs = eng.generate([GenerationRequest(p, n=1, seed=i) for i, p in enumerate(prompts)])
        eng.release()
        fp8.remove()
        runs[route] = [(c.token_ids, c.logprobs) for c in outs]
    for (t0, lp0), (t1, lp1) in zip(runs["quantize"], runs["fused"]):
        assert len(t1) == 16 and all(map(math.isfinite, lp1))
        assert t0[:4] == t1[:4]
        assert max(abs(a - b) for a, b in zip(lp0[:4], lp1[:4])) < 0.1
