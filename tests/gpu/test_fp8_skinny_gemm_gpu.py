"""The split-K FP8 decode GEMM (r1mega/precision/triton_skinny_gemm.py) compiled on a GPU with
e4m3: against float64 on the dequantised operands and against cuBLAS (``torch._scaled_mm``) at
the 852M shape's linears and decode rows; a call repeated and replayed in a CUDA graph gives
the same bits and leaves the tile counters at zero; an FP8 rollout decoded through it."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a GPU with e4m3 (sm_89+)")

from r1mega.precision import triton_skinny_gemm as sk  # noqa: E402
from r1mega.precision.quantize import quantize_reference  # noqa: E402


def _operands(m, n, k, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g) * torch.logspace(-1, 1, m, device="cuda")[:, None]
    a = quantize_reference(x, "row", power2=True)
    w = quantize_reference(torch.randn(n, k, device="cuda", generator=g) * 0.02, "tensor")
    return a, w


def _bound(a, w):
    # float32 sums of exact e4m3 products (FP8 MMA may keep fewer bits between promotions, as
    # cuBLAS's fast accumulation does: the bound is that of a 2^-13-relative accumulator)
    mag = (a.data.double().abs() @ (w.data.double().abs() * w.scale.double()).t())
    return mag * a.shape[1] * 2.0 ** -13


@pytest.mark.parametrize("m,n,k", [(16, 3072, 2048), (64, 2048, 2048), (256, 3072, 2048),
                                   (256, 2048, 2048), (256, 11264, 2048), (256, 2048, 5632),
                                   (512, 2048, 5632), (200, 1000, 1040)])
def test_against_float64_and_cublas(m, n, k):
    a, w = _operands(m, n, k, m + n + k)
    plain = a.data.double() @ (w.data.double() * w.scale.double()).t()
    rows = plain * a.scale.double().reshape(-1, 1)
    y = sk.skinny_gemm_triton(a.data, w.data, w.scale, torch.float32)
    y_rows = sk.skinny_gemm_triton(a.data, w.data, w.scale, torch.float32, a.scale)
    bound = _bound(a, w)
    assert ((y.double() - plain).abs() <= bound).all()
    assert ((y_rows.double() - rows).abs() <= bound * a.scale.double().reshape(-1, 1)).all()
    if k % 16 == 0 and n % 16 == 0:
        one = torch.ones((), device="cuda")
        ref = torch._scaled_mm(a.data, w.data.t(), scale_a=one, scale_b=w.scale.reshape(()),
                               out_dtype=torch.float32, use_fast_accum=True)
        # both within the accumulator's bound of float64: no farther apart than twice it
        assert ((y - ref).double().abs() <= 2 * bound).all()
        # and no worse than cuBLAS's fast accumulation, to within float32's rounding
        err, err_ref = (y.double() - plain).abs().max(), (ref.double() - plain).abs().max()
        assert err <= 2 * err_ref + plain.abs().max() * 2.0 ** -22, (float(err), float(err_ref))
    bf16 = sk.skinny_gemm_triton(a.data, w.data, w.scale, torch.bfloat16, a.scale)
    assert ((bf16.float() - y_rows).abs() <= y_rows.abs() * 2.0 ** -8).all()
    assert int(sk.counters_ready("cuda").abs().sum()) == 0


def test_repeats_its_bits_in_a_graph_and_resets_the_counters():
    a, w = _operands(256, 2048, 5632, 1)
    first = sk.skinny_gemm_triton(a.data, w.data, w.scale, torch.bfloat16, a.scale)
    for _ in range(3):
        assert torch.equal(sk.skinny_gemm_triton(a.data, w.data, w.scale, torch.bfloat16, a.scale), first)
    out = {}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out["y"] = sk.skinny_gemm_triton(a.data, w.data, w.scale, torch.bfloat16, a.scale)
    for _ in range(5):
        out["y"].zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out["y"], first)
    assert int(sk.counters_ready("cuda").abs().sum()) == 0


def test_rollout_decodes_through_it(tensorwise_rollout):
    """The FP8 rollout (tensorwise, row scales, compiled + CUDA graphs) with the switch on and
    off: the same greedy tokens over the first steps (the kernel sums K in another order than
    cuBLAS, so not every log-prob to the bit), and the decode GEMMs through the kernel."""
    from r1mega.config import RolloutConfig
    from r1mega.precision.rollout import Fp8RolloutWeights
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    model, rt, policy, prompts = tensorwise_rollout
    runs = {}
    for on in (False, True):
        torch._dynamo.reset()
        before = sk.launches
        with sk.enabled(on):
            fp8 = Fp8RolloutWeights(model[0], policy)
            cfg = RolloutConfig(max_new_tokens=12, kv_block_tokens=16, max_batch_sequences=64,
                                temperature=0.0, compile_decode=True, cuda_graphs=True)
            eng = RolloutEngine(model, cfg, rt, eos_ids=[], vocab_size=1000)
            with fp8.decoding():
                outs = eng.generate([GenerationRequest(p, n=1, seed=i) for i, p in enumerate(prompts)])
            eng.release()
            fp8.remove()
        runs[on] = ([c.token_ids for c in outs], sk.launches - before)
    assert runs[False][1] == 0 and runs[True][1] > 0
    for t0, t1 in zip(runs[False][0], runs[True][0]):
        assert len(t1) == 12 and t0[:4] == t1[:4]


@pytest.mark.parametrize("m,n,k", [(256, 2048, 2048), (40, 1024, 640)])
def test_tile_scales_against_float64(m, n, k):
    from r1mega.precision.quantize import dequantize

    g = torch.Generator(device="cuda").manual_seed(m + k)
    x = torch.randn(m, k, device="cuda", generator=g) * torch.logspace(-2, 2, k, device="cuda")
    a = quantize_reference(x, "tile", power2=True)
    w = quantize_reference(torch.randn(n, k, device="cuda", generator=g) * 0.02, "tensor")
    y = sk.skinny_gemm_triton(a.data, w.data, w.scale, torch.float32, a.scale)
    deq_a, deq_w = dequantize(a, torch.float64), w.data.double() * w.scale.double()
    exact = deq_a @ deq_w.t()
    assert ((y.double() - exact).abs() <= (deq_a.abs() @ deq_w.abs().t()) * k * 2.0 ** -13).all()
