"""The FP8 rollout's fused decode GEMM (r1mega/precision/triton_act_gemm.py) under Triton's CPU
interpreter against the PyTorch reference: x quantised by ``quantize_reference`` (1x128 tiles,
power-of-2 scales), the weight's 128x128 blocks, and the emulated GEMM of the two. The kernel
rounds x itself, so equality up to float32 accumulation order checks its quantisation too; the
GPU test runs it compiled. Also the switch that routes decode steps to it."""
from __future__ import annotations

import importlib.util

import pytest
import torch

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def _cases():
    g = torch.Generator().manual_seed(0)
    out = []
    for m, n, k in ((5, 256, 384), (64, 128, 256), (100, 384, 128)):
        x = torch.randn(m, k, generator=g) * torch.logspace(-3, 3, k)
        x[0] = 0                                   # a zero row: multiplier 1
        x[-1, :128] *= 1e-30                       # a tiny tile: its multiplier clamps to FLT_MAX's power of 2
        w = torch.randn(n, k, generator=g) * 0.05
        out.append((x, w))
    return out


def _interpreted(rank, world):
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"
    from r1mega.precision.gemm import emulated_gemm
    from r1mega.precision.quantize import quantize_reference
    from r1mega.precision.triton_act_gemm import act_quant_gemm

    results = []
    for x, w in _cases():
        wq = quantize_reference(w, "block", "e4m3", power2=True)
        ref = emulated_gemm(quantize_reference(x, "tile", "e4m3", power2=True), wq, torch.float32)
        for bn in (64, 128):
            got = act_quant_gemm(x, wq, torch.float32, bm=64, bn=bn)
            results.append((tuple(x.shape), bn, ref, got))
        # a 16-bit activation, as decode has: the kernel reads it as float32 exactly
        xb = x.bfloat16()
        refb = emulated_gemm(quantize_reference(xb, "tile", "e4m3", power2=True), wq, torch.float32)
        results.append((tuple(x.shape), "bf16", refb, act_quant_gemm(xb, wq, torch.float32)))
        # a tensorwise weight (one scale, not a power of 2), through the op decode calls
        wt = quantize_reference(w, "tensor", "e4m3", power2=False)
        reft = emulated_gemm(quantize_reference(x, "tile", "e4m3", power2=True), wt, torch.float32)
        gott = torch.ops.r1mega.fp8_act_gemm(x, wt.data, wt.scale, torch.float32)
        results.append((tuple(x.shape), "tensor", reft, gott))
    # a NaN in x makes its row NaN, as the reference's whole tile is NaN
    x, w = _cases()[0]
    x[1, 3] = float("nan")
    nan_row = act_quant_gemm(x, quantize_reference(w, "block", "e4m3", power2=True), torch.float32)
    return results, nan_row


@pytest.mark.slow
@needs_triton
def test_fused_decode_gemm_matches_reference_under_interpreter(monkeypatch):
    from tests.distributed.harness import run_ranks

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned process
    (result,) = run_ranks(_interpreted, 1, timeout_s=300)
    cases, nan_row = result
    assert len(cases) == 12
    for shape, bn, ref, got in cases:
        # same FP8 operands, float32 sums in another order
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()),
                                   msg=f"{shape} BN={bn}")
    assert torch.isnan(nan_row[1]).all() and not torch.isnan(nan_row[[0, 2, 3, 4]]).any()


def _interpreted_rollout(rank, world):
    """A tiny model's rollout decoding from blockwise FP8 weight copies: every linear through the
    fused kernel (R1MEGA_FP8_ROLLOUT_GEMM=fused), then through the emulation of the same
    recipe; tokens and log-probs of both."""
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"
    from r1mega.config import ModelConfig, ParallelConfig, PrecisionConfig, RolloutConfig
    from r1mega.models.gpt import build_model
    from r1mega.parallel.launch_env import read_launch_env
    from r1mega.parallel.runtime import init_parallel
    from r1mega.precision import triton_act_gemm
    from r1mega.precision.policy import Fp8Policy
    from r1mega.precision.rollout import Fp8RolloutWeights
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    rt = init_parallel(ParallelConfig(), PrecisionConfig(), env=read_launch_env())
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="llama", num_layers=2, hidden_size=128, ffn_hidden_size=256,
                                    num_attention_heads=4, num_query_groups=2, vocab_size=96,
                                    max_position_embeddings=64, spec="local"), rt, wrap=False)
    calls = []
    real = triton_act_gemm.act_quant_gemm
    triton_act_gemm.act_quant_gemm = lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k)
    out = {}
    for emulate in (False, True):
        os.environ["R1MEGA_FP8_ROLLOUT_GEMM"] = "quantize" if emulate else "fused"
        fp8 = Fp8RolloutWeights(model[0], Fp8Policy(recipe="blockwise", backend="native",
                                                     emulate=emulate, rollout=True))
        eng = RolloutEngine(model, RolloutConfig(kv_block_tokens=4, kv_cpu_tokens=512, max_new_tokens=5,
                                                 temperature=0.0, cuda_graphs=False, compile_decode=False),
                            rt, eos_ids=[], vocab_size=96)
        with fp8.decoding():
            outs = eng.generate([GenerationRequest([3, 14, 15, 92, 65][: 2 + i], seed=i) for i in range(3)])
        fp8.remove()
        out[emulate] = [(c.token_ids, c.logprobs) for c in outs]
    return out, calls


@pytest.mark.slow
@needs_triton
def test_fp8_rollout_decodes_through_the_fused_gemm_like_the_emulation(monkeypatch):
    from tests.distributed.harness import run_ranks

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (result,) = run_ranks(_interpreted_rollout, 1, timeout_s=600)
    out, calls = result
    # 2 layers x 4 linears per step (prefill and decode steps alike), all through the kernel
    assert len(calls) >= 8 * 5 and len(calls) % 8 == 0
    for (tok_f, lp_f), (tok_e, lp_e) in zip(out[False], out[True]):
        assert tok_f == tok_e
        torch.testing.assert_close(torch.tensor(lp_f), torch.tensor(lp_e), rtol=0, atol=1e-5)


def test_operands_the_kernel_cannot_take_are_refused():
    from r1mega.precision.quantize import quantize_reference
    from r1mega.precision.triton_act_gemm import act_quant_gemm

    x = torch.randn(4, 256)
    with pytest.raises(ValueError, match="128x128 block scales or one tensor scale"):
        act_quant_gemm(x, quantize_reference(torch.randn(128, 256), "tile"), torch.float32)
    with pytest.raises(ValueError, match="e4m3"):
        act_quant_gemm(x, quantize_reference(torch.randn(128, 256), "tensor", "e5m2"), torch.float32)
    with pytest.raises(ValueError, match="multiples of 128"):
        act_quant_gemm(torch.randn(4, 200), quantize_reference(torch.randn(128, 200), "block"),
                       torch.float32)
    with pytest.raises(ValueError, match="row-major"):
        act_quant_gemm(torch.randn(256, 4).t(), quantize_reference(torch.randn(128, 256), "block"),
                       torch.float32)


def test_switch_names_its_choices(monkeypatch):
    from r1mega.precision.triton_act_gemm import gemm_choice

    assert gemm_choice() == "quantize"
    monkeypatch.setenv("R1MEGA_FP8_ROLLOUT_GEMM", "triton")
    with pytest.raises(ValueError, match="R1MEGA_FP8_ROLLOUT_GEMM='triton'.*'quantize'.*'fused'"):
        gemm_choice()


def test_fused_gemm_is_refused_for_recipes_it_does_not_serve(single_rank_runtime, monkeypatch):
    from r1mega.config import ModelConfig
    from r1mega.models.gpt import build_model
    from r1mega.precision.policy import Fp8Policy
    from r1mega.precision.rollout import Fp8RolloutWeights

    model = build_model(ModelConfig(family="llama", num_layers=1, hidden_size=128, ffn_hidden_size=256,
                                    num_attention_heads=4, num_query_groups=2, vocab_size=96,
                                    max_position_embeddings=64), single_rank_runtime(), wrap=False)
    monkeypatch.setenv("R1MEGA_FP8_ROLLOUT_GEMM", "fused")
    with pytest.raises(ValueError, match="fused serves the blockwise and tensorwise recipes.*'rowwise'"):
        Fp8RolloutWeights(model[0], Fp8Policy(recipe="rowwise", backend="native"))
    # the emulation (CPU) never takes the kernel, whatever the switch
    assert not Fp8RolloutWeights(model[0], Fp8Policy(recipe="blockwise", backend="native",
                                                     emulate=True)).fused_gemm


@needs_triton
def test_fused_gemm_is_refused_for_weights_not_in_whole_blocks(single_rank_runtime, monkeypatch):
    """Tensorwise FP8 takes a (192, 192) weight through cuBLAS; the fused kernel works in whole
    128-wide blocks, so the switch is refused when the copies are made, naming the way out."""
    from r1mega.config import ModelConfig
    from r1mega.models.gpt import build_model
    from r1mega.precision.policy import Fp8Policy
    from r1mega.precision.rollout import Fp8RolloutWeights

    model = build_model(ModelConfig(family="llama", num_layers=1, hidden_size=192, ffn_hidden_size=384,
                                    num_attention_heads=4, num_query_groups=2, vocab_size=96,
                                    max_position_embeddings=64), single_rank_runtime(), wrap=False)
    monkeypatch.setenv("R1MEGA_FP8_ROLLOUT_GEMM", "fused")
    with pytest.raises(ValueError, match=r"\(.*192\).*multiples of 128\. Unset R1MEGA_FP8_ROLLOUT_GEMM"):
        Fp8RolloutWeights(model[0], Fp8Policy(recipe="tensorwise", backend="native"))
    # blockwise needs whole blocks on either route: the way out is another recipe
    for route in ("fused", "quantize"):
        monkeypatch.setenv("R1MEGA_FP8_ROLLOUT_GEMM", route)
        with pytest.raises(ValueError, match=r"multiples of 128\. Use precision.fp8_recipe=tensorwise"):
            Fp8RolloutWeights(model[0], Fp8Policy(recipe="blockwise", backend="native"))
    monkeypatch.setenv("R1MEGA_FP8_ROLLOUT_GEMM", "quantize")
    assert not Fp8RolloutWeights(model[0], Fp8Policy(recipe="tensorwise", backend="native")).fused_gemm
