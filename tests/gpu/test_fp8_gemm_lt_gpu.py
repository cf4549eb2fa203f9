"""cuBLASLt's FP8 GEMM with a chosen algorithm (csrc/fp8_gemm_lt.cpp, r1mega/precision/fp8_gemm_lt.py)
on a GPU with e4m3: every algorithm the heuristic lists against float64 on the dequantised
operands and against torch's scaled matmul; the op's choice, its CUDA-graph capture and an FP8
rollout decoded through it."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a GPU with e4m3 (sm_89+)")

from r1mega.ops import cublaslt_gemm  # noqa: E402
from r1mega.precision import fp8_gemm_lt  # noqa: E402
from r1mega.precision.quantize import dequantize, quantize_reference  # noqa: E402


def _ext():
    ext = cublaslt_gemm.get()
    if ext is None:
        pytest.skip(f"r1mega_gemm_cuda unavailable: {cublaslt_gemm.load_error()}")
    return ext


def _operands(m, n, k, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = quantize_reference(torch.randn(m, k, device="cuda", generator=g) * 3, "tensor")
    w = quantize_reference(torch.randn(n, k, device="cuda", generator=g) * 0.02, "tensor", power2=True)
    return a, w


def _torch(a, w, dtype=torch.bfloat16):
    return torch._scaled_mm(a.data, w.data.t(), scale_a=a.scale.reshape(()), scale_b=w.scale.reshape(()),
                            out_dtype=dtype, use_fast_accum=True)


@pytest.mark.parametrize("m,n,k", [(16, 3072, 2048), (256, 2048, 2048), (256, 11264, 2048),
                                   (256, 2048, 5632), (1000, 2048, 2048)])
def test_every_listed_algorithm_against_float64_and_torch(m, n, k):
    ext = _ext()
    a, w = _operands(m, n, k, m + n)
    exact = dequantize(a).double() @ dequantize(w).double().t()
    ref = _torch(a, w)
    scale = float(exact.abs().max())
    blobs = ext.fp8_algos(m, n, k, torch.bfloat16, 16, fp8_gemm_lt.MAX_WORKSPACE)
    assert blobs, "the heuristic listed no algorithm"
    ran = 0
    for i, blob in enumerate(blobs):
        try:
            y = ext.fp8_matmul(a.data, a.scale.reshape(()), w.data, w.scale.reshape(()), torch.bfloat16, blob)
        except RuntimeError as exc:  # listed, then refused by AlgoCheck: the op skips it too
            assert "cuBLASLt" in str(exc)
            continue
        ran += 1
        # bf16 output (2^-8 relative) plus fast accumulation's partial sums: torch's own error
        err = float((y.double() - exact).abs().max()) / scale
        ref_err = float((ref.double() - exact).abs().max()) / scale
        assert err < max(4 * ref_err, 1e-2), (i, err, ref_err)
        torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2 * scale)
    assert ran >= 1


def test_op_chooses_once_and_replays_in_a_graph():
    _ext()
    a, w = _operands(256, 2048, 2048, 5)
    fp8_gemm_lt._chosen.clear()
    fp8_gemm_lt.timings.clear()
    args = (a.data, a.scale.reshape(()), w.data, w.scale.reshape(()), torch.bfloat16)
    eager = torch.ops.r1mega.fp8_gemm_lt(*args)
    key = (a.data.device.index, 256, 2048, 2048, torch.bfloat16)
    assert key in fp8_gemm_lt._chosen and "torch" in fp8_gemm_lt.timings[key]
    assert torch.equal(torch.ops.r1mega.fp8_gemm_lt(*args), eager)  # one algorithm: the same bits
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = torch.ops.r1mega.fp8_gemm_lt(*args)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    # a problem first met under capture runs torch's kernel and is not recorded as chosen
    b, v = _operands(48, 2048, 2048, 6)
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2):
        out2 = torch.ops.r1mega.fp8_gemm_lt(b.data, b.scale.reshape(()), v.data, v.scale.reshape(()),
                                            torch.bfloat16)
    g2.replay()
    torch.cuda.synchronize()
    assert torch.equal(out2, _torch(b, v))
    assert (b.data.device.index, 48, 2048, 2048, torch.bfloat16) not in fp8_gemm_lt._chosen


def test_rollout_decodes_through_it(tensorwise_rollout):
    """The FP8 rollout (tensorwise, row scales, compiled + CUDA graphs) with the switch on and
    off: the same greedy tokens over the first steps (another algorithm may round a sum
    differently, so not every log-prob to the bit), and the op's problems timed."""
    from r1mega.config import RolloutConfig
    from r1mega.precision.rollout import Fp8RolloutWeights
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    _ext()
    model, rt, policy, prompts = tensorwise_rollout
    runs = {}
    fp8_gemm_lt.timings.clear()
    for on in (False, True):
        torch._dynamo.reset()
        fp8 = Fp8RolloutWeights(model[0], policy)
        cfg = RolloutConfig(max_new_tokens=12, kv_block_tokens=16, max_batch_sequences=64,
                            temperature=0.0, compile_decode=True, cuda_graphs=True)
        eng = RolloutEngine(model, cfg, rt, eos_ids=[], vocab_size=1000)
        with fp8_gemm_lt.enabled(on), fp8.decoding():
            outs = eng.generate([GenerationRequest(p, n=1, seed=i) for i, p in enumerate(prompts)])
        eng.release()
        fp8.remove()
        runs[on] = [c.token_ids for c in outs]
    assert fp8_gemm_lt.timings, "no decode GEMM reached the op"
    for t0, t1 in zip(runs[False], runs[True]):
        assert len(t1) == 12 and t0[:4] == t1[:4]


@pytest.mark.parametrize("block", [True, False], ids=["tiles-x-blocks", "tiles-x-tiles"])
@pytest.mark.parametrize("m,n,k", [(512, 384, 1024), (1024, 768, 640)])
def test_blockwise_scales_through_every_listed_algorithm(m, n, k, block):
    """Blockwise scale modes (the training recipe's GEMMs): the heuristic's first algorithm is
    torch's scaled_mm kernel with its descriptors, bit for bit; every other listed one is within
    float32 accumulation of the float64 product of the dequantised operands."""
    from r1mega.precision.gemm import _block_scale_b, _blockwise_mm, _colmajor
    from r1mega.precision.quantize import quantize

    ext = _ext()
    g = torch.Generator(device="cuda").manual_seed(m + n)
    a = quantize(torch.randn(m, k, device="cuda", generator=g).bfloat16() * 3, "tile")
    w = quantize(torch.randn(n, k, device="cuda", generator=g).bfloat16() * 0.05, "block" if block else "tile")
    mode = 2 if block else 1
    sa, sw = _colmajor(a.scale), (_block_scale_b(w.scale) if block else _colmajor(w.scale))
    ref = _blockwise_mm(a.data, a.scale, w.data, w.scale, block, torch.bfloat16)
    exact = dequantize(a).double() @ dequantize(w).double().t()
    scale = float(exact.abs().max())
    blobs = ext.fp8_algos(m, n, k, torch.bfloat16, 16, fp8_gemm_lt.MAX_WORKSPACE, mode)
    assert blobs
    for i, blob in enumerate(blobs):
        y = ext.fp8_matmul(a.data, sa, w.data, sw, torch.bfloat16, blob, mode)
        if i == 0:
            assert torch.equal(y, ref)
        assert ((y.double() - exact).abs().max() / scale).item() < 1e-2, i
    with pytest.raises(RuntimeError, match="1x128 scales"):
        ext.fp8_matmul(a.data, a.scale.contiguous(), w.data, sw, torch.bfloat16, blobs[0], mode)
    with pytest.raises(RuntimeError, match="one scale an operand"):
        ext.fp8_matmul(a.data, sa, w.data, sw, torch.bfloat16, blobs[0], 0)
