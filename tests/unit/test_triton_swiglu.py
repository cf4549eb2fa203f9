"""The exact mode's fused SwiGLU (r1mega.ops.triton_swiglu) and its wiring (r1mega.ops.exact_mlp).

* The two Triton kernels under Triton's interpreter (TRITON_INTERPRET=1 is set before triton is
  imported, so they run in a spawned process), output buffers poisoned first: forward and
  backward within the dtype's rounding of float64 autograd on ``F.silu(g) * u``; a row's bits the
  same alone, inside a larger batch and inside a batch of other rows; only the input is saved;
  the backward that also writes the output gives both kernels' bits.
* Off CUDA ``swiglu`` is the reference path.
* The wiring, on the tiny CPU model with the device check forced on and the kernel replaced by a
  counting reference: every dense MLP calls it, the model's shared config is untouched, the
  output equals megatron's unfused path bit for bit, and removal restores the modules.
  (tests/unit/test_exact_rollout.py checks that the engine's decode steps call it too.)
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from r1mega.ops import triton_swiglu
from tests.distributed.harness import run_ranks

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

ULP32 = 2.0 ** -24
# (rows, F): F below, at and across the kernel's column block; one row; no rows.
SHAPES = [(37, 1500), (5, 1024), (1, 7), (64, 96), (0, 64)]
DTYPES = ["float32", "float16", "bfloat16"]


def swiglu_error_ratios(y, dout, out, dy) -> tuple[float, float, float]:
    """max |got - float64 autograd| / bound for the output and the gate and up gradients.

    Bound per element: the output dtype's rounding (eps |ref|: twice round-to-nearest's, since
    Triton's interpreter truncates to bfloat16), 16 float32 ulps of the magnitude of the terms
    computed in float32, and the smallest normal (subnormals, flushed or not). The magnitudes
    carry (1 + |g|) factors: the GPU's ``tl.exp`` is ``ex2.approx(g log2 e)``, whose relative error
    grows with |g|, and the gate gradient's 1 + g (1 - s) cancels."""
    fi = torch.finfo(y.dtype)
    y64 = y.detach().double().requires_grad_(True)
    ref = triton_swiglu.swiglu_reference(y64)
    ref.backward(dout.double())
    ref = ref.detach()
    g, u = y64.detach().chunk(2, -1)
    do = dout.double()
    s = torch.sigmoid(g)
    d_gate_ref, d_up_ref = y64.grad.chunk(2, -1)
    d_gate, d_up = dy.double().chunk(2, -1)

    def ratio(got, want, mag):
        bound = fi.eps * want.abs() + 16 * ULP32 * mag + fi.smallest_normal
        return float(((got.double() - want).abs() / bound).max()) if want.numel() else 0.0

    grow = 1 + g.abs()
    return (ratio(out, ref, ref.abs() * grow),
            ratio(d_gate, d_gate_ref, (do * u).abs() * s * grow * grow),
            ratio(d_up, d_up_ref, (do * g * s).abs() * grow))


def make_inputs(rows: int, f: int, dtype: torch.dtype, seed: int, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    y = (torch.randn(rows, 2 * f, generator=gen) * 3).to(device, dtype)
    dout = torch.randn(rows, f, generator=gen).to(device, dtype)
    return y, dout


def run_checks(device: str = "cpu", shapes=SHAPES) -> list:
    """Everything the kernels are checked on, for the interpreter (CPU) and the GPU alike."""
    S = triton_swiglu
    results = []
    for i, (rows, f) in enumerate(shapes):
        for dtype_name in DTYPES:
            dtype = getattr(torch, dtype_name)
            y, dout = make_inputs(rows, f, dtype, seed=i, device=device)
            out = torch.full((rows, f), float("nan"), dtype=dtype, device=device)
            S.swiglu_forward(y, out=out)
            dy = torch.full((rows, 2 * f), float("nan"), dtype=dtype, device=device)
            S.swiglu_backward(dout, y, out=dy)
            ratios = swiglu_error_ratios(y.cpu(), dout.cpu(), out.cpu(), dy.cpu())
            # The backward that also writes the output (the MoE experts'): both bit for bit.
            dy2, out2 = S.swiglu_backward_with_output(dout, y)
            same = torch.equal(dy2, dy) and torch.equal(out2, out)
            # Row invariance: a row alone, a slice, the same rows among other rows, and a
            # (s, b, 2F) view of a wider buffer (row stride != 2F).
            for sl in (slice(0, 1), slice(rows // 3, rows // 2 + 1), slice(rows - 1, rows)):
                if rows == 0:
                    break
                same &= torch.equal(S.swiglu_forward(y[sl]), out[sl])
                same &= torch.equal(S.swiglu_backward(dout[sl], y[sl]), dy[sl])
                other, other_d = make_inputs(5, f, dtype, seed=100 + i, device=device)
                mixed = torch.cat([other[:2], y[sl], other[2:]])
                mixed_d = torch.cat([other_d[:2], dout[sl], other_d[2:]])
                n = sl.stop - sl.start
                same &= torch.equal(S.swiglu_forward(mixed)[2:2 + n], out[sl])
                same &= torch.equal(S.swiglu_backward(mixed_d, mixed)[2:2 + n], dy[sl])
            if rows >= 2 and rows % 2 == 0:
                wide = torch.zeros(rows, 2 * f + 3, dtype=dtype, device=device)
                wide[:, :2 * f] = y
                y3 = wide[:, :2 * f].unflatten(0, (rows // 2, 2))  # rows 2F + 3 apart
                same &= torch.equal(S.swiglu_forward(y3).reshape(rows, f), out)
                same &= torch.equal(S.swiglu_backward(dout.view(rows // 2, 2, f), y3)
                                    .reshape(rows, 2 * f), dy)
            results.append(((rows, f, dtype_name), ratios, bool(same)))
    # The autograd Function saves only its input; its gradient is the backward kernel's.
    y, dout = make_inputs(6, 40, torch.bfloat16, seed=7, device=device)
    y.requires_grad_(True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        out = S.SwiGLUFunction.apply(y)
    out.backward(dout)
    saved_only_y = len(packed) == 1 and packed[0].data_ptr() == y.data_ptr()
    grads_equal = torch.equal(y.grad, S.swiglu_backward(dout, y.detach())) and \
        torch.equal(out, S.swiglu_forward(y.detach()))
    results.append((("autograd",), (0.0, 0.0, 0.0), saved_only_y and grads_equal))
    return results


def _interpreted(rank, world):
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert triton_swiglu.HAVE_TRITON
    return run_checks("cpu")


def assert_checks(results, shapes=SHAPES, bound_ratio: float = 1.0) -> None:
    assert len(results) == len(shapes) * len(DTYPES) + 1
    for case, ratios, same in results:
        assert same, f"{case}: rows computed in another batch differ bitwise (or autograd saved more)"
        for name, r in zip(("out", "d_gate", "d_up"), ratios):
            assert r <= bound_ratio, f"{case}: {name} error {r:.3f} x its bound"


@needs_triton
def test_kernels_match_float64_and_are_row_invariant_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned process
    (results,) = run_ranks(_interpreted, 1, timeout_s=300)
    assert_checks(results)


def test_off_cuda_swiglu_is_the_reference_path():
    y = torch.randn(4, 3, 2 * 24, requires_grad=True)
    out = triton_swiglu.swiglu(y)
    g, u = torch.chunk(y, 2, dim=-1)
    assert torch.equal(out, F.silu(g) * u)
    out.sum().backward()  # through autograd's own ops
    with pytest.raises(ValueError, match="odd"):
        triton_swiglu.swiglu(torch.randn(3, 7))
    with pytest.raises(ValueError, match="does not match"):
        triton_swiglu.swiglu_backward(torch.randn(3, 5), torch.randn(3, 8))


def _tiny_model(single_rank_runtime):
    from r1mega.config import ModelConfig
    from r1mega.models.gpt import build_model

    rt = single_rank_runtime()
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=64, max_position_embeddings=64, spec="local"), rt,
                       wrap=False)


def test_route_swiglu_rewires_each_mlp_alone_and_restores(single_rank_runtime, monkeypatch):
    from megatron.core.transformer.mlp import MLP

    from r1mega.models.attention import make_packed_seqs
    from r1mega.ops import exact_mlp
    from r1mega.ops.batch_invariant import install_exact_forward, remove_exact_forward

    model = _tiny_model(single_rank_runtime)
    gpt = model[0]
    mlps = [m for m in gpt.modules() if isinstance(m, MLP)]
    assert mlps
    x = torch.randn(9, 1, gpt.config.hidden_size)
    with torch.no_grad():
        unfused = [m(x)[0] for m in mlps]  # CPU: megatron's unfused glu (bias_activation_fusion off)

    install_exact_forward(model)  # CPU: nothing rewired, the CPU path unchanged
    assert all(m.activation_func is F.silu and m.config is gpt.config for m in mlps)
    remove_exact_forward(model)

    calls = []

    def counting(y):
        calls.append(tuple(y.shape))
        return triton_swiglu.swiglu_reference(y)

    monkeypatch.setattr(exact_mlp, "fused_swiglu_wanted", lambda device: True)
    monkeypatch.setattr(triton_swiglu, "swiglu", counting)
    install_exact_forward(model)
    assert all(m.activation_func is exact_mlp.exact_swiglu for m in mlps)
    assert all(m.config is not gpt.config and m.config.use_te_activation_func for m in mlps)
    assert not gpt.config.use_te_activation_func  # the shared config: no flag for other modules
    with torch.no_grad():
        for m, want in zip(mlps, unfused):
            assert torch.equal(m(x)[0], want)
    assert calls == [(9, 1, 2 * gpt.config.ffn_hidden_size)] * len(mlps)
    # A training forward of the whole model reaches every MLP through the same function.
    calls.clear()
    gpt(input_ids=torch.randint(0, 64, (1, 12)), position_ids=None, attention_mask=None,
        packed_seq_params=make_packed_seqs([5, 7], "cpu"))
    assert len(calls) == len(mlps)
    remove_exact_forward(model)
    assert all(m.activation_func is F.silu and m.config is gpt.config for m in mlps)
