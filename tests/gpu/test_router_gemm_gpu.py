"""The router's float32 product on bf16 tensor cores (r1mega/moe/router_gemm.py) on the GPU:
float32-accurate against float64 (exact products, float32 accumulation: within 2^-19 of the sum
of |products|, where bf16 operands would be off by ~2^-9 / sqrt(K)), the same logits with and
without a graph, and as accurate under torch.compile (the layers are compiled in training)."""
from __future__ import annotations

import pytest
import torch

from r1mega.moe.router import router_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

T, H, E = 8192, 2048, 64


def _inputs(seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, device="cuda").to(torch.bfloat16)
    weight = torch.randn(E, H, generator=g, device="cuda") * 0.02
    grad = torch.randn(T, E, generator=g, device="cuda")
    return hidden, weight, grad


BOUND = 2.0 ** -19  # float32 accumulation over K = 8192 in the tensor cores' order


def _rel_err(got, ref64, abs_terms):
    return float(((got.double() - ref64).abs() / (abs_terms + 1e-30)).max())


def _check(logits, h_grad, w_grad, hidden, weight, grad):
    """Each output against float64 (h_grad, bf16, within one rounding of the float64 value)."""
    ref = hidden.double() @ weight.double().t()
    terms = hidden.double().abs() @ weight.double().abs().t()
    assert _rel_err(logits, ref, terms) <= BOUND
    ref = grad.double().t() @ hidden.double()
    terms = grad.double().abs().t() @ hidden.double().abs()
    assert _rel_err(w_grad, ref, terms) <= BOUND
    ref = grad.double() @ weight.double()
    terms = grad.double().abs() @ weight.double().abs()
    err = (h_grad.double() - ref).abs()
    assert (err <= ref.abs() * 2 ** -8 + terms * BOUND).all()


def test_logits_and_grads_are_float32_accurate():
    assert not torch.backends.cuda.matmul.allow_tf32
    hidden, weight, grad = _inputs()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = router_logits(h, w)
    logits.backward(grad)
    _check(logits.detach(), h.grad, w.grad, hidden, weight, grad)
    # bf16 operands (what the split avoids) miss the bound: the check can fail
    coarse = torch.mm(hidden, weight.to(torch.bfloat16).t(), out_dtype=torch.float32)
    terms = hidden.double().abs() @ weight.double().abs().t()
    assert _rel_err(coarse, hidden.double() @ weight.double().t(), terms) > BOUND


def test_forward_only_passes_route_on_the_same_logits():
    hidden, weight, _ = _inputs(1)
    with torch.no_grad():
        eval_logits = router_logits(hidden, weight)
    train_logits = router_logits(hidden.clone().requires_grad_(), weight.clone().requires_grad_())
    assert torch.equal(eval_logits, train_logits.detach())


def test_compiled_is_as_accurate_as_eager():
    hidden, weight, grad = _inputs(2)

    def step(h, w):
        out = router_logits(h, w)
        out.backward(grad)
        return out.detach(), h.grad, w.grad

    torch._dynamo.reset()
    compiled = torch.compile(step)(hidden.clone().requires_grad_(), weight.clone().requires_grad_())
    _check(*compiled, hidden, weight, grad)
