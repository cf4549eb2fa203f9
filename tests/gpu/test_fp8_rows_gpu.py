"""The FP8 rollout's one-pass row quantiser (r1mega/precision/triton_fp8_rows.py) compiled on a
GPU with e4m3 (sm_89+): bit for bit against ``quantize_reference(x, "row")`` and, for SwiGLU,
against it on the Triton SwiGLU kernel's output; the op inside a compiled function; and the FP8
rollout's attention output projection through it against the explicit quantise-and-multiply."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a GPU with e4m3 (sm_89+)")

from r1mega.precision.linear import _pad_rows  # noqa: E402
from r1mega.precision.quantize import dequantize, quantize_reference  # noqa: E402
from r1mega.precision.triton_fp8_rows import fp8_rows, fp8_rows_triton  # noqa: E402


def _x(r, c, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(r, c, device="cuda", generator=g) * torch.logspace(-2, 2, c, device="cuda")
    x[0] = 0
    if r > 2:
        x[2] *= 1e-30
    return x.bfloat16()


def _same(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("r,c", [(1, 2048), (5, 96), (100, 2048), (256, 5632), (256, 14336)])
@pytest.mark.parametrize("power2", [True, False])
def test_rows_bit_for_bit(r, c, power2):
    x = _x(r, c, r + c)
    ref = quantize_reference(_pad_rows(x, 16), "row", "e4m3", power2)
    q, s = fp8_rows_triton(x, power2)
    assert _same(q, ref.data) and torch.equal(s, ref.scale)


@pytest.mark.parametrize("r,c", [(1, 256), (37, 5632), (256, 5632)])
def test_swiglu_rows_bit_for_bit(r, c):
    from r1mega.ops.triton_swiglu import swiglu_forward

    y = torch.cat([_x(r, c, 1), _x(r, c, 2)], dim=1)
    ref = quantize_reference(_pad_rows(swiglu_forward(y), 16), "row", "e4m3", True)
    q, s = fp8_rows_triton(y, True, swiglu=True)
    assert _same(q, ref.data) and torch.equal(s, ref.scale)


def test_op_compiled_equals_eager():
    x = _x(64, 2048, 7)

    def f(t):
        a = fp8_rows(t * 2, True)
        return a.data, a.scale

    q0, s0 = f(x)
    q1, s1 = torch.compile(f, fullgraph=True)(x)
    assert _same(q0, q1) and torch.equal(s0, s1)


def test_rollout_output_projection_through_the_row_kernel(monkeypatch, single_rank_runtime):
    from r1mega.config import ModelConfig
    from r1mega.models.gpt import build_model
    from r1mega.precision.policy import Fp8Policy
    from r1mega.precision.rollout import Fp8RolloutWeights

    monkeypatch.setenv("R1MEGA_FP8_ROLLOUT_ACT", "row")
    rt = single_rank_runtime()
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_layers=1, hidden_size=256, num_attention_heads=4,
                                    num_query_groups=2, ffn_hidden_size=512, vocab_size=128,
                                    max_position_embeddings=64, spec="local"), rt, wrap=False)
    fp8 = Fp8RolloutWeights(model[0], Fp8Policy(recipe="tensorwise", backend="native", rollout=True))
    lin = model[0].decoder.layers[0].self_attention.linear_proj
    x = _x(7, 256, 3).reshape(7, 1, 256)
    with torch.no_grad(), fp8.decoding():
        y, _ = lin(x)
    a = quantize_reference(x.reshape(7, 256), "row", power2=True)
    w = quantize_reference(lin.weight.detach(), "tensor", power2=fp8.policy.power2_scales)
    ref = dequantize(a).double() @ dequantize(w).double().t()
    torch.testing.assert_close(y.reshape(7, 256).double(), ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))
    fp8.remove()
