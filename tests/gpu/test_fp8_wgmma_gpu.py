"""The wgmma FP8 decode GEMM (csrc/fp8_wgmma_kernel.cu, r1mega/precision/wgmma_gemm.py) on a
Hopper GPU: every configuration against float64 on the dequantised operands and against cuBLAS
(``torch._scaled_mm``) at the 852M shape's linears and ragged decode rows; its bits repeated
call after call and in CUDA graph replay; strided rows; the checks on bad operands; an FP8
rollout decoded through it."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="needs a Hopper GPU (sm_90: wgmma)")

from r1mega.precision import wgmma_gemm as wg  # noqa: E402
from tests.gpu.test_fp8_skinny_gemm_gpu import _operands  # noqa: E402


def _check(y, a, w, rows: bool):
    """y (bf16) within a 2^-13-relative accumulator's bound of float64, plus bf16's rounding."""
    exact = a.data.double() @ (w.data.double() * w.scale.double()).t()
    mag = a.data.double().abs() @ (w.data.double().abs() * w.scale.double()).t()
    if rows:
        exact, mag = exact * a.scale.double().reshape(-1, 1), mag * a.scale.double().reshape(-1, 1)
    bound = mag * a.shape[1] * 2.0 ** -13 + exact.abs() * 2.0 ** -8
    err = (y.double() - exact).abs()
    assert (err <= bound).all(), float((err - bound).max())
    return exact


def _run(a, w, index, a_scale=None, producer_warp=False):
    return wg._EXT.get().fp8_wgmma_gemm(a.data, w.data, w.scale.reshape(()),
                                        None if a_scale is None else a_scale.reshape(-1), index, producer_warp)


SHAPES = [(1, 3072, 2048), (16, 3072, 2048), (64, 2048, 2048), (77, 1024, 1024), (256, 3072, 2048),
          (256, 2048, 2048), (256, 11264, 2048), (256, 2048, 5632), (300, 2048, 5632), (512, 1024, 4096)]


@pytest.mark.parametrize("producer_warp", [False, True], ids=["one-loop", "producer-warp"])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_every_configuration_against_float64_and_cublas(m, n, k, producer_warp):
    assert wg.ready("cuda"), wg._EXT.load_error()
    a, w = _operands(m, n, k, m + n + k)
    one = torch.ones((), device="cuda")
    ref = torch._scaled_mm(a.data, w.data.t(), scale_a=one, scale_b=w.scale.reshape(()),
                           out_dtype=torch.bfloat16, use_fast_accum=True)
    exact_cublas = _check(ref, a, w, rows=False)
    tried = 0
    for i in range(len(wg.CONFIGS)):
        if not wg.usable(i, m, n, k):
            continue
        tried += 1
        y = _run(a, w, i, producer_warp=producer_warp)
        assert y.shape == (m, n) and y.dtype == torch.bfloat16
        exact = _check(y, a, w, rows=False)
        # no farther from float64 than cuBLAS's fast accumulation, to within bf16's rounding
        assert (y.double() - exact).abs().max() <= 2 * (ref.double() - exact_cublas).abs().max() + \
            exact.abs().max() * 2.0 ** -8
        _check(_run(a, w, i, a.scale, producer_warp), a, w, rows=True)
        if producer_warp:  # the same MMAs in the same order: the same bits as the one loop
            assert torch.equal(y, _run(a, w, i))
    assert tried > 0
    # the configuration the module picks, through its public call with the row scales
    _check(wg.wgmma_gemm(a.data, w.data, w.scale, torch.bfloat16, a.scale), a, w, rows=True)


@pytest.mark.parametrize("producer_warp", [False, True], ids=["one-loop", "producer-warp"])
def test_repeats_its_bits_and_in_a_graph(producer_warp):
    a, w = _operands(256, 2048, 5632, 1)
    for i in (3, 4, 5, 8):  # unsplit, split 2 and 4, a 64-wide tile
        first = _run(a, w, i, a.scale, producer_warp)
        for _ in range(3):
            assert torch.equal(_run(a, w, i, a.scale, producer_warp), first)
        out = {}
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out["y"] = _run(a, w, i, a.scale, producer_warp)
        for _ in range(3):
            out["y"].zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out["y"], first)


def test_strided_rows_and_bad_operands():
    a, w = _operands(96, 2048, 2048, 7)
    wide = torch.zeros(96, 2048 + 256, device="cuda", dtype=torch.float8_e4m3fn)
    wide[:, :2048] = a.data
    view = wide[:, :2048]  # row stride 2,304 bytes
    y = wg._EXT.get().fp8_wgmma_gemm(view, w.data, w.scale.reshape(()), None, wg.config(96, 2048, 2048))
    assert torch.equal(y, _run(a, w, wg.config(96, 2048, 2048)))
    ext = wg._EXT.get()
    with pytest.raises(RuntimeError, match="K a multiple"):
        ext.fp8_wgmma_gemm(a.data[:, :1920], w.data[:, :1920], w.scale.reshape(()), None, 5)  # split 4
    with pytest.raises(RuntimeError, match="float8_e4m3fn"):
        ext.fp8_wgmma_gemm(a.data.to(torch.float8_e5m2), w.data, w.scale.reshape(()), None, 3)
    with pytest.raises(RuntimeError, match="no configuration"):
        ext.fp8_wgmma_gemm(a.data, w.data, w.scale.reshape(()), None, 99)
    assert wg.why_not(a.data, w.data, torch.float16) is not None
    assert wg.why_not(a.data[:, :1000], w.data[:, :1000]) is not None


def test_rollout_decodes_through_it(tensorwise_rollout):
    """The FP8 rollout (tensorwise, row scales, compiled + CUDA graphs, sampled) with the switch
    off and on: the decode GEMMs through the kernel, no more graph breaks, and each route's
    log-prob mismatch against the bf16 training forward at one level (K summed in another order
    than cuBLAS's flips near ties of a random model, so tokens are not compared)."""
    from torch._dynamo.utils import counters

    from r1mega.bench.rollout import logprob_mismatch
    from r1mega.config import RolloutConfig
    from r1mega.precision.rollout import Fp8RolloutWeights
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    model, rt, policy, prompts = tensorwise_rollout
    runs = {}
    for on in (False, True):
        torch._dynamo.reset()
        counters.clear()
        before = wg.launches
        with wg.enabled(on):
            fp8 = Fp8RolloutWeights(model[0], policy)
            cfg = RolloutConfig(max_new_tokens=12, kv_block_tokens=16, max_batch_sequences=64,
                                temperature=1.0, compile_decode=True, cuda_graphs=True)
            eng = RolloutEngine(model, cfg, rt, eos_ids=[], vocab_size=1000)
            with fp8.decoding():
                outs = eng.generate([GenerationRequest(p, n=2, seed=i) for i, p in enumerate(prompts)])
            held = eng._compiled_decode != eng._decode_logits
            eng.release()
            fp8.remove()
        runs[on] = (logprob_mismatch(model, outs, prompts), wg.launches - before,
                    sum(counters["graph_break"].values()), held)
    assert runs[False][1] == 0 and runs[True][1] > 0
    assert runs[True][2] == runs[False][2] and runs[True][3] and runs[False][3], runs
    (off_mean, off_max), (on_mean, on_max) = runs[False][0], runs[True][0]
    assert on_mean <= 1.25 * off_mean and on_max <= 1.5 * off_max, runs
