"""The blockwise FP8 GEMM under torch.compile: one graph, with the GEMM as r1mega's opaque op.

torch 2.11's dynamo cannot trace ``torch._scaled_mm_v2`` (scaled_mm's blockwise entry) and broke
the FP8 rollout's compiled decode there; the CPU build here traces it, so these tests check the
graph's contents rather than a failure. The numerics are the GPU test's (tests/gpu/test_fp8_gpu.py).
"""
import pytest
import torch

from r1mega.precision import gemm
from r1mega.precision.quantize import Fp8Tensor, quantize


class _Traced(Exception):
    pass


def _trace(fn, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        raise _Traced()

    with pytest.raises(Exception) as info:   # the backend stops before anything runs
        torch.compile(fn, backend=backend, fullgraph=True)(*args)
    assert isinstance(info.value, _Traced) or isinstance(info.value.__cause__, _Traced) \
        or "_Traced" in str(info.value), info.value
    torch._dynamo.reset()
    return [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("b_gran", ["block", "tile"])
def test_compiled_blockwise_gemm_is_one_graph_with_the_opaque_op(b_gran):
    torch.manual_seed(0)
    a = quantize(torch.randn(16, 256, dtype=torch.bfloat16), "tile", "e4m3", False, impl="reference")
    b = quantize(torch.randn(384, 256, dtype=torch.bfloat16), b_gran, "e4m3", False,
                 impl="reference")

    def f(ad, asc, bd, bsc):
        return gemm.scaled_gemm(Fp8Tensor(ad, asc, "tile", "e4m3"),
                                Fp8Tensor(bd, bsc, b_gran, "e4m3"), torch.bfloat16)

    targets = _trace(f, a.data, a.scale, b.data, b.scale)
    assert targets == ["r1mega.scaled_mm_blockwise"], targets


def test_blockwise_op_fake_gives_the_output_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.empty(48, 512, dtype=torch.float8_e4m3fn)
        b = torch.empty(640, 512, dtype=torch.float8_e4m3fn)
        y = torch.ops.r1mega.scaled_mm_blockwise(a, torch.empty(48, 4), b, torch.empty(5, 4),
                                                 True, torch.bfloat16)
    assert y.shape == (48, 640) and y.dtype == torch.bfloat16
